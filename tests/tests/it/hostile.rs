//! The standing hostile-input suite: requests anyone who reaches the HTTP port can send, each
//! under the size caps so that it reaches the code it means to test. Every test asserts that
//! the node stays up, that /healthz keeps answering quickly while the hostile requests run,
//! and that the node's memory stays under [`RSS_MAX`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestNode, client};

/// The node's resident memory must stay below this while hostile requests run.
const RSS_MAX: u64 = 1 << 30;
/// /healthz must answer within this while hostile requests run.
const HEALTHZ_MAX: Duration = Duration::from_secs(1);

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// CPU time (user + system) a process used so far, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

/// Polls /healthz and the node's memory until dropped; reports the worst seen.
struct Watch {
    stop: Arc<AtomicBool>,
    worst_ms: Arc<AtomicU64>,
    peak_rss: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(node: &TestNode) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let worst_ms = Arc::new(AtomicU64::new(0));
        let peak_rss = Arc::new(AtomicU64::new(0));
        let url = node.url.clone();
        let pid = node.pid().expect("running");
        let task = tokio::spawn({
            let (stop, worst_ms, peak_rss) = (stop.clone(), worst_ms.clone(), peak_rss.clone());
            async move {
                while !stop.load(Ordering::Acquire) {
                    let started = Instant::now();
                    let r = client()
                        .get(format!("{url}/healthz"))
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await;
                    let ms = started.elapsed().as_millis() as u64;
                    assert!(
                        r.map(|r| r.status() == StatusCode::OK).unwrap_or(false),
                        "/healthz failed"
                    );
                    worst_ms.fetch_max(ms, Ordering::AcqRel);
                    peak_rss.fetch_max(rss(pid), Ordering::AcqRel);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Self {
            stop,
            worst_ms,
            peak_rss,
            task,
        }
    }

    /// Stops watching; asserts /healthz stayed fast and memory under the bound.
    async fn finish(self, what: &str) {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("watch");
        let worst = Duration::from_millis(self.worst_ms.load(Ordering::Acquire));
        let peak = self.peak_rss.load(Ordering::Acquire);
        assert!(worst < HEALTHZ_MAX, "{what}: /healthz took {worst:?}");
        assert!(peak < RSS_MAX, "{what}: the node used {} MiB", peak >> 20);
    }
}

async fn post(node: &TestNode, path: &str, body: Value) -> (StatusCode, Value) {
    let r = client()
        .post(format!("{}{path}", node.url))
        .json(&body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("post");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn sql(node: &TestNode, text: &str) -> (StatusCode, Value) {
    post(node, "/v1/sql", json!({"sql": text})).await
}

async fn status(node: &TestNode) -> Value {
    client()
        .get(format!("{}/v1/status", node.url))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn sql_chains_and_function_bombs_are_refused_before_they_cost() {
    let node = TestNode::start_demo(&[("MESHNODE_QUERY_TIMEOUT_MS", "5000")]).expect("node");
    let watch = Watch::start(&node);
    let chain = |n: usize, sep: &str, item: &str| vec![item; n].join(sep);
    let ctes = (1..30)
        .map(|i| format!("t{i} AS (SELECT s || s AS s FROM t{})", i - 1))
        .collect::<Vec<_>>()
        .join(", ");
    let cases: Vec<(String, StatusCode, &str)> = vec![
        // Chains are built in loops by the parser, then walked recursively: counted first.
        (
            format!("SELECT {}", chain(2000, "+", "1")),
            StatusCode::BAD_REQUEST,
            "sql_too_complex",
        ),
        (
            format!("SELECT 1 WHERE {}", chain(3000, " AND ", "true")),
            StatusCode::BAD_REQUEST,
            "sql_too_complex",
        ),
        (
            chain(2500, " UNION ALL ", "SELECT 1"),
            StatusCode::BAD_REQUEST,
            "sql_too_complex",
        ),
        (
            format!("SELECT 1 FROM {}", chain(1500, ",", "skills")),
            StatusCode::BAD_REQUEST,
            "sql_too_complex",
        ),
        (
            format!(
                "SELECT 1 FROM skills {}",
                chain(1500, " ", "JOIN skills USING (id)")
            ),
            StatusCode::BAD_REQUEST,
            "sql_too_complex",
        ),
        // One call asking for gigabytes: refused from its arguments, before it allocates.
        (
            "SELECT length(repeat('x', 1500000000))".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        (
            "SELECT lpad('x', 2000000000)".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        (
            "SELECT cardinality(range(1000000000))".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        (
            "SELECT cardinality(array_repeat(1, 1000000000))".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        (
            format!(
                "SELECT length(replace('{}', 'a', '{}'))",
                "a".repeat(20_000),
                "b".repeat(20_000)
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        // Doubling through CTEs: each step is checked, so it stops one step past the limit.
        (
            format!(
                "WITH t0 AS (SELECT '0123456789abcdef' AS s), {ctes} SELECT length(s) FROM t29"
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        // Quadratic work from two long strings.
        (
            "SELECT levenshtein(repeat('ab', 100000), repeat('ba', 100000))".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        // EXPLAIN ANALYZE runs the query.
        (
            "EXPLAIN ANALYZE SELECT count(*) FROM events".into(),
            StatusCode::BAD_REQUEST,
            "read_only",
        ),
    ];
    for (text, want, code) in &cases {
        assert!(
            text.len() < 64 * 1024,
            "case over the text cap: {}",
            &text[..60]
        );
        let started = Instant::now();
        let (got, body) = sql(&node, text).await;
        let shown: String = text.chars().take(70).collect();
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (*want, Some(*code)),
            "{shown}…: {body}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{shown}… took {:?}",
            started.elapsed()
        );
    }
    // Within the bounds, the same shapes answer.
    let (got, body) = sql(&node, &format!("SELECT {}", chain(200, "+", "1"))).await;
    assert_eq!(
        (got, body["rows"][0][0].as_i64()),
        (StatusCode::OK, Some(200)),
        "{body}"
    );
    let (got, body) = sql(&node, &chain(60, " UNION ALL ", "SELECT 1")).await;
    assert_eq!(got, StatusCode::OK, "{body}");
    let (got, body) = sql(&node, "SELECT length(repeat('ab', 1000)), 'a' || 'b'").await;
    assert_eq!(got, StatusCode::OK, "{body}");
    assert_eq!(body["rows"][0], json!([2000, "ab"]));
    assert_eq!(body["columns"][1], "Utf8(\"a\") || Utf8(\"b\")");
    watch.finish("SQL bombs").await;
    let (got, body) = sql(&node, "SELECT count(*) FROM skills").await;
    assert_eq!(
        (got, body["rows"][0][0].as_i64()),
        (StatusCode::OK, Some(7))
    );
}

#[tokio::test]
async fn a_query_past_its_timeout_stops_using_cpu_and_frees_its_permit() {
    let node = TestNode::start_demo(&[("MESHNODE_QUERY_TIMEOUT_MS", "2000")]).expect("node");
    let pid = node.pid().expect("running");
    let watch = Watch::start(&node);
    let endless = "SELECT count(*) FROM (SELECT unnest(range(1000000)) AS a) x \
                   CROSS JOIN (SELECT unnest(range(1000000)) AS b) y WHERE (a * b) % 7 = 3";
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = node.url.clone();
            tokio::spawn(async move {
                let r = client()
                    .post(format!("{url}/v1/sql"))
                    .json(&json!({"sql": endless}))
                    .send()
                    .await
                    .expect("sql");
                (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
            })
        })
        .collect();
    for run in runs {
        let (got, body) = run.await.expect("join");
        assert_eq!(got, StatusCode::REQUEST_TIMEOUT, "{body}");
    }
    // Within a second the cancelled queries have stopped and given back their permits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(status(&node).await["query"]["idle_permits"], 4);
    let before = cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_secs(pid) - before;
    assert!(
        used < 0.5,
        "the node used {used:.2} s of CPU in 2 s after every query was cancelled"
    );
    watch.finish("endless queries").await;
    let (got, _) = sql(&node, "SELECT count(*) FROM skills").await;
    assert_eq!(got, StatusCode::OK);
}

#[tokio::test]
async fn search_filters_parse_to_the_end_and_share_the_sql_limits() {
    let node = TestNode::start_demo(&[("MESHNODE_QUERY_TIMEOUT_MS", "3000")]).expect("node");
    let dim = {
        let (_, body) = sql(&node, "SELECT embedding FROM skills LIMIT 1").await;
        body["rows"][0][0].as_array().expect("vector").len()
    };
    let vector = vec![0.1f32; dim];
    let search =
        |filter: &str| json!({"table": "skills", "vector": vector, "k": 3, "filter": filter});
    let (got, body) = post(
        &node,
        "/v1/search",
        search("domain = 'viticulture' garbage"),
    )
    .await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_filter")),
        "{body}"
    );
    let (got, body) = post(&node, "/v1/search", search("price > 0; DROP TABLE skills")).await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_filter")),
        "{body}"
    );
    let long_chain = vec!["price>0"; 600].join(" AND ");
    let (got, body) = post(&node, "/v1/search", search(&long_chain)).await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("sql_too_complex")),
        "{body}"
    );
    let watch = Watch::start(&node);
    let expensive = "levenshtein(repeat(name, 100000), repeat(domain, 100000)) > 3";
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (node.url.clone(), search(expensive));
            tokio::spawn(async move {
                let started = Instant::now();
                let r = client()
                    .post(format!("{url}/v1/search"))
                    .json(&body)
                    .send()
                    .await
                    .expect("search");
                (
                    r.status(),
                    r.json::<Value>().await.unwrap_or(Value::Null),
                    started.elapsed(),
                )
            })
        })
        .collect();
    for run in runs {
        let (got, body, took) = run.await.expect("join");
        assert!(got.is_client_error(), "{got} {body}");
        assert!(
            took < Duration::from_secs(5),
            "an expensive filter took {took:?}"
        );
    }
    watch.finish("expensive filters").await;
    let (got, body) = post(&node, "/v1/search", search("domain = 'viticulture'")).await;
    assert_eq!(got, StatusCode::OK, "{body}");
}
