//! Waking a running server from another process: a CLI command that queues or re-queues a job
//! says so through a Unix datagram socket in the data directory, so the server's workers look at
//! the queue at once instead of at their next poll.
//!
//! Owns: the socket's name and the two ends ([`listen`], [`poke`]).
//! Must never: be needed for correctness: a wake-up is a hint; the server also looks at the queue
//! on a clock, so a lost datagram (or no server at all) only delays.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Notify;

/// Name of the socket inside the data directory.
pub const SOCKET: &str = "wake.sock";

fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Binds the data directory's wake socket and notifies `jobs` for every datagram, until the
/// runtime stops. Call only while holding the data directory's server lock (a stale socket
/// left by a crash is replaced).
#[cfg(unix)]
pub fn listen(data_dir: &Path, jobs: Arc<Notify>) -> std::io::Result<()> {
    let path = socket_path(data_dir);
    let _ = std::fs::remove_file(&path);
    let socket = tokio::net::UnixDatagram::bind(&path)?;
    tokio::spawn(async move {
        let mut buf = [0u8; 16];
        while socket.recv(&mut buf).await.is_ok() {
            jobs.notify_one();
        }
    });
    Ok(())
}

#[cfg(not(unix))]
pub fn listen(_data_dir: &Path, _jobs: Arc<Notify>) -> std::io::Result<()> {
    Ok(())
}

/// Tells the server on `data_dir`, if one runs, to look at its job queue now. Best effort.
#[cfg(unix)]
pub fn poke(data_dir: &Path) {
    if let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() {
        let _ = socket.set_nonblocking(true);
        let _ = socket.send_to(b"jobs", socket_path(data_dir));
    }
}

#[cfg(not(unix))]
pub fn poke(_data_dir: &Path) {}
