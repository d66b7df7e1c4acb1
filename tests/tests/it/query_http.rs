//! SQL and vector search over HTTP and the CLI against real nodes: the demo network's tables,
//! formats, read-only and bounded execution, filtered kNN and the `knn` table function, ANN
//! recall, time travel, rebuild, crash catch-up, and DuckDB over the Parquet export.

use std::time::{Duration, Instant};

use meshnode_schemas::{
    BlobHash, EventBody, EventId, Payload, SignedEvent, SigningKey, SkillPublish, Vector, author_of,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestNode, client, post, python, sql};

async fn rows(node: &TestNode, text: &str) -> Vec<Value> {
    let (status, body) = sql(node, text).await;
    assert_eq!(status, StatusCode::OK, "{text}: {body}");
    body["rows"].as_array().expect("rows").clone()
}

async fn scalar(node: &TestNode, text: &str) -> Value {
    rows(node, text).await[0][0].clone()
}

#[tokio::test]
async fn demo_tables_answer_sql_in_every_format() {
    let node = TestNode::start_demo(&[]).expect("node");
    let tables: Value = client()
        .get(format!("{}/v1/tables", node.url))
        .send()
        .await
        .expect("tables")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = tables["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    for table in [
        "events",
        "transfers",
        "balances",
        "skills",
        "skill_endorsements",
        "basins",
        "basin_versions",
        "reputation",
        "reputation_deltas",
        "nodes",
        "blobs",
    ] {
        assert!(names.contains(&table), "{table} missing from {names:?}");
    }
    let skills = &tables["tables"]
        .as_array()
        .expect("t")
        .iter()
        .find(|t| t["name"] == "skills")
        .expect("skills")["columns"];
    let embedding = skills
        .as_array()
        .expect("cols")
        .iter()
        .find(|c| c["name"] == "embedding")
        .expect("embedding");
    assert!(
        embedding["type"]
            .as_str()
            .expect("type")
            .starts_with("FixedSizeList"),
        "{embedding}"
    );

    let size = client()
        .get(format!("{}/v1/status", node.url))
        .send()
        .await
        .expect("s")
        .json::<Value>()
        .await
        .expect("j")["events"]
        .clone();
    assert_eq!(scalar(&node, "SELECT count(*) FROM events").await, size);
    assert_eq!(
        scalar(&node, "SELECT count(DISTINCT id) FROM events").await,
        size
    );
    assert_eq!(
        scalar(&node, "SELECT count(*) FROM transfers WHERE kind = 'mint'").await,
        4
    );
    assert_eq!(scalar(&node, "SELECT count(*) FROM skills").await, 7);
    // Balances add up to the supply, and every row carries provenance.
    let supply = scalar(
        &node,
        "SELECT sum(amount) FROM transfers WHERE kind = 'mint'",
    )
    .await;
    assert_eq!(
        scalar(&node, "SELECT sum(received) - sum(sent) FROM balances").await,
        supply
    );
    let row = &rows(
        &node,
        "SELECT id, author, leaf_index FROM skill_endorsements ORDER BY leaf_index LIMIT 1",
    )
    .await[0];
    assert_eq!(row[0].as_str().map(str::len), Some(64));
    assert_eq!(row[1].as_str().map(str::len), Some(64));
    // Joins across tables.
    let endorsed = rows(
        &node,
        "SELECT s.name, e.verdict, e.score FROM skills s JOIN skill_endorsements e ON e.skill = s.id \
         ORDER BY e.score DESC",
    )
    .await;
    assert_eq!(endorsed.len(), 5);
    assert_eq!(endorsed[0][0], "Pinot grape classifier");
    assert_eq!(
        scalar(&node, "SELECT count(*) FROM basin_versions").await,
        5
    );
    assert_eq!(scalar(&node, "SELECT max(n_versions) FROM basins").await, 3);
    assert_eq!(scalar(&node, "SELECT count(*) FROM nodes").await, 3);
    assert_eq!(
        scalar(
            &node,
            "SELECT count(*) FROM blobs WHERE pinned AND n_hosts = 1"
        )
        .await,
        7
    );

    // CSV and Arrow IPC.
    let csv = client()
        .post(format!("{}/v1/sql", node.url))
        .header("accept", "text/csv")
        .json(&json!({"sql": "SELECT name, price FROM skills ORDER BY price DESC LIMIT 2"}))
        .send()
        .await
        .expect("csv")
        .text()
        .await
        .expect("text");
    assert_eq!(csv.lines().next(), Some("name,price"), "{csv}");
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let arrow_bytes = client()
        .post(format!("{}/v1/sql", node.url))
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(&json!({"sql": "SELECT name, price, embedding FROM skills ORDER BY price"}))
        .send()
        .await
        .expect("arrow")
        .bytes()
        .await
        .expect("bytes");
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow_bytes.to_vec()), None)
            .expect("ipc");
    let batches: Vec<_> = reader.collect::<Result<_, _>>().expect("batches");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 7);
    assert_eq!(batches[0].schema().field(2).name(), "embedding");

    // The CLI prints the same.
    let out = node.cli(&["--json", "sql", "SELECT count(*) AS n FROM skills"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(value["rows"][0][0], 7);
    let out = node.cli(&["sql", "--tables"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("skills (7 rows)"));
}

#[tokio::test]
async fn sql_is_read_only_and_bounded() {
    let node = TestNode::start_demo(&[("MESHNODE_QUERY_TIMEOUT_MS", "2000")]).expect("node");
    for (statement, code) in [
        ("DROP TABLE skills", "read_only"),
        ("CREATE TABLE x (a INT)", "read_only"),
        (
            "INSERT INTO balances VALUES ('a', 1, 1, 1, 1, 1)",
            "read_only",
        ),
        ("DELETE FROM events", "read_only"),
        ("UPDATE balances SET balance = 0", "read_only"),
        ("SET datafusion.execution.batch_size = 1", "read_only"),
        (
            "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
            "read_only",
        ),
        ("COPY skills TO '/tmp/out.csv'", "read_only"),
        (
            "SELECT * FROM generate_series(1, 9876543210)",
            "unknown_function",
        ),
        (
            "SELECT * FROM read_parquet('/etc/passwd')",
            "unknown_function",
        ),
        ("SELECT * FROM '/etc/passwd'", "unknown_table"),
        ("SELECT * FROM no_such_table", "unknown_table"),
        ("SELECT no_such_column FROM skills", "sql_error"),
        ("SELEKT 1", "sql_error"),
    ] {
        let (status, body) = sql(&node, statement).await;
        assert!(status.is_client_error(), "{statement}: {status} {body}");
        assert_eq!(body["error"]["code"], code, "{statement}: {body}");
    }
    // Deep expressions are refused by the parser before planning.
    let deep = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
    let (status, body) = sql(&node, &deep).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let deep = format!("SELECT 1{}", " + 1".repeat(20_000));
    let (status, body) = sql(&node, &deep).await;
    assert!(status.is_client_error(), "{status} {body}");
    // Text over the cap.
    let long = format!("SELECT '{}'", "x".repeat(70_000));
    let (status, body) = sql(&node, &long).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    // An endless query is cancelled at the timeout while the node keeps answering others.
    let bomb = tokio::spawn({
        let url = node.url.clone();
        async move {
            let started = Instant::now();
            let r = client()
                .post(format!("{url}/v1/sql"))
                .json(&json!({"sql": "WITH RECURSIVE t(n) AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t"}))
                .send()
                .await
                .expect("bomb");
            (
                r.status(),
                r.json::<Value>().await.expect("json"),
                started.elapsed(),
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let healthz = client()
        .get(format!("{}/healthz", node.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(healthz.status(), StatusCode::OK);
    assert!(
        !bomb.is_finished(),
        "the endless query finished before the health check"
    );
    let (status, body, _) = bomb.await.expect("join");
    assert!(
        [
            StatusCode::REQUEST_TIMEOUT,
            StatusCode::UNPROCESSABLE_ENTITY
        ]
        .contains(&status),
        "{status} {body}"
    );
    // Results are capped and say so.
    let cross = "SELECT a.id FROM events a, events b, events c";
    let (status, body) = sql(&node, cross).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"].as_array().expect("rows").len(), 10_000);
    assert_eq!(body["truncated"], true);
    // Still healthy.
    assert_eq!(scalar(&node, "SELECT count(*) FROM skills").await, 7);
}

#[tokio::test]
async fn vector_search_filters_before_ranking() {
    let node = TestNode::start_demo(&[]).expect("node");
    // The demo's skills carry the model's vectors, as an agent computes them before it
    // publishes.
    let (status, body) = embeddings(&node, json!({"input": "grape harvest vineyard"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let query: Vec<f32> = floats(&body["data"][0]["embedding"])
        .into_iter()
        .map(|x| x as f32)
        .collect();
    // By default a row has every column but the vectors.
    let (status, body) = post(
        &node,
        "/v1/search",
        json!({"table": "skills", "vector": query, "k": 3}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let row = &body["results"][0]["row"];
    assert!(
        row["name"].is_string() && row["domain"].is_string(),
        "{row}"
    );
    assert!(
        row.get("embedding").is_none() && row.get("text_vec").is_none(),
        "{row}"
    );
    // Named columns, a vector among them; an unknown one is refused.
    let (status, body) = post(
        &node,
        "/v1/search",
        json!({"table": "skills", "vector": query, "k": 3, "columns": ["id", "author", "embedding"]}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    let keys: Vec<&String> = results[0]["row"].as_object().expect("row").keys().collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    for columns in [json!(["nope"]), json!([]), json!(vec!["id"; 65])] {
        let (status, body) = post(
            &node,
            "/v1/search",
            json!({"table": "skills", "vector": query, "k": 3, "columns": columns}),
            false,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let code = body["error"]["code"].as_str().unwrap_or("");
        assert!(
            code == "unknown_column" || code == "invalid_columns",
            "{body}"
        );
    }
    let distances: Vec<f64> = results
        .iter()
        .map(|r| r["distance"].as_f64().expect("d"))
        .collect();
    assert!(distances.windows(2).all(|w| w[0] <= w[1]), "{distances:?}");
    assert!(
        results[0]["row"]["id"].as_str().is_some()
            && results[0]["row"]["author"].as_str().is_some()
    );
    // Exact distances agree with a cosine computed here.
    for r in results {
        let v: Vec<f32> = r["row"]["embedding"]
            .as_array()
            .expect("e")
            .iter()
            .map(|x| x.as_f64().expect("f") as f32)
            .collect();
        let dot: f32 = v.iter().zip(&query).map(|(a, b)| a * b).sum();
        let norms = v.iter().map(|x| x * x).sum::<f32>().sqrt()
            * query.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cosine = 1.0 - dot / norms;
        assert!((cosine - r["distance"].as_f64().expect("d") as f32).abs() < 1e-4);
    }
    // The filter applies before ranking: k results, all matching, even if they rank low.
    let (_, body) = post(
        &node,
        "/v1/search",
        json!({"table": "skills", "vector": query, "k": 2, "filter": "domain = 'medicine'"}),
        false,
    )
    .await;
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{body}");
    assert!(results.iter().all(|r| r["row"]["domain"] == "medicine"));
    // The same through SQL with the knn table function.
    let text = format!(
        "SELECT name, domain, _distance FROM knn('skills', '{}', 2) WHERE domain = 'medicine' ORDER BY _distance",
        serde_json::to_string(&query).expect("json")
    );
    let got = rows(&node, &text).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0][0], results[0]["row"]["name"]);
    // L2 and dot work too; basins and nodes are searchable.
    for metric in ["l2", "dot"] {
        let (status, body) = post(
            &node,
            "/v1/search",
            json!({"table": "skills", "vector": query, "k": 7, "metric": metric}),
            false,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["results"].as_array().expect("r").len(), 7);
    }
    // The demo's basins and node signatures are 8-d hashed bags of words.
    let hashed = meshnode_gateway::demo::embed("grape harvest vineyard");
    for table in ["basins", "nodes"] {
        let (status, body) = post(
            &node,
            "/v1/search",
            json!({"table": table, "vector": hashed, "k": 1}),
            false,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{table}: {body}");
        assert_eq!(body["results"].as_array().expect("r").len(), 1);
    }
    // Bad input: 4xx with a code, and nothing else happens.
    for (request, status, code) in [
        (
            json!({"table": "skills", "vector": [1.0, 2.0], "k": 3}),
            400,
            "dimension_mismatch",
        ),
        (
            json!({"table": "skills", "vector": vec![1e39; 8], "k": 3}),
            400,
            "invalid_vector",
        ),
        (
            json!({"table": "skills", "vector": [], "k": 3}),
            400,
            "invalid_vector",
        ),
        (
            json!({"table": "skills", "vector": ["a"], "k": 3}),
            400,
            "invalid_vector",
        ),
        (
            json!({"table": "skills", "vector": query, "k": 0}),
            400,
            "invalid_k",
        ),
        (
            json!({"table": "skills", "vector": query, "k": 1_000_000}),
            400,
            "invalid_k",
        ),
        (
            json!({"table": "skills", "vector": query, "metric": "manhattan"}),
            400,
            "invalid_metric",
        ),
        (
            json!({"table": "skills", "vector": query, "filter": "domain = "}),
            400,
            "invalid_filter",
        ),
        (
            json!({"table": "transfers", "vector": query}),
            400,
            "not_a_vector_table",
        ),
        (
            json!({"table": "nope", "vector": query}),
            404,
            "unknown_table",
        ),
    ] {
        let (got, body) = post(&node, "/v1/search", request.clone(), false).await;
        assert_eq!(
            (got.as_u16(), body["error"]["code"].as_str()),
            (status, Some(code)),
            "{request}: {body}"
        );
    }
    let (status, body) = sql(&node, "SELECT * FROM knn('skills', '[1, 2]', 3)").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = sql(&node, "SELECT * FROM knn('skills', '[not json', 3)").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // The CLI searches too.
    let out = node.cli(&[
        "search",
        "--vector",
        &serde_json::to_string(&query).expect("j"),
        "-k",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}

fn random_vector(seed: u64, dim: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..dim)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x % 2000) as f32 / 1000.0) - 1.0
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ann_index_keeps_recall_high_and_time_travel_and_rebuild_work() {
    let node = TestNode::start_with(&[("MESHNODE_ANN_ROWS_MIN", "1000")]).expect("node");
    let key = meshnode_schemas::parse_key_file(
        &std::fs::read_to_string(node.data_dir().join("node.key")).expect("key"),
    )
    .expect("key");
    let status: Value = client()
        .get(format!("{}/v1/status", node.url))
        .send()
        .await
        .expect("s")
        .json()
        .await
        .expect("j");
    let net = BlobHash::from_hex(status["net"].as_str().expect("net")).expect("hex");
    let dim = 32;
    let n = 1500u64;
    let mut prev: Option<EventId> = None;
    let mut envelopes = Vec::new();
    for i in 1..=n {
        let event = skill_publish(net, &key, i, prev, &random_vector(i, dim));
        prev = Some(event.id);
        envelopes.push(event.envelope);
    }
    publish(&node, &envelopes).await;
    let (status, body) = post(&node, "/v1/query", json!({"action": "sync"}), true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(&node, "/v1/query", json!({"action": "reindex"}), true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["detail"]
            .as_array()
            .expect("detail")
            .iter()
            .any(|t| t == "skills"),
        "{body}"
    );

    // The in-memory HNSW index is built in the background; searches use it once it holds
    // every row.
    wait_for_memory_index(&node, "skills", "embedding", n).await;

    // Recall@10 of the ANN index against exact search.
    let mut found = 0;
    let queries = 30;
    for q in 0..queries {
        let vector = random_vector(10_000 + q, dim);
        let (_, exact) = post(
            &node,
            "/v1/search",
            json!({"table": "skills", "vector": vector, "k": 10, "exact": true}),
            false,
        )
        .await;
        let (_, ann) = post(
            &node,
            "/v1/search",
            json!({"table": "skills", "vector": vector, "k": 10}),
            false,
        )
        .await;
        let truth = result_ids(&exact);
        assert_eq!(truth.len(), 10);
        found += result_ids(&ann)
            .iter()
            .filter(|id| truth.contains(id))
            .count();
    }
    let recall = found as f64 / (queries as f64 * 10.0);
    assert!(recall >= 0.9, "recall@10 = {recall}");
    // The in-memory exact answer is Lance's: a filter that keeps every row takes Lance's
    // exact path.
    for q in 0..5 {
        let vector = random_vector(20_000 + q, dim);
        let (_, ours) = post(
            &node,
            "/v1/search",
            json!({"table": "skills", "vector": vector, "k": 10, "exact": true}),
            false,
        )
        .await;
        let (_, lance) = post(
            &node,
            "/v1/search",
            json!({"table": "skills", "vector": vector, "k": 10, "filter": "price > 0"}),
            false,
        )
        .await;
        assert_eq!(result_ids(&ours), result_ids(&lance), "{ours} {lance}");
    }
    // Searches, exact and by the graph, while rows are being added to the table and the
    // index: every one answers, from rows that exist.
    let mut more = Vec::new();
    for i in n + 1..=n + 300 {
        let event = skill_publish(net, &key, i, prev, &random_vector(i, dim));
        prev = Some(event.id);
        more.push(event.envelope);
    }
    let searching = {
        let url = node.url.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            for q in 0..120u64 {
                let r = client()
                    .post(format!("{url}/v1/search"))
                    .json(&json!({"table": "skills", "vector": random_vector(30_000 + q, dim), "k": 10, "exact": q % 2 == 0}))
                    .send()
                    .await
                    .expect("search");
                assert_eq!(r.status(), StatusCode::OK);
                let body: Value = r.json().await.expect("json");
                assert_eq!(body["results"].as_array().map(Vec::len), Some(10), "{body}");
                answered += 1;
            }
            answered
        })
    };
    for chunk in more.chunks(20) {
        publish(&node, chunk).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(searching.await.expect("join"), 120);
    let (status, _) = post(&node, "/v1/query", json!({"action": "sync"}), true).await;
    assert_eq!(status, StatusCode::OK);
    let n = n + 300;
    wait_for_memory_index(&node, "skills", "embedding", n).await;
    // A selective filter (1%) still returns k matching rows with the index.
    let (_, filtered) = post(&node, "/v1/search", json!({"table": "skills", "vector": random_vector(7, dim), "k": 10, "filter": "domain = 'rare'"}), false).await;
    let results = filtered["results"].as_array().expect("results");
    assert_eq!(results.len(), 10, "{filtered}");
    assert!(results.iter().all(|r| r["row"]["domain"] == "rare"));

    // Time travel: as of the first 500 events.
    let (status, body) = post(
        &node,
        "/v1/sql",
        json!({"sql": "SELECT count(*), max(price) FROM skills", "as_of": 500}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"][0], json!([500, 500]));
    // A state table as of now: the version of its last write, which the query worker opens
    // by version and commit time; the same rows as the live table.
    let n = crate::harness::status(&node).await["events"]
        .as_u64()
        .expect("events");
    let (status, body) = post(
        &node,
        "/v1/sql",
        json!({"sql": "SELECT count(*), sum(balance) FROM balances", "as_of": n}),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["as_of"]["state_tables_at"].as_u64(), Some(n), "{body}");
    let live = rows(&node, "SELECT count(*), sum(balance) FROM balances").await;
    assert_eq!(body["rows"], Value::Array(live), "{body}");
    let (status, body) = post(
        &node,
        "/v1/sql",
        json!({"sql": "SELECT 1", "as_of": 99_999}),
        false,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("as_of_ahead"))
    );

    // A row appended after the index was built is found at once: the search falls back to
    // Lance until the index holds it, then the index has it.
    let fresh = random_vector(999_999, dim);
    let event = skill_publish(net, &key, n + 1, prev, &fresh);
    publish(&node, &[event.envelope]).await;
    let (status, _) = post(&node, "/v1/query", json!({"action": "sync"}), true).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        nearest_skill(&node, json!(fresh)).await,
        format!("s{}", n + 1)
    );
    wait_for_memory_index(&node, "skills", "embedding", n + 1).await;
    assert_eq!(
        nearest_skill(&node, json!(fresh)).await,
        format!("s{}", n + 1)
    );

    // Rebuild from the ledger gives the same answers.
    let before = rows(&node, "SELECT count(*), sum(price) FROM skills").await;
    let out = node.cli(&["query", "rebuild"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        rows(&node, "SELECT count(*), sum(price) FROM skills").await,
        before
    );
    // The rebuilt tables are other rows: the index of the old ones is never served from,
    // and a new one is built.
    assert_eq!(
        nearest_skill(&node, json!(fresh)).await,
        format!("s{}", n + 1)
    );
    wait_for_memory_index(&node, "skills", "embedding", n + 1).await;
    assert_eq!(
        nearest_skill(&node, json!(fresh)).await,
        format!("s{}", n + 1)
    );
}

/// A `skill.publish` by `key` at `seq`, with `vector` as its embedding; every 100th is in
/// the domain `rare`.
fn skill_publish(
    net: BlobHash,
    key: &meshnode_schemas::SigningKey,
    seq: u64,
    prev: Option<EventId>,
    vector: &[f32],
) -> SignedEvent {
    let body = EventBody {
        net,
        author: author_of(key),
        seq,
        prev,
        deps: vec![],
        ts: seq as i64,
        payload: Payload::SkillPublish(SkillPublish {
            skill_id: format!("s{seq}"),
            name: format!("skill {seq}"),
            version: "1".into(),
            description: String::new(),
            domain: if seq.is_multiple_of(100) {
                "rare"
            } else {
                "common"
            }
            .into(),
            capabilities: vec![],
            specializations: vec![],
            embedding: Vector::new(vector).expect("v"),
            blob: BlobHash::of(&seq.to_le_bytes()),
            size: 1,
            base_model: "m".into(),
            license: "MIT".into(),
            price: seq,
        }),
    };
    SignedEvent::sign(body, key).expect("sign")
}

/// Posts envelopes, 100 at a time, each accepted.
async fn publish(node: &TestNode, envelopes: &[Vec<u8>]) {
    let c = client();
    for chunk in envelopes.chunks(100) {
        let futures = chunk.iter().map(|e| {
            c.post(format!("{}/v1/events", node.url))
                .bearer_auth(&node.token)
                .header("content-type", "application/cbor")
                .body(e.clone())
                .send()
        });
        for r in futures::future::join_all(futures).await {
            let r = r.expect("post");
            assert!(r.status().is_success(), "{}", r.status());
        }
    }
}

/// The `id` of each row a search answered, in order.
fn result_ids(answer: &Value) -> Vec<Value> {
    answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["row"]["id"].clone())
        .collect()
}

/// The skill_id of the skill nearest to `vector`.
async fn nearest_skill(node: &TestNode, vector: Value) -> Value {
    let (_, body) = post(
        node,
        "/v1/search",
        json!({"table": "skills", "vector": vector, "k": 1}),
        false,
    )
    .await;
    body["results"][0]["row"]["skill_id"].clone()
}

/// Waits until `table`'s in-memory index of `column` holds `rows` rows (`GET /v1/tables`).
async fn wait_for_memory_index(node: &TestNode, table: &str, column: &str, rows: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let tables: Value = client()
            .get(format!("{}/v1/tables", node.url))
            .send()
            .await
            .expect("tables")
            .json()
            .await
            .expect("json");
        let held = tables["tables"]
            .as_array()
            .expect("tables")
            .iter()
            .find(|t| t["name"] == table)
            .and_then(|t| t["memory_indexes"][column].as_u64());
        if held == Some(rows) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{table}.{column}: {held:?} of {rows} rows indexed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tables_catch_up_after_sigkill_and_match_duckdb() {
    let mut node = TestNode::start_demo(&[]).expect("node");
    let key = meshnode_schemas::parse_key_file(
        &std::fs::read_to_string(node.data_dir().join("node.key")).expect("key"),
    )
    .expect("key");
    // Keep minting while killing the node.
    let url = node.url.clone();
    let token = node.token.clone();
    let head: Value = client()
        .get(format!("{url}/v1/accounts/{}", author_of(&key)))
        .send()
        .await
        .expect("a")
        .json()
        .await
        .expect("j");
    let status: Value = client()
        .get(format!("{url}/v1/status"))
        .send()
        .await
        .expect("s")
        .json()
        .await
        .expect("j");
    let net = BlobHash::from_hex(status["net"].as_str().expect("net")).expect("hex");
    let mut seq = head["head_seq"].as_u64().expect("seq");
    let mut prev = head["head_id"]
        .as_str()
        .map(|h| EventId::from_hex(h).expect("hex"));
    let writer = tokio::spawn(async move {
        let c = client();
        let mut acked = 0;
        loop {
            seq += 1;
            let body = EventBody {
                net,
                author: author_of(&key),
                seq,
                prev,
                deps: vec![],
                ts: 0,
                payload: Payload::TokenMint(meshnode_schemas::TokenMint {
                    to: author_of(&SigningKey::from_bytes(&[9; 32])),
                    amount: seq,
                    reason: String::new(),
                }),
            };
            let event = SignedEvent::sign(body, &key).expect("sign");
            match c
                .post(format!("{url}/v1/events"))
                .bearer_auth(&token)
                .header("content-type", "application/cbor")
                .body(event.envelope.clone())
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    acked += 1;
                    prev = Some(event.id);
                }
                _ => return acked,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    node.kill9();
    let acked = writer.await.expect("writer");
    assert!(acked > 10);
    node.restart().expect("restart");
    let (status, body) = post(&node, "/v1/query", json!({"action": "sync"}), true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let size: Value = client()
        .get(format!("{}/v1/status", node.url))
        .send()
        .await
        .expect("s")
        .json::<Value>()
        .await
        .expect("j")["events"]
        .clone();
    assert_eq!(scalar(&node, "SELECT count(*) FROM events").await, size);
    assert_eq!(
        scalar(&node, "SELECT count(DISTINCT leaf_index) FROM events").await,
        size
    );
    assert_eq!(
        scalar(&node, "SELECT max(leaf_index) + 1 FROM events").await,
        size
    );
    let supply = scalar(
        &node,
        "SELECT sum(amount) FROM transfers WHERE kind = 'mint'",
    )
    .await;
    let status: Value = client()
        .get(format!("{}/v1/status", node.url))
        .send()
        .await
        .expect("s")
        .json()
        .await
        .expect("j");
    assert_eq!(supply, status["supply"]);

    // Export to Parquet; DuckDB reading it gives the same answers as our SQL.
    let dir = node.data_dir().join("export");
    let out = node.cli(&[
        "--json",
        "export",
        "--format",
        "parquet",
        dir.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for query in [
        "SELECT count(*) FROM events",
        "SELECT kind, count(*), sum(amount) FROM transfers GROUP BY kind ORDER BY kind",
        "SELECT account, balance FROM balances ORDER BY balance DESC, account LIMIT 5",
        "SELECT s.name, count(e.id) FROM skills s LEFT JOIN skill_endorsements e ON e.skill = s.id GROUP BY s.name ORDER BY s.name",
        "SELECT subject, score FROM reputation ORDER BY score DESC, subject",
        "SELECT basin_id, n_versions FROM basins ORDER BY basin_id",
    ] {
        let ours = rows(&node, query).await;
        let theirs: Value = serde_json::from_str(
            &python("duckdb_check.py", &[dir.to_str().expect("utf8"), query]).expect("duckdb"),
        )
        .expect("json");
        let theirs = theirs["rows"].as_array().expect("rows").clone();
        let normalize = |rows: &[Value]| -> Vec<Vec<String>> {
            rows.iter()
                .map(|r| {
                    r.as_array()
                        .expect("row")
                        .iter()
                        .map(|v| match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .collect()
        };
        assert_eq!(normalize(&ours), normalize(&theirs), "{query}");
    }
}

async fn embeddings(node: &TestNode, body: Value) -> (StatusCode, Value) {
    post(node, "/v1/embeddings", body, false).await
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[tokio::test]
async fn embeddings_answer_in_openai_format_for_any_openai_client() {
    let node = TestNode::start().expect("node");
    assert_eq!(
        crate::harness::status(&node).await["query"]["embed_model"],
        "all-MiniLM-L6-v2@53aa5117"
    );
    let texts = ["who can bandage a cut?", "make me a margarita"];
    let (got, body) = embeddings(&node, json!({"input": texts, "model": "all-MiniLM-L6-v2"})).await;
    assert_eq!(got, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "all-MiniLM-L6-v2");
    assert!(body["usage"]["prompt_tokens"].as_u64() > Some(10), "{body}");
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    let ours: Vec<Vec<f64>> = data.iter().map(|d| floats(&d["embedding"])).collect();
    assert_eq!(data[1]["index"], 1);
    assert_eq!(ours[0].len(), 384);
    // The same vectors as the CLI computes offline.
    let cli = node.cli(&["--json", "embed", texts[0]]);
    assert!(cli.status.success());
    let cli: Value = serde_json::from_slice(&cli.stdout).expect("cli json");
    assert!(cosine(&ours[0], &floats(&cli["data"][0]["embedding"])) > 0.99999);
    // The official OpenAI client (base64 by default, decoded by the client).
    let url = node.url.clone();
    let python_out = tokio::task::spawn_blocking(move || {
        crate::harness::python("openai_embeddings.py", &[&url, texts[0], texts[1]])
    })
    .await
    .expect("join")
    .expect("openai client");
    let theirs: Value = serde_json::from_str(&python_out).expect("json");
    assert_eq!(theirs["model"], "all-MiniLM-L6-v2");
    for (i, v) in ours.iter().enumerate() {
        assert!(
            cosine(v, &floats(&theirs["embeddings"][i])) > 0.99999,
            "{i}"
        );
    }
    // Bad input: a clear code each, nothing embedded.
    let many: Vec<&str> = vec!["a"; 65];
    let long = "x".repeat(16 * 1024 + 1);
    for (body, code) in [
        (json!({"input": ""}), "invalid_input"),
        (json!({"input": ["ok", "  "]}), "invalid_input"),
        (json!({"input": []}), "invalid_input"),
        (json!({"input": [[101, 102]]}), "invalid_input"),
        (json!({"input": 7}), "invalid_input"),
        (json!({"input": long}), "invalid_input"),
        (json!({"input": many}), "too_many_inputs"),
        (
            json!({"input": "x", "model": "text-embedding-3-small"}),
            "unknown_model",
        ),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            "invalid_encoding_format",
        ),
    ] {
        let (got, answer) = embeddings(&node, body).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{answer}"
        );
    }
    // Other scripts and odd characters embed like any text.
    let (got, body) = embeddings(&node, json!({"input": ["東京でワイン", "🍷", "Ελληνικά"]})).await;
    assert_eq!(got, StatusCode::OK, "{body}");
}

async fn text_search(node: &TestNode, body: Value) -> (StatusCode, Value) {
    post(node, "/v1/search", body, false).await
}

/// The `name` (or `service`, `basin_id`) of each hit.
fn names(body: &Value) -> Vec<String> {
    body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            let row = &r["row"];
            ["name", "service", "basin_id"]
                .iter()
                .find_map(|k| row[*k].as_str())
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn intent_search_finds_skills_by_meaning_by_words_and_by_both() {
    let node = TestNode::start_demo(&[]).expect("node");
    // By meaning: no word in common with the skill it should find.
    for (text, mode, want) in [
        (
            "help me figure out when to pick the grapes",
            "hybrid",
            "Harvest timing planner",
        ),
        (
            "who should the doctor see first",
            "vector",
            "Triage assistant",
        ),
        (
            "someone is bleeding, what do I do",
            "hybrid",
            "Triage assistant",
        ),
        // By words: a jargon word matches exactly.
        ("pinot", "text", "Pinot grape classifier"),
        ("pinot", "hybrid", "Pinot grape classifier"),
    ] {
        let (status, body) = text_search(
            &node,
            json!({"table": "skills", "text": text, "k": 3, "mode": mode}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            names(&body).first().map(String::as_str),
            Some(want),
            "{text}: {body}"
        );
        assert_eq!(body["mode"], mode);
        assert_eq!(body["model"], "all-MiniLM-L6-v2@53aa5117");
        let scores: Vec<f64> = body["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["score"].as_f64().expect("score"))
            .collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    }
    // Words alone only find rows that have them; the fused ranking says where each came from.
    let (_, body) = text_search(
        &node,
        json!({"table": "skills", "text": "pinot", "mode": "text"}),
    )
    .await;
    assert_eq!(names(&body), ["Pinot grape classifier"], "{body}");
    let (_, body) = text_search(&node, json!({"table": "skills", "text": "pinot"})).await;
    let top = &body["results"][0];
    assert!(
        top["bm25"].as_f64() > Some(0.0) && top["distance"].as_f64().is_some(),
        "{top}"
    );
    // The filter applies before ranking.
    let (_, body) = text_search(
        &node,
        json!({"table": "skills", "text": "grapes and wine", "k": 5, "filter": "domain = 'medicine'"}),
    )
    .await;
    assert_eq!(names(&body).len(), 2, "{body}");
    assert!(
        body["results"]
            .as_array()
            .expect("r")
            .iter()
            .all(|r| r["row"]["domain"] == "medicine")
    );
    // Nodes and basins by their own text.
    let (_, body) = text_search(
        &node,
        json!({"table": "nodes", "text": "medic", "mode": "text"}),
    )
    .await;
    assert_eq!(names(&body), ["medic-agent"], "{body}");
    let (_, body) = text_search(
        &node,
        json!({"table": "basins", "text": "sick people at the doctor", "k": 1}),
    )
    .await;
    assert_eq!(names(&body), ["medic-mind"], "{body}");
    // The author of the fraud detector claimed a vineyard skill's vector: it stands out.
    let claims = rows(
        &node,
        "SELECT name, claim_consistency FROM skills ORDER BY claim_consistency",
    )
    .await;
    assert_eq!(claims[0][0], "Fraud detector", "{claims:?}");
    assert!(claims[0][1].as_f64() < Some(0.5), "{claims:?}");
    assert!(
        claims[1..].iter().all(|r| r[1].as_f64() > Some(0.8)),
        "{claims:?}"
    );
    assert_eq!(
        scalar(
            &node,
            "SELECT count(DISTINCT text_model) FROM skills WHERE text_vec IS NOT NULL"
        )
        .await,
        1
    );
    // knn() in SQL takes text too (in the query worker, which loads the model).
    let got = rows(
        &node,
        "SELECT name FROM knn('skills', 'someone is bleeding, what do I do', 1)",
    )
    .await;
    assert_eq!(got[0][0], "Triage assistant");
    // The CLI: text is the positional argument.
    let out = node.cli(&["search", "someone is bleeding, what do I do", "-k", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Triage assistant") && stdout.lines().count() == 1,
        "{stdout}"
    );
    // Bad input: a clear code each.
    let long = "x".repeat(16 * 1024 + 1);
    for (request, status, code) in [
        (json!({"table": "skills", "text": ""}), 400, "invalid_text"),
        (
            json!({"table": "skills", "text": "  \n "}),
            400,
            "invalid_text",
        ),
        (
            json!({"table": "skills", "text": long}),
            400,
            "invalid_text",
        ),
        (
            json!({"table": "skills", "text": "x", "mode": "fuzzy"}),
            400,
            "invalid_mode",
        ),
        (
            json!({"table": "transfers", "text": "x"}),
            400,
            "not_a_text_table",
        ),
        (
            json!({"table": "skills", "text": "x", "vector": [1.0]}),
            400,
            "invalid_search",
        ),
        (
            json!({"table": "skills", "vector": [1.0], "mode": "text"}),
            400,
            "invalid_search",
        ),
        (
            json!({"table": "skills", "text": "x", "metric": "l2"}),
            400,
            "invalid_search",
        ),
        (json!({"table": "skills"}), 400, "invalid_search"),
        (
            json!({"table": "skills", "text": "x", "k": 0}),
            400,
            "invalid_k",
        ),
        (
            json!({"table": "skills", "text": "x", "filter": "price >"}),
            400,
            "invalid_filter",
        ),
    ] {
        let (got, body) = text_search(&node, request.clone()).await;
        assert_eq!(
            (got.as_u16(), body["error"]["code"].as_str()),
            (status, Some(code)),
            "{request}: {body}"
        );
    }
    // Invalid UTF-8 never reaches the model.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/search", node.url))
        .header("content-type", "application/json")
        .body(b"{\"table\": \"skills\", \"text\": \"\xff\xfe\"}".to_vec())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Other scripts are text like any other.
    for text in ["東京でワインを選ぶ", "🍷🍇", "Ελληνικά κρασιά"] {
        let (status, body) = text_search(&node, json!({"table": "skills", "text": text})).await;
        assert_eq!(status, StatusCode::OK, "{text}: {body}");
    }
}

/// Waits until a query answers `want` (tables catch up in the background after a start).
async fn eventually(node: &TestNode, text: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = sql(node, text).await;
        if status == StatusCode::OK && body["rows"][0][0].as_u64() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{text}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A file put into a table's directory: a rebuild removes the directory, and it with it.
fn mark(node: &TestNode, table: &str) -> std::path::PathBuf {
    let path = node
        .data_dir()
        .join("query")
        .join(format!("{table}.lance"))
        .join("test-marker");
    std::fs::write(&path, b"x").expect("marker");
    path
}

#[tokio::test]
async fn tables_are_rebuilt_for_another_layout_or_model_never_for_a_missing_one() {
    let mut node = TestNode::start_demo(&[]).expect("node");
    let vectors = "SELECT count(*) FROM skills WHERE text_vec IS NOT NULL AND text_model = 'all-MiniLM-L6-v2@53aa5117'";
    eventually(&node, vectors, 7).await;
    let marked = mark(&node, "skills");
    // The model is missing: the tables and their vectors stay; words still search.
    let empty = tempfile::tempdir().expect("tempdir");
    node.set_env("MESHNODE_MODEL_DIR", empty.path().to_str().expect("utf-8"));
    node.restart().expect("restart");
    eventually(&node, vectors, 7).await;
    assert!(marked.exists(), "the tables were rebuilt");
    let (status, _) = text_search(&node, json!({"table": "skills", "text": "grapes"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = text_search(
        &node,
        json!({"table": "skills", "text": "pinot", "mode": "text"}),
    )
    .await;
    assert_eq!((status, names(&body).len()), (StatusCode::OK, 1), "{body}");
    // The model is back: nothing to rebuild.
    let model = meshnode_embed::default_model_dir().expect("model dir");
    node.set_env("MESHNODE_MODEL_DIR", model.to_str().expect("utf-8"));
    node.restart().expect("restart");
    eventually(&node, vectors, 7).await;
    assert!(marked.exists(), "the tables were rebuilt");
    // Tables of another layout, or with no record of what wrote them, are rebuilt.
    let progress = node.data_dir().join("query").join("progress.json");
    let record: Value =
        serde_json::from_slice(&std::fs::read(&progress).expect("progress")).expect("json");
    assert_eq!(record["layout"], meshnode_query::TABLES_LAYOUT, "{record}");
    let mut older = record.clone();
    older["layout"] = json!(1);
    std::fs::write(&progress, older.to_string()).expect("write");
    node.restart().expect("restart");
    eventually(&node, vectors, 7).await;
    assert!(!marked.exists(), "tables of another layout are rebuilt");
    let marked = mark(&node, "skills");
    std::fs::remove_file(&progress).expect("remove");
    node.restart().expect("restart");
    eventually(&node, vectors, 7).await;
    assert!(!marked.exists(), "tables without a record are rebuilt");
    let events = crate::harness::status(&node).await["events"]
        .as_u64()
        .expect("events");
    eventually(&node, "SELECT count(*) FROM events", events).await;
}

#[tokio::test]
async fn without_the_model_text_routes_answer_503_and_wrong_weights_stop_the_start() {
    let empty = tempfile::tempdir().expect("tempdir");
    let dir = empty.path().to_str().expect("utf-8").to_string();
    let node = TestNode::start_with(&[("MESHNODE_MODEL_DIR", &dir)]).expect("node runs");
    let (got, body) = embeddings(&node, json!({"input": "x"})).await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("no_embed_model")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ensure-deps.sh model")),
        "{body}"
    );
    // Search by meaning needs the model; by words it does not.
    let (got, body) = text_search(&node, json!({"table": "skills", "text": "x"})).await;
    assert_eq!(body["error"]["code"], "no_embed_model", "{body}");
    assert_eq!(got, StatusCode::SERVICE_UNAVAILABLE);
    let (got, body) = text_search(
        &node,
        json!({"table": "skills", "text": "x", "mode": "text"}),
    )
    .await;
    assert_eq!(
        (got, &body["results"]),
        (StatusCode::OK, &json!([])),
        "{body}"
    );
    let (got, body) = sql(&node, "SELECT * FROM knn('skills', 'grapes', 1)").await;
    assert_eq!(got, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no embedding model")),
        "{body}"
    );
    // The right config and tokenizer with weights one byte off: the node refuses to start.
    let model = meshnode_embed::default_model_dir().expect("model dir");
    let wrong = tempfile::tempdir().expect("tempdir");
    let mut weights = std::fs::read(model.join("model.safetensors")).expect("weights");
    weights[1000] ^= 1;
    std::fs::write(wrong.path().join("model.safetensors"), weights).expect("write");
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(model.join(name), wrong.path().join(name)).expect("copy");
    }
    let wrong_dir = wrong.path().to_str().expect("utf-8").to_string();
    let Err(error) = TestNode::start_with(&[("MESHNODE_MODEL_DIR", &wrong_dir)]) else {
        panic!("a node with wrong weights must not start");
    };
    let error = format!("{error:#}");
    assert!(error.contains("SHA-256"), "{error}");
}
