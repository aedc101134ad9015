//! The root key: the RSA key pair whose public half is credential `system:root` and whose
//! private half signs the tokens evstor mints. Where the private half lives, how it rotates,
//! and the `admin.jwt` each server keeps fresh with it.
//!
//! Private keys are kept by the fingerprint of their public half (SHA-256 of the PEM), never
//! overwritten: in the data directory (`keys/root-keys/<fp>.pem`) for a single server, in
//! etcd (`<prefix>root-keys/<fp>`) for a cluster, so every member can sign. The key that
//! signs is always the one whose public half the journal names; a rotation stores the new
//! key first, then commits `RootKeyRotated`, so a crash in between leaves a spare key, never
//! a journal naming a key nobody has. The key a cluster bootstrapped with (`<prefix>root-key`,
//! `keys/root.pem`) is a candidate too. `keys/root.pem` always holds the current key for
//! `evstor token create`.
//!
//! The keeper ([`keep_admin_token`]) writes `admin.jwt` at start, again at half its lifetime,
//! and when the root key rotated (on every member: it follows the journal).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::cluster::etcd::{EtcdClient, Op, Range};
use crate::cluster::Keys;
use crate::server::write_private;
use crate::store::Bus;

/// Spare keys kept beside the current one (failed or superseded rotations); older ones are
/// deleted when a new key is stored.
pub const ROOT_KEYS_KEPT_MAX: usize = 8;
/// Pause before the keeper tries again when no stored key matches the journal's (a rotation
/// on another member not yet visible in etcd, or etcd unreachable).
const KEEPER_RETRY_MS: u64 = 2_000;

