//! The etcd gateway client and the cluster log against a real etcd (`/usr/bin/etcd`,
//! Debian's `etcd-server`): compare-and-swap transactions, leases, watches, compaction,
//! failover between endpoints; appends that race, retry and are fenced by the leader key.
//! Each test starts its own one-member etcd on free loopback ports.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod certs;

use base64::Engine;
use evstor_control::cluster::etcd::{
    prefix_end, Compare, EtcdAuth, EtcdClient, EtcdError, EtcdTls, Op, OpResult, Range,
};
use evstor_control::cluster::log::{Appended, ClusterLog, Fetched};
use evstor_control::cluster::Keys;
use evstor_journal::{place, Head, NewEvent};
use serde_json::json;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A one-member etcd in a temporary directory, killed on drop.
struct Etcd {
    child: Child,
    client_port: u16,
    /// Clients must come over TLS with a certificate this PKI's CA signed.
    pki: Option<certs::TestPki>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Etcd {
        Etcd::start_with(false)
    }

    /// With `tls`: clients over TLS only, each with a client certificate
    /// (`--client-cert-auth`).
    fn start_with(tls: bool) -> Etcd {
        Etcd::start_args(tls, &[])
    }

    /// As [`Etcd::start_with`], with more of etcd's flags.
    fn start_args(tls: bool, extra: &[&str]) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client_port, peer_port) = (free_port(), free_port());
        let pki = tls.then(|| certs::write(dir.path(), "etcd"));
        let scheme = if tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("/usr/bin/etcd")
            .args(pki.as_ref().map(|p| p.etcd_args()).unwrap_or_default())
            .args(["--name", "e0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("e0={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &format!("t{client_port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        let e = Etcd {
            child,
            client_port,
            pki,
            _dir: dir,
        };
        let c = e.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.status().map(|s| s.leader.is_empty()).unwrap_or(true) {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        e
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn client(&self) -> EtcdClient {
        let c = EtcdClient::new(vec![self.endpoint()]);
        match &self.pki {
            Some(p) => {
                let tls = EtcdTls::new(Some(&p.ca), Some((&p.client_cert, &p.client_key)))
                    .expect("client TLS");
                c.with_tls(tls)
            }
            None => c,
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn compare_and_swap_has_one_winner_and_the_loser_sees_why() {
    let etcd = Etcd::start();
    let c = etcd.client();
    let head = b"/t/head".to_vec();
    let put = |v: &[u8]| Op::Put {
        key: head.clone(),
        value: v.to_vec(),
        lease: 0,
    };
    let failure = [Op::Range(Range::key(&head))];
    // Two writers both decided against "no head yet" (mod revision 0).
    let first = c
        .txn(
            &[Compare::ModRevision(head.clone(), 0)],
            &[put(b"a")],
            &failure,
        )
        .unwrap();
    assert!(first.succeeded);
    let second = c
        .txn(
            &[Compare::ModRevision(head.clone(), 0)],
            &[put(b"b")],
            &failure,
        )
        .unwrap();
    assert!(!second.succeeded);
    let OpResult::Range(r) = &second.responses[0] else {
        panic!("{:?}", second.responses)
    };
    assert_eq!(r.kvs[0].value, b"a");
    assert_eq!(r.kvs[0].mod_revision, first.revision);
    // The winner's revision is the compare that works now.
    let third = c
        .txn(
            &[Compare::ModRevision(head.clone(), first.revision)],
            &[put(b"c")],
            &[],
        )
        .unwrap();
    assert!(third.succeeded);
    assert_eq!(c.get(&head).unwrap().unwrap().value, b"c");
    // Create-revision 0 means "does not exist".
    let created = c
        .txn(
            &[Compare::CreateRevision(head.clone(), 0)],
            &[put(b"d")],
            &[],
        )
        .unwrap();
    assert!(!created.succeeded);
}

#[test]
fn ranges_by_prefix_in_either_order_with_limits_and_deletes() {
    let etcd = Etcd::start();
    let c = etcd.client();
    for i in 0..5u8 {
        let key = format!("/t/log/{i:020}").into_bytes();
        c.txn(
            &[],
            &[Op::Put {
                key,
                value: vec![i],
                lease: 0,
            }],
            &[],
        )
        .unwrap();
    }
    let mut r = Range::prefix(b"/t/log/");
    r.limit = 2;
    let asc = c.range(&r).unwrap();
    assert_eq!(
        asc.kvs.iter().map(|k| k.value[0]).collect::<Vec<_>>(),
        [0, 1]
    );
    assert!(asc.more);
    r.descending = true;
    r.keys_only = true;
    r.serializable = true;
    let desc = c.range(&r).unwrap();
    assert_eq!(desc.kvs[0].key, format!("/t/log/{:020}", 4).into_bytes());
    assert!(desc.kvs[0].value.is_empty(), "keys only");
    let deleted = c
        .delete_range(b"/t/log/", format!("/t/log/{:020}", 3).as_bytes())
        .unwrap();
    assert_eq!(deleted, 3);
    assert_eq!(c.range(&Range::prefix(b"/t/log/")).unwrap().kvs.len(), 2);
}

#[test]
fn a_lease_keeps_its_keys_until_it_expires_or_is_revoked() {
    let etcd = Etcd::start();
    let c = etcd.client();
    let (id, ttl) = c.lease_grant(2).unwrap();
    assert!(ttl >= 2);
    let key = b"/t/alive".to_vec();
    c.txn(
        &[],
        &[Op::Put {
            key: key.clone(),
            value: b"x".to_vec(),
            lease: id,
        }],
        &[],
    )
    .unwrap();
    assert_eq!(c.get(&key).unwrap().unwrap().lease, id);
    assert!(c.lease_keepalive(id).unwrap() > 0);
    c.lease_revoke(id).unwrap();
    assert!(c.get(&key).unwrap().is_none(), "revoking drops the key");
    assert_eq!(
        c.lease_keepalive(id).unwrap(),
        0,
        "a gone lease renews to 0"
    );
    let (short, _) = c.lease_grant(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.lease_keepalive(short).unwrap() > 0 {
        // Renewed: the test keeps it alive only by calling. Stop calling and wait.
        std::thread::sleep(Duration::from_millis(3000));
        assert!(Instant::now() < deadline, "lease never expired");
    }
}

#[test]
fn a_watch_delivers_later_puts_and_ends_when_its_start_is_compacted() {
    let etcd = Etcd::start();
    let c = etcd.client();
    let put = |k: &str, v: &[u8]| {
        c.txn(
            &[],
            &[Op::Put {
                key: k.as_bytes().to_vec(),
                value: v.to_vec(),
                lease: 0,
            }],
            &[],
        )
        .unwrap()
        .revision
    };
    let start = put("/t/w/a", b"1") + 1;
    let mut w = c
        .watch(b"/t/w/", b"/t/w0", start, Duration::from_secs(10))
        .unwrap();
    let created = w.next_message().unwrap();
    assert!(created.puts.is_empty() && created.canceled.is_none());
    let rev = put("/t/w/b", b"2");
    put("/t/other", b"3");
    let msg = w.next_message().unwrap();
    assert_eq!(msg.puts.len(), 1);
    assert_eq!(
        (msg.puts[0].value.as_slice(), msg.puts[0].mod_revision),
        (&b"2"[..], rev)
    );
    // A watch from a compacted revision is canceled, and says so.
    let now = put("/t/w/c", b"4");
    c.compact(now).unwrap();
    let mut old = c
        .watch(b"/t/w/", b"/t/w0", start, Duration::from_secs(10))
        .unwrap();
    let mut seen = old.next_message().unwrap();
    if seen.canceled.is_none() {
        seen = old.next_message().unwrap();
    }
    assert!(seen.canceled.unwrap().contains("compacted"));
}

#[test]
fn calls_fail_over_to_a_live_member_and_report_unavailable_when_none_answers() {
    let etcd = Etcd::start();
    let dead = format!("127.0.0.1:{}", free_port());
    let c = EtcdClient::new(vec![dead.clone(), etcd.endpoint()]);
    assert!(c.status().is_ok(), "the live member answers");
    let nobody = EtcdClient::new(vec![dead]).with_deadline(Duration::from_millis(500));
    let err = nobody.get(b"/x").unwrap_err();
    assert!(matches!(err, EtcdError::Unavailable(_)), "{err:?}");
}

fn new_events(tag: &str, n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent {
            time_unix_ns: 1,
            actor: tag.into(),
            project: String::new(),
            request_id: format!("{tag}{i}"),
            event_type: "E".into(),
            schema_version: 1,
            payload: vec![i as u8],
        })
        .collect()
}

const EMPTY: Head = Head {
    next_seq: 1,
    last_time_unix_ns: 0,
    last_hash: [0; 32],
};

#[test]
fn cluster_log_appends_race_retry_and_are_fenced_by_the_leader_key() {
    let etcd = Etcd::start();
    let keys = Keys::new("/c/");
    let mut a = ClusterLog::new(etcd.client(), keys.clone());
    let mut b = ClusterLog::new(etcd.client(), keys.clone());
    a.sync(&EMPTY).unwrap();
    b.sync(&EMPTY).unwrap();
    // Both decided against the empty log; one wins, the other reads the winner's batch back.
    let (xa, after_a) = place(&EMPTY, new_events("a", 2));
    let (xb, after_b) = place(&EMPTY, new_events("b", 1));
    assert!(matches!(
        a.append(&xa, &after_a, None).unwrap(),
        Appended::Done { .. }
    ));
    let Appended::Behind(newer) = b.append(&xb, &after_b, None).unwrap() else {
        panic!("b must lose")
    };
    assert_eq!(newer.len(), 1);
    assert_eq!(newer[0].envelopes, xa);
    b.note_applied(newer[0].revision);
    // The same batch again with the old revision (a retry after a timeout): already there.
    let mut retry = ClusterLog::new(etcd.client(), keys.clone());
    retry.sync(&EMPTY).unwrap_or_default();
    retry.note_applied(0);
    assert!(matches!(
        retry.append(&xa, &after_a, None).unwrap(),
        Appended::Done { .. }
    ));
    // A leader's append is fenced by its epoch: the leader key's create revision.
    let c = etcd.client();
    let elect = |value: &[u8]| {
        let t = c
            .txn(
                &[Compare::CreateRevision(keys.leader(), 0)],
                &[Op::Put {
                    key: keys.leader(),
                    value: value.to_vec(),
                    lease: 0,
                }],
                &[],
            )
            .unwrap();
        assert!(t.succeeded);
        t.revision as u64
    };
    let old_epoch = elect(b"one");
    let (xb, after_b) = place(&after_a, new_events("b", 1));
    assert!(matches!(
        b.append(&xb, &after_b, Some(old_epoch)).unwrap(),
        Appended::Done { .. }
    ));
    c.delete_range(&keys.leader(), &[]).unwrap();
    let new_epoch = elect(b"two");
    assert!(new_epoch > old_epoch);
    let (xc, after_c) = place(&after_b, new_events("c", 1));
    assert_eq!(
        b.append(&xc, &after_c, Some(old_epoch)).unwrap(),
        Appended::Fenced,
        "a deposed epoch cannot append"
    );
    assert!(matches!(
        b.append(&xc, &after_c, Some(new_epoch)).unwrap(),
        Appended::Done { .. }
    ));
    // Everything in order, read back from the start.
    let Fetched::Batches(all) = a.fetch(1).unwrap() else {
        panic!("nothing trimmed")
    };
    let seqs: Vec<(u64, u64)> = all.iter().map(|b| (b.first_seq(), b.last_seq())).collect();
    assert_eq!(seqs, [(1, 2), (3, 3), (4, 4)]);
    // With the oldest batch deleted, a reader at seq 1 is behind the tail.
    c.delete_range(&keys.log(1), &[]).unwrap();
    assert!(matches!(a.fetch(1).unwrap(), Fetched::TailPassed { .. }));
}

/// etcd that takes only TLS clients with a certificate from its CA: such a client works
/// (a transaction, a watch that sees it); one without a client certificate, one that does
/// not trust etcd's CA, and a plain-HTTP one are all refused, and the error names TLS.
#[test]
fn etcd_over_tls_takes_only_clients_with_a_certificate_it_trusts() {
    let etcd = Etcd::start_with(true);
    let pki = etcd.pki.as_ref().expect("TLS");
    let c = etcd.client();
    let key = b"/tls/k".to_vec();
    let mut watch = c
        .watch(&key, b"/tls/l", 1, Duration::from_secs(10))
        .expect("a watch over TLS");
    let put = Op::Put {
        key: key.clone(),
        value: b"v".to_vec(),
        lease: 0,
    };
    assert!(
        c.txn(&[], &[put], &[])
            .expect("a transaction over TLS")
            .succeeded
    );
    let seen = loop {
        let m = watch.next_message().expect("watch message");
        if !m.puts.is_empty() {
            break m.puts;
        }
    };
    assert_eq!(
        (seen[0].key.as_slice(), seen[0].value.as_slice()),
        (&key[..], &b"v"[..])
    );
    assert_eq!(
        c.get(&key).expect("get").map(|kv| kv.value),
        Some(b"v".to_vec())
    );

    let quick = |c: EtcdClient| c.with_deadline(Duration::from_millis(800));
    let refused = |c: EtcdClient, why: &str| {
        let err = quick(c).get(&key).expect_err(why);
        assert!(matches!(err, EtcdError::Unavailable(_)), "{why}: {err}");
        err.to_string()
    };
    let no_cert = EtcdTls::new(Some(&pki.ca), None).expect("TLS without a client certificate");
    let err = refused(
        EtcdClient::new(vec![etcd.endpoint()]).with_tls(no_cert),
        "no client certificate",
    );
    assert!(err.contains("TLS"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let other = certs::write(dir.path(), "other");
    let stranger = EtcdTls::new(
        Some(&other.ca),
        Some((&other.client_cert, &other.client_key)),
    )
    .expect("another CA");
    let err = refused(
        EtcdClient::new(vec![etcd.endpoint()]).with_tls(stranger),
        "etcd's certificate from a CA the client does not trust",
    );
    assert!(err.contains("TLS") && err.contains("certificate"), "{err}");
    refused(
        EtcdClient::new(vec![etcd.endpoint()]),
        "plain HTTP to a TLS port",
    );
    // A key that does not belong to the certificate is caught before any connection.
    assert!(EtcdTls::new(Some(&pki.ca), Some((&pki.client_cert, &other.client_key))).is_err());
}

/// etcd with authentication on: a user with read and write access to one prefix signs in,
/// works (transactions, a watch, a lease), is refused outside its prefix, and signs in again
/// by itself when its token expires; no credentials or a wrong password are refused with
/// etcd's reason.
#[test]
fn an_etcd_user_signs_in_and_again_when_its_token_expires() {
    // Simple tokens that expire after a second unused.
    let etcd = Etcd::start_args(false, &["--auth-token-ttl", "1"]);
    let admin = etcd.client();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let prefix = b"/evstor/t/".to_vec();
    for (path, body) in [
        (
            "/v3/auth/user/add",
            json!({"name": "root", "password": "root-pw"}),
        ),
        ("/v3/auth/role/add", json!({"name": "root"})),
        (
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
        ),
        (
            "/v3/auth/user/add",
            json!({"name": "evstor", "password": "evstor-pw"}),
        ),
        ("/v3/auth/role/add", json!({"name": "evstor-rw"})),
        (
            "/v3/auth/role/grant",
            json!({"name": "evstor-rw", "perm": {
                "permType": "READWRITE",
                "key": b64(&prefix),
                "range_end": b64(&prefix_end(&prefix)),
            }}),
        ),
        (
            "/v3/auth/user/grant",
            json!({"user": "evstor", "role": "evstor-rw"}),
        ),
        ("/v3/auth/enable", json!({})),
    ] {
        admin
            .call(path, &body)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }

    let c = etcd
        .client()
        .with_auth(EtcdAuth::new("evstor", "evstor-pw"));
    let key = [&prefix[..], b"k"].concat();
    let put = |v: &[u8]| Op::Put {
        key: key.clone(),
        value: v.to_vec(),
        lease: 0,
    };
    let mut watch = c
        .watch(&prefix, &prefix_end(&prefix), 0, Duration::from_secs(10))
        .expect("a watch as the etcd user");
    assert!(c.txn(&[], &[put(b"1")], &[]).expect("a put").succeeded);
    let seen = loop {
        let m = watch.next_message().expect("watch message");
        if !m.puts.is_empty() {
            break m.puts;
        }
    };
    assert_eq!(seen[0].value, b"1");
    let rev = c.get(&key).unwrap().map(|kv| kv.mod_revision).unwrap();
    c.compact(rev).expect("the user compacts etcd's history");
    let (lease, _) = c.lease_grant(5).expect("a lease as the etcd user");
    c.lease_revoke(lease).expect("the lease revoked");
    let outside = c
        .get(b"/elsewhere")
        .expect_err("a key outside the user's prefix");
    assert!(
        matches!(&outside, EtcdError::Refused { message, .. } if message.contains("permission denied")),
        "{outside}"
    );

    // The token expires unused; the next call signs in again by itself.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        c.txn(&[], &[put(b"2")], &[])
            .expect("a put after the token expired")
            .succeeded
    );
    assert_eq!(c.get(&key).unwrap().map(|kv| kv.value), Some(b"2".to_vec()));
    // A fork shares the token; a watch opened after it expired sees the next put.
    let from = c.get(&key).unwrap().map(|kv| kv.mod_revision).unwrap() + 1;
    std::thread::sleep(Duration::from_secs(3));
    let fork = c.fork();
    let mut watch = fork
        .watch(&prefix, &prefix_end(&prefix), from, Duration::from_secs(10))
        .expect("a watch after the token expired");
    assert!(c.txn(&[], &[put(b"3")], &[]).expect("a put").succeeded);
    let seen = loop {
        let m = watch.next_message().expect("watch message");
        assert!(
            m.canceled.is_none(),
            "the watch was canceled: {:?}",
            m.canceled
        );
        if !m.puts.is_empty() {
            break m.puts;
        }
    };
    assert_eq!(seen[0].value, b"3");

    let refused = |c: EtcdClient, why: &str| match c.get(&key) {
        Err(EtcdError::Refused { message, .. }) => message,
        other => panic!("{why}: {other:?}"),
    };
    let m = refused(etcd.client(), "no credentials");
    assert!(m.contains("user name is empty"), "{m}");
    let m = refused(
        etcd.client().with_auth(EtcdAuth::new("evstor", "wrong")),
        "a wrong password",
    );
    assert!(
        m.contains("\"evstor\"") && m.contains("authentication failed"),
        "{m}"
    );
}
