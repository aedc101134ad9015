//! The control plane's hands on the data path: backing storage per volume, and the
//! NVMe/TCP target that serves volumes as namespaces. The reconciler calls [`DataPlane`];
//! the API reads live sessions through [`DataPathView`].
//!
//! Volumes are files `volumes/<uuid>.img` in the data directory (sparse, sized to the volume)
//! until the extent-mapped block store lands. Snapshots are files `snapshots/<uuid>.img`:
//! a reflink or hole-preserving copy of the volume file ([`evstor_datapath::filecopy`]).
//!
//! Crash consistency of these copies is weak: a snapshot copies the file while the namespace
//! is still published, so a host writing during the copy can leave a snapshot that mixes
//! blocks from before and after (torn across blocks, never inside one the host completed
//! before the snapshot was requested). Rollback withdraws the namespace before it copies,
//! but I/O already in flight in the target may still land. The extent-mapped block store,
//! where a snapshot freezes a write epoch, fixes both.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use evstor_datapath::{Acl, ConnectedHost, NamespaceSpec, TargetHandle};
use uuid::Uuid;

use crate::api::DataPathView;
use crate::domain::snapshot::Snapshot;
use crate::domain::volume::{Volume, VolumeState, ALLOW_ANY, ALLOW_NONE};
use crate::domain::State;
use crate::reconcile::DataPlane;

/// Backing files plus (when serving) the NVMe/TCP target.
pub struct VolumeStore {
    dir: PathBuf,
    snapshot_dir: PathBuf,
    target: Option<TargetHandle>,
    /// The last table handed to the target; publishing is skipped when nothing changed.
    published: Mutex<Vec<NamespaceSpec>>,
}

impl VolumeStore {
    /// Backing files only, no target (control-plane tests).
    pub fn files_only(data_dir: &Path) -> std::io::Result<VolumeStore> {
        let dir = data_dir.join("volumes");
        let snapshot_dir = data_dir.join("snapshots");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&snapshot_dir)?;
        Ok(VolumeStore {
            dir,
            snapshot_dir,
            target: None,
            published: Mutex::new(Vec::new()),
        })
    }

    /// Backing files served by `target`.
    pub fn with_target(data_dir: &Path, target: TargetHandle) -> std::io::Result<VolumeStore> {
        let mut s = VolumeStore::files_only(data_dir)?;
        s.target = Some(target);
        Ok(s)
    }

    pub fn path_of(&self, uuid: Uuid) -> PathBuf {
        self.dir.join(format!("{uuid}.img"))
    }

    pub fn snapshot_path_of(&self, uuid: Uuid) -> PathBuf {
        self.snapshot_dir.join(format!("{uuid}.img"))
    }

    /// Where the target listens (I/O, discovery), when serving.
    pub fn target_addrs(&self) -> Option<(SocketAddr, Option<SocketAddr>)> {
        self.target
            .as_ref()
            .map(|t| (t.local_addr(), t.discovery_addr()))
    }

    /// Stops the target, ending every host connection.
    pub fn shutdown(&mut self) {
        if let Some(t) = self.target.take() {
            t.shutdown();
        }
    }

    fn namespace_of(&self, v: &Volume) -> NamespaceSpec {
        NamespaceSpec {
            nsid: v.nsid,
            uuid: *v.uuid.as_bytes(),
            size_bytes: v.size_bytes,
            backing_path: self.path_of(v.uuid),
            host_acl: acl(&v.acl),
            ip_acl: acl(&v.ip_acl),
            qos: Default::default(),
        }
    }
}

/// Writes `final_path` as a copy of `src` resized to `len`, through a temporary file renamed
/// into place: the rename is the commit point, so a crash leaves either nothing or a whole
/// copy, and a retry that finds `final_path` has nothing left to do.
fn copy_into_place(src: &Path, final_path: &Path, len: u64) -> std::io::Result<()> {
    if final_path.exists() {
        return Ok(());
    }
    let tmp = final_path.with_extension("img.tmp");
    let from = File::open(src)?;
    let to = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let how = evstor_datapath::filecopy::copy_sparse(&from, &to)?;
    to.set_len(len)?;
    to.sync_all()?;
    std::fs::rename(&tmp, final_path)?;
    sync_dir(final_path)?;
    tracing::debug!("{} -> {}: {how:?}", src.display(), final_path.display());
    Ok(())
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A volume ACL in the data path's terms.
pub fn acl(entries: &[String]) -> Acl {
    match entries {
        [one] if one == ALLOW_ANY => Acl::AllowAny,
        [] => Acl::AllowNone,
        [one] if one == ALLOW_NONE => Acl::AllowNone,
        list => Acl::List(list.to_vec()),
    }
}

impl DataPlane for VolumeStore {
    fn prepare(&self, v: &Volume) -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.path_of(v.uuid))?;
        f.set_len(v.size_bytes)?;
        f.sync_all()
    }

    fn prepare_clone(&self, v: &Volume, snapshot: Uuid) -> std::io::Result<()> {
        copy_into_place(
            &self.snapshot_path_of(snapshot),
            &self.path_of(v.uuid),
            v.size_bytes,
        )
    }

    fn release(&self, uuid: Uuid) -> std::io::Result<()> {
        remove_if_present(&self.path_of(uuid))?;
        remove_if_present(&self.path_of(uuid).with_extension("img.tmp"))
    }

    fn take_snapshot(&self, s: &Snapshot) -> std::io::Result<()> {
        copy_into_place(
            &self.path_of(s.source_volume),
            &self.snapshot_path_of(s.uuid),
            s.size_bytes,
        )
    }

    fn release_snapshot(&self, uuid: Uuid) -> std::io::Result<()> {
        let path = self.snapshot_path_of(uuid);
        remove_if_present(&path)?;
        remove_if_present(&path.with_extension("img.tmp"))
    }

    /// Copies in place (same inode), so a backend the target still holds open sees the
    /// restored data; repeating it after a crash repeats the same copy.
    fn rollback(&self, v: &Volume, snapshot: Uuid) -> std::io::Result<()> {
        let from = File::open(self.snapshot_path_of(snapshot))?;
        let to = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path_of(v.uuid))?;
        evstor_datapath::filecopy::copy_sparse(&from, &to)?;
        to.set_len(v.size_bytes)?;
        to.sync_all()
    }

    fn publish(&self, state: &State) {
        let Some(target) = &self.target else {
            return;
        };
        let table: Vec<NamespaceSpec> = state
            .volumes
            .by_uuid
            .values()
            .filter(|v| v.state == VolumeState::Available)
            .map(|v| self.namespace_of(v))
            .collect();
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        if *published == table {
            return;
        }
        // Volume files grow with the volume before the host is told the new capacity.
        for ns in &table {
            if let Ok(f) = std::fs::OpenOptions::new()
                .write(true)
                .open(&ns.backing_path)
            {
                let _ = f.metadata().map(|m| {
                    if m.len() < ns.size_bytes {
                        let _ = f.set_len(ns.size_bytes);
                    }
                });
            }
        }
        target.set_namespaces(table.clone());
        *published = table;
    }
}

impl DataPathView for VolumeStore {
    fn hosts_of(&self, nsid: u32) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .connected_hosts()
            .into_iter()
            .filter(|h| h.nsids.contains(&nsid))
            .map(|h| h.host_nqn)
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    fn connected_hosts(&self) -> Vec<ConnectedHost> {
        self.target
            .as_ref()
            .map(TargetHandle::connected_hosts)
            .unwrap_or_default()
    }
}
