//! Starts the real `appliance` binary for integration tests and reads what it stored.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod ch;
pub mod fidelity;
pub mod kafka;
pub mod load;
pub mod pg;
pub mod plugins;
pub mod redis;

// Every test file names these as `common::…`, as when they lived here; not every file uses them.
#[allow(unused_imports)]
pub use plugins::*;

pub const TOKEN: &str = "phc_testProjectToken123";

/// A port nothing listens on now (for a server a test starts).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").port()
}

/// Waits until something accepts connections on `port`; fails loudly after `within`.
pub fn wait_listening(port: u16, what: &str, within: Duration) {
    assert!(wait_listening_while_running(None, port, what, within));
}

/// Waits until something accepts connections on `port`, or `server` exits (answers `false`:
/// a server that could not bind the port it was given); fails loudly after `within`.
pub fn wait_listening_while_running(
    mut server: Option<&mut std::process::Child>,
    port: u16,
    what: &str,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(child) = server.as_mut() {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_appliance")
}

/// A command for the appliance binary with a data directory and a quiet log.
pub fn command(data_dir: &Path) -> Command {
    let mut cmd = Command::new(binary());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATA_DIR", data_dir)
        // Never the package's /etc/appliance/appliance.env of the machine running the tests.
        .env("APPLIANCE_ENV_FILE", "")
        .env("WEB_HOSTNAME", "127.0.0.1")
        .env("WEB_PORT", "0")
        .env("ADMIN_PORT", "0")
        .env("LOG_LEVEL", "warn");
    cmd
}

/// Creates a team with a chosen token through the CLI, as an operator would.
pub fn create_team(data_dir: &Path, name: &str, token: &str) -> u64 {
    let out = command(data_dir)
        .args(["team", "create", name, "--token", token])
        .output()
        .expect("run appliance team create");
    assert!(
        out.status.success(),
        "team create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no team id in {text:?}"))
}

/// A running appliance process.
pub struct Appliance {
    child: Child,
    pub addr: SocketAddr,
    /// The admin listener (management API, health).
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    stderr: mpsc::Receiver<String>,
    /// The admin page's first-run link, if the appliance printed one.
    setup_link: Arc<Mutex<Option<String>>>,
}

