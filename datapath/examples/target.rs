//! Standalone NVMe/TCP target for manual testing and the host-VM tests.
//!
//! ```text
//! target LISTEN_ADDR BACKING_DIR [--namespaces N] [--size-mib M] [--nqn NQN]
//!        [--discovery ADDR] (--allow-any | --host HOSTNQN...) [--max-connections N]
//! ```
//! Prints `TARGET-READY <io addr>` once listening; runs until stdin closes or
//! a line `quit` is read. A line `add` publishes one more namespace (ACL as given).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use evstor_datapath::{Acl, NamespaceSpec, TargetConfig};

struct Args {
    listen: SocketAddr,
    dir: PathBuf,
    namespaces: u32,
    size_mib: u64,
    nqn: String,
    discovery: Option<SocketAddr>,
    acl: Acl,
    max_connections: usize,
}

fn parse() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let listen = it.next().context("LISTEN_ADDR")?.parse()?;
    let dir = PathBuf::from(it.next().context("BACKING_DIR")?);
    let mut a = Args {
        listen,
        dir,
        namespaces: 1,
        size_mib: 256,
        nqn: "nqn.2024-01.io.evstor:subsys".into(),
        discovery: None,
        acl: Acl::AllowNone,
        max_connections: evstor_datapath::limits::DEFAULT_MAX_CONNECTIONS,
    };
    let mut hosts = Vec::new();
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("value for {flag}"));
        match flag.as_str() {
            "--namespaces" => a.namespaces = val()?.parse()?,
            "--size-mib" => a.size_mib = val()?.parse()?,
            "--nqn" => a.nqn = val()?,
            "--discovery" => a.discovery = Some(val()?.parse()?),
            "--max-connections" => a.max_connections = val()?.parse()?,
            "--allow-any" => a.acl = Acl::AllowAny,
            "--host" => hosts.push(val()?),
            other => bail!("unknown argument {other}"),
        }
    }
    if !hosts.is_empty() {
        a.acl = Acl::List(hosts);
    }
    Ok(a)
}

fn spec(a: &Args, nsid: u32) -> NamespaceSpec {
    let mut uuid = [0u8; 16];
    uuid[..4].copy_from_slice(b"evst");
    uuid[12..].copy_from_slice(&nsid.to_be_bytes());
    uuid[6] = 0x40 | (uuid[6] & 0x0f);
    uuid[8] = 0x80 | (uuid[8] & 0x3f);
    NamespaceSpec {
        nsid,
        uuid,
        size_bytes: a.size_mib << 20,
        backing: evstor_datapath::Backing::File(a.dir.join(format!("ns{nsid}.img"))),
        host_acl: a.acl.clone(),
        ip_acl: Acl::AllowAny,
        qos: Default::default(),
        ana: Default::default(),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let a = parse()?;
    std::fs::create_dir_all(&a.dir)?;
    let mut cfg = TargetConfig::new(a.listen, a.nqn.clone());
    cfg.discovery_addr = a.discovery;
    cfg.max_connections = a.max_connections;
    let mut specs: Vec<_> = (1..=a.namespaces).map(|n| spec(&a, n)).collect();
    let t = evstor_datapath::start(cfg, specs.clone())?;
    println!("TARGET-READY {}", t.local_addr());
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "quit" => break,
            "add" => {
                let next = specs.len() as u32 + 1;
                specs.push(spec(&a, next));
                t.try_set_namespaces(specs.clone())?;
                println!("ADDED {next}");
            }
            "hosts" => println!("{:?}", t.connected_hosts()),
            _ => {}
        }
    }
    t.shutdown();
    Ok(())
}
