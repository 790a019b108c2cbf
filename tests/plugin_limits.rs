//! Plugins that try to hurt others, each on purpose (the `Hostile` and `Job Lab` test plugins):
//! a call that sleeps or waits on a request that never answers, a slow plugin, a setup that
//! never returns, floods of storage, cache, logs and jobs, a host name that resolves to
//! loopback, output far larger or deeper than capture accepts, a reused idempotency key and an
//! unknown `after` inside a job, and teardown. Each gets a precise error (the plugin's, and a
//! line for the operator in its logs), and another team's events keep reaching the sink within
//! a couple of seconds throughout.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    cli, create_team, enable_plugin, install_plugin, memory_kib, read_events, storage,
    wait_storage, Api, Appliance, Row,
};
use serde_json::{json, Value};

const HOSTILE_TOKEN: &str = "phc_hostileTeamToken1";
const OTHER_TOKEN: &str = "phc_otherTeamToken123";

/// Two teams: one with the hostile plugin configured by `config`, one with no plugin at all.
fn two_teams(dir: &Path, config: &[&str]) -> String {
    let hostile = create_team(dir, "hostile", HOSTILE_TOKEN).to_string();
    create_team(dir, "other", OTHER_TOKEN);
    install_plugin(dir, "tests/hostile", "hostile.wasm");
    enable_plugin(dir, &hostile, "Hostile", config);
    hostile
}

