//! Property: for random command sequences committed through the real journal writer on a
//! real RocksDB, replaying the journal gives exactly the live state, and the stored
//! projection rows (what a restart loads) equal it too.

use std::sync::Arc;

use evstor_control::domain::cluster::{Bootstrap, Command as ClusterCommand};
use evstor_control::domain::credential::{Command as CredCommand, CredentialType};
use evstor_control::domain::endpoint::Command as EndpointCommand;
use evstor_control::domain::eviction;
use evstor_control::domain::federation::{AuthzMode, Command as FedCommand, IdpType};
use evstor_control::domain::inventory::{Command as InvCommand, Device, Join};
use evstor_control::domain::project::Command as ProjectCommand;
use evstor_control::domain::schedule::{
    self, Cadence, Command as ScheduleCommand, NewResourcePolicy, Schedule,
};
use evstor_control::domain::snapshot::Command as SnapshotCommand;
use evstor_control::domain::volume::{
    failover_target, Command as VolumeCommand, NewVolume, VolumeChange, VolumeRef,
};
use evstor_control::domain::Command;
use evstor_control::store::replay::{replay, Until};
use evstor_control::store::{rows, Bus, RequestMeta};
use evstor_journal::{OpenMode, RocksJournal};
use proptest::prelude::*;

const PROJECTS: [&str; 3] = ["default", "p1", "p2"];
const NAMES: [&str; 4] = ["a", "b", "c", "bad name"];
/// Schedule time runs this much faster than real time in the property: an hourly slot every
/// millisecond.
const FIRE_CLOCK_SCALE: u32 = 3_600_000;

fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The one server's UUID (given at bootstrap so admin endpoint commands can name it).
const SERVER: uuid::Uuid = uuid::Uuid::from_u128(0x5e);
const API: &str = "127.0.0.1:8443";

/// Federation commands: IdPs, client configurations, auth maps, the switch.
fn arb_federation() -> impl Strategy<Value = Command> {
    let name = prop::sample::select(&NAMES[..]).prop_map(str::to_string);
    let idp = prop::sample::select(&["a", "b"][..]).prop_map(str::to_string);
    let scope = prop::sample::select(&PROJECTS[..]).prop_map(str::to_string);
    let fed = |c: FedCommand| Command::Federation(c);
    prop_oneof![
        idp.clone()
            .prop_map(move |n| fed(FedCommand::CreateIdpConfiguration {
                issuer_url: format!("https://{n}.idp.example"),
                name: n,
                kind: IdpType::Unknown,
                proxy_url: String::new(),
            })),
        idp.clone()
            .prop_map(move |n| fed(FedCommand::UpdateIdpConfiguration {
                name: n,
                issuer_url: None,
                kind: Some(IdpType::Adfs),
                proxy_url: Some("http://proxy.example:3128".into()),
            })),
        idp.clone()
            .prop_map(move |n| fed(FedCommand::DeleteIdpConfiguration { name: n })),
        (name.clone(), idp.clone()).prop_map(move |(n, i)| fed(FedCommand::CreateIdpClientConf {
            client_id: format!("client-{n}"),
            name: n,
            idp: i,
            claim_name: "groups".into(),
            mode: AuthzMode::User,
        })),
        name.clone()
            .prop_map(move |n| fed(FedCommand::DeleteIdpClientConf { name: n })),
        (name.clone(), idp, scope, any::<bool>()).prop_map(move |(n, i, p, update)| fed(
            FedCommand::PutAuthMapEntry {
                identifier: format!("id-{n}"),
                name: n,
                scope: p,
                role: "viewer".into(),
                idp: i,
                update,
            }
        )),
        name.prop_map(move |n| fed(FedCommand::DeleteAuthMapEntry { name: n })),
        Just(fed(FedCommand::EnableFederatedAuthentication)),
        Just(fed(FedCommand::DisableFederatedAuthentication)),
    ]
}

/// Admin endpoint changes and root key rotations.
fn arb_endpoint_or_key() -> impl Strategy<Value = Command> {
    let port = prop::sample::select(&[8443u32, 9443, 9444][..]);
    prop_oneof![
        port.clone().prop_map(
            |port| Command::Endpoint(EndpointCommand::CreateAdminEndpoint {
                server: SERVER,
                default: API.parse().expect("addr"),
                port,
                ips: vec!["127.0.0.1".into()],
            })
        ),
        port.clone().prop_map(
            |port| Command::Endpoint(EndpointCommand::UpdateAdminEndpoint {
                server: SERVER,
                default: API.parse().expect("addr"),
                port,
                ips: vec!["0.0.0.0".into()],
                if_match: None,
                caller: None,
            })
        ),
        port.prop_map(
            |port| Command::Endpoint(EndpointCommand::DeleteAdminEndpoint {
                server: SERVER,
                default: API.parse().expect("addr"),
                port,
                if_match: None,
                caller: None,
            })
        ),
        prop::sample::select(&["K1", "K2"][..]).prop_map(|k| Command::Credential(
            CredCommand::RotateRootKey {
                payload_pem: k.into()
            }
        )),
    ]
}

