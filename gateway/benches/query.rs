//! Query benchmarks.
//!
//!   sql  N_TRANSFERS SCRATCH  — analytics over ledger tables (N transfers, 100k accounts),
//!                               then writes them as Parquet for DuckDB (bench/query.py runs it)
//!   knn  N_VECTORS   SCRATCH  — 384-dim vectors (random and clustered) in `skills`, ANN index,
//!                               recall@10 and p50 latency against exact search; writes the raw
//!                               vectors and queries for FAISS
//!   intent N_SKILLS  SCRATCH  — search by intent: top-1/top-3 on bench/intent_quality.json and
//!                               p50 of embed + rank over N skills (the model must be installed)
//!
//! Usage: cargo bench -p meshnode-gateway --bench query -- MODE N SCRATCH
//! Prints one JSON object on stdout.

mod intent;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::builder::{
    FixedSizeListBuilder, Float32Builder, Int64Builder, ListBuilder, StringBuilder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch, RecordBatchIterator};
use meshnode_gateway::node::{self, files};
use meshnode_ledger::{Ledger, LedgerConfig};
use meshnode_query::{Query, QueryConfig, Search, SqlLimits, WorkerProgram, parse_metric};
use meshnode_schemas::Genesis;
use meshnode_schemas::tables::table_schema;
use meshnode_store::{Store, StoreConfig};

const SQL_QUERIES: [&str; 7] = [
    "SELECT kind, count(*), sum(amount) FROM transfers GROUP BY kind ORDER BY kind",
    "SELECT \"to\", sum(amount) AS total FROM transfers GROUP BY \"to\" ORDER BY total DESC, \"to\" LIMIT 10",
    "SELECT account, balance FROM balances ORDER BY balance DESC, account LIMIT 10",
    "SELECT s.name, count(*) AS n, avg(e.score) AS score FROM skills s JOIN skill_endorsements e ON e.skill = s.id GROUP BY s.name ORDER BY n DESC, s.name LIMIT 10",
    "SELECT r.subject, r.score, b.balance FROM reputation r JOIN balances b ON b.account = r.subject ORDER BY r.score DESC, r.subject LIMIT 10",
    "SELECT ts - ts % 86400000 AS day, count(*), sum(amount) FROM transfers GROUP BY 1 ORDER BY 1",
    "SELECT author, count(*) FROM transfers WHERE amount > 900 GROUP BY author ORDER BY 2 DESC, 1 LIMIT 10",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn gauss(&mut self) -> f32 {
        // Sum of uniforms: close enough to normal for test data.
        (0..6).map(|_| self.unit()).sum::<f32>() - 3.0
    }
}

fn hex_id(i: u64, salt: u64) -> String {
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        i,
        salt,
        i ^ salt,
        i.wrapping_mul(31)
    )
}

/// Records that the tables under `dir` were written with this build's layout (and `model`'s
/// text vectors, if any): a node rebuilds tables it has no such record of, from its ledger.
fn write_progress(dir: &Path, model: Option<&str>) -> anyhow::Result<()> {
    let record = serde_json::json!({
        "applied": 0, "layout": meshnode_query::TABLES_LAYOUT, "text_model": model,
    });
    std::fs::write(dir.join("progress.json"), record.to_string())?;
    Ok(())
}

async fn write_table(dir: &Path, table: &str, batches: Vec<RecordBatch>) -> anyhow::Result<()> {
    let schema = batches[0].schema();
    let reader = RecordBatchIterator::new(batches.into_iter().map(Ok), schema);
    let path = dir.join(format!("{table}.lance"));
    lance::Dataset::write(reader, path.display().to_string().as_str(), None).await?;
    Ok(())
}

fn texts(values: &[&str]) -> ListBuilder<StringBuilder> {
    let mut b = ListBuilder::new(StringBuilder::new());
    for v in values {
        b.values().append_value(v);
    }
    b
}

