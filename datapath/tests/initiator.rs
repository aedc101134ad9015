//! The crate's own synchronous initiator (`evstor_datapath::initiator`) against an
//! in-process target: data round trips at sizes around the in-capsule limit and MDTS,
//! flush, deallocate, write zeroes, and NVMe error statuses surfacing as errors.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use evstor_datapath::initiator::{InitiatorError, NamespaceInfo, Session};
use evstor_datapath::limits::MAX_DATA_BYTES;
use evstor_datapath::nvme::Status;
use evstor_datapath::{start, Acl, NamespaceSpec, TargetConfig, TargetHandle};

const NQN: &str = "nqn.2024-01.io.evstor:initiator";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0b1e0b1e-0000-4000-8000-000000000001";
const BLOCK: usize = 4096;
/// 16 MiB namespaces.
const NS_BLOCKS: u64 = 8192;
/// Blocks of the largest command the target takes (MDTS).
const MDTS_BLOCKS: usize = MAX_DATA_BYTES / 4096;

/// A target with nsid 1 (visible to HOST) and nsid 2 (visible to nobody).
fn target(dir: &Path) -> TargetHandle {
    let ns = |nsid: u32, host_acl| NamespaceSpec {
        nsid,
        uuid: [nsid as u8; 16],
        size_bytes: NS_BLOCKS * BLOCK as u64,
        backing: evstor_datapath::Backing::File(dir.join(format!("ns{nsid}"))),
        host_acl,
        ip_acl: Acl::AllowAny,
        qos: Default::default(),
        ana: Default::default(),
    };
    let cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    let specs = vec![ns(1, Acl::List(vec![HOST.into()])), ns(2, Acl::AllowNone)];
    start(cfg, specs).expect("start target")
}

/// Bytes that differ per block and per seed, so a misplaced block is caught.
fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BLOCK)
        .map(|i| ((i / BLOCK) as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
        .collect()
}

fn status_of<T: std::fmt::Debug>(r: Result<T, InitiatorError>) -> Status {
    match r {
        Err(e) => e
            .status()
            .unwrap_or_else(|| panic!("expected an NVMe status, got {e}")),
        Ok(v) => panic!("expected an NVMe status, got Ok({v:?})"),
    }
}

#[test]
fn session_sees_only_the_namespaces_its_acl_admits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = target(dir.path());

    let mut s = Session::connect(t.local_addr(), NQN, HOST)?;

    assert_eq!(s.active_namespaces()?, vec![1]);
    let info = NamespaceInfo {
        blocks: NS_BLOCKS,
        block_bytes: BLOCK as u32,
    };
    assert_eq!(s.namespace(1)?, info);
    assert_eq!(s.namespace_blocks(1)?, NS_BLOCKS);
    assert_eq!(s.max_transfer_bytes(), MAX_DATA_BYTES, "the target's MDTS");
    assert!(t
        .connected_hosts()
        .iter()
        .any(|h| h.cntlid == s.cntlid() && h.io_queues == 1));
    t.shutdown();
    Ok(())
}

#[test]
fn writes_read_back_at_sizes_around_the_capsule_and_mdts_limits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = target(dir.path());
    let mut s = Session::connect(t.local_addr(), NQN, HOST)?;

    // 1 and 2 blocks fit in the capsule (8 KiB), 16 need an R2T, 32 is one backend part,
    // 33 and 67 several; MDTS (2048) is the largest command, 2051 is split into two.
    let sizes = [1usize, 2, 3, 16, 32, 33, 67, MDTS_BLOCKS, MDTS_BLOCKS + 3];
    let mut lba = 3;
    for (seed, blocks) in sizes.into_iter().enumerate() {
        let data = pattern(blocks, seed as u8);
        if seed % 2 == 0 {
            s.write(1, lba, &data)?;
        } else {
            s.write_fua(1, lba, &data)?;
        }
        assert!(
            s.read(1, lba, blocks as u32)? == data,
            "{blocks} blocks at {lba}"
        );
        lba += blocks as u64;
    }
    s.flush(1)?;

    // Read everything again with differently sized commands: the splits landed in place.
    let mut whole = Vec::new();
    for (seed, blocks) in sizes.into_iter().enumerate() {
        whole.extend(pattern(blocks, seed as u8));
    }
    let back = s.read(1, 3, (lba - 3) as u32)?;
    assert!(back == whole, "one large read sees every write in place");
    t.shutdown();
    Ok(())
}

