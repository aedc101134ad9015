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
//! | `conn` | one connection = one queue pair = one thread: handshake, poll loop, R2T, C2HData |
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
//! | [`initiator`] | a minimal synchronous host for tests, benches and tools; not a production initiator |
//!
//! # Threading model (and its limits)
//!
//! Each TCP connection is served by its own OS thread with a blocking socket and
//! its own io_uring (falling back to synchronous `pread`/`pwrite` where io_uring
//! is unavailable, and running inline for memory-backed files, where io_uring would
//! only bounce each operation through a worker thread). The thread polls the socket,
//! the ring itself and a notifier eventfd; storage I/O for all of a queue's commands
//! is in flight concurrently, so queue depth is honoured per queue. This is simple and isolates connections
//! (a bad PDU ends only its own thread), at the price of one thread per queue pair:
//! `max_connections` plus `max_discovery_connections` bound the thread count, and
//! throughput per queue is bounded by one core. The admission policy ([`admission`])
//! and the buffer pool ([`pool`]) know nothing of this threading model: a reactor
//! engine owning many connections per thread would use them unchanged. The PDUs one pass of the loop produces are sent together with one
//! blocking `writev` (bounded by `SEND_TIMEOUT_MS`) before the thread sleeps.
//!
//! Memory per connection is one receive buffer (`RX_BUF_BYTES`), one send batch
//! (`TX_BATCH_HDR_BYTES`) and a small reserve data buffer, allocated at Connect. Data
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
//! from the receive buffer into the data buffer; C2H data is sent straight from it.
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
pub use config::{default_reactors, Acl, Backing, ConnectedHost, NamespaceSpec, TargetConfig};
pub use device::{probe, DeviceInfo, DeviceKind};
pub use error::DatapathError;
pub use qos::QosLimits;
pub use target::{start, TargetHandle};