fn arb_command() -> impl Strategy<Value = Command> {
    prop_oneof![3 => arb_resource(), 1 => arb_federation(), 1 => arb_endpoint_or_key()]
}

fn arb_resource() -> impl Strategy<Value = Command> {
    let project = prop::sample::select(&PROJECTS[..]).prop_map(str::to_string);
    let name = prop::sample::select(&NAMES[..]).prop_map(str::to_string);
    prop_oneof![
        1 => (project.clone()).prop_map(|p| Command::Project(ProjectCommand::CreateProject {
            name: p,
            description: String::new(),
            default_policies: vec![],
        })),
        1 => (project.clone()).prop_map(|p| Command::Project(ProjectCommand::DeleteProject { name: p })),
        // Sizes in whole 4 KiB sectors (others are refused), so volumes do get created.
        3 => (project.clone(), name.clone(), 0u64..(1 << 20), (0u32..6).prop_map(|r| if r > 2 { 1 } else { r })).prop_map(
            |(p, n, sectors, rc)| {
                let size = sectors * 4096;
                Command::Volume(VolumeCommand::CreateVolume(NewVolume {
                    project: p,
                    name: n,
                    size_bytes: size,
                    acl: vec!["ALLOW_ANY".into()],
                    ip_acl: None,
                    compression: size % 2 == 0,
                    replica_count: rc,
                    sector_size: 0,
                    source_snapshot: None,
                    qos: None,
                    labels: vec![],
                }))
            }
        ),
        1 => (
            project.clone(),
            name.clone(),
            1u64..(8 << 30),
            any::<bool>()
        )
            .prop_map(|(p, n, size, force)| {
                Command::Volume(VolumeCommand::UpdateVolume {
                    project: p,
                    target: VolumeRef::Name(n),
                    if_match: None,
                    change: VolumeChange {
                        size_bytes: Some(size),
                        force,
                        acl: Some(vec!["nqn.2014-08.org.nvmexpress:uuid:h1".into()]),
                        ..Default::default()
                    },
                })
            }),
        1 => (project.clone(), name.clone()).prop_map(|(p, n)| Command::Volume(
            VolumeCommand::DeleteVolume {
                project: p,
                target: VolumeRef::Name(n),
                if_match: None,
            }
        )),
        // Resource policies on the volumes above (named like their volume, so they meet
        // often), hourly from 1970; fired with a clock scale beyond the server's (a slot
        // every millisecond) so fires land during the case, some in the same second (a
        // snapshot name clash: a skipped fire). Deleting a volume deletes its policies.
        3 => (project.clone(), name.clone(), 1u32..3)
            .prop_map(|(p, n, hours)| {
            Command::Schedule(ScheduleCommand::CreateResourcePolicy(NewResourcePolicy {
                project: p,
                name: n.clone(),
                volume: VolumeRef::Name(n),
                description: String::new(),
                schedule: Schedule {
                    cadence: Cadence::Hourly {
                        start_unix_ns: 0,
                        hours,
                    },
                    retention_secs: 3600,
                },
            }))
        }),
        1 => (project.clone(), name.clone()).prop_map(|(p, n)| Command::Schedule(
            ScheduleCommand::DeleteResourcePolicy {
                project: p.clone(),
                uuid: policy_uuid(&p, &n),
                if_match: None,
            }
        )),
        3 => (project.clone(), name.clone()).prop_map(|(p, n)| Command::Schedule(
            ScheduleCommand::FireResourcePolicy {
                uuid: policy_uuid(&p, &n),
                clock_scale: FIRE_CLOCK_SCALE,
            }
        )),
        1 => (project, name).prop_map(
            |(p, id)| Command::Credential(CredCommand::CreateCredential {
                project: p,
                id,
                kind: CredentialType::Rs256PubKey,
                payload_pem: "PEM".into(),
            })
        ),
    ]
}

