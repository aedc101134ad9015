//! One blocking HTTP/1.1 GET to an IdP: over TCP, TLS for https (verified against the
//! system's CA bundle plus `--idp-ca-file`), directly or through an HTTP proxy (CONNECT for
//! https, an absolute-form request for http). Every connect, read and write is bounded by
//! [`IDP_FETCH_TIMEOUT_MS`] and the body by [`IDP_RESPONSE_BYTES_MAX`]; redirects are not
//! followed (discovery and JWKS URLs are the IdP's own).

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::cluster::http::{read_head, write_request, BodyReader};
use crate::domain::url::HttpUrl;
use crate::limits::{IDP_FETCH_TIMEOUT_MS, IDP_RESPONSE_BYTES_MAX};

/// Where distributions keep the system's CA bundle; the first that exists is read.
pub(crate) const SYSTEM_CA_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// Fetches documents from IdPs; cheap to share.
pub struct Fetcher {
    tls: Arc<rustls::ClientConfig>,
}

impl Fetcher {
    /// A fetcher trusting the system's CA bundle and, if given, the CAs in `extra_ca` (PEM).
    pub fn new(extra_ca: Option<&Path>) -> anyhow::Result<Fetcher> {
        let mut roots = rustls::RootCertStore::empty();
        let mut files: Vec<&Path> = SYSTEM_CA_BUNDLES
            .iter()
            .map(Path::new)
            .filter(|p| p.exists())
            .take(1)
            .collect();
        files.extend(extra_ca);
        for file in files {
            let certs = CertificateDer::pem_file_iter(file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading CA certificates from {}", file.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 && Some(file) == extra_ca {
                anyhow::bail!("{} holds no usable CA certificate", file.display());
            }
        }
        if roots.is_empty() {
            tracing::warn!("no CA certificates found: https IdPs cannot be verified");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Fetcher {
            tls: Arc::new(config),
        })
    }

    /// The body of a 200 answer to `GET url`, through `proxy` if given.
    pub fn get(&self, url: &HttpUrl, proxy: Option<&HttpUrl>) -> Result<Vec<u8>, String> {
        let hop = proxy.unwrap_or(url);
        let tcp = connect(hop).map_err(|e| format!("connecting to {}: {e}", hop.authority()))?;
        let mut stream: Box<dyn Stream> = Box::new(tcp);
        let mut target = url.path.clone();
        if proxy.is_some() {
            if url.https {
                stream = tunnel(stream, url)?;
            } else {
                // A plain-http proxy forwards an absolute-form request.
                target = format!("http://{}{}", url.authority(), url.path);
            }
        }
        if url.https {
            let name = ServerName::try_from(url.host.clone())
                .map_err(|e| format!("host {}: {e}", url.host))?;
            let conn = rustls::ClientConnection::new(self.tls.clone(), name)
                .map_err(|e| format!("TLS: {e}"))?;
            stream = Box::new(rustls::StreamOwned::new(conn, stream));
        }
        let mut r = BufReader::new(stream);
        let headers = [("Accept", "application/json"), ("Connection", "close")];
        write_request(r.get_mut(), "GET", &url.authority(), &target, &headers, &[])
            .map_err(|e| format!("sending the request: {e}"))?;
        let head = read_head(&mut r).map_err(|e| format!("reading the answer: {e}"))?;
        if head.status != 200 {
            return Err(format!("answered HTTP {}", head.status));
        }
        BodyReader::new(&mut r, &head)
            .read_all(IDP_RESPONSE_BYTES_MAX)
            .map_err(|e| format!("reading the body: {e}"))
    }
}

/// A TCP connection to the first address of `url`'s host that answers.
fn connect(url: &HttpUrl) -> std::io::Result<TcpStream> {
    let timeout = Duration::from_millis(IDP_FETCH_TIMEOUT_MS);
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port).to_socket_addrs()?.collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(tcp) => {
                tcp.set_read_timeout(Some(timeout))?;
                tcp.set_write_timeout(Some(timeout))?;
                return Ok(tcp);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Asks the proxy on `stream` for a tunnel to `url`'s host.
fn tunnel(stream: Box<dyn Stream>, url: &HttpUrl) -> Result<Box<dyn Stream>, String> {
    let authority = url.authority();
    let mut r = BufReader::new(stream);
    let line = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    r.get_mut()
        .write_all(line.as_bytes())
        .and_then(|()| r.get_mut().flush())
        .map_err(|e| format!("asking the proxy for a tunnel: {e}"))?;
    let head = read_head(&mut r).map_err(|e| format!("reading the proxy's answer: {e}"))?;
    if head.status != 200 {
        return Err(format!(
            "the proxy refused a tunnel to {authority}: HTTP {}",
            head.status
        ));
    }
    if !r.buffer().is_empty() {
        return Err("the proxy sent data before the tunnel was up".into());
    }
    Ok(r.into_inner())
}
