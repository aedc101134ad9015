//! The control plane's hands on the data path: backing storage per volume, and the
//! NVMe/TCP target that serves volumes as namespaces. The reconciler calls [`DataPlane`];
//! the API reads live sessions through [`DataPathView`].
//!
//! Volumes are files `volumes/<uuid>.img` in the data directory (sparse, sized to the volume)
//! until the extent-mapped block store lands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use evstor_datapath::{Acl, ConnectedHost, NamespaceSpec, TargetHandle};
use uuid::Uuid;

use crate::api::DataPathView;
use crate::domain::volume::{Volume, VolumeState, ALLOW_ANY, ALLOW_NONE};
use crate::domain::State;
use crate::reconcile::DataPlane;

/// Backing files plus (when serving) the NVMe/TCP target.
pub struct VolumeStore {
    dir: PathBuf,
    target: Option<TargetHandle>,
    /// The last table handed to the target; publishing is skipped when nothing changed.
    published: Mutex<Vec<NamespaceSpec>>,
}

impl VolumeStore {
    /// Backing files only, no target (control-plane tests).
    pub fn files_only(data_dir: &Path) -> std::io::Result<VolumeStore> {
        let dir = data_dir.join("volumes");
        std::fs::create_dir_all(&dir)?;
        Ok(VolumeStore {
            dir,
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
        }
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

    fn release(&self, uuid: Uuid) -> std::io::Result<()> {
        match std::fs::remove_file(self.path_of(uuid)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
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
