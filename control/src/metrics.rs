//! Prometheus metrics, served at `GET /metrics` (OpenMetrics text).
//!
//! Two kinds: event metrics (API requests, journal appends) are counted where they happen in
//! [`Metrics`], owned by the [`crate::store::Bus`]; state metrics (journal head, reconciler
//! lag, volumes, pool space, hosts) are read from the projections and the data path at scrape
//! time, so they cannot drift from what the API reports. Label cardinality is bounded: API
//! routes are the route templates (`/api/v2/projects/{projectName}/volumes/{UUID}`, never
//! the concrete path), statuses and methods are few, and per-volume series stop at
//! [`METRICS_VOLUMES_MAX`] volumes (the count left out is its own gauge).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::limits::METRICS_VOLUMES_MAX;

/// The content type of [`render`]'s output.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`to_text_format`]'s output (Prometheus' classic text format, what a
/// scraper gets unless it asks for OpenMetrics, and what `promtool check metrics` reads).
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One API route's answers by method and status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template, or `unrouted` for answers given before routing (admission) or
    /// to paths no route matches.
    pub route: String,
    pub method: String,
    pub status: u16,
}

/// One API route's latency by method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

/// A volume's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    project: String,
    volume: String,
}

/// Volumes counted by state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 100 µs to ~3.3 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

/// Event metrics: counted as things happen. Cheap to update from any thread.
pub struct Metrics {
    api_requests: Family<RequestLabels, Counter>,
    api_seconds: HistogramFamily<RouteLabels>,
    append_seconds: Histogram,
    append_events: Histogram,
    append_failures: Counter,
    /// The newest seq the reconciler has acted on (`-1` before its first pass).
    reconciled_seq: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            api_requests: Family::default(),
            api_seconds: Family::new_with_constructor(latency_histogram),
            append_seconds: latency_histogram(),
            append_events: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            append_failures: Counter::default(),
            reconciled_seq: AtomicI64::new(-1),
        }
    }
}

impl Metrics {
    /// One API answer.
    pub fn api_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let (route, method) = (route.to_string(), method.to_string());
        self.api_seconds
            .get_or_create(&RouteLabels {
                route: route.clone(),
                method: method.clone(),
            })
            .observe(seconds);
        self.api_requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
    }

    /// One journal group commit of `events` events, durable after `seconds`.
    pub fn journal_appended(&self, events: usize, seconds: f64) {
        self.append_seconds.observe(seconds);
        self.append_events.observe(events as f64);
    }

    /// A group commit that failed (its requests were answered with an error).
    pub fn journal_append_failed(&self) {
        self.append_failures.inc();
    }

    /// The reconciler finished a pass over the state as of `seq`.
    pub fn reconciled(&self, seq: u64) {
        self.reconciled_seq
            .store(i64::try_from(seq).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "evstor_api_requests",
            "API answers by route template, method and status",
            self.api_requests.clone(),
        );
        r.register_with_unit(
            "evstor_api_request_duration",
            "API request latency, from the request's arrival to its answer's headers",
            Unit::Seconds,
            self.api_seconds.clone(),
        );
        r.register_with_unit(
            "evstor_journal_append_duration",
            "Journal group commit latency (RocksDB write with fsync, or the etcd transaction in cluster mode)",
            Unit::Seconds,
            self.append_seconds.clone(),
        );
        r.register(
            "evstor_journal_append_events",
            "Events per journal group commit",
            self.append_events.clone(),
        );
        r.register(
            "evstor_journal_append_failures",
            "Group commits that failed (their requests were answered with an error)",
            self.append_failures.clone(),
        );
    }
}

/// What a scrape reads from the live server.
pub struct Snapshot<'a> {
    pub head_seq: u64,
    pub state: &'a crate::domain::State,
    pub pool: evstor_datapath::blockstore::PoolStats,
    /// Space of a volume's image (`None`: not in the block store).
    pub usage: &'a dyn Fn(uuid::Uuid) -> Option<evstor_datapath::blockstore::Usage>,
    /// Commands a volume received (`None`: not published).
    pub io: &'a dyn Fn(uuid::Uuid) -> Option<evstor_datapath::blockstore::IoTotals>,
    pub hosts: Vec<evstor_datapath::ConnectedHost>,
}

