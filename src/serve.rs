//! Serving HTTP on a listener with the limits a public endpoint needs: a cap on connections (in
//! all and per client address), a deadline for a request's headers (a slowloris gets its
//! connection closed), an idle keep-alive connection closed after the same time, and a graceful
//! shutdown that waits for in-flight requests no longer than its bound.
//!
//! Owns: the accept loop and per-connection hyper setup for every listener (capture and admin).
//! Must never: wait on a client without a deadline, or keep accepting past the connection cap
//! (a connection over it is closed at once, which a client sees as a reset and retries).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::Service;

/// The connection limits and timeouts of one listener.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Connections from one client address at once; 0 for no per-address cap (behind a proxy
    /// every connection comes from the proxy's address).
    pub max_connections_per_ip: usize,
    /// A request's headers must arrive within this; an idle keep-alive connection is closed
    /// after it too.
    pub header_timeout: Duration,
    /// How long shutdown waits for requests in flight before closing their connections.
    pub drain_timeout: Duration,
}

/// Connections open now, in all and per address; a slot is given back when its guard drops.
#[derive(Default)]
struct Open {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

struct Slot {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

fn take_slot(open: &Arc<Mutex<Open>>, ip: IpAddr, limits: &ServeLimits) -> Option<Slot> {
    let mut state = open.lock().unwrap_or_else(|p| p.into_inner());
    let mine = state.per_ip.get(&ip).copied().unwrap_or(0);
    if state.total >= limits.max_connections
        || (limits.max_connections_per_ip > 0 && mine >= limits.max_connections_per_ip)
    {
        return None;
    }
    state.total += 1;
    *state.per_ip.entry(ip).or_default() += 1;
    Some(Slot {
        open: open.clone(),
        ip,
    })
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains in-flight requests for at
/// most `limits.drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut make_service = app.into_make_service_with_connect_info::<SocketAddr>();
    let open: Arc<Mutex<Open>> = Arc::default();
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut refused_logged = std::time::Instant::now() - Duration::from_secs(60);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(slot) = take_slot(&open, peer.ip(), &limits) else {
            if refused_logged.elapsed() >= Duration::from_secs(10) {
                refused_logged = std::time::Instant::now();
                tracing::warn!(%peer, max = limits.max_connections, per_ip = limits.max_connections_per_ip, "connection limit reached; closing new connections");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let tower_service = match make_service.call(peer).await {
            Ok(service) => service,
            Err(never) => match never {},
        };
        let hyper_service = hyper::service::service_fn(move |request: Request<Incoming>| {
            tower::ServiceExt::oneshot(tower_service.clone(), request)
        });
        let connection = builder.serve_connection(TokioIo::new(stream), hyper_service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _slot = slot;
            let _ = connection.await;
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!("requests still in flight at the end of the drain timeout; their connections are closed");
        }
    }
}