/// An empty node whose query dir we fill directly.
async fn open_node(scratch: &Path) -> anyhow::Result<(tempfile::TempDir, PathBuf, Store, Ledger)> {
    let dir = tempfile::Builder::new()
        .prefix("meshnode-bench-query-")
        .tempdir_in(scratch)?;
    let data = dir.path().join("node");
    let report = node::init(&data, None, "bench")?;
    let key = node::read_key_file(&data.join(files::NODE_KEY))?;
    let genesis = Genesis::decode(&std::fs::read(data.join(files::GENESIS))?)?;
    let store = Store::open(&data.join(files::BLOBS), StoreConfig::default()).await?;
    let ledger = Ledger::open(
        &data.join(files::LEDGER),
        store.clone(),
        genesis,
        report.net,
        key,
        LedgerConfig::default(),
    )
    .await?;
    std::fs::create_dir_all(data.join(files::QUERY))?;
    Ok((dir, data, store, ledger))
}

async fn sql_bench(n: usize, scratch: &Path) -> anyhow::Result<serde_json::Value> {
    let (_dir, data, store, ledger) = open_node(scratch).await?;
    let qdir = data.join(files::QUERY);
    let n_accounts = 100_000u64;
    let accounts: Vec<String> = (0..n_accounts).map(|i| hex_id(i, 0xacc0)).collect();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut received = vec![0u64; n_accounts as usize];
    let mut sent = vec![0u64; n_accounts as usize];
    let mut minted = vec![0u64; n_accounts as usize];
    eprintln!("generating {n} transfers");
    let mut batches = Vec::new();
    let chunk = 500_000;
    let schema = table_schema("transfers", 1).expect("schema");
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        let (mut leaf, mut id, mut author, mut seq, mut kind, mut to, mut amount, mut memo, mut ts) = (
            UInt64Builder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            UInt64Builder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            UInt64Builder::new(),
            StringBuilder::new(),
            Int64Builder::new(),
        );
        for i in start..end {
            let is_mint = i % 100 == 0;
            let from = if is_mint {
                0
            } else {
                (rng.next() % n_accounts) as usize
            };
            let dest = (rng.next() % n_accounts) as usize;
            let value = 1 + rng.next() % 1000;
            leaf.append_value(i as u64);
            id.append_value(hex_id(i as u64, 0x7777));
            author.append_value(&accounts[from]);
            seq.append_value(i as u64 / 1000);
            kind.append_value(if is_mint { "mint" } else { "transfer" });
            to.append_value(&accounts[dest]);
            amount.append_value(value);
            memo.append_value("");
            ts.append_value(1_767_225_600_000 + (i as i64) * 777);
            received[dest] += value;
            if is_mint {
                minted[from] += value;
            } else {
                sent[from] += value;
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(leaf.finish()),
            Arc::new(id.finish()),
            Arc::new(author.finish()),
            Arc::new(seq.finish()),
            Arc::new(kind.finish()),
            Arc::new(to.finish()),
            Arc::new(amount.finish()),
            Arc::new(memo.finish()),
            Arc::new(ts.finish()),
        ];
        batches.push(RecordBatch::try_new(schema.clone(), columns)?);
        start = end;
    }
    write_table(&qdir, "transfers", batches).await?;

    let mut b = (
        StringBuilder::new(),
        Int64Builder::new(),
        UInt64Builder::new(),
        UInt64Builder::new(),
        UInt64Builder::new(),
        UInt64Builder::new(),
        UInt64Builder::new(),
    );
    for (i, a) in accounts.iter().enumerate() {
        b.0.append_value(a);
        b.1.append_value(received[i] as i64 - sent[i] as i64);
        b.2.append_value(received[i]);
        b.3.append_value(0);
        b.4.append_value(sent[i]);
        b.5.append_value(0);
        b.6.append_value(minted[i]);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(b.0.finish()),
        Arc::new(b.1.finish()),
        Arc::new(b.2.finish()),
        Arc::new(b.3.finish()),
        Arc::new(b.4.finish()),
        Arc::new(b.5.finish()),
        Arc::new(b.6.finish()),
    ];
    write_table(
        &qdir,
        "balances",
        vec![RecordBatch::try_new(
            table_schema("balances", 1).expect("s"),
            columns,
        )?],
    )
    .await?;

    let n_skills = 10_000u64;
    let skill_ids: Vec<String> = (0..n_skills).map(|i| hex_id(i, 0x5ca1)).collect();
    {
        let schema = table_schema("skills", 8).expect("schema");
        let mut cols: Vec<ArrayRef> = Vec::new();
        let mut leaf = UInt64Builder::new();
        let (mut id, mut author, mut skill_id, mut name, mut version, mut description, mut domain) = (
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
        );
        let mut caps = texts(&[]);
        let mut specs = texts(&[]);
        let mut emb = FixedSizeListBuilder::new(Float32Builder::new(), 8);
        let (mut blob, mut base, mut license) = (
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
        );
        let (mut size, mut price) = (UInt64Builder::new(), UInt64Builder::new());
        let mut ts = Int64Builder::new();
        for (i, sid) in skill_ids.iter().enumerate() {
            leaf.append_value(i as u64);
            id.append_value(sid);
            author.append_value(&accounts[i % accounts.len()]);
            skill_id.append_value(format!("skill-{i}"));
            name.append_value(format!("skill {i:05}"));
            version.append_value("1");
            description.append_value("");
            domain.append_value(["viticulture", "finance", "medicine"][i % 3]);
            caps.values().append_value("inference");
            caps.append(true);
            specs.append(true);
            for _ in 0..8 {
                emb.values().append_value(rng.unit());
            }
            emb.append(true);
            blob.append_value(hex_id(i as u64, 0xb10b));
            size.append_value(1000);
            base.append_value("m");
            license.append_value("MIT");
            price.append_value(i as u64 % 500);
            ts.append_value(i as i64);
        }
        cols.push(Arc::new(leaf.finish()));
        for b in [
            &mut id,
            &mut author,
            &mut skill_id,
            &mut name,
            &mut version,
            &mut description,
            &mut domain,
        ] {
            cols.push(Arc::new(b.finish()));
        }
        cols.push(Arc::new(caps.finish()));
        cols.push(Arc::new(specs.finish()));
        cols.push(Arc::new(emb.finish()));
        cols.push(Arc::new(blob.finish()));
        cols.push(Arc::new(size.finish()));
        cols.push(Arc::new(base.finish()));
        cols.push(Arc::new(license.finish()));
        cols.push(Arc::new(price.finish()));
        cols.push(Arc::new(ts.finish()));
        cols.extend(no_text_columns(n_skills as usize));
        write_table(&qdir, "skills", vec![RecordBatch::try_new(schema, cols)?]).await?;
    }
    {
        let n_endorsements = 200_000u64;
        let mut b = (
            UInt64Builder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            UInt64Builder::new(),
            StringBuilder::new(),
            Int64Builder::new(),
        );
        for i in 0..n_endorsements {
            // Skewed: low skill numbers get more endorsements.
            let s = ((rng.unit() * rng.unit()) * n_skills as f32) as usize % n_skills as usize;
            b.0.append_value(i);
            b.1.append_value(hex_id(i, 0xe0d0));
            b.2.append_value(&accounts[(rng.next() % n_accounts) as usize]);
            b.3.append_value(&skill_ids[s]);
            b.4.append_value(if rng.next().is_multiple_of(5) {
                "invalid"
            } else {
                "valid"
            });
            b.5.append_value(rng.next() % 1001);
            b.6.append_value("");
            b.7.append_value(i as i64);
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(b.0.finish()),
            Arc::new(b.1.finish()),
            Arc::new(b.2.finish()),
            Arc::new(b.3.finish()),
            Arc::new(b.4.finish()),
            Arc::new(b.5.finish()),
            Arc::new(b.6.finish()),
            Arc::new(b.7.finish()),
        ];
        write_table(
            &qdir,
            "skill_endorsements",
            vec![RecordBatch::try_new(
                table_schema("skill_endorsements", 1).expect("s"),
                cols,
            )?],
        )
        .await?;
    }
    {
        let mut b = (
            StringBuilder::new(),
            Int64Builder::new(),
            UInt64Builder::new(),
        );
        for a in &accounts {
            b.0.append_value(a);
            b.1.append_value((rng.next() % 2001) as i64 - 1000);
            b.2.append_value(1 + rng.next() % 20);
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(b.0.finish()),
            Arc::new(b.1.finish()),
            Arc::new(b.2.finish()),
        ];
        write_table(
            &qdir,
            "reputation",
            vec![RecordBatch::try_new(
                table_schema("reputation", 1).expect("s"),
                cols,
            )?],
        )
        .await?;
    }

    write_progress(&qdir, None)?;
    let query = Query::open(
        &qdir,
        ledger.clone(),
        store.clone(),
        QueryConfig::default(),
        SqlLimits {
            timeout: Duration::from_secs(600),
            rows_max: 100_000,
            memory_bytes_max: 4 << 30,
            // As the node runs SQL: in worker processes of the release binary.
            workers: Some(WorkerProgram {
                program: std::env::var_os("MESHNODE_BIN")
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "set MESHNODE_BIN to the release meshnode binary (make bench-query \
                             does): SQL runs in its worker processes, as in the node"
                        )
                    })?
                    .into(),
                args: vec!["query-worker".into()],
                memory_bytes: 8 << 30,
            }),
            ..SqlLimits::default()
        },
        None,
    )
    .await?;
    eprintln!("running {} queries", SQL_QUERIES.len());
    let mut per_query = Vec::new();
    let mut total = Duration::ZERO;
    for text in SQL_QUERIES {
        query.sql(text, None).await?; // warm-up
        let runs = 3;
        let started = Instant::now();
        let mut rows = 0;
        for _ in 0..runs {
            rows = query.sql(text, None).await?.0.n_rows();
        }
        let each = started.elapsed() / runs;
        total += each;
        per_query.push(serde_json::json!({"sql": text, "secs": each.as_secs_f64(), "rows": rows}));
    }
    let export = data.join("parquet");
    query.export_parquet(&export).await?;
    // The Parquet files and the query list survive for the DuckDB side.
    let keep = scratch.join("bench-query-parquet");
    if keep.exists() {
        std::fs::remove_dir_all(&keep)?;
    }
    std::fs::rename(&export, &keep)?;
    std::fs::write(
        scratch.join("bench-query-sql.json"),
        serde_json::to_vec(&SQL_QUERIES)?,
    )?;
    ledger.shutdown().await;
    store.shutdown().await?;
    Ok(serde_json::json!({
        "mode": "sql", "n_transfers": n, "total_secs": total.as_secs_f64(), "queries": per_query,
        "parquet_dir": keep.display().to_string(),
    }))
}