/// The fingerprint a key is stored under: SHA-256 of its public PEM, 16 hex digits.
pub fn fingerprint(public_pem: &str) -> String {
    let digest = Sha256::digest(public_pem.trim().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The public PEM (SPKI) of a private PKCS#8 PEM.
pub fn public_of(private_pem: &str) -> anyhow::Result<String> {
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
    let private = rsa::RsaPrivateKey::from_pkcs8_pem(private_pem)?;
    Ok(private.to_public_key().to_public_key_pem(LineEnding::LF)?)
}

enum Backend {
    Files,
    Etcd { etcd: EtcdClient, keys: Keys },
}

/// Where this server keeps root private keys. Every method blocks (files, etcd).
pub struct RootKeys {
    data_dir: PathBuf,
    backend: Backend,
    /// Lifetime of the `admin.jwt` the keeper writes.
    pub admin_lifetime_secs: u64,
}

impl RootKeys {
    /// Keys in the data directory (a single server).
    pub fn in_files(data_dir: &Path, admin_lifetime_secs: u64) -> RootKeys {
        RootKeys {
            data_dir: data_dir.to_path_buf(),
            backend: Backend::Files,
            admin_lifetime_secs,
        }
    }

    /// Keys in etcd (a cluster member); `keys/root.pem` is still written locally.
    pub fn in_etcd(
        data_dir: &Path,
        etcd: EtcdClient,
        keys: Keys,
        admin_lifetime_secs: u64,
    ) -> RootKeys {
        RootKeys {
            data_dir: data_dir.to_path_buf(),
            backend: Backend::Etcd { etcd, keys },
            admin_lifetime_secs,
        }
    }

    fn dir(&self) -> PathBuf {
        self.data_dir.join("keys").join("root-keys")
    }

    /// Stores `private` under its fingerprint (before the rotation that names it commits),
    /// then drops the oldest spares beyond [`ROOT_KEYS_KEPT_MAX`].
    pub fn store(&self, private_pem: &str) -> anyhow::Result<()> {
        let fp = fingerprint(&public_of(private_pem)?);
        match &self.backend {
            Backend::Files => write_private(&self.dir().join(format!("{fp}.pem")), private_pem)?,
            Backend::Etcd { etcd, keys } => {
                let put = Op::Put {
                    key: keys.root_key_of(&fp),
                    value: private_pem.as_bytes().to_vec(),
                    lease: 0,
                };
                etcd.txn(&[], &[put], &[])?;
            }
        }
        self.trim(&fp)
    }

    /// Forgets a stored key (its rotation was refused).
    pub fn forget(&self, private_pem: &str) -> anyhow::Result<()> {
        let fp = fingerprint(&public_of(private_pem)?);
        match &self.backend {
            Backend::Files => match std::fs::remove_file(self.dir().join(format!("{fp}.pem"))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            },
            Backend::Etcd { etcd, keys } => {
                etcd.delete_range(&keys.root_key_of(&fp), &[])?;
            }
        }
        Ok(())
    }

    /// Stored keys, newest first, then the bootstrap key: `(fingerprint or "", private PEM)`.
    fn candidates(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        match &self.backend {
            Backend::Files => {
                let mut files: Vec<(std::time::SystemTime, PathBuf)> =
                    match std::fs::read_dir(self.dir()) {
                        Ok(entries) => entries
                            .filter_map(Result::ok)
                            .filter(|e| e.path().extension().is_some_and(|x| x == "pem"))
                            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                            .collect(),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                        Err(e) => return Err(e.into()),
                    };
                files.sort_by_key(|f| std::cmp::Reverse(f.0));
                for (_, path) in files {
                    let fp = path
                        .file_stem()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    out.push((fp, std::fs::read_to_string(&path)?));
                }
                if let Ok(pem) =
                    std::fs::read_to_string(crate::server::root_key_path(&self.data_dir))
                {
                    out.push((String::new(), pem));
                }
            }
            Backend::Etcd { etcd, keys } => {
                let mut kvs = etcd.range(&Range::prefix(&keys.root_keys_prefix()))?.kvs;
                kvs.sort_by_key(|kv| std::cmp::Reverse(kv.create_revision));
                for kv in kvs {
                    let fp = String::from_utf8_lossy(&kv.key[keys.root_keys_prefix().len()..])
                        .into_owned();
                    out.push((fp, String::from_utf8(kv.value)?));
                }
                if let Some(kv) = etcd.get(&keys.root_key())? {
                    out.push((String::new(), String::from_utf8(kv.value)?));
                }
            }
        }
        Ok(out)
    }

    /// Drops the oldest stored keys beyond the newest [`ROOT_KEYS_KEPT_MAX`] (never `keep`).
    fn trim(&self, keep: &str) -> anyhow::Result<()> {
        let stored: Vec<String> = self
            .candidates()?
            .into_iter()
            .map(|(fp, _)| fp)
            .filter(|fp| !fp.is_empty())
            .collect();
        for fp in stored
            .iter()
            .skip(ROOT_KEYS_KEPT_MAX)
            .filter(|fp| *fp != keep)
        {
            match &self.backend {
                Backend::Files => std::fs::remove_file(self.dir().join(format!("{fp}.pem")))?,
                Backend::Etcd { etcd, keys } => {
                    etcd.delete_range(&keys.root_key_of(fp), &[])?;
                }
            }
        }
        Ok(())
    }

    /// The private key whose public half is `public_pem`, if this server can find it.
    pub fn private_for(&self, public_pem: &str) -> anyhow::Result<Option<String>> {
        let want = fingerprint(public_pem);
        for (fp, pem) in self.candidates()? {
            if (fp.is_empty() || fp == want)
                && public_of(&pem).is_ok_and(|p| fingerprint(&p) == want)
            {
                return Ok(Some(pem));
            }
        }
        Ok(None)
    }

    /// Mints an admin token (`system:cluster-admin`, subject `admin`) with `private_pem`.
    pub fn mint_admin(&self, private_pem: &str) -> anyhow::Result<String> {
        crate::api::auth::mint(
            private_pem,
            crate::api::auth::ROOT_KID,
            "admin",
            &["system:cluster-admin".to_string()],
            Default::default(),
            self.admin_lifetime_secs,
        )
    }

    /// Writes `keys/root.pem` (if it differs) and a fresh `admin.jwt` from the current key.
    fn refresh_files(&self, private_pem: &str) -> anyhow::Result<()> {
        let path = crate::server::root_key_path(&self.data_dir);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(private_pem) {
            write_private(&path, private_pem)?;
        }
        let token = self.mint_admin(private_pem)?;
        write_private(&self.data_dir.join("admin.jwt"), &token).context("writing admin.jwt")
    }
}

/// The journal's root public key.
fn root_public(bus: &Bus) -> Option<String> {
    bus.state()
        .credentials
        .get("system", "root")
        .map(|c| c.payload_pem.clone())
}

/// Keeps `admin.jwt` valid: written at start, at half its lifetime, and whenever the root key
/// changes, until `stop`.
pub async fn keep_admin_token(bus: Bus, keys: Arc<RootKeys>, mut stop: watch::Receiver<bool>) {
    let mut seqs = bus.last_seq();
    let half_life = Duration::from_secs(keys.admin_lifetime_secs.div_ceil(2).max(1));
    let mut written_for: Option<String> = None;
    let mut next = tokio::time::Instant::now();
    loop {
        let public = root_public(&bus);
        let due = tokio::time::Instant::now() >= next;
        if public.is_some() && (due || public != written_for) {
            let (k, p) = (keys.clone(), public.clone().unwrap_or_default());
            let done = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
                match k.private_for(&p)? {
                    Some(private) => k.refresh_files(&private).map(|()| true),
                    None => Ok(false),
                }
            })
            .await;
            match done {
                Ok(Ok(true)) => {
                    written_for = public;
                    next = tokio::time::Instant::now() + half_life;
                }
                Ok(Ok(false)) => {
                    tracing::warn!(
                        "no stored root key matches the journal's; admin.jwt not refreshed"
                    );
                    next = tokio::time::Instant::now() + Duration::from_millis(KEEPER_RETRY_MS);
                }
                Ok(Err(e)) => {
                    tracing::warn!("refreshing admin.jwt: {e:#}");
                    next = tokio::time::Instant::now() + Duration::from_millis(KEEPER_RETRY_MS);
                }
                Err(e) => tracing::error!("admin token keeper: {e}"),
            }
        }
        tokio::select! {
            _ = seqs.changed() => {}
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_the_public_half_the_journal_names() {
        let dir = tempfile::tempdir().unwrap();
        let keys = RootKeys::in_files(dir.path(), 60);
        let (first, first_pub) = crate::server::generate_root_key().unwrap();
        write_private(&crate::server::root_key_path(dir.path()), &first).unwrap();
        assert_eq!(keys.private_for(&first_pub).unwrap(), Some(first.clone()));
        let (next, next_pub) = crate::server::generate_root_key().unwrap();
        assert_eq!(keys.private_for(&next_pub).unwrap(), None);
        keys.store(&next).unwrap();
        assert_eq!(keys.private_for(&next_pub).unwrap(), Some(next.clone()));
        assert_eq!(
            keys.private_for(&first_pub).unwrap(),
            Some(first),
            "bootstrap key stays"
        );
        keys.forget(&next).unwrap();
        assert_eq!(keys.private_for(&next_pub).unwrap(), None);
        assert_eq!(fingerprint(&next_pub).len(), 16);
    }
}
