//! Catching up past the etcd tail: a server whose journal is older than the oldest batch
//! etcd still keeps fetches a checkpoint of a live peer's whole journal (events, rows and
//! head: a RocksDB checkpoint, consistent at one head), installs it in place of its own, and
//! follows etcd from there.
//!
//! The peer serves it at `POST /internal/v1/journal-checkpoint` to a cluster-admin token
//! (members mint one with the shared root key). The fetching side pins the peer's TLS
//! certificate to the SHA-256 the peer published in its etcd liveness key, so etcd vouches
//! for the peer. The installed journal must verify (checksums, chain, head), and the next
//! batch from etcd must chain onto its head, so a peer cannot slip in another history.
//!
//! Archive format: `EVSCKPT1`, then per file `u16 name length ‖ name ‖ u64 size ‖ bytes`
//! (little endian), then a `u16` 0.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use evstor_journal::RocksJournal;
use sha2::{Digest, Sha256};

use super::http::{self, BodyReader};
use super::AliveRecord;
use crate::limits::{CHECKPOINT_BYTES_MAX, CHECKPOINT_IO_MS};

const MAGIC: &[u8; 8] = b"EVSCKPT1";
/// Longest file name in an archive (RocksDB names are short).
const NAME_BYTES_MAX: usize = 255;

/// The route peers fetch checkpoints from.
pub const ROUTE: &str = "/internal/v1/journal-checkpoint";

/// SHA-256 (hex) of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fingerprint of the first certificate in a PEM file.
pub fn cert_file_fingerprint(path: &Path) -> anyhow::Result<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let cert = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .next()
        .context("no certificate in the file")??;
    Ok(fingerprint(&cert))
}

/// Writes an archive of a checkpoint of `journal` into an unlinked file under `scratch`
/// and returns it positioned at the start.
pub fn archive(journal: &RocksJournal, scratch: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(scratch)?;
    let id = uuid::Uuid::new_v4();
    let dir = scratch.join(format!("checkpoint-{id}"));
    let path = scratch.join(format!("checkpoint-{id}.archive"));
    journal.checkpoint(&dir)?;
    let written = write_archive(&dir, &path);
    let _ = std::fs::remove_dir_all(&dir);
    written?;
    let file = File::open(&path)?;
    std::fs::remove_file(&path)?; // the open handle keeps it until the transfer ends
    Ok(file)
}

fn write_archive(dir: &Path, path: &Path) -> anyhow::Result<()> {
    let mut out = io::BufWriter::new(File::create(path)?);
    out.write_all(MAGIC)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let len = entry.metadata()?.len();
        out.write_all(&(name.len() as u16).to_le_bytes())?;
        out.write_all(name.as_bytes())?;
        out.write_all(&len.to_le_bytes())?;
        let copied = io::copy(&mut File::open(entry.path())?.take(len), &mut out)?;
        anyhow::ensure!(copied == len, "{name} changed while archived");
    }
    out.write_all(&0u16.to_le_bytes())?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Reads an archive into `dest` (created; must not exist), every file synced.
pub fn unpack(input: &mut impl Read, dest: &Path) -> anyhow::Result<u64> {
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic)?;
    anyhow::ensure!(&magic == MAGIC, "not a journal checkpoint");
    std::fs::create_dir(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut total = 0u64;
    loop {
        let mut n = [0u8; 2];
        input.read_exact(&mut n)?;
        let name_len = u16::from_le_bytes(n) as usize;
        if name_len == 0 {
            break;
        }
        anyhow::ensure!(name_len <= NAME_BYTES_MAX, "file name too long");
        let mut name = vec![0u8; name_len];
        input.read_exact(&mut name)?;
        let name = String::from_utf8(name).context("file name is not UTF-8")?;
        anyhow::ensure!(
            !name.contains('/') && name != "." && name != "..",
            "bad file name {name:?}"
        );
        let mut len = [0u8; 8];
        input.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        total += len;
        anyhow::ensure!(
            total <= CHECKPOINT_BYTES_MAX,
            "checkpoint over {CHECKPOINT_BYTES_MAX} bytes"
        );
        let mut f = File::create(dest.join(&name))?;
        let copied = io::copy(&mut input.take(len), &mut f)?;
        anyhow::ensure!(copied == len, "{name} cut short");
        f.sync_all()?;
    }
    File::open(dest)?.sync_all()?;
    Ok(total)
}

