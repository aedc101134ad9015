//! The control plane's view of the target: listener configuration, namespaces and ACLs.
//!
//! These types are the seam the control plane calls through; they carry no behaviour
//! beyond ACL matching, so the control plane can build them without knowing NVMe.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::blockstore::BlockStore;
use crate::replica::Member;

use crate::admission::Caps;
use crate::limits::{
    DEFAULT_BUFFER_POOL_BYTES, DEFAULT_FD_RESERVE, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_ADDR, DEFAULT_MAX_CONNECTIONS_PER_HOST,
    DEFAULT_MAX_CONTROLLERS_PER_ADDR, DEFAULT_MAX_CONTROLLERS_PER_HOST,
    DEFAULT_MAX_DISCOVERY_CONNECTIONS, FDS_PER_CONNECTION, FDS_PER_REACTOR, HANDSHAKE_TIMEOUT_MS,
    MAX_REACTORS, NO_NAMESPACE_KATO_MS,
};
use crate::qos::QosLimits;

/// Listener and subsystem configuration for [`crate::start`].
///
/// The admission fields bound what one peer can hold; `datapath/src/admission.rs`
/// explains the policy they feed.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// I/O listener (also serves the discovery controller). Port 0 picks a free port.
    pub nvme_addr: SocketAddr,
    /// Dedicated discovery listener (conventionally port 8009), if any.
    pub discovery_addr: Option<SocketAddr>,
    /// NQN of the one NVM subsystem the target exposes.
    pub subsystem_nqn: String,
    /// Connections (queue pairs) the I/O port serves at once; when full, a new one
    /// reclaims the oldest handshake or controller that sees no namespace on it, or is
    /// refused at accept.
    pub max_connections: usize,
    /// Connections the discovery port serves at once (a separate budget).
    pub max_discovery_connections: usize,
    /// Connections one host NQN may hold.
    pub max_connections_per_host: usize,
    /// Controllers one host NQN may hold.
    pub max_controllers_per_host: usize,
    /// Connections one source address may hold (handshakes included).
    pub max_connections_per_addr: usize,
    /// Controllers one source address may hold.
    pub max_controllers_per_addr: usize,
    /// Time from accept by which ICReq and Connect must both have arrived.
    pub handshake_timeout: Duration,
    /// Ceiling on the keep-alive timeout (ms) of controllers that see no namespace; their
    /// KATO 0 means this.
    pub no_namespace_kato_ms: u32,
    /// Descriptors kept free below RLIMIT_NOFILE when admitting a connection.
    pub fd_reserve: usize,
    /// Total bytes of the shared data buffer pool.
    pub buffer_pool_bytes: usize,
    /// Reactor threads serving connections (0 = automatic: [`default_reactors`] of the
    /// CPUs the process may run on, unpinned). Each owns many connections and one io_uring.
    /// A count given here pins reactor `i` to the `i`-th CPU the process may use.
    pub reactors: usize,
    /// Controller IDs this target hands out (a cluster gives each server its own range: a
    /// Linux host rejects two controllers of one subsystem with the same ID).
    pub cntlids: std::ops::RangeInclusive<u16>,
}

/// Reactors for `cpus` usable CPUs when none are configured: half of them, at least one.
/// The data path shares the machine with the kernel's network stack (whose receive
/// processing runs on the sending side's CPU for loopback, and in softirq otherwise), the
/// control plane and RocksDB's background threads; a reactor that busy-polls a CPU of its
/// own serves more than two that share one. A 2-CPU machine gets one reactor.
pub fn default_reactors(cpus: usize) -> usize {
    (cpus / 2).clamp(1, MAX_REACTORS)
}

