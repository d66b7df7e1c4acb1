//! Crash and corruption: acknowledged adds survive SIGKILL; corrupt bytes are never served.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::{TestNode, client};
use reqwest::StatusCode;
use serde_json::Value;

fn blob(i: u64) -> Vec<u8> {
    // Sizes cycle through inline (< 16 KiB), file-backed with inline outboard, and
    // file-backed with a file outboard (> 4 MiB), so every storage path is exercised.
    let size = match i % 4 {
        0 => 100 + i as usize,
        1 => 20_000 + i as usize,
        2 => 300_000 + i as usize,
        _ => 4_300_000 + i as usize,
    };
    let mut out = vec![0u8; size];
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for byte in out.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_adds_survive_sigkill() {
    let mut node = TestNode::start().expect("node");
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let url = node.url.clone();
    let token = node.token.clone();
    // Four writers add blobs concurrently; every 201 is recorded as acknowledged.
    let mut writers = Vec::new();
    for writer in 0..4u64 {
        let acked = acked.clone();
        let url = url.clone();
        let token = token.clone();
        writers.push(tokio::spawn(async move {
            let c = client();
            for n in 0.. {
                let i = writer + 4 * n;
                let response = c
                    .post(format!("{url}/v1/blobs"))
                    .bearer_auth(&token)
                    .body(blob(i))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        let body: Value = match r.json().await {
                            Ok(body) => body,
                            Err(_) => return,
                        };
                        let hash = body["hash"].as_str().expect("hash").to_string();
                        acked.lock().expect("lock").insert(hash, i);
                    }
                    _ => return,
                }
            }
        }));
    }
    // Let the writers get going, then kill the node in the middle of their stream of adds.
    for waited in 0.. {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = acked.lock().expect("lock").len();
        if n >= 24 {
            break;
        }
        assert!(waited < 600, "only {n} adds acknowledged in 60 s");
    }
    node.kill9();
    for writer in writers {
        writer.await.expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 24);

    node.restart().expect("restart");
    let c = client();
    for (hash, i) in &acked {
        let response = c
            .get(format!("{}/v1/blobs/{hash}", node.url))
            .send()
            .await
            .expect("get");
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "acknowledged blob {i} ({hash}) lost"
        );
        let bytes = response.bytes().await.expect("body");
        assert!(
            bytes.as_ref() == blob(*i).as_slice(),
            "blob {i} came back different"
        );
    }
    // Every page of pins (the writers may have added more than one page).
    let mut pinned: Vec<String> = Vec::new();
    let mut after = String::new();
    loop {
        let pins: Value = c
            .get(format!("{}/v1/pins?limit=1000{after}", node.url))
            .send()
            .await
            .expect("pins")
            .json()
            .await
            .expect("json");
        pinned.extend(
            pins["pins"]
                .as_array()
                .expect("array")
                .iter()
                .filter_map(|p| p["hash"].as_str().map(str::to_string)),
        );
        match pins["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    for hash in acked.keys() {
        assert!(pinned.contains(hash), "pin of {hash} lost");
    }
}

#[tokio::test]
async fn corrupt_blobs_are_detected_quarantined_and_never_served() {
    let mut node = TestNode::start().expect("node");
    let c = client();
    let original = blob(1); // file-backed
    let big = blob(3); // file-backed, file outboard
    let mut hashes = Vec::new();
    for bytes in [&original, &big] {
        let added: Value = c
            .post(format!("{}/v1/blobs", node.url))
            .bearer_auth(&node.token)
            .body(bytes.clone())
            .send()
            .await
            .expect("post")
            .json()
            .await
            .expect("json");
        hashes.push(added["hash"].as_str().expect("hash").to_string());
    }
    node.stop().expect("clean stop");

    // Flip one byte in the middle of each data file on disk.
    for hash in &hashes {
        let path = node.data_dir().join(format!("blobs/data/{hash}.data"));
        let mut bytes = std::fs::read(&path).expect("data file");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x55;
        std::fs::write(&path, bytes).expect("write");
    }
    node.restart().expect("restart");
    // Pooled connections to the old process are dead.
    let c = client();

    for (hash, bytes) in hashes.iter().zip([&original, &big]) {
        // The first read detects the damage: an error status, never the bad bytes.
        let response = c
            .get(format!("{}/v1/blobs/{hash}", node.url))
            .send()
            .await
            .expect("get");
        let status = response.status();
        let body = response.bytes().await;
        if status == StatusCode::OK {
            // A streamed response may have started before the damaged piece; it must then
            // end early instead of delivering the corrupt bytes.
            let body = body.unwrap_or_default();
            assert!(
                body.len() < bytes.len(),
                "corrupt blob {hash} was served whole"
            );
        } else {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            let body: Value = serde_json::from_slice(&body.expect("body")).expect("json");
            assert_eq!(body["error"]["code"], "blob_quarantined");
        }
        // A range that avoids the damaged region is still refused or correct, never wrong.
        // Soon the blob is gone (quarantined and purged) while its pin stays.
        let mut gone = false;
        for _ in 0..100 {
            let status = c
                .get(format!("{}/v1/blobs/{hash}", node.url))
                .send()
                .await
                .expect("get")
                .status();
            if status == StatusCode::NOT_FOUND {
                gone = true;
                break;
            }
            assert_ne!(
                status,
                StatusCode::OK,
                "corrupt blob served after detection"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gone, "corrupt blob {hash} was not purged");
        let pins: Value = c
            .get(format!("{}/v1/pins", node.url))
            .send()
            .await
            .expect("pins")
            .json()
            .await
            .expect("json");
        let entry = pins["pins"]
            .as_array()
            .expect("array")
            .iter()
            .find(|p| p["hash"] == hash.as_str())
            .cloned()
            .expect("pin kept");
        assert!(
            entry["size"].is_null(),
            "missing blob listed with a size: {entry}"
        );

        // Re-adding the right bytes restores it (an upload racing the purge is told to retry).
        let mut status = StatusCode::SERVICE_UNAVAILABLE;
        for _ in 0..100 {
            status = c
                .post(format!("{}/v1/blobs", node.url))
                .bearer_auth(&node.token)
                .body(bytes.to_vec())
                .send()
                .await
                .expect("post")
                .status();
            if status != StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, StatusCode::CREATED);
        let back = c
            .get(format!("{}/v1/blobs/{hash}", node.url))
            .send()
            .await
            .expect("get");
        assert_eq!(back.status(), StatusCode::OK);
        assert!(back.bytes().await.expect("body").as_ref() == bytes.as_slice());
    }
    let metrics = c
        .get(format!("{}/metrics", node.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("meshnode_blobs_corrupt 2"),
        "corruption not counted: {metrics}"
    );
}
