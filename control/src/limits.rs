//! Named bounds of the control plane: every queue, body, list and name has a maximum.

/// Commands waiting for the journal writer; requests beyond this wait for room (back-pressure).
pub const COMMAND_QUEUE_MAX: usize = 4096;
/// Commands folded into one group commit (one fsync).
pub const GROUP_COMMIT_COMMANDS_MAX: usize = 512;
/// Largest request body the API reads.
pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;
/// Longest `x-request-id`; it is recorded in every event the request causes.
pub const REQUEST_ID_BYTES_MAX: usize = 256;
/// Longest token subject (`sub`); it is recorded as the actor of every event.
pub const SUBJECT_BYTES_MAX: usize = 256;
/// Longest duration the API accepts: the range of protobuf's `Duration` (10,000 years), which
/// the clients' generated code decodes durations into.
pub const API_DURATION_SECS_MAX: u64 = 315_576_000_000;
/// Default and largest page of volumes, snapshots and events.
pub const LIST_PAGE_MAX: usize = 1000;
/// Longest resource name (`^[a-zA-Z0-9-_.]{1,253}$`).
pub const NAME_BYTES_MAX: usize = 253;
/// Longest free-text description.
pub const DESCRIPTION_BYTES_MAX: usize = 256;
/// Most labels on one volume.
pub const LABELS_MAX: usize = 16;
/// Most entries in one host or IP ACL.
pub const ACL_ENTRIES_MAX: usize = 1024;
/// Most default policies on one project.
pub const DEFAULT_POLICIES_MAX: usize = 16;
/// Largest credential (an RSA public key PEM; 4096-bit keys take under 1 KiB).
pub const CREDENTIAL_PEM_BYTES_MAX: usize = 16 * 1024;
/// Shortest RSA modulus a credential may have.
pub const RSA_KEY_BITS_MIN: usize = 2048;
/// Most volumes in the cluster: each is a namespace of the cluster's subsystem, numbered
/// 1..=this, so the data path's namespace limit is the volume limit.
pub const VOLUMES_MAX: usize = evstor_datapath::limits::MAX_NAMESPACES as usize;
/// Most snapshots in the cluster.
pub const SNAPSHOTS_MAX: usize = 262_144;
/// Most projects, policies and credentials each.
pub const PROJECTS_MAX: usize = 4096;
/// Largest volume: 1 PiB.
pub const VOLUME_BYTES_MAX: u64 = 1 << 50;
/// Most events the reconciler takes from the journal at once.
pub const RECONCILE_BATCH_MAX: usize = 256;
/// Most API requests served at once; more are answered 503 rather than queued. A request
/// takes one of these only after it is authenticated and its role may use the route.
pub const API_REQUESTS_IN_FLIGHT_MAX: usize = 1024;
/// Most API requests one token subject has in flight at once; more are answered 429, so one
/// authenticated client cannot take every in-flight permit.
pub const API_REQUESTS_PER_SUBJECT_MAX: usize = 256;

// The API's network edge (`crate::edge`). Every deadline closes the connection when it passes;
// the `_MS` values are defaults that `evstor serve` flags override (tests use short ones).

/// Longest from accepting a TCP connection to the end of its TLS handshake.
pub const API_TLS_HANDSHAKE_MS: u64 = 10_000;
/// Longest from the first byte of a request to the end of its headers (slowloris).
pub const API_HEADER_READ_MS: u64 = 10_000;
/// Longest from the end of a request's headers to the end of its body. With
/// [`REQUEST_BODY_BYTES_MAX`] this asks about 35 KB/s of a client sending the largest body.
pub const API_BODY_READ_MS: u64 = 30_000;
/// Longest a connection may stay open with no request in progress (after the handshake,
/// between keep-alive requests).
pub const API_IDLE_MS: u64 = 60_000;
/// Most open API connections from one client IP address.
pub const API_CONNECTIONS_PER_ADDR_MAX: usize = 256;
/// Ceiling on open API connections, whatever the descriptor budget allows.
pub const API_CONNECTIONS_MAX: usize = 4096;
/// Floor on open API connections, however small the descriptor budget is.
pub const API_CONNECTIONS_MIN: usize = 16;
/// The descriptor split (`evstor serve` first raises the soft `RLIMIT_NOFILE` to the hard
/// limit): the API may hold one descriptor in this many of the limit (one per connection),
/// within [`API_CONNECTIONS_MIN`] and [`API_CONNECTIONS_MAX`]; `--api-connections-max`
/// overrides. The other three quarters are reserved for the data path (per NVMe/TCP queue a
/// socket, an io_uring and an eventfd: 384 at its default 128 connections), RocksDB (the
/// journal and the block store: SST files, WALs, manifests, logs) and the fixed rest (pool
/// devices, listeners, the runtime, about 35 at start). At a limit of 1024 the API gets 256
/// and the rest 768; at 256 (a cramped test) the API gets 64.
pub const API_FD_SHARE_DIVISOR: u64 = 4;
/// Pause of the API accept loop after accept(2) failed for want of descriptors (EMFILE,
/// ENFILE) or memory, so a full table does not spin a core.
pub const API_ACCEPT_BACKOFF_MS: u64 = 100;
/// Longest a graceful shutdown waits for open API requests before dropping them.
pub const API_SHUTDOWN_GRACE_MS: u64 = 5_000;
/// Most journal envelopes one events request examines; a page cut short by this bound still
/// carries a `nextToken`, so a filter that matches rarely pages on instead of scanning forever.
pub const EVENTS_SCAN_MAX: usize = 64 * 1024;
/// Envelopes read from the journal at once while serving events.
pub const EVENTS_READ_CHUNK: usize = 1024;

