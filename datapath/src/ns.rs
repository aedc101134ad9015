//! The published namespace table: specs resolved to open backends, swapped atomically.
//!
//! The control plane publishes a whole new table; connections keep an `Arc` to the
//! table they last saw and refresh it when the generation counter moves, so the
//! I/O path never takes a lock that the control plane holds.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::backend::{Backend, FileBackend};
use crate::config::{Acl, Backing, NamespaceSpec};
use crate::error::DatapathError;
use crate::limits::{LBA_SHIFT, MAX_NAMESPACES};
use crate::pages::NsIdentity;
use crate::qos::QosState;
use crate::replica::Replicated;

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
            ana_group: self.spec.ana.group,
        }
    }
}

/// An immutable namespace table, sorted by nsid, with an index by host NQN: with up to
/// [`MAX_NAMESPACES`] namespaces, finding what one host sees must not scan them all.
#[derive(Debug, Default)]
pub struct NsTable {
    /// Monotonic generation (changes on every publish).
    pub generation: u64,
    /// Namespaces by ascending nsid.
    pub list: Vec<Arc<Namespace>>,
    /// Positions in `list` (ascending) of namespaces whose host ACL is `AllowAny`.
    open: Vec<u32>,
    /// Positions in `list` (ascending) of the namespaces whose host ACL names the NQN.
    by_host: HashMap<String, Vec<u32>>,
}

impl NsTable {
    /// Looks up a namespace by id.
    pub fn get(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        self.list
            .binary_search_by_key(&nsid, |n| n.spec.nsid)
            .ok()
            .map(|i| &self.list[i])
    }

    /// Namespaces visible to a host, ascending: the open ones merged with the ones whose
    /// ACL names the host, filtered by the IP ACL. Costs what the host may see, not the table.
    pub fn visible<'a>(
        &'a self,
        host_nqn: &'a str,
        ip: IpAddr,
    ) -> impl Iterator<Item = &'a Arc<Namespace>> + 'a {
        let named: &[u32] = self.by_host.get(host_nqn).map_or(&[], Vec::as_slice);
        MergeAscending::new(&self.open, named)
            .map(|i| &self.list[i as usize])
            .filter(move |n| n.spec.ip_acl.admits_ip(ip))
    }

    fn index(generation: u64, list: Vec<Arc<Namespace>>) -> NsTable {
        let mut open = Vec::new();
        let mut by_host: HashMap<String, Vec<u32>> = HashMap::new();
        for (i, n) in list.iter().enumerate() {
            // MAX_NAMESPACES bounds the list, so a position fits in u32.
            let i = i as u32;
            match &n.spec.host_acl {
                Acl::AllowAny => open.push(i),
                Acl::AllowNone => {}
                Acl::List(hosts) => {
                    for h in hosts {
                        let at = by_host.entry(h.clone()).or_default();
                        // A host named twice in one ACL is indexed once.
                        if at.last() != Some(&i) {
                            at.push(i);
                        }
                    }
                }
            }
        }
        NsTable {
            generation,
            list,
            open,
            by_host,
        }
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
        (Self::index(generation, list), first_err)
    }
}

/// Two ascending position lists merged into one ascending sequence without repeats.
struct MergeAscending<'a> {
    a: &'a [u32],
    b: &'a [u32],
}

impl<'a> MergeAscending<'a> {
    fn new(a: &'a [u32], b: &'a [u32]) -> Self {
        MergeAscending { a, b }
    }
}

impl Iterator for MergeAscending<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let next = match (self.a.first(), self.b.first()) {
            (None, None) => return None,
            (Some(&x), None) => x,
            (None, Some(&y)) => y,
            (Some(&x), Some(&y)) => x.min(y),
        };
        if self.a.first() == Some(&next) {
            self.a = &self.a[1..];
        }
        if self.b.first() == Some(&next) {
            self.b = &self.b[1..];
        }
        Some(next)
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
        (
            None,
            Backing::Image {
                store,
                compress,
                replication,
            },
        ) => {
            let uuid = uuid::Uuid::from_bytes(spec.uuid);
            if !store.contains(uuid) {
                return Err(DatapathError::Config(format!(
                    "nsid {}: the block store has no image {uuid}",
                    spec.nsid
                )));
            }
            let image: Arc<dyn Backend> = Arc::new(store.image(uuid, spec.size_bytes, *compress));
            match replication {
                Some(r) => Arc::new(Replicated::new(
                    image,
                    spec.uuid,
                    r.epoch,
                    r.members.clone(),
                )),
                None => image,
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qos::QosLimits;

    fn spec(dir: &std::path::Path, nsid: u32, host_acl: Acl, ip_acl: Acl) -> NamespaceSpec {
        NamespaceSpec {
            nsid,
            uuid: [nsid as u8; 16],
            size_bytes: 1 << 20,
            backing: Backing::File(dir.join(format!("ns{nsid}.img"))),
            host_acl,
            ip_acl,
            qos: QosLimits::default(),
            ana: Default::default(),
        }
    }

    fn list(hosts: &[&str]) -> Acl {
        Acl::List(hosts.iter().map(|h| h.to_string()).collect())
    }

    #[test]
    fn the_host_index_sees_exactly_what_the_acls_admit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = ("nqn.2014-08.org.example:a", "nqn.2014-08.org.example:b");
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.9".parse().expect("ip");
        let specs = vec![
            spec(dir.path(), 7, list(&[a, a, b]), Acl::AllowAny),
            spec(dir.path(), 1, Acl::AllowAny, Acl::AllowAny),
            spec(dir.path(), 3, list(&[b]), Acl::AllowAny),
            spec(dir.path(), 4, Acl::AllowNone, Acl::AllowAny),
            spec(dir.path(), 9, Acl::AllowAny, list(&["127.0.0.1"])),
            spec(dir.path(), 65_536, list(&[a]), Acl::AllowAny),
        ];
        let table = NsTable::build(specs, &NsTable::default(), 1).expect("table");
        let seen = |host: &str, ip: IpAddr| -> Vec<u32> {
            table.visible(host, ip).map(|n| n.spec.nsid).collect()
        };
        for host in [a, b, "nqn.2014-08.org.example:c"] {
            for ip in [lo, other] {
                let brute: Vec<u32> = table
                    .list
                    .iter()
                    .filter(|n| n.spec.visible_to(host, ip))
                    .map(|n| n.spec.nsid)
                    .collect();
                assert_eq!(seen(host, ip), brute, "{host} from {ip}");
            }
        }
        assert_eq!(seen(a, lo), [1, 7, 9, 65_536]);
        assert_eq!(seen(b, other), [1, 3, 7]);
    }

    #[test]
    fn nsids_past_the_limit_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let past = spec(dir.path(), MAX_NAMESPACES + 1, Acl::AllowAny, Acl::AllowAny);
        assert!(NsTable::build(vec![past], &NsTable::default(), 1).is_err());
    }
}
