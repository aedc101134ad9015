//! Admin commands: Identify, Get Log Page, Get/Set Features, AER, Keep Alive, Abort.
//!
//! All admin commands complete synchronously on the admin queue's reactor; the
//! data they return is built into the command's slot buffer by `pages`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use crate::ctrl::{MASK_ANA, MASK_NS};
use crate::limits::{
    ADMIN_MAX_DATA_BYTES, MAX_DISCOVERY_ENTRIES, MAX_IO_QUEUES_PER_CTRL, MAX_NAMESPACES,
    MAX_OUTSTANDING_AERS,
};
use crate::nvme::{admin, aen, feat, log, Status, DISCOVERY_NQN, FABRICS};
use crate::pages::{self, CtrlIdentity, DiscoveryEntry, SmartCounters, IDENTIFY_BYTES};
use crate::queue::{Outcome, Queue};

/// NSID meaning "all namespaces".
const NSID_ALL: u32 = 0xffff_ffff;

/// The command's data buffer (`Queue::execute` gives every admin command that moves data
/// a maximal one), or an Internal Error completion should that ever not hold.
macro_rules! out {
    ($q:expr, $i:expr, $len:expr) => {
        match $q.data_mut($i, $len) {
            Some(b) => b,
            None => return Outcome::status(Status::INTERNAL),
        }
    };
}

impl Queue {
    /// Dispatches one admin command held in slot `i`.
    pub fn exec_admin(&mut self, i: usize) -> Outcome {
        let cmd = self.slots[i].cmd();
        let op = cmd.opcode();
        if self.ctrl.discovery
            && !matches!(
                op,
                FABRICS
                    | admin::IDENTIFY
                    | admin::GET_LOG_PAGE
                    | admin::KEEP_ALIVE
                    | admin::ASYNC_EVENT
                    | admin::GET_FEATURES
                    | admin::SET_FEATURES
            )
        {
            return Outcome::status(Status::INVALID_OPCODE);
        }
        match op {
            FABRICS => self.exec_fabrics(i),
            admin::IDENTIFY => self.identify(i),
            admin::GET_LOG_PAGE => self.get_log_page(i),
            admin::GET_FEATURES => self.get_features(i),
            admin::SET_FEATURES => self.set_features(i),
            admin::ASYNC_EVENT => self.async_event(i),
            admin::KEEP_ALIVE => {
                self.ctrl.state().last_keepalive = self.now;
                Outcome::status(Status::SUCCESS)
            }
            // Commands complete too fast to abort: report "not aborted" (DW0 bit 0).
            admin::ABORT => Outcome::Done {
                status: Status::SUCCESS,
                result: 1,
                c2h_len: 0,
            },
            _ => Outcome::status(Status::INVALID_OPCODE),
        }
    }

    fn xfer_len(&self, i: usize, natural: usize) -> u32 {
        (self.slots[i].xfer as usize).min(natural) as u32
    }

    fn identify(&mut self, i: usize) -> Outcome {
        let cmd = self.slots[i].cmd();
        let cns = cmd.cdw(10) as u8;
        let nsid = cmd.nsid();
        let csi = (cmd.cdw(11) >> 24) as u8;
        let len = self.xfer_len(i, IDENTIFY_BYTES);
        if self.ctrl.discovery && cns != 1 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let out_len = IDENTIFY_BYTES;
        match cns {
            0x00 => {
                if nsid == 0 || (nsid > MAX_NAMESPACES) {
                    return Outcome::status(Status::INVALID_NS);
                }
                let id = self.visible_ns(nsid).map(|n| n.identity());
                pages::identify_ns(out!(self, i, out_len), id.as_ref());
            }
            0x01 => {
                let shared = self.shared.clone();
                let cfg = &shared.cfg;
                let serial = cfg.serial();
                let id = CtrlIdentity {
                    cntlid: self.ctrl.cntlid,
                    subnqn: if self.ctrl.discovery {
                        DISCOVERY_NQN
                    } else {
                        &cfg.subsystem_nqn
                    },
                    serial: &serial,
                    model: crate::config::MODEL,
                    discovery: self.ctrl.discovery,
                };
                pages::identify_ctrl(out!(self, i, out_len), &id);
            }
            0x02 => {
                if nsid >= NSID_ALL - 1 {
                    return Outcome::status(Status::INVALID_NS);
                }
                let ids: Vec<u32> = self.visible_ids().collect();
                pages::ns_list(out!(self, i, out_len), ids.into_iter(), nsid);
            }
            0x03 => {
                let Some(uuid) = self.visible_ns(nsid).map(|n| n.spec.uuid) else {
                    return Outcome::status(Status::INVALID_NS);
                };
                pages::ns_descs(out!(self, i, out_len), &uuid);
            }
            0x05 | 0x06 if csi == 0 => {
                if cns == 0x05 && self.visible_ns(nsid).is_none() {
                    return Outcome::status(Status::INVALID_NS);
                }
                out!(self, i, out_len).fill(0);
            }
            _ => return Outcome::status(Status::INVALID_FIELD),
        }
        Outcome::data(len)
    }