#[test]
fn deallocated_and_zeroed_blocks_read_as_zeroes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = target(dir.path());
    let mut s = Session::connect(t.local_addr(), NQN, HOST)?;
    s.write(1, 100, &pattern(48, 7))?;

    s.deallocate(1, 104, 8)?;
    s.write_zeroes(1, 120, 4)?;

    let back = s.read(1, 100, 48)?;
    for (i, block) in back.chunks(BLOCK).enumerate() {
        let lba = 100 + i as u64;
        let cleared = (104..112).contains(&lba) || (120..124).contains(&lba);
        if cleared {
            assert!(block.iter().all(|&b| b == 0), "lba {lba} reads zeroes");
        } else {
            assert!(
                block == &pattern(48, 7)[i * BLOCK..(i + 1) * BLOCK],
                "lba {lba} kept"
            );
        }
    }
    t.shutdown();
    Ok(())
}

#[test]
fn failed_commands_carry_their_status_and_the_session_goes_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = target(dir.path());
    let mut s = Session::connect(t.local_addr(), NQN, HOST)?;
    s.write(1, NS_BLOCKS - 1, &pattern(1, 9))?;

    assert_eq!(status_of(s.read(1, NS_BLOCKS, 1)), Status::LBA_RANGE);
    assert_eq!(
        status_of(s.read(1, NS_BLOCKS - 1, 2)),
        Status::LBA_RANGE,
        "crosses the end"
    );
    assert_eq!(
        status_of(s.write(1, NS_BLOCKS - 1, &pattern(2, 0))),
        Status::LBA_RANGE
    );
    assert_eq!(
        status_of(s.write(1, NS_BLOCKS, &pattern(20, 0))),
        Status::LBA_RANGE,
        "R2T-sized"
    );
    assert_eq!(status_of(s.deallocate(1, NS_BLOCKS, 1)), Status::LBA_RANGE);
    assert_eq!(
        status_of(s.write_zeroes(1, NS_BLOCKS, 1)),
        Status::LBA_RANGE
    );
    assert_eq!(
        status_of(s.read(2, 0, 1)),
        Status::INVALID_NS,
        "hidden by its ACL"
    );
    assert_eq!(
        status_of(s.read(9, 0, 1)),
        Status::INVALID_NS,
        "no such namespace"
    );

    assert!(
        s.read(1, NS_BLOCKS - 1, 1)? == pattern(1, 9),
        "still usable"
    );
    t.shutdown();
    Ok(())
}

#[test]
fn requests_the_initiator_cannot_send_are_refused_locally() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = target(dir.path());
    let mut s = Session::connect(t.local_addr(), NQN, HOST)?;

    assert!(matches!(s.read(1, 0, 0), Err(InitiatorError::Invalid(_))));
    assert!(matches!(
        s.write(1, 0, &[1; 100]),
        Err(InitiatorError::Invalid(_))
    ));
    assert!(matches!(
        s.write(1, 0, &[]),
        Err(InitiatorError::Invalid(_))
    ));
    assert!(matches!(
        s.read(1, u64::MAX - 1, 64),
        Err(InitiatorError::Invalid(_))
    ));

    s.read(1, 0, 1)?;
    t.shutdown();
    Ok(())
}

#[test]
fn connect_to_an_unknown_subsystem_fails_with_the_connect_status() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = target(dir.path());

    let r = Session::connect(t.local_addr(), "nqn.2024-01.io.evstor:nope", HOST);

    assert_eq!(status_of(r.map(|_| ())), Status::CONNECT_INVALID_PARAM);
    t.shutdown();
    Ok(())
}

#[test]
fn a_silent_target_times_out_instead_of_hanging() -> anyhow::Result<()> {
    // Accepts connections (the kernel does, from the backlog) but never answers.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr: SocketAddr = listener.local_addr()?;

    let r = Session::connect_timeout(addr, NQN, HOST, Duration::from_millis(200));

    match r {
        Err(InitiatorError::Io(e)) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
        Err(e) => panic!("expected a timeout, got {e}"),
        Ok(_) => panic!("a silent listener cannot complete a handshake"),
    }
    drop(listener);
    Ok(())
}