impl Appliance {
    /// Starts `appliance run` on 127.0.0.1 with a free port and waits until it listens.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Appliance {
        Appliance::start_with(data_dir, env, |_| {})
    }

    /// [`Appliance::start`], letting `customize` change the command first (limits, say).
    pub fn start_with(
        data_dir: &Path,
        env: &[(&str, &str)],
        customize: impl FnOnce(&mut Command),
    ) -> Appliance {
        let mut cmd = command(data_dir);
        cmd.arg("run").stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        customize(&mut cmd);
        let mut child = cmd.spawn().expect("spawn the appliance binary");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (addr_tx, addr_rx) = mpsc::channel();
        let setup_link = Arc::new(Mutex::new(None));
        let setup_slot = setup_link.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = addr_tx.send(addr.to_owned());
                }
                if let Some(addr) = line.strip_prefix("admin listening on http://") {
                    let _ = addr_tx.send(format!("admin {addr}"));
                }
                if let Some((_, link)) = line.split_once("admin set-up link") {
                    if let Some((_, url)) = link.split_once(": ") {
                        if let Ok(mut slot) = setup_slot.lock() {
                            *slot = Some(url.to_owned());
                        }
                    }
                }
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            match addr_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => match line.strip_prefix("admin ") {
                    Some(a) => admin = Some(a.parse().expect("a socket address")),
                    None => addr = Some(line.parse().expect("a socket address")),
                },
                Err(_) => {
                    let _ = child.kill();
                    let log: Vec<String> = err_rx.try_iter().collect();
                    panic!(
                        "the appliance did not start listening within 60 s; stderr:\n{}",
                        log.join("\n")
                    );
                }
            }
        }
        Appliance {
            child,
            addr: addr.expect("the capture address"),
            admin: admin.expect("the admin address"),
            data_dir: data_dir.to_owned(),
            stderr: err_rx,
            setup_link,
        }
    }

    /// The first-run set-up link the appliance printed (it comes just after the listening lines).
    pub fn setup_link(&self) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(link) = self.setup_link.lock().ok().and_then(|l| l.clone()) {
                return Some(link);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A URL on the capture listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A URL on the admin listener (management API).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The sum of the samples of metric `name` on `/metrics` (0 when it is not there yet).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.admin_url("/metrics"))
            .await
            .and_then(|r| r.error_for_status())
            .expect("/metrics answers")
            .text()
            .await
            .expect("/metrics text");
        text.lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.data_dir.join("events.sqlite3")
    }

    /// What the process has written to stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and waits for the exit status (at most 60 s).
    pub fn terminate(mut self) -> ExitStatus {
        use nix::sys::signal::{kill, Signal};
        kill(nix::unistd::Pid::from_raw(self.pid()), Signal::SIGTERM).expect("send SIGTERM");
        self.wait_exit(Duration::from_secs(60))
    }

    /// Waits for the process to exit (after SIGTERM, or by itself: a failure point aborting it).
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the appliance") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the appliance did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL the appliance");
        let _ = self.child.wait();
    }

    /// Polls `/_ready` until `check` holds of it (60 s at most, then fails saying `what`).
    pub async fn ready_when(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready: Value = client
                .get(self.url("/_ready"))
                .send()
                .await
                .expect("GET /_ready")
                .json()
                .await
                .expect("/_ready answers JSON");
            if check(&ready) {
                return ready;
            }
            assert!(Instant::now() < deadline, "{what} within 60 s: {ready}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until everything queued has reached the lead sink (followers may lag).
    pub async fn wait_drained_lead(&self) -> Value {
        self.ready_when("the lead drained", |ready| {
            ready["sink"]["delivered"] == ready["queue"]["last_seq"]
        })
        .await
    }

    /// Waits until everything queued has reached the sinks (none of it deferred for a team's
    /// plugins); returns the readiness report.
    pub async fn wait_drained(&self) -> Value {
        self.ready_when("the queue drained", |ready| {
            let last = ready["queue"]["last_seq"].as_u64().unwrap_or(u64::MAX);
            let deferred = ready["room"]["deferred_bytes_by_team"]
                .as_object()
                .is_some_and(|d| !d.is_empty());
            // Every follower sink has copied everything the lead's writes gave it.
            let followers_caught_up = ready["sinks"]
                .as_array()
                .is_none_or(|sinks| sinks.iter().all(|s| s["lag"] == 0));
            ready["sink"]["position"].as_u64() == Some(last)
                && ready["sink"]["delivered"].as_u64() == Some(last)
                && followers_caught_up
                && !deferred
        })
        .await
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One stored event row.
#[derive(Debug, Clone)]
pub struct Row {
    pub uuid: String,
    pub event: String,
    pub properties: Value,
    pub elements_chain: String,
    pub timestamp: String,
    pub team_id: i64,
    pub distinct_id: String,
    pub created_at: String,
    pub person_id: Option<String>,
    pub person_properties: Value,
    pub person_created_at: Option<String>,
    pub person_mode: String,
}

/// The stored event named `name` (the first, in storage order).
pub fn by_event<'a>(rows: &'a [Row], name: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.event == name)
        .unwrap_or_else(|| panic!("no event {name:?} stored"))
}

/// One `posthog_person` row, with its distinct ids (id, version) in name order.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonRow {
    pub uuid: String,
    pub properties: Value,
    pub created_at: String,
    pub is_identified: bool,
    pub version: i64,
    pub distinct_ids: Vec<(String, i64)>,
}

