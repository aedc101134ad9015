//! The published namespace table: specs resolved to open backends, swapped atomically.
//!
//! The control plane publishes a whole new table; connections keep an `Arc` to the
//! table they last saw and refresh it when the generation counter moves, so the
//! I/O path never takes a lock that the control plane holds.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use crate::backend::{Backend, FileBackend};
use crate::config::{Backing, NamespaceSpec};
use crate::error::DatapathError;
use crate::limits::{LBA_SHIFT, MAX_NAMESPACES};
use crate::pages::NsIdentity;
use crate::qos::QosState;

/// One live namespace.
#[derive(Debug)]
pub struct Namespace {
    /// What the control plane asked for.
    pub spec: NamespaceSpec,
    /// Where its blocks live.
    pub backend: Arc<dyn Backend>,
    /// Capacity in logical blocks.
    pub blocks: u64,
    /// Token buckets, carried over from table to table for the same nsid.
    pub qos: Arc<QosState>,
}

impl Namespace {
    /// Identify Namespace inputs.
    pub fn identity(&self) -> NsIdentity {
        NsIdentity {
            blocks: self.blocks,
            uuid: self.spec.uuid,
        }
    }
}

/// An immutable namespace table, sorted by nsid.
#[derive(Debug, Default)]
pub struct NsTable {
    /// Monotonic generation (changes on every publish).
    pub generation: u64,
    /// Namespaces by ascending nsid.
    pub list: Vec<Arc<Namespace>>,
}

impl NsTable {
    /// Looks up a namespace by id.
    pub fn get(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        self.list
            .binary_search_by_key(&nsid, |n| n.spec.nsid)
            .ok()
            .map(|i| &self.list[i])
    }

    /// Namespaces visible to a host, ascending.
    pub fn visible<'a>(
        &'a self,
        host_nqn: &'a str,
        ip: IpAddr,
    ) -> impl Iterator<Item = &'a Arc<Namespace>> + 'a {
        self.list
            .iter()
            .filter(move |n| n.spec.visible_to(host_nqn, ip))
    }

    /// Builds the next table, reusing open backends whose path and size are unchanged.
    /// Fails on the first namespace that is invalid or cannot be opened.
    pub fn build(
        specs: Vec<NamespaceSpec>,
        old: &NsTable,
        generation: u64,
    ) -> Result<NsTable, DatapathError> {
        match Self::build_lenient(specs, old, generation) {
            (t, None) => Ok(t),
            (_, Some(e)) => Err(e),
        }
    }

    /// Builds the next table, leaving out namespaces that are invalid or cannot be
    /// opened; returns the first such error alongside the table.
    pub fn build_lenient(
        specs: Vec<NamespaceSpec>,
        old: &NsTable,
        generation: u64,
    ) -> (NsTable, Option<DatapathError>) {
        let mut seen = HashSet::new();
        let mut list = Vec::with_capacity(specs.len());
        let mut first_err = None;
        for spec in specs {
            if !seen.insert(spec.nsid) {
                first_err.get_or_insert(DatapathError::Config(format!(
                    "nsid {} is duplicated",
                    spec.nsid
                )));
                continue;
            }
            match open_one(spec, old) {
                Ok(ns) => list.push(Arc::new(ns)),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        list.sort_by_key(|n| n.spec.nsid);
        (NsTable { generation, list }, first_err)
    }
}

fn open_one(spec: NamespaceSpec, old: &NsTable) -> Result<Namespace, DatapathError> {
    if spec.nsid == 0 || spec.nsid > MAX_NAMESPACES {
        return Err(DatapathError::Config(format!(
            "nsid {} outside 1..={MAX_NAMESPACES}",
            spec.nsid
        )));
    }
    let blocks = spec.size_bytes >> LBA_SHIFT;
    if blocks == 0 {
        return Err(DatapathError::Config(format!(
            "nsid {} is smaller than one block",
            spec.nsid
        )));
    }
    let reuse = old
        .get(spec.nsid)
        .filter(|o| o.spec.backing == spec.backing && o.spec.size_bytes == spec.size_bytes);
    let backend: Arc<dyn Backend> = match (reuse, &spec.backing) {
        (Some(o), _) => o.backend.clone(),
        (None, Backing::File(path)) => {
            Arc::new(FileBackend::open(path, spec.size_bytes).map_err(|source| {
                DatapathError::Backing {
                    nsid: spec.nsid,
                    path: path.clone(),
                    source,
                }
            })?)
        }
        (None, Backing::Image { store, compress }) => {
            let uuid = uuid::Uuid::from_bytes(spec.uuid);
            if !store.contains(uuid) {
                return Err(DatapathError::Config(format!(
                    "nsid {}: the block store has no image {uuid}",
                    spec.nsid
                )));
            }
            Arc::new(store.image(uuid, spec.size_bytes, *compress))
        }
    };
    let qos = QosState::carry_over(old.get(spec.nsid).map(|o| &o.qos), spec.qos);
    Ok(Namespace {
        spec,
        backend,
        blocks,
        qos,
    })
}