fn clustered(rng: &mut Rng, centroids: &[Vec<f32>]) -> Vec<f32> {
    let c = &centroids[(rng.next() % centroids.len() as u64) as usize];
    c.iter().map(|x| x + 0.15 * rng.gauss()).collect()
}

/// The ids each query found and the median latency.
struct KnnRuns {
    ids: Vec<Vec<String>>,
    p50_ms: f64,
}

async fn knn_runs(
    query: &Query,
    queries: &[Vec<f32>],
    filter: Option<&str>,
    exact: bool,
    columns: Option<Vec<String>>,
) -> anyhow::Result<KnnRuns> {
    let mut latencies = Vec::new();
    let mut ids = Vec::new();
    for q in queries {
        let search = Search {
            table: "skills".into(),
            vector: q.clone(),
            k: 10,
            metric: parse_metric("cosine")?,
            filter: filter.map(str::to_string),
            exact,
            text_vec: false,
            columns: columns.clone(),
        };
        let started = Instant::now();
        let hits = query.search(&search).await?;
        latencies.push(started.elapsed());
        ids.push(hits.iter().map(|h| h.row["id"].to_string()).collect());
    }
    latencies.sort();
    Ok(KnnRuns {
        ids,
        p50_ms: latencies[latencies.len() / 2].as_secs_f64() * 1000.0,
    })
}

