//! Named bounds for everything the target sizes, queues or waits on.
//!
//! Every buffer, queue and timeout in the crate derives from a constant here, so
//! the worst-case memory and thread footprint can be read off this one file:
//! per target `TargetConfig::reactors` threads (at most [`MAX_REACTORS`]) plus one acceptor
//! per port, whatever the number of connections; per reactor one io_uring
//! ([`REACTOR_SQ_ENTRIES`], [`REACTOR_CQ_ENTRIES`]) and one ring of provided receive
//! buffers ([`RECV_BUFS`] x [`RECV_BUF_BYTES`]); per connection a socket, a carry buffer
//! of [`RX_CARRY_BYTES`] (only once a PDU straddles two receives), two send batches sized
//! from its queue depth (a few dozen bytes of headers per command), its command slots, and
//! a reserve data buffer ([`IO_QUEUE_RESERVE_BYTES`], or [`ADMIN_QUEUE_RESERVE_BYTES`] for
//! an admin queue); per target one shared data buffer pool of
//! `TargetConfig::buffer_pool_bytes` ([`DEFAULT_BUFFER_POOL_BYTES`]) from which commands
//! borrow while they move data. Reserves, receive buffers and pool are anonymous
//! mappings: they cost resident memory only for the pages data has passed through, so an
//! idle queue costs next to nothing and all data buffers together stay below
//! `buffer_pool_bytes + connections * reserve` whatever the hosts do.

/// Default number of TCP connections (queue pairs) the I/O port serves at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;

/// Default number of connections the discovery port serves at once (its own budget:
/// filling it never refuses an I/O connection, nor the other way round).
pub const DEFAULT_MAX_DISCOVERY_CONNECTIONS: usize = 32;

/// Hard ceiling on `TargetConfig::max_connections` and `max_discovery_connections` (each
/// connection is a socket and its slots, on one of the reactors; connection indices in
/// ring tags are 16 bits).
pub const MAX_CONNECTIONS_CEILING: usize = 16_384;

/// Most reactor threads (`TargetConfig::reactors`, `evstor serve --datapath-cores`).
pub const MAX_REACTORS: usize = 64;

/// Default connections one host NQN may hold: two controllers with every I/O queue
/// (room for a reconnect while the old controller is still timing out).
pub const DEFAULT_MAX_CONNECTIONS_PER_HOST: usize = 2 * (1 + MAX_IO_QUEUES_PER_CTRL as usize);

/// Default controllers one host NQN may hold (I/O and discovery controllers together).
pub const DEFAULT_MAX_CONTROLLERS_PER_HOST: usize = 8;

/// Default connections one source address may hold, handshakes included.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDR: usize = 64;

/// Default controllers one source address may hold.
pub const DEFAULT_MAX_CONTROLLERS_PER_ADDR: usize = 16;

/// Descriptors one connection needs: its socket (rings and wake-ups belong to reactors).
pub const FDS_PER_CONNECTION: usize = 1;

/// Descriptors one reactor needs: its io_uring and its wake-up eventfd.
pub const FDS_PER_REACTOR: usize = 2;

/// Default descriptors kept free for the data path: a connection is admitted only while
/// the process stays this far below RLIMIT_NOFILE after it, so existing connections can
/// still open rings and namespace files.
pub const DEFAULT_FD_RESERVE: usize = 64;

/// First pause after a failed accept (EMFILE, ENFILE, ENOBUFS...); doubles per failure.
pub const ACCEPT_BACKOFF_MS_MIN: u64 = 10;

/// Longest pause between accept attempts while they keep failing.
pub const ACCEPT_BACKOFF_MS_MAX: u64 = 1_000;

/// A repeated accept failure or refusal is logged at most once per this period, with the
/// number of occurrences suppressed since the last line.
pub const ACCEPT_LOG_INTERVAL_MS: u64 = 1_000;

/// Default total bytes of the shared data buffer pool (see the module docs).
pub const DEFAULT_BUFFER_POOL_BYTES: usize = 256 << 20;

