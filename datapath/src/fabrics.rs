//! Fabrics commands: Connect (creating or joining a controller), Property Get/Set, disconnect.

use std::net::TcpStream;
use std::sync::Arc;

use crate::conn::{Outcome, PortKind, Queue};
use crate::ctrl::{Controller, ControllerInit};
use crate::error::DatapathError;
use crate::limits::{MAX_KATO_MS, MAX_QUEUE_DEPTH, MIN_QUEUE_DEPTH, NQN_BYTES};
use crate::notify::Notifier;
use crate::nvme::{fctype, prop, Sqe, Status, DISCOVERY_NQN, FABRICS, VERSION};
use crate::target::Shared;

/// Size of the Connect command's data.
const CONNECT_DATA_BYTES: usize = 1024;
/// Dynamic controller model: the target picks the controller ID.
const CNTLID_DYNAMIC: u16 = 0xffff;
/// Connect attribute: host disables SQ flow control.
const CATTR_DISABLE_SQFLOW: u8 = 0x04;

/// A successful Connect.
pub struct Accepted {
    /// The controller the queue belongs to.
    pub ctrl: Arc<Controller>,
    /// Queue ID.
    pub qid: u16,
    /// Queue depth (SQSIZE + 1).
    pub depth: u16,
    /// The host disabled SQ flow control.
    pub sqflow_off: bool,
    /// The queue's wake-up.
    pub notify: Arc<Notifier>,
}

/// What Connect decided.
pub enum ConnectOutcome {
    /// The queue is connected.
    Accepted(Accepted),
    /// Answer with this status and close.
    Refused {
        /// Completion status.
        status: Status,
        /// CQE DW0 (invalid parameter location for Connect Invalid Parameters).
        result: u64,
    },
}

fn refuse(status: Status, result: u64) -> Result<ConnectOutcome, DatapathError> {
    Ok(ConnectOutcome::Refused { status, result })
}

/// Invalid Parameters pointing at a Connect data byte.
fn bad_data_field(offset: u64) -> Result<ConnectOutcome, DatapathError> {
    refuse(Status::CONNECT_INVALID_PARAM, (1 << 16) | offset)
}

