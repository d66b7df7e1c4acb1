//! SQL in worker processes: whatever a query allocates, it allocates in a process of its own
//! with a memory limit, which the node kills at the deadline.
//!
//! The guards of [`crate::guard`] refuse the shapes and functions known to explode, and
//! DataFusion's pool bounds the operators that reserve memory; but joins, `unnest` and
//! aggregate states copy values without asking, and one allocation past what the machine
//! can give aborts the process that asked. So `/v1/sql` runs in a pool of worker processes
//! (the node's own binary, started with a hidden subcommand that calls [`worker_main`]), each
//! with `RLIMIT_DATA` set: a query that needs too much memory ends its worker and answers
//! `query_too_expensive`; a query past its deadline has its worker killed, which stops its
//! CPU at once. The node stays up either way.
//!
//! Protocol (a socket pair, the worker's end as its stdin; frames of a little-endian `u32`
//! length and a payload): the node sends a [`WorkerInit`], the worker answers `{"ready": true}`; then per
//! query a [`WorkerRequest`] and the answer: a [`WorkerReply`] header and, when it is `ok`,
//! one more frame with the Arrow IPC stream of the rows. A worker runs one query at a time;
//! the node holds one query permit per worker at work.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};

use crate::error::{Error, Result, internal};
use crate::sql::{Answer, Engine, RESULT_BYTES_MAX, Snapshot, SqlLimits};
use crate::tables::Tables;

/// Largest frame the node sends (the SQL text is capped far below).
const REQUEST_FRAME_MAX: usize = 4 << 20;

/// Largest frame a worker sends: a result is capped at [`RESULT_BYTES_MAX`] of batches, and
/// its IPC encoding adds little.
const REPLY_FRAME_MAX: usize = RESULT_BYTES_MAX * 2 + (1 << 20);

/// A worker whose resident memory is above this after a query is not kept: allocators
/// seldom give memory back, and an idle worker should cost little.
const IDLE_RSS_MAX: u64 = 256 << 20;

/// Queries one worker runs before it is replaced (bounds whatever slowly accumulates).
const QUERIES_PER_WORKER: u64 = 1000;

/// How to start a worker: the program (the node's own binary) and its arguments (the hidden
/// subcommand that calls [`worker_main`]).
#[derive(Clone, Debug)]
pub struct WorkerProgram {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// `RLIMIT_DATA` of each worker: heap, anonymous mappings and thread stacks together.
    pub memory_bytes: u64,
}

/// The first frame a worker reads.
#[derive(Serialize, Deserialize)]
struct WorkerInit {
    dir: PathBuf,
    /// Where the node's embedding model is (loaded on the first `knn` with a text).
    #[serde(default)]
    model_dir: Option<PathBuf>,
    memory_bytes: u64,
    text_bytes_max: usize,
    rows_max: usize,
    timeout_ms: u64,
    memory_bytes_max: usize,
    depth_max: usize,
}

/// One table of a query's snapshot, named by version and commit time (a rebuilt table
/// starts its versions over, the time tells the incarnations apart).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableVersion {
    pub(crate) name: String,
    pub(crate) version: u64,
    pub(crate) timestamp_nanos: i64,
}

/// One query.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct WorkerRequest {
    pub(crate) sql: String,
    pub(crate) tables: Vec<TableVersion>,
    pub(crate) as_of: Option<u64>,
}

