//! Admission of API requests, judged on the request line and headers alone: a declared body
//! too large is refused, the bearer token is verified, a coarse role rule is checked, and only
//! then does the request take an in-flight permit (one of the server's and one of its
//! subject's). A caller who may not use a route therefore never holds capacity, and its body
//! is never read. Handlers still make their full checks; this only refuses early what they
//! would refuse anyway, and hands them the verified [`Principal`] in the request extensions.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::BoxError;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Semaphore;

use super::auth::{Access, Principal, Role};
use super::error::{ApiError, ApiResult};
use super::App;
use crate::error::ControlError;
use crate::limits::{
    API_REQUESTS_IN_FLIGHT_MAX, API_REQUESTS_PER_SUBJECT_MAX, REQUEST_BODY_BYTES_MAX,
};

/// Bounds on the requests served at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestCaps {
    /// Requests in flight on the whole server.
    pub in_flight_max: usize,
    /// Requests in flight per token subject.
    pub per_subject_max: usize,
}

impl Default for RequestCaps {
    fn default() -> Self {
        RequestCaps {
            in_flight_max: API_REQUESTS_IN_FLIGHT_MAX,
            per_subject_max: API_REQUESTS_PER_SUBJECT_MAX,
        }
    }
}

/// What a caller must hold to try a method on a path. A necessary condition only: the
/// handler decides the rest (which project an unscoped body names, whether a project exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Nothing, not even a token (`GET /api/v2/version`).
    Nothing,
    /// Any valid token.
    Token,
    /// Read or change access to the project named in the path.
    Project(String, Access),
    /// Cluster-admin or admin of some project (unscoped volume changes name it in the body).
    SomeProjectAdmin,
    /// `system:cluster-admin` (every other change).
    ClusterAdmin,
}

/// The rule for `method` on `path`: reads of a project's resources need a role on it, changes
/// need its admin role; changes outside projects need cluster-admin, unscoped volume changes
/// an admin role somewhere. A viewer can never change anything.
pub fn need(method: &Method, path: &str) -> Need {
    let read = method == Method::GET || method == Method::HEAD;
    if read && path == "/api/v2/version" {
        return Need::Nothing;
    }
    let access = if read { Access::Read } else { Access::Write };
    if let Some(rest) = path.strip_prefix("/api/v2/projects/") {
        let project = rest.split('/').next().unwrap_or_default();
        if !project.is_empty() {
            return Need::Project(super::percent_decode(project), access);
        }
    }
    if read {
        Need::Token
    } else if path == "/api/v2/volumes" || path.starts_with("/api/v2/volumes/") {
        Need::SomeProjectAdmin
    } else {
        Need::ClusterAdmin
    }
}

/// Does `who` meet `need`? The same answers as the handlers' own checks.
pub fn check(who: &Principal, need: &Need) -> ApiResult<()> {
    match need {
        Need::Nothing | Need::Token => Ok(()),
        Need::Project(project, access) => who.require_project(project, *access),
        Need::SomeProjectAdmin => {
            let admin_somewhere = who.roles.iter().any(|(_, r)| *r == Role::Admin);
            if who.is_cluster_admin() || admin_somewhere {
                Ok(())
            } else {
                Err(ApiError::forbidden(
                    "permission denied: this operation needs an admin role",
                ))
            }
        }
        Need::ClusterAdmin => who.require_cluster_admin(),
    }
}

/// The 413 answer to a body larger than [`REQUEST_BODY_BYTES_MAX`].
pub fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        8,
        format!("request body larger than {REQUEST_BODY_BYTES_MAX} bytes"),
    )
}

/// Refuses a declared `Content-Length` above the limit before anything is read.
fn declared_length_fits(headers: &HeaderMap) -> ApiResult<()> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > REQUEST_BODY_BYTES_MAX as u64 => Err(too_large()),
        _ => Ok(()),
    }
}

/// The request gate of one server: in-flight permits, server-wide and per subject.
pub struct Admission {
    app: App,
    in_flight: Semaphore,
    /// Requests in flight per subject; an entry leaves at zero, so there are never more
    /// entries than requests in flight.
    subjects: Mutex<HashMap<String, usize>>,
    per_subject_max: usize,
}

/// One request's share of its subject's cap, given back on drop.
struct SubjectSlot<'a> {
    admission: &'a Admission,
    subject: String,
}

impl Drop for SubjectSlot<'_> {
    fn drop(&mut self) {
        let mut subjects = self
            .admission
            .subjects
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = subjects.get_mut(&self.subject) {
            *n -= 1;
            if *n == 0 {
                subjects.remove(&self.subject);
            }
        }
    }
}

impl Admission {
    pub fn new(app: App, caps: RequestCaps) -> Admission {
        Admission {
            app,
            in_flight: Semaphore::new(caps.in_flight_max),
            subjects: Mutex::new(HashMap::new()),
            per_subject_max: caps.per_subject_max,
        }
    }

    fn subject_slot(&self, subject: &str) -> Option<SubjectSlot<'_>> {
        let mut subjects = self.subjects.lock().unwrap_or_else(|p| p.into_inner());
        let n = subjects.entry(subject.to_string()).or_insert(0);
        if *n >= self.per_subject_max {
            return None;
        }
        *n += 1;
        Some(SubjectSlot {
            admission: self,
            subject: subject.to_string(),
        })
    }
}

