//! The crate's error type: one enum with context, as the house style asks.

use std::path::PathBuf;

use crate::pdu::PduError;

/// Errors returned by the data path's public API and its internals.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Binding a listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Opening or creating a namespace's backing file failed.
    #[error("backing file {path:?} for nsid {nsid}: {source}")]
    Backing {
        /// Namespace ID.
        nsid: u32,
        /// Path of the backing file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration or namespace table is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A malformed PDU ended a connection.
    #[error("protocol error: {0}")]
    Pdu(#[from] PduError),
    /// Socket or ring I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed or must be dropped (reason in the message).
    #[error("connection closed: {0}")]
    Closed(&'static str),
}
