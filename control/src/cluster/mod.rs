//! Cluster mode (`evstor serve --etcd URL[,URL…] --name NAME`): several servers, one journal.
//!
//! - [`etcd`] (over [`http`]): a blocking client of etcd's JSON gateway.
pub mod etcd;
pub mod http;
