//! Reconcilers: long operations are an intent event plus a completion event. The reconciler
//! wakes on every commit, looks for volumes whose intent is not yet done (`Creating`,
//! `Deleting`), drives the data path, and appends the completion. It is level-triggered, so
//! after a crash it simply finds the unfinished work in the projections and resumes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use crate::domain::volume::{Command as VolumeCommand, Volume, VolumeState};
use crate::domain::{Command, State};
use crate::store::{Bus, RequestMeta};

/// What the control plane asks of the data path. Calls may block (file I/O); the reconciler
/// runs them off the async runtime.
pub trait DataPlane: Send + Sync + 'static {
    /// Makes the volume servable (backing storage exists with the volume's size).
    fn prepare(&self, volume: &Volume) -> std::io::Result<()>;
    /// Releases the volume's storage for good.
    fn release(&self, uuid: Uuid) -> std::io::Result<()>;
    /// Hands the data path the namespace table implied by `state` (volumes, sizes, ACLs).
    fn publish(&self, state: &State);
}

/// Pause before retrying data-path work that failed.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Runs until `shutdown` turns true.
pub async fn run(bus: Bus, data: Arc<dyn DataPlane>, mut shutdown: watch::Receiver<bool>) {
    let mut seq = bus.last_seq();
    loop {
        let (creating, deleting) = {
            let state = bus.state();
            data.publish(&state);
            let pending = |s: VolumeState| -> Vec<Volume> {
                state
                    .volumes
                    .by_uuid
                    .values()
                    .filter(|v| v.state == s)
                    .cloned()
                    .collect()
            };
            (
                pending(VolumeState::Creating),
                pending(VolumeState::Deleting),
            )
        };
        let mut failed = false;
        for v in creating {
            failed |= !step(&bus, &data, Work::Create(Box::new(v))).await;
        }
        for v in deleting {
            failed |= !step(&bus, &data, Work::Delete(v.uuid)).await;
        }
        let wait = async {
            if failed {
                tokio::time::sleep(RETRY_DELAY).await;
            } else {
                let _ = seq.changed().await;
            }
        };
        tokio::select! {
            _ = wait => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

enum Work {
    Create(Box<Volume>),
    Delete(Uuid),
}

/// Does one piece of data-path work and records its completion; false if it must be retried.
async fn step(bus: &Bus, data: &Arc<dyn DataPlane>, work: Work) -> bool {
    let data = data.clone();
    let (uuid, command) = match &work {
        Work::Create(v) => (v.uuid, VolumeCommand::MarkVolumeAvailable { uuid: v.uuid }),
        Work::Delete(u) => (*u, VolumeCommand::FinishVolumeDeletion { uuid: *u }),
    };
    let done = tokio::task::spawn_blocking(move || match work {
        Work::Create(v) => data.prepare(&v),
        Work::Delete(u) => data.release(u),
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!("data path work for volume {uuid} failed, will retry: {e}");
            return false;
        }
        Err(e) => {
            tracing::error!("data path task for volume {uuid} panicked: {e}");
            return false;
        }
    }
    match bus
        .submit(RequestMeta::system("reconciler"), Command::Volume(command))
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("recording completion for volume {uuid} failed, will retry: {e}");
            false
        }
    }
}
