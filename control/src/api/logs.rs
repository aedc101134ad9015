//! `GET /api/v2/logs`: the support bundle, streamed as it is built.
//!
//! A blocking task writes the tar (through gzip unless `DontCompressOutput`) into bounded
//! chunks that the response body hands to the client: memory stays at
//! [`BUNDLE_CHUNKS_IN_FLIGHT`] × [`BUNDLE_CHUNK_BYTES`] however large the logs are, and a
//! client that stops reading stops the builder. Query parameters honoured:
//! `NumOfDaysToCollectLogs` (default 2), `SkipStatistics`, `DontCollectlogs`,
//! `DontCompressOutput`, `LogFilename` (the archive's name prefix); the others of the
//! reference are accepted and have nothing to act on here.

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use evstor_journal::EventLog as _;
use serde_json::Value;
use tokio::sync::mpsc;

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::{App, Query};
use crate::limits::{BUNDLE_CHUNKS_IN_FLIGHT, BUNDLE_CHUNK_BYTES, BUNDLE_LOG_DAYS_MAX};
use crate::logs::{log_dir, recent_logs, Bundle};
use crate::metrics::to_text_format;

pub fn routes() -> Router<App> {
    Router::new().route("/api/v2/logs", get(bundle))
}

/// What the caller asked the bundle to hold.
struct Ask {
    days: u32,
    statistics: bool,
    logs: bool,
    gzip: bool,
    prefix: String,
}

impl Ask {
    fn parse(q: &Query) -> ApiResult<Ask> {
        let days = match q.u64("NumOfDaysToCollectLogs")? {
            None => 2,
            Some(d) if d <= u64::from(BUNDLE_LOG_DAYS_MAX) => d as u32,
            Some(d) => {
                return Err(ApiError::bad_request(format!(
                    "NumOfDaysToCollectLogs={d}: at most {BUNDLE_LOG_DAYS_MAX}"
                )))
            }
        };
        let prefix = q.get("LogFilename").unwrap_or("evstor");
        let valid = prefix.len() <= 64
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !prefix.starts_with('.');
        if !valid {
            return Err(ApiError::bad_request(
                "LogFilename: at most 64 characters of letters, digits, '-', '_' and '.' \
                 (not starting with '.')",
            ));
        }
        Ok(Ask {
            days,
            statistics: !q.flag("SkipStatistics")?,
            logs: !q.flag("DontCollectlogs")?,
            gzip: !q.flag("DontCompressOutput")?,
            prefix: prefix.to_string(),
        })
    }
}

async fn bundle(State(app): State<App>, who: Principal, q: Query) -> ApiResult<Response> {
    who.require_cluster_admin()?;
    let ask = Ask::parse(&q)?;
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    let root = format!("{}-{stamp}", ask.prefix);
    let (file, content_type) = if ask.gzip {
        (format!("{root}.tgz"), "application/gzip")
    } else {
        (format!("{root}.tar"), "application/x-tar")
    };
    let (tx, rx) = mpsc::channel(BUNDLE_CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let sink = ChunkSink::new(tx);
        let written = if ask.gzip {
            let gz = flate2::write::GzEncoder::new(sink, flate2::Compression::default());
            build(&app, &ask, &root, gz).and_then(|gz| gz.finish()?.close())
        } else {
            build(&app, &ask, &root, sink).and_then(ChunkSink::close)
        };
        if let Err(e) = written {
            // The client went away, or a file could not be read: the archive ends short,
            // which the client sees as a truncated download.
            tracing::warn!("support bundle {root} cut short: {e}");
        }
    });
    let disposition = format!("attachment; filename=\"{file}\"");
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::new(ChunkBody { rx }),
    )
        .into_response())
}

/// Writes the whole archive into `out`.
fn build<W: Write>(app: &App, ask: &Ask, root: &str, out: W) -> io::Result<W> {
    let mut b = Bundle::new(out, root);
    b.text("version.txt", &version(app))?;
    b.text("config.json", &config(app))?;
    b.text("cluster.json", &cluster_state(app))?;
    b.text("journal-verify.txt", &journal_verify(app))?;
    b.text(
        "journal-rocksdb-stats.txt",
        &app.bus.journal().rocksdb_stats(),
    )?;
    b.text("blockstore.txt", &app.datapath.store_report())?;
    if ask.statistics {
        b.text("metrics.txt", &metrics_text(app))?;
    }
    if ask.logs {
        for f in recent_logs(&log_dir(&app.info.data_dir), ask.days) {
            b.file("logs", &f)?;
        }
    }
    b.finish()
}

