//! The standing hostile-input suite: requests anyone who reaches the HTTP port can send, each
//! under the size caps so that it reaches the code it means to test. Every test asserts that
//! the node stays up, that /healthz keeps answering quickly while the hostile requests run,
//! and that the node's memory stays under [`RSS_MAX`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestNode, client, post, sql, status, try_upload, upload};

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

/// CPU time (user + system) a process and its children that ended (and were waited for)
/// used so far, in seconds.
fn cpu_ticks(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Some(fields.iter().sum::<u64>() as f64 / 100.0)
}

/// The processes whose parent is `pid` (the node's SQL workers).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc") {
        let Some(child) = entry
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // After the command name: the state, then the parent's pid.
        if stat[close + 2..].split_whitespace().nth(1) == Some(pid.to_string().as_str()) {
            out.push(child);
        }
    }
    out
}

/// CPU time of a process, its live children, and its children that ended, in seconds.
fn tree_cpu_secs(pid: u32) -> f64 {
    let live: f64 = children(pid).into_iter().filter_map(cpu_ticks).sum();
    cpu_ticks(pid).expect("proc stat") + live
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

/// Posts each statement to /v1/sql at once; the answers in order.
async fn concurrent_sql(node: &TestNode, statements: &[&'static str]) -> Vec<(StatusCode, Value)> {
    let runs: Vec<_> = statements
        .iter()
        .map(|&q| {
            let url = node.url.clone();
            tokio::spawn(async move {
                let r = client()
                    .post(format!("{url}/v1/sql"))
                    .json(&json!({"sql": q}))
                    .send()
                    .await
                    .expect("sql");
                (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
            })
        })
        .collect();
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        out.push(run.await.expect("join"));
    }
    out
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
        // Functions that combine their arguments, scalars copied to every row, element
        // sizes of repeated arrays, and the sum of a query's constants.
        (
            format!("SELECT length(concat({}))", ["repeat('x', 60000000)"; 5].join(", ")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        (
            "SELECT arrow_cast(repeat('x', 60000000), 'LargeUtf8') FROM (SELECT unnest(range(10000)))".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        (
            "SELECT cardinality(array_repeat(range(1000000), 1000000))".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        (
            format!("SELECT {}", (0..6).map(|i| format!("length(repeat('{i}', 60000000))")).collect::<Vec<_>>().join(", ")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_expensive",
        ),
        (
            format!(
                "WITH t0(x) AS (VALUES (1)), {} SELECT count(*) FROM t30",
                (1..=30)
                    .map(|i| format!("t{i} AS (SELECT x FROM t{0} UNION ALL SELECT x FROM t{0})", i - 1))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            StatusCode::BAD_REQUEST,
            "sql_too_complex",
        ),
        (
            ["VALUES (1)"; 2500].join(" UNION "),
            StatusCode::BAD_REQUEST,
            "sql_too_complex",
        ),
        // A collecting aggregate over a window grows with the square of the rows.
        (
            "SELECT cardinality(a) FROM (SELECT array_agg(i) OVER (ORDER BY i) a FROM (SELECT unnest(range(200000)) i)) ORDER BY 1 DESC LIMIT 1".into(),
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
    let (got, body) = sql(&node, "EXPLAIN SELECT upper(name) FROM skills").await;
    assert_eq!(got, StatusCode::OK, "{body}");
    let (got, body) = sql(
        &node,
        "SELECT upper(domain) u, count(*) FROM skills GROUP BY 1 ORDER BY 2 DESC, 1",
    )
    .await;
    assert_eq!(
        (got, body["rows"][0].clone()),
        (StatusCode::OK, json!(["VITICULTURE", 3])),
        "{body}"
    );
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
    for (got, body) in concurrent_sql(&node, &[endless; 4]).await {
        assert_eq!(got, StatusCode::REQUEST_TIMEOUT, "{body}");
    }
    // Within a second the cancelled queries have stopped and given back their permits:
    // their workers were killed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let query = status(&node).await["query"].clone();
    assert_eq!(query["idle_permits"], 4, "{query}");
    assert!(
        query["workers"]["killed_at_deadline"].as_u64() > Some(0),
        "{query}"
    );
    let before = tree_cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = tree_cpu_secs(pid) - before;
    assert!(
        used < 0.5,
        "the node and its workers used {used:.2} s of CPU in 2 s after every query was cancelled"
    );
    watch.finish("endless queries").await;
    let (got, _) = sql(&node, "SELECT count(*) FROM skills").await;
    assert_eq!(got, StatusCode::OK);
}

/// A query that passes every guard and still copies a 60 MB value per joined row: it needs
/// 60 GB in one allocation, which used to abort the whole node.
const MEMORY_BOMB: &str = "WITH big AS (SELECT arrow_cast(repeat('x', 60000000), 'LargeUtf8') \
     AS s), r AS (SELECT unnest(generate_series(1, 1000)) AS i) \
     SELECT sum(length(b.s)) FROM big b, r";

/// The same copy at a size the machine would give (3 GB, in one batch; with 1,000 rows it
/// answers): the worker's memory limit, not the machine, stops it.
const MEMORY_CREEP: &str = "WITH big AS (SELECT arrow_cast(repeat('x', 1000000), 'LargeUtf8') \
     AS s), r AS (SELECT unnest(generate_series(1, 3000)) AS i) \
     SELECT sum(length(b.s)) FROM big b, r";

#[tokio::test]
async fn a_query_that_needs_too_much_memory_ends_its_worker_not_the_node() {
    let node = TestNode::start_demo(&[("MESHNODE_QUERY_TIMEOUT_MS", "60000")]).expect("node");
    let pid = node.pid().expect("running");
    let watch = Watch::start(&node);
    let bombs = [MEMORY_BOMB, MEMORY_CREEP, MEMORY_BOMB, MEMORY_CREEP];
    for (got, body) in concurrent_sql(&node, &bombs).await {
        assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["code"], "query_too_expensive", "{body}");
    }
    watch.finish("memory bombs").await;
    assert!(rss(pid) < RSS_MAX);
    let query = status(&node).await["query"].clone();
    assert!(query["workers"]["ended"].as_u64() >= Some(4), "{query}");
    assert_eq!(query["idle_permits"], 4, "{query}");
    // The node and its tables are untouched: queries answer as before.
    let (got, body) = sql(&node, "SELECT count(*) FROM skills").await;
    assert_eq!(got, StatusCode::OK, "{body}");
    assert!(body["rows"][0][0].as_i64() > Some(0), "{body}");
    // A query that needs about a gigabyte (under the worker's 2 GiB) still answers.
    let (got, body) = sql(&node, &MEMORY_CREEP.replace("3000", "1000")).await;
    assert_eq!(got, StatusCode::OK, "{body}");
    assert_eq!(body["rows"][0][0].as_i64(), Some(1_000_000_000), "{body}");
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
        false,
    )
    .await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_filter")),
        "{body}"
    );
    let (got, body) = post(
        &node,
        "/v1/search",
        search("price > 0; DROP TABLE skills"),
        false,
    )
    .await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_filter")),
        "{body}"
    );
    let long_chain = vec!["price>0"; 600].join(" AND ");
    let (got, body) = post(&node, "/v1/search", search(&long_chain), false).await;
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
    let (got, body) = post(&node, "/v1/search", search("domain = 'viticulture'"), false).await;
    assert_eq!(got, StatusCode::OK, "{body}");
}

/// Sends raw bytes on a new connection; returns the connection.
async fn raw(node: &TestNode, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(&node.addr)
        .await
        .expect("connect");
    tcp.write_all(bytes).await.expect("write");
    tcp
}

/// Reads a response's status line (and whatever else arrives) within `within`.
async fn status_line(tcp: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(within, tcp.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.lines()
        .next()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
}

#[tokio::test]
async fn unauthorized_and_slow_bodies_are_answered_before_they_cost() {
    let node = TestNode::start_with(&[
        ("MESHNODE_PUBLIC_READS", "false"),
        ("MESHNODE_BODY_TIMEOUT_MS", "2000"),
    ])
    .expect("node");
    let watch = Watch::start(&node);
    // Authorization comes before the body: a client without the token that announces a
    // body and never sends it is answered at once.
    for path in [
        "/v1/events",
        "/v1/sql",
        "/v1/search",
        "/v1/audit/export",
        "/v1/query",
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 900000\r\n\r\n"
        );
        let mut tcp = raw(&node, head.as_bytes()).await;
        let line = status_line(&mut tcp, Duration::from_secs(1)).await;
        assert_eq!(line.as_deref(), Some("HTTP/1.1 401 Unauthorized"), "{path}");
    }
    // A client with the token that trickles its body gets a 408 at the body deadline.
    let head = format!(
        "POST /v1/sql HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{",
        node.token
    );
    let mut tcp = raw(&node, head.as_bytes()).await;
    let started = Instant::now();
    let line = status_line(&mut tcp, Duration::from_secs(10)).await;
    assert_eq!(line.as_deref(), Some("HTTP/1.1 408 Request Timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // /metrics follows public_reads.
    let url = format!("{}/metrics", node.url);
    assert_eq!(
        client().get(&url).send().await.expect("metrics").status(),
        StatusCode::UNAUTHORIZED
    );
    let with_token = client()
        .get(&url)
        .bearer_auth(&node.token)
        .send()
        .await
        .expect("metrics");
    assert_eq!(with_token.status(), StatusCode::OK);
    assert!(with_token.text().await.expect("text").contains("gc_runs"));
    watch.finish("unauthorized and slow bodies").await;
}

#[tokio::test]
async fn slow_uploads_are_cut_off_and_clients_are_capped() {
    let node = TestNode::start_with(&[("MESHNODE_CONNECTIONS_PER_CLIENT_MAX", "6")]).expect("node");
    // An upload that trickles (one byte a second) ends with a 408 once it falls behind the
    // rate floor, after its grace period.
    let head = format!(
        "POST /v1/blobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: 1000000\r\n\r\n",
        node.token
    );
    let mut upload = raw(&node, head.as_bytes()).await;
    let trickle = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let started = Instant::now();
        for _ in 0..40 {
            if upload.write_all(b"x").await.is_err() {
                break;
            }
            if let Some(line) = status_line(&mut upload, Duration::from_secs(1)).await {
                return (Some(line), started.elapsed());
            }
        }
        (None, started.elapsed())
    });
    // Meanwhile the client's other connections reach the cap: the next is refused at once.
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(raw(&node, b"").await);
    }
    let mut extra = raw(&node, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let line = status_line(&mut extra, Duration::from_secs(2)).await;
    assert_eq!(line.as_deref(), Some("HTTP/1.1 429 Too Many Requests"));
    drop(idle);
    drop(extra);
    let (line, took) = trickle.await.expect("join");
    assert_eq!(
        line.as_deref(),
        Some("HTTP/1.1 408 Request Timeout"),
        "after {took:?}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    // Freed slots serve again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = client()
        .get(format!("{}/healthz", node.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn long_handlers_answer_and_gc_reaches_the_cache() {
    let node = TestNode::start_demo(&[
        ("MESHNODE_IO_TIMEOUT_MS", "1000"),
        ("MESHNODE_QUERY_TIMEOUT_MS", "3000"),
        ("MESHNODE_GC_INTERVAL_SECS", "1"),
    ])
    .expect("node");
    // A handler that runs past the I/O timeout still answers (it used to end in a closed
    // connection when the socket read timeout fired).
    let endless = "SELECT count(*) FROM (SELECT unnest(range(1000000)) AS a) x \
                   CROSS JOIN (SELECT unnest(range(1000000)) AS b) y WHERE a * b = -1";
    let (got, body) = sql(&node, endless).await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (StatusCode::REQUEST_TIMEOUT, Some("query_timeout"))
    );
    // A blob served from the cache stops being served once a scheduled GC deleted it.
    let bytes = b"cached, then collected".to_vec();
    let (got, body) = try_upload(&node, bytes.clone(), false).await;
    assert_eq!(got, StatusCode::CREATED);
    let hash = body["hash"].as_str().expect("hash").to_string();
    let url = format!("{}/v1/blobs/{hash}", node.url);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = client().get(&url).send().await.expect("get");
        if r.status() == StatusCode::NOT_FOUND {
            break;
        }
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.bytes().await.expect("bytes").as_ref(), bytes.as_slice());
        assert!(
            Instant::now() < deadline,
            "a collected blob was still served after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gc = &status(&node).await["gc"];
    assert!(gc["runs"].as_u64().expect("runs") >= 1, "{gc}");
    assert_eq!(gc["failures"], 0, "{gc}");
    // Range units: unknown ones are ignored, names are case-insensitive, ends are clamped.
    let hash = upload(&node, b"0123456789".to_vec()).await["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    let url = format!("{}/v1/blobs/{hash}", node.url);
    for (range, want, body) in [
        ("items=0-1", StatusCode::OK, "0123456789"),
        ("Bytes=0-1", StatusCode::PARTIAL_CONTENT, "01"),
        (
            "bytes=8-99999999999999999999999",
            StatusCode::PARTIAL_CONTENT,
            "89",
        ),
    ] {
        let r = client()
            .get(&url)
            .header("range", range)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), want, "{range}");
        assert_eq!(r.text().await.expect("text"), body, "{range}");
    }
    // The largest `after` of a log is an empty page, not a panic.
    let author = status(&node).await["node"]
        .as_str()
        .expect("node")
        .to_string();
    let r = client()
        .get(format!(
            "{}/v1/logs/{author}?after=18446744073709551615",
            node.url
        ))
        .send()
        .await
        .expect("log");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.expect("json")["events"], json!([]));
}

#[tokio::test]
async fn abandoned_audits_run_once_and_results_are_reused() {
    let node = TestNode::start_demo(&[]).expect("node");
    let watch = Watch::start(&node);
    // Six clients ask for an audit and hang up at once.
    for _ in 0..6 {
        let _ = client()
            .get(format!("{}/v1/audit", node.url))
            .timeout(Duration::from_millis(5))
            .send()
            .await;
    }
    // The next ones share the audit that is running (or its result); none starts another.
    let mut reused = 0;
    for _ in 0..4 {
        let r = client()
            .get(format!("{}/v1/audit", node.url))
            .send()
            .await
            .expect("audit");
        assert_eq!(r.status(), StatusCode::OK);
        reused += usize::from(r.headers().get("x-audit-reused").is_some());
        let report: Value = r.json().await.expect("json");
        assert_eq!(report["ok"], true, "{report}");
    }
    assert!(reused >= 3, "only {reused} of 4 audits were reused");
    // An export (authorized) runs alone and records the audited checkpoint.
    let dir = node.data_dir().join("bundle");
    let (got, body) = {
        let r = client()
            .post(format!("{}/v1/audit/export", node.url))
            .bearer_auth(&node.token)
            .json(&json!({"dir": dir}))
            .send()
            .await
            .expect("export");
        (r.status(), r.json::<Value>().await.expect("json"))
    };
    assert_eq!(
        (got, body["ok"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{body}"
    );
    watch.finish("abandoned audits").await;
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` when this process may not mount (not root): the test says so and skips.
    fn mount(mib: u64) -> Option<Self> {
        let dir = tempfile::Builder::new()
            .prefix("meshnode-disk-")
            .tempdir()
            .expect("tempdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Self { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_writes_with_507_loses_nothing_and_recovers() {
    let Some(disk) = SmallDisk::mount(48) else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let mut node = TestNode::start_in(disk.path(), &[]).expect("node");
    // Ballast the test removes later to free space.
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 8 << 20]).expect("ballast");
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..40u8 {
        let bytes: Vec<u8> = (0..(2usize << 20))
            .map(|j| (j as u8) ^ i.wrapping_mul(31))
            .collect();
        let (status, body) = try_upload(&node, bytes.clone(), true).await;
        if status == StatusCode::CREATED {
            acked.push((body["hash"].as_str().expect("hash").to_string(), bytes));
            continue;
        }
        refused = Some((status, body));
        break;
    }
    let (status, body) = refused.expect("the disk never filled");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (
            StatusCode::INSUFFICIENT_STORAGE,
            Some("insufficient_storage")
        ),
        "{body}"
    );
    assert!(acked.len() >= 5, "only {} uploads fit", acked.len());
    // The node is up, and everything acknowledged is there, byte for byte.
    let check = |acked: Vec<(String, Vec<u8>)>, url: String| async move {
        for (hash, bytes) in acked {
            let r = client()
                .get(format!("{url}/v1/blobs/{hash}"))
                .send()
                .await
                .expect("get");
            assert_eq!(r.status(), StatusCode::OK, "{hash}");
            assert!(r.bytes().await.expect("bytes") == bytes, "{hash} changed");
        }
    };
    check(acked.clone(), node.url.clone()).await;
    // GC on the full disk is refused and reported, not fatal: the collector keeps running.
    let r = client()
        .post(format!("{}/v1/gc", node.url))
        .bearer_auth(&node.token)
        .send()
        .await
        .expect("gc");
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    let gc = self::status(&node).await["gc"].clone();
    assert!(gc["failures"].as_u64() >= Some(1), "{gc}");
    assert_eq!(gc["stopped"], false, "{gc}");
    // Space freed: writes and GC work again, and survive a restart.
    std::fs::remove_file(&ballast).expect("remove ballast");
    let r = client()
        .post(format!("{}/v1/gc", node.url))
        .bearer_auth(&node.token)
        .send()
        .await
        .expect("gc");
    assert_eq!(r.status(), StatusCode::OK);
    let (status, body) = try_upload(&node, vec![7u8; 1 << 20], true).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    acked.push((
        body["hash"].as_str().expect("hash").to_string(),
        vec![7u8; 1 << 20],
    ));
    node.restart().expect("restart");
    check(acked, node.url.clone()).await;
    let audit: Value = client()
        .get(format!("{}/v1/audit", node.url))
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("json");
    assert_eq!(audit["ok"], true, "{audit}");
    drop(node);
}

#[tokio::test]
async fn a_download_read_too_slowly_is_cut_off() {
    use tokio::io::AsyncReadExt;
    let node = TestNode::start_with(&[
        ("MESHNODE_TRANSFER_RATE_MIN", "1048576"),
        ("MESHNODE_TRANSFER_GRACE_MS", "2000"),
    ])
    .expect("node");
    let size = 48usize << 20;
    let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let hash = upload(&node, bytes).await["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    let head = format!("GET /v1/blobs/{hash} HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut tcp = raw(&node, head.as_bytes()).await;
    // Read 512 KiB a second: half the node's floor (1 MiB/s here). The cut comes once the
    // grace period and what the socket buffers took early are used up; the client still
    // reads what was buffered, then the connection ends short of the blob.
    let started = Instant::now();
    let mut received = 0usize;
    let mut buf = vec![0u8; 512 << 10];
    let ended = loop {
        let mut this_second = 0usize;
        let mut closed = false;
        while this_second < buf.len() {
            match tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf[this_second..]))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(Ok(n)) => this_second += n,
            }
        }
        received += this_second;
        if closed {
            break true;
        }
        if started.elapsed() > Duration::from_secs(120) {
            break false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(ended, "the slow download was not cut off");
    assert!(
        received < size,
        "the whole blob was sent ({received} bytes)"
    );
    // The node is fine.
    let r = client()
        .get(format!("{}/healthz", node.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), StatusCode::OK);
}

/// A flood of the largest embedding requests (64 texts of 15 KiB each, cut to 256 tokens; the
/// 1 MiB body cap leaves no room for 16 KiB ones)
/// shares the query engine's 4 slots: the excess waits or is refused, /healthz stays fast and
/// the node's memory bounded, and the node embeds normally afterwards.
#[tokio::test]
async fn a_flood_of_embedding_requests_shares_the_query_slots() {
    let node = TestNode::start_with(&[("MESHNODE_QUERY_TIMEOUT_MS", "3000")]).expect("node");
    let watch = Watch::start(&node);
    let text = "vineyard ".repeat(16 * 1024 / 9 + 1);
    let texts: Vec<String> = (0..64)
        .map(|i| format!("{i} {text}")[..15 * 1024].to_string())
        .collect();
    let body = json!({"input": texts});
    let runs: Vec<_> = (0..16)
        .map(|_| {
            let url = node.url.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let r = client()
                    .post(format!("{url}/v1/embeddings"))
                    .json(&body)
                    .send()
                    .await
                    .expect("embeddings");
                let status = r.status();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            })
        })
        .collect();
    let mut answered = std::collections::BTreeMap::new();
    for run in runs {
        let (got, body) = run.await.expect("join");
        match got {
            StatusCode::OK => assert_eq!(body["data"].as_array().map(Vec::len), Some(64)),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body["error"]["code"], "too_many_queries", "{body}")
            }
            StatusCode::REQUEST_TIMEOUT => {
                assert_eq!(body["error"]["code"], "query_timeout", "{body}")
            }
            other => panic!("unexpected {other}: {body}"),
        }
        *answered.entry(got.as_u16()).or_insert(0) += 1;
    }
    watch.finish("embedding flood").await;
    eprintln!("embedding flood answers by status: {answered:?}");
    assert!(answered.values().sum::<i32>() == 16, "{answered:?}");
    // A timed-out request stops between forward passes; the pass it is in (at most 2048
    // padded tokens, seconds in a debug build under load) runs to its end.
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&node).await["query"]["idle_permits"] != 4 {
        assert!(Instant::now() < deadline, "query permits not given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (got, body) = post(
        &node,
        "/v1/embeddings",
        json!({"input": "still here"}),
        false,
    )
    .await;
    assert_eq!(got, StatusCode::OK, "{body}");
}
