//! The `evstor` binary: `serve`, the `journal` verbs, and `token create`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use evstor_control::api::admission::RequestCaps;
use evstor_control::cluster::etcd::{parse_endpoints, EtcdAuth, EtcdTls};
use evstor_control::cluster::ClusterConfig;
use evstor_control::edge::EdgeConfig;
use evstor_control::limits;
use evstor_control::server::{self, ServeConfig};
use evstor_control::store::{codec, replay};
use evstor_journal::EventLog;

#[derive(Parser)]
#[command(
    name = "evstor",
    version,
    about = "Event-sourced storage orchestrator with an NVMe/TCP data path (LightOS API v2)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Log line format.
    #[arg(
        long,
        global = true,
        env = "EVSTOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start (first time: create) a one-server cluster in the data directory, or with
    /// `--etcd` a member of a multi-server cluster.
    Serve(Box<ServeArgs>),
    /// Inspect the event journal (read-only; safe beside a running server).
    Journal {
        #[command(subcommand)]
        verb: JournalVerb,
    },
    /// Mint API tokens with the cluster's root key.
    Token {
        #[command(subcommand)]
        verb: TokenVerb,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, env = "EVSTOR_DATA_DIR", default_value = "evstor-data")]
    data_dir: PathBuf,
    #[arg(long, env = "EVSTOR_API_ADDR", default_value = "0.0.0.0:8443")]
    api_addr: SocketAddr,
    #[arg(long, env = "EVSTOR_NVME_ADDR", default_value = "0.0.0.0:4420")]
    nvme_addr: SocketAddr,
    #[arg(long, env = "EVSTOR_DISCOVERY_ADDR", default_value = "0.0.0.0:8009")]
    discovery_addr: SocketAddr,
    /// A file or block device for the storage pool (repeat for several; files are
    /// created sparse if missing). Default: `<data-dir>/devices/dev0.img`. Devices may be
    /// appended between starts, never removed or reordered.
    #[arg(long = "device", env = "EVSTOR_DEVICES", value_delimiter = ',')]
    devices: Vec<PathBuf>,
    /// A file or block device this server has outside its pool (repeat for several; files
    /// are created sparse if missing): listed by `GET /api/v2/nvmeDevices` as `UnManaged`
    /// until `POST /api/v2/nvmeDevices` adds it to the pool, while serving.
    #[arg(
        long = "spare-device",
        env = "EVSTOR_SPARE_DEVICES",
        value_delimiter = ','
    )]
    spare_devices: Vec<PathBuf>,
    /// CPU cores given to the NVMe/TCP data path: one reactor thread per core (each owns
    /// many connections and one io_uring), pinned to the first cores the process may use,
    /// which the process's other threads then leave to them (unless that would leave none).
    /// Default: half of those CPUs, at least one (one on a 2-CPU machine), unpinned.
    #[arg(long, env = "EVSTOR_DATAPATH_CORES", value_parser = datapath_cores)]
    datapath_cores: Option<usize>,
    #[command(flatten)]
    edge: EdgeArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Lifetime in seconds of the `admin.jwt` the server writes (rewritten at half-life and
    /// when the root key rotates). `evstor token create --lifetime` mints longer ones.
    #[arg(long, env = "EVSTOR_ADMIN_TOKEN_LIFETIME", value_parser = lifetime,
          default_value_t = limits::ADMIN_TOKEN_LIFETIME_SECS)]
    admin_token_lifetime: u64,
    /// CA certificates (PEM) trusted for https IdPs, besides the system's bundle.
    #[arg(long, env = "EVSTOR_IDP_CA_FILE")]
    idp_ca_file: Option<PathBuf>,
}

