//! Identify data structures and log pages, built into caller-provided buffers.
//!
//! Pure functions of their inputs (no locks, no I/O), so they are unit-tested
//! byte by byte and the controllers only decide *what* to report.

use crate::limits::ANA_GROUPS_MAX;
use crate::limits::{
    ADMIN_IN_CAPSULE_DATA_BYTES, IN_CAPSULE_DATA_BYTES, LBA_SHIFT, MAX_NAMESPACES,
    MAX_OUTSTANDING_AERS, MAX_QUEUE_DEPTH, MDTS,
};
use crate::nvme::{aen, VERSION};

/// Size of Identify data structures.
pub const IDENTIFY_BYTES: usize = 4096;
/// ANA state: optimized.
pub const ANA_OPTIMIZED: u8 = 0x01;
/// ANA state: inaccessible.
pub const ANA_INACCESSIBLE: u8 = 0x03;
/// Set CMIC.ANA (bit 3) and report ANA; the Linux host then requires the ANA log to parse.
pub const REPORT_ANA: bool = true;

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Copies `s` into `b[at..at+len]`, padding with `pad` (space for identify strings, NUL for NQNs).
fn put_str(b: &mut [u8], at: usize, len: usize, s: &str, pad: u8) {
    let field = &mut b[at..at + len];
    field.fill(pad);
    let n = s.len().min(len);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Which controller an Identify Controller describes.
#[derive(Debug, Clone)]
pub struct CtrlIdentity<'a> {
    /// Controller ID.
    pub cntlid: u16,
    /// Subsystem NQN (or the discovery NQN).
    pub subnqn: &'a str,
    /// Serial number.
    pub serial: &'a str,
    /// Model number.
    pub model: &'a str,
    /// Whether this is a discovery controller.
    pub discovery: bool,
}

/// Firmware revision reported everywhere.
pub const FIRMWARE_REV: &str = "0.1.0";

/// Identify Controller (CNS 01h).
pub fn identify_ctrl(out: &mut [u8], id: &CtrlIdentity<'_>) {
    out[..IDENTIFY_BYTES].fill(0);
    let b = &mut out[..IDENTIFY_BYTES];
    put16(b, 0, 0x1b96); // VID: unassigned-looking PCI vendor for a software target
    put16(b, 2, 0x1b96);
    put_str(b, 4, 20, id.serial, b' ');
    put_str(b, 24, 40, id.model, b' ');
    put_str(b, 64, 8, FIRMWARE_REV, b' ');
    b[72] = 6; // RAB
    if !id.discovery {
        b[76] = 0x2 | if REPORT_ANA { 0x8 } else { 0 }; // CMIC: multi-controller (+ ANA)
    }
    b[77] = MDTS;
    put16(b, 78, id.cntlid);
    put32(b, 80, VERSION);
    if !id.discovery {
        let ana = if REPORT_ANA { aen::CFG_ANA_CHANGE } else { 0 };
        put32(b, 92, aen::CFG_NS_ATTR | ana); // OAES
    }
    b[111] = if id.discovery { 2 } else { 1 }; // CNTRLTYPE
    b[259] = (MAX_OUTSTANDING_AERS - 1) as u8; // AERL
    b[260] = 0x3; // FRMW: slot 1 read-only, one slot
    b[261] = 0x2 | 0x4; // LPA: command effects log, extended data for get log page
    put16(b, 266, 0x157); // WCTEMP 343 K
    put16(b, 268, 0x175); // CCTEMP 373 K
    put16(b, 320, 1); // KAS: 100 ms granularity
    b[512] = 0x66; // SQES
    b[513] = 0x44; // CQES
    put16(b, 514, MAX_QUEUE_DEPTH); // MAXCMD
    if !id.discovery {
        fill_nvm_ctrl_fields(b);
    }
    put32(b, 536, 1 | (1 << 20)); // SGLS: SGLs supported, offset addressing for in-capsule data
    put_str(b, 768, 256, id.subnqn, 0);
    let icd = if id.discovery {
        ADMIN_IN_CAPSULE_DATA_BYTES
    } else {
        IN_CAPSULE_DATA_BYTES
    };
    put32(b, 1792, ((64 + icd) / 16) as u32); // IOCCSZ
    put32(b, 1796, 1); // IORCSZ
    put16(b, 1800, 0); // ICDOFF
    b[1802] = 0; // FCATT: dynamic controller model
    b[1803] = 1; // MSDBD
                 // Power state 0: 25 W max, operational.
    put16(b, 2048, 2500);
}

