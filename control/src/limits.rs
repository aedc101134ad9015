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
/// Most volumes in the cluster (also bounds namespace ids).
pub const VOLUMES_MAX: usize = 65_536;
/// Most snapshots in the cluster.
pub const SNAPSHOTS_MAX: usize = 262_144;
/// Most projects, policies and credentials each.
pub const PROJECTS_MAX: usize = 4096;
/// Largest volume: 1 PiB.
pub const VOLUME_BYTES_MAX: u64 = 1 << 50;
/// Most events the reconciler takes from the journal at once.
pub const RECONCILE_BATCH_MAX: usize = 256;
/// Most API requests served at once; more are answered 503 rather than queued.
pub const API_REQUESTS_IN_FLIGHT_MAX: usize = 1024;
/// Most journal envelopes one events request examines; a page cut short by this bound still
/// carries a `nextToken`, so a filter that matches rarely pages on instead of scanning forever.
pub const EVENTS_SCAN_MAX: usize = 64 * 1024;
/// Envelopes read from the journal at once while serving events.
pub const EVENTS_READ_CHUNK: usize = 1024;

/// 64-block windows one snapshot diff page lists at most.
pub const DIFF_WINDOWS_MAX: usize = 1024;