fn recall_at_10(truth: &[Vec<String>], got: &[Vec<String>]) -> f64 {
    let found: usize = truth
        .iter()
        .zip(got)
        .map(|(t, g)| g.iter().filter(|id| t.contains(id)).count())
        .sum();
    found as f64 / (truth.len() as f64 * 10.0)
}

/// Waits until the in-memory index of `column` (`table.column`) holds `rows` rows.
async fn wait_for_memory_index(query: &Query, column: &str, rows: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let covered = query
            .memory_indexes()
            .into_iter()
            .find(|(c, _)| c == column)
            .map_or(0, |(_, n)| n);
        if covered >= rows {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{column}: in-memory index not built"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn knn_bench(n: usize, scratch: &Path) -> anyhow::Result<serde_json::Value> {
    let dim = 384usize;
    let (_dir, data, store, ledger) = open_node(scratch).await?;
    let qdir = data.join(files::QUERY);
    let mut rng = Rng(0xfeed_beef_1234_5678);
    let centroids: Vec<Vec<f32>> = (0..100)
        .map(|_| (0..dim).map(|_| rng.gauss()).collect())
        .collect();
    let mut out = Vec::new();
    let only = std::env::var("BENCH_KNN_DIST").unwrap_or_default();
    for distribution in ["random", "clustered"] {
        if !only.is_empty() && only != distribution {
            continue;
        }
        eprintln!("{distribution}: writing {n} x {dim} vectors");
        let table_dir = qdir.join(distribution);
        std::fs::create_dir_all(&table_dir)?;
        let mut vectors_file = std::io::BufWriter::new(std::fs::File::create(
            scratch.join(format!("bench-knn-{distribution}.f32")),
        )?);
        let schema = table_schema("skills", dim as i32).expect("schema");
        let mut batches = Vec::new();
        let chunk = 100_000;
        let mut start = 0;
        while start < n {
            let end = (start + chunk).min(n);
            let rows = end - start;
            let mut emb = FixedSizeListBuilder::new(Float32Builder::new(), dim as i32);
            let mut leaf = UInt64Builder::new();
            let mut id = StringBuilder::new();
            let mut domain = StringBuilder::new();
            for i in start..end {
                let v: Vec<f32> = if distribution == "random" {
                    (0..dim).map(|_| rng.unit() * 2.0 - 1.0).collect()
                } else {
                    clustered(&mut rng, &centroids)
                };
                for x in &v {
                    vectors_file.write_all(&x.to_le_bytes())?;
                }
                emb.values().append_slice(&v);
                emb.append(true);
                leaf.append_value(i as u64);
                id.append_value(format!("{i}"));
                domain.append_value(if i % 100 == 0 { "rare" } else { "common" });
            }
            let constant = |value: &str| -> ArrayRef {
                Arc::new(arrow_array::StringArray::from(vec![value; rows]))
            };
            let empty_lists = || -> ArrayRef {
                let mut b = ListBuilder::new(StringBuilder::new());
                for _ in 0..rows {
                    b.append(true);
                }
                Arc::new(b.finish())
            };
            let zeros =
                || -> ArrayRef { Arc::new(arrow_array::UInt64Array::from(vec![0u64; rows])) };
            let columns: Vec<ArrayRef> = vec![
                Arc::new(leaf.finish()),
                Arc::new(id.finish()),
                constant("a"),
                constant("s"),
                constant("n"),
                constant("1"),
                constant(""),
                Arc::new(domain.finish()),
                empty_lists(),
                empty_lists(),
                Arc::new(emb.finish()),
                constant("b"),
                zeros(),
                constant("m"),
                constant("MIT"),
                zeros(),
                Arc::new(arrow_array::Int64Array::from(vec![0i64; rows])),
            ];
            let mut columns = columns;
            columns.extend(no_text_columns(rows));
            batches.push(RecordBatch::try_new(schema.clone(), columns)?);
            start = end;
        }
        vectors_file.flush()?;
        write_table(&table_dir, "skills", batches).await?;
        write_progress(&table_dir, None)?;
        let query = Query::open(
            &table_dir,
            ledger.clone(),
            store.clone(),
            QueryConfig::default(),
            SqlLimits {
                timeout: Duration::from_secs(600),
                ..SqlLimits::default()
            },
            None,
        )
        .await?;
        eprintln!("{distribution}: building the in-memory index");
        let started = Instant::now();
        wait_for_memory_index(&query, "skills.embedding", n).await?;
        let memory_index_secs = started.elapsed().as_secs_f64();
        eprintln!("{distribution}: building Lance's index (SQL knn, large filtered searches)");
        let started = Instant::now();
        query.reindex().await?;
        let index_secs = started.elapsed().as_secs_f64();
        let n_queries = if n > 200_000 { 50 } else { 200 };
        let mut queries = Vec::new();
        let mut queries_file =
            std::fs::File::create(scratch.join(format!("bench-knn-{distribution}.queries.f32")))?;
        for _ in 0..n_queries {
            let v: Vec<f32> = if distribution == "random" {
                (0..dim).map(|_| rng.unit() * 2.0 - 1.0).collect()
            } else {
                clustered(&mut rng, &centroids)
            };
            for x in &v {
                queries_file.write_all(&x.to_le_bytes())?;
            }
            queries.push(v);
        }
        // As FAISS answers: the ids (and distances) of the nearest.
        let ids = || Some(vec!["id".to_string()]);
        let truth = knn_runs(&query, &queries, None, true, ids()).await?;
        // As FAISS is measured: the smallest ef that reaches recall@10 0.95.
        let mut sweep = Vec::new();
        for ef in [16, 32, 64, 128, 256, 512, 1024, 2048, 4096] {
            query.set_ann_ef(ef);
            let run = knn_runs(&query, &queries, None, false, ids()).await?;
            let recall = recall_at_10(&truth.ids, &run.ids);
            eprintln!(
                "{distribution}: ef {ef}: recall@10 {recall:.3}, p50 {:.3} ms",
                run.p50_ms
            );
            sweep.push(
                serde_json::json!({"ef_search": ef, "recall_at_10": recall, "p50_ms": run.p50_ms}),
            );
            if recall >= 0.95 {
                break;
            }
        }
        let plain = sweep.last().cloned().unwrap_or_default();
        // The rows as `POST /v1/search` returns them by default: every column but vectors.
        let rows = knn_runs(&query, &queries, None, false, None).await?;
        eprintln!(
            "{distribution}: every column but vectors: p50 {:.3} ms",
            rows.p50_ms
        );
        let rare = Some("domain = 'rare'");
        let filtered_truth = knn_runs(&query, &queries, rare, true, ids()).await?;
        let filtered = knn_runs(&query, &queries, rare, false, ids()).await?;
        out.push(serde_json::json!({
            "distribution": distribution, "n": n, "dim": dim, "index_secs": index_secs,
            "memory_index_secs": memory_index_secs, "exact_p50_ms": truth.p50_ms,
            "rows_p50_ms": rows.p50_ms,
            "ann": plain, "sweep": sweep,
            "filtered_1pct": {
                "recall_at_10": recall_at_10(&filtered_truth.ids, &filtered.ids),
                "p50_ms": filtered.p50_ms,
            },
            "vectors": scratch.join(format!("bench-knn-{distribution}.f32")).display().to_string(),
            "queries": scratch.join(format!("bench-knn-{distribution}.queries.f32")).display().to_string(),
        }));
        query.shutdown().await;
    }
    ledger.shutdown().await;
    store.shutdown().await?;
    let _: HashMap<(), ()> = HashMap::new();
    Ok(serde_json::json!({"mode": "knn", "runs": out}))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mode = args.next().unwrap_or_else(|| "sql".into());
    let n: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let scratch = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&scratch)?;
    let report = match mode.as_str() {
        "sql" => sql_bench(n, &scratch).await?,
        "knn" => knn_bench(n, &scratch).await?,
        "intent" => intent::intent_bench(n, &scratch).await?,
        "embed" => intent::embed_bench(n)?,
        other => anyhow::bail!("unknown mode {other}"),
    };
    println!("{report}");
    Ok(())
}

/// The derived text columns of a text table (search_text, text_vec, text_model,
/// claim_consistency), empty: these benches rank by the authors' vectors.
fn no_text_columns(rows: usize) -> Vec<ArrayRef> {
    let dim = meshnode_schemas::tables::TEXT_VEC_DIM;
    let mut vectors = FixedSizeListBuilder::new(Float32Builder::new(), dim);
    for _ in 0..rows {
        vectors.values().append_nulls(dim as usize);
        vectors.append(false);
    }
    vec![
        Arc::new(arrow_array::StringArray::from(vec![""; rows])),
        Arc::new(vectors.finish()),
        Arc::new(arrow_array::StringArray::from(vec![None::<&str>; rows])),
        Arc::new(arrow_array::Float32Array::from(vec![None::<f32>; rows])),
    ]
}
