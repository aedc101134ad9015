//! `GET /api/v2/projects/{projectName}/snapshots/diff/{snapshotUUID}` (ListChangedBlocks):
//! the blocks a snapshot changed since an older snapshot of the same volume, or every block
//! it holds data in when no base is given.
//!
//! Ranges are 64-block windows aligned to 64 (the reference rounds `offsetLBA` down to 64):
//! `lbaStart` is the window's first block, `lbaEnd` its last (inclusive, clamped to the
//! snapshot's size), and `dataBitMap` is 8 bytes, base64, where bit `i` (byte `i / 8`, bit
//! `i % 8`, least significant first) says block `lbaStart + i` changed. Windows without a
//! change are left out. A page holds at most [`DIFF_WINDOWS_MAX`] windows; `nextOffsetLBA` is
//! where the next page starts, `"0"` (omitted) after the last one.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use evstor_datapath::blockstore::{StoreError, TreeError};
use evstor_datapath::limits::BLOCK_BYTES;
use serde_json::Value;

use super::auth::{Access, Principal};
use super::error::{ApiError, ApiResult};
use super::json::{parse_uuid, Obj};
use super::{App, Query};
use crate::domain::snapshot::{Snapshot, SnapshotRef, SnapshotState};
use crate::domain::State as DomainState;
use crate::limits::DIFF_WINDOWS_MAX;

/// Blocks per range (and the alignment of `offsetLBA`).
const WINDOW: u64 = 64;

pub fn routes() -> Router<App> {
    Router::new()
        .route(
            "/api/v2/projects/{projectName}/snapshots/diff/{snapshotUUID}",
            get(diff),
        )
        .route(
            "/api/v2/projects/{projectName}/snapshots/diff/",
            get(diff_by_name),
        )
}

async fn diff(
    State(app): State<App>,
    who: Principal,
    Path((p, u)): Path<(String, String)>,
    q: Query,
) -> ApiResult<Json<Value>> {
    changed(&app, &who, &p, &u, &q)
}

async fn diff_by_name(
    State(app): State<App>,
    who: Principal,
    Path(p): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    changed(&app, &who, &p, "", &q)
}

/// A snapshot by UUID, else by name; None if neither is given.
fn reference(uuid: &str, name: Option<&str>) -> ApiResult<Option<SnapshotRef>> {
    if !uuid.is_empty() {
        return Ok(Some(SnapshotRef::Uuid(parse_uuid(uuid)?)));
    }
    Ok(name
        .filter(|n| !n.is_empty())
        .map(|n| SnapshotRef::Name(n.to_string())))
}

fn available<'a>(
    state: &'a DomainState,
    project: &str,
    r: &SnapshotRef,
) -> ApiResult<&'a Snapshot> {
    let s = state.snapshots.resolve(project, r)?;
    if s.state != SnapshotState::Available {
        return Err(ApiError::bad_request(format!(
            "snapshot {} is {:?}, not Available",
            s.uuid, s.state
        )));
    }
    Ok(s)
}

fn changed(
    app: &App,
    who: &Principal,
    project: &str,
    uuid: &str,
    q: &Query,
) -> ApiResult<Json<Value>> {
    who.require_project(project, Access::Read)?;
    let state = app.bus.state();
    state.projects.require(project)?;
    let target = reference(uuid, q.get("snapshotName"))?
        .ok_or_else(|| ApiError::bad_request("specify either snapshotUUID or snapshotName"))?;
    let target = available(&state, project, &target)?;
    let base = match reference(
        q.get("baseSnapshotUUID").unwrap_or(""),
        q.get("baseSnapshotName"),
    )? {
        Some(r) => Some(available(&state, project, &r)?),
        None => None,
    };
    if let Some(b) = base {
        if b.uuid == target.uuid {
            return Err(ApiError::bad_request(
                "the snapshot and the base snapshot are the same",
            ));
        }
        if b.source_volume != target.source_volume {
            return Err(ApiError::bad_request(format!(
                "snapshots {} and {} are not of the same volume",
                b.uuid, target.uuid
            )));
        }
    }
    let blocks = target.size_bytes / BLOCK_BYTES;
    let from = q.u64("offsetLBA")?.unwrap_or(0) / WINDOW * WINDOW;
    if from >= blocks.max(1) {
        return Err(ApiError::bad_request(format!(
            "offsetLBA {from} is past the end of the snapshot ({blocks} blocks)"
        )));
    }
    let max = DIFF_WINDOWS_MAX * WINDOW as usize;
    let mut changed = app
        .datapath
        .changed_blocks(target.uuid, base.map(|b| b.uuid), from, blocks, max)
        .map_err(|e| match e {
            StoreError::Tree(TreeError::NotSameChain { .. }) => ApiError::bad_request(format!(
                "snapshot {} is not an older snapshot on the chain of {}",
                base.map(|b| b.uuid).unwrap_or_default(),
                target.uuid
            )),
            StoreError::Tree(TreeError::NoImage(u)) => {
                ApiError::not_found(format!("snapshot {u} has no data in the block store"))
            }
            other => ApiError::internal(other.to_string()),
        })?;
    // A full page may end inside a window: leave that window to the next page.
    let mut next = 0;
    if changed.len() == max {
        let last = changed[max - 1] / WINDOW * WINDOW;
        changed.retain(|&b| b < last);
        next = last;
    }
    Ok(Json(
        Obj::new()
            .u64s("nextOffsetLBA", next)
            .val("lbaRanges", Value::Array(windows(&changed, blocks)))
            .build(),
    ))
}

/// Groups ascending block numbers into 64-block windows with change bitmaps.
fn windows(changed: &[u64], blocks: u64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < changed.len() {
        let start = changed[i] / WINDOW * WINDOW;
        let mut bits = 0u64;
        while i < changed.len() && changed[i] < start + WINDOW {
            bits |= 1 << (changed[i] - start);
            i += 1;
        }
        out.push(
            Obj::new()
                .u64s("lbaStart", start)
                .u64s("lbaEnd", (start + WINDOW - 1).min(blocks.saturating_sub(1)))
                .str(
                    "dataBitMap",
                    &base64::engine::general_purpose::STANDARD.encode(bits.to_le_bytes()),
                )
                .build(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_group_into_aligned_windows_with_lsb_first_bitmaps() {
        let w = windows(&[1, 2, 63, 64, 200], 210);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0]["lbaEnd"], "63");
        assert!(
            w[0].get("lbaStart").is_none(),
            "zero is omitted like proto3 JSON does"
        );
        let bits = base64::engine::general_purpose::STANDARD
            .decode(w[0]["dataBitMap"].as_str().expect("bitmap"))
            .expect("base64");
        assert_eq!(
            u64::from_le_bytes(bits.try_into().expect("8 bytes")),
            0b110 | 1 << 63
        );
        assert_eq!(w[1]["lbaStart"], "64");
        assert_eq!(w[2]["lbaStart"], "192");
        assert_eq!(w[2]["lbaEnd"], "209", "clamped to the size");
    }
}