fn fill_nvm_ctrl_fields(b: &mut [u8]) {
    if REPORT_ANA {
        b[342] = 10; // ANATT seconds
                     // ANACAP: optimized and inaccessible states reported; a namespace's group may
                     // change (it follows the server that serves the namespace optimized).
        b[343] = 0x1 | 0x4;
        put32(b, 344, ANA_GROUPS_MAX); // ANAGRPMAX
        put32(b, 348, ANA_GROUPS_MAX); // NANAGRPID
    }
    put32(b, 516, MAX_NAMESPACES); // NN
    put16(b, 520, (1 << 2) | (1 << 3)); // ONCS: dataset management, write zeroes
    b[525] = 0x1 | (0x2 << 1); // VWC present; flush of all namespaces not supported
    put32(b, 540, MAX_NAMESPACES); // MNAN
}

/// What Identify Namespace needs to know about one namespace.
#[derive(Debug, Clone, Copy)]
pub struct NsIdentity {
    /// Capacity in logical blocks.
    pub blocks: u64,
    /// Volume UUID (also used as NGUID).
    pub uuid: [u8; 16],
    /// ANA group ID.
    pub ana_group: u32,
}

/// Identify Namespace (CNS 00h); `ns` None yields the all-zero inactive structure.
pub fn identify_ns(out: &mut [u8], ns: Option<&NsIdentity>) {
    out[..IDENTIFY_BYTES].fill(0);
    let Some(ns) = ns else { return };
    let b = &mut out[..IDENTIFY_BYTES];
    put64(b, 0, ns.blocks); // NSZE
    put64(b, 8, ns.blocks); // NCAP
    put64(b, 16, ns.blocks); // NUSE
    b[24] = 0x1 | (0x1 << 3); // NSFEAT: thin provisioning; NGUID never reused
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS: format 0
    b[30] = 0x1; // NMIC: may be shared
    b[33] = 0x1 | (1 << 3); // DLFEAT: deallocated blocks read 0; write zeroes deallocate supported
    if REPORT_ANA {
        put32(b, 92, ns.ana_group); // ANAGRPID
    }
    b[104..120].copy_from_slice(&ns.uuid); // NGUID
                                           // LBA format 0: no metadata, 2^LBA_SHIFT bytes, best performance.
    put32(b, 128, (LBA_SHIFT as u32) << 16);
}

/// Active namespace ID list (CNS 02h): ids greater than `after`, ascending, at most 1024.
pub fn ns_list(out: &mut [u8], ids: impl Iterator<Item = u32>, after: u32) {
    out[..IDENTIFY_BYTES].fill(0);
    for (i, id) in ids.filter(|&id| id > after).take(1024).enumerate() {
        put32(out, i * 4, id);
    }
}

/// Namespace Identification Descriptor list (CNS 03h): NGUID, UUID, CSI.
pub fn ns_descs(out: &mut [u8], uuid: &[u8; 16]) {
    out[..IDENTIFY_BYTES].fill(0);
    let mut at = 0;
    for (nidt, nidl) in [(2u8, 16usize), (3, 16)] {
        out[at] = nidt;
        out[at + 1] = nidl as u8;
        out[at + 4..at + 4 + nidl].copy_from_slice(uuid);
        at += 4 + nidl;
    }
    out[at] = 4; // CSI: NVM command set (value 0)
    out[at + 1] = 1;
}

/// Counters reported in the SMART / health log.
#[derive(Debug, Clone, Copy, Default)]
pub struct SmartCounters {
    /// Bytes read by hosts.
    pub read_bytes: u64,
    /// Bytes written by hosts.
    pub write_bytes: u64,
    /// Read commands.
    pub read_cmds: u64,
    /// Write commands.
    pub write_cmds: u64,
    /// Seconds since the target started.
    pub uptime_s: u64,
}