/// Deadlines and caps of the API's connections (defaults from `control/src/limits.rs`).
#[derive(Args)]
struct EdgeArgs {
    /// Longest from accepting an API connection to the end of its TLS handshake.
    #[arg(long, env = "EVSTOR_API_TLS_HANDSHAKE_TIMEOUT_MS", value_parser = positive::<u64>,
          default_value_t = limits::API_TLS_HANDSHAKE_MS)]
    api_tls_handshake_timeout_ms: u64,
    /// Longest from the first byte of a request to the end of its headers.
    #[arg(long, env = "EVSTOR_API_HEADER_TIMEOUT_MS", value_parser = positive::<u64>,
          default_value_t = limits::API_HEADER_READ_MS)]
    api_header_timeout_ms: u64,
    /// Longest from the end of a request's headers to the end of its body.
    #[arg(long, env = "EVSTOR_API_BODY_TIMEOUT_MS", value_parser = positive::<u64>,
          default_value_t = limits::API_BODY_READ_MS)]
    api_body_timeout_ms: u64,
    /// Longest an API connection stays open with no request in progress.
    #[arg(long, env = "EVSTOR_API_IDLE_TIMEOUT_MS", value_parser = positive::<u64>,
          default_value_t = limits::API_IDLE_MS)]
    api_idle_timeout_ms: u64,
    /// Open API connections in total (default: a quarter of the open files limit, 16..4096).
    #[arg(long, env = "EVSTOR_API_CONNECTIONS_MAX", value_parser = positive::<usize>)]
    api_connections_max: Option<usize>,
    /// Open API connections per client IP address.
    #[arg(long, env = "EVSTOR_API_CONNECTIONS_PER_ADDR_MAX", value_parser = positive::<usize>,
          default_value_t = limits::API_CONNECTIONS_PER_ADDR_MAX)]
    api_connections_per_addr_max: usize,
    /// API requests in flight at once (more: 503).
    #[arg(long, env = "EVSTOR_API_REQUESTS_IN_FLIGHT_MAX", value_parser = positive::<usize>,
          default_value_t = limits::API_REQUESTS_IN_FLIGHT_MAX)]
    api_requests_in_flight_max: usize,
    /// API requests in flight at once per token subject (more: 429).
    #[arg(long, env = "EVSTOR_API_REQUESTS_PER_SUBJECT_MAX", value_parser = positive::<usize>,
          default_value_t = limits::API_REQUESTS_PER_SUBJECT_MAX)]
    api_requests_per_subject_max: usize,
}

impl EdgeArgs {
    fn config(&self) -> EdgeConfig {
        EdgeConfig {
            tls_handshake_ms: self.api_tls_handshake_timeout_ms,
            header_read_ms: self.api_header_timeout_ms,
            body_read_ms: self.api_body_timeout_ms,
            idle_ms: self.api_idle_timeout_ms,
            connections_max: self.api_connections_max,
            connections_per_addr_max: self.api_connections_per_addr_max,
            requests: RequestCaps {
                in_flight_max: self.api_requests_in_flight_max,
                per_subject_max: self.api_requests_per_subject_max,
            },
        }
    }
}

/// Cluster mode: join (or, on an empty etcd prefix, bootstrap) a cluster ordered by etcd.
#[derive(Args)]
struct ClusterArgs {
    /// etcd client endpoints, comma-separated (`http://host:2379,…`, or `https://…` for
    /// TLS). Without it, evstor runs the embedded single-server cluster.
    #[arg(long, env = "EVSTOR_ETCD")]
    etcd: Option<String>,
    /// For `https://` etcd endpoints: the CA certificates (PEM) to verify them with
    /// (default: the system's bundle).
    #[arg(long, env = "EVSTOR_ETCD_CACERT", requires = "etcd")]
    etcd_cacert: Option<PathBuf>,
    /// For etcd with `--client-cert-auth`: this server's client certificate (PEM).
    #[arg(long, env = "EVSTOR_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of `--etcd-cert`.
    #[arg(long, env = "EVSTOR_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// For etcd with authentication on: the etcd user this server signs in as (it needs
    /// read and write access to `--etcd-prefix`, and to the cluster's leases).
    #[arg(long, env = "EVSTOR_ETCD_USER", requires_all = ["etcd", "etcd_password_file"])]
    etcd_user: Option<String>,
    /// The file whose first line is `--etcd-user`'s password (kept out of the command
    /// line and the environment, which other local users can read).
    #[arg(long, env = "EVSTOR_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// This server's name in the cluster (unique; kept in the data directory).
    #[arg(long, env = "EVSTOR_NAME", requires = "etcd")]
    name: Option<String>,
    /// The failure domain replicas are kept apart by (default: the server itself).
    #[arg(
        long,
        env = "EVSTOR_FAILURE_DOMAIN",
        requires = "etcd",
        default_value = ""
    )]
    failure_domain: String,
    /// Where in etcd the cluster keeps its keys.
    #[arg(long, env = "EVSTOR_ETCD_PREFIX", default_value = "/evstor/default/")]
    etcd_prefix: String,
    /// Log batches kept in etcd behind the head (older ones are trimmed by the leader; a
    /// server further behind catches up from a peer's checkpoint).
    #[arg(long, env = "EVSTOR_ETCD_LOG_TAIL_BATCHES", value_parser = positive::<u64>,
          default_value_t = limits::LOG_TAIL_BATCHES)]
    etcd_log_tail_batches: u64,
}

