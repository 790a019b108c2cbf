//! The two HTTP listeners: capture on `WEB_HOSTNAME:WEB_PORT` (public, with its connection
//! limits) and management on `ADMIN_HOSTNAME:ADMIN_PORT` (loopback by default), both stopping
//! together on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{shutdown_signal, AppError};
use crate::config::{Config, ServeLimits};

/// Connections the admin listener keeps open at once.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// A whole management request (an upload included) must end within this.
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AppError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AppError::Listen { addr, source })?;
    Ok((listener, bound))
}

/// Serves `capture` and `management` until SIGTERM or SIGINT; then both stop accepting and
/// drain their requests in flight (within their bound). `stopping` is set at the signal, so
/// `/_ready` answers 503 while draining.
pub(super) async fn serve_both(
    config: &Config,
    capture: axum::Router,
    management: axum::Router,
    stopping: Arc<AtomicBool>,
    setup_token: Option<String>,
    capture_bound: Arc<std::sync::OnceLock<SocketAddr>>,
) -> Result<(), AppError> {
    let (capture_listener, capture_at) =
        bind(SocketAddr::new(config.web_host, config.web_port)).await?;
    let (admin_listener, admin_at) =
        bind(SocketAddr::new(config.admin_host, config.admin_port)).await?;
    let _ = capture_bound.set(capture_at);
    // Tests and scripts read these lines to find ports chosen with WEB_PORT=0 / ADMIN_PORT=0.
    println!("listening on http://{capture_at}");
    println!("admin listening on http://{admin_at}");
    tracing::info!(%capture_at, %admin_at, "serving capture, and management on the admin address");
    if let Some(token) = setup_token {
        let host = match admin_at.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
            ip if ip.is_ipv6() => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let link = format!("http://{host}:{}/setup?token={token}", admin_at.port());
        // One use, 24 hours; `appliance admin setup-link` prints a new one.
        println!("admin set-up link (no password is set yet; one use): {link}");
        tracing::warn!(%link, "no admin password is set yet: open the set-up link to choose it");
    }
    // Under systemd (Type=notify): ready once capture listens and the queue is open.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        stopping.store(true, Ordering::Relaxed);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let admin_limits = ServeLimits {
        max_connections: ADMIN_MAX_CONNECTIONS,
        max_connections_per_ip: 0,
        ..config.http
    };
    let management = management.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        ADMIN_REQUEST_TIMEOUT,
    ));
    tokio::join!(
        crate::serve::serve(
            capture_listener,
            capture,
            config.http,
            stopped(stop_rx.clone())
        ),
        crate::serve::serve(admin_listener, management, admin_limits, stopped(stop_rx)),
    );
    Ok(())
}