/// Placeholder id of policy `name` in `project`, resolved against the live state at submit
/// time (see [`resolve`]): ids are minted by `decide`, so the generator cannot know them.
fn policy_uuid(project: &str, name: &str) -> uuid::Uuid {
    let mut bytes = [0u8; 16];
    for (i, b) in format!("{project}/{name}").bytes().enumerate() {
        bytes[i % 16] ^= b;
    }
    uuid::Uuid::from_bytes(bytes)
}

/// Replaces a placeholder policy id with the id of the policy it names, if there is one.
fn resolve(bus: &Bus, c: Command) -> Command {
    let state = bus.state();
    let real = |placeholder: uuid::Uuid| {
        state
            .resource_policies
            .by_uuid
            .values()
            .find(|p| policy_uuid(&p.project, &p.name) == placeholder)
            .map_or(placeholder, |p| p.uuid)
    };
    match c {
        Command::Schedule(ScheduleCommand::DeleteResourcePolicy {
            project,
            uuid,
            if_match,
        }) => Command::Schedule(ScheduleCommand::DeleteResourcePolicy {
            project,
            uuid: real(uuid),
            if_match,
        }),
        Command::Schedule(ScheduleCommand::FireResourcePolicy { uuid, clock_scale }) => {
            Command::Schedule(ScheduleCommand::FireResourcePolicy {
                uuid: real(uuid),
                clock_scale,
            })
        }
        other => other,
    }
}

async fn settle(bus: &Bus) {
    // What the reconciler would do: finish every pending create and delete, take snapshots,
    // fire due schedules (at the property's clock scale).
    let pending: Vec<Command> = {
        let s = bus.state();
        let snapshots = s
            .snapshots
            .by_uuid
            .values()
            .filter(|x| x.state == evstor_control::domain::snapshot::SnapshotState::Creating)
            .map(|x| {
                Command::Snapshot(SnapshotCommand::MarkSnapshotAvailable {
                    uuid: x.uuid,
                    holders: vec![x.node_uuid],
                })
            });
        let fires = schedule::due_fires(&s, now_unix_ns(), FIRE_CLOCK_SCALE)
            .0
            .into_iter()
            .map(|uuid| {
                Command::Schedule(ScheduleCommand::FireResourcePolicy {
                    uuid,
                    clock_scale: FIRE_CLOCK_SCALE,
                })
            });
        let mut all: Vec<Command> = snapshots.chain(fires).collect();
        all.extend(s.volumes.by_uuid.values().filter_map(|v| match v.state {
            evstor_control::domain::volume::VolumeState::Creating => {
                Some(Command::Volume(VolumeCommand::MarkVolumeAvailable {
                    uuid: v.uuid,
                }))
            }
            evstor_control::domain::volume::VolumeState::Deleting => {
                Some(Command::Volume(VolumeCommand::FinishVolumeDeletion {
                    uuid: v.uuid,
                }))
            }
            _ => None,
        }));
        all
    };
    for c in pending {
        bus.submit(RequestMeta::system("test"), c).await.unwrap();
    }
}

async fn bootstrap(bus: &Bus) {
    let boot = Bootstrap {
        hostname: "h".into(),
        api_endpoint: API.into(),
        nvme_endpoint: "127.0.0.1:2".into(),
        devices: vec![Device::backing_file("d0", "/d0", 1 << 40)],
        root_public_key_pem: "PEM".into(),
        server_uuid: Some(SERVER),
        failure_domain: String::new(),
    };
    bus.submit(
        RequestMeta::system("t"),
        Command::Cluster(ClusterCommand::Bootstrap(boot)),
    )
    .await
    .unwrap();
}

fn run_case(commands: Vec<Command>, settle_every: usize) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let journal = Arc::new(RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap());
    let live = rt.block_on(async {
        let bus = Bus::start(journal.clone()).unwrap();
        bootstrap(&bus).await;
        // Submit concurrently in small groups so group commit batches several commands.
        for (i, chunk) in commands.chunks(4).enumerate() {
            let tasks: Vec<_> = chunk
                .iter()
                .cloned()
                .map(|c| resolve(&bus, c))
                .map(|c| {
                    let bus = bus.clone();
                    tokio::spawn(async move { bus.submit(RequestMeta::system("t"), c).await })
                })
                .collect();
            for t in tasks {
                let _ = t.await.unwrap(); // refusals are part of the property
            }
            if settle_every > 0 && i % settle_every == 0 {
                settle(&bus).await;
            }
        }
        let live = bus.state().clone();
        live
    });
    check_replay(&journal, &live);
}