impl ClusterArgs {
    fn config(&self) -> anyhow::Result<Option<ClusterConfig>> {
        let Some(etcd) = &self.etcd else {
            return Ok(None);
        };
        let name = self
            .name
            .clone()
            .context("--etcd needs --name: this server's name in the cluster")?;
        let endpoints = parse_endpoints(etcd)?;
        let tls_flags = self.etcd_cacert.is_some() || self.etcd_cert.is_some();
        anyhow::ensure!(
            endpoints.https || !tls_flags,
            "--etcd-cacert, --etcd-cert and --etcd-key are for https:// etcd endpoints"
        );
        let tls = if endpoints.https {
            let client = self.etcd_cert.as_deref().zip(self.etcd_key.as_deref());
            Some(EtcdTls::new(self.etcd_cacert.as_deref(), client).context("etcd TLS")?)
        } else {
            None
        };
        let auth = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(file)) => Some(EtcdAuth::from_file(user, file)?),
            _ => None,
        };
        Ok(Some(ClusterConfig {
            endpoints: endpoints.hosts,
            tls,
            auth,
            prefix: self.etcd_prefix.clone(),
            name,
            failure_domain: self.failure_domain.clone(),
            tail_batches: self.etcd_log_tail_batches,
        }))
    }
}

/// A reactor count: 1 to the data path's ceiling.
fn datapath_cores(s: &str) -> Result<usize, String> {
    let max = evstor_datapath::limits::MAX_REACTORS;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of cores from 1 to {max}")),
    }
}

/// A number above zero (a zero deadline or cap would refuse everything).
fn positive<T: std::str::FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(n) if n > T::from(0) => Ok(n),
        _ => Err(format!("{s:?} is not a positive integer")),
    }
}

/// A token lifetime in seconds: above zero, at most [`limits::TOKEN_LIFETIME_SECS_MAX`].
fn lifetime(s: &str) -> Result<u64, String> {
    let n = positive::<u64>(s)?;
    if n > limits::TOKEN_LIFETIME_SECS_MAX {
        return Err(format!(
            "{n} s is longer than the longest token lifetime, {} s",
            limits::TOKEN_LIFETIME_SECS_MAX
        ));
    }
    Ok(n)
}

