//! The blob, pin and operational routes over real HTTP against a real node process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::{TestNode, client, python, upload};
use reqwest::StatusCode;
use serde_json::Value;

/// Blob sizes at BLAKE3 chunk and iroh block edges.
const INTERESTING_SIZES: [usize; 9] = [
    0,
    1,
    1023,
    1024,
    1025,
    16 * 1024 - 1,
    16 * 1024,
    16 * 1024 + 1,
    5_000_000,
];

fn data(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| ((i as u64 * 131 + u64::from(seed)) % 251) as u8)
        .collect()
}

#[track_caller]
fn assert_error(status: StatusCode, body: &Value, expected_status: u16, code: &str) {
    assert_eq!(status.as_u16(), expected_status, "body: {body}");
    assert_eq!(body["error"]["code"], code, "body: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error without message: {body}"
    );
}

async fn get_json(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.expect("send");
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn upload_and_download_at_interesting_sizes() {
    let node = TestNode::start().expect("node");
    for (i, size) in INTERESTING_SIZES.into_iter().enumerate() {
        let bytes = data(size, i as u8);
        let added = upload(&node, bytes.clone()).await;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        assert_eq!(added["hash"], hash);
        assert_eq!(added["size"], size as u64);
        assert!(added["cid"].as_str().expect("cid").starts_with("bafkr4"));

        for id in [
            hash.clone(),
            added["cid"].as_str().expect("cid").to_string(),
        ] {
            let response = client()
                .get(format!("{}/v1/blobs/{id}", node.url))
                .send()
                .await
                .expect("get");
            assert_eq!(response.status(), StatusCode::OK);
            let headers = response.headers().clone();
            assert_eq!(headers["etag"], format!("\"{hash}\"").as_str());
            assert!(
                headers["cache-control"]
                    .to_str()
                    .expect("ascii")
                    .contains("immutable")
            );
            assert_eq!(headers["accept-ranges"], "bytes");
            assert_eq!(headers["content-length"], size.to_string().as_str());
            assert_eq!(
                response.bytes().await.expect("body").as_ref(),
                bytes.as_slice()
            );
        }
        let head = client()
            .head(format!("{}/v1/blobs/{hash}", node.url))
            .send()
            .await
            .expect("head");
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(head.headers()["content-length"], size.to_string().as_str());
    }
}

#[tokio::test]
async fn ranges_etags_and_conditional_requests() {
    let node = TestNode::start().expect("node");
    let bytes = data(3_000_000, 7);
    let hash = upload(&node, bytes.clone()).await["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    let url = format!("{}/v1/blobs/{hash}", node.url);
    let size = bytes.len();

    #[allow(clippy::type_complexity)]
    let cases: [(&str, u16, Option<(usize, usize)>); 9] = [
        ("bytes=0-0", 206, Some((0, 1))),
        ("bytes=100-199", 206, Some((100, 200))),
        ("bytes=2999000-", 206, Some((2_999_000, size))),
        ("bytes=-10", 206, Some((size - 10, size))),
        ("bytes=1048570-2097160", 206, Some((1_048_570, 2_097_161))),
        ("bytes=0-5,10-20", 200, Some((0, size))),
        ("bytes=3000000-", 416, None),
        ("bytes=5-1", 416, None),
        // An unknown unit is ignored: the whole blob (RFC 9110 §14.2).
        ("lines=1-2", 200, Some((0, size))),
    ];
    for (range, status, expected) in cases {
        let response = client()
            .get(&url)
            .header("range", range)
            .send()
            .await
            .expect("get");
        assert_eq!(response.status().as_u16(), status, "Range {range}");
        if status == 206 {
            let (start, end) = expected.expect("range");
            assert_eq!(
                response.headers()["content-range"],
                format!("bytes {start}-{}/{size}", end - 1).as_str()
            );
        }
        if status == 416 {
            assert_eq!(
                response.headers()["content-range"],
                format!("bytes */{size}").as_str()
            );
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["error"]["code"], "range_not_satisfiable");
            continue;
        }
        let (start, end) = expected.expect("range");
        assert_eq!(
            response.bytes().await.expect("body").as_ref(),
            &bytes[start..end],
            "Range {range}"
        );
    }

    let not_modified = client()
        .get(&url)
        .header("if-none-match", format!("\"{hash}\""))
        .send()
        .await
        .expect("get");
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(
        not_modified.headers()["etag"],
        format!("\"{hash}\"").as_str()
    );
}

#[tokio::test]
async fn writes_need_the_token_and_bad_ids_are_refused() {
    let node = TestNode::start().expect("node");
    let c = client();
    let bytes = data(100, 1);
    let hash = blake3::hash(&bytes).to_hex().to_string();

    let (status, body) =
        get_json(c.post(format!("{}/v1/blobs", node.url)).body(bytes.clone())).await;
    assert_error(status, &body, 401, "unauthorized");
    let (status, body) = get_json(
        c.post(format!("{}/v1/blobs", node.url))
            .bearer_auth("wrong")
            .body(bytes.clone()),
    )
    .await;
    assert_error(status, &body, 401, "unauthorized");
    // Nothing was stored by the refused uploads.
    let (status, body) = get_json(c.get(format!("{}/v1/blobs/{hash}", node.url))).await;
    assert_error(status, &body, 404, "blob_not_found");
    let (status, body) = get_json(c.put(format!("{}/v1/pins/{hash}", node.url))).await;
    assert_error(status, &body, 401, "unauthorized");
    let (status, body) = get_json(c.post(format!("{}/v1/gc", node.url))).await;
    assert_error(status, &body, 401, "unauthorized");

    for bad in [
        "nothex",
        "ABCDEF0000000000000000000000000000000000000000000000000000000000",
        "00000000000000000000000000000000000000000000000000000000000000",
        "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
        "..%2F..%2Fetc%2Fpasswd",
        "%2F",
        "%00",
        "0000000000000000000000000000000000000000000000000000000000000000%00",
    ] {
        let (status, body) = get_json(c.get(format!("{}/v1/blobs/{bad}", node.url))).await;
        assert_error(status, &body, 400, "invalid_id");
    }
    // Raw request lines, not normalised by a client library: dot segments, encoded dots and
    // slashes, NUL. Each gets a 4xx; none reaches a file or another route.
    for path in [
        "/v1/blobs/..",
        "/v1/blobs/%2e%2e",
        "/v1/blobs/../../../etc/passwd",
        "/v1/blobs/..%2f..%2fetc%2fpasswd",
        "/v1/pins/%2e%2e%2fapi-token",
        "/v1/blobs/%00",
    ] {
        let addr = node.addr.clone();
        let line = tokio::task::spawn_blocking(move || {
            raw_request(
                &addr,
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
        })
        .await
        .expect("join");
        assert!(
            line.contains(" 400 ") || line.contains(" 404 ") || line.contains(" 405 "),
            "{path}: {line}"
        );
    }
    // A well-formed hash of something never stored.
    let (status, body) =
        get_json(c.get(format!("{}/v1/blobs/{}", node.url, "ab".repeat(32)))).await;
    assert_error(status, &body, 404, "blob_not_found");
    let (status, body) = get_json(c.get(format!("{}/v1/nope", node.url))).await;
    assert_error(status, &body, 404, "route_not_found");
    let (status, body) = get_json(c.delete(format!("{}/v1/status", node.url))).await;
    assert_error(status, &body, 405, "method_not_allowed");
    // The node is still healthy after all of that.
    let (status, _) = get_json(c.get(format!("{}/healthz", node.url))).await;
    assert_eq!(status, StatusCode::OK);
}

/// Sends raw bytes and returns the status line of the answer (or the empty string if the
/// server closed the connection without answering).
fn raw_request(addr: &str, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(bytes).expect("write");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buffer[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_without_buffering() {
    let node = TestNode::start_with(&[("MESHNODE_BLOB_BYTES_MAX", "100000")]).expect("node");
    let addr = node.addr.clone();
    let token = node.token.clone();
    // A Content-Length over the limit is refused before any body byte is sent.
    let status = tokio::task::spawn_blocking(move || {
        raw_request(
            &addr,
            format!(
                "POST /v1/blobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
                 Content-Length: 10000000000\r\n\r\n"
            )
            .as_bytes(),
        )
    })
    .await
    .expect("join");
    assert!(status.contains("413"), "status line {status:?}");

    // A chunked upload that grows past the limit is cut off with 413 and nothing is stored.
    let big = data(300_000, 3);
    let stream = futures::stream::iter(
        big.chunks(10_000)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let response = client()
        .post(format!("{}/v1/blobs", node.url))
        .bearer_auth(&node.token)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    let hash = blake3::hash(&big).to_hex().to_string();
    let (status, _) = get_json(client().get(format!("{}/v1/blobs/{hash}", node.url))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Just under the limit works.
    let added = upload(&node, data(100_000, 4)).await;
    assert_eq!(added["size"], 100_000);

    // A JSON body somewhat over its cap (1 MiB) is read and thrown away, so the client gets
    // the 413 and its code rather than a reset connection — with a length and chunked.
    let sql = format!("{{\"sql\": \"SELECT 1 -- {}\"}}", "x".repeat(1_200_000));
    for chunked in [false, true] {
        let request = client()
            .post(format!("{}/v1/sql", node.url))
            .header("content-type", "application/json");
        let request = if chunked {
            let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = sql
                .as_bytes()
                .chunks(64 * 1024)
                .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
                .collect();
            request.body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        } else {
            request.body(sql.clone())
        };
        let (status, body) = get_json(request).await;
        assert_eq!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "chunked {chunked}: {body}"
        );
        assert_eq!(body["error"]["code"], "body_too_large", "chunked {chunked}");
    }
    // The node is fine afterwards.
    let (status, _) = get_json(client().get(format!("{}/healthz", node.url))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn slow_header_clients_are_cut_off_while_others_are_served() {
    let node = TestNode::start_with(&[("MESHNODE_HEADER_TIMEOUT_MS", "1000")]).expect("node");
    let addr = node.addr.clone();
    let slow = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(&addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let started = Instant::now();
        let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        for byte in request {
            if stream.write_all(&[*byte]).is_err() {
                return Some(started.elapsed());
            }
            let mut buffer = [0u8; 1024];
            match stream.read(&mut buffer) {
                Ok(0) => return Some(started.elapsed()),
                Ok(_) => return None, // answered: the timeout did not apply
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return Some(started.elapsed()),
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        None
    });
    // Meanwhile everyone else is served.
    for _ in 0..20 {
        let (status, _) = get_json(client().get(format!("{}/healthz", node.url))).await;
        assert_eq!(status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed_after = tokio::task::spawn_blocking(move || slow.join().expect("join"))
        .await
        .expect("join");
    let closed_after = closed_after.expect("the slow client was served instead of cut off");
    // The request takes ~15 s to send at this pace; it must be cut well before that.
    assert!(
        closed_after < Duration::from_secs(8),
        "closed after {closed_after:?}"
    );
}

#[tokio::test]
async fn connection_cap_queues_clients_instead_of_failing_them() {
    let node = TestNode::start_with(&[
        ("MESHNODE_CONNECTIONS_MAX", "2"),
        ("MESHNODE_HEADER_TIMEOUT_MS", "1500"),
    ])
    .expect("node");
    // Two idle connections take both slots.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&node.addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // A third client still gets its answer once the idle ones time out.
    let (status, _) = get_json(client().get(format!("{}/healthz", node.url))).await;
    assert_eq!(status, StatusCode::OK);
    drop(idle);
}

#[tokio::test]
async fn pins_and_gc() {
    let node = TestNode::start().expect("node");
    let c = client();
    let pinned = upload(&node, data(50_000, 1)).await["hash"]
        .as_str()
        .expect("h")
        .to_string();
    let unpinned_response: Value = c
        .post(format!("{}/v1/blobs?pin=false", node.url))
        .bearer_auth(&node.token)
        .body(data(50_000, 2))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let unpinned = unpinned_response["hash"].as_str().expect("h").to_string();
    let later_unpinned = upload(&node, data(20, 3)).await["hash"]
        .as_str()
        .expect("h")
        .to_string();

    let (status, body) = get_json(c.get(format!("{}/v1/pins", node.url))).await;
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<&str> = body["pins"]
        .as_array()
        .expect("pins")
        .iter()
        .map(|p| p["hash"].as_str().expect("hash"))
        .collect();
    assert!(listed.contains(&pinned.as_str()));
    assert!(listed.contains(&later_unpinned.as_str()));
    assert!(!listed.contains(&unpinned.as_str()));

    let (status, body) = get_json(
        c.delete(format!("{}/v1/pins/{later_unpinned}", node.url))
            .bearer_auth(&node.token),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = get_json(
        c.delete(format!("{}/v1/pins/{later_unpinned}", node.url))
            .bearer_auth(&node.token),
    )
    .await;
    assert_error(status, &body, 404, "not_pinned");
    let (status, body) = get_json(
        c.put(format!("{}/v1/pins/{}", node.url, "cd".repeat(32)))
            .bearer_auth(&node.token),
    )
    .await;
    assert_error(status, &body, 404, "blob_not_found");

    let (status, body) = get_json(
        c.post(format!("{}/v1/gc", node.url))
            .bearer_auth(&node.token),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["deleted"].as_u64().expect("deleted") >= 2, "{body}");
    for (hash, kept) in [
        (&pinned, true),
        (&unpinned, false),
        (&later_unpinned, false),
    ] {
        let status = c
            .get(format!("{}/v1/blobs/{hash}", node.url))
            .send()
            .await
            .expect("get")
            .status();
        assert_eq!(
            status == StatusCode::OK,
            kept,
            "{hash} kept={kept} got {status}"
        );
    }
    // The genesis document is pinned by the node itself and survives GC.
    let (_, status) = get_json(c.get(format!("{}/v1/status", node.url))).await;
    let net = status["net"].as_str().expect("net").to_string();
    let response = c
        .get(format!("{}/v1/blobs/{net}", node.url))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn ops_routes_metrics_and_openapi() {
    let node = TestNode::start().expect("node");
    let c = client();
    upload(&node, data(10, 1)).await;
    let (status, body) = get_json(c.get(format!("{}/readyz", node.url))).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    let (status, body) = get_json(c.get(format!("{}/v1/status", node.url))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["node"].as_str().map(str::len), Some(64));
    assert_eq!(body["net"].as_str().map(str::len), Some(64));

    let metrics = c
        .get(format!("{}/metrics", node.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("meshnode_http_requests_total"),
        "{metrics}"
    );
    let parsed = python("check_metrics.py", &[&metrics]).expect("prometheus parser accepts it");
    assert!(parsed.contains("meshnode_http_requests"), "{parsed}");

    let openapi: Value = c
        .get(format!("{}/openapi.json", node.url))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let paths = openapi["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/v1/blobs", "post"),
        ("/v1/blobs/{hash}", "get"),
        ("/v1/blobs/{hash}", "head"),
        ("/v1/blobs/{hash}/fetch", "post"),
        ("/v1/pins", "get"),
        ("/v1/pins/{hash}", "put"),
        ("/v1/pins/{hash}", "delete"),
        ("/v1/status", "get"),
        ("/v1/gc", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from /openapi.json"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reads_of_one_blob_never_fail_or_quarantine() {
    let node = TestNode::start().expect("node");
    // Larger than the in-memory cache's per-blob limit: every GET reads the store.
    let bytes = data(200_000, 5);
    let hash = upload(&node, bytes.clone()).await["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    let c = client();
    let requests = (0..256).map(|_| {
        let c = c.clone();
        let url = format!("{}/v1/blobs/{hash}", node.url);
        async move {
            let r = c.get(url).send().await.expect("get");
            (r.status(), r.bytes().await.expect("body").len())
        }
    });
    for (status, len) in futures::future::join_all(requests).await {
        assert!(
            status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status}"
        );
        if status == StatusCode::OK {
            assert_eq!(len, bytes.len());
        }
    }
    let metrics = c
        .get(format!("{}/metrics", node.url))
        .send()
        .await
        .expect("m")
        .text()
        .await
        .expect("t");
    assert!(
        metrics.contains("meshnode_blobs_corrupt 0"),
        "a healthy blob was counted corrupt"
    );
    let r = c
        .get(format!("{}/v1/blobs/{hash}", node.url))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK, "the blob was quarantined");
}