/// The persons of the SQLite sink, by uuid.
pub fn read_persons(sqlite: &Path) -> std::collections::BTreeMap<String, PersonRow> {
    let conn =
        rusqlite::Connection::open_with_flags(sqlite, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the SQLite event store");
    let mut stmt = conn
        .prepare(
            "SELECT id, uuid, properties, created_at, is_identified, version FROM posthog_person",
        )
        .expect("the posthog_person table exists");
    let mut ids = conn
        .prepare("SELECT distinct_id, version FROM posthog_persondistinctid WHERE person_id = ?1 ORDER BY distinct_id")
        .expect("the posthog_persondistinctid table exists");
    let rows: Vec<(i64, PersonRow)> = stmt
        .query_map([], |r| {
            let props: String = r.get(2)?;
            Ok((
                r.get(0)?,
                PersonRow {
                    uuid: r.get(1)?,
                    properties: serde_json::from_str(&props).expect("properties are JSON"),
                    created_at: r.get(3)?,
                    is_identified: r.get(4)?,
                    version: r.get(5)?,
                    distinct_ids: Vec::new(),
                },
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows.into_iter()
        .map(|(id, mut person)| {
            person.distinct_ids = ids
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            (person.uuid.clone(), person)
        })
        .collect()
}

/// The directory of the SDK drivers.
pub fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

/// Runs an SDK driver script against `app` (arguments: its address, [`TOKEN`], then `args`)
/// and returns what it reports having sent.
pub fn drive(program: &str, script: &str, app: &Appliance, args: &[&str]) -> Vec<Value> {
    let out = Command::new(program)
        .arg(sdk_dir().join(script))
        .arg(format!("http://{}", app.addr))
        .arg(TOKEN)
        .args(args)
        .current_dir(sdk_dir())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}; install it (see .ci/run)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'posthog'") && !stderr.contains("Cannot find package 'posthog-node'"),
        "the SDK is not installed: run `pip install -r tests/sdk/requirements.txt` and `npm ci --prefix tests/sdk`\n{stderr}"
    );
    assert!(
        out.status.success(),
        "{script} failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} printed no report ({e}): {stdout}"));
    assert_eq!(report["errors"], serde_json::json!([]), "{script}");
    report["sent"].as_array().cloned().unwrap_or_default()
}

/// Runs the real SDKs against `app` (posthog-python, posthog-node, then the posthog-python
/// person scenarios); returns how many events they sent.
pub fn run_real_sdks(app: &Appliance) -> usize {
    let run = std::process::id().to_string();
    let python = drive("python3", "python_sdk.py", app, &[&run]);
    let node = drive("node", "node_sdk.mjs", app, &[&run]);
    let persons = drive("python3", "persons_sdk.py", app, &[]);
    python.len() + node.len() + persons.len()
}

/// Writes the test GeoIP database (tests/sdk/make_mmdb.py, an independent MaxMind DB writer) to
/// `path`; `moved` puts the Amsterdam network in Rotterdam (a replaced database).
pub fn make_mmdb(path: &Path, moved: bool) {
    let mut command = Command::new("python3");
    command.arg(sdk_dir().join("make_mmdb.py")).arg(path);
    if moved {
        command.arg("moved");
    }
    let made = command.output().expect("python3 is installed");
    assert!(
        made.status.success(),
        "making the test database failed (pip install -r tests/sdk/requirements.txt): {}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// Sends `events` in one `/batch/` request with `token`; returns the status code.
pub async fn post_batch(app: &Appliance, token: &str, events: Vec<Value>) -> u16 {
    let body = serde_json::json!({"api_key": token, "batch": events});
    let response = reqwest::Client::new()
        .post(app.url("/batch/"))
        .json(&body)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

/// Sends `events` in one `/batch/` request with `token` and waits until they are stored.
pub async fn send_batch(app: &Appliance, token: &str, events: Vec<Value>) {
    assert_eq!(post_batch(app, token, events).await, 200);
    app.wait_drained().await;
}

/// Waits until the SQLite sink holds at least `count` events (at most 60 s); returns them.
pub async fn wait_stored(app: &Appliance, count: usize) -> Vec<Row> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = read_events(&app.sqlite_path());
        if rows.len() >= count || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn read_events(sqlite: &Path) -> Vec<Row> {
    let conn =
        rusqlite::Connection::open_with_flags(sqlite, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the SQLite event store");
    let mut stmt = conn
        .prepare("SELECT uuid, event, properties, elements_chain, timestamp, team_id, distinct_id, created_at,
                  person_id, person_properties, person_created_at, person_mode FROM posthog_event ORDER BY id")
        .expect("the posthog_event table exists");
    stmt.query_map([], |r| {
        let props: String = r.get(2)?;
        Ok(Row {
            uuid: r.get(0)?,
            event: r.get(1)?,
            properties: serde_json::from_str(&props).expect("properties are JSON"),
            elements_chain: r.get(3)?,
            timestamp: r.get(4)?,
            team_id: r.get(5)?,
            distinct_id: r.get(6)?,
            created_at: r.get(7)?,
            person_id: r.get(8)?,
            person_properties: serde_json::from_str(&r.get::<_, String>(9)?)
                .expect("person properties are JSON"),
            person_created_at: r.get(10)?,
            person_mode: r.get(11)?,
        })
    })
    .expect("query events")
    .map(|r| r.expect("row"))
    .collect()
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS` now, `VmHWM` the peak so far).
pub fn memory_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Sends one small event as a well-behaved client would; returns its status and how long the
/// answer took.
pub async fn probe_event(app: &Appliance, name: &str) -> (u16, Duration) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let started = Instant::now();
    let body =
        serde_json::json!({"api_key": TOKEN, "batch": [{"event": name, "distinct_id": "probe"}]});
    let status = match client.post(app.url("/batch/")).json(&body).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    };
    (status, started.elapsed())
}

/// Sends `count` events named `past`, one second apart from 2026-11-01T00:00:00Z (each with its
/// index as property `i`), in batches of 250 with [`TOKEN`], and waits until they are stored.
pub async fn send_past_events(app: &Appliance, count: i64) {
    let start = chrono::DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").unwrap();
    for chunk in (0..count).collect::<Vec<i64>>().chunks(250) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|i| {
                let at = start + chrono::TimeDelta::seconds(*i);
                serde_json::json!({"event": "past", "distinct_id": "u", "timestamp": at.to_rfc3339(),
                       "properties": {"i": i}})
            })
            .collect();
        let response = reqwest::Client::new()
            .post(app.url("/batch/"))
            .json(&serde_json::json!({"api_key": TOKEN, "batch": batch}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    app.wait_drained().await;
}
