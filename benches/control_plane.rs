//! Control-plane throughput: durable commits through the journal writer (group commit) with
//! 1 and 16 concurrent writers, raw journal appends, and replay speed over 1M events.
//! Prints figures; asserts nothing. `cargo bench --bench control_plane [-- --quick]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use evstor_control::domain::cluster::{Bootstrap, Command as ClusterCommand};
use evstor_control::domain::inventory::Device;
use evstor_control::domain::volume::{
    Command as VolumeCommand, Event as VolumeEvent, Label, NewVolume, VolumeChange, VolumeDelta,
    VolumeRef,
};
use evstor_control::domain::{Command, Event};
use evstor_control::store::replay::{replay, Until};
use evstor_control::store::{codec, Bus, RequestMeta};
use evstor_journal::{AppendBatch, EventLog, NewEvent, OpenMode, RocksJournal};

struct Opts {
    seconds: u64,
    replay_events: u64,
}

fn opts() -> Opts {
    let quick = std::env::args().any(|a| a == "--quick");
    Opts {
        seconds: if quick { 1 } else { 5 },
        replay_events: if quick { 100_000 } else { 1_000_000 },
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn bootstrap() -> Command {
    Command::Cluster(ClusterCommand::Bootstrap(Bootstrap {
        hostname: "bench".into(),
        api_endpoint: "127.0.0.1:1".into(),
        nvme_endpoint: "127.0.0.1:2".into(),
        devices: vec![Device::backing_file("d0", "/d0", 1 << 50)],
        root_public_key_pem: "PEM".into(),
        server_uuid: None,
        failure_domain: String::new(),
    }))
}

fn create(name: &str) -> Command {
    Command::Volume(VolumeCommand::CreateVolume(NewVolume {
        project: "default".into(),
        name: name.into(),
        size_bytes: 1 << 30,
        acl: vec!["ALLOW_ANY".into()],
        ip_acl: None,
        compression: false,
        replica_count: 1,
        sector_size: 0,
        source_snapshot: None,
        qos: None,
        labels: vec![],
    }))
}

fn relabel(name: &str, n: u64) -> Command {
    Command::Volume(VolumeCommand::UpdateVolume {
        project: "default".into(),
        target: VolumeRef::Name(name.into()),
        if_match: None,
        change: VolumeChange {
            labels: Some(vec![Label {
                key: "n".into(),
                value: n.to_string(),
            }]),
            ..Default::default()
        },
    })
}

/// Commits through the Bus from `writers` concurrent tasks; each commit is one durable event.
fn bench_bus(writers: usize, seconds: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let journal = Arc::new(RocksJournal::open(dir.path(), OpenMode::ReadWrite).expect("journal"));
    let bus = Bus::start(journal.clone()).expect("bus");
    let meta = || RequestMeta::system("bench");
    rt.block_on(async {
        bus.submit(meta(), bootstrap()).await.expect("bootstrap");
        for w in 0..writers {
            let c = bus
                .submit(meta(), create(&format!("v{w}")))
                .await
                .expect("create");
            if let Some((_, Event::Volume(e))) = c.events.first() {
                let available = VolumeCommand::MarkVolumeAvailable { uuid: e.uuid() };
                bus.submit(meta(), Command::Volume(available))
                    .await
                    .expect("available");
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start_seq = journal.head().last_seq();
    let started = Instant::now();
    let latencies: Vec<Duration> = rt.block_on(async {
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let bus = bus.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        bus.submit(RequestMeta::system("bench"), relabel(&format!("v{w}"), n))
                            .await
                            .expect("commit");
                        lat.push(t.elapsed());
                        n += 1;
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        all
    });
    let elapsed = started.elapsed().as_secs_f64();
    let events = journal.head().last_seq() - start_seq;
    let mut lat = latencies;
    lat.sort_unstable();
    println!(
        "durable commits, {writers:>2} writer(s): {:>9.0} events/s  ({events} events in {elapsed:.1}s; commit latency p50 {:?} p99 {:?})",
        events as f64 / elapsed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
    );
}

/// One synced append per event, no batching: the fsync floor group commit amortizes.
fn bench_raw_append(seconds: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = RocksJournal::open(dir.path(), OpenMode::ReadWrite).expect("journal");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let event = NewEvent {
            time_unix_ns: 0,
            actor: "bench".into(),
            project: "default".into(),
            request_id: "r".into(),
            event_type: "Bench".into(),
            schema_version: 1,
            payload: vec![0; 200],
        };
        j.append(AppendBatch {
            first_seq: j.head().next_seq,
            events: vec![event],
            projections: vec![],
        })
        .expect("append");
        n += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "raw synced appends, 1 event each:  {:>9.0} events/s",
        n as f64 / elapsed
    );
}

/// Builds a journal of `total` events (1000 volumes, then label updates) and replays it.
fn bench_replay(total: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let journal = Arc::new(RocksJournal::open(dir.path(), OpenMode::ReadWrite).expect("journal"));
    let volumes = 1000;
    let uuids = rt.block_on(async {
        let bus = Bus::start(journal.clone()).expect("bus");
        bus.submit(RequestMeta::system("bench"), bootstrap())
            .await
            .expect("bootstrap");
        let mut uuids = Vec::new();
        for i in 0..volumes {
            let c = bus
                .submit(RequestMeta::system("bench"), create(&format!("v{i}")))
                .await
                .expect("create");
            if let Some((_, Event::Volume(e))) = c.events.first() {
                uuids.push(e.uuid());
            }
        }
        uuids
    });
    let build = Instant::now();
    let mut next = journal.head().next_seq;
    let batch_events = 10_000u64;
    while journal.head().last_seq() < total {
        let events: Vec<NewEvent> = (0..batch_events)
            .map(|i| {
                let n = next + i;
                let event = Event::Volume(VolumeEvent::VolumeUpdated {
                    uuid: uuids[(n % volumes) as usize],
                    change: VolumeDelta {
                        labels: Some(vec![Label {
                            key: "n".into(),
                            value: n.to_string(),
                        }]),
                        ..Default::default()
                    },
                });
                codec::encode(&event, "default", "bench", "r", n)
            })
            .collect();
        journal
            .append(AppendBatch {
                first_seq: next,
                events,
                projections: vec![],
            })
            .expect("append");
        next = journal.head().next_seq;
    }
    let events = journal.head().last_seq();
    println!(
        "built a journal of {events} events in {:.1}s",
        build.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let (state, last) = replay(&journal, Until::All).expect("replay");
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(last, events);
    println!(
        "replay: {:>9.0} events/s  ({events} events into {} volumes in {elapsed:.2}s)",
        events as f64 / elapsed,
        state.volumes.len()
    );
}

fn main() {
    let o = opts();
    println!("# control plane ({}s per write scenario)", o.seconds);
    bench_raw_append(o.seconds);
    bench_bus(1, o.seconds);
    bench_bus(16, o.seconds);
    bench_replay(o.replay_events);
}