/// The header of a worker's answer.
#[derive(Serialize, Deserialize, Debug)]
struct WorkerReply {
    ok: bool,
    #[serde(default)]
    truncated: bool,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl WorkerReply {
    fn from_error(e: &Error) -> Self {
        let (kind, code, message) = match e {
            Error::Query { code, message } => ("query", code.to_string(), message.clone()),
            Error::Timeout(ms) => ("timeout", String::new(), ms.to_string()),
            Error::ResourcesExhausted(m) => ("exhausted", String::new(), m.clone()),
            Error::Busy => ("busy", String::new(), String::new()),
            Error::Unavailable(m) => ("unavailable", String::new(), m.clone()),
            other => ("internal", String::new(), other.to_string()),
        };
        Self {
            ok: false,
            truncated: false,
            kind: kind.into(),
            code,
            message: clip(message),
        }
    }

    fn into_error(self) -> Error {
        match self.kind.as_str() {
            "query" => Error::Query {
                code: crate::error::known_code(&self.code),
                message: self.message,
            },
            "timeout" => Error::Timeout(self.message.parse().unwrap_or(0)),
            "exhausted" => Error::ResourcesExhausted(self.message),
            "busy" => Error::Busy,
            "unavailable" => Error::Unavailable(self.message),
            _ => Error::Internal(self.message),
        }
    }
}

/// Longest error message a worker sends (an error may quote a value of many MiB).
const MESSAGE_BYTES_MAX: usize = 8 << 10;

fn clip(mut message: String) -> String {
    if message.len() > MESSAGE_BYTES_MAX {
        let mut end = MESSAGE_BYTES_MAX;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(" …");
    }
    message
}

// ---------------------------------------------------------------------------------------
// The worker process.

fn read_frame_sync(input: &mut impl Read, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    input.read_exact(&mut buf)?;
    Ok(Some(buf))
}

fn write_frame_sync(output: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(std::io::Error::other)?;
    output.write_all(&len.to_le_bytes())?;
    output.write_all(payload)?;
    output.flush()
}

/// Blocking threads of a worker's query runtime (Lance reads files on them). Each has the
/// runtime's large stack, which counts against `RLIMIT_DATA` once it exists, so the limit
/// leaves room for them: few, so that a query that spawns none cannot use that room as heap
/// for much. One query at a time on two cores needs no more.
const WORKER_BLOCKING_THREADS: usize = 2;

/// The data segment (private writable mappings) this process has now, from `/proc`.
fn data_bytes_now() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmData:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| std::io::Error::other("no VmData in /proc/self/status"))
}

/// Caps this process's data segment (heap, anonymous mappings, thread stacks) at what it has
/// now, plus `budget` for the queries, plus the stacks of the blocking threads still to come:
/// past it an allocation fails and the process aborts, which is what the node expects of a
/// query that needs too much. Only the soft limit is set, never above the hard one.
fn limit_memory(budget: u64) -> std::io::Result<()> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let stacks = (WORKER_BLOCKING_THREADS * crate::sql::QUERY_STACK_BYTES) as u64;
    let want = data_bytes_now()?
        .saturating_add(budget)
        .saturating_add(stacks);
    let hard = getrlimit(Resource::Data).maximum;
    setrlimit(
        Resource::Data,
        Rlimit {
            current: Some(hard.map_or(want, |h| want.min(h))),
            maximum: hard,
        },
    )
    .map_err(std::io::Error::from)
}

/// A worker dies with the node, leaves no core dump behind an out-of-memory abort (a client
/// could ask for one per request), and is the first the kernel's OOM killer picks.
///
/// The death signal follows the *thread* that started the worker, not the process: the node
/// starts workers from its async runtime's worker threads ([`Pool::run`] is async and never
/// runs on a blocking thread), which live as long as the node does.
fn harden() -> std::io::Result<()> {
    use rustix::process::{
        DumpableBehavior, Resource, Rlimit, Signal, getppid, set_dumpable_behavior,
        set_parent_process_death_signal, setrlimit,
    };
    set_parent_process_death_signal(Some(Signal::KILL))?;
    if getppid().is_none_or(|p| p.as_raw_nonzero().get() == 1) {
        // The node is already gone.
        std::process::exit(0);
    }
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    // Raising one's own score needs no privilege; where /proc is read-only, go on.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    Ok(())
}

/// The protocol's socket: the node starts a worker with one end of a socket pair as its
/// stdin (its stdout goes to the node's stderr, so a stray print from any library lands in
/// the log, never in a frame).
fn protocol_socket() -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::AsFd;
    Ok(std::io::stdin().as_fd().try_clone_to_owned()?.into())
}

/// The worker's state: its engine (one query at a time) and its view of the tables.
struct WorkerState {
    engine: Engine,
    tables: Arc<Tables>,
    io: tokio::runtime::Runtime,
}