/// Invalid Parameters pointing at an SQE byte.
fn bad_sqe_field(offset: u64) -> Result<ConnectOutcome, DatapathError> {
    refuse(Status::CONNECT_INVALID_PARAM, offset)
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Handles the first capsule of a connection, which must be a Connect.
pub fn connect(
    shared: &Arc<Shared>,
    stream: &TcpStream,
    port: PortKind,
    sqe: &Sqe<'_>,
    data: &[u8],
) -> Result<ConnectOutcome, DatapathError> {
    if sqe.opcode() != FABRICS || sqe.fctype() != fctype::CONNECT {
        return refuse(Status::CMD_SEQ_ERROR, 0);
    }
    if data.len() < CONNECT_DATA_BYTES {
        return refuse(Status::SGL_LENGTH_INVALID, 0);
    }
    if sqe.connect_recfmt() != 0 {
        return refuse(Status::CONNECT_INCOMPATIBLE, 0);
    }
    let sqsize = sqe.connect_sqsize();
    if !(MIN_QUEUE_DEPTH - 1..MAX_QUEUE_DEPTH).contains(&sqsize) {
        return bad_sqe_field(44);
    }
    let host_id: [u8; 16] = match data[0..16].try_into() {
        Ok(a) => a,
        Err(_) => return bad_data_field(0),
    };
    let cntlid = u16::from_le_bytes([data[16], data[17]]);
    let subnqn = cstr(&data[256..256 + NQN_BYTES]);
    let hostnqn = cstr(&data[512..512 + NQN_BYTES]);
    let discovery = subnqn == DISCOVERY_NQN;
    if !discovery && (subnqn != shared.cfg.subsystem_nqn || port == PortKind::Discovery) {
        return bad_data_field(256);
    }
    if hostnqn.is_empty() {
        return bad_data_field(512);
    }
    let notify = Arc::new(Notifier::new()?);
    let qid = sqe.connect_qid();
    let depth = sqsize + 1;
    let sqflow_off = sqe.connect_cattr() & CATTR_DISABLE_SQFLOW != 0;
    let ctrl = if qid == 0 {
        if cntlid != CNTLID_DYNAMIC {
            return bad_data_field(16);
        }
        let kato_ms = sqe.connect_kato();
        if kato_ms > MAX_KATO_MS {
            return bad_sqe_field(48);
        }
        let init = ControllerInit {
            cntlid: 0,
            host_nqn: hostnqn,
            host_id,
            remote: stream.peer_addr()?,
            discovery,
            kato_ms,
            admin_notify: notify.clone(),
        };
        match create_controller(shared, init) {
            Some(c) => c,
            None => return refuse(Status::CONNECT_CTRL_BUSY, 0),
        }
    } else {
        match join_io_queue(shared, cntlid, qid, &hostnqn, &host_id, discovery, &notify) {
            Ok(c) => c,
            Err((status, result)) => return refuse(status, result),
        }
    };
    Ok(ConnectOutcome::Accepted(Accepted {
        ctrl,
        qid,
        depth,
        sqflow_off,
        notify,
    }))
}

/// Registers a new controller under a fresh ID (None when every ID is taken).
fn create_controller(shared: &Shared, mut init: ControllerInit) -> Option<Arc<Controller>> {
    // The table is read under the registry lock; see Shared::publish.
    let mut reg = shared.registry();
    init.cntlid = reg.allocate_id()?;
    let c = Arc::new(Controller::new(init, &shared.table()));
    reg.insert(c.clone());
    tracing::info!(cntlid = c.cntlid, host = %c.host_nqn, remote = %c.remote, discovery = c.discovery, "controller created");
    Some(c)
}

fn join_io_queue(
    shared: &Shared,
    cntlid: u16,
    qid: u16,
    hostnqn: &str,
    host_id: &[u8; 16],
    discovery: bool,
    notify: &Arc<Notifier>,
) -> Result<Arc<Controller>, (Status, u64)> {
    if discovery {
        return Err((Status::CONNECT_INVALID_PARAM, 42));
    }
    let invalid_cntlid = (Status::CONNECT_INVALID_PARAM, (1 << 16) | 16);
    let c = shared.registry().get(cntlid).ok_or(invalid_cntlid)?;
    if c.discovery || c.is_dead() || c.host_nqn != hostnqn || &c.host_id != host_id {
        return Err(invalid_cntlid);
    }
    let mut st = c.state();
    if st.cc & 1 == 0 || st.csts & 1 == 0 {
        return Err((Status::CMD_SEQ_ERROR, 0));
    }
    if qid > st.io_queues_granted || st.io_queues.iter().any(|(q, _)| *q == qid) {
        return Err((Status::INVALID_QID, 0));
    }
    st.io_queues.push((qid, notify.clone()));
    drop(st);
    Ok(c)
}

/// Detaches a queue from its controller; the admin queue takes the controller with it.
pub fn disconnect(shared: &Shared, ctrl: &Arc<Controller>, qid: u16) {
    if qid == 0 {
        shared.registry().remove(ctrl);
        ctrl.kill();
        tracing::info!(cntlid = ctrl.cntlid, "controller removed");
    } else {
        ctrl.state().io_queues.retain(|(q, _)| *q != qid);
    }
}

/// CAP: MQES, CQR, TO = 15 s, NVM command set.
fn cap() -> u64 {
    (MAX_QUEUE_DEPTH as u64 - 1) | (1 << 16) | (30 << 24) | (1 << 37)
}

impl Queue {
    /// Fabrics commands after Connect: Property Get/Set.
    pub fn exec_fabrics(&mut self, i: usize) -> Outcome {
        let cmd = self.slots[i].cmd();
        if self.qid != 0 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        match cmd.fctype() {
            fctype::PROPERTY_GET => self.property_get(cmd.prop_offset(), cmd.prop_attrib()),
            fctype::PROPERTY_SET => {
                self.property_set(cmd.prop_offset(), cmd.prop_attrib(), cmd.prop_value())
            }
            fctype::CONNECT => Outcome::status(Status::CMD_SEQ_ERROR),
            _ => Outcome::status(Status::INVALID_OPCODE),
        }
    }

    fn property_get(&mut self, offset: u32, attrib: u8) -> Outcome {
        let st = self.ctrl.state();
        let (value, wide) = match offset {
            prop::CAP => (cap(), true),
            prop::VS => (VERSION as u64, false),
            prop::CC => (st.cc as u64, false),
            prop::CSTS => (st.csts as u64, false),
            prop::NSSR => (0, false),
            _ => return Outcome::status(Status::INVALID_FIELD),
        };
        if wide != (attrib == 1) {
            return Outcome::status(Status::INVALID_FIELD);
        }
        Outcome::Done {
            status: Status::SUCCESS,
            result: value,
            c2h_len: 0,
        }
    }

    fn property_set(&mut self, offset: u32, attrib: u8, value: u64) -> Outcome {
        if offset != prop::CC || attrib != 0 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let v = value as u32;
        let mut st = self.ctrl.state();
        let was_enabled = st.cc & 1 != 0;
        st.cc = v;
        if v & 1 != 0 && !was_enabled {
            st.csts = (st.csts | 1) & !0xc;
        } else if v & 1 == 0 {
            st.csts &= !1;
        }
        if (v >> 14) & 0x3 != 0 {
            // Shutdown: nothing is cached beyond what Flush already covers; report complete.
            st.csts = (st.csts & !0xc) | (0x2 << 2);
        }
        Outcome::status(Status::SUCCESS)
    }
}