/// Smallest pool: one maximal transfer must fit.
pub const MIN_BUFFER_POOL_BYTES: usize = MAX_DATA_BYTES;

/// Largest pool `TargetConfig::buffer_pool_bytes` may ask for.
pub const MAX_BUFFER_POOL_BYTES: usize = 64 << 30;

/// Share of the buffer pool that data requested by R2T (held until the host sends it) may
/// take across all connections: each queue may have at most
/// `buffer_pool_bytes / (R2T_POOL_SHARE_DIVISOR * connections)` of R2T data outstanding
/// (never less than one maximal transfer), where connections is `max_connections +
/// max_discovery_connections`. A host that never answers its R2Ts can then pin at most
/// that much, so the rest of the pool keeps serving everyone else.
pub const R2T_POOL_SHARE_DIVISOR: usize = 2;

/// Private buffer of each I/O queue for in-capsule data that arrives while the pool is
/// exhausted (the data is already in the receive buffer and cannot wait in line).
pub const IO_QUEUE_RESERVE_BYTES: usize = IN_CAPSULE_DATA_BYTES;

/// Private buffer of each admin queue, so Identify and log pages always progress.
pub const ADMIN_QUEUE_RESERVE_BYTES: usize = ADMIN_MAX_DATA_BYTES;

/// I/O queues one controller may create (the answer to Set Features "number of queues").
pub const MAX_IO_QUEUES_PER_CTRL: u16 = 16;

/// Deepest submission queue the target accepts on any queue (CAP.MQES + 1 and MAXCMD).
pub const MAX_QUEUE_DEPTH: u16 = 128;

/// Smallest queue a Connect may ask for (SQSIZE is 0-based; the spec minimum is 2 entries).
pub const MIN_QUEUE_DEPTH: u16 = 2;

/// Logical block size exposed for every namespace: 4 KiB keeps O_DIRECT aligned on any device.
pub const LBA_SHIFT: u8 = 12;

/// Logical block size in bytes.
pub const LBA_BYTES: u64 = 1 << LBA_SHIFT;

/// Maximum data transfer size exponent (Identify Controller MDTS, units of 4 KiB pages):
/// 8 MiB, so a host's passthrough commands of several MiB fit. A queue pins nothing for it:
/// data buffers come from the shared pool per command, sized to the command.
pub const MDTS: u8 = 11;

/// Largest data transfer of one command, in bytes (derived from [`MDTS`]).
pub const MAX_DATA_BYTES: usize = 4096 << MDTS;

/// Largest data transfer of an admin command (Identify, log pages): what an admin queue's
/// private reserve holds. The ANA log of a full namespace table must fit: a host reads it
/// whole (Linux asks for header + groups + 4 bytes per namespace the controller may have).
pub const ADMIN_MAX_DATA_BYTES: usize = 512 * 1024;

/// Largest storage operation the queue hands a backend: a longer read or write is split
/// into parts of at most this (the command completes when all have), so the block store's
/// per-thread scratch does not grow with MDTS.
pub const BACKEND_IO_BYTES_MAX: usize = 128 * 1024;

/// Largest H2CData PDU payload the target accepts (advertised as MAXH2CDATA in ICResp).
pub const MAX_H2C_DATA_BYTES: u32 = 128 * 1024;

/// In-capsule data the target accepts on I/O queues (IOCCSZ = (64 + this) / 16).
pub const IN_CAPSULE_DATA_BYTES: usize = 8192;

/// In-capsule data the Linux host may send on the admin queue (its fixed 8 KiB admin capsule).
pub const ADMIN_IN_CAPSULE_DATA_BYTES: usize = 8192;

/// Largest header any PDU type carries (ICReq/ICResp are 128 bytes).
pub const MAX_HLEN: usize = 128;

/// Largest header plus header digest plus alignment padding the target emits or accepts.
pub const MAX_HDR_BYTES: usize = 256;

/// Largest PDU the target accepts from a host (header area + biggest payload + data digest).
pub const MAX_RX_PDU_BYTES: usize = MAX_HDR_BYTES + MAX_H2C_DATA_BYTES as usize + 4;

