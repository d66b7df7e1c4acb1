//! The `meshnode` command line: argument parsing and every subcommand.
//!
//! Data goes to stdout, logs and progress bars to stderr. Exit codes: 0 ok, 1 failure,
//! 2 usage.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::client::Client;
use crate::config::Config;
use crate::http::{AppState, Metrics, routes, server};
use crate::node::{self, Node};

/// Inputs at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_BYTES_MIN: u64 = 8 * 1024 * 1024;

/// Items the CLI asks for per page of a list route (the API's maximum).
const LIST_PAGE_MAX: u64 = 1000;

/// meshnode: a node of a mesh of AI-agent hosts — signed, content-addressed blobs, a ledger,
/// SQL and vector queries, and an HTTP gateway.
#[derive(Debug, Parser)]
#[command(name = "meshnode", version, propagate_version = true)]
pub struct Cli {
    /// Data directory of the node. Default: $HOME/.meshnode.
    #[arg(long, global = true, env = "MESHNODE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// URL of a running node's API. Default: the http_addr of the data dir's config.
    #[arg(long, global = true, env = "MESHNODE_API")]
    pub api: Option<String>,
    /// Bearer token for writes. Default: <data-dir>/api-token.
    #[arg(
        long,
        global = true,
        env = "MESHNODE_API_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Machine-readable JSON output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a data directory: node key, genesis, API token, config.toml.
    Init(InitArgs),
    /// Start the node (HTTP gateway on 127.0.0.1:8080 by default).
    Serve(ServeArgs),
    /// Add, download and print blobs.
    #[command(subcommand)]
    Blob(BlobCommand),
    /// Pin blobs so that GC keeps them.
    #[command(subcommand)]
    Pin(PinCommand),
    /// The peers the running node replicates with: add by ticket, list, remove.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Generate and show Ed25519 key files.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Sign an event with a key file and submit it (DESIGN.md §3 kinds).
    Event(EventArgs),
    /// Show an account: spendable balance, credits, log head.
    Account(AccountArgs),
    /// Re-verify the ledger from its blobs; export or verify an offline bundle.
    Audit(AuditArgs),
    /// Run a read-only SQL query over the ledger tables.
    Sql(SqlArgs),
    /// The k nearest rows of a vector table (skills, basins, nodes, basin_versions).
    Search(SearchArgs),
    /// Query tables: status, rebuild from the ledger, rebuild ANN indexes.
    #[command(subcommand)]
    Query(QueryCommand),
    /// Write the query tables to a directory (Parquet).
    Export(ExportArgs),
    /// Read the ledger: logs, events, forks, checkpoint, catalog.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// GET a read route as JSON, e.g. `meshnode get /v1/skills` (one request: a list route
    /// answers one page, and its `next` is the `after=` of the following one).
    Get {
        /// Path under the API, e.g. `/v1/logs/<author>`.
        path: String,
    },
    /// Show the running node's identity and counters.
    Status,
    /// Run garbage collection on the running node now.
    Gc,
    /// Sentence embeddings of texts with the node's model (all-MiniLM-L6-v2, 384-d), computed
    /// here, without a running node: the vectors agents put in a publish.
    Embed(EmbedArgs),
    /// Internal: a SQL worker process of a running node (reads queries on stdin).
    #[command(hide = true)]
    QueryWorker,
}

/// `init` arguments.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Join an existing network: its genesis document (DAG-CBOR). Default: a new network
    /// with this node as the only issuer.
    #[arg(long)]
    pub genesis: Option<PathBuf>,
    /// Name of a new network.
    #[arg(long, default_value = "meshnode-local")]
    pub name: String,
}

/// `serve` arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (overrides config and MESHNODE_HTTP_ADDR).
    #[arg(long)]
    pub http_addr: Option<std::net::SocketAddr>,
    /// Create the data directory first if it is not initialised yet.
    #[arg(long)]
    pub init: bool,
    /// Load a small demo network (agents, skills, basins, payments) if the ledger is empty.
    #[arg(long)]
    pub demo: bool,
    /// UDP address of the peer-to-peer endpoint (overrides config and MESHNODE_P2P_ADDR;
    /// default 127.0.0.1 on a free port).
    #[arg(long)]
    pub p2p_addr: Option<std::net::SocketAddr>,
    /// Addresses the ticket gives peers (comma-separated), when the bound one is not
    /// reachable as is (overrides config and MESHNODE_P2P_ADVERTISE).
    #[arg(long, value_delimiter = ',')]
    pub p2p_advertise: Vec<std::net::SocketAddr>,
}

/// `event` arguments.
#[derive(Debug, Args)]
pub struct EventArgs {
    /// Kind, e.g. token.transfer, skill.publish (DESIGN.md §3).
    pub kind: String,
    /// Key file that signs (64 hex characters).
    #[arg(long)]
    pub key: PathBuf,
    /// The log to append to, if not the key's own (after a key.rotate).
    #[arg(long)]
    pub author: Option<String>,
    /// Payload as JSON (ids, keys, hashes as hex; vectors as arrays), or @FILE.
    #[arg(long)]
    pub payload: String,
    /// Extra causal dependencies (EventIds, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub deps: Vec<String>,
    /// Do not add the author's unreferenced credits to a transfer's deps.
    #[arg(long)]
    pub no_auto_deps: bool,
    /// Write the signed envelope to this file instead of submitting it.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `embed` arguments.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The texts (one embedding each).
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// Directory of the model files. Default: $MESHNODE_MODEL_DIR, then
    /// ~/.cache/meshnode/models/all-MiniLM-L6-v2 (`scripts/ensure-deps.sh model` installs it).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
}

/// `sql` arguments.
#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The statement (read-only).
    pub sql: Option<String>,
    /// List the tables and their columns instead.
    #[arg(long)]
    pub tables: bool,
    /// Output format: table (default for terminals), json, csv, arrow (binary to stdout).
    #[arg(long)]
    pub format: Option<String>,
    /// Query the first N accepted events only (a transparency-log tree size).
    #[arg(long)]
    pub as_of: Option<u64>,
}

