//! Who may hold what: the target's admission and capacity policy, as pure decisions over
//! a ledger of what every connection and controller holds.
//!
//! NVMe/TCP has no authentication before Connect, and without DH-HMAC-CHAP none after it
//! either, so any peer that reaches a port can open connections and create controllers.
//! The policy keeps such a peer from locking legitimate hosts out:
//!
//! - **Separate budgets per port.** The I/O port and the discovery port each have their
//!   own connection limit; filling one never refuses the other.
//! - **Per-peer shares.** One source address and one host NQN may each hold only so many
//!   connections and controllers (the address is known at accept, the NQN at Connect).
//! - **Bounded handshake.** ICReq and Connect must both arrive within one overall deadline
//!   from accept (enforced by the connection, not here).
//! - **Bounded lifetime without a namespace.** A controller that sees no namespace (every
//!   discovery controller, and an I/O controller no ACL admits) gets an effective keep-alive
//!   timeout of at most `no_namespace_kato_ms` (120 s by default, like Linux nvmet's
//!   discovery KATO); a KATO of 0, from Connect or from Set Features, means that ceiling,
//!   not "never". Linux hosts send keep-alives (every KATO/2, 5 s KATO for I/O controllers)
//!   and persistent discovery controllers do too, so they are unaffected. A controller
//!   that sees a namespace keeps the KATO it asked for, 0 included: an ACL admitted it.
//! - **Reclaim under pressure.** When a port is full, a new connection is not refused
//!   while something on that port is reclaimable: first the oldest connection still in
//!   its handshake (it has not even said who it is; it is closed), then the oldest
//!   controller that sees no namespace (it is torn down with its queues). What is
//!   reclaimed stops counting at once. Controllers that see a namespace are never
//!   reclaimed, so a port full of admitted hosts refuses newcomers.
//! - **Descriptor reserve.** A connection is admitted only while the process keeps
//!   `fd_reserve` descriptors free beyond what the connection itself needs
//!   ([`FDS_PER_CONNECTION`]), so existing connections can still open files and rings.
//!
//! Connections in the handshake count against their port and address until they end;
//! the handshake deadline bounds how long that is. The ledger does no I/O and reads no
//! clock: the caller passes descriptor counts in and carries out a reclaim itself, so a
//! thread-per-connection target and a reactor share it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::canonical_ip;
use crate::limits::FDS_PER_CONNECTION;

/// The listener a connection arrived on; each has its own connection budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortClass {
    /// The I/O port (which also serves discovery controllers).
    Io,
    /// The dedicated discovery port.
    Discovery,
}

/// The limits the policy enforces (from [`crate::TargetConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Connections on the I/O port.
    pub io_connections: usize,
    /// Connections on the discovery port.
    pub discovery_connections: usize,
    /// Connections one host NQN may hold (admin and I/O queues of all its controllers).
    pub connections_per_host: usize,
    /// Controllers one host NQN may hold.
    pub controllers_per_host: usize,
    /// Connections one source address may hold (handshakes included).
    pub connections_per_addr: usize,
    /// Controllers one source address may hold.
    pub controllers_per_addr: usize,
    /// Descriptors kept free for the data path beyond a new connection's own.
    pub fd_reserve: usize,
}

/// Open file descriptors of the process and its limit (RLIMIT_NOFILE, soft).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fds {
    /// Descriptors open now.
    pub open: usize,
    /// The most the process may have open.
    pub limit: usize,
}

/// A connection in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnKey(u64);

/// A controller in the ledger; keys grow with age, so the smallest is the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CtrlKey(u64);

/// What a reclaim takes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    /// A connection still in its handshake (no Connect yet): close it.
    Handshake(ConnKey),
    /// A controller that sees no namespace: tear it down, with its queues.
    Controller(CtrlKey),
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Admit,
    /// Go ahead after taking this back ([`Ledger::reclaim`] it, then close or kill it).
    Reclaim(Victim),
    /// No.
    Refuse(Refusal),
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Admitting it would eat into the descriptor reserve.
    FdReserve,
    /// The port is full and nothing on it may be reclaimed.
    PortFull,
    /// The source address holds its share of connections.
    AddrConnections,
    /// The source address holds its share of controllers.
    AddrControllers,
    /// The host NQN holds its share of connections.
    HostConnections,
    /// The host NQN holds its share of controllers.
    HostControllers,
}