/// Largest PDU assembled in a connection's carry buffer when it straddles two receives: a
/// capsule with the most in-capsule data either queue accepts. H2C data streams to its
/// command's buffer instead, and a longer capsule ends the connection (data transfer
/// limit exceeded), as IOCCSZ forbids it.
pub const RX_CARRY_BYTES: usize = MAX_HDR_BYTES
    + if IN_CAPSULE_DATA_BYTES > ADMIN_IN_CAPSULE_DATA_BYTES {
        IN_CAPSULE_DATA_BYTES
    } else {
        ADMIN_IN_CAPSULE_DATA_BYTES
    }
    + 4;

/// Bytes of one provided receive buffer: what one receive completion can carry. Large
/// enough that a burst of 4 KiB in-capsule writes rarely straddles, small enough that the
/// ring's memory stays a few MiB.
pub const RECV_BUF_BYTES: usize = 32 * 1024;

/// Provided receive buffers per reactor (a power of two, at most 32768). A buffer is held
/// only while its completion is handled, then given back; when the ring runs dry, a
/// connection's multishot receive ends and is re-armed once buffers are back.
pub const RECV_BUFS: usize = 256;

/// Bytes of the offending PDU header echoed in a terminate request.
pub const MAX_TERM_DATA_BYTES: usize = 128;

/// Namespaces a subsystem may hold (Identify Controller NN and MNAN), and so the highest
/// nsid. Every volume of the cluster is one namespace of its one subsystem, so this is also
/// the cluster's volume limit: the control plane takes `VOLUMES_MAX` from here (one limit,
/// owned here, where it is enforced). Connections keep only the namespaces their host sees.
pub const MAX_NAMESPACES: u32 = 65_536;

/// Entries in the changed namespace list log page before it overflows to 0xFFFFFFFF.
pub const MAX_CHANGED_NS: usize = 1024;

/// Asynchronous Event Requests outstanding per controller (AERL + 1).
pub const MAX_OUTSTANDING_AERS: usize = 4;

/// Events queued for a controller while no AER is outstanding.
pub const MAX_PENDING_EVENTS: usize = 16;

/// Dataset Management ranges in one command (NR is 8 bits, 0-based).
pub const MAX_DSM_RANGES: usize = 256;

/// Default time from accept by which a new connection must have sent both its ICReq and
/// its Connect (one deadline for the whole handshake, not per read).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Longest a send to a host may stay in flight before the connection is dropped.
pub const SEND_TIMEOUT_MS: u64 = 30_000;

/// Upper bound on the acceptor's sleep, so shutdown is noticed promptly.
pub const POLL_INTERVAL_MS_MAX: u64 = 500;

/// A reactor checks every connection's deadlines (handshake, keep-alive, send timeout)
/// this often; it is also the longest it sleeps when nothing is due sooner.
pub const REACTOR_SWEEP_MS: u64 = 100;

/// Longest a reactor busy-polls its ring for more work before it sleeps in the kernel
/// (microseconds). The window adapts between 0 and this: it doubles when polling found
/// work and halves when it did not, so an idle reactor sleeps at once and uses no CPU.
pub const BUSY_POLL_US_MAX: u64 = 50;

/// Longest a reactor waits at shutdown for its connections' I/O to drain before it gives
/// up (leaking, never reusing, the buffers the kernel may still write).
pub const REACTOR_DRAIN_MS: u64 = 30_000;

/// Submission queue entries of a reactor's io_uring (sockets and storage of all its
/// connections; a full queue is submitted early, never dropped).
pub const REACTOR_SQ_ENTRIES: u32 = 1024;

/// Completion queue entries of a reactor's io_uring (the kernel also buffers overflow).
pub const REACTOR_CQ_ENTRIES: u32 = 8192;

/// QoS token buckets refill in steps of this many milliseconds (`rate / 1000` tokens per
/// millisecond, in fixed point). It is also the longest a connection sleeps while a
/// command waits for tokens, so a throttled namespace is served every millisecond.
pub const QOS_REFILL_MS: u64 = 1;

