//! Fabrics commands: Connect (creating or joining a controller), Property Get/Set, disconnect.
//!
//! Connect is where a connection meets the admission ledger a second time (the first is
//! accept): an admin Connect needs the host NQN's and the address's controller share, an
//! I/O queue Connect the host NQN's connection share. A refusal for capacity is Controller
//! Busy without DNR, so hosts retry; a malformed Connect is Connect Invalid Parameters
//! pointing at the offending field (byte offset, SQE or data).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::admission::{ConnKey, Decision, PortClass};
use crate::ctrl::{Controller, ControllerInit};
use crate::limits::{
    CONNECT_CAPSULE_DATA_BYTES, MAX_KATO_MS, MAX_QUEUE_DEPTH, MIN_QUEUE_DEPTH, NQN_BYTES,
};
use crate::notify::Notifier;
use crate::nvme::{fctype, prop, Sqe, Status, DISCOVERY_NQN, FABRICS, VERSION};
use crate::queue::{Outcome, Queue};
use crate::target::Shared;

/// Dynamic controller model: the target picks the controller ID.
const CNTLID_DYNAMIC: u16 = 0xffff;
/// Connect attribute: host disables SQ flow control.
const CATTR_DISABLE_SQFLOW: u8 = 0x04;

/// Byte offsets of Connect fields, for Invalid Parameters results.
mod at {
    /// SQE: queue ID.
    pub const QID: u64 = 42;
    /// SQE: submission queue size.
    pub const SQSIZE: u64 = 44;
    /// SQE: keep alive timeout.
    pub const KATO: u64 = 48;
    /// Data: controller ID.
    pub const CNTLID: u64 = 16;
    /// Data: subsystem NQN.
    pub const SUBNQN: usize = 256;
    /// Data: host NQN.
    pub const HOSTNQN: usize = 512;
}

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

/// A refusal: completion status and CQE DW0.
type Refusal = (Status, u64);

/// Invalid Parameters pointing at a Connect data byte (IATTR = 1).
fn bad_data_field(offset: u64) -> Refusal {
    (Status::CONNECT_INVALID_PARAM, (1 << 16) | offset)
}

/// Invalid Parameters pointing at an SQE byte (IATTR = 0).
fn bad_sqe_field(offset: u64) -> Refusal {
    (Status::CONNECT_INVALID_PARAM, offset)
}

/// A capacity limit: the host may retry later.
const BUSY: Refusal = (Status::CONNECT_CTRL_BUSY_RETRY, 0);

/// The fields of a Connect that passed validation.
struct ConnectReq<'a> {
    qid: u16,
    depth: u16,
    sqflow_off: bool,
    kato_ms: u32,
    host_id: [u8; 16],
    cntlid: u16,
    hostnqn: &'a str,
    discovery: bool,
}

/// Validates a Connect capsule against the port it arrived on.
fn parse<'a>(
    shared: &Shared,
    port: PortClass,
    sqe: &Sqe<'_>,
    data: &'a [u8],
) -> Result<ConnectReq<'a>, Refusal> {
    if sqe.opcode() != FABRICS || sqe.fctype() != fctype::CONNECT {
        return Err((Status::CMD_SEQ_ERROR, 0));
    }
    if data.len() < CONNECT_CAPSULE_DATA_BYTES {
        return Err((Status::SGL_LENGTH_INVALID, 0));
    }
    if sqe.connect_recfmt() != 0 {
        return Err((Status::CONNECT_INCOMPATIBLE, 0));
    }
    let sqsize = sqe.connect_sqsize();
    if !(MIN_QUEUE_DEPTH - 1..MAX_QUEUE_DEPTH).contains(&sqsize) {
        return Err(bad_sqe_field(at::SQSIZE));
    }
    let field = |off: usize| &data[off..off + NQN_BYTES];
    let subnqn = crate::nqn::validate_field(field(at::SUBNQN))
        .map_err(|_| bad_data_field(at::SUBNQN as u64))?;
    let hostnqn = crate::nqn::validate_field(field(at::HOSTNQN))
        .map_err(|_| bad_data_field(at::HOSTNQN as u64))?;
    let discovery = subnqn == DISCOVERY_NQN;
    if !discovery && (subnqn != shared.cfg.subsystem_nqn || port == PortClass::Discovery) {
        return Err(bad_data_field(at::SUBNQN as u64));
    }
    let mut host_id = [0u8; 16];
    host_id.copy_from_slice(&data[0..16]);
    Ok(ConnectReq {
        qid: sqe.connect_qid(),
        depth: sqsize + 1,
        sqflow_off: sqe.connect_cattr() & CATTR_DISABLE_SQFLOW != 0,
        kato_ms: sqe.connect_kato(),
        host_id,
        cntlid: u16::from_le_bytes([data[16], data[17]]),
        hostnqn,
        discovery,
    })
}