/// `search` arguments.
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// What to look for, in plain words, e.g. "find a skill for pruning vines" (needs the
    /// node's embedding model, except with --mode text).
    #[arg(required_unless_present = "vector", conflicts_with = "vector")]
    pub text: Option<String>,
    /// Table: skills, basins, nodes (and basin_versions with --vector).
    #[arg(long, default_value = "skills")]
    pub table: String,
    /// hybrid (meaning and words), vector (meaning) or text (words).
    #[arg(long, default_value = "hybrid", conflicts_with = "vector")]
    pub mode: String,
    /// Query vector as JSON, e.g. '[0.1, 0.2, ...]', searched against the authors' vectors.
    #[arg(long)]
    pub vector: Option<String>,
    /// How many results.
    #[arg(short, long, default_value_t = 10)]
    pub k: u64,
    /// cosine, l2 or dot (with --vector).
    #[arg(long, default_value = "cosine", requires = "vector")]
    pub metric: String,
    /// SQL filter applied before ranking, e.g. "domain = 'viticulture'".
    #[arg(long)]
    pub filter: Option<String>,
    /// Exact search even with an ANN index (with --vector).
    #[arg(long, requires = "vector")]
    pub exact: bool,
}

/// Paging of a list command. By default every page is fetched and printed as one list; the
/// answer's `next` is the cursor to continue after the last item printed (`null` when the
/// list ended).
#[derive(Clone, Debug, Default, Args)]
pub struct PageArgs {
    /// Print at most this many items (`next` then tells where to continue).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Start after this cursor: the `next` of an earlier listing (the key of its last item).
    #[arg(long)]
    pub after: Option<String>,
}