fn version(app: &App) -> String {
    format!(
        "evstor {}\nLightOS API v2\nserver node: {}\n",
        app.info.version,
        app.info
            .node_uuid
            .map_or_else(|| "single-server cluster".to_string(), |u| u.to_string())
    )
}

fn config(app: &App) -> String {
    let c = &app.info;
    let v = serde_json::json!({
        "version": c.version,
        "apiEndpoint": c.api_endpoint,
        "nvmeEndpoint": c.nvme_endpoint,
        "discoveryEndpoint": c.discovery_endpoint,
        "dataDir": c.data_dir.display().to_string(),
        "nodeUUID": c.node_uuid.map(|u| u.to_string()),
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// The projections as JSON, with every field that could hold key material redacted.
fn cluster_state(app: &App) -> String {
    let state = app.bus.state();
    let mut v = serde_json::to_value(&*state).unwrap_or(Value::Null);
    drop(state);
    redact(&mut v);
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// Replaces the value of every object field whose name suggests a secret or a key (public
/// keys included: the bundle has no use for them) with `"[redacted]"`.
fn redact(v: &mut Value) {
    const WORDS: [&str; 6] = ["secret", "key", "token", "password", "pem", "credential"];
    match v {
        Value::Object(map) => {
            for (k, field) in map.iter_mut() {
                let lower = k.to_ascii_lowercase();
                if WORDS.iter().any(|w| lower.contains(w)) {
                    *field = Value::String("[redacted]".into());
                } else {
                    redact(field);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// The journal's own check (checksums and hash chain). The projection comparison of
/// `evstor journal verify` is left out: on a live server it races the writer.
fn journal_verify(app: &App) -> String {
    let journal = app.bus.journal();
    let head = journal.head();
    let hash: String = head.last_hash.iter().map(|b| format!("{b:02x}")).collect();
    let mut out = format!("head: seq {} hash {hash}\n", head.last_seq());
    match journal.verify() {
        Ok(report) => {
            for p in &report.problems {
                out.push_str(&format!("CORRUPT seq {}: {}\n", p.seq, p.what));
            }
            let verdict = if report.is_ok() { "OK" } else { "FAILED" };
            out.push_str(&format!(
                "journal verify: {verdict} ({} events checked; projections not compared on a \
                 live server: run `evstor journal verify` for that)\n",
                report.events_checked
            ));
        }
        Err(e) => out.push_str(&format!("journal verify could not run: {e}\n")),
    }
    out
}

fn metrics_text(app: &App) -> String {
    super::metrics::exposition(app)
        .map(|t| to_text_format(&t))
        .unwrap_or_else(|e| format!("metrics could not be encoded: {e}\n"))
}

/// A `Write` that cuts the stream into chunks for the response body; blocks while the
/// client is [`BUNDLE_CHUNKS_IN_FLIGHT`] chunks behind, fails once it has gone.
struct ChunkSink {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChunkSink {
    fn new(tx: mpsc::Sender<Bytes>) -> ChunkSink {
        ChunkSink {
            tx,
            buf: Vec::with_capacity(BUNDLE_CHUNK_BYTES),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(BUNDLE_CHUNK_BYTES));
        self.tx
            .blocking_send(Bytes::from(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }

    /// Sends what is left; the body ends when the sink is dropped.
    fn close(mut self) -> io::Result<()> {
        self.send()
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(BUNDLE_CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == BUNDLE_CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The response body: the chunks, in order, until the builder is done.
struct ChunkBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_reaches_nested_fields_and_leaves_the_rest() {
        let mut v = serde_json::json!({
            "credentials": {"by_id": {"k1": {"publicKey": "-----BEGIN"}}},
            "volumes": [{"name": "v", "idpClientSecret": "s3cr3t", "apiKeyId": 4}],
            "cluster": {"name": "c"}
        });
        redact(&mut v);
        let text = v.to_string();
        assert!(
            !text.contains("BEGIN") && !text.contains("s3cr3t"),
            "{text}"
        );
        assert_eq!(v["volumes"][0]["name"], "v");
        assert_eq!(v["cluster"]["name"], "c");
        assert_eq!(v["credentials"], "[redacted]");
    }
}
