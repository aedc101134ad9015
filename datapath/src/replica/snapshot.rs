//! Snapshots of a replicated volume, taken at the same point of its write stream on every
//! in-sync copy.
//!
//! The primary's control plane closes the namespace's write gate and waits until every
//! change admitted before has completed ([`crate::qos::WriteHold`]): each of them is then
//! on every in-sync copy. It sends each in-sync replica an [`Op::Snapshot`] frame (the
//! snapshot's id as data; the replica applies it after every frame received before it),
//! takes its own, and opens the gate. A replica that did not answer, or failed, does not
//! hold the snapshot; the control plane records which copies do.
//!
//! A rollback of a replicated volume (withdrawn from hosts meanwhile) is done the same way
//! on every replica holding the snapshot ([`Op::Rollback`]); those stay in sync, the
//! others are rebuilt.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Frame, Member, Mode, Op};
use crate::backend::CompletionSink;

/// The answers of one snapshot's frames, and the snapshot id they carry as data: the link
/// holds this sink until each frame completes, so the data outlives every send.
struct Answers {
    snapshot: [u8; 16],
    done: Mutex<Vec<Option<i32>>>,
    cv: Condvar,
}

impl CompletionSink for Answers {
    fn complete(&self, tag: u64, result: i32) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = done.get_mut(tag as usize) {
            *d = Some(result);
        }
        self.cv.notify_all();
    }
}

/// Asks every in-sync member of `volume` (at `epoch`) to take `snapshot` of its copy, and
/// waits up to `timeout` for the answers. The caller has drained the volume's writes.
/// Returns, per member, whether it holds the snapshot now.
pub fn snapshot_members(
    members: &[Arc<Member>],
    volume: [u8; 16],
    epoch: u64,
    snapshot: [u8; 16],
    timeout: Duration,
) -> Vec<bool> {
    let in_sync = |m: &Member| m.state.mode() == Mode::InSync;
    ask(
        members,
        Op::Snapshot,
        volume,
        epoch,
        snapshot,
        timeout,
        in_sync,
    )
}

/// Asks every member (replicas holding `snapshot`, whatever their mode) to replace its copy
/// of `volume` (at `epoch`) with its copy of `snapshot`, and waits up to `timeout` for the
/// answers. The volume takes no writes meanwhile. Returns, per member, whether it did.
pub fn rollback_members(
    members: &[Arc<Member>],
    volume: [u8; 16],
    epoch: u64,
    snapshot: [u8; 16],
    timeout: Duration,
) -> Vec<bool> {
    ask(
        members,
        Op::Rollback,
        volume,
        epoch,
        snapshot,
        timeout,
        |_| true,
    )
}

/// Sends `op` (the snapshot id as data) to the members `asked` picks; per member, whether
/// it answered success within `timeout`.
pub(super) fn ask(
    members: &[Arc<Member>],
    op: Op,
    volume: [u8; 16],
    epoch: u64,
    snapshot: [u8; 16],
    timeout: Duration,
    asked: impl Fn(&Member) -> bool,
) -> Vec<bool> {
    let answers = Arc::new(Answers {
        snapshot,
        done: Mutex::new(vec![None; members.len()]),
        cv: Condvar::new(),
    });
    let sink: Arc<dyn CompletionSink> = answers.clone();
    let frame = Frame {
        op,
        volume,
        epoch,
        offset: 0,
        len: snapshot.len() as u32,
        id: 0,
        session: 0,
    };
    let asked: Vec<bool> = members.iter().map(|m| asked(m)).collect();
    for (k, m) in members.iter().enumerate() {
        if !asked[k] {
            continue;
        }
        // SAFETY: the data is `answers.snapshot`, kept alive by the sink the link holds
        // until this part completes, and never changed. An unanswered part fails rather
        // than completing as "no longer owed" (`submit_owed`).
        unsafe {
            m.link
                .submit_owed(frame, answers.snapshot.as_ptr(), &sink, k as u64, &m.state)
        };
    }
    let deadline = Instant::now() + timeout;
    let mut done = answers.done.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let pending = done.iter().zip(&asked).any(|(d, a)| *a && d.is_none());
        let left = deadline.saturating_duration_since(Instant::now());
        if !pending || left.is_zero() {
            break;
        }
        done = answers
            .cv
            .wait_timeout(done, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    for (k, d) in done.iter().enumerate() {
        match d {
            Some(r) if *r < 0 => tracing::warn!(
                replica = %members[k].link.addr(),
                "{op:?} on a replica failed: {}",
                io::Error::from_raw_os_error(-r)
            ),
            None if asked[k] => tracing::warn!(
                replica = %members[k].link.addr(),
                "{op:?} on a replica: no answer in {timeout:?}"
            ),
            _ => {}
        }
    }
    done.iter().map(|d| *d == Some(0)).collect()
}
