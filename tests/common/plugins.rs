//! Plugins as an operator handles them in tests: folders built from `plugins/`, installed and
//! enabled through the CLI, their storage read back, the management API, and webhooks that
//! exporters deliver to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{command, create_team, Appliance, TOKEN};

/// A plugin folder as an author ships it: plugin.json beside the built component.
pub fn plugin_folder(crate_dir: &str, wasm: &str) -> tempfile::TempDir {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let built = root.join("target/wasm32-wasip2/release").join(wasm);
    assert!(
        built.exists(),
        "{} is not built: run `cargo build --release --target wasm32-wasip2` in plugins/ (.ci/run does)",
        built.display()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        root.join(crate_dir).join("plugin.json"),
        dir.path().join("plugin.json"),
    )
    .unwrap();
    std::fs::copy(&built, dir.path().join(wasm)).unwrap();
    dir
}

pub fn cli(data_dir: &Path, args: &[&str]) -> String {
    let out = command(data_dir).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "appliance {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn cli_error(data_dir: &Path, args: &[&str]) -> String {
    let out = command(data_dir).args(args).output().unwrap();
    assert!(!out.status.success(), "appliance {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `appliance plugin enable --team TEAM PLUGIN --config KEY=VALUE…`, as an operator types it.
pub fn enable_plugin(data_dir: &Path, team: &str, plugin: &str, config: &[&str]) -> String {
    let mut args = vec!["plugin", "enable", "--team", team, plugin];
    for value in config {
        args.extend(["--config", value]);
    }
    cli(data_dir, &args)
}

/// Installs the plugin built from `plugins/<crate_dir>` through the CLI; returns what it printed.
pub fn install_plugin(data_dir: &Path, crate_dir: &str, wasm: &str) -> String {
    let folder = plugin_folder(crate_dir, wasm);
    cli(
        data_dir,
        &["plugin", "install", folder.path().to_str().unwrap()],
    )
}

/// A team (with [`TOKEN`]) whose Job Lab plugin is enabled with `config`, and a server started
/// with `env`; answers the server and the team's id.
pub fn start_job_lab(dir: &Path, config: &[&str], env: &[(&str, &str)]) -> (Appliance, String) {
    let team = create_team(dir, "lab", TOKEN).to_string();
    install_plugin(dir, "tests/job-lab", "job_lab.wasm");
    enable_plugin(dir, &team, "Job Lab", config);
    (Appliance::start(dir, env), team)
}

/// What a plugin config keeps in storage, read through the CLI.
pub fn storage(dir: &Path, team: &str, plugin: &str) -> HashMap<String, String> {
    cli(dir, &["plugin", "storage", "--team", team, plugin])
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Polls the plugin config's storage until `done` holds, or fails with what it last saw.
pub async fn wait_storage(
    dir: &Path,
    team: &str,
    plugin: &str,
    what: &str,
    done: impl Fn(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = storage(dir, team, plugin);
        if done(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; storage is {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The management API, with the admin token read through the CLI.
pub struct Api {
    pub base: String,
    pub token: String,
    pub client: reqwest::Client,
}

impl Api {
    pub fn new(app: &Appliance) -> Api {
        Api {
            base: app.admin_url(""),
            token: cli(&app.data_dir, &["api-token"]).trim().to_owned(),
            client: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn enqueue(&self, team: &str, plugin: &str, job: Value) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/teams/{team}/plugins/{plugin}/jobs"),
                Some(job),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    pub async fn job(&self, id: &str) -> Value {
        let (status, body) = self
            .call(reqwest::Method::GET, &format!("/api/jobs/{id}"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits until job `id` has saved `checkpoint` (a running job's durable sign of progress).
    pub async fn wait_checkpoint(&self, id: &str, checkpoint: &str) -> Value {
        self.wait_job_field(id, "checkpoint", checkpoint).await
    }

    pub async fn wait_job_state(&self, id: &str, state: &str) -> Value {
        self.wait_job_field(id, "state", state).await
    }

    /// Polls job `id` until its `field` is `want` (60 s at most); answers the job.
    async fn wait_job_field(&self, id: &str, field: &str, want: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = self.job(id).await;
            if job[field] == want {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never had {field} {want:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What a test webhook answers to its `n`th request (from 0): after how long, with what status.
pub type Answer = fn(usize) -> (Duration, u16);

/// A webhook endpoint answering as `answer` says, keeping each request's status and body.
pub async fn webhook(answer: Answer) -> (SocketAddr, Arc<Mutex<Vec<(u16, Value)>>>) {
    let seen: Arc<Mutex<Vec<(u16, Value)>>> = Arc::default();
    let record = seen.clone();
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<Value>| {
            let (record, requests) = (record.clone(), requests.clone());
            async move {
                let n = requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (delay, status) = answer(n);
                tokio::time::sleep(delay).await;
                record.lock().unwrap().push((status, body.0));
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

/// Installs the webhook exporter in `data_dir` and enables it for `team`, pointed at a webhook
/// that answers 200; returns what the webhook received.
pub async fn webhook_exporter(data_dir: &Path, team: &str) -> Arc<Mutex<Vec<(u16, Value)>>> {
    install_plugin(
        data_dir,
        "examples/webhook-exporter",
        "webhook_exporter.wasm",
    );
    let (hook, seen) = webhook(|_| (Duration::ZERO, 200)).await;
    let url = format!("url=http://{hook}/hook");
    enable_plugin(data_dir, team, "Webhook Exporter", &[&url]);
    seen
}

/// The events a webhook exporter delivered, once there are at least `at_least` (60 s at most).
pub async fn delivered_events(seen: &Mutex<Vec<(u16, Value)>>, at_least: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered: Vec<Value> = seen
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, body)| body["batch"].as_array().cloned().unwrap_or_default())
            .collect();
        if delivered.len() >= at_least {
            return delivered;
        }
        assert!(
            Instant::now() < deadline,
            "only {} delivered",
            delivered.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