impl TargetConfig {
    /// A configuration with default limits and identity strings.
    pub fn new(nvme_addr: SocketAddr, subsystem_nqn: impl Into<String>) -> TargetConfig {
        TargetConfig {
            nvme_addr,
            discovery_addr: None,
            subsystem_nqn: subsystem_nqn.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_discovery_connections: DEFAULT_MAX_DISCOVERY_CONNECTIONS,
            max_connections_per_host: DEFAULT_MAX_CONNECTIONS_PER_HOST,
            max_controllers_per_host: DEFAULT_MAX_CONTROLLERS_PER_HOST,
            max_connections_per_addr: DEFAULT_MAX_CONNECTIONS_PER_ADDR,
            max_controllers_per_addr: DEFAULT_MAX_CONTROLLERS_PER_ADDR,
            handshake_timeout: Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
            no_namespace_kato_ms: NO_NAMESPACE_KATO_MS,
            fd_reserve: DEFAULT_FD_RESERVE,
            buffer_pool_bytes: DEFAULT_BUFFER_POOL_BYTES,
            reactors: 0,
            cntlids: 1..=crate::limits::MAX_CNTLID,
        }
    }

    /// The reactors this configuration asks for, given `cpus` usable CPUs.
    pub fn reactor_count(&self, cpus: usize) -> usize {
        if self.reactors == 0 {
            default_reactors(cpus)
        } else {
            self.reactors
        }
    }

    /// File descriptors the data path may need at its limits: every connection of both
    /// ports plus the reserve it keeps free. A process sharing the descriptor table (the
    /// API server of `evstor serve`) can size its own limits from what RLIMIT_NOFILE leaves.
    pub fn fd_budget(&self) -> usize {
        (self.max_connections + self.max_discovery_connections) * FDS_PER_CONNECTION
            + self.reactor_count(crate::reactor::allowed_cpus().len()) * FDS_PER_REACTOR
            + self.fd_reserve
    }

    /// The admission limits, as the policy takes them.
    pub fn caps(&self) -> Caps {
        Caps {
            io_connections: self.max_connections,
            discovery_connections: self.max_discovery_connections,
            connections_per_host: self.max_connections_per_host,
            controllers_per_host: self.max_controllers_per_host,
            connections_per_addr: self.max_connections_per_addr,
            controllers_per_addr: self.max_controllers_per_addr,
            fd_reserve: self.fd_reserve,
        }
    }

    /// Identify Controller serial number: stable per subsystem NQN (20 ASCII bytes max).
    pub fn serial(&self) -> String {
        format!("EVS{:08X}", crc32c::crc32c(self.subsystem_nqn.as_bytes()))
    }
}

/// Identify Controller model number.
pub const MODEL: &str = "evstor NVMe/TCP";

impl Default for TargetConfig {
    /// All interfaces on the well-known ports: I/O on 4420, discovery on 8009.
    fn default() -> TargetConfig {
        let any = std::net::Ipv4Addr::UNSPECIFIED;
        TargetConfig {
            discovery_addr: Some(SocketAddr::from((any, 8009))),
            ..TargetConfig::new(
                SocketAddr::from((any, 4420)),
                "nqn.2024-01.io.evstor:subsystem",
            )
        }
    }
}

/// Who may see a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acl {
    /// Everyone.
    AllowAny,
    /// No one.
    AllowNone,
    /// Exactly these host NQNs (host ACL) or IP address strings (IP ACL).
    List(Vec<String>),
}

impl Acl {
    /// Whether the host NQN is admitted.
    pub fn admits_host(&self, host_nqn: &str) -> bool {
        match self {
            Acl::AllowAny => true,
            Acl::AllowNone => false,
            Acl::List(l) => l.iter().any(|h| h == host_nqn),
        }
    }

    /// Whether the source address is admitted (entries that do not parse never match).
    pub fn admits_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match self {
            Acl::AllowAny => true,
            Acl::AllowNone => false,
            Acl::List(l) => l
                .iter()
                .filter_map(|s| s.trim().parse::<IpAddr>().ok())
                .any(|a| canonical_ip(a) == ip),
        }
    }
}

