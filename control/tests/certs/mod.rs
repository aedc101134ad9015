//! A throwaway PKI for TLS tests: a CA, a server certificate for 127.0.0.1 and a client
//! certificate it signed, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// The PEM files of one test PKI.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// The arguments that make etcd serve clients over TLS with this PKI and take only
    /// clients with a certificate its CA signed.
    pub fn etcd_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--cert-file".into(),
            self.server_cert.clone().into(),
            "--key-file".into(),
            self.server_key.clone().into(),
            "--trusted-ca-file".into(),
            self.ca.clone().into(),
            "--client-cert-auth".into(),
        ]
    }
}

/// Writes a new CA (named `name`), a server certificate for 127.0.0.1/localhost and a
/// client certificate, both signed by it, into `dir`.
pub fn write(dir: &Path, name: &str) -> TestPki {
    let file = |f: &str, pem: String| {
        let p = dir.join(format!("{name}-{f}.pem"));
        std::fs::write(&p, pem).expect("write PEM");
        p
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, format!("evstor test CA {name}"));
    let ca = ca.self_signed(&ca_key).expect("CA certificate");
    let leaf = |names: Vec<String>, purposes: Vec<ExtendedKeyUsagePurpose>, cn: &str| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names).expect("params");
        p.extended_key_usages = purposes;
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &ca, &ca_key).expect("certificate");
        (cert.pem(), key.serialize_pem())
    };
    // etcd's gRPC gateway connects to etcd itself with the server certificate.
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        "etcd",
    );
    let (client_cert, client_key) = leaf(
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        "evstor",
    );
    TestPki {
        ca: file("ca", ca.pem()),
        server_cert: file("server", server_cert),
        server_key: file("server-key", server_key),
        client_cert: file("client", client_cert),
        client_key: file("client-key", client_key),
    }
}
