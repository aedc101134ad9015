//! Many connections on few threads: a thousand queues (admin and I/O, of many
//! controllers) connected at once and left idle, then every one of them asked something
//! at the same moment and every one answered. The target serves them on its reactors:
//! the process gains a handful of threads, not one per connection; accepts spread the
//! connections over the reactors; and idle reactors sleep instead of spinning.

mod common;

use std::io::Write;
use std::net::SocketAddr;

use common::*;
use evstor_datapath::pdu::{self, HdrFields, PduType};
use evstor_datapath::{start, Acl, TargetConfig};

/// Connections held at once.
const CONNS: usize = 1000;
/// I/O queues per controller (the target's maximum).
const IO_QUEUES: u16 = 16;
/// Reactors of the target under test: more than one, so accepts spread over them.
const REACTORS: usize = 2;

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

/// CPU time (clock ticks) each reactor thread of this process has used, by name.
fn reactor_cpu_ticks() -> Vec<(String, u64)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = e.expect("task").path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended
        };
        if !name.starts_with("nvmf-reactor") {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).expect("stat");
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').expect("comm end") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
        v.push((name.trim().to_string(), ticks));
    }
    v.sort();
    v
}

/// Raises the soft descriptor limit to the hard one: both ends of every connection live in
/// this process.
fn raise_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        rl.rlim_cur = rl.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
    }
    rl.rlim_cur
}

/// Opens [`CONNS`] queues: controllers of [`HOST`], each an admin queue and up to
/// [`IO_QUEUES`] I/O queues. Returns them with whether each is an admin queue.
fn connect_all(addr: SocketAddr) -> Vec<(Host, bool)> {
    let mut conns = Vec::with_capacity(CONNS);
    while conns.len() < CONNS {
        let (admin, cntlid) = Host::admin(addr, HOST, false, 0);
        conns.push((admin, true));
        for qid in 1..=IO_QUEUES {
            if conns.len() == CONNS {
                break;
            }
            let mut q = Host::tcp(addr, false);
            let (st, _) = q.connect(NQN, HOST, cntlid, qid, 0);
            assert_eq!(st, OK, "I/O queue {qid} of controller {cntlid}");
            conns.push((q, false));
        }
    }
    conns
}

/// Sends one command without waiting: Keep Alive on an admin queue, a one-block read on
/// an I/O queue.
fn ask(h: &mut Host, admin: bool, i: usize) {
    let cid = 0x100 + i as u16 % 0x1000;
    let mut c = if admin { sqe(0x18, 0) } else { sqe(0x02, 1) };
    c[1] = 0x40; // SGL
    c[2..4].copy_from_slice(&cid.to_le_bytes());
    if !admin {
        set64(&mut c, 40, (i % 4096) as u64); // SLBA
        set32(&mut c, 32, 4096); // SGL length
        c[39] = 0x5a; // transport SGL data block
    }
    let b = pdu::encode(&h.tx, PduType::CapsuleCmd, 0, &HdrFields::Cmd(&c), &[]);
    h.s.write_all(&b).expect("send command");
}

/// Reads the answer to [`ask`]: its status.
fn answer(h: &mut Host, admin: bool, i: usize) -> Sc {
    let mut data = 0;
    loop {
        match h.recv() {
            Some(Got::Data { data: d, .. }) => data += d.len(),
            Some(Got::Resp { status, cid, .. }) => {
                assert_eq!(cid, 0x100 + i as u16 % 0x1000, "connection {i}");
                if !admin && status == OK {
                    assert_eq!(data, 4096, "read data on connection {i}");
                }
                return status;
            }
            other => panic!("connection {i}: {other:?}"),
        }
    }
}

#[test]
fn a_thousand_idle_queues_are_all_answered_by_a_few_reactor_threads() {
    assert!(
        raise_nofile() as usize > 2 * CONNS + 256,
        "RLIMIT_NOFILE too low"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    cfg.max_connections = CONNS + 24;
    cfg.max_connections_per_host = CONNS + 24;
    cfg.max_connections_per_addr = CONNS + 24;
    cfg.max_controllers_per_host = CONNS / (1 + IO_QUEUES as usize) + 8;
    cfg.max_controllers_per_addr = cfg.max_controllers_per_host;
    cfg.reactors = REACTORS;
    let before = threads();
    let t = start(cfg, vec![ns(dir.path(), 1, Acl::AllowAny)]).expect("start");
    let started = threads();
    assert_eq!(t.reactor_count(), REACTORS);

    let mut conns = connect_all(t.local_addr());
    assert_eq!(conns.len(), CONNS);
    let connected = threads();
    assert_eq!(
        connected, started,
        "connections must not cost threads ({before} before the target, {started} after start)"
    );
    assert!(
        started - before <= REACTORS + 2,
        "the target runs its reactors and acceptor, {} threads",
        started - before
    );

    let spread = t.connections_per_reactor();
    assert_eq!(spread.iter().sum::<usize>(), CONNS);
    assert!(
        spread.iter().all(|&n| n >= CONNS / REACTORS - 1),
        "connections are spread over the reactors at accept: {spread:?}"
    );

    // Idle, a reactor sleeps: over two idle seconds each uses under 5% of a CPU (a few
    // sweeps of its connections; measured: under one clock tick), not a polling core
    // (a reactor that spun instead of sleeping used 0.5 s here on a loaded machine). Only
    // CPU time is bounded: a loaded machine can only lower it.
    let idle = std::time::Duration::from_secs(2);
    let t0 = reactor_cpu_ticks();
    std::thread::sleep(idle);
    let t1 = reactor_cpu_ticks();
    assert_eq!(t0.len(), REACTORS, "reactor threads: {t0:?}");
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    for ((name, a), (_, b)) in t0.iter().zip(&t1) {
        let used = (b - a) as f64 / hz as f64;
        eprintln!("{name}: {used:.2} s of CPU in {idle:?} idle");
        assert!(
            used < 0.05 * idle.as_secs_f64(),
            "{name} used {used:.2} s of CPU in {idle:?} with every queue idle"
        );
    }

    // Every queue at once, then every answer.
    for (i, (h, admin)) in conns.iter_mut().enumerate() {
        ask(h, *admin, i);
    }
    for (i, (h, admin)) in conns.iter_mut().enumerate() {
        assert_eq!(answer(h, *admin, i), OK, "connection {i}");
    }
    // And again, the other way round: nothing was left behind on any reactor.
    for (i, (h, admin)) in conns.iter_mut().enumerate().rev() {
        ask(h, *admin, i);
        assert_eq!(answer(h, *admin, i), OK, "connection {i}, second round");
    }
    drop(conns);
    t.shutdown();
}
