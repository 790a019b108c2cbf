//! What the benchmark binaries share: starting the `appliance` built beside them on a
//! temporary data directory with one team, and reading its `/_ready`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// An appliance started for a benchmark, stopped (killed) and its data removed on drop.
pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `appliance` binary beside this one.
pub fn appliance_exe() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("appliance");
    if !exe.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build --release)",
            exe.display()
        ));
    }
    Ok(exe)
}

/// A fresh data directory named after `bench` holding one team with `token`.
pub fn data_dir(exe: &Path, bench: &str, token: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("appliance-{bench}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let created = Command::new(exe)
        .env("DATA_DIR", &dir)
        .args(["team", "create", bench, "--token", token])
        .output()
        .map_err(|e| e.to_string())?;
    if !created.status.success() {
        return Err(String::from_utf8_lossy(&created.stderr).into_owned());
    }
    Ok(dir)
}

/// Starts the appliance on `dir` (its environment is this process's, so sinks and sources
/// configured there apply); returns once it listens, with its capture address.
pub fn spawn(exe: &Path, dir: PathBuf) -> Result<(Server, String), String> {
    let mut child = Command::new(exe)
        .env("DATA_DIR", &dir)
        .env("WEB_HOSTNAME", "127.0.0.1")
        .env("WEB_PORT", "0")
        .env("ADMIN_PORT", "0")
        .env("APPLIANCE_ENV_FILE", "")
        // BENCH_LOG_LEVEL shows more of the appliance's log while a benchmark runs.
        .env(
            "LOG_LEVEL",
            std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        )
        .arg("run")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let server = Server { child, dir };
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(a) = line.strip_prefix("listening on ") {
                    break a.to_owned();
                }
            }
            _ => return Err("the appliance exited before listening".into()),
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok((server, addr))
}

/// The appliance's `/_ready` answer (`Null` when it does not answer).
pub async fn ready(client: &reqwest::Client, base: &str) -> Value {
    match client.get(format!("{base}/_ready")).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// The events the leading sink has stored, from a `/_ready` answer (0 if it does not say).
pub fn events_stored(ready: &Value) -> u64 {
    ready["sink"]["events_stored"].as_u64().unwrap_or(0)
}
