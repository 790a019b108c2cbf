//! What an operator watches: `/metrics` in Prometheus' text format on the admin address (open
//! to loopback, the API token needed from elsewhere), the same figures sent to StatsD when
//! `STATSD_HOST` is set, and logs as JSON lines when `LOG_FORMAT=json` or under the journal.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{cli, create_team, enable_plugin, install_plugin, Appliance, TOKEN};
use serde_json::json;

/// One sample per line: `name{labels} value`, keyed by everything before the value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn sample(all: &HashMap<String, f64>, name: &str, labels: &[&str]) -> Option<f64> {
    all.iter()
        .filter(|(key, _)| {
            key.split('{').next() == Some(name) && labels.iter().all(|l| key.contains(l))
        })
        .map(|(_, v)| *v)
        .next()
}

async fn scrape(client: &reqwest::Client, url: String) -> HashMap<String, f64> {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    samples(&response.text().await.unwrap())
}

/// An address of this machine that is not loopback, as another machine would reach it.
fn outside_address() -> IpAddr {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    // Connecting a UDP socket sends nothing; it only picks the outgoing interface.
    socket
        .connect("192.0.2.1:9")
        .expect("this machine needs a non-loopback interface for this test");
    let ip = socket.local_addr().unwrap().ip();
    assert!(!ip.is_loopback(), "no non-loopback address: {ip}");
    ip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_events_sink_writes_plugin_calls_and_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "t", TOKEN).to_string();
    install_plugin(dir.path(), "tests/call-counter", "call_counter.wasm");
    enable_plugin(dir.path(), &team, "Call Counter", &[]);
    install_plugin(dir.path(), "tests/job-lab", "job_lab.wasm");
    enable_plugin(dir.path(), &team, "Job Lab", &[]);
    let app = Appliance::start(dir.path(), &[("ADMIN_HOSTNAME", "0.0.0.0")]);
    let client = reqwest::Client::new();

    let batch: Vec<_> = (0..5)
        .map(|i| json!({"event": "e", "distinct_id": format!("u{i}")}))
        .chain([json!({"event": "", "distinct_id": "bad"})])
        .collect();
    let response = client
        .post(app.url("/batch/"))
        .json(&json!({"api_key": TOKEN, "batch": batch}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "one event of six has no name");
    let response = client
        .post(app.url("/e"))
        .json(&json!({"api_key": "phc_unknown", "event": "e", "distinct_id": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    app.wait_drained().await;

    let local = format!("http://127.0.0.1:{}/metrics", app.admin.port());
    let m = scrape(&client, local.clone()).await;
    let get = |name: &str, labels: &[&str]| {
        sample(&m, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in {m:#?}"))
    };
    assert_eq!(
        get(
            "appliance_capture_requests_total",
            &["endpoint=\"/batch\"", "outcome=\"400\""]
        ),
        1.0
    );
    assert_eq!(
        get(
            "appliance_capture_requests_total",
            &["endpoint=\"/e\"", "outcome=\"401\""]
        ),
        1.0
    );
    assert_eq!(
        get("appliance_capture_events_total", &["outcome=\"accepted\""]),
        5.0
    );
    assert_eq!(
        get("appliance_capture_events_total", &["outcome=\"rejected\""]),
        1.0
    );
    assert_eq!(
        get(
            "appliance_capture_ack_seconds_count",
            &["endpoint=\"/batch\""]
        ),
        1.0
    );
    assert_eq!(
        get(
            "appliance_sink_events_total",
            &["sink=\"sqlite\"", "outcome=\"stored\""]
        ),
        5.0
    );
    assert!(get("appliance_sink_write_seconds_count", &["sink=\"sqlite\""]) >= 1.0);
    assert_eq!(
        get("appliance_sink_batch_events_sum", &["sink=\"sqlite\""]),
        5.0
    );
    assert!(
        get(
            "appliance_plugin_calls_total",
            &["kind=\"process_event\"", "outcome=\"ok\""]
        ) >= 1.0
    );
    assert_eq!(get("appliance_sink_lag_batches", &["sink=\"sqlite\""]), 0.0);
    assert_eq!(get("appliance_queue_oldest_age_seconds", &[]), 0.0);
    assert!(get("appliance_free_disk_bytes", &[]) > 0.0);
    assert_eq!(get("appliance_jobs", &["state=\"running\""]), 0.0);

    // A job's run is timed and counted by how it ended.
    let api = common::Api::new(&app);
    let id = api
        .enqueue(&team, "Job Lab", json!({"name": "refuse"}))
        .await;
    api.wait_job_state(&id, "dead").await;
    let m = scrape(&client, local).await;
    assert!(
        sample(
            &m,
            "appliance_jobs_finished_total",
            &["kind=\"plugin\"", "outcome=\"failed\""]
        )
        .is_some(),
        "{m:#?}"
    );

    // From another machine the API token is needed.
    let outside = format!("http://{}:{}/metrics", outside_address(), app.admin.port());
    let refused = client.get(&outside).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let token = cli(dir.path(), &["api-token"]).trim().to_owned();
    let allowed = client
        .get(&outside)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    // Never on the public port.
    let public = client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(public.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_receives_the_same_figures_under_its_prefix() {
    let statsd = UdpSocket::bind("127.0.0.1:0").unwrap();
    statsd
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let port = statsd.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(
        dir.path(),
        &[
            ("STATSD_HOST", "127.0.0.1"),
            ("STATSD_PORT", &port),
            ("STATSD_PREFIX", "box."),
        ],
    );
    let (status, _) = common::probe_event(&app, "probe").await;
    assert_eq!(status, 200);

    let mut received = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline
        && !(received.contains("box.appliance_capture_events_total:1|c")
            && received.contains("box.appliance_sink_write_seconds:"))
    {
        if let Ok(n) = statsd.recv(&mut buf) {
            received.push_str(&String::from_utf8_lossy(&buf[..n]));
            received.push('\n');
        }
    }
    assert!(
        received.contains("box.appliance_capture_events_total:1|c"),
        "{received}"
    );
    assert!(
        received.contains("box.appliance_sink_write_seconds:"),
        "{received}"
    );
    drop(app);
}

/// The process's stderr lines, once one contains `text` (or after 10 s).
fn stderr_until(app: &Appliance, text: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    while Instant::now() < deadline && !lines.iter().any(|l: &String| l.contains(text)) {
        lines.extend(app.stderr_lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_when_asked_or_under_the_journal() {
    for env in [
        [("LOG_FORMAT", "json"), ("LOG_LEVEL", "info")],
        [("JOURNAL_STREAM", "8:12345"), ("LOG_LEVEL", "info")],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let app = Appliance::start(dir.path(), &env);
        let lines = stderr_until(&app, "storage opened");
        app.terminate();
        let started = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["fields"]["message"] == "storage opened")
            .unwrap_or_else(|| panic!("no JSON 'storage opened' line with {env:?}: {lines:#?}"));
        assert_eq!(started["level"], "INFO");
        assert!(started["fields"]["events"]
            .as_str()
            .unwrap()
            .ends_with("events.sqlite3"));
        assert!(started["timestamp"].is_string());
    }
    // On a terminal or a pipe with nothing asked, lines are for people.
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &[("LOG_LEVEL", "info")]);
    let lines = stderr_until(&app, "storage opened");
    app.terminate();
    let opened = lines
        .iter()
        .find(|l| l.contains("storage opened"))
        .expect("a 'storage opened' line");
    assert!(serde_json::from_str::<serde_json::Value>(opened).is_err());
    assert!(opened.contains("INFO"));
}