/// SMART / Health Information log (02h), 512 bytes.
pub fn smart_log(out: &mut [u8], c: &SmartCounters) -> usize {
    let b = &mut out[..512];
    b.fill(0);
    put16(b, 1, 300); // composite temperature, Kelvin
    b[3] = 100; // available spare
    b[4] = 10; // spare threshold
               // Data units are thousands of 512-byte units, rounded up.
    put64(b, 32, c.read_bytes.div_ceil(512_000));
    put64(b, 48, c.write_bytes.div_ceil(512_000));
    put64(b, 64, c.read_cmds);
    put64(b, 80, c.write_cmds);
    put64(b, 128, c.uptime_s / 3600); // power on hours
    put64(b, 112, 1); // power cycles
    512
}

/// Firmware Slot Information log (03h), 512 bytes.
pub fn fw_slot_log(out: &mut [u8]) -> usize {
    let b = &mut out[..512];
    b.fill(0);
    b[0] = 1; // active slot 1
    put_str(b, 8, 8, FIRMWARE_REV, b' ');
    512
}

/// Commands Supported and Effects log (05h), 4096 bytes.
pub fn effects_log(out: &mut [u8]) -> usize {
    let b = &mut out[..4096];
    b.fill(0);
    const CSUPP: u32 = 1;
    const LBCC: u32 = 1 << 1;
    for op in [0x02u8, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x18] {
        put32(b, op as usize * 4, CSUPP);
    }
    for (op, extra) in [
        (0x00u8, 0),
        (0x01, LBCC),
        (0x02, 0),
        (0x08, LBCC),
        (0x09, LBCC),
    ] {
        put32(b, 1024 + op as usize * 4, CSUPP | extra);
    }
    4096
}

/// Changed Namespace List log (04h), 4096 bytes; overflow reports 0xFFFFFFFF.
pub fn changed_ns_log(out: &mut [u8], ids: &[u32], overflow: bool) -> usize {
    let b = &mut out[..4096];
    b.fill(0);
    if overflow {
        put32(b, 0, u32::MAX);
    } else {
        for (i, id) in ids.iter().take(1024).enumerate() {
            put32(b, i * 4, *id);
        }
    }
    4096
}

/// One namespace in the ANA log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AnaEntry {
    /// ANA group ID.
    pub group: u32,
    /// Namespace ID.
    pub nsid: u32,
    /// Optimized, else inaccessible.
    pub optimized: bool,
}

/// Largest ANA log: every group, every namespace (what hosts size their reads by).
pub const ANA_LOG_BYTES_MAX: usize =
    16 + 32 * ANA_GROUPS_MAX as usize + 4 * crate::limits::MAX_NAMESPACES as usize;
const _: () = assert!(ANA_LOG_BYTES_MAX <= crate::limits::ADMIN_MAX_DATA_BYTES);

/// Bytes of the ANA log for `entries` (sorted by group, then nsid).
pub fn ana_log_len(entries: &[AnaEntry], groups_only: bool) -> usize {
    let groups = entries
        .iter()
        .enumerate()
        .filter(|(i, e)| *i == 0 || entries[i - 1].group != e.group)
        .count();
    16 + 32 * groups + if groups_only { 0 } else { 4 * entries.len() }
}

/// ANA log (0Ch): one descriptor per group of `entries` (sorted by group, then nsid; a
/// group's namespaces share its state), listing its namespaces unless `groups_only`.
pub fn ana_log(out: &mut [u8], chgcnt: u64, entries: &[AnaEntry], groups_only: bool) -> usize {
    let len = ana_log_len(entries, groups_only);
    let b = &mut out[..len];
    b.fill(0);
    put64(b, 0, chgcnt);
    let mut at = 16;
    let mut ngroups = 0u16;
    let mut i = 0;
    while i < entries.len() {
        let g = entries[i].group;
        let n = entries[i..].iter().take_while(|e| e.group == g).count();
        put32(b, at, g);
        put32(b, at + 4, if groups_only { 0 } else { n as u32 });
        put64(b, at + 8, chgcnt);
        b[at + 16] = if entries[i].optimized {
            ANA_OPTIMIZED
        } else {
            ANA_INACCESSIBLE
        };
        at += 32;
        if !groups_only {
            for e in &entries[i..i + n] {
                put32(b, at, e.nsid);
                at += 4;
            }
        }
        ngroups += 1;
        i += n;
    }
    put16(b, 8, ngroups);
    len
}

