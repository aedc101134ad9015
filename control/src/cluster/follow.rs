//! The follower: a watch on the cluster log that hands every new batch to the journal
//! writer, which applies it in seq order into the local journal (the same path as its own
//! appends). The watch is only the fast path: when it breaks (a member died, the start
//! revision was compacted) the follower pokes the writer, which reads the log from its own
//! head (a range read fills any gap), and the writer also looks by itself when idle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::etcd::{prefix_end, EtcdClient};
use super::log::decode_batch;
use super::Keys;
use crate::store::bus::RemoteFeed;

/// Longest a watch may stay silent before it is reopened (etcd sends nothing while the log
/// does not move; reopening is cheap and catches a member that hangs without closing).
const WATCH_IDLE: Duration = Duration::from_secs(30);
/// Pause before reopening a broken watch.
const WATCH_RETRY: Duration = Duration::from_millis(200);

/// Starts the follower thread; it runs until `stop` is set or the writer is gone.
pub fn spawn(
    etcd: EtcdClient,
    keys: Keys,
    feed: RemoteFeed,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cluster-follower".into())
        .spawn(move || run(&etcd, &keys, &feed, &stop))
}

fn run(etcd: &EtcdClient, keys: &Keys, feed: &RemoteFeed, stop: &AtomicBool) {
    let prefix = keys.log_prefix();
    let end = prefix_end(&prefix);
    // Where the next watch starts: 0 means "now" (after a poke the writer fills the gap).
    let mut from = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let start = if from > 0 {
            from
        } else {
            match etcd.status() {
                Ok(s) => s.revision + 1,
                Err(e) => {
                    tracing::debug!("follower: etcd status: {e}");
                    std::thread::sleep(WATCH_RETRY * 5);
                    continue;
                }
            }
        };
        // The writer reads whatever landed before the watch starts.
        if !feed.poke() {
            return;
        }
        match etcd.watch(&prefix, &end, start, WATCH_IDLE) {
            Ok(mut w) => loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let msg = match w.next_message() {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!("follower: watch ended: {e}");
                        break;
                    }
                };
                if let Some(why) = msg.canceled {
                    tracing::info!("follower: watch canceled ({why}); reading the log instead");
                    from = 0;
                    break;
                }
                let mut batches = Vec::with_capacity(msg.puts.len());
                for kv in &msg.puts {
                    from = from.max(kv.mod_revision + 1);
                    match decode_batch(keys, kv) {
                        Ok(b) => batches.push(b),
                        Err(e) => tracing::error!("follower: {e}"),
                    }
                }
                if !batches.is_empty() && !feed.send(batches) {
                    return;
                }
            },
            Err(e) => tracing::debug!("follower: cannot watch the log: {e}"),
        }
        std::thread::sleep(WATCH_RETRY);
    }
}
