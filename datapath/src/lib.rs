//! evstor's NVMe/TCP target: the data path that Linux hosts reach with the stock
//! kernel initiator, `nvme-cli` and fio.
//!
//! # Layout
//!
//! | module | role |
//! |---|---|
//! | [`limits`] | every bound (connections, queue depth, PDU and data sizes, timeouts, pool bytes) |
//! | [`admission`] | who may hold what: the pure admission and capacity policy over a ledger |
//! | [`pool`] | the shared, bounded pool of page-aligned data buffers and its FIFO of waiters |
//! | [`buffer`] | lazily faulted page-aligned memory ([`buffer::Region`], [`buffer::SlotBuf`]) |
//! | [`nqn`] | the NQN validator (Connect fields, configuration, ACL entries) |
//! | [`backoff`] | exponential backoff and a rate-limited log line for failing loops |
//! | [`pdu`] | NVMe/TCP PDU codec: cheap `check`, full `parse`, header/data digests (CRC32C) |
//! | [`nvme`] | NVMe vocabulary: opcodes, status codes, SQE accessors, CQE encoding |
//! | [`pages`] | Identify structures and log pages (pure builders) |
//! | `reactor` | the threads serving connections: one io_uring each for sockets and storage, busy-poll then sleep |
//! | `conn` | one connection as its reactor holds it: handshake, receive stream into the queue, what to send, closing |
//! | `queue` | one connected queue pair as a pure state machine: PDUs, completions, grants, time in; storage requests and PDUs out |
//! | `rx` | a connection's byte stream (chunks of any size) back into PDUs; H2C data streamed to its command's buffer |
//! | `tx` | a queue's double-buffered send batches: headers in a small area, C2H data by reference to command buffers |
//! | `notify` | reactor mailboxes (eventfd) and the queue notifiers the pool and controllers wake |
//! | `fabrics` | Connect, Property Get/Set, controller attach/detach |
//! | `admin` / `io` | admin and NVM command handlers |
//! | `ctrl` | controller state, keep-alive, AEN queueing, registry |
//! | `ns` | published namespace table (ACL-filtered per host) |
//! | [`qos`] | per-namespace token buckets (IOPS and bytes per second, read and write) |
//! | [`backend`] | the [`Backend`] trait and the io_uring file backend |
//! | [`device`] | what a backing path is: file, block device or NVMe controller; size and identity |
//! | [`blockstore`] | extent-mapped thin volumes: snapshots, clones, rollback, diff, lz4, per-block CRC32C |
//! | [`filecopy`] | whole-file reflink or sparse copies (snapshots, clones, rollback of file volumes) |
//! | `target` | listeners, `start`, [`TargetHandle`] |
//! | [`initiator`] | the crate's own NVMe/TCP host: pipelined queues (several per session, digests) under blocking calls, for tests, benches and tools; not a production initiator |
//!
//! # Threading model
//!
//! A target runs `TargetConfig::reactors` reactor threads (`reactor`;
//! default: half the CPUs the process may use, at least one; `evstor serve
//! --datapath-cores N` gives N, pinned) plus one acceptor per port. The acceptor admits a
//! connection and hands it to the reactor holding the fewest; the reactor owns it until it
//! ends. Each reactor drives the sockets and the storage of all its connections through one
//! io_uring: multishot receives into a ring of provided buffers, one `sendmsg` per
//! connection per pass, the backends' reads and writes. A command runs to completion in
//! the pass that brings its last input (a read on a memory-backed volume is received,
//! executed and answered without leaving the loop). When a pass finds nothing to do the
//! reactor busy-polls for an adaptive, bounded window (`limits::BUSY_POLL_US_MAX`) and then
//! sleeps in the kernel until a completion, a mail or the next deadline: an idle target
//! costs no CPU. The thread count does not grow with connections; `max_connections` bounds
//! sockets and memory, not threads. A bad PDU still ends only its own connection.
//!
//! Each connection's protocol state is a pure state machine (`queue::Queue`: PDUs,
//! storage completions, buffer grants and time in; storage requests and PDUs out), unit
//! tested without sockets; the reactor only moves bytes and completions. A command counts
//! its outstanding parts and completes when all reported, so a write can also wait for
//! remote (replica) completions later without a thread per I/O.
//!
//! Memory per connection is a socket, its command slots and two send batches sized from
//! its queue depth at Connect, a small reserve data buffer, and a carry buffer
//! (`RX_CARRY_BYTES`) only once a PDU straddles two receives. Data
//! buffers come from one pool per target ([`pool`], `TargetConfig::buffer_pool_bytes`):
//! a command borrows a page-aligned buffer sized to its transfer while it moves data (a
//! write from its R2T, a read from the moment it reaches the backend) and gives it back
//! once its completion is sent, so memory follows what is in flight, not queue depth. A
//! command that finds the pool exhausted waits in the pool's FIFO holding nothing and is
//! resumed, in arrival order, when a buffer is granted to it. In-capsule data, which has
//! already arrived, falls back on the queue's reserve; the admin queue's reserve is one
//! maximal buffer, so Identify and log pages always progress. A queue may have only its
//! share of R2T data outstanding (`limits::R2T_POOL_SHARE_DIVISOR`), so hosts that never
//! send the data they were asked for cannot drain the pool. H2C data is copied once
//! from the provided receive buffer into the data buffer; C2H data is sent straight from
//! it.
//!
//! # Admission (and why)
//!
//! Any peer that reaches a port can connect and create controllers, so what one peer may
//! hold is bounded ([`admission`] has the policy and its reasons): the I/O and discovery
//! ports have separate connection budgets; one source address and one host NQN each hold
//! a bounded share of connections and controllers; the ICReq and the Connect must arrive
//! within one deadline from accept (`TargetConfig::handshake_timeout`); a controller that
//! sees no namespace (every discovery controller, any host no ACL admits) is held to a
//! keep-alive timeout of at most `no_namespace_kato_ms` (120 s), KATO 0 included, however
//! it was set; when a port is full, a new connection reclaims the oldest connection on it
//! still in its handshake, else its oldest such controller; and a connection is admitted only while `fd_reserve` descriptors stay free below
//! RLIMIT_NOFILE. A controller that sees a namespace keeps the KATO it asked for (0 = no
//! timer) and is never reclaimed. The accept loop backs off exponentially when accept
//! fails (EMFILE, ENFILE...) and logs at most once per second.
//!
//! The control plane only calls [`TargetHandle`] methods; it publishes whole
//! namespace tables and the data path never calls back or waits on it.
//!
//! Architecture invariant: this crate knows nothing about volumes, the journal or
//! HTTP; it sees namespaces, host NQNs and IP addresses.
//!
//! # Example
//!
//! ```
//! use evstor_datapath::{start, Acl, Backing, NamespaceSpec, QosLimits, TargetConfig};
//!
//! let dir = std::env::temp_dir().join(format!("evstor-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let mut cfg = TargetConfig::new("127.0.0.1:0".parse()?, "nqn.2024-01.io.evstor:doc");
//! cfg.discovery_addr = Some("127.0.0.1:0".parse()?);
//! let volume = NamespaceSpec {
//!     nsid: 1,
//!     uuid: [0x11; 16],
//!     size_bytes: 64 << 20,
//!     backing: Backing::File(dir.join("vol1.img")), // created sparse if missing
//!     host_acl: Acl::List(vec!["nqn.2014-08.org.nvmexpress:uuid:host-a".into()]),
//!     ip_acl: Acl::AllowAny,
//!     qos: QosLimits::default(), // unlimited
//!     ana: Default::default(),   // optimized, group 1
//! };
//! let target = start(cfg, vec![volume.clone()])?;
//! println!("I/O on {}, discovery on {:?}", target.local_addr(), target.discovery_addr());
//! // Later: publish a new table; live controllers get an AEN and a changed-namespace log.
//! target.set_namespaces(vec![NamespaceSpec { host_acl: Acl::AllowAny, ..volume }]);
//! assert!(target.connected_hosts().is_empty());
//! target.shutdown();
//! std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod admission;
pub mod backend;
pub mod backoff;
pub mod blockstore;
pub mod buffer;
pub mod config;
pub mod device;
pub mod error;
pub mod filecopy;
pub mod initiator;
pub mod limits;
pub mod nqn;
pub mod nvme;
pub mod pages;
pub mod pdu;
pub mod pool;
pub mod qos;
pub mod replica;

mod admin;
mod conn;
mod ctrl;
mod fabrics;
mod io;
mod notify;
mod ns;
mod queue;
mod reactor;
mod rx;
mod target;
mod tx;

pub use backend::{Backend, FileBackend, IoKind, IoQueue, IoRequest};
pub use config::{
    default_reactors, Acl, Ana, Backing, ConnectedHost, NamespaceSpec, Replication, TargetConfig,
};
pub use device::{probe, DeviceInfo, DeviceKind};
pub use error::DatapathError;
pub use qos::QosLimits;
pub use target::{start, TargetHandle};
