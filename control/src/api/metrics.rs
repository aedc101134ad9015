//! `GET /metrics` (Prometheus, OpenMetrics text) and the middleware that counts every API
//! answer by route template, method and status.
//!
//! The route is known only inside the router, after admission; [`mark_route`] (a route
//! layer) copies the matched template into the response so that [`observe`], the outermost
//! layer, also counts the answers admission gives before routing (as `unrouted`).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
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

/// Outermost layer: counts the answer and its latency (to the response headers).
pub async fn observe(State(app): State<App>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let resp = next.run(req).await;
    let route = resp.extensions().get::<RouteTemplate>();
    app.bus.metrics().api_request(
        route.map_or("unrouted", |r| &r.0),
        method,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
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
    let head_seq = app.bus.journal().head().last_seq();
    let pool = app.datapath.pool();
    let hosts = app.datapath.connected_hosts();
    let usage = |image| app.datapath.usage(image);
    let io = |image| app.datapath.io_totals(image);
    let body = {
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
    .map_err(|e| ApiError::internal(format!("encoding metrics: {e}")))?;
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