/// A QoS bucket holds at most this many milliseconds of tokens (but never less than one
/// command: one op, or `MAX_DATA_BYTES` for a byte bucket). Small, so an idle namespace
/// bursts at most 5% of a second above its limit; large enough that a host whose commands
/// come back in clumps (a busy host, a virtual machine descheduled for tens of milliseconds)
/// loses no tokens, so sustained load meets the limit. 5 ms lost ~8% of the rate to a
/// software-emulated guest in `tests/host_vm_data_services.rs`.
pub const QOS_BURST_MS: u64 = 50;

/// Keep Alive Timeout the target accepts from a host (60 minutes, in milliseconds).
pub const MAX_KATO_MS: u32 = 3_600_000;

/// Default ceiling on the effective keep-alive timeout of a controller that sees no
/// namespace (discovery controllers, hosts no ACL admits); KATO 0 means this for them.
/// Linux nvmet gives discovery controllers the same 120 s.
pub const NO_NAMESPACE_KATO_MS: u32 = 120_000;

/// Extra time beyond KATO before a silent controller is torn down (network jitter allowance).
pub const KATO_GRACE_MS: u64 = 1_000;

/// Pieces (iovecs) one `sendmsg` carries at most (IOV_MAX is 1024); a longer batch goes
/// out in several sends.
pub const TX_IOV_MAX: usize = 512;

/// Submission ring entries of a standalone [`crate::IoQueue`] (tests, tools).
pub const RING_ENTRIES: u32 = 256;

/// Maximum length of an NQN (including the terminating NUL in the wire field).
pub const NQN_BYTES: usize = 256;

/// Data of a Fabrics Connect command (host ID, controller ID, NQNs).
pub const CONNECT_CAPSULE_DATA_BYTES: usize = 1024;

/// Entries listed in the discovery log page (one per I/O listener).
pub const MAX_DISCOVERY_ENTRIES: usize = 16;

// The relations the code relies on, checked at compile time.
const _: () = assert!(IN_CAPSULE_DATA_BYTES <= MAX_H2C_DATA_BYTES as usize);
const _: () = assert!(ADMIN_IN_CAPSULE_DATA_BYTES <= MAX_H2C_DATA_BYTES as usize);
const _: () = assert!(IN_CAPSULE_DATA_BYTES <= MAX_DATA_BYTES);
const _: () = assert!(MAX_H2C_DATA_BYTES as usize >= 4096 && MAX_H2C_DATA_BYTES.is_multiple_of(4));
const _: () = assert!(RX_CARRY_BYTES >= MAX_HLEN + 4 + CONNECT_CAPSULE_DATA_BYTES);
const _: () = assert!(RECV_BUFS.is_power_of_two() && RECV_BUFS <= 32_768);
const _: () = assert!(RECV_BUF_BYTES >= MAX_HDR_BYTES && RECV_BUF_BYTES <= u32::MAX as usize);
const _: () = assert!(MAX_QUEUE_DEPTH as u32 <= RING_ENTRIES);
const _: () = assert!(MAX_CONNECTIONS_CEILING * 2 <= u16::MAX as usize);
const _: () = assert!(MAX_DATA_BYTES <= u32::MAX as usize);
const _: () = assert!(TX_IOV_MAX >= 3 && TX_IOV_MAX <= 1024);
const _: () = assert!(QOS_REFILL_MS <= REACTOR_SWEEP_MS && QOS_BURST_MS >= QOS_REFILL_MS);
const _: () = assert!(MIN_BUFFER_POOL_BYTES >= MAX_DATA_BYTES);
const _: () = assert!(ADMIN_MAX_DATA_BYTES <= MAX_DATA_BYTES);
const _: () = assert!(16 + 32 + 4 * MAX_NAMESPACES as usize <= ADMIN_MAX_DATA_BYTES);
const _: () =
    assert!(BACKEND_IO_BYTES_MAX <= MAX_DATA_BYTES && BACKEND_IO_BYTES_MAX.is_multiple_of(4096));