/// Replaying `journal` gives `live`, and its stored rows equal `live`'s.
fn check_replay(journal: &Arc<RocksJournal>, live: &evstor_control::domain::State) {
    // The writer thread lets go of the journal once every bus handle is gone. Wait for it:
    // a RocksDB still open in a detached thread when the test process exits is closed during
    // the C++ static destructors, and that crashes the process (seen as SIGSEGV after every
    // test had passed).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while Arc::strong_count(journal) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the journal writer never stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut nsids: Vec<u32> = live.volumes.by_uuid.values().map(|v| v.nsid).collect();
    let count = nsids.len();
    nsids.sort_unstable();
    nsids.dedup();
    assert_eq!(nsids.len(), count, "two live volumes share a namespace id");
    let (replayed, _) = replay(journal, Until::All).unwrap();
    assert_eq!(&replayed, live, "replay differs from the live state");
    let loaded = rows::load(journal).unwrap();
    assert_eq!(
        rows::all(&loaded),
        rows::all(live),
        "stored projections differ from live"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn replayed_projections_equal_live_projections(
        commands in prop::collection::vec(arb_command(), 1..48),
        settle_every in 0usize..3,
    ) {
        run_case(commands, settle_every);
    }
}

/// One fixed case that surely creates a row of every new kind (the random cases may not).
#[test]
fn federation_endpoint_and_root_key_rows_equal_live() {
    let commands = vec![
        Command::Federation(FedCommand::CreateIdpConfiguration {
            name: "a".into(),
            issuer_url: "https://a.idp.example".into(),
            kind: IdpType::Unknown,
            proxy_url: String::new(),
        }),
        Command::Federation(FedCommand::CreateIdpClientConf {
            name: "c".into(),
            client_id: "client-c".into(),
            idp: "a".into(),
            claim_name: "groups".into(),
            mode: AuthzMode::User,
        }),
        Command::Federation(FedCommand::PutAuthMapEntry {
            name: "m".into(),
            identifier: "ops".into(),
            scope: "default".into(),
            role: "viewer".into(),
            idp: "a".into(),
            update: false,
        }),
        Command::Federation(FedCommand::EnableFederatedAuthentication),
        Command::Endpoint(EndpointCommand::CreateAdminEndpoint {
            server: SERVER,
            default: API.parse().expect("addr"),
            port: 9443,
            ips: vec!["127.0.0.1".into()],
        }),
        Command::Credential(CredCommand::RotateRootKey {
            payload_pem: "K1".into(),
        }),
    ];
    run_case(commands, 0);
}

const LEADER_EPOCH: u64 = 7;

/// What the leader and the agents would order next for running evictions: moves, rebuild
/// progress and rebuilt replicas (the agents), hand-overs and their releases, completions.
fn eviction_steps(s: &evstor_control::domain::State, moves: bool) -> Vec<Command> {
    let mut out = Vec::new();
    for server in s.inventory.servers.values().filter(|x| x.evicting()) {
        let plan = eviction::plan(s, server.uuid);
        if plan.remaining == 0 {
            out.push(Command::Inventory(InvCommand::CompleteEviction {
                uuid: server.uuid,
                leader_epoch: LEADER_EPOCH,
            }));
        }
        out.extend(plan.moves.into_iter().filter(|_| moves).map(|m| {
            Command::Volume(VolumeCommand::MoveReplica {
                uuid: m.volume,
                from: m.from,
                to: m.to,
                leader_epoch: LEADER_EPOCH,
            })
        }));
    }
    for v in s.volumes.by_uuid.values() {
        out.extend(v.out_of_sync.iter().map(|n| {
            Command::Volume(VolumeCommand::RecordRebuildProgress {
                uuid: v.uuid,
                node: *n,
                epoch: v.epoch,
                percent: 50,
            })
        }));
        out.extend(v.out_of_sync.iter().map(|n| {
            Command::Volume(VolumeCommand::MarkReplicaInSync {
                uuid: v.uuid,
                node: *n,
                epoch: v.epoch,
                copied_bytes: v.size_bytes,
                // The volume's snapshots the replica lacks were copied to it first.
                snapshots: s
                    .snapshots
                    .by_uuid
                    .values()
                    .filter(|snap| snap.source_volume == v.uuid && !snap.holders.contains(n))
                    .map(|snap| snap.uuid)
                    .collect(),
            })
        }));
        if let Some((node, planned)) = failover_target(s, v) {
            out.push(Command::Volume(VolumeCommand::PromoteReplica {
                uuid: v.uuid,
                node,
                leader_epoch: LEADER_EPOCH,
                planned,
            }));
        }
        if let Some(node) = v.releasing {
            out.push(Command::Volume(VolumeCommand::ReleasePrimary {
                uuid: v.uuid,
                node,
            }));
        }
    }
    out
}

async fn submit_all(bus: &Bus, commands: Vec<Command>) {
    for c in commands {
        let _ = bus.submit(RequestMeta::system("t"), c).await; // races are refusals
    }
}

/// Runs evictions until nothing is left to order.
async fn drive(bus: &Bus) {
    for _ in 0..32 {
        let steps = eviction_steps(&bus.state(), true);
        if steps.is_empty() {
            return;
        }
        submit_all(bus, steps).await;
    }
    panic!("the evictions never settled");
}

/// One fixed case with a cluster's eviction events: servers join, a volume of two copies
/// and one of one are evicted from their servers (replica moves, a primary's move by
/// hand-over), a completed eviction, and an aborted one; replay and rows equal live.
#[test]
fn eviction_and_replica_move_rows_equal_live() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let journal = Arc::new(RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap());
    let live = rt.block_on(async {
        let bus = Bus::start(journal.clone()).unwrap();
        bootstrap(&bus).await;
        let mut setup = Vec::new();
        for (n, fd) in [(2u128, "rack-a"), (3, "rack-b"), (4, "rack-b")] {
            setup.push(Command::Inventory(InvCommand::JoinServer(Join {
                server_uuid: uuid::Uuid::from_u128(n),
                name: format!("s{n}"),
                api_endpoint: format!("127.0.0.1:{n}"),
                nvme_endpoint: format!("127.0.0.1:{}", n + 100),
                failure_domain: fd.into(),
                devices: vec![Device::backing_file(&format!("d{n}"), "/d0", 1 << 40)],
            })));
        }
        setup.push(Command::Cluster(ClusterCommand::RecordLeader {
            server_uuid: SERVER,
            epoch: LEADER_EPOCH,
        }));
        for (name, copies) in [("two", 2), ("one", 1)] {
            setup.push(Command::Volume(VolumeCommand::CreateVolume(NewVolume {
                project: "default".into(),
                name: name.into(),
                size_bytes: 1 << 30,
                acl: vec!["ALLOW_ANY".into()],
                ip_acl: None,
                compression: false,
                replica_count: copies,
                sector_size: 0,
                source_snapshot: None,
                qos: None,
                labels: vec![],
            })));
        }
        for c in setup {
            bus.submit(RequestMeta::system("t"), c).await.unwrap();
        }
        settle(&bus).await;
        // Evict the server of "two"'s replica, then the one holding "one" now.
        let holder = |name: &str, replica: bool| {
            let s = bus.state();
            let v = s.volumes.by_name("default", name).unwrap();
            let node = if replica {
                v.replica_nodes[0]
            } else {
                v.node_uuid
            };
            s.inventory.server_of(node).unwrap().uuid
        };
        for server in [holder("two", true), holder("one", false)] {
            let cmd = Command::Inventory(InvCommand::DisableServer {
                uuid: server,
                if_match: None,
                force: false,
                evict: true,
            });
            bus.submit(RequestMeta::system("t"), cmd).await.unwrap();
            drive(&bus).await;
            let s = bus.state();
            let e = s.inventory.servers[&server].eviction.clone().unwrap();
            assert_eq!(e.status, eviction::EvictionStatus::Completed);
            assert!(eviction::copies_on(&s, &eviction::nodes_of(&s, server))
                .next()
                .is_none());
        }
        // Another eviction, aborted with its moves ordered but not rebuilt.
        let server = holder("two", false);
        let disable = Command::Inventory(InvCommand::DisableServer {
            uuid: server,
            if_match: None,
            force: true,
            evict: true,
        });
        submit_all(&bus, vec![disable]).await;
        let moves: Vec<Command> = eviction_steps(&bus.state(), true)
            .into_iter()
            .filter(|c| matches!(c, Command::Volume(VolumeCommand::MoveReplica { .. })))
            .collect();
        assert!(!moves.is_empty(), "a move to abort");
        submit_all(&bus, moves).await;
        let enable = Command::Inventory(InvCommand::EnableServer {
            uuid: server,
            if_match: None,
        });
        bus.submit(RequestMeta::system("t"), enable).await.unwrap();
        let s = bus.state();
        let e = s.inventory.servers[&server].eviction.clone().unwrap();
        assert_eq!(e.status, eviction::EvictionStatus::Aborted);
        assert!(s.volumes.by_uuid.values().all(|v| v.replacing.is_empty()));
        s.clone()
    });
    check_replay(&journal, &live);
}
