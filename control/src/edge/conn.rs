//! One API connection: the TLS handshake under its deadline, then HTTP/1.1 (keep-alive) until
//! the client closes, a deadline passes, or the server stops. A watchdog follows the
//! connection's phase: idle (after the handshake, between requests) it allows the idle
//! deadline; from the first byte of a request to the end of its headers the header deadline;
//! while a request is served none, as the body has its own deadline ([`DeadlineBody`]) and the
//! handler holds an in-flight permit. A passed deadline drops the connection, closing it.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use super::{stopped, EdgeConfig, Slot};
use crate::api::admission::DeadlineBody;

/// The deadlines of one connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadlines {
    handshake: Duration,
    header: Duration,
    body: Duration,
    idle: Duration,
}

impl Deadlines {
    pub(super) fn of(cfg: &EdgeConfig) -> Deadlines {
        Deadlines {
            handshake: Duration::from_millis(cfg.tls_handshake_ms),
            header: Duration::from_millis(cfg.header_read_ms),
            body: Duration::from_millis(cfg.body_read_ms),
            idle: Duration::from_millis(cfg.idle_ms),
        }
    }
}

/// Where a connection is, and since when.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in progress since then.
    Idle(Instant),
    /// The first byte of a request arrived then; its headers are not complete.
    Head(Instant),
    /// This many requests are being served (HTTP/1.1 serves one at a time; pipelining can
    /// overlap the end of one with the start of the next).
    Busy(usize),
}

/// The phase of one connection and a signal when it changes.
struct Clock {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            phase: Mutex::new(Phase::Idle(Instant::now())),
            changed: Notify::new(),
        }
    }

    fn set(&self, f: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        *phase = f(*phase);
        drop(phase);
        self.changed.notify_one();
    }

    fn bytes_arrived(&self) {
        let idle = matches!(
            *self.phase.lock().unwrap_or_else(|p| p.into_inner()),
            Phase::Idle(_)
        );
        if idle {
            self.set(|p| match p {
                Phase::Idle(_) => Phase::Head(Instant::now()),
                other => other,
            });
        }
    }

    /// A request's headers are complete; the connection is busy until the guard drops.
    fn request_started(self: &Arc<Self>) -> Busy {
        self.set(|p| match p {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Idle(_) | Phase::Head(_) => Phase::Busy(1),
        });
        Busy(self.clone())
    }

    fn deadline(&self, d: &Deadlines) -> Option<Instant> {
        match *self.phase.lock().unwrap_or_else(|p| p.into_inner()) {
            Phase::Idle(since) => Some(since + d.idle),
            Phase::Head(since) => Some(since + d.header),
            Phase::Busy(_) => None,
        }
    }

    /// Resolves when the deadline of the current phase has passed.
    async fn expired(&self, d: &Deadlines) {
        loop {
            // Made before reading the phase: a change in between leaves a permit, no wakeup
            // is lost.
            let changed = self.changed.notified();
            match self.deadline(d) {
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// A request being served; its end (the response body produced, or the request dropped)
/// makes the connection idle again.
struct Busy(Arc<Clock>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.set(|p| match p {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        });
    }
}

/// The TLS stream, reporting to the clock when request bytes arrive.
struct Watched<S> {
    inner: S,
    clock: Arc<Clock>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.bytes_arrived();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that ends its request's [`Busy`] once its last frame is produced.
struct Tracked {
    inner: Body,
    busy: Option<Busy>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves one accepted connection until it closes; `_slot` is given back on return.
pub(super) async fn run(
    tcp: TcpStream,
    _slot: Slot,
    acceptor: TlsAcceptor,
    router: Router,
    d: Deadlines,
    mut stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().ok().map(super::LocalAddr);
    let handshake = tokio::time::timeout(d.handshake, acceptor.accept(tcp));
    let tls = tokio::select! {
        done = handshake => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return tracing::debug!("API TLS handshake failed: {e}"),
            Err(_) => return tracing::debug!("API TLS handshake deadline passed"),
        },
        _ = stopped(&mut stop) => return,
    };
    let clock = Arc::new(Clock::new());
    let io = TokioIo::new(Watched {
        inner: tls,
        clock: clock.clone(),
    });
    let service_clock = clock.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let busy = service_clock.request_started();
        let deadline = Instant::now() + d.body;
        let mut req = req.map(|b| Body::new(DeadlineBody::new(b, deadline)));
        if let Some(l) = local {
            req.extensions_mut().insert(l);
        }
        let mut router = router.clone();
        async move {
            let response = router.call(req).await?;
            Ok::<_, Infallible>(response.map(|inner| Tracked {
                inner,
                busy: Some(busy),
            }))
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // Deadlines are the watchdog's; hyper's own header timer would also count idle time.
    http.keep_alive(true).header_read_timeout(None);
    let conn = http.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!("API connection: {e}");
                }
                return;
            }
            _ = clock.expired(&d) => return tracing::debug!("API connection deadline passed"),
            _ = stopped(&mut stop), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
