//! The ceiling a capture benchmark is read against: a bare axum server on the same machine that
//! reads each request's body, parses it with serde_json and answers PostHog's `{"status": 1}`,
//! with nothing durable, no routing beyond the two paths and no middleware. What it reaches
//! under the same load generator, connections and bodies is the most any HTTP capture built on
//! these crates could acknowledge here; the appliance's rate is read as a share of it.
//!
//! Runs in a process of its own (this binary, started again with `--bare-server`), so that like
//! the appliance it shares the cores with the load generator only through the scheduler.

use std::process::{Child, Command, Stdio};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;

/// The bare server's only work: parse, and answer as capture does.
async fn parse_only(body: Bytes) -> (StatusCode, &'static str) {
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(_) => (StatusCode::OK, r#"{"status":1}"#),
        Err(_) => (StatusCode::BAD_REQUEST, r#"{"type":"validation_error"}"#),
    }
}

/// Serves the bare server on a port of its own on loopback, printing `listening on <url>`;
/// runs until the process is killed.
pub async fn serve() -> std::io::Result<()> {
    let app = Router::new()
        .route("/e/", post(parse_only))
        .route("/batch/", post(parse_only));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}

/// The bare server's process, killed on drop.
pub struct Bare {
    child: Child,
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts this binary again as the bare server; returns it with its base URL.
pub fn spawn() -> Result<(Bare, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("--bare-server")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let bare = Bare { child };
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    match lines.next() {
        Some(Ok(line)) => match line.strip_prefix("listening on ") {
            Some(url) => Ok((bare, url.to_owned())),
            None => Err(format!("the bare server said {line:?}")),
        },
        _ => Err("the bare server exited before listening".into()),
    }
}
