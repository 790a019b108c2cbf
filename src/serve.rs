//! Serving HTTP on a listener with the limits a public endpoint needs: a cap on connections (in
//! all and per client address), a deadline for a request's headers (a slowloris gets its
//! connection closed), an idle keep-alive connection closed after the same time, and a graceful
//! shutdown that waits for in-flight requests no longer than its bound.
//!
//! Owns: the accept loop and per-connection hyper setup for every listener (capture and admin).
//! Must never: wait on a client without a deadline, or serve past the connection cap (a
//! connection over it gets a 503 with `Retry-After` and is closed, without its request being
//! read).

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

pub use crate::config::ServeLimits;

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

/// Connections over the cap that are answered (their request read and a 503 written) at once;
/// past these, a connection over the cap is closed without an answer.
const MAX_REFUSING: usize = 256;
/// How long a connection over the cap may take to send its request head.
const REFUSE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The answer a connection over the cap gets.
const OVER_CAPACITY: &str = r#"{"type":"server_error","code":"retry_later","detail":"too many open connections; retry later"}"#;

/// Reads one request head from a connection over the cap, answers 503 with `Retry-After`, and
/// closes it (a client sees a precise answer, not a reset).
async fn refuse(stream: tokio::net::TcpStream, _slot: tokio::sync::OwnedSemaphorePermit) {
    let service = hyper::service::service_fn(|_request: Request<Incoming>| async {
        let response = hyper::Response::builder()
            .status(hyper::StatusCode::SERVICE_UNAVAILABLE)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::RETRY_AFTER, "1")
            .header(hyper::header::CONNECTION, "close")
            .body(axum::body::Body::from(OVER_CAPACITY));
        Ok::<_, std::convert::Infallible>(response.unwrap_or_default())
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSE_HEADER_TIMEOUT)
        .keep_alive(false);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSE_HEADER_TIMEOUT * 2, connection).await;
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
    let refusing = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING));
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
                tracing::warn!(%peer, max = limits.max_connections, per_ip = limits.max_connections_per_ip, "connection limit reached; new connections are answered 503");
            }
            if let Ok(slot) = refusing.clone().try_acquire_owned() {
                tokio::spawn(refuse(stream, slot));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_capacity_answer_is_json() {
        let json: serde_json::Value = serde_json::from_str(OVER_CAPACITY).unwrap();
        assert_eq!(json["code"], "retry_later");
    }

    #[test]
    fn slots_are_capped_in_all_and_per_address_and_given_back() {
        let limits = ServeLimits {
            max_connections: 3,
            max_connections_per_ip: 2,
            header_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(1),
        };
        let open: Arc<Mutex<Open>> = Arc::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = take_slot(&open, a, &limits).unwrap();
        let _second = take_slot(&open, a, &limits).unwrap();
        assert!(take_slot(&open, a, &limits).is_none(), "two per address");
        let _third = take_slot(&open, b, &limits).unwrap();
        assert!(take_slot(&open, b, &limits).is_none(), "three in all");
        drop(first);
        assert!(
            take_slot(&open, a, &limits).is_some(),
            "a slot is given back"
        );
    }
}