/// 64-block windows one snapshot diff page lists at most.
pub const DIFF_WINDOWS_MAX: usize = 1024;

// Cluster mode (`evstor serve --etcd …`, `crate::cluster`). etcd's own defaults bound what one
// request may carry: `--max-request-bytes` 1.5 MiB and `--max-txn-ops` 128.

/// Longest wait for a TCP connection to one etcd member before trying the next.
pub const ETCD_CONNECT_MS: u64 = 500;
/// Longest one request to one etcd member may take (socket read/write timeouts). etcd itself
/// gives up on a proposal that cannot reach quorum after about 7 s; we move on sooner.
pub const ETCD_REQUEST_MS: u64 = 2_000;
/// Longest one etcd call may take across every member and retry. A mutation that cannot be
/// ordered in this time (no quorum) is answered 503.
pub const ETCD_CALL_DEADLINE_MS: u64 = 4_000;
/// Largest response body read from etcd (a range of log batches).
pub const ETCD_RESPONSE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Largest log batch (one group commit) stored as one etcd value, in stored envelope bytes.
/// Base64 in JSON grows it by a third on the wire, but etcd's limit applies to the protobuf
/// request, which carries the raw bytes: 256 KiB stays far below its 1.5 MiB.
pub const LOG_BATCH_BYTES_MAX: usize = 256 * 1024;
/// Batches kept in etcd behind the head (the tail); older ones are deleted by the leader and
/// their revisions compacted. A server further behind catches up from a peer's checkpoint.
/// Worst case in etcd: this many batches of `LOG_BATCH_BYTES_MAX` (512 MiB, a quarter of
/// etcd's default 2 GiB quota); a typical batch is a few KiB.
pub const LOG_TAIL_BATCHES: u64 = 2_048;
/// Most log batches one catch-up read asks etcd for.
pub const LOG_FETCH_BATCHES_MAX: i64 = 256;
/// How often an idle writer asks etcd whether the log moved (a safety net under the watch).
pub const LOG_POLL_MS: u64 = 1_000;
/// Longest a writer keeps re-deciding a batch after losing the race for the head to other
/// servers (each loss applies their batches first) before answering 503. Under heavy
/// concurrent writes through several servers a loser may lose a dozen times in a row.
pub const LOG_APPEND_RACE_MS: u64 = 10_000;
/// TTL of a server's etcd lease: its liveness key and, on the leader, the leader key. A
/// server that stops renewing is `Failed` (and loses leadership) this long after.
pub const LEASE_TTL_SECS: i64 = 5;
/// Pause between a member's knocks on each peer's replication listener: a peer whose port
/// refuses connections after it answered has its lease ended (its process is gone).
pub const PEER_PROBE_MS: u64 = 250;
/// A knock that gets no answer this fast concludes nothing (hung or unreachable peer).
pub const PEER_PROBE_TIMEOUT_MS: u64 = 200;
/// Pause between lease keep-alives (and leadership campaigns).
pub const LEASE_KEEPALIVE_MS: u64 = 1_000;
/// The leader stops acting this long before its lease could expire, counted from when the
/// last successful keep-alive was sent (covers clock-rate differences and scheduling).
pub const LEASE_SAFETY_MARGIN_MS: u64 = 1_500;
/// Pause between passes of the leader's orchestrator (health, leadership record, tail trim).
pub const ORCHESTRATOR_TICK_MS: u64 = 250;
/// Most servers of a cluster: each gets a slot, its data path's ANA group
/// (`evstor_datapath::limits::ANA_GROUPS_MAX` of them).
pub const SERVERS_MAX: usize = 128;
/// Replica moves an eviction keeps in flight per server: each is an extra copy being
/// rebuilt (space on the target, a full copy over the network); the rest wait their turn.
pub const EVICTION_MOVES_MAX: usize = 64;
/// Replica moves in flight per volume: one extra copy at a time, so a volume never holds
/// more than `replicaCount + 1` copies.
pub const VOLUME_MOVES_MAX: usize = 1;
/// Pause between the leader's trims of the etcd log tail.
pub const LOG_TRIM_INTERVAL_MS: u64 = 2_000;
/// Longest `evstor serve --etcd` waits for etcd at start before giving up.
pub const ETCD_START_WAIT_MS: u64 = 60_000;
/// Largest journal checkpoint a joining server accepts from a peer.
pub const CHECKPOINT_BYTES_MAX: u64 = 64 * 1024 * 1024 * 1024;
/// Longest a checkpoint transfer may stall (socket timeouts on both ends).
pub const CHECKPOINT_IO_MS: u64 = 30_000;
/// Volumes that get their own series in `/metrics` (space per volume); the rest are counted
/// in `evstor_metrics_volumes_omitted`. Bounds the scrape's size and Prometheus' cardinality.
pub const METRICS_VOLUMES_MAX: usize = 1_000;
/// Size at which the server's log file is rotated.
pub const LOG_FILE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Log files kept (the current one and its rotated predecessors): at most
/// `LOG_FILE_BYTES_MAX * LOG_FILES_MAX` bytes of logs in the data directory.
pub const LOG_FILES_MAX: usize = 8;
/// Most days of logs a support bundle collects (`NumOfDaysToCollectLogs`).
pub const BUNDLE_LOG_DAYS_MAX: u32 = 365;
/// Chunks of a support bundle in flight between its builder and the HTTP response.
pub const BUNDLE_CHUNKS_IN_FLIGHT: usize = 8;
/// Bytes per such chunk.
pub const BUNDLE_CHUNK_BYTES: usize = 64 * 1024;
/// Resource policies (snapshot schedules) on one volume.
pub const RESOURCE_POLICIES_PER_VOLUME_MAX: usize = 16;
/// Resource policies in one project.
pub const RESOURCE_POLICIES_PER_PROJECT_MAX: usize = 1024;
/// `daysOfWeek` entries of one weekly schedule (four a day).
pub const SCHEDULE_WEEKLY_ENTRIES_MAX: usize = 28;
/// Longest `hoursInCycle` (a leap year) and `daysInCycle`.
pub const SCHEDULE_CYCLE_HOURS_MAX: u32 = 366 * 24;
pub const SCHEDULE_CYCLE_DAYS_MAX: u32 = 366;
/// Snapshots one schedule may keep at once (retention ÷ shortest interval).
pub const SCHEDULED_SNAPSHOTS_KEPT_MAX: usize = 1024;
/// Largest `EVSTOR_SCHEDULE_CLOCK_SCALE` (test only): an hour of schedule time in a second.
pub const SCHEDULE_CLOCK_SCALE_MAX: u32 = 3_600;