/// The whole exposition: event metrics plus state read now.
pub fn render(metrics: &Metrics, now: &Snapshot<'_>) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    metrics.register(&mut r);
    register_journal(&mut r, metrics, now.head_seq);
    register_pool(&mut r, &now.pool);
    register_volumes(&mut r, now);
    register_hosts(&mut r, &now.hosts);
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &r)?;
    Ok(out)
}

/// OpenMetrics text to Prometheus' classic text format. The two differ, for what evstor
/// exports, only in that a counter family is named without its `_total` suffix in OpenMetrics
/// and with it in the classic format, that OpenMetrics has `# UNIT` lines, and its `# EOF`.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name);
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                let tail = &rest[name.len()..];
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                let _ = writeln!(out, "{prefix}{name}{suffix}{tail}");
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn gauge(value: u64) -> Gauge<u64, AtomicU64> {
    let g = Gauge::<u64, AtomicU64>::default();
    g.set(value);
    g
}

fn register_journal(r: &mut Registry, metrics: &Metrics, head: u64) {
    r.register(
        "evstor_journal_head_seq",
        "Sequence number of the newest event in this server's journal",
        gauge(head),
    );
    let reconciled = metrics.reconciled_seq.load(Ordering::Relaxed);
    // Before the first pass everything is behind.
    let lag = u64::try_from(reconciled).map_or(head, |seq| head.saturating_sub(seq));
    r.register(
        "evstor_reconciler_lag_events",
        "Events appended since the state the reconciler last acted on",
        gauge(lag),
    );
}

fn register_pool(r: &mut Registry, pool: &evstor_datapath::blockstore::PoolStats) {
    let bytes = [
        (
            "evstor_pool_capacity",
            "Bytes of every pool device",
            pool.capacity_bytes,
        ),
        (
            "evstor_pool_used",
            "Pool bytes allocated to data",
            pool.used_bytes,
        ),
        (
            "evstor_pool_logical",
            "Logical bytes the allocated data holds (before compression)",
            pool.logical_bytes,
        ),
    ];
    for (name, help, value) in bytes {
        r.register_with_unit(name, help, Unit::Bytes, gauge(value));
    }
    let ratio = Gauge::<f64, AtomicU64>::default();
    ratio.set(pool.compression_ratio());
    r.register(
        "evstor_pool_compression_ratio",
        "Logical bytes per stored byte",
        ratio,
    );
    r.register(
        "evstor_pool_media_errors",
        "Checksum mismatches seen on pool reads since the server started",
        gauge(pool.media_errors),
    );
}

/// Per-volume series, one family per figure.
#[derive(Default)]
struct VolumeSeries {
    logical: Family<VolumeLabels, Gauge<u64, AtomicU64>>,
    physical: Family<VolumeLabels, Gauge<u64, AtomicU64>>,
    reads: Family<VolumeLabels, Counter>,
    read_bytes: Family<VolumeLabels, Counter>,
    writes: Family<VolumeLabels, Counter>,
    write_bytes: Family<VolumeLabels, Counter>,
}

impl VolumeSeries {
    fn add(&self, now: &Snapshot<'_>, v: &crate::domain::volume::Volume) {
        let labels = VolumeLabels {
            project: v.project.clone(),
            volume: v.name.clone(),
        };
        if let Some(u) = (now.usage)(v.uuid) {
            self.logical
                .get_or_create(&labels)
                .set(u.owned_logical_bytes);
            self.physical.get_or_create(&labels).set(u.owned_bytes);
        }
        if let Some(io) = (now.io)(v.uuid) {
            self.reads.get_or_create(&labels).inc_by(io.reads);
            self.read_bytes.get_or_create(&labels).inc_by(io.read_bytes);
            self.writes.get_or_create(&labels).inc_by(io.writes);
            self.write_bytes
                .get_or_create(&labels)
                .inc_by(io.write_bytes);
        }
    }

