//! `/internal/v1/…`: what cluster members ask of each other, outside the LightOS API. Today
//! one route: a consistent checkpoint of this server's journal, streamed to a member that is
//! behind the etcd log's tail (see [`crate::cluster::checkpoint`]). Cluster-admin only.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use http_body::Frame;
use tokio::io::{AsyncRead, ReadBuf};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::App;
use crate::cluster::checkpoint;

/// Bytes read from the archive per body frame.
const CHUNK_BYTES: usize = 256 * 1024;

pub fn routes() -> Router<App> {
    Router::new().route(checkpoint::ROUTE, post(journal_checkpoint))
}

async fn journal_checkpoint(State(app): State<App>, who: Principal) -> ApiResult<Response> {
    who.require_cluster_admin()?;
    let journal = app.bus.journal().clone();
    let scratch = app.info.data_dir.join("scratch");
    let file = tokio::task::spawn_blocking(move || checkpoint::archive(&journal, &scratch))
        .await
        .map_err(|e| ApiError::internal(format!("checkpoint task: {e}")))?
        .map_err(|e| ApiError::internal(format!("journal checkpoint: {e:#}")))?;
    let body = FileBody {
        file: tokio::fs::File::from_std(file),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::new(body))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// A file as a streamed response body.
struct FileBody {
    file: tokio::fs::File,
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut self.file).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(None);
                }
                buf.truncate(n);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}