#[derive(Debug)]
struct Conn {
    port: PortClass,
    ip: IpAddr,
    ctrl: Option<CtrlKey>,
    /// Closed by a reclaim during its handshake: it counts for nothing any more.
    reclaimed: bool,
}

#[derive(Debug)]
struct Ctrl {
    port: PortClass,
    ip: IpAddr,
    host: String,
    sees_ns: bool,
    /// Torn down by a reclaim: neither it nor its connections count any more.
    reclaimed: bool,
    /// Connections bound to it still open (the entry goes with the last one).
    conns: usize,
}

/// What every connection and controller holds.
#[derive(Debug, Default)]
pub struct Ledger {
    conns: BTreeMap<ConnKey, Conn>,
    ctrls: BTreeMap<CtrlKey, Ctrl>,
    next_key: u64,
}

/// The keep-alive timeout a controller is held to, in ms (0 = none). `requested` is what
/// the host asked for (Connect or Set Features); see the module docs for the policy.
pub fn effective_kato_ms(requested: u32, sees_namespace: bool, no_namespace_kato_ms: u32) -> u32 {
    if sees_namespace {
        requested
    } else if requested == 0 {
        no_namespace_kato_ms
    } else {
        requested.min(no_namespace_kato_ms)
    }
}

impl Ledger {
    fn key(&mut self) -> u64 {
        self.next_key += 1;
        self.next_key
    }

    /// Whether a connection still counts (neither it nor its controller was reclaimed).
    fn counts(&self, c: &Conn) -> bool {
        !c.reclaimed
            && c.ctrl
                .and_then(|k| self.ctrls.get(&k))
                .is_none_or(|k| !k.reclaimed)
    }

    fn held_conns(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values().filter(|c| self.counts(c))
    }

    fn held_ctrls(&self) -> impl Iterator<Item = (&CtrlKey, &Ctrl)> {
        self.ctrls.iter().filter(|(_, c)| !c.reclaimed)
    }

    fn host_conns(&self, host: &str) -> usize {
        self.held_conns()
            .filter_map(|c| c.ctrl.and_then(|k| self.ctrls.get(&k)))
            .filter(|k| k.host == host)
            .count()
    }

    /// Connections that count against `port`.
    pub fn port_connections(&self, port: PortClass) -> usize {
        self.held_conns().filter(|c| c.port == port).count()
    }

    /// Whether a new connection from `ip` on `port` may be served.
    pub fn decide_accept(&self, caps: &Caps, port: PortClass, ip: IpAddr, fds: Fds) -> Decision {
        let need = FDS_PER_CONNECTION.saturating_add(caps.fd_reserve);
        if fds.open.saturating_add(need) > fds.limit {
            return Decision::Refuse(Refusal::FdReserve);
        }
        let ip = canonical_ip(ip);
        if self.held_conns().filter(|c| c.ip == ip).count() >= caps.connections_per_addr {
            return Decision::Refuse(Refusal::AddrConnections);
        }
        let cap = match port {
            PortClass::Io => caps.io_connections,
            PortClass::Discovery => caps.discovery_connections,
        };
        if self.port_connections(port) < cap {
            return Decision::Admit;
        }
        self.reclaimable(port)
            .map_or(Decision::Refuse(Refusal::PortFull), Decision::Reclaim)
    }

    /// The oldest handshake on `port`, else its oldest controller without a namespace.
    fn reclaimable(&self, port: PortClass) -> Option<Victim> {
        let handshake = self
            .conns
            .iter()
            .find(|(_, c)| c.port == port && c.ctrl.is_none() && !c.reclaimed)
            .map(|(k, _)| Victim::Handshake(*k));
        handshake.or_else(|| {
            self.held_ctrls()
                .find(|(_, c)| c.port == port && !c.sees_ns)
                .map(|(k, _)| Victim::Controller(*k))
        })
    }