/// The middleware: everything above, then the handler, with the permits held until it answers.
pub async fn admit(State(gate): State<Arc<Admission>>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let need = need(&parts.method, parts.uri.path());
    if need == Need::Nothing {
        return next.run(Request::from_parts(parts, body)).await;
    }
    // A refusal leaves the body unread; `super::metrics::observe` (the outer layer) then
    // says `Connection: close`.
    let refuse = |e: ApiError| e.into_response();
    if let Err(e) = declared_length_fits(&parts.headers) {
        return refuse(e);
    }
    let who = match Principal::from_request_parts(&mut parts, &gate.app).await {
        Ok(who) => who,
        Err(e) => return refuse(e),
    };
    if let Err(e) = check(&who, &need) {
        return refuse(e);
    }
    let Some(_slot) = gate.subject_slot(&who.subject) else {
        return refuse(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            8,
            format!(
                "too many requests in flight for subject {}; retry",
                who.subject
            ),
        ));
    };
    let Ok(_permit) = gate.in_flight.try_acquire() else {
        return refuse(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            14,
            "too many requests in flight; retry",
        ));
    };
    parts.extensions.insert(who);
    next.run(Request::from_parts(parts, body)).await
}

/// Whether the request says a body follows (a length above zero, or chunks).
pub(crate) fn declares_body(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(axum::http::header::TRANSFER_ENCODING)
        || headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// The answer to a body that could not be read: 413 past the size limit, 408 past the body
/// deadline, 400 otherwise (the client went away or sent a broken chunk).
pub fn body_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return too_large();
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cause {
        if let Some(ControlError::RequestBodyDeadline) = err.downcast_ref::<ControlError>() {
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, 4, err.to_string());
        }
        cause = err.source();
    }
    ApiError::bad_request(format!("cannot read body: {e}"))
}

/// A request body that fails with [`ControlError::RequestBodyDeadline`] once its deadline
/// passed: a slow body cannot hold an in-flight permit (or its connection) for longer.
pub struct DeadlineBody<B> {
    inner: B,
    deadline: tokio::time::Instant,
    /// Armed the first time the body is waited for (most requests never wait).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> DeadlineBody<B> {
    pub fn new(inner: B, deadline: tokio::time::Instant) -> Self {
        DeadlineBody {
            inner,
            deadline,
            timer: None,
        }
    }
}

impl<B> HttpBody for DeadlineBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(ControlError::RequestBodyDeadline)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(roles: &[(&str, Role)]) -> Principal {
        Principal {
            subject: "s".into(),
            roles: roles.iter().map(|(s, r)| (s.to_string(), *r)).collect(),
            stale: Vec::new(),
        }
    }

    #[test]
    fn needs_from_the_request_line() {
        let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
        assert_eq!(need(&get, "/api/v2/version"), Need::Nothing);
        assert_eq!(need(&post, "/api/v2/version"), Need::ClusterAdmin);
        assert_eq!(need(&get, "/api/v2/servers"), Need::Token);
        assert_eq!(need(&get, "/nope"), Need::Token);
        assert_eq!(
            need(&post, "/api/v2/projects/p%31/volumes"),
            Need::Project("p1".into(), Access::Write)
        );
        assert_eq!(
            need(&get, "/api/v2/projects/p1"),
            Need::Project("p1".into(), Access::Read)
        );
        assert_eq!(
            need(&delete, "/api/v2/projects/p1"),
            Need::Project("p1".into(), Access::Write)
        );
        assert_eq!(need(&post, "/api/v2/projects"), Need::ClusterAdmin);
        assert_eq!(need(&put, "/api/v2/projects/"), Need::ClusterAdmin);
        assert_eq!(need(&put, "/api/v2/volumes/x"), Need::SomeProjectAdmin);
        assert_eq!(need(&post, "/api/v2/volumes"), Need::SomeProjectAdmin);
        assert_eq!(need(&post, "/api/v2/policies"), Need::ClusterAdmin);
        assert_eq!(need(&post, "/api/v2/volumesx"), Need::ClusterAdmin);
    }

    #[test]
    fn viewers_never_change_anything() {
        let viewer = principal(&[("p1", Role::Viewer)]);
        let admin = principal(&[("p1", Role::Admin)]);
        let root = principal(&[("system", Role::ClusterAdmin)]);
        let write_p1 = Need::Project("p1".into(), Access::Write);
        let read_p1 = Need::Project("p1".into(), Access::Read);
        assert!(check(&viewer, &write_p1).is_err());
        assert!(check(&viewer, &read_p1).is_ok());
        assert!(check(&viewer, &Need::SomeProjectAdmin).is_err());
        assert!(check(&viewer, &Need::ClusterAdmin).is_err());
        assert!(check(&admin, &write_p1).is_ok());
        assert!(check(&admin, &Need::Project("p2".into(), Access::Read)).is_err());
        assert!(check(&admin, &Need::SomeProjectAdmin).is_ok());
        assert!(check(&admin, &Need::ClusterAdmin).is_err());
        for n in [write_p1, Need::SomeProjectAdmin, Need::ClusterAdmin] {
            assert!(check(&root, &n).is_ok());
        }
    }

    #[test]
    fn declared_lengths() {
        let mut h = HeaderMap::new();
        assert!(declared_length_fits(&h).is_ok());
        h.insert(header::CONTENT_LENGTH, REQUEST_BODY_BYTES_MAX.into());
        assert!(declared_length_fits(&h).is_ok());
        h.insert(header::CONTENT_LENGTH, (REQUEST_BODY_BYTES_MAX + 1).into());
        let e = declared_length_fits(&h).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