/// Accepts exactly the certificate etcd named for the peer.
#[derive(Debug)]
struct Pinned {
    sha256: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.sha256 {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the peer's certificate is not the one its etcd liveness key names".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Fetches a checkpoint from `peer` into `dest` (which must not exist).
pub fn fetch(peer: &AliveRecord, token: &str, dest: &Path) -> anyhow::Result<u64> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            sha256: peer.cert_sha256.clone(),
            provider,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let addr: SocketAddr = peer
        .api_endpoint
        .parse()
        .with_context(|| format!("peer API endpoint {:?}", peer.api_endpoint))?;
    let io_timeout = Duration::from_millis(CHECKPOINT_IO_MS);
    let tcp = TcpStream::connect_timeout(&addr, io_timeout)?;
    tcp.set_read_timeout(Some(io_timeout))?;
    tcp.set_write_timeout(Some(io_timeout))?;
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    let auth = format!("Bearer {token}");
    http::write_request(
        tls.get_mut(),
        "POST",
        &peer.api_endpoint,
        ROUTE,
        &[("Authorization", &auth), ("Connection", "close")],
        &[],
    )?;
    let head = http::read_head(&mut tls)?;
    let mut body = BodyReader::new(&mut tls, &head);
    if head.status != 200 {
        let text = body.read_all(64 * 1024).unwrap_or_default();
        anyhow::bail!(
            "peer {} answered {}: {}",
            peer.name,
            head.status,
            String::from_utf8_lossy(&text)
        );
    }
    unpack(&mut body, dest)
}

/// Replaces the journal directory `journal_dir` with the one unpacked in `incoming`: the old
/// one is kept aside until the new one is in place, then removed.
pub fn install(incoming: &Path, journal_dir: &Path) -> anyhow::Result<()> {
    let aside: PathBuf = journal_dir.with_extension("replaced");
    let _ = std::fs::remove_dir_all(&aside);
    if journal_dir.exists() {
        std::fs::rename(journal_dir, &aside)?;
    }
    std::fs::rename(incoming, journal_dir)?;
    if let Some(parent) = journal_dir.parent() {
        File::open(parent)?.sync_all()?;
    }
    let _ = std::fs::remove_dir_all(&aside);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use evstor_journal::{AppendBatch, EventLog, NewEvent, OpenMode};

    #[test]
    fn an_archived_checkpoint_unpacks_to_the_same_journal() {
        let dir = tempfile::tempdir().unwrap();
        let j = RocksJournal::open(&dir.path().join("j"), OpenMode::ReadWrite).unwrap();
        for seq in 1..=50u64 {
            j.append(AppendBatch {
                first_seq: seq,
                events: vec![NewEvent {
                    time_unix_ns: seq,
                    actor: "a".into(),
                    project: String::new(),
                    request_id: format!("r{seq}"),
                    event_type: "E".into(),
                    schema_version: 1,
                    payload: vec![seq as u8; 100],
                }],
                projections: vec![],
            })
            .unwrap();
        }
        let mut file = archive(&j, &dir.path().join("scratch")).unwrap();
        let dest = dir.path().join("copy");
        unpack(&mut file, &dest).unwrap();
        let copy = RocksJournal::open(&dest, OpenMode::ReadOnly).unwrap();
        assert_eq!(copy.head(), j.head());
        assert!(copy.verify().unwrap().is_ok());
        let mut garbage = &b"NOTACKPTxxxx"[..];
        assert!(unpack(&mut garbage, &dir.path().join("bad")).is_err());
    }
}
