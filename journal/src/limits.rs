//! Named bounds of the journal: every batch, field and read has a maximum.

/// Most events one append may carry (one group commit of many requests).
pub const APPEND_EVENTS_MAX: usize = 16 * 1024;
/// Largest payload of one event; events describe intent, never user data.
pub const PAYLOAD_BYTES_MAX: usize = 1024 * 1024;
/// Longest actor, project, request id or event type string.
pub const FIELD_BYTES_MAX: usize = 1024;
/// Most envelopes one `read` returns.
pub const READ_EVENTS_MAX: usize = 64 * 1024;