    /// Records an admitted connection.
    pub fn open_conn(&mut self, port: PortClass, ip: IpAddr) -> ConnKey {
        let key = ConnKey(self.key());
        let ip = canonical_ip(ip);
        self.conns.insert(
            key,
            Conn {
                port,
                ip,
                ctrl: None,
                reclaimed: false,
            },
        );
        key
    }

    /// Forgets a connection that ended (and its controller's entry with its last one).
    pub fn close_conn(&mut self, conn: ConnKey) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let Some(k) = c.ctrl else {
            return;
        };
        let last = self.ctrls.get_mut(&k).is_some_and(|e| {
            e.conns = e.conns.saturating_sub(1);
            e.conns == 0
        });
        if last {
            self.ctrls.remove(&k);
        }
    }

    /// Whether connection `conn` (an admin Connect) may create a controller for `host`.
    pub fn decide_controller(&self, caps: &Caps, conn: ConnKey, host: &str) -> Decision {
        let Some(c) = self.conns.get(&conn).filter(|c| !c.reclaimed) else {
            return Decision::Refuse(Refusal::PortFull); // reclaimed meanwhile
        };
        let ctrls = || self.held_ctrls().map(|(_, e)| e);
        if ctrls().filter(|e| e.host == host).count() >= caps.controllers_per_host {
            return Decision::Refuse(Refusal::HostControllers);
        }
        if ctrls().filter(|e| e.ip == c.ip).count() >= caps.controllers_per_addr {
            return Decision::Refuse(Refusal::AddrControllers);
        }
        if self.host_conns(host) >= caps.connections_per_host {
            return Decision::Refuse(Refusal::HostConnections);
        }
        Decision::Admit
    }

    /// Records a controller created by connection `conn` (its admin queue).
    pub fn add_controller(&mut self, conn: ConnKey, host: &str, sees_ns: bool) -> CtrlKey {
        let key = CtrlKey(self.key());
        let (port, ip) = match self.conns.get_mut(&conn) {
            Some(c) => {
                c.ctrl = Some(key);
                (c.port, c.ip)
            }
            None => return key, // the connection is gone: nothing to hold
        };
        let ctrl = Ctrl {
            port,
            ip,
            host: host.to_owned(),
            sees_ns,
            reclaimed: false,
            conns: 1,
        };
        self.ctrls.insert(key, ctrl);
        key
    }

    /// Whether another queue (connection) may join controller `ctrl`.
    pub fn decide_join(&self, caps: &Caps, ctrl: CtrlKey) -> Decision {
        match self.ctrls.get(&ctrl) {
            Some(c) if !c.reclaimed && self.host_conns(&c.host) < caps.connections_per_host => {
                Decision::Admit
            }
            Some(c) if !c.reclaimed => Decision::Refuse(Refusal::HostConnections),
            _ => Decision::Refuse(Refusal::HostControllers),
        }
    }

    /// Binds connection `conn` (an I/O queue) to controller `ctrl`.
    pub fn join(&mut self, conn: ConnKey, ctrl: CtrlKey) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(e) = self.ctrls.get_mut(&ctrl) {
            c.ctrl = Some(ctrl);
            e.conns += 1;
        }
    }

    /// Marks a victim taken back: from now on it (a controller: with its connections)
    /// counts for nothing. The caller closes or kills it.
    pub fn reclaim(&mut self, victim: Victim) {
        match victim {
            Victim::Handshake(k) => {
                if let Some(c) = self.conns.get_mut(&k) {
                    c.reclaimed = true;
                }
            }
            Victim::Controller(k) => {
                if let Some(e) = self.ctrls.get_mut(&k) {
                    e.reclaimed = true;
                }
            }
        }
    }

    /// Records whether a controller sees any namespace (after a publication).
    pub fn set_sees_ns(&mut self, ctrl: CtrlKey, sees_ns: bool) {
        if let Some(e) = self.ctrls.get_mut(&ctrl) {
            e.sees_ns = sees_ns;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps {
        io_connections: 4,
        discovery_connections: 2,
        connections_per_host: 3,
        controllers_per_host: 2,
        connections_per_addr: 4,
        controllers_per_addr: 3,
        fd_reserve: 10,
    };
    const ROOMY: Fds = Fds {
        open: 10,
        limit: 1000,
    };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    /// An admin connection with its controller.
    fn ctrl(l: &mut Ledger, port: PortClass, from: u8, host: &str, sees: bool) -> CtrlKey {
        let c = l.open_conn(port, ip(from));
        assert_eq!(l.decide_controller(&CAPS, c, host), Decision::Admit);
        l.add_controller(c, host, sees)
    }

    #[test]
    fn the_descriptor_reserve_refuses_before_anything_else() {
        let l = Ledger::default();
        let tight = Fds {
            open: 1000 - 10 - FDS_PER_CONNECTION,
            limit: 1000,
        };
        assert_eq!(
            l.decide_accept(&CAPS, PortClass::Io, ip(1), tight),
            Decision::Admit
        );
        let over = Fds {
            open: tight.open + 1,
            ..tight
        };
        assert_eq!(
            l.decide_accept(&CAPS, PortClass::Io, ip(1), over),
            Decision::Refuse(Refusal::FdReserve)
        );
    }

    #[test]
    fn ports_have_separate_budgets() {
        let mut l = Ledger::default();
        for i in 0..2 {
            ctrl(&mut l, PortClass::Discovery, i, &format!("h{i}"), false);
        }
        assert_eq!(
            l.decide_accept(&CAPS, PortClass::Discovery, ip(9), ROOMY),
            Decision::Reclaim(Victim::Controller(CtrlKey(2))),
            "a full discovery port reclaims its oldest controller"
        );
        assert_eq!(
            l.decide_accept(&CAPS, PortClass::Io, ip(9), ROOMY),
            Decision::Admit,
            "the I/O port is unaffected"
        );
        for i in 0..4 {
            ctrl(&mut l, PortClass::Io, 10 + i, &format!("io{i}"), true);
        }
        assert_eq!(
            l.decide_accept(&CAPS, PortClass::Io, ip(9), ROOMY),
            Decision::Refuse(Refusal::PortFull),
            "controllers that see a namespace are never reclaimed"
        );
        assert_eq!(l.port_connections(PortClass::Discovery), 2);
    }

    #[test]
    fn reclaim_takes_handshakes_then_the_oldest_controller_without_namespaces() {
        let mut l = Ledger::default();
        let legit = ctrl(&mut l, PortClass::Io, 1, "legit", true);
        let idle_old = ctrl(&mut l, PortClass::Io, 2, "idle", false);
        let idle_new = ctrl(&mut l, PortClass::Io, 3, "idle", false);
        let q = l.open_conn(PortClass::Io, ip(2));
        assert_eq!(l.decide_join(&CAPS, idle_old), Decision::Admit);
        l.join(q, idle_old);
        assert!(legit < idle_old && idle_old < idle_new);
        let d = l.decide_accept(&CAPS, PortClass::Io, ip(4), ROOMY);
        assert_eq!(d, Decision::Reclaim(Victim::Controller(idle_old)));
        l.reclaim(Victim::Controller(idle_old));
        assert_eq!(
            l.port_connections(PortClass::Io),
            2,
            "its admin and I/O queue"
        );
        assert_eq!(
            l.decide_join(&CAPS, idle_old),
            Decision::Refuse(Refusal::HostControllers),
            "a reclaimed controller takes no more queues"
        );
        let h1 = l.open_conn(PortClass::Io, ip(4));
        let h2 = l.open_conn(PortClass::Io, ip(5));
        let d = l.decide_accept(&CAPS, PortClass::Io, ip(6), ROOMY);
        assert_eq!(
            d,
            Decision::Reclaim(Victim::Handshake(h1)),
            "handshakes go first"
        );
        l.reclaim(Victim::Handshake(h1));
        assert_eq!(
            l.decide_controller(&CAPS, h1, "late"),
            Decision::Refuse(Refusal::PortFull),
            "a reclaimed handshake creates nothing"
        );
        assert_eq!(
            l.decide_accept(&CAPS, PortClass::Io, ip(6), ROOMY),
            Decision::Admit
        );
        let h3 = l.open_conn(PortClass::Io, ip(6));
        l.add_controller(h2, "h2", true);
        l.add_controller(h3, "h3", true);
        assert_eq!(
            l.decide_accept(&CAPS, PortClass::Io, ip(7), ROOMY),
            Decision::Reclaim(Victim::Controller(idle_new))
        );
        l.set_sees_ns(idle_new, true);
        assert_eq!(
            l.decide_accept(&CAPS, PortClass::Io, ip(7), ROOMY),
            Decision::Refuse(Refusal::PortFull),
            "an ACL change that admits it protects it"
        );
        l.close_conn(q);
        l.close_conn(h1);
        assert_eq!(l.port_connections(PortClass::Io), 4);
    }

    #[test]
    fn one_address_holds_a_bounded_share() {
        let mut l = Ledger::default();
        let caps = Caps {
            io_connections: 100,
            ..CAPS
        };
        let ctrls: Vec<_> = (0..3)
            .map(|i| ctrl(&mut l, PortClass::Io, 1, &format!("h{i}"), true))
            .collect();
        let c = l.open_conn(PortClass::Io, ip(1));
        assert_eq!(
            l.decide_controller(&caps, c, "h9"),
            Decision::Refuse(Refusal::AddrControllers)
        );
        assert_eq!(
            l.decide_accept(&caps, PortClass::Io, ip(1), ROOMY),
            Decision::Refuse(Refusal::AddrConnections)
        );
        assert_eq!(
            l.decide_accept(
                &caps,
                PortClass::Io,
                "::ffff:10.0.0.1".parse().expect("ip"),
                ROOMY
            ),
            Decision::Refuse(Refusal::AddrConnections),
            "an IPv4-mapped address is the same address"
        );
        assert_eq!(
            l.decide_accept(&caps, PortClass::Io, ip(2), ROOMY),
            Decision::Admit
        );
        l.close_conn(c);
        assert_eq!(
            l.decide_accept(&caps, PortClass::Io, ip(1), ROOMY),
            Decision::Admit
        );
        assert_eq!(ctrls.len(), 3);
    }

    #[test]
    fn one_host_nqn_holds_a_bounded_share() {
        let mut l = Ledger::default();
        let caps = Caps {
            io_connections: 100,
            connections_per_addr: 100,
            controllers_per_addr: 100,
            ..CAPS
        };
        let a = ctrl(&mut l, PortClass::Io, 1, "h", true);
        let q = l.open_conn(PortClass::Io, ip(1));
        assert_eq!(l.decide_join(&caps, a), Decision::Admit);
        l.join(q, a);
        let b = ctrl(&mut l, PortClass::Io, 2, "h", true);
        assert_eq!(
            l.decide_join(&caps, b),
            Decision::Refuse(Refusal::HostConnections),
            "three connections for host h already"
        );
        let c = l.open_conn(PortClass::Io, ip(3));
        assert_eq!(
            l.decide_controller(&caps, c, "h"),
            Decision::Refuse(Refusal::HostControllers)
        );
        assert_eq!(l.decide_controller(&caps, c, "other"), Decision::Admit);
        l.close_conn(q);
        assert_eq!(l.decide_join(&caps, b), Decision::Admit);
    }

    #[test]
    fn kato_zero_is_bounded_unless_a_namespace_is_visible() {
        let cap = 120_000;
        assert_eq!(
            effective_kato_ms(0, false, cap),
            cap,
            "KATO 0 is not forever"
        );
        assert_eq!(effective_kato_ms(5_000, false, cap), 5_000);
        assert_eq!(effective_kato_ms(3_600_000, false, cap), cap);
        assert_eq!(
            effective_kato_ms(0, true, cap),
            0,
            "an admitted host chooses"
        );
        assert_eq!(effective_kato_ms(3_600_000, true, cap), 3_600_000);
    }
}