const _: () = assert!(ACCEPT_BACKOFF_MS_MIN <= ACCEPT_BACKOFF_MS_MAX);
const _: () = assert!(NO_NAMESPACE_KATO_MS <= MAX_KATO_MS);

/// Block store allocation and mapping unit (one logical block).
pub const BLOCK_BYTES: u64 = LBA_BYTES;

/// Blocks one backend operation can touch (the scratch arrays of the block store are this
/// long).
pub const MAX_BLOCKS_PER_IO: usize = BACKEND_IO_BYTES_MAX / BLOCK_BYTES as usize;

/// A compressed block is kept only if it saves at least one 512-byte sector.
pub const MAX_COMPRESSED_BYTES: usize = BLOCK_BYTES as usize - 512;

/// Freed extents held back until the metadata that freed them is durable; past this many
/// the writer that crosses it makes it durable and releases them (with syncs off the
/// reactor, it asks the store's worker thread to).
pub const MAX_PENDING_FREES: usize = 16 * 1024;
/// With syncs off the reactor, past this many pending frees the writer that crosses it
/// releases them itself (waiting for the metadata sync): the worker is not keeping up.
pub const PENDING_FREES_HARD_MAX: usize = 4 * MAX_PENDING_FREES;

/// Extent entries one step of a layer merge moves (one RocksDB batch, one tree-lock hold):
/// deleting a snapshot with millions of blocks never stalls I/O for long.
pub const MERGE_STEP_ENTRIES: usize = 4096;

/// Delta rows a block-map chunk (64 blocks) may have on disk before a host write rewrites its
/// full row instead: bounds the rows read per chunk at open, and a small write's metadata
/// (one short row, plus a full row every this many writes to the chunk).
pub const CHUNK_DELTA_ROWS_MAX: usize = 32;
/// Chunks the block store's map journal may have changed since its last checkpoint before
/// one is due (the store's worker thread writes their rows into RocksDB): a checkpoint
/// writes at most about this many rows (under 1 KiB each), and a replay at open re-applies
/// at most this many chunks' records beyond the file bound below.
pub const MAP_LOG_DIRTY_CHUNKS: usize = if cfg!(test) { 48 } else { 16 * 1024 };
/// Bytes of map journal after which a checkpoint is due (and the next file is started):
/// bounds replay at open (about 40 bytes a 4k write) and the journal's disk use.
pub const MAP_LOG_FILE_BYTES: u64 = if cfg!(test) { 64 << 10 } else { 64 << 20 };
/// Largest map journal record replay accepts (one loop pass's mappings take under 100 KiB).
pub const MAP_LOG_RECORD_BYTES: usize = 4 << 20;
/// Size of each of the block store's map memtables (RocksDB's `write_buffer_size`; the
/// vector memtable is sorted whole when flushed). Under 4k random writes RocksDB's default
/// (64 MiB) spent 35 % of the target's CPU in that sort, cache-cold; 8 MiB halves it and
/// gave 4.0-4.3 us of CPU per write instead of 4.5-4.8 (`nvme_load --kinds plain --rw
/// randwrite --qd 32`); 1-2 MiB flush too often and lose it again.
pub const MAP_MEMTABLE_BYTES: usize = 8 << 20;

/// Chunk rows one step of the legacy (row per block) conversion at open writes.
pub const LEGACY_CONVERT_CHUNKS: usize = 4096;

/// Media (checksum) errors remembered for the control plane to report.
pub const MAX_MEDIA_ERRORS_KEPT: usize = 1024;

/// Initiator ([`crate::initiator`]): longest a socket read or write may block before the
/// command fails, so a test against a stuck target fails instead of hanging.
pub const INITIATOR_TIMEOUT_MS: u64 = 30_000;

/// Initiator: default commands in flight per I/O queue (`initiator::Options::queue_depth`);
/// the blocking calls pipeline the parts of a split transfer up to this.
pub const INITIATOR_QUEUE_DEPTH: u16 = 8;