/// One subsystem port in the discovery log.
#[derive(Debug, Clone)]
pub struct DiscoveryEntry<'a> {
    /// Port ID.
    pub portid: u16,
    /// Transport address (IPv4 dotted quad).
    pub traddr: String,
    /// Transport service id (TCP port).
    pub trsvcid: String,
    /// Subsystem NQN.
    pub subnqn: &'a str,
    /// IPv6 instead of IPv4.
    pub ipv6: bool,
}

/// Discovery log page (70h): 1 KiB header plus 1 KiB per entry.
pub fn discovery_log(out: &mut [u8], genctr: u64, entries: &[DiscoveryEntry<'_>]) -> usize {
    let len = 1024 * (1 + entries.len());
    let b = &mut out[..len];
    b.fill(0);
    put64(b, 0, genctr);
    put64(b, 8, entries.len() as u64);
    for (i, e) in entries.iter().enumerate() {
        let r = &mut b[1024 * (i + 1)..1024 * (i + 2)];
        r[0] = 3; // TRTYPE: TCP
        r[1] = if e.ipv6 { 2 } else { 1 }; // ADRFAM
        r[2] = 2; // SUBTYPE: NVM subsystem
        r[3] = 0; // TREQ: secure channel not specified
        put16(r, 4, e.portid);
        put16(r, 6, 0xffff); // CNTLID: dynamic
        put16(r, 8, 32); // ASQSZ
        put_str(r, 32, 32, &e.trsvcid, b' ');
        put_str(r, 256, 256, e.subnqn, 0);
        put_str(r, 512, 256, &e.traddr, b' ');
        r[768] = 0; // TSAS.SECTYPE: none
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_ctrl_fields_land_where_linux_reads_them() {
        let mut b = vec![0u8; 4096];
        let id = CtrlIdentity {
            cntlid: 7,
            subnqn: "nqn.x",
            serial: "S1",
            model: "M",
            discovery: false,
        };
        identify_ctrl(&mut b, &id);
        assert_eq!(&b[4..8], b"S1  ");
        assert_eq!(u16::from_le_bytes([b[78], b[79]]), 7);
        assert_eq!(u32::from_le_bytes([b[80], b[81], b[82], b[83]]), VERSION);
        assert_eq!(&b[768..773], b"nqn.x");
        assert_eq!(b[773], 0);
        assert_eq!(
            u32::from_le_bytes([b[1792], b[1793], b[1794], b[1795]]),
            516
        );
        assert_eq!(b[111], 1);
    }

    #[test]
    fn ns_list_filters_and_orders() {
        let mut b = vec![0u8; 4096];
        ns_list(&mut b, [1u32, 3, 9].into_iter(), 1);
        assert_eq!(&b[..12], &[3, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn discovery_log_has_header_and_record() {
        let mut b = vec![0u8; 4096];
        let e = DiscoveryEntry {
            portid: 1,
            traddr: "127.0.0.1".into(),
            trsvcid: "4420".into(),
            subnqn: "nqn.s",
            ipv6: false,
        };
        let n = discovery_log(&mut b, 5, &[e]);
        assert_eq!(n, 2048);
        assert_eq!(b[8], 1);
        assert_eq!(b[1024], 3);
        assert_eq!(&b[1024 + 32..1024 + 38], b"4420  ");
        assert_eq!(&b[1024 + 512..1024 + 521], b"127.0.0.1");
    }

    #[test]
    fn ana_log_has_a_descriptor_per_group_with_its_state_and_namespaces() {
        let e = |group, nsid, optimized| AnaEntry {
            group,
            nsid,
            optimized,
        };
        let entries = [e(1, 1, true), e(1, 2, true), e(3, 7, false)];
        let mut b = vec![0u8; 4096];
        assert_eq!(ana_log(&mut b, 2, &entries, false), 16 + 32 + 8 + 32 + 4);
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 2, "two groups");
        assert_eq!((b[16], b[20], b[32]), (1, 2, ANA_OPTIMIZED));
        assert_eq!((b[48], b[52]), (1, 2), "group 1's namespaces");
        assert_eq!((b[56], b[60], b[72]), (3, 1, ANA_INACCESSIBLE));
        assert_eq!(b[88], 7);
        assert_eq!(ana_log(&mut b, 2, &entries, true), 16 + 64);
        assert_eq!(b[20], 0, "groups only: no namespace lists");
    }
}