impl WorkerState {
    async fn snapshot(&self, request: &WorkerRequest) -> Result<Snapshot> {
        let mut tables = Vec::with_capacity(request.tables.len());
        for t in &request.tables {
            let name = crate::tables::table_name(&t.name)
                .ok_or_else(|| internal(format!("no table {}", t.name)))?;
            let ds = self
                .tables
                .checkout(name, t.version, t.timestamp_nanos)
                .await?;
            tables.push((name, ds));
        }
        Ok(Snapshot {
            tables,
            as_of: request.as_of,
        })
    }

    fn answer(&self, request: WorkerRequest) -> Result<Answer> {
        self.io.block_on(async {
            let snapshot = self.snapshot(&request).await?;
            let ctx = self.engine.session(&snapshot, &self.tables).await?;
            self.engine.run(ctx, request.sql).await
        })
    }
}

/// The hidden subcommand's body: serves queries on stdin/stdout until stdin closes. Returns
/// the exit code. Nothing else may write to stdout in this process.
pub fn worker_main() -> i32 {
    match serve_worker() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("meshnode query worker: {e}");
            1
        }
    }
}

/// Embeds with the model under `dir`, loaded (and its hash checked) on first use: most
/// workers never need it. A failed load is not remembered: the next query tries again.
fn lazy_model(dir: PathBuf) -> crate::sql::EmbedText {
    let model = std::sync::Mutex::new(None::<Arc<meshnode_embed::Embedder>>);
    Arc::new(move |text: &str| {
        let embedder = {
            let mut slot = model
                .lock()
                .map_err(|_| crate::error::internal("model lock poisoned"))?;
            match slot.as_ref() {
                Some(e) => e.clone(),
                None => {
                    let e = Arc::new(meshnode_embed::Embedder::open(&dir).map_err(|e| {
                        crate::error::Error::NoModel(format!("loading the model: {e}"))
                    })?);
                    *slot = Some(e.clone());
                    e
                }
            }
        };
        crate::text::embed_one(&embedder, text)
    })
}

