//! `GET /metrics` (Prometheus, OpenMetrics text) and the middleware that gives every API
//! request its id and log span and counts every answer by route template, method and status.
//!
//! The route is known only inside the router, after admission; [`mark_route`] (a route
//! layer) copies the matched template into the response so that [`observe`], the outermost
//! layer, also counts the answers admission gives before routing (as `unrouted`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::App;
use crate::metrics::{render, to_text_format, Snapshot, OPENMETRICS, TEXT_FORMAT};
use evstor_journal::EventLog as _;

pub fn routes() -> Router<App> {
    Router::new().route("/metrics", get(scrape))
}

/// The matched route template, carried from [`mark_route`] to [`observe`].
#[derive(Clone)]
struct RouteTemplate(Arc<str>);

/// Route layer: remembers which route template answered.
pub async fn mark_route(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| RouteTemplate(Arc::from(m.as_str())));
    let mut resp = next.run(req).await;
    if let Some(route) = route {
        resp.extensions_mut().insert(route);
    }
    resp
}

/// Outermost layer: gives the request its id (the client's `x-request-id`, else a fresh
/// one put into the request, so the journal records the same id), runs it in a `request`
/// span carrying that id (every log line it causes names it), answers the id in
/// `x-request-id`, and counts the answer and its latency (to the response headers).
pub async fn observe(State(app): State<App>, mut req: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let started = Instant::now();
    let method = method_label(req.method());
    let id = request_id(&mut req);
    // A body the handler leaves unread (a 404, a 405, an early refusal) ends the connection:
    // the answer must say so, or the client sends its next request on a closing socket.
    let body_read = super::admission::declares_body(req.headers()).then(|| {
        let read = Arc::new(AtomicBool::new(false));
        let seen = read.clone();
        req = std::mem::take(&mut req)
            .map(|inner| axum::body::Body::new(TrackedBody { inner, read: seen }));
        read
    });
    let span = tracing::info_span!("request", id = %String::from_utf8_lossy(id.as_bytes()), method);
    let mut resp = next.run(req).instrument(span.clone()).await;
    let route = resp.extensions().get::<RouteTemplate>().cloned();
    let route = route.as_ref().map_or("unrouted", |r| &r.0);
    let status = resp.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    span.in_scope(|| tracing::debug!(route, status, seconds, "answered"));
    app.bus
        .metrics()
        .api_request(route, method, status, seconds);
    resp.headers_mut().insert(REQUEST_ID, id);
    if body_read.is_some_and(|r| !r.load(Ordering::Relaxed)) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A request body that records whether it was read to its end.
struct TrackedBody {
    inner: axum::body::Body,
    read: Arc<AtomicBool>,
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id: the client's header when it has one, else a fresh UUID inserted into
/// the request. (An over-long header is kept and refused with 400 where it is recorded.)
fn request_id(req: &mut Request) -> HeaderValue {
    let given = req
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| !v.to_str().unwrap_or_default().trim().is_empty());
    if let Some(v) = given {
        return v.clone();
    }
    let fresh = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("-"));
    req.headers_mut().insert(REQUEST_ID, fresh.clone());
    fresh
}

/// The OpenMetrics exposition of this server now (also put in support bundles).
pub fn exposition(app: &App) -> Result<String, std::fmt::Error> {
    let head_seq = app.bus.journal().head().last_seq();
    let pool = app.datapath.pool();
    let hosts = app.datapath.connected_hosts();
    let usage = |image| app.datapath.usage(image);
    let io = |image| app.datapath.io_totals(image);
    let state = app.bus.state();
    let now = Snapshot {
        head_seq,
        state: &state,
        pool,
        usage: &usage,
        io: &io,
        hosts,
    };
    render(app.bus.metrics(), &now)
}

/// Methods by name; any other (clients may send arbitrary tokens) is `other`, so a caller
/// cannot grow the label set.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The exposition. Needs a role in the `system` scope (`system:cluster-admin` or
/// `system:viewer`): it names every project's volumes.
/// OpenMetrics when the scraper accepts it (Prometheus asks for it), otherwise the classic
/// text format.
async fn scrape(
    State(app): State<App>,
    who: Principal,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    if !who.roles.iter().any(|(scope, _)| scope == "system") {
        return Err(ApiError::forbidden(
            "permission denied: /metrics needs a system role (system:viewer or system:cluster-admin)",
        ));
    }
    let body =
        exposition(&app).map_err(|e| ApiError::internal(format!("encoding metrics: {e}")))?;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    Ok(if openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response()
    } else {
        ([(header::CONTENT_TYPE, TEXT_FORMAT)], to_text_format(&body)).into_response()
    })
}