// Tokens and federated authentication (`crate::api::auth`, `crate::idp`).

/// Lifetime of the `admin.jwt` a server writes (and rewrites at half-life, and when the root
/// key rotates); `evstor serve --admin-token-lifetime` overrides. Short: a leaked file stops
/// working soon. `evstor token create --lifetime` mints longer-lived tokens on purpose.
pub const ADMIN_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;
/// Longest lifetime of a token evstor mints (`evstor token create --lifetime`).
pub const TOKEN_LIFETIME_SECS_MAX: u64 = 366 * 24 * 3600;
/// Clock skew allowed on a token's `exp` and `nbf` (ours and an IdP's).
pub const TOKEN_CLOCK_SKEW_SECS: u64 = 10;
/// Most IdP configurations; each has one JWKS cache entry.
pub const IDP_CONFIGURATIONS_MAX: usize = 8;
/// Most IdP client configurations (audiences) in all.
pub const IDP_CLIENT_CONFS_MAX: usize = 64;
/// Most auth map entries; every federated request scans its IdP's.
pub const AUTH_MAPS_MAX: usize = 1024;
/// Longest URL evstor fetches or records (issuer, JWKS, proxy).
pub const URL_BYTES_MAX: usize = 2048;
/// Longest client id, claim name, identifier, or claim value read from a token.
pub const CLAIM_BYTES_MAX: usize = 256;
/// Most values read from one identifier claim of a token (a user in more groups has the rest
/// ignored).
pub const CLAIM_VALUES_MAX: usize = 256;
/// Most signing keys kept from one IdP's JWKS (the rest are ignored, with a warning).
pub const JWKS_KEYS_MAX: usize = 32;
/// Largest discovery document or JWKS read from an IdP.
pub const IDP_RESPONSE_BYTES_MAX: u64 = 256 * 1024;
/// Longest one connection to an IdP (or its proxy) may take to connect, and each read or
/// write on it.
pub const IDP_FETCH_TIMEOUT_MS: u64 = 5_000;
/// Shortest pause between two fetches of one IdP's discovery document and JWKS. A token
/// naming a key id the cache lacks triggers a fetch, so this bounds what random key ids (or
/// an unreachable IdP) cost the IdP and us: one fetch per IdP per this period.
pub const JWKS_REFRESH_MIN_INTERVAL_MS: u64 = 10_000;
/// Age after which cached IdP keys are fetched again on use (a key the IdP withdrew stops
/// verifying within this period); if that fetch fails the cached keys stay in use.
pub const JWKS_MAX_AGE_SECS: u64 = 3_600;

// Admin endpoints (`crate::edge::listeners`).

/// Most admin endpoints (ports) per server.
pub const ADMIN_ENDPOINTS_MAX: usize = 8;
/// Most local addresses per admin endpoint.
pub const ADMIN_ENDPOINT_IPS_MAX: usize = 8;
/// Devices one node's pool may manage: what the data path's block store holds.
pub const DEVICES_PER_NODE_MAX: usize = evstor_datapath::limits::POOL_DEVICES_MAX;