fn serve_worker() -> std::io::Result<()> {
    harden()?;
    let socket = protocol_socket()?;
    let mut input = std::io::BufReader::new(socket.try_clone()?);
    let mut output = std::io::BufWriter::new(socket);
    let Some(init) = read_frame_sync(&mut input, REQUEST_FRAME_MAX)? else {
        return Ok(());
    };
    let init: WorkerInit = serde_json::from_slice(&init).map_err(std::io::Error::other)?;
    let limits = SqlLimits {
        text_bytes_max: init.text_bytes_max,
        rows_max: init.rows_max,
        // The node kills the worker at the deadline; this is only a second line.
        timeout: Duration::from_millis(init.timeout_ms.saturating_add(1000)),
        memory_bytes_max: init.memory_bytes_max,
        depth_max: init.depth_max,
        concurrent_max: 1,
        workers: None,
    };
    let io = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut engine = Engine::with_blocking_threads(limits, WORKER_BLOCKING_THREADS)
        .map_err(std::io::Error::other)?;
    engine.embed_text = init.model_dir.map(lazy_model);
    // Tables are opened when a query names them: one being rebuilt must not stop a worker.
    let tables = Arc::new(Tables::unopened(&init.dir));
    limit_memory(init.memory_bytes)?;
    let state = WorkerState { engine, tables, io };
    write_frame_sync(&mut output, br#"{"ready":true}"#)?;
    while let Some(frame) = read_frame_sync(&mut input, REQUEST_FRAME_MAX)? {
        let request: WorkerRequest =
            serde_json::from_slice(&frame).map_err(std::io::Error::other)?;
        let (reply, rows) = match state.answer(request).and_then(|a| {
            let ipc = a.to_arrow_ipc()?;
            Ok((a.truncated, ipc))
        }) {
            Ok((truncated, ipc)) => (
                WorkerReply {
                    ok: true,
                    truncated,
                    kind: String::new(),
                    code: String::new(),
                    message: String::new(),
                },
                Some(ipc),
            ),
            Err(e) => (WorkerReply::from_error(&e), None),
        };
        let header = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        write_frame_sync(&mut output, &header)?;
        if let Some(rows) = rows {
            write_frame_sync(&mut output, &rows)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The node's side.

/// A running worker.
struct Worker {
    child: Child,
    to: OwnedWriteHalf,
    from: BufReader<OwnedReadHalf>,
    queries: u64,
}

async fn read_frame(input: &mut BufReader<OwnedReadHalf>, max: usize) -> std::io::Result<Vec<u8>> {
    let len = input.read_u32_le().await? as usize;
    if len > max {
        return Err(std::io::Error::other(format!(
            "a query worker sent a frame of {len} bytes"
        )));
    }
    let mut buf = vec![0u8; len];
    input.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame(output: &mut OwnedWriteHalf, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(std::io::Error::other)?;
    output.write_all(&len.to_le_bytes()).await?;
    output.write_all(payload).await?;
    output.flush().await
}

impl Worker {
    /// The answer to one request. An I/O error means the worker died (or broke the protocol).
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<Result<Answer>> {
        self.queries += 1;
        write_frame(&mut self.to, request).await?;
        let header = read_frame(&mut self.from, REQUEST_FRAME_MAX).await?;
        let reply: WorkerReply = serde_json::from_slice(&header).map_err(std::io::Error::other)?;
        if !reply.ok {
            return Ok(Err(reply.into_error()));
        }
        let rows = read_frame(&mut self.from, REPLY_FRAME_MAX).await?;
        Ok(decode(&rows).map(|(schema, batches)| Answer {
            schema,
            batches,
            truncated: reply.truncated,
        }))
    }

    /// Resident memory of the worker, from `/proc` (None where that is not readable).
    fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * 4096)
    }

    fn reusable(&self) -> bool {
        self.queries < QUERIES_PER_WORKER && self.rss_bytes().is_none_or(|r| r <= IDLE_RSS_MAX)
    }
}

fn decode(ipc: &[u8]) -> Result<(arrow_schema::SchemaRef, Vec<arrow_array::RecordBatch>)> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
        .map_err(internal)?;
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(internal)?;
    Ok((schema, batches))
}

/// How the SQL workers fared since the node started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Workers started.
    pub started: u64,
    /// Workers that ended during a query (out of memory, or a crash).
    pub ended: u64,
    /// Workers killed because their query passed its deadline.
    pub killed_at_deadline: u64,
    /// Workers waiting for a query.
    pub idle: u64,
}

/// Counters of the pool, for status and metrics.
#[derive(Debug, Default)]
pub(crate) struct PoolCounters {
    pub(crate) started: AtomicU64,
    pub(crate) killed_at_deadline: AtomicU64,
    pub(crate) ended: AtomicU64,
}

/// The workers of one node: idle ones wait here; a query takes one (or starts one) under a
/// query permit.
pub(crate) struct Pool {
    program: WorkerProgram,
    init: Vec<u8>,
    idle: std::sync::Mutex<Vec<Worker>>,
    pub(crate) counters: PoolCounters,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("program", &self.program)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub(crate) fn new(
        program: WorkerProgram,
        dir: PathBuf,
        model_dir: Option<PathBuf>,
        limits: &SqlLimits,
    ) -> Result<Self> {
        let init = WorkerInit {
            dir,
            model_dir,
            memory_bytes: program.memory_bytes,
            text_bytes_max: limits.text_bytes_max,
            rows_max: limits.rows_max,
            timeout_ms: limits.timeout.as_millis() as u64,
            memory_bytes_max: limits.memory_bytes_max,
            depth_max: limits.depth_max,
        };
        Ok(Self {
            program,
            init: serde_json::to_vec(&init).map_err(internal)?,
            idle: std::sync::Mutex::new(Vec::new()),
            counters: PoolCounters::default(),
        })
    }

    async fn start(&self) -> Result<Worker> {
        let failed = |e: std::io::Error| {
            internal(format!(
                "cannot start a query worker ({}): {e}",
                self.program.program.display()
            ))
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(failed)?;
        let log = {
            use std::os::fd::AsFd;
            std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map_err(failed)?
        };
        let child = Command::new(&self.program.program)
            .args(&self.program.args)
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                theirs,
            )))
            .stdout(std::process::Stdio::from(log))
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(failed)?;
        ours.set_nonblocking(true).map_err(failed)?;
        let (from, to) = tokio::net::UnixStream::from_std(ours)
            .map_err(failed)?
            .into_split();
        self.counters.started.fetch_add(1, Ordering::Relaxed);
        let mut worker = Worker {
            child,
            to,
            from: BufReader::new(from),
            queries: 0,
        };
        let ready = async {
            write_frame(&mut worker.to, &self.init).await?;
            read_frame(&mut worker.from, REQUEST_FRAME_MAX).await
        };
        match ready.await {
            Ok(frame) if frame == br#"{"ready":true}"# => Ok(worker),
            Ok(_) => Err(internal("a query worker answered its start with garbage")),
            Err(e) => Err(internal(format!("a query worker failed to start: {e}"))),
        }
    }

    async fn take(&self) -> Result<Worker> {
        loop {
            let worker = self
                .idle
                .lock()
                .expect("invariant: pool lock is never poisoned")
                .pop();
            match worker {
                Some(mut w) => {
                    // A worker that ended while idle (killed from outside) is replaced.
                    if matches!(w.child.try_wait(), Ok(None)) {
                        return Ok(w);
                    }
                }
                None => return self.start().await,
            }
        }
    }

    fn put_back(&self, worker: Worker) {
        if worker.reusable() {
            self.idle
                .lock()
                .expect("invariant: pool lock is never poisoned")
                .push(worker);
        }
    }

    /// Runs one query in a worker, before `deadline`. The caller holds a query permit.
    pub(crate) async fn run(
        &self,
        request: &WorkerRequest,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Answer> {
        let payload = serde_json::to_vec(request).map_err(internal)?;
        let timed_out = || Error::Timeout(timeout.as_millis() as u64);
        let mut worker = tokio::time::timeout_at(deadline, self.take())
            .await
            .map_err(|_| timed_out())??;
        match tokio::time::timeout_at(deadline, worker.exchange(&payload)).await {
            Ok(Ok(answer)) => {
                self.put_back(worker);
                answer
            }
            Ok(Err(io)) => {
                self.counters.ended.fetch_add(1, Ordering::Relaxed);
                Err(self.ended(worker, io).await)
            }
            Err(_) => {
                // Killing the process is what stops the query's CPU, whatever it is doing.
                self.counters
                    .killed_at_deadline
                    .fetch_add(1, Ordering::Relaxed);
                let _ = worker.child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(1), worker.child.wait()).await;
                Err(timed_out())
            }
        }
    }

    /// The error for a worker that stopped answering mid-query. A worker whose pipe closed
    /// has exited (or is exiting): an abort (a failed allocation) or a kill (the kernel's OOM
    /// killer) is a query that needed too much; any other end, or a worker that broke the
    /// protocol (it is killed), is our failure.
    async fn ended(&self, mut worker: Worker, io: std::io::Error) -> Error {
        use std::os::unix::process::ExitStatusExt;
        let closed = matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe
        );
        if !closed {
            let _ = worker.child.start_kill();
        }
        let status = tokio::time::timeout(Duration::from_secs(1), worker.child.wait()).await;
        let status = match status {
            Ok(Ok(status)) => status,
            _ => {
                let _ = worker.child.start_kill();
                return internal(format!("a query worker stopped answering: {io}"));
            }
        };
        if !closed {
            return internal(format!("a query worker broke the protocol: {io}"));
        }
        tracing::warn!(%status, "a query worker ended during a query");
        match status.signal() {
            Some(libc::SIGABRT) | Some(libc::SIGKILL) => Error::ResourcesExhausted(format!(
                "its worker process ended ({status}), which is how a query that needs more \
                 than the {} MiB a worker may use ends (fewer rows, smaller values, a LIMIT \
                 before joins)",
                self.program.memory_bytes >> 20
            )),
            _ => internal(format!("a query worker crashed ({status})")),
        }
    }

    /// Counters and idle workers.
    pub(crate) fn status(&self) -> WorkerStatus {
        WorkerStatus {
            started: self.counters.started.load(Ordering::Relaxed),
            ended: self.counters.ended.load(Ordering::Relaxed),
            killed_at_deadline: self.counters.killed_at_deadline.load(Ordering::Relaxed),
            idle: self
                .idle
                .lock()
                .expect("invariant: pool lock is never poisoned")
                .len() as u64,
        }
    }
}