/// Initiator: deepest I/O queue a session asks for. Connect sends SQSIZE = depth (0-based,
/// one entry spare), which the target's [`MAX_QUEUE_DEPTH`] entries bound.
pub const INITIATOR_QUEUE_DEPTH_MAX: u16 = MAX_QUEUE_DEPTH - 1;

/// Initiator: most I/O queues of one session (what one controller of this target takes).
pub const INITIATOR_IO_QUEUES_MAX: u16 = MAX_IO_QUEUES_PER_CTRL;

/// Initiator: commands the admin queue may have in flight (its blocking calls send one at a
/// time).
pub const INITIATOR_ADMIN_QUEUE_DEPTH: u16 = 4;

/// Initiator: data buffer of one admin command slot (Connect data, Identify, small log
/// pages); `Session::admin_exec` refuses larger transfers.
pub const INITIATOR_ADMIN_SLOT_BYTES: usize = 64 * 1024;

/// Initiator: smallest I/O slot buffer a session takes (one 4 KiB block, and the 1 KiB of
/// Connect data).
pub const INITIATOR_SLOT_BYTES_MIN: usize = 4096;

/// Initiator: largest slot buffer, so the largest data transfer of one command, whatever the
/// target's MDTS allows. It is also the default slot size (tests move MDTS-sized data through
/// the blocking calls); a queue's memory is `depth + 2` slots (slots and receive buffer), so
/// benches holding many queues pick small slots.
pub const INITIATOR_MAX_DATA_BYTES: u32 = MAX_DATA_BYTES as u32;

/// Initiator: largest number of polls of CSTS while waiting for CSTS.RDY after CC.EN.
pub const INITIATOR_READY_POLLS_MAX: u32 = 1_000;

const _: () =
    assert!(INITIATOR_QUEUE_DEPTH >= 1 && INITIATOR_QUEUE_DEPTH <= INITIATOR_QUEUE_DEPTH_MAX);
const _: () = assert!(INITIATOR_ADMIN_QUEUE_DEPTH + 1 >= MIN_QUEUE_DEPTH);
const _: () = assert!(INITIATOR_ADMIN_SLOT_BYTES >= 4096 && INITIATOR_SLOT_BYTES_MIN >= 1024);

/// The replication listener takes the NVMe/TCP port plus this, on the same address, so a
/// peer finds it from the node's recorded NVMe endpoint alone.
pub const REPLICATION_PORT_OFFSET: u16 = 1;
/// Largest data one replication frame carries: one backend part (commands are split into
/// parts of at most this before they reach a backend).
pub const REPLICA_FRAME_DATA_MAX: usize = BACKEND_IO_BYTES_MAX;
/// Replica parts one link to a peer holds (queued, in flight or held for the control
/// plane); one more completes at once with an error the host retries.
pub const REPLICA_LINK_PARTS_MAX: usize = 8192;
/// A replica part unanswered for this long breaks its link (the replica is then reported
/// for the control plane to record out of sync). Long enough that a replica stalled by a
/// busy machine is not dropped (a dead one breaks the connection much sooner).
pub const REPLICA_IO_TIMEOUT_MS: u64 = 5_000;
/// Connecting to a replica gives up after this.
pub const REPLICA_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Pause between reconnection attempts of a broken link.
pub const REPLICA_RECONNECT_MS: u64 = 500;
/// Parts of a failed replica wait at most this for the control plane to record it out of
/// sync (which lets them complete); then they fail with an error the host retries.
pub const REPLICA_HOLD_MAX_MS: u64 = 20_000;
/// A replica that does not hold the image yet (its server is still applying the volume's
/// creation) is asked again for this long before the part counts as failed.
pub const REPLICA_NOT_READY_RETRY_MS: u64 = 30_000;
/// Pause before asking a not-ready replica again.
pub const REPLICA_NOT_READY_PAUSE_MS: u64 = 20;
/// Connections the replication listener serves at once (peers × links).
pub const REPLICA_CONNECTIONS_MAX: usize = 64;
/// Frames one replica connection applies in one batch (one metadata commit); each holds a
/// buffer of [`REPLICA_FRAME_DATA_MAX`].
pub const REPLICA_BATCH_FRAMES: usize = 32;
/// A replica that accepts a frame of a primary promises it, for this long from the frame's
/// arrival, not to serve the volume itself (should it be promoted meanwhile): the primary's
/// read lease. The primary serves reads from its own copy while every in-sync replica's
/// promise holds, counted from when it sent the frame and shortened by
/// [`REPLICA_LEASE_TRUST_PERCENT`]; otherwise a read first asks every replica (one small
/// frame each) and fails as a path error if one answers that a newer primary exists.
/// A promoted replica waits out what it promised, so this bounds part of a failover;
/// a read-only workload pays one ping round trip per trusted part of it.
pub const REPLICA_READ_LEASE_MS: u64 = 500;
/// The part of [`REPLICA_READ_LEASE_MS`] a primary relies on (room for clock-rate drift
/// between servers).
pub const REPLICA_LEASE_TRUST_PERCENT: u64 = 80;
/// How often an idle replica connection checks for shutdown.
pub const REPLICA_POLL_MS: u64 = 200;
/// A peer that leaves a frame half sent this long is gone: its connection is closed (a
/// primary's own link gives up on an unanswered part sooner, [`REPLICA_IO_TIMEOUT_MS`]).
pub const REPLICA_PARTIAL_FRAME_MS: u64 = 10_000;