    fn register(self, r: &mut Registry) {
        let counters = [
            (
                "evstor_volume_reads",
                "Read commands the volume received since it was published",
                self.reads,
            ),
            (
                "evstor_volume_writes",
                "Write commands the volume received since it was published",
                self.writes,
            ),
        ];
        for (name, help, family) in counters {
            r.register(name, help, family);
        }
        let bytes = [
            (
                "evstor_volume_read",
                "Bytes read from the volume since it was published",
                self.read_bytes,
            ),
            (
                "evstor_volume_written",
                "Bytes written to the volume since it was published",
                self.write_bytes,
            ),
        ];
        for (name, help, family) in bytes {
            r.register_with_unit(name, help, Unit::Bytes, family);
        }
        r.register_with_unit(
            "evstor_volume_logical",
            "Logical bytes written to the volume's own layer",
            Unit::Bytes,
            self.logical,
        );
        r.register_with_unit(
            "evstor_volume_physical",
            "Pool bytes the volume's own layer holds (after compression)",
            Unit::Bytes,
            self.physical,
        );
    }
}

fn register_volumes(r: &mut Registry, now: &Snapshot<'_>) {
    let by_state = Family::<StateLabels, Gauge<u64, AtomicU64>>::default();
    let series = VolumeSeries::default();
    let mut omitted = 0u64;
    for (i, v) in now.state.volumes.by_uuid.values().enumerate() {
        let mut state = String::new();
        let _ = write!(state, "{:?}", v.state);
        by_state.get_or_create(&StateLabels { state }).inc();
        if i < METRICS_VOLUMES_MAX {
            series.add(now, v);
        } else {
            omitted += 1;
        }
    }
    r.register("evstor_volumes", "Volumes by state", by_state);
    series.register(r);
    r.register(
        "evstor_metrics_volumes_omitted",
        "Volumes past the per-volume series cap, left out of the per-volume metrics",
        gauge(omitted),
    );
}

fn register_hosts(r: &mut Registry, hosts: &[evstor_datapath::ConnectedHost]) {
    let queues: usize = hosts.iter().map(|h| h.io_queues).sum();
    r.register(
        "evstor_nvme_controllers",
        "NVMe/TCP controllers (host sessions) connected",
        gauge(hosts.len() as u64),
    );
    r.register(
        "evstor_nvme_io_queues",
        "NVMe/TCP I/O queues connected",
        gauge(queues as u64),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &Metrics, state: &crate::domain::State) -> String {
        let usage = |_| None;
        let io = |_| None;
        let snap = Snapshot {
            head_seq: 10,
            state,
            pool: evstor_datapath::blockstore::PoolStats {
                capacity_bytes: 1 << 30,
                used_bytes: 4096,
                logical_bytes: 8192,
                media_errors: 0,
            },
            usage: &usage,
            io: &io,
            hosts: Vec::new(),
        };
        render(m, &snap).expect("encodes")
    }

    #[test]
    fn counts_answers_by_route_template_and_lag_by_seq() {
        let m = Metrics::default();
        let state = crate::domain::State::default();
        let route = "/api/v2/projects/{projectName}/volumes";
        m.api_request(route, "GET", 200, 0.002);
        m.api_request(route, "GET", 200, 0.004);
        m.api_request(route, "GET", 404, 0.001);
        let out = scrape(&m, &state);
        assert!(out.contains(&format!(
            "evstor_api_requests_total{{route=\"{route}\",method=\"GET\",status=\"200\"}} 2"
        )));
        assert!(out.contains("evstor_reconciler_lag_events 10"), "{out}");
        m.reconciled(7);
        let out = scrape(&m, &state);
        assert!(out.contains("evstor_reconciler_lag_events 3"), "{out}");
        assert!(out.contains("evstor_pool_compression_ratio 2.0"), "{out}");
        assert!(out.ends_with("# EOF\n"));
        let text = to_text_format(&out);
        assert!(
            text.contains("# TYPE evstor_api_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP evstor_api_requests_total API answers"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE evstor_pool_used_bytes gauge\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }
}