async fn post(app: &Appliance, token: &str, name: &str) -> u16 {
    let body = json!({"api_key": token, "batch": [{"event": name, "distinct_id": "u"}]});
    reqwest::Client::new()
        .post(app.url("/batch/"))
        .json(&body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Sends the other team's events every 200 ms while `running`, asserting each is stored within
/// `within`; returns how many were checked.
fn keep_checking_the_other_team(
    app: &Appliance,
    running: Arc<AtomicBool>,
    within: Duration,
) -> tokio::task::JoinHandle<usize> {
    let (url, sqlite) = (app.url("/batch/"), app.sqlite_path());
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut checked = 0;
        while running.load(Ordering::Relaxed) {
            let name = format!("other-{checked}");
            let body =
                json!({"api_key": OTHER_TOKEN, "batch": [{"event": name, "distinct_id": "o"}]});
            let sent = Instant::now();
            let status = client.post(&url).json(&body).send().await.unwrap().status();
            assert_eq!(status, 200);
            loop {
                if read_events(&sqlite).iter().any(|r| r.event == name) {
                    break;
                }
                assert!(
                    sent.elapsed() < within,
                    "the other team's event {name} was not stored within {within:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            checked += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        checked
    })
}

async fn wait_for_event(app: &Appliance, name: &str, within: Duration) -> Row {
    let deadline = Instant::now() + within;
    loop {
        if let Some(row) = read_events(&app.sqlite_path())
            .into_iter()
            .find(|r| r.event == name)
        {
            return row;
        }
        assert!(
            Instant::now() < deadline,
            "{name} was not stored within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn logs(dir: &Path, team: &str) -> String {
    cli(
        dir,
        &[
            "plugin", "logs", "--team", team, "Hostile", "--limit", "10000",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_sleeps_or_waits_on_a_silent_host_is_cut_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    // A host that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("url=http://{}/", silent.local_addr().unwrap());
    let hostile = two_teams(dir.path(), &["mode=fetch", &url]);
    let sleeper = create_team(dir.path(), "sleeper", "phc_sleeperTeamToken1").to_string();
    enable_plugin(dir.path(), &sleeper, "Hostile", &["mode=sleep"]);
    let app = Appliance::start(
        dir.path(),
        &[
            ("SINK_LINGER_MS", "0"),
            ("PLUGIN_ALLOWED_NETWORKS", "127.0.0.0/8"),
        ],
    );
    let running = Arc::new(AtomicBool::new(true));
    // One read can hold a fetch and a sleep (500 ms each, the chains of one read run in turn)
    // ahead of the other team's event, and another read may be under way when it arrives: 2 s
    // of waiting at worst, and 3 s with a loaded machine's write, far from the minute's sleep.
    let checker = keep_checking_the_other_team(&app, running.clone(), Duration::from_secs(3));
    for n in 0..3 {
        assert_eq!(post(&app, HOSTILE_TOKEN, &format!("fetch-{n}")).await, 200);
        assert_eq!(
            post(&app, "phc_sleeperTeamToken1", &format!("sleep-{n}")).await,
            200
        );
    }
    // Each call ends at its deadline (500 ms), not after the minute's sleep or the request's
    // 30 s timeout; the events go on unchanged.
    let started = Instant::now();
    let fetched = wait_for_event(&app, "fetch-2", Duration::from_secs(20)).await;
    assert!(
        fetched.properties.get("fetch").is_none(),
        "{}",
        fetched.properties
    );
    wait_for_event(&app, "sleep-2", Duration::from_secs(20)).await;
    assert!(started.elapsed() < Duration::from_secs(15));
    running.store(false, Ordering::Relaxed);
    assert!(checker.await.unwrap() >= 3);
    for team in [&hostile, &sleeper] {
        let logged = logs(dir.path(), team);
        assert!(logged.contains("ran past its deadline"), "{logged}");
    }
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_spends_its_time_budget_and_only_its_team_waits() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = two_teams(dir.path(), &["mode=slow", "ms=250"]);
    let app = Appliance::start(
        dir.path(),
        &[
            ("SINK_LINGER_MS", "0"),
            ("PLUGIN_TIME_BUDGET_MS_PER_MINUTE", "1000"),
        ],
    );
    let running = Arc::new(AtomicBool::new(true));
    let checker = keep_checking_the_other_team(&app, running.clone(), Duration::from_secs(2));
    for n in 0..12 {
        assert_eq!(post(&app, HOSTILE_TOKEN, &format!("slow-{n}")).await, 200);
    }
    // Some go through; then the budget is spent and the rest wait, visibly.
    wait_for_event(&app, "slow-0", Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let ready: Value = reqwest::get(app.url("/_ready"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ready["sink"]["waiting_teams"][&hostile].is_string() {
            break ready;
        }
        assert!(Instant::now() < deadline, "the team never waited: {ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        ready["sink"]["waiting_teams"][&hostile]
            .as_str()
            .unwrap()
            .contains("over its time budget"),
        "{ready}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.store(false, Ordering::Relaxed);
    assert!(checker.await.unwrap() >= 5, "the other team kept flowing");
    let stored_slow = read_events(&app.sqlite_path())
        .iter()
        .filter(|r| r.event.starts_with("slow-"))
        .count();
    assert!(stored_slow < 12, "the slow team's events wait");
    assert!(logs(dir.path(), &hostile).contains("used its time budget"));
    // Once the plugin is disabled the waiting events are stored, none lost.
    cli(
        dir.path(),
        &["plugin", "disable", "--team", &hostile, "Hostile"],
    );
    app.wait_drained().await;
    let stored_slow = read_events(&app.sqlite_path())
        .iter()
        .filter(|r| r.event.starts_with("slow-"))
        .count();
    assert_eq!(stored_slow, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setup_that_never_returns_holds_back_only_its_team() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = two_teams(dir.path(), &["mode=tag", "name=x", "setup=hang"]);
    let app = Appliance::start(
        dir.path(),
        &[("SINK_LINGER_MS", "0"), ("PLUGIN_SETUP_TIMEOUT_MS", "1000")],
    );
    let running = Arc::new(AtomicBool::new(true));
    let checker = keep_checking_the_other_team(&app, running.clone(), Duration::from_secs(2));
    assert_eq!(post(&app, HOSTILE_TOKEN, "while-starting").await, 200);
    // The setup is cut at its deadline, logged, and the event goes on without the plugin.
    let row = wait_for_event(&app, "while-starting", Duration::from_secs(10)).await;
    assert!(row.properties.get("chain").is_none(), "{}", row.properties);
    running.store(false, Ordering::Relaxed);
    assert!(checker.await.unwrap() >= 2);
    let logged = logs(dir.path(), &hostile);
    assert!(logged.contains("could not start"), "{logged}");
    assert!(logged.contains("ran past its deadline"), "{logged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_storage_cache_logs_and_jobs_meet_their_quotas() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = two_teams(dir.path(), &["mode=storage-flood"]);
    let modes = ["cache-flood", "log-flood", "job-flood"];
    let mut teams = Vec::new();
    for mode in modes {
        let token = format!("phc_{}Token1", mode.replace('-', ""));
        let team = create_team(dir.path(), mode, &token).to_string();
        enable_plugin(dir.path(), &team, "Hostile", &[&format!("mode={mode}")]);
        teams.push((mode, team, token));
    }
    let app = Appliance::start(
        dir.path(),
        &[
            ("SINK_LINGER_MS", "0"),
            ("PLUGIN_STORAGE_MAX_BYTES", "1048576"),
            ("PLUGIN_CACHE_MAX_BYTES", "8388608"),
            ("PLUGIN_LOG_MAX_LINES", "2000"),
            ("PLUGIN_MAX_QUEUED_JOBS", "500"),
        ],
    );
    let running = Arc::new(AtomicBool::new(true));
    let checker = keep_checking_the_other_team(&app, running.clone(), Duration::from_secs(3));
    assert_eq!(post(&app, HOSTILE_TOKEN, "storage-flood").await, 200);
    for (mode, _, token) in &teams {
        assert_eq!(post(&app, token, mode).await, 200);
    }
    let within = Duration::from_secs(30);
    let storage_row = wait_for_event(&app, "storage-flood", within).await;
    let flood = &storage_row.properties["flood"];
    assert_eq!(
        flood["stored"], 15,
        "15 values of 64 KiB fit in 1 MiB: {flood}"
    );
    assert!(
        flood["refusal"]
            .as_str()
            .unwrap()
            .contains("PLUGIN_STORAGE_MAX_BYTES"),
        "{flood}"
    );
    let kept = storage(dir.path(), &hostile, "Hostile");
    let bytes: usize = kept.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(
        bytes <= 1 << 20 && kept.len() == 15,
        "{} keys, {bytes} bytes",
        kept.len()
    );
    assert!(logs(dir.path(), &hostile).contains("storage.set(\"k15\") refused"));

    let cache_row = wait_for_event(&app, "cache-flood", within).await;
    let flood = &cache_row.properties["flood"];
    assert_eq!(flood["stored"], 200, "sets never fail, they evict: {flood}");
    assert_eq!(
        flood["first_kept"], false,
        "the oldest entries were evicted: {flood}"
    );
    assert_eq!(flood["last_kept"], true, "{flood}");
    assert!(
        flood["too_big"]
            .as_str()
            .unwrap()
            .contains("PLUGIN_CACHE_MAX_BYTES"),
        "{flood}"
    );

    wait_for_event(&app, "log-flood", within).await;
    let log_team = &teams[1].1;
    let lines = logs(dir.path(), log_team);
    let count = lines.lines().count();
    assert!(count <= 2000, "{count} lines kept");
    assert!(
        lines.contains("more log lines of this call were dropped"),
        "the cap is logged"
    );
    assert!(
        lines.lines().all(|l| l.len() < 4096 + 200),
        "lines are cut at PLUGIN_LOG_LINE_MAX_BYTES"
    );

    let job_row = wait_for_event(&app, "job-flood", within).await;
    let flood = &job_row.properties["flood"];
    assert_eq!(flood["queued"], 500, "{flood}");
    assert!(
        flood["refusal"]
            .as_str()
            .unwrap()
            .contains("PLUGIN_MAX_QUEUED_JOBS"),
        "{flood}"
    );

    running.store(false, Ordering::Relaxed);
    assert!(checker.await.unwrap() >= 2);
    let peak = memory_kib(app.pid(), "VmHWM");
    assert!(peak < 400 * 1024, "peak RSS {peak} KiB");
    let on_disk = dir_size(dir.path());
    assert!(
        on_disk < 64 << 20,
        "the data directory holds {on_disk} bytes"
    );
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            if p.is_dir() {
                dir_size(&p)
            } else {
                std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_loopback_is_refused_unless_the_operator_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    // Serve something on a loopback port, so an allowed request gets an answer. The listener
    // keeps the port from the moment it is chosen (probing a port and binding it again later
    // lost it to a parallel test once).
    let app_for_port = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app_for_port).await });
    let url = format!("url=http://localhost:{port}/");
    let hostile = two_teams(dir.path(), &["mode=fetch", &url]);
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    assert_eq!(post(&app, HOSTILE_TOKEN, "closed").await, 200);
    let row = wait_for_event(&app, "closed", Duration::from_secs(10)).await;
    let error = row.properties["fetch"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("localhost resolves to 127.0.0.1") || error.contains("resolves to ::1"),
        "{}",
        row.properties
    );
    assert!(logs(dir.path(), &hostile).contains("plugins may not reach"));
    drop(app);
    let app = Appliance::start(
        dir.path(),
        &[
            ("SINK_LINGER_MS", "0"),
            ("PLUGIN_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128"),
        ],
    );
    assert_eq!(post(&app, HOSTILE_TOKEN, "allowed").await, 200);
    let row = wait_for_event(&app, "allowed", Duration::from_secs(10)).await;
    assert_eq!(row.properties["fetch"]["status"], 200, "{}", row.properties);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_larger_or_deeper_than_capture_accepts_is_refused_and_the_event_kept() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = two_teams(dir.path(), &["mode=huge"]);
    let deep = create_team(dir.path(), "deep", "phc_deepTeamToken123").to_string();
    enable_plugin(dir.path(), &deep, "Hostile", &["mode=deep"]);
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    assert_eq!(post(&app, HOSTILE_TOKEN, "huge").await, 200);
    assert_eq!(post(&app, "phc_deepTeamToken123", "deep").await, 200);
    let huge = wait_for_event(&app, "huge", Duration::from_secs(10)).await;
    assert!(huge.properties.get("big").is_none(), "stored unchanged");
    let deep_row = wait_for_event(&app, "deep", Duration::from_secs(10)).await;
    assert!(
        deep_row.properties.get("deep").is_none(),
        "stored unchanged"
    );
    assert!(logs(dir.path(), &hostile).contains("more than CAPTURE_MAX_EVENT_BYTES"));
    let deep_logs = cli(dir.path(), &["plugin", "logs", "--team", &deep, "Hostile"]);
    assert!(
        deep_logs.contains("nested deeper than 128 levels"),
        "{deep_logs}"
    );
    // Every stored row is still readable by SQLite's JSON functions.
    let conn = rusqlite::Connection::open(app.sqlite_path()).unwrap();
    let n: i64 = conn
        .query_row(
            "SELECT count(json_extract(properties, '$.x')) + count(*) FROM posthog_event",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(n >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_a_job_a_used_key_answers_its_job_and_an_unknown_after_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "lab", "phc_labTeamToken12345").to_string();
    install_plugin(dir.path(), "tests/job-lab", "job_lab.wasm");
    enable_plugin(dir.path(), &team, "Job Lab", &[]);
    let app = Appliance::start(dir.path(), &[("JOB_RETRY_BASE_MS", "100")]);
    let api = Api::new(&app);
    let kept = api
        .enqueue(
            &team,
            "Job%20Lab",
            json!({"name": "part", "idempotency_key": "K", "delay_ms": 3_600_000}),
        )
        .await;
    api.enqueue(
        &team,
        "Job%20Lab",
        json!({"name": "reuse-key", "payload": {"key": "K"}}),
    )
    .await;
    let unknown = uuid::Uuid::now_v7().to_string();
    api.enqueue(
        &team,
        "Job%20Lab",
        json!({"name": "bad-after", "payload": {"after": unknown}}),
    )
    .await;
    let seen = wait_storage(dir.path(), &team, "Job Lab", "both jobs", |s| {
        s.contains_key("reuse_first") && s.contains_key("bad_after")
    })
    .await;
    assert_eq!(seen["reuse_existing"], kept, "the key names the kept job");
    assert_eq!(
        seen["reuse_first"], seen["reuse_second"],
        "one key, one job"
    );
    assert!(
        seen["bad_after"].contains("not queued"),
        "{}",
        seen["bad_after"]
    );
    assert!(
        seen["bad_after"].starts_with("Err"),
        "{}",
        seen["bad_after"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_runs_when_a_config_is_disabled_and_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = two_teams(dir.path(), &["mode=tag", "name=x", "teardown=log"]);
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    assert_eq!(post(&app, HOSTILE_TOKEN, "one").await, 200);
    app.wait_drained().await;
    cli(
        dir.path(),
        &["plugin", "disable", "--team", &hostile, "Hostile"],
    );
    assert_eq!(post(&app, HOSTILE_TOKEN, "two").await, 200);
    app.wait_drained().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !logs(dir.path(), &hostile).contains("teardown ran") {
        assert!(
            Instant::now() < deadline,
            "teardown never ran after disable"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    enable_plugin(
        dir.path(),
        &hostile,
        "Hostile",
        &["mode=tag", "name=x", "teardown=log"],
    );
    assert_eq!(post(&app, HOSTILE_TOKEN, "three").await, 200);
    app.wait_drained().await;
    let before = logs(dir.path(), &hostile).matches("teardown ran").count();
    assert!(app.terminate().success());
    let after = logs(dir.path(), &hostile).matches("teardown ran").count();
    assert_eq!(after, before + 1, "teardown ran at shutdown");
}