/// ANA groups a subsystem reports (ANAGRPMAX, NANAGRPID): a cluster groups namespaces by
/// the server that serves them optimized, so this bounds a cluster's servers. The ANA log
/// of a full table (header, every group, every namespace) stays within
/// [`ADMIN_MAX_DATA_BYTES`].
pub const ANA_GROUPS_MAX: u32 = 128;

/// Highest dynamic controller ID (0xFFF0.. are reserved).
pub const MAX_CNTLID: u16 = 0xffef;

/// A rebuild tracks and copies a replica's missed changes in chunks of this many bytes (one
/// bit of the primary's memory per chunk).
pub const REBUILD_CHUNK_BYTES: u64 = 1 << 20;
/// Devices one node's storage pool holds (at start, or added while serving).
pub const POOL_DEVICES_MAX: usize = 64;
/// An image's change log (see `blockstore::changes`) records changes in chunks of this
/// many bytes: a rebuild's chunks.
pub const CHANGE_CHUNK_BYTES: u64 = REBUILD_CHUNK_BYTES;
/// How far back from a copy's last change under the deposed primary a failover looks for
/// changes that may not have reached every copy: a primary's write is unacknowledged for at
/// most [`REPLICA_IO_TIMEOUT_MS`] + [`REPLICA_HOLD_MAX_MS`] while the primary runs, plus a
/// margin for scheduling.
pub const CHANGE_WINDOW_MS: u64 = REPLICA_IO_TIMEOUT_MS + REPLICA_HOLD_MAX_MS + 5_000;
/// A chunk's change-log row is rewritten at most this often (its recorded time may be this
/// much earlier than its last change).
pub const CHANGE_LOG_REFRESH_MS: u64 = 1_000;
/// Changes older than this leave an image's change log in memory (and their rows at open):
/// well past what a failover asks.
pub const CHANGE_LOG_KEEP_MS: u64 = 4 * CHANGE_WINDOW_MS;
/// How long a rebuild waits for the reactors to finish the passes in progress when it
/// starts (their writes that skipped the replica are then applied locally).
pub const REBUILD_BARRIER_MS: u64 = 5_000;

/// A replicated snapshot holds the volume's writes for at most this long while the ones
/// already admitted complete (then it gives up and is tried again): host writes park
/// meanwhile, so it stays well under a host's command timeout.
pub const SNAPSHOT_DRAIN_MS: u64 = 5_000;
/// How long a replicated snapshot waits for the replicas' answers (one that does not
/// answer does not hold the snapshot).
pub const SNAPSHOT_REPLICA_WAIT_MS: u64 = 5_000;