/// IPv4-mapped IPv6 addresses compare equal to their IPv4 form.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// One namespace (volume) as the control plane publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSpec {
    /// Namespace ID, 1..=limits::MAX_NAMESPACES.
    pub nsid: u32,
    /// Volume UUID; also the namespace UUID, and the source of its NGUID.
    pub uuid: [u8; 16],
    /// Capacity in bytes (rounded down to whole 4 KiB blocks).
    pub size_bytes: u64,
    /// Where the blocks live.
    pub backing: Backing,
    /// Host NQNs admitted.
    pub host_acl: Acl,
    /// Source IPs admitted.
    pub ip_acl: Acl,
    /// Absolute I/O limits (`QosLimits::default()` is unlimited). A new value for a live
    /// namespace applies to its connections at once, without reconnecting.
    pub qos: QosLimits,
    /// Its ANA group and state on this target (a change notifies hosts).
    pub ana: Ana,
}

/// A namespace's Asymmetric Namespace Access on this target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ana {
    /// ANA group ID, 1..=[`ANA_GROUPS_MAX`](crate::limits::ANA_GROUPS_MAX).
    pub group: u32,
    /// Optimized (this target serves its I/O) or Inaccessible (I/O is refused with a path
    /// error, so a multipath host uses another controller).
    pub optimized: bool,
}

impl Default for Ana {
    fn default() -> Ana {
        Ana {
            group: 1,
            optimized: true,
        }
    }
}

impl NamespaceSpec {
    /// Whether a host with this NQN connecting from `ip` sees the namespace.
    pub fn visible_to(&self, host_nqn: &str, ip: IpAddr) -> bool {
        self.host_acl.admits_host(host_nqn) && self.ip_acl.admits_ip(ip)
    }
}

/// Storage behind a namespace.
#[derive(Debug, Clone)]
pub enum Backing {
    /// One file (or block device) per namespace; created sparse with the size if missing.
    File(PathBuf),
    /// The image of the same UUID in a block store.
    Image {
        /// The node's block store.
        store: Arc<BlockStore>,
        /// Whether new writes are lz4-compressed.
        compress: bool,
        /// Set on the primary of a replicated volume: the replicas every change goes to.
        replication: Option<Replication>,
    },
}

/// The in-sync replicas of a volume and the epoch its writes carry.
#[derive(Debug, Clone)]
pub struct Replication {
    /// The volume's epoch (the primary's term); replicas refuse older ones.
    pub epoch: u64,
    /// The in-sync replicas (kept by the control plane across publications, so a replica
    /// that leaves the set can be told: [`Member::drop_replica`]).
    pub members: Vec<Arc<Member>>,
}

impl PartialEq for Replication {
    fn eq(&self, other: &Replication) -> bool {
        self.epoch == other.epoch
            && self.members.len() == other.members.len()
            && self
                .members
                .iter()
                .zip(&other.members)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl Eq for Replication {}

impl PartialEq for Backing {
    fn eq(&self, other: &Backing) -> bool {
        match (self, other) {
            (Backing::File(a), Backing::File(b)) => a == b,
            (
                Backing::Image {
                    store,
                    compress,
                    replication,
                },
                Backing::Image {
                    store: s2,
                    compress: c2,
                    replication: r2,
                },
            ) => Arc::ptr_eq(store, s2) && compress == c2 && replication == r2,
            _ => false,
        }
    }
}

impl Eq for Backing {}

/// A live controller session, for the connectedHosts API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedHost {
    /// Host NQN from Connect.
    pub host_nqn: String,
    /// Host identifier from Connect.
    pub host_id: [u8; 16],
    /// Remote address of the admin queue's connection.
    pub remote_addr: SocketAddr,
    /// Controller ID the target assigned.
    pub cntlid: u16,
    /// I/O queues currently connected.
    pub io_queues: usize,
    /// Namespaces this host currently sees.
    pub nsids: Vec<u32>,
}