    fn get_log_page(&mut self, i: usize) -> Outcome {
        let cmd = self.slots[i].cmd();
        let cdw10 = cmd.cdw(10);
        let lid = cdw10 as u8;
        let lsp = ((cdw10 >> 8) & 0x7f) as u8;
        let rae = cdw10 & (1 << 15) != 0;
        let numd = ((cmd.cdw(11) & 0xffff) << 16 | (cdw10 >> 16)) as usize + 1;
        let offset = cmd.cdw12_13();
        let len = numd * 4;
        if len > ADMIN_MAX_DATA_BYTES
            || len > self.slots[i].xfer as usize
            || !offset.is_multiple_of(4)
        {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let mut page_len = match self.build_log(i, lid, lsp, rae) {
            Ok(n) => n,
            Err(s) => return Outcome::status(s),
        };
        if lid == log::ANA {
            // Hosts size the ANA log by its maximum (every group, every namespace) and may
            // read it in pieces: past the descriptors it reads as zeroes.
            let max = pages::ANA_LOG_BYTES_MAX;
            if let Some(b) = self.data_mut(i, max) {
                b[page_len..].fill(0);
                page_len = max;
            }
        }
        let Ok(offset) = usize::try_from(offset) else {
            return Outcome::status(Status::INVALID_FIELD);
        };
        if offset > page_len {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let avail = (page_len - offset).min(len);
        let b = out!(self, i, ADMIN_MAX_DATA_BYTES);
        b.copy_within(offset..offset + avail, 0);
        b[avail..len].fill(0);
        Outcome::data(len as u32)
    }

    /// Builds log page `lid` at the start of slot `i`'s buffer; returns its length.
    fn build_log(&mut self, i: usize, lid: u8, lsp: u8, rae: bool) -> Result<usize, Status> {
        let disc = self.ctrl.discovery;
        match lid {
            log::DISCOVERY if disc => self.discovery_log(i).ok_or(Status::INTERNAL),
            _ if disc => Err(Status::INVALID_LOG_PAGE),
            log::ERROR => {
                self.data_mut(i, 64).ok_or(Status::INTERNAL)?.fill(0);
                Ok(64)
            }
            log::SMART => {
                let c = self.smart_counters();
                Ok(pages::smart_log(
                    self.data_mut(i, 512).ok_or(Status::INTERNAL)?,
                    &c,
                ))
            }
            log::FW_SLOT => Ok(pages::fw_slot_log(
                self.data_mut(i, 512).ok_or(Status::INTERNAL)?,
            )),
            log::CMD_EFFECTS => Ok(pages::effects_log(
                self.data_mut(i, 4096).ok_or(Status::INTERNAL)?,
            )),
            log::CHANGED_NS => {
                let ctrl = self.ctrl.clone();
                let mut st = ctrl.state();
                let n = pages::changed_ns_log(
                    self.data_mut(i, 4096).ok_or(Status::INTERNAL)?,
                    &st.changed_ns,
                    st.changed_overflow,
                );
                if !rae {
                    st.changed_ns.clear();
                    st.changed_overflow = false;
                    st.masked &= !MASK_NS;
                }
                Ok(n)
            }
            log::ANA if pages::REPORT_ANA => {
                let mut st = self.ctrl.state();
                let mut entries: Vec<pages::AnaEntry> = st
                    .seen
                    .iter()
                    .map(|s| pages::AnaEntry {
                        group: s.ana.group,
                        nsid: s.nsid,
                        optimized: s.ana.optimized,
                    })
                    .collect();
                let chg = st.ana_chgcnt;
                if !rae {
                    st.masked &= !MASK_ANA;
                }
                drop(st);
                entries.sort_unstable();
                let groups_only = lsp & 1 != 0;
                let need = pages::ana_log_len(&entries, groups_only);
                Ok(pages::ana_log(
                    self.data_mut(i, need).ok_or(Status::INTERNAL)?,
                    chg,
                    &entries,
                    groups_only,
                ))
            }
            _ => Err(Status::INVALID_LOG_PAGE),
        }
    }

    fn smart_counters(&self) -> SmartCounters {
        let s = &self.ctrl.stats;
        SmartCounters {
            read_bytes: s.read_bytes.load(Ordering::Relaxed),
            write_bytes: s.write_bytes.load(Ordering::Relaxed),
            read_cmds: s.read_cmds.load(Ordering::Relaxed),
            write_cmds: s.write_cmds.load(Ordering::Relaxed),
            uptime_s: self.shared.started.elapsed().as_secs(),
        }
    }

    fn discovery_log(&mut self, i: usize) -> Option<usize> {
        let shared = self.shared.clone();
        let io = shared.io_addr;
        let ip: IpAddr = if io.ip().is_unspecified() {
            self.local.ip()
        } else {
            io.ip()
        };
        let own = SocketAddr::new(ip, io.port());
        let peers = shared
            .peer_portals
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let entries: Vec<DiscoveryEntry<'_>> = std::iter::once(own)
            .chain(peers.into_iter().filter(|p| *p != own))
            .take(MAX_DISCOVERY_ENTRIES)
            .enumerate()
            .map(|(k, a)| DiscoveryEntry {
                portid: k as u16 + 1,
                traddr: a.ip().to_string(),
                trsvcid: a.port().to_string(),
                subnqn: &shared.cfg.subsystem_nqn,
                ipv6: a.is_ipv6(),
            })
            .collect();
        let n = entries.len();
        let gen = shared.generation.load(Ordering::Acquire);
        let b = self.data_mut(i, 1024 * (1 + n))?;
        Some(pages::discovery_log(b, gen, &entries[..n]))
    }

    fn get_features(&mut self, i: usize) -> Outcome {
        let cmd = self.slots[i].cmd();
        let fid = cmd.cdw(10) as u8;
        let sel = (cmd.cdw(10) >> 8) & 0x7;
        if sel == 3 {
            // Supported capabilities: nothing is saveable, everything is per-controller.
            return ok_result(0x4);
        }
        let kato_ms = self
            .ctrl
            .effective_kato_ms(self.shared.cfg.no_namespace_kato_ms);
        let st = self.ctrl.state();
        let v = match fid {
            feat::ARBITRATION | feat::POWER_MGMT | feat::ERR_RECOVERY => 0,
            feat::IRQ_COALESCE | feat::WRITE_ATOMIC => 0,
            feat::TEMP_THRESH => 0x157,
            feat::VOLATILE_WC => 1,
            feat::NUM_QUEUES => {
                let n = st.io_queues_granted.saturating_sub(1) as u64;
                n | (n << 16)
            }
            feat::ASYNC_EVENT => st.aec as u64,
            // What is enforced, which a host that sees no namespace cannot turn off.
            feat::KATO => kato_ms as u64,
            _ => return Outcome::status(Status::INVALID_FIELD),
        };
        ok_result(v)
    }

    fn set_features(&mut self, i: usize) -> Outcome {
        let cmd = self.slots[i].cmd();
        let fid = cmd.cdw(10) as u8;
        let save = cmd.cdw(10) & (1 << 31) != 0;
        let v = cmd.cdw(11);
        if save {
            return Outcome::status(Status::FEATURE_NOT_SAVEABLE);
        }
        let mut st = self.ctrl.state();
        match fid {
            feat::NUM_QUEUES if !self.ctrl.discovery => {
                let (nsq, ncq) = (v & 0xffff, v >> 16);
                if nsq == 0xffff || ncq == 0xffff {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                let n = (nsq.max(ncq) + 1).min(MAX_IO_QUEUES_PER_CTRL as u32) as u16;
                st.io_queues_granted = n;
                let r = (n - 1) as u64;
                ok_result(r | (r << 16))
            }
            feat::ASYNC_EVENT => {
                let supported = if self.ctrl.discovery {
                    1 << 31
                } else {
                    aen::CFG_NS_ATTR | aen::CFG_ANA_CHANGE
                };
                st.aec = v & supported;
                Outcome::status(Status::SUCCESS)
            }
            feat::KATO => {
                if v > crate::limits::MAX_KATO_MS {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                st.kato_ms = v;
                st.last_keepalive = self.now;
                Outcome::status(Status::SUCCESS)
            }
            feat::VOLATILE_WC | feat::TEMP_THRESH | feat::ARBITRATION | feat::POWER_MGMT => {
                // Accepted and ignored: the cache is always on, temperature is synthetic.
                Outcome::status(Status::SUCCESS)
            }
            feat::ERR_RECOVERY | feat::IRQ_COALESCE | feat::WRITE_ATOMIC => {
                Outcome::status(Status::FEATURE_NOT_CHANGEABLE)
            }
            _ => Outcome::status(Status::INVALID_FIELD),
        }
    }

    fn async_event(&mut self, i: usize) -> Outcome {
        if self.aers.len() >= MAX_OUTSTANDING_AERS {
            return Outcome::status(Status::AER_LIMIT);
        }
        self.aers.push(self.slots[i].cmd().cid());
        Outcome::Parked
    }
}

fn ok_result(v: u64) -> Outcome {
    Outcome::Done {
        status: Status::SUCCESS,
        result: v,
        c2h_len: 0,
    }
}
