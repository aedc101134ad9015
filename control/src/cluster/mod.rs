//! Cluster mode (`evstor serve --etcd URL[,URL…] --name NAME`): several servers, one journal.
//!
//! The journal's order is decided in etcd; every server keeps its own RocksDB copy of the
//! events and projections by applying that order, so reads, `journal verify` and replay stay
//! local. The pieces:
//!
//! - [`etcd`] (over [`http`]): a blocking client of etcd's JSON gateway.
//! - [`log`]: the cluster log in etcd: one key per group commit (`log/<first seq>`) and a
//!   `head` key every append compares (its mod revision) and moves in one transaction.
//! - [`follow`]: a watch on the log that feeds new batches to the journal writer
//!   ([`crate::store::Bus`]), which applies them like its own appends.
//! - [`session`]: this server's etcd lease: its liveness key, and the leader key when it
//!   wins the election (epoch = the key's create revision).
//! - [`orchestrator`]: what the leader does: record its election, server health, trim the
//!   etcd log's tail. Its appends are fenced by its epoch.
//! - [`checkpoint`]: a journal checkpoint streamed from a peer, for a server that is behind
//!   the etcd tail.
//!
//! etcd key layout under the prefix (default `/evstor/default/`): `head`, `log/<seq:020>`,
//! `leader`, `alive/<server uuid>`, `root-key` (the cluster's first root private key PEM) and
//! `root-keys/<fingerprint>` (root keys stored by rotations, see [`crate::keys`]): whoever
//! can read etcd is cluster admin.

pub mod checkpoint;
pub mod etcd;
pub mod follow;
pub mod http;
pub mod log;
pub mod member;
pub mod orchestrator;
pub mod session;
pub mod watchdog;

use uuid::Uuid;

/// Where the cluster's keys live in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` is used as given, with a trailing `/` added when missing.
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.prefix).into_bytes()
    }

    /// The log's head: where the next batch goes, and the revision every append compares.
    pub fn head(&self) -> Vec<u8> {
        self.key("head")
    }

    pub fn log_prefix(&self) -> Vec<u8> {
        self.key("log/")
    }

    /// The batch that starts at `first_seq` (zero-padded: key order is seq order).
    pub fn log(&self, first_seq: u64) -> Vec<u8> {
        self.key(&format!("log/{first_seq:020}"))
    }

    /// The first seq of a batch key, if it is one.
    pub fn log_seq(&self, key: &[u8]) -> Option<u64> {
        let rest = key.strip_prefix(self.log_prefix().as_slice())?;
        std::str::from_utf8(rest).ok()?.parse().ok()
    }

    pub fn leader(&self) -> Vec<u8> {
        self.key("leader")
    }

    pub fn alive_prefix(&self) -> Vec<u8> {
        self.key("alive/")
    }

    pub fn alive(&self, server: Uuid) -> Vec<u8> {
        self.key(&format!("alive/{server}"))
    }

    /// The key the cluster bootstrapped with.
    pub fn root_key(&self) -> Vec<u8> {
        self.key("root-key")
    }

    /// Root private keys by fingerprint (see [`crate::keys`]).
    pub fn root_keys_prefix(&self) -> Vec<u8> {
        self.key("root-keys/")
    }

    pub fn root_key_of(&self, fingerprint: &str) -> Vec<u8> {
        self.key(&format!("root-keys/{fingerprint}"))
    }
}

/// `evstor serve`'s cluster flags.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd client endpoints (`host:port`).
    pub endpoints: Vec<String>,
    /// How to reach them over TLS (`https://` endpoints).
    pub tls: Option<etcd::EtcdTls>,
    /// The etcd user to sign in as, when etcd's authentication is on.
    pub auth: Option<std::sync::Arc<etcd::EtcdAuth>>,
    pub prefix: String,
    /// This server's name (unique in the cluster).
    pub name: String,
    /// Empty: the server is its own failure domain.
    pub failure_domain: String,
    /// Batches the leader keeps in etcd behind the head.
    pub tail_batches: u64,
}

/// What other servers learn about a live one from its liveness key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AliveRecord {
    pub server_uuid: Uuid,
    pub name: String,
    pub api_endpoint: String,
    pub nvme_endpoint: String,
    /// SHA-256 (hex) of the DER of the server's TLS certificate, which peers pin when they
    /// fetch a checkpoint from it (etcd vouches for it).
    pub cert_sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_seq_and_parse_back() {
        let k = Keys::new("/evstor/c1");
        assert_eq!(k.prefix(), "/evstor/c1/");
        assert!(k.log(9) < k.log(10) && k.log(10) < k.log(u64::MAX));
        assert_eq!(k.log_seq(&k.log(42)), Some(42));
        assert_eq!(k.log_seq(&k.head()), None);
    }
}