/// The connection a Connect arrived on.
pub struct ConnectFrom<'a> {
    /// Its port.
    pub port: PortClass,
    /// Its entry in the admission ledger.
    pub conn: ConnKey,
    /// The host's address.
    pub remote: SocketAddr,
    /// Wakes the queue the Connect creates.
    pub notify: &'a Arc<Notifier>,
}

/// Handles the first capsule of a connection, which must be a Connect.
pub fn connect(
    shared: &Arc<Shared>,
    from: &ConnectFrom<'_>,
    sqe: &Sqe<'_>,
    data: &[u8],
) -> ConnectOutcome {
    let req = match parse(shared, from.port, sqe, data) {
        Ok(r) => r,
        Err((status, result)) => return ConnectOutcome::Refused { status, result },
    };
    let ctrl = if req.qid == 0 {
        create_controller(shared, from, &req)
    } else {
        join_io_queue(shared, from.conn, &req, from.notify)
    };
    match ctrl {
        Ok(ctrl) => ConnectOutcome::Accepted(Accepted {
            ctrl,
            qid: req.qid,
            depth: req.depth,
            sqflow_off: req.sqflow_off,
            notify: from.notify.clone(),
        }),
        Err((status, result)) => ConnectOutcome::Refused { status, result },
    }
}

/// Creates and registers a controller for an admin Connect, within the admission limits.
fn create_controller(
    shared: &Shared,
    from: &ConnectFrom<'_>,
    req: &ConnectReq<'_>,
) -> Result<Arc<Controller>, Refusal> {
    if req.cntlid != CNTLID_DYNAMIC {
        return Err(bad_data_field(at::CNTLID));
    }
    if req.kato_ms > MAX_KATO_MS {
        return Err(bad_sqe_field(at::KATO));
    }
    let (remote, conn) = (from.remote, from.conn);
    // The table is read under the registry lock; see Shared::publish.
    let mut reg = shared.registry();
    let table = shared.table();
    let sees_ns = !req.discovery && table.visible(req.hostnqn, remote.ip()).next().is_some();
    let Some(cntlid) = reg.allocate_id() else {
        return Err(BUSY);
    };
    let ledger_key = {
        let mut ledger = shared.ledger();
        match ledger.decide_controller(&shared.caps, conn, req.hostnqn) {
            Decision::Admit => ledger.add_controller(conn, req.hostnqn, sees_ns),
            d => {
                tracing::info!(host = %req.hostnqn, %remote, decision = ?d, "controller refused");
                return Err(BUSY);
            }
        }
    };
    let init = ControllerInit {
        cntlid,
        host_nqn: req.hostnqn.to_owned(),
        host_id: req.host_id,
        remote,
        discovery: req.discovery,
        kato_ms: req.kato_ms,
        admin_notify: from.notify.clone(),
        ledger_key,
    };
    let c = Arc::new(Controller::new(init, &table));
    reg.insert(c.clone());
    tracing::info!(cntlid = c.cntlid, host = %c.host_nqn, remote = %c.remote, discovery = c.discovery, "controller created");
    Ok(c)
}

/// Attaches an I/O queue to the controller its Connect names.
///
/// The queue is matched by controller ID and host NQN, as Linux nvmet and SPDK do; the
/// Host Identifier is not compared, since some initiators send a fresh one per Connect.
fn join_io_queue(
    shared: &Shared,
    conn: ConnKey,
    req: &ConnectReq<'_>,
    notify: &Arc<Notifier>,
) -> Result<Arc<Controller>, Refusal> {
    if req.discovery {
        return Err(bad_sqe_field(at::QID)); // discovery controllers have no I/O queues
    }
    let c = shared
        .registry()
        .get(req.cntlid)
        .filter(|c| !c.discovery && !c.is_dead())
        .ok_or(bad_data_field(at::CNTLID))?;
    if c.host_nqn != req.hostnqn {
        return Err(bad_data_field(at::HOSTNQN as u64));
    }
    if c.host_id != req.host_id {
        tracing::debug!(
            cntlid = c.cntlid,
            "I/O queue Connect with a different Host Identifier"
        );
    }
    let mut st = c.state();
    if st.cc & 1 == 0 || st.csts & 1 == 0 {
        return Err((Status::CMD_SEQ_ERROR, 0));
    }
    if req.qid > st.io_queues_granted || st.io_queues.iter().any(|(q, _)| *q == req.qid) {
        return Err((Status::INVALID_QID, 0));
    }
    {
        let mut ledger = shared.ledger();
        match ledger.decide_join(&shared.caps, c.ledger_key) {
            Decision::Admit => ledger.join(conn, c.ledger_key),
            d => {
                tracing::info!(cntlid = c.cntlid, decision = ?d, "I/O queue refused");
                return Err(BUSY);
            }
        }
    }
    st.io_queues.push((req.qid, notify.clone()));
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