#[derive(Subcommand)]
enum JournalVerb {
    /// Check every checksum, the hash chain, and that replay reproduces the projections.
    /// Exits non-zero on any corruption.
    Verify {
        #[arg(long, env = "EVSTOR_DATA_DIR", default_value = "evstor-data")]
        data_dir: PathBuf,
    },
    /// Rebuild the state from events (all, or up to a seq or time) and print it as JSON.
    Replay {
        #[arg(long, env = "EVSTOR_DATA_DIR", default_value = "evstor-data")]
        data_dir: PathBuf,
        /// Replay up to and including this seq.
        #[arg(long)]
        until_seq: Option<u64>,
        /// Replay up to this RFC 3339 time, e.g. 2026-11-29T14:02:00Z.
        #[arg(long)]
        until_time: Option<String>,
    },
    /// Print every event as a JSON line.
    Export {
        #[arg(long, env = "EVSTOR_DATA_DIR", default_value = "evstor-data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// Print events as JSON lines and keep following new ones.
    Tail {
        #[arg(long, env = "EVSTOR_DATA_DIR", default_value = "evstor-data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
}

#[derive(Subcommand)]
enum TokenVerb {
    /// Print a new RS256 token signed by `system:root`.
    Create {
        #[arg(long, env = "EVSTOR_DATA_DIR", default_value = "evstor-data")]
        data_dir: PathBuf,
        /// `<scope>:<role>`, e.g. `system:cluster-admin`, `proj-1:admin`, `proj-1:viewer`.
        #[arg(long, required = true)]
        role: Vec<String>,
        #[arg(long, default_value = "evstor-cli")]
        subject: String,
        /// Lifetime in seconds (at most a year and a day).
        #[arg(long, default_value_t = 30 * 24 * 3600, value_parser = lifetime)]
        lifetime: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("evstor: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("evstor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ends a server that has shut down: output flushed, then `_exit`, without the C++ static
/// destructors of a normal exit. Threads that may still hold the block store (a replica
/// connection mid-frame, the store's worker) would otherwise find RocksDB's statics gone
/// under them and abort the process ("pthread lock: Invalid argument"). Cutting them is a
/// kill -9 at worst, which every structure is built to survive; whatever was acknowledged
/// is on disk already.
fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit(2) ends the process at once; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// Log lines as text or one JSON object per line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to standard error; `serve` also writes them to `<data-dir>/logs/evstor.log`
/// (rotated by size, collected by `GET /api/v2/logs`). `EVSTOR_LOG` filters (default `info`).
fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter =
        tracing_subscriber::EnvFilter::try_from_env("EVSTOR_LOG").unwrap_or_else(|_| "info".into());
    let file = match &cli.command {
        Cmd::Serve(args) => {
            let dir = evstor_control::logs::log_dir(&args.data_dir);
            let log = evstor_control::logs::RotatingLog::open(&dir)
                .with_context(|| format!("opening the log in {}", dir.display()))?;
            Some(log)
        }
        _ => None,
    };
    let json = cli.log_format == LogFormat::Json;
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = if json {
        stderr.json().boxed()
    } else {
        stderr.boxed()
    };
    let file = file.map(|log| {
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || log.clone());
        if json {
            layer.json().boxed()
        } else {
            layer.boxed()
        }
    });
    tracing_subscriber::registry()
        .with(stderr.and_then(file).with_filter(filter))
        .try_init()
        .context("installing the logger")?;
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Serve(args) => {
            let ServeArgs {
                data_dir,
                api_addr,
                nvme_addr,
                discovery_addr,
                devices,
                spare_devices,
                edge,
                cluster,
                admin_token_lifetime,
                idp_ca_file,
                datapath_cores,
            } = *args;
            let cluster = cluster.config()?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(server::serve(
                ServeConfig {
                    data_dir,
                    devices,
                    spare_devices,
                    api_addr,
                    nvme_addr,
                    discovery_addr,
                    api: edge.config(),
                    cluster,
                    admin_token_lifetime_secs: admin_token_lifetime,
                    idp_ca_file,
                    datapath_cores: datapath_cores.unwrap_or(0),
                },
                None,
            ))?;
            drop(rt);
            exit_now(0)
        }
        Cmd::Journal { verb } => journal(verb),
        Cmd::Token {
            verb:
                TokenVerb::Create {
                    data_dir,
                    role,
                    subject,
                    lifetime,
                },
        } => {
            let key_path = server::root_key_path(&data_dir);
            let pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading the root key {}", key_path.display()))?;
            // Project roles are bound to the projects as they are now (see api::auth).
            let journal = server::open_journal_read_only(&data_dir)?;
            let state = evstor_control::store::rows::load(&journal)?;
            let root = state
                .credentials
                .get("system", "root")
                .context("the cluster has no root key yet")?;
            let public = evstor_control::keys::public_of(&pem)?;
            anyhow::ensure!(
                evstor_control::keys::fingerprint(&public)
                    == evstor_control::keys::fingerprint(&root.payload_pem),
                "{} is not the cluster's current root key (it was rotated; a running server \
                 rewrites it, see admin.jwt)",
                key_path.display()
            );
            let projects = evstor_control::api::auth::project_uuids_for(&state, &role)
                .map_err(anyhow::Error::msg)?;
            let token = evstor_control::api::auth::mint(
                &pem,
                evstor_control::api::auth::ROOT_KID,
                &subject,
                &role,
                projects,
                lifetime,
            )?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn journal(verb: JournalVerb) -> anyhow::Result<ExitCode> {
    match verb {
        JournalVerb::Verify { data_dir } => verify(&data_dir),
        JournalVerb::Replay {
            data_dir,
            until_seq,
            until_time,
        } => {
            let until = match (until_seq, until_time) {
                (Some(s), _) => replay::Until::Seq(s),
                (None, Some(t)) => {
                    let at = humantime::parse_rfc3339_weak(&t)
                        .with_context(|| format!("{t:?} is not an RFC 3339 time"))?;
                    let ns = at.duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
                    replay::Until::TimeUnixNs(ns)
                }
                (None, None) => replay::Until::All,
            };
            let journal = server::open_journal_read_only(&data_dir)?;
            let (state, last) = replay::replay(&journal, until)?;
            let out = serde_json::json!({ "lastSeq": last, "state": state });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(ExitCode::SUCCESS)
        }
        JournalVerb::Export { data_dir, from } => {
            let journal = server::open_journal_read_only(&data_dir)?;
            print_from(&journal, from)?;
            Ok(ExitCode::SUCCESS)
        }
        JournalVerb::Tail { data_dir, from } => {
            let mut next = from;
            loop {
                // A read-only open sees the log as of opening; reopen to see new appends.
                let journal = server::open_journal_read_only(&data_dir)?;
                next = print_from(&journal, next)?;
                drop(journal);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

fn verify(data_dir: &Path) -> anyhow::Result<ExitCode> {
    let journal = server::open_journal_read_only(data_dir)?;
    let report = journal.verify()?;
    // Every server of a cluster reaches the same head: compare these lines across servers.
    let head = journal.head();
    let hash: String = head.last_hash.iter().map(|b| format!("{b:02x}")).collect();
    println!("head: seq {} hash {hash}", head.last_seq());
    for p in &report.problems {
        println!("CORRUPT seq {}: {}", p.seq, p.what);
    }
    if !report.is_ok() {
        println!(
            "journal verify: FAILED ({} events checked)",
            report.events_checked
        );
        return Ok(ExitCode::FAILURE);
    }
    let diff = replay::compare_projections(&journal)?;
    for k in &diff.differing_keys {
        println!("PROJECTION MISMATCH {k}: replay disagrees with the stored row");
    }
    if !diff.differing_keys.is_empty() {
        println!("journal verify: FAILED (projections differ from replay)");
        return Ok(ExitCode::FAILURE);
    }
    if diff.outdated {
        println!(
            "journal verify: OK ({} events, hash chain intact; projection rows are in an older \
             format, not compared: `evstor serve` rebuilds them from the events)",
            report.events_checked
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "journal verify: OK ({} events, hash chain intact, projections equal replay)",
        report.events_checked
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints envelopes from `from` as JSON lines; returns the next seq to print.
fn print_from(journal: &evstor_journal::RocksJournal, mut from: u64) -> anyhow::Result<u64> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    loop {
        let chunk = journal.read(from, 4096)?;
        let Some(last) = chunk.last().map(|e| e.seq) else {
            return Ok(from);
        };
        for env in &chunk {
            let event = codec::decode(env)?;
            let line = serde_json::json!({
                "seq": env.seq,
                "time": evstor_control::api::json::rfc3339(env.time_unix_ns),
                "actor": env.actor,
                "project": env.project,
                "requestId": env.request_id,
                "type": env.event_type,
                "schemaVersion": env.schema_version,
                "event": event,
            });
            writeln!(out, "{line}")?;
        }
        from = last + 1;
    }
}
