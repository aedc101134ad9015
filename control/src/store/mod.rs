//! The edge between the pure domain and RocksDB: event encoding (with upcasting), projection
//! rows, the single journal writer with group commit, and replay/verify.

pub mod bus;
pub mod codec;
pub mod replay;
pub mod rows;

pub use bus::{Bus, Committed, RequestMeta};
