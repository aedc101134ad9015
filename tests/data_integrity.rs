//! A block whose bytes change on the device behind evstor's back (bit rot, a stray write) is
//! caught by its checksum: the host's read fails with an unrecovered read error instead of
//! returning bad data, the volume's statistics count it, the journal records a
//! `VolumeDataIntegrityError` event, and the rest of the volume keeps working.

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::Server;
use evstor_datapath::initiator::Session;
use evstor_datapath::nvme::Status;
use serde_json::json;

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:a5a5a5a5-0000-4000-8000-00000000c0c0";
const P: &str = "/api/v2/projects/default";

/// Byte offsets of every 4 KiB page of `f` that holds data (SEEK_DATA over the sparse file).
fn data_pages(f: &std::fs::File) -> Vec<u64> {
    let len = f.metadata().unwrap().len() as i64;
    let mut pages = Vec::new();
    let mut at = 0i64;
    while at < len {
        // SAFETY: lseek on an owned, open descriptor with plain integer arguments.
        let data = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let mut p = data & !4095;
        while p < hole {
            pages.push(p as u64);
            p += 4096;
        }
        at = hole;
    }
    pages
}

#[test]
fn a_corrupted_block_is_a_media_error_an_event_and_a_statistic() {
    let s = Server::start();
    let c = s.admin();
    let (status, v) = c.post(
        &format!("{P}/volumes"),
        &json!({"name": "v", "size": "16 MiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1}),
    );
    assert_eq!(status, 200, "{v}");
    let uuid = v["UUID"].as_str().unwrap().to_string();
    let v = s.wait_for(&format!("{P}/volumes/{uuid}"), |_, v| {
        v["state"] == "Available"
    });
    let ns = v["nsid"].as_u64().unwrap() as u32;
    let (_, info) = c.get("/api/v2/clusterinfo");
    let nqn = info["subsystemNQN"].as_str().unwrap();
    let mut h = Session::connect(
        SocketAddr::from(([127, 0, 0, 1], s.nvme_port)),
        nqn,
        HOSTNQN,
    )
    .expect("connect");

    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.data_dir().join("devices").join("dev0.img"))
        .expect("device file");
    let before = data_pages(&dev);
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    h.write_fua(ns, 5, &block).expect("write");
    let page = *data_pages(&dev)
        .iter()
        .find(|p| !before.contains(p))
        .expect("the written block's page on the device");
    let mut got = vec![0u8; 4096];
    dev.read_exact_at(&mut got, page).unwrap();
    assert_eq!(got, block, "raw data at {page}");
    assert_eq!(h.read(ns, 5, 1).expect("clean read"), block);

    dev.write_all_at(&[got[100] ^ 0x01], page + 100).unwrap();
    let err = h
        .read(ns, 5, 1)
        .expect_err("a corrupted block must not read");
    assert_eq!(err.status(), Some(Status::READ_ERROR), "{err}");
    // The rest of the volume is fine; a rewrite of the bad block heals it.
    assert_eq!(h.read(ns, 6, 1).expect("neighbour"), vec![0u8; 4096]);

    let v = s.wait_for(&format!("{P}/volumes/{uuid}"), |_, v| {
        v["statistics"]["unrecoverableDataIntegrityErrors"] == 1
    });
    assert_eq!(v["state"], "Available");
    let (_, node) = c.get("/api/v2/nodes");
    assert_eq!(
        node["nodes"][0]["statistics"]["UnrecoverableDataIntegrityErrors"],
        1
    );
    let (_, devices) = c.get("/api/v2/nvmeDevices");
    assert_eq!(
        devices["NvmeDevices"][0]["statistics"]["UnrecoverableDataIntegrityErrors"], 1,
        "{devices}"
    );
    let events = s.wait_for("/api/v2/events?limit=1000", |_, e| {
        e["events"].as_array().is_some_and(|l| {
            l.iter()
                .any(|e| e["EventName"] == "VolumeDataIntegrityError")
        })
    });
    let e = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["EventName"] == "VolumeDataIntegrityError")
        .unwrap()
        .clone();
    assert_eq!(e["Severity"], "High", "{e}");
    assert!(e["Description"].as_str().unwrap().contains(&uuid), "{e}");

    h.write(ns, 5, &block).expect("rewrite");
    assert_eq!(h.read(ns, 5, 1).expect("healed"), block);
}