/// `ledger` subcommands (each prints the JSON of the matching route; lists follow its pages).
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// An author's log (GET /v1/logs/{author}).
    Log {
        /// Author key (hex).
        author: String,
        /// Events after this seq.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// One event with its body (GET /v1/events/{id}).
    Event {
        /// EventId (hex).
        id: String,
    },
    /// Detected forks and their proofs (GET /v1/forks, every page).
    Forks {
        #[command(flatten)]
        page: PageArgs,
    },
    /// The latest signed checkpoint (GET /v1/checkpoint).
    Checkpoint,
    /// The skill catalog with endorsements and hosts (GET /v1/skills, every page).
    Skills {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Basins (GET /v1/basins, every page), or one basin with its history (GET
    /// /v1/basins/{id}).
    Basins {
        /// A basin's publish EventId.
        id: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Reputation scores (GET /v1/reputation, every page).
    Reputation {
        #[command(flatten)]
        page: PageArgs,
    },
    /// The node registry with last heartbeats (GET /v1/nodes, every page).
    Nodes {
        #[command(flatten)]
        page: PageArgs,
    },
}

/// `query` subcommands.
#[derive(Debug, Subcommand)]
pub enum QueryCommand {
    /// Materialization progress and tables.
    Status,
    /// Drop the tables and rebuild them from the ledger.
    Rebuild,
    /// Rebuild the ANN indexes of the vector tables.
    Reindex,
}

/// `export` arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Output format.
    #[arg(long, default_value = "parquet")]
    pub format: String,
    /// Directory to write to.
    pub dir: PathBuf,
}

/// `account` arguments.
#[derive(Debug, Args)]
pub struct AccountArgs {
    /// Account key (hex). Default: the public key of --key-file.
    pub key: Option<String>,
    /// A key file whose public key to show.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// `audit` arguments.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Also write an offline audit bundle to this directory.
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Verify an offline bundle in this directory (no node needed). Needs `--node` or
    /// `--checkpoint`: what the bundle must be tied to.
    #[arg(long, conflicts_with = "export")]
    pub bundle: Option<PathBuf>,
    /// With `--bundle`: the key of the node the bundle must come from (hex; `node` in
    /// `GET /v1/status` of that node).
    #[arg(long, requires = "bundle", conflicts_with = "checkpoint")]
    pub node: Option<String>,
    /// With `--bundle`: a file holding a checkpoint obtained earlier from the node
    /// (`GET /v1/checkpoint`); the bundle must be signed by its key and contain it.
    #[arg(long, requires = "bundle")]
    pub checkpoint: Option<PathBuf>,
}

/// `blob` subcommands.
#[derive(Debug, Subcommand)]
pub enum BlobCommand {
    /// Store a file (or stdin with `-`); prints its hash and CID.
    Add {
        /// File to add, or `-` for stdin.
        input: String,
        /// Do not pin the blob (GC may remove it).
        #[arg(long)]
        no_pin: bool,
    },
    /// Download a blob into a file (default: a file named after the hash).
    Get {
        /// BLAKE3 hex or CID.
        hash: String,
        /// Output file.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write a blob to stdout.
    Cat {
        /// BLAKE3 hex or CID.
        hash: String,
    },
    /// Make a blob available on this node, fetching it from a peer that hosts it.
    Fetch {
        /// BLAKE3 hex or CID.
        hash: String,
    },
    /// Show a blob's size and pin state.
    Stat {
        /// BLAKE3 hex or CID.
        hash: String,
    },
}

/// `peer` subcommands.
#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Add a peer by its ticket (`meshnode serve` prints it; `status` shows it).
    Add {
        /// The peer's ticket.
        ticket: String,
    },
    /// List peers with their replication status.
    Ls,
    /// Forget a peer.
    Rm {
        /// The peer's endpoint id (hex).
        id: String,
    },
}

/// `pin` subcommands.
#[derive(Debug, Subcommand)]
pub enum PinCommand {
    /// Pin a stored blob.
    Add {
        /// BLAKE3 hex or CID.
        hash: String,
    },
    /// Remove a pin.
    Rm {
        /// BLAKE3 hex or CID.
        hash: String,
    },
    /// List pins (every page of GET /v1/pins).
    Ls {
        #[command(flatten)]
        page: PageArgs,
    },
}

/// `key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new random key file (mode 0600).
    Gen {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key of a key file (hex).
    Show {
        /// The key file.
        file: PathBuf,
    },
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if matches!(cli.command, Command::QueryWorker) {
        // Its stdout is the protocol: no logging set up, nothing else printed.
        return meshnode_query::worker_main();
    }
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(error) => {
            if json {
                let code = error
                    .downcast_ref::<crate::client::ApiFailure>()
                    .map(|f| f.code.clone())
                    .unwrap_or_else(|| "error".to_string());
                let value =
                    serde_json::json!({"error": {"code": code, "message": format!("{error:#}")}});
                println!("{value}");
            }
            eprintln!("error: {error:#}");
            1
        }
    }
}

fn init_logging(cli: &Cli) {
    // The libraries underneath log their routine work at info; keep them at warn.
    const QUIET: &str = "lance=warn,lance_core=warn,lance_file=warn,lance_encoding=warn,\
        lance_index=warn,lance_io=warn,lance_table=warn,datafusion=warn,iroh=warn,iroh_blobs=warn";
    let default = match (cli.verbose, &cli.command) {
        (0, Command::Serve(_)) => format!("info,{QUIET}"),
        (0, _) => "warn".to_string(),
        (1, _) => format!("info,{QUIET}"),
        _ => "debug".to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The data directory: flag or MESHNODE_DATA_DIR, else `$HOME/.meshnode`.
pub fn data_dir(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &cli.data_dir {
        return Ok(dir.clone());
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow!("HOME is not set; pass --data-dir or set MESHNODE_DATA_DIR"))?;
    Ok(PathBuf::from(home).join(".meshnode"))
}

fn client(cli: &Cli) -> anyhow::Result<Client> {
    let dir = data_dir(cli)?;
    let running = std::fs::read_to_string(dir.join(node::files::API))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let base = match (&cli.api, running) {
        (Some(api), _) => api.clone(),
        (None, Some(api)) => api,
        (None, None) => {
            let config = Config::load(&dir)?;
            let mut addr = config.http_addr;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
    };
    let token = match &cli.token {
        Some(token) => Some(token.clone()),
        None => node::read_token(&dir).ok(),
    };
    Client::new(&base, token)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init(args) => init(&cli, args),
        Command::Serve(args) => serve(&cli, args).await,
        Command::Blob(command) => blob(&cli, command).await,
        Command::Pin(command) => pin(&cli, command).await,
        Command::Peer(command) => peer(&cli, command).await,
        Command::Key(command) => key(&cli, command),
        Command::Event(args) => event(&cli, args).await,
        Command::Account(args) => account(&cli, args).await,
        Command::Audit(args) => audit(&cli, args).await,
        Command::Sql(args) => sql(&cli, args).await,
        Command::Search(args) => search(&cli, args).await,
        Command::Query(command) => {
            let client = client(&cli)?;
            let value: Value = match command {
                QueryCommand::Status => {
                    client
                        .json(client.request(reqwest::Method::GET, "/v1/tables"))
                        .await?
                }
                QueryCommand::Rebuild | QueryCommand::Reindex => {
                    let action = if matches!(command, QueryCommand::Rebuild) {
                        "rebuild"
                    } else {
                        "reindex"
                    };
                    client
                        .json(
                            client
                                .request(reqwest::Method::POST, "/v1/query")
                                .json(&serde_json::json!({"action": action})),
                        )
                        .await?
                }
            };
            print_value(&cli, &value, |v| match command {
                QueryCommand::Status => {
                    let mut out = format!(
                        "{} of {} events materialized{}",
                        v["status"]["applied"],
                        v["status"]["ledger_size"],
                        if v["status"]["caught_up"] == true {
                            ""
                        } else {
                            " (catching up)"
                        }
                    );
                    for t in v["tables"].as_array().into_iter().flatten() {
                        out.push_str(&format!(
                            "\n  {:<20} {:>10} rows",
                            plain(&t["name"]),
                            t["rows"]
                        ));
                    }
                    out
                }
                _ => format!(
                    "{} done: {} of {} events materialized",
                    plain(&v["action"]),
                    v["applied"],
                    v["ledger_size"]
                ),
            });
            Ok(())
        }
        Command::Export(args) => {
            if args.format != "parquet" {
                bail!("only --format parquet is supported");
            }
            let client = client(&cli)?;
            let dir = std::path::absolute(&args.dir)?;
            let value: Value = client
                .json(client.request(reqwest::Method::POST, "/v1/export").json(
                    &serde_json::json!({"dir": dir.display().to_string(), "format": "parquet"}),
                ))
                .await?;
            print_value(&cli, &value, |v| {
                v["tables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        format!(
                            "{:<20} {:>10} rows  {}",
                            plain(&t["name"]),
                            t["rows"],
                            plain(&t["file"])
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        Command::Ledger(command) => {
            let (path, list) = match command {
                LedgerCommand::Log { author, after } => {
                    (format!("/v1/logs/{author}?after={after}&limit=1000"), None)
                }
                LedgerCommand::Event { id } => (format!("/v1/events/{id}"), None),
                LedgerCommand::Forks { page } => ("/v1/forks".into(), Some(("forks", page))),
                LedgerCommand::Checkpoint => ("/v1/checkpoint".into(), None),
                LedgerCommand::Skills { page } => ("/v1/skills".into(), Some(("skills", page))),
                LedgerCommand::Basins { id: Some(id), page } => {
                    if page.limit.is_some() || page.after.is_some() {
                        bail!("--limit and --after page the list of basins, not one basin");
                    }
                    (format!("/v1/basins/{id}"), None)
                }
                LedgerCommand::Basins { id: None, page } => {
                    ("/v1/basins".into(), Some(("basins", page)))
                }
                LedgerCommand::Reputation { page } => {
                    ("/v1/reputation".into(), Some(("reputation", page)))
                }
                LedgerCommand::Nodes { page } => ("/v1/nodes".into(), Some(("nodes", page))),
            };
            match list {
                Some((key, page)) => {
                    let value = get_pages(&client(&cli)?, &path, key, page).await?;
                    print_json(&cli, &value)
                }
                None => get_and_print(&cli, &path).await,
            }
        }
        Command::Get { path } => get_and_print(&cli, path).await,
        Command::Status => {
            let client = client(&cli)?;
            let value: Value = client
                .json(client.request(reqwest::Method::GET, "/v1/status"))
                .await?;
            print_value(&cli, &value, |v| {
                v.as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| format!("{k:<14} {}", plain(v)))
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            });
            Ok(())
        }
        Command::Gc => {
            let client = client(&cli)?;
            let value: Value = client
                .json(client.request(reqwest::Method::POST, "/v1/gc"))
                .await?;
            print_value(&cli, &value, |v| {
                format!("deleted {} blobs, kept {}", v["deleted"], v["kept"])
            });
            Ok(())
        }
        Command::Embed(args) => embed(&cli, args),
        Command::QueryWorker => bail!("query-worker is started by the node itself"),
    }
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `meshnode embed`: one vector per text; with `--json`, the model, token ids and vectors.
fn embed(cli: &Cli, args: &EmbedArgs) -> anyhow::Result<()> {
    use meshnode_embed::Embedder;
    let dir = match &args.model_dir {
        Some(dir) => dir.clone(),
        None => meshnode_embed::default_model_dir()
            .ok_or_else(|| anyhow!("HOME is not set; pass --model-dir"))?,
    };
    let embedder = Embedder::open(&dir)?;
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let vectors = embedder.embed(&texts)?;
    let mut data = Vec::with_capacity(texts.len());
    for (index, (text, vector)) in texts.iter().zip(&vectors).enumerate() {
        data.push(serde_json::json!({
            "index": index,
            "tokens": embedder.tokenize(text)?,
            "embedding": vector,
        }));
    }
    let value = serde_json::json!({"model": embedder.model_id(), "data": data});
    print_value(cli, &value, |v| {
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| d["embedding"].to_string())
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

fn print_value(cli: &Cli, value: &Value, human: impl Fn(&Value) -> String) {
    if cli.json {
        println!("{value}");
    } else {
        println!("{}", human(value));
    }
}

fn init(cli: &Cli, args: &InitArgs) -> anyhow::Result<()> {
    let dir = data_dir(cli)?;
    let report = node::init(&dir, args.genesis.as_deref(), &args.name)?;
    let value = serde_json::json!({
        "data_dir": report.data_dir.display().to_string(),
        "node": report.node.to_hex(),
        "net": report.net.to_hex(),
    });
    print_value(cli, &value, |_| {
        format!(
            "initialised {}\nnode {}\nnet  {}\nnext: meshnode --data-dir {} serve",
            report.data_dir.display(),
            report.node,
            report.net,
            report.data_dir.display()
        )
    });
    Ok(())
}

async fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<()> {
    let dir = data_dir(cli)?;
    if args.init && !dir.join(node::files::NODE_KEY).exists() {
        let report = node::init(&dir, None, "meshnode-local")?;
        eprintln!("initialised {} (node {})", dir.display(), report.node);
    }
    let mut config = Config::load(&dir)?;
    if let Some(addr) = args.http_addr {
        config.http_addr = addr;
    }
    if let Some(addr) = args.p2p_addr {
        config.p2p_addr = addr;
    }
    if !args.p2p_advertise.is_empty() {
        config.p2p_advertise = args.p2p_advertise.clone();
    }
    let node = Arc::new(Node::open(&dir, config.clone()).await?);
    let ticket = node
        .start_mesh()
        .await
        .with_context(|| format!("cannot start the p2p endpoint on {}", config.p2p_addr))?
        .ticket()
        .to_string();
    if args.demo && crate::demo::load(&node).await? {
        eprintln!(
            "loaded the demo network: {} events (agents: {})",
            node.ledger.tree_size()?,
            crate::demo::AGENTS.join(", ")
        );
    }
    // After the demo: its loader signs as the node with a head of its own.
    match node.announce_address(true).await {
        // The tables answer for the announcement too before the node says it is ready.
        Ok(true) => node.query.sync(std::time::Duration::from_secs(120)).await?,
        Ok(false) => {}
        Err(e) => tracing::warn!("announcing this node's new address: {e:#}"),
    }
    crate::replicate::spawn(node.clone());
    let metrics = Arc::new(Metrics::new());
    let state = AppState::new(node.clone(), metrics.clone());
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    let addr = listener.local_addr()?;
    // Tell CLI invocations on this data dir where the node listens.
    let api_file = dir.join(node::files::API);
    std::fs::write(&api_file, format!("http://{addr}\n"))?;
    state.set_ready(true);
    let value = serde_json::json!({
        "listening": format!("http://{addr}"),
        "node": node.node.to_hex(),
        "net": node.net.to_hex(),
        "data_dir": dir.display().to_string(),
        "ticket": ticket,
    });
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "meshnode".into());
    let has_events = node.ledger.tree_size()? > 0;
    print_value(cli, &value, |_| {
        let mut text = format!(
            "meshnode {} listening on http://{addr}\n  node     {}\n  net      {}\n  data dir {}\n  \
             ticket   {ticket}\n\
             try:  {exe} --data-dir {} status",
            env!("CARGO_PKG_VERSION"),
            node.node,
            node.net,
            dir.display(),
            dir.display()
        );
        if has_events {
            text.push_str(&format!(
                "\n      {exe} --data-dir {} sql \"SELECT name, domain, price FROM skills\"",
                dir.display()
            ));
        }
        if has_events && node.query.embed_model().is_some() {
            text.push_str(&format!(
                "\n      {exe} --data-dir {} search \"help me figure out when to pick the grapes\"",
                dir.display()
            ));
        }
        if node.query.embed_model().is_some() {
            text.push_str(&format!(
                "\n      curl -s http://{addr}/v1/embeddings -H 'content-type: application/json' -d '{{\"input\": \"who can bandage a cut?\"}}'"
            ));
        }
        text
    });
    std::io::stdout().flush().ok();
    server::serve(
        listener,
        routes(state.clone()),
        config.server.clone(),
        metrics,
        shutdown_signal(),
    )
    .await;
    state.set_ready(false);
    std::fs::remove_file(&api_file).ok();
    tracing::info!("shutting down");
    node.shutdown().await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn progress_bar(total: Option<u64>) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{spinner} {bytes}/{total_bytes} {wide_bar} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn blob(cli: &Cli, command: &BlobCommand) -> anyhow::Result<()> {
    let client = client(cli)?;
    match command {
        BlobCommand::Add { input, no_pin } => {
            let (body, bar) = upload_body(input).await?;
            let path = if *no_pin {
                "/v1/blobs?pin=false"
            } else {
                "/v1/blobs"
            };
            let request = client
                .request(reqwest::Method::POST, path)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body);
            let result: anyhow::Result<Value> = client.json(request).await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let value = result?;
            print_value(cli, &value, |v| {
                format!(
                    "{}  {}  {} bytes",
                    plain(&v["hash"]),
                    plain(&v["cid"]),
                    v["size"]
                )
            });
            Ok(())
        }
        BlobCommand::Get { hash, output } => {
            let output = output.clone().unwrap_or_else(|| PathBuf::from(hash));
            let size = download(&client, hash, Some(&output)).await?;
            let value = serde_json::json!({"hash": hash, "path": output.display().to_string(), "size": size});
            if cli.json {
                println!("{value}");
            } else {
                eprintln!("wrote {size} bytes to {}", output.display());
            }
            Ok(())
        }
        BlobCommand::Cat { hash } => {
            download(&client, hash, None).await?;
            Ok(())
        }
        BlobCommand::Fetch { hash } => {
            let path = format!("/v1/blobs/{hash}/fetch");
            let value: Value = client
                .json(client.request(reqwest::Method::POST, &path))
                .await?;
            print_value(cli, &value, |v| {
                format!(
                    "{}  {} bytes  from {}",
                    plain(&v["hash"]),
                    v["size"],
                    plain(&v["source"])
                )
            });
            Ok(())
        }
        BlobCommand::Stat { hash } => {
            let response = client
                .send(client.request(reqwest::Method::HEAD, &format!("/v1/blobs/{hash}")))
                .await?;
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let value = serde_json::json!({
                "hash": header("etag").trim_matches('"'),
                "cid": header("x-blob-cid"),
                "size": header("content-length").parse::<u64>().unwrap_or(0),
            });
            print_value(cli, &value, |v| {
                format!(
                    "{}  {}  {} bytes",
                    plain(&v["hash"]),
                    plain(&v["cid"]),
                    v["size"]
                )
            });
            Ok(())
        }
    }
}

async fn upload_body(input: &str) -> anyhow::Result<(reqwest::Body, Option<ProgressBar>)> {
    let (reader, total): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Option<u64>) =
        if input == "-" {
            (Box::new(tokio::io::stdin()), None)
        } else {
            let file = tokio::fs::File::open(input)
                .await
                .with_context(|| format!("cannot open {input}"))?;
            let size = file.metadata().await?.len();
            (Box::new(file), Some(size))
        };
    let bar = match total {
        Some(total) if total < PROGRESS_BYTES_MIN => None,
        other => Some(progress_bar(other)),
    };
    let counter = bar.clone();
    let stream =
        tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024).inspect(move |chunk| {
            if let (Some(bar), Ok(chunk)) = (&counter, chunk) {
                bar.inc(chunk.len() as u64);
            }
        });
    Ok((reqwest::Body::wrap_stream(stream), bar))
}

/// Downloads a whole blob to `output` (or stdout), verifying its BLAKE3 hash on the way.
async fn download(client: &Client, id: &str, output: Option<&Path>) -> anyhow::Result<u64> {
    let expected = meshnode_schemas::BlobHash::parse(id)
        .map_err(|e| anyhow!("`{id}` is not a blob hash: {e}"))?;
    let response = client
        .send(client.request(reqwest::Method::GET, &format!("/v1/blobs/{expected}")))
        .await?;
    let total = response.content_length();
    let bar = match (total, output) {
        (Some(total), Some(_)) if total >= PROGRESS_BYTES_MIN => Some(progress_bar(Some(total))),
        _ => None,
    };
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let (mut sink, temp): (Box<dyn Write>, Option<(PathBuf, PathBuf)>) = match output {
        Some(path) => {
            let temp = path.with_extension("meshnode-partial");
            let file = std::fs::File::create(&temp)
                .with_context(|| format!("cannot create {}", temp.display()))?;
            (
                Box::new(std::io::BufWriter::new(file)),
                Some((temp, path.to_path_buf())),
            )
        }
        None => (Box::new(std::io::stdout().lock()), None),
    };
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("download interrupted")?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        sink.write_all(&chunk)?;
        if let Some(bar) = &bar {
            bar.inc(chunk.len() as u64);
        }
    }
    sink.flush()?;
    drop(sink);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if hasher.finalize().as_bytes() != expected.as_bytes() {
        if let Some((temp, _)) = &temp {
            std::fs::remove_file(temp).ok();
        }
        bail!("downloaded bytes do not match hash {expected}");
    }
    if let Some((temp, path)) = temp {
        std::fs::rename(&temp, &path)
            .with_context(|| format!("cannot move download to {}", path.display()))?;
    }
    Ok(size)
}

async fn peer(cli: &Cli, command: &PeerCommand) -> anyhow::Result<()> {
    let client = client(cli)?;
    match command {
        PeerCommand::Add { ticket } => {
            let value: Value = client
                .json(
                    client
                        .request(reqwest::Method::POST, "/v1/peers")
                        .json(&serde_json::json!({"ticket": ticket})),
                )
                .await?;
            print_value(cli, &value, |v| format!("added peer {}", plain(&v["id"])));
        }
        PeerCommand::Rm { id } => {
            let value: Value = client
                .json(client.request(reqwest::Method::DELETE, &format!("/v1/peers/{id}")))
                .await?;
            print_value(cli, &value, |_| format!("removed peer {id}"));
        }
        PeerCommand::Ls => {
            let value: Value = client
                .json(client.request(reqwest::Method::GET, "/v1/peers"))
                .await?;
            print_value(cli, &value, |v| {
                let mut lines = vec![format!("this node: {}", plain(&v["ticket"]))];
                for p in v["peers"].as_array().into_iter().flatten() {
                    let state = if p["banned_until_ms"].is_u64() {
                        "banned"
                    } else if p["connected"].as_bool() == Some(true) {
                        "connected"
                    } else {
                        "offline"
                    };
                    lines.push(format!(
                        "{}  {state:9}  {}  behind {} (heads {})  in {} events  rtt {} ms  score {}",
                        plain(&p["id"]),
                        plain(&p["address"]),
                        p["behind"],
                        plain(&p["heads_behind"]),
                        p["events_in"],
                        p["rtt_ms"]
                            .as_f64()
                            .map_or("-".into(), |r| format!("{r:.1}")),
                        p["score"],
                    ));
                }
                lines.join("\n")
            });
        }
    }
    Ok(())
}

async fn pin(cli: &Cli, command: &PinCommand) -> anyhow::Result<()> {
    let client = client(cli)?;
    match command {
        PinCommand::Add { hash } => {
            let value: Value = client
                .json(client.request(reqwest::Method::PUT, &format!("/v1/pins/{hash}")))
                .await?;
            print_value(cli, &value, |v| format!("pinned {}", plain(&v["hash"])));
        }
        PinCommand::Rm { hash } => {
            let value: Value = client
                .json(client.request(reqwest::Method::DELETE, &format!("/v1/pins/{hash}")))
                .await?;
            print_value(cli, &value, |v| format!("unpinned {}", plain(&v["hash"])));
        }
        PinCommand::Ls { page } => {
            let value = get_pages(&client, "/v1/pins", "pins", page).await?;
            print_value(cli, &value, |v| {
                let mut lines: Vec<String> = v["pins"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        let size = p["size"]
                            .as_u64()
                            .map(|s| format!("{s} bytes"))
                            .unwrap_or_else(|| "missing".into());
                        format!("{}  {size}", plain(&p["hash"]))
                    })
                    .collect();
                if let Some(next) = v["next"].as_str() {
                    lines.push(format!("(more: --after {next})"));
                }
                lines.join("\n")
            });
        }
    }
    Ok(())
}

fn key(cli: &Cli, command: &KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Gen { out } => {
            let key = node::generate_key();
            node::write_new_file(out, meshnode_schemas::key_file_text(&key).as_bytes(), 0o600)?;
            let public = meshnode_schemas::author_of(&key);
            let value =
                serde_json::json!({"file": out.display().to_string(), "public": public.to_hex()});
            print_value(cli, &value, |_| public.to_hex());
        }
        KeyCommand::Show { file } => {
            let key = node::read_key_file(file)?;
            let public = meshnode_schemas::author_of(&key);
            let value = serde_json::json!({"public": public.to_hex()});
            print_value(cli, &value, |_| public.to_hex());
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn event(cli: &Cli, args: &EventArgs) -> anyhow::Result<()> {
    use meshnode_schemas::{AuthorKey, EventBody, EventId, Kind, SignedEvent};
    let kind = Kind::parse(&args.kind).map_err(|e| anyhow!("{e}"))?;
    let key = node::read_key_file(&args.key)?;
    let author = match &args.author {
        Some(a) => AuthorKey::from_hex(a).map_err(|e| anyhow!("--author: {e}"))?,
        None => meshnode_schemas::author_of(&key),
    };
    let payload_text = match args.payload.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?,
        None => args.payload.clone(),
    };
    let payload_json: Value =
        serde_json::from_str(&payload_text).context("--payload is not valid JSON")?;
    let payload = crate::events_json::payload_from_json(kind, &payload_json)
        .map_err(|e| anyhow!("--payload: {e}"))?;
    let client = client(cli)?;
    let status: Value = client
        .json(client.request(reqwest::Method::GET, "/v1/status"))
        .await?;
    let net = meshnode_schemas::BlobHash::from_hex(status["net"].as_str().unwrap_or(""))
        .map_err(|e| anyhow!("node status has no net: {e}"))?;
    let account: Value = client
        .json(client.request(reqwest::Method::GET, &format!("/v1/accounts/{author}")))
        .await?;
    let head_seq = account["head_seq"].as_u64().unwrap_or(0);
    let prev = match account["head_id"].as_str() {
        Some(h) => Some(EventId::from_hex(h).map_err(|e| anyhow!("head_id: {e}"))?),
        None => None,
    };
    let mut deps = Vec::new();
    for d in &args.deps {
        deps.push(EventId::from_hex(d.trim()).map_err(|e| anyhow!("--deps {d}: {e}"))?);
    }
    if kind == Kind::TokenTransfer && !args.no_auto_deps {
        // Name the credits this log has not referenced yet, so that they are spendable.
        for c in account["unreferenced_credits"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(id) = c.as_str().and_then(|h| EventId::from_hex(h).ok()) {
                deps.push(id);
            }
        }
    }
    deps.sort();
    deps.dedup();
    deps.truncate(meshnode_schemas::limits::DEPS_MAX);
    let body = EventBody {
        net,
        author,
        seq: head_seq + 1,
        prev,
        deps,
        ts: now_ms(),
        payload,
    };
    // The node's own key: the node signs (one event at a time), never this process — two
    // events signed at one seq would fork the node's log for good.
    if args.out.is_none() && status["node"].as_str() == Some(author.to_hex().as_str()) {
        let deps: Vec<String> = body.deps.iter().map(|d| d.to_hex()).collect();
        let request = serde_json::json!({"kind": args.kind, "payload": payload_json, "deps": deps});
        let value: Value = client
            .json(
                client
                    .request(reqwest::Method::POST, "/v1/events/own")
                    .json(&request),
            )
            .await?;
        print_value(cli, &value, |v| {
            format!(
                "{}  seq {}  {} (signed by the node)",
                plain(&v["id"]),
                v["seq"],
                plain(&v["status"])
            )
        });
        return Ok(());
    }
    let signed = SignedEvent::sign(body, &key).map_err(|e| anyhow!("{e}"))?;
    if let Some(out) = &args.out {
        std::fs::write(out, &signed.envelope)?;
        let value =
            serde_json::json!({"id": signed.id.to_hex(), "file": out.display().to_string()});
        print_value(cli, &value, |_| {
            format!("{}  written to {}", signed.id, out.display())
        });
        return Ok(());
    }
    let value: Value = client
        .json(
            client
                .request(reqwest::Method::POST, "/v1/events")
                .header(reqwest::header::CONTENT_TYPE, "application/cbor")
                .body(signed.envelope.clone()),
        )
        .await?;
    print_value(cli, &value, |v| {
        let mut line = format!(
            "{}  seq {}  {}",
            plain(&v["id"]),
            v["seq"],
            plain(&v["status"])
        );
        if v["status"] == "pending" {
            line.push_str(&format!(" ({})", plain(&v["reason"])));
        }
        line
    });
    Ok(())
}

async fn account(cli: &Cli, args: &AccountArgs) -> anyhow::Result<()> {
    let key = match (&args.key, &args.key_file) {
        (Some(k), _) => k.clone(),
        (None, Some(file)) => meshnode_schemas::author_of(&node::read_key_file(file)?).to_hex(),
        (None, None) => bail!("give an account key or --key-file"),
    };
    let client = client(cli)?;
    let value: Value = client
        .json(client.request(reqwest::Method::GET, &format!("/v1/accounts/{key}")))
        .await?;
    print_value(cli, &value, |v| {
        format!(
            "key            {}\nbalance        {}\nreceived       {} ({} contested)\nsent           {} ({} contested)\nminted         {}\nhead seq       {}\nunreferenced   {}{} credits\nreputation     {}{}",
            plain(&v["key"]),
            v["balance"],
            v["received"],
            v["received_contested"],
            v["sent"],
            v["sent_contested"],
            v["minted"],
            v["head_seq"],
            v["unreferenced_credits"]
                .as_array()
                .map(|a| a.len())
                .unwrap_or(0),
            // More than the first page (GET /v1/accounts/{key}/credits lists them all).
            if v["credits_next"].is_string() {
                "+"
            } else {
                ""
            },
            v["reputation"],
            if v["frozen_from"].is_null() {
                String::new()
            } else {
                format!("\ncontested from seq {} (the log forked)", v["frozen_from"])
            }
        )
    });
    Ok(())
}

fn audit_summary(v: &Value) -> String {
    let mut out = format!(
        "{}  {} events, tree size {}, root {}\nstate digest {}\nsupply {}, {} authors, {} forks, {} findings, {} ms",
        if v["ok"] == true { "OK" } else { "FAILED" },
        v["n_events"],
        v["tree_size"],
        plain(&v["root"]),
        plain(&v["state_digest"]),
        v["supply"],
        v["n_authors"],
        v["n_forks"],
        v["n_findings"],
        v["duration_ms"]
    );
    for f in v["findings"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n  {}: {}",
            plain(&f["code"]),
            plain(&f["message"])
        ));
    }
    out
}

async fn audit(cli: &Cli, args: &AuditArgs) -> anyhow::Result<()> {
    let report: Value = if let Some(dir) = &args.bundle {
        use meshnode_ledger::BundleTrust;
        let trust = match (&args.node, &args.checkpoint) {
            (Some(key), _) => BundleTrust::Node(
                meshnode_schemas::AuthorKey::from_hex(key.trim())
                    .map_err(|e| anyhow::anyhow!("--node {key}: {e}"))?,
            ),
            (None, Some(path)) => BundleTrust::Checkpoint(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the checkpoint {}", path.display()))?,
            ),
            (None, None) => bail!(
                "a bundle proves only that it is self-consistent: pass --node KEY (the node's \
                 key, from `meshnode status`) or --checkpoint FILE (a checkpoint you got from \
                 the node) to say whose log it must be"
            ),
        };
        let (report, key) = meshnode_ledger::verify_bundle(dir, &trust)?;
        eprintln!("checked against node key {key}");
        let mut value = serde_json::to_value(report)?;
        value["checked_against"] = Value::String(key.to_hex());
        value
    } else {
        let client = client(cli)?;
        let answered = match &args.export {
            None => {
                client
                    .json::<Value>(client.request(reqwest::Method::GET, "/v1/audit"))
                    .await
            }
            Some(dir) => {
                let dir = std::path::absolute(dir)?;
                client
                    .json::<Value>(
                        client
                            .request(reqwest::Method::POST, "/v1/audit/export")
                            .json(&serde_json::json!({"dir": dir.display().to_string()})),
                    )
                    .await
            }
        };
        match answered {
            Ok(v) => v,
            Err(e) if e.to_string().contains("no meshnode is answering") => {
                // No node running: audit the data directory directly.
                let dir = data_dir(cli)?;
                let config = Config::load(&dir)?;
                let node = Node::open(&dir, config).await?;
                let report = node.ledger.audit(args.export.as_deref()).await;
                node.shutdown().await?;
                serde_json::to_value(report?)?
            }
            Err(e) => return Err(e),
        }
    };
    print_value(cli, &report, audit_summary);
    if report["ok"] != true {
        bail!("audit found {} problems", report["n_findings"]);
    }
    Ok(())
}

/// Renders `{columns, rows}` as an aligned text table.
fn text_table(v: &Value) -> String {
    let columns: Vec<String> = v["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(plain)
        .collect();
    let rows: Vec<Vec<String>> = v["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            r.as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let text = plain(c);
                    if text.chars().count() > 48 {
                        format!("{}…", text.chars().take(47).collect::<String>())
                    } else {
                        text
                    }
                })
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(&columns)];
    out.push(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-"),
    );
    for row in &rows {
        out.push(line(row));
    }
    out.push(format!(
        "({} row{}{})",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        if v["truncated"] == true {
            ", truncated"
        } else {
            ""
        }
    ));
    out.join("\n")
}

async fn sql(cli: &Cli, args: &SqlArgs) -> anyhow::Result<()> {
    let client = client(cli)?;
    if args.tables {
        let value: Value = client
            .json(client.request(reqwest::Method::GET, "/v1/tables"))
            .await?;
        print_value(cli, &value, |v| {
            v["tables"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let columns: Vec<String> = t["columns"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| format!("{} {}", plain(&c["name"]), plain(&c["type"])))
                        .collect();
                    format!(
                        "{} ({} rows)\n    {}",
                        plain(&t["name"]),
                        t["rows"],
                        columns.join("\n    ")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        });
        return Ok(());
    }
    let Some(text) = &args.sql else {
        bail!("give a SQL statement, or --tables");
    };
    let format = args.format.clone().unwrap_or_else(|| {
        if cli.json {
            "json".into()
        } else {
            "table".into()
        }
    });
    let wire = if format == "table" {
        "json"
    } else {
        format.as_str()
    };
    let mut body = serde_json::json!({"sql": text, "format": wire});
    if let Some(n) = args.as_of {
        body["as_of"] = serde_json::json!(n);
    }
    let response = client
        .send(client.request(reqwest::Method::POST, "/v1/sql").json(&body))
        .await?;
    match format.as_str() {
        "json" | "table" => {
            let value: Value = response.json().await?;
            if format == "table" {
                println!("{}", text_table(&value));
            } else {
                println!("{value}");
            }
        }
        _ => {
            let bytes = response.bytes().await?;
            std::io::stdout().write_all(&bytes)?;
        }
    }
    Ok(())
}

async fn search(cli: &Cli, args: &SearchArgs) -> anyhow::Result<()> {
    let mut body = match (&args.text, &args.vector) {
        (Some(text), _) => serde_json::json!({
            "table": args.table, "text": text, "k": args.k, "mode": args.mode,
        }),
        (None, Some(vector)) => {
            let vector: Value =
                serde_json::from_str(vector).context("--vector is not a JSON array")?;
            serde_json::json!({
                "table": args.table, "vector": vector, "k": args.k, "metric": args.metric,
                "exact": args.exact,
            })
        }
        (None, None) => anyhow::bail!("give the text to look for, or --vector"),
    };
    if let Some(filter) = &args.filter {
        body["filter"] = serde_json::json!(filter);
    }
    let client = client(cli)?;
    let value: Value = client
        .json(
            client
                .request(reqwest::Method::POST, "/v1/search")
                .json(&body),
        )
        .await?;
    let by_text = args.text.is_some();
    print_value(cli, &value, |v| {
        v["results"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| search_line(r, by_text))
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// One hit as a line: its score (text) or distance (vector), label and id.
fn search_line(hit: &Value, by_text: bool) -> String {
    let row = &hit["row"];
    let label = ["name", "basin_id", "service", "id"]
        .iter()
        .find_map(|k| row.get(*k).and_then(|x| x.as_str()))
        .unwrap_or("");
    let id = row
        .get("id")
        .or_else(|| row.get("author"))
        .unwrap_or(&Value::Null);
    let number = if by_text {
        &hit["score"]
    } else {
        &hit["distance"]
    };
    format!(
        "{:.4}  {}  {}",
        number.as_f64().unwrap_or(f64::NAN),
        label,
        plain(id)
    )
}

/// GETs the pages of a list route (`path` answers `{key: [...], next}`), from `page.after` on,
/// until the list ends or `page.limit` items are in, and returns them as one answer
/// `{key: [...], next}`: `next` is the cursor to continue after the last item given, `null`
/// when the list ended.
async fn get_pages(
    client: &Client,
    path: &str,
    key: &str,
    page: &PageArgs,
) -> anyhow::Result<Value> {
    let mut items: Vec<Value> = Vec::new();
    let mut after = page.after.clone();
    let next = loop {
        let wanted = match page.limit {
            Some(limit) => (limit - items.len() as u64).min(LIST_PAGE_MAX),
            None => LIST_PAGE_MAX,
        };
        debug_assert!(
            wanted > 0,
            "a page is asked for only while items are missing"
        );
        let mut url = format!("{path}?limit={wanted}");
        if let Some(after) = &after {
            url.push_str("&after=");
            url.push_str(&query_escape(after));
        }
        let mut value: Value = client
            .json(client.request(reqwest::Method::GET, &url))
            .await?;
        let Some(Value::Array(got)) = value.get_mut(key).map(Value::take) else {
            bail!("the answer of GET {path} has no `{key}` list");
        };
        let n_got = got.len();
        items.extend(got);
        let next = value["next"].take();
        let Some(cursor) = next.as_str().map(str::to_string) else {
            break next;
        };
        if page.limit.is_some_and(|limit| items.len() as u64 >= limit) {
            break next;
        }
        if n_got == 0 || after.as_deref() == Some(cursor.as_str()) {
            bail!("GET {path} answered a `next` cursor without progress ({cursor})");
        }
        after = Some(cursor);
    };
    let mut out = serde_json::Map::new();
    out.insert(key.to_string(), Value::Array(items));
    out.insert("next".to_string(), next);
    Ok(Value::Object(out))
}

/// Percent-encodes a query parameter value.
fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Prints a JSON answer: indented, or on one line with `--json`.
fn print_json(cli: &Cli, value: &Value) -> anyhow::Result<()> {
    if cli.json {
        println!("{value}");
    } else {
        println!("{}", serde_json::to_string_pretty(value)?);
    }
    Ok(())
}

async fn get_and_print(cli: &Cli, path: &str) -> anyhow::Result<()> {
    let client = client(cli)?;
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let response = client
        .send(client.request(reqwest::Method::GET, &path))
        .await?;
    let text = response.text().await?;
    match serde_json::from_str::<Value>(&text) {
        Ok(value) if !cli.json => println!("{}", serde_json::to_string_pretty(&value)?),
        Ok(value) => println!("{value}"),
        Err(_) => print!("{text}"),
    }
    Ok(())
}
