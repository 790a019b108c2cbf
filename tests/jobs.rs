//! The durable job queue and schedules end to end, on the real binary with WASM plugins built
//! from `plugins/`: exports that retry until a webhook answers, scheduled tasks, retries and
//! dead letters, checkpoints, cancel and terminate, a SIGKILL mid-job, chains and fan-in, and
//! the per-plugin-config limit.

mod common;

use std::collections::HashMap;
use std::path::Path;

use std::time::{Duration, Instant};

use common::{
    cli, create_team, enable_plugin, install_plugin, send_past_events, storage, wait_storage,
    webhook, Api, Appliance, TOKEN,
};
use serde_json::{json, Value};

/// Fast retries, so the tests do not wait for the production backoff; the test webhooks listen
/// on loopback, which plugins may reach only when the operator allows it.
const FAST: &[(&str, &str)] = &[
    ("JOB_RETRY_BASE_MS", "100"),
    ("SINK_LINGER_MS", "0"),
    ("PLUGIN_ALLOWED_NETWORKS", "127.0.0.0/8"),
];

fn start_lab(dir: &Path, env: &[(&str, &str)]) -> (Appliance, String) {
    let mut all = FAST.to_vec();
    all.extend_from_slice(env);
    common::start_job_lab(dir, &[], &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_exporter_gets_stored_events_and_retries_after_a_500() {
    let dir = tempfile::tempdir().unwrap();
    // 500 to the first request, 200 after.
    let (addr, seen) = webhook(|n| (Duration::ZERO, if n == 0 { 500 } else { 200 })).await;
    let team = create_team(dir.path(), "shop", TOKEN).to_string();
    install_plugin(
        dir.path(),
        "examples/webhook-exporter",
        "webhook_exporter.wasm",
    );
    let url = format!("url=http://{addr}/hook");
    enable_plugin(dir.path(), &team, "Webhook Exporter", &[&url]);
    let app = Appliance::start(dir.path(), FAST);
    let events: Vec<Value> = (0..3)
        .map(|i| json!({"event": "order", "distinct_id": "u1", "properties": {"n": i}}))
        .collect();
    let response = reqwest::Client::new()
        .post(app.url("/batch/"))
        .json(&json!({"api_key": TOKEN, "batch": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen
        .lock()
        .unwrap()
        .iter()
        .any(|(status, _)| *status == 200)
    {
        assert!(
            Instant::now() < deadline,
            "the webhook never got a batch it accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].0, 500, "the first delivery was refused");
    assert_eq!(seen[0].1, seen[1].1, "the retry sent the same batch");
    let batch = seen[1].1["batch"].as_array().unwrap();
    let mut numbers: Vec<i64> = batch
        .iter()
        .map(|e| e["properties"]["n"].as_i64().unwrap())
        .collect();
    numbers.sort();
    assert_eq!(numbers, [0, 1, 2]);
    assert!(batch
        .iter()
        .all(|e| e["event"] == "order" && e["uuid"].is_string()));
    let stored: Vec<String> = common::read_events(&app.sqlite_path())
        .into_iter()
        .map(|r| r.uuid)
        .collect();
    assert!(batch
        .iter()
        .all(|e| stored.contains(&e["uuid"].as_str().unwrap().to_owned())));
    let logs = cli(
        dir.path(),
        &["plugin", "logs", "--team", &team, "Webhook Exporter"],
    );
    assert!(logs.contains("answered 500"), "{logs}");
    assert!(logs.contains("exported 3 events"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_digest_runs_its_slot_and_folds_through_a_durable_job() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "shop", TOKEN).to_string();
    install_plugin(
        dir.path(),
        "examples/scheduled-digest",
        "scheduled_digest.wasm",
    );
    enable_plugin(dir.path(), &team, "Scheduled Digest", &[]);
    let minute = || chrono::Utc::now().timestamp().div_euclid(60);
    let first_minute = minute();
    let _app = Appliance::start(dir.path(), FAST);
    // The slot in progress runs at once, and its job folds the count into storage.
    wait_storage(
        dir.path(),
        &team,
        "Scheduled Digest",
        "the first run",
        |s| s.contains_key("runs"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = storage(dir.path(), &team, "Scheduled Digest");
    let number = |key: &str| {
        seen.get(key)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    // One run per minute slot that came due, never more (usually one; two across a boundary).
    let slots = minute() - first_minute + 1;
    let runs = number("scheduled_runs");
    assert!(
        (1..=slots).contains(&runs),
        "{runs} runs in {slots} minute slot(s): {seen:?}"
    );
    let folds = number("runs");
    assert!(
        (1..=runs).contains(&folds),
        "{folds} folds for {runs} runs: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_jobs_retry_with_backoff_then_become_dead_letters_that_can_be_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let (app, team) = start_lab(dir.path(), &[]);
    let api = Api::new(&app);
    api.enqueue(
        &team,
        "Job Lab",
        json!({"name": "flaky", "payload": {"succeed_on": 3}}),
    )
    .await;
    let doomed = api
        .enqueue(
            &team,
            "Job Lab",
            json!({"name": "doomed", "max_attempts": 3}),
        )
        .await;
    let refused = api
        .enqueue(&team, "Job Lab", json!({"name": "refuse"}))
        .await;

    let seen = wait_storage(dir.path(), &team, "Job Lab", "flaky to succeed", |s| {
        s.contains_key("flaky_done")
    })
    .await;
    assert_eq!(seen["flaky_done"], "3");

    let dead = api.wait_job_state(&doomed, "dead").await;
    assert_eq!(dead["attempts"], 3);
    assert_eq!(dead["history"].as_array().unwrap().len(), 3);
    assert!(dead["last_error"]
        .as_str()
        .unwrap()
        .contains("never succeeds"));
    let times: Vec<chrono::DateTime<chrono::Utc>> = dead["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["at"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        times[2] - times[1] >= chrono::TimeDelta::milliseconds(100),
        "the second retry waits longer than the base delay: {times:?}"
    );
    let refused_job = api.wait_job_state(&refused, "dead").await;
    assert_eq!(
        refused_job["attempts"], 1,
        "a permanent failure is not retried"
    );

    let ready: Value = reqwest::get(app.url("/_ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready["jobs"]["total"], 2,
        "the two dead letters are kept: {ready}"
    );
    assert_eq!(ready["jobs"]["queued"], 0, "{ready}");
    let listed = cli(dir.path(), &["jobs", "list", "--state", "dead"]);
    assert!(
        listed.contains(&doomed) && listed.contains(&refused),
        "{listed}"
    );
    cli(dir.path(), &["jobs", "retry", &refused]);
    wait_storage(
        dir.path(),
        &team,
        "Job Lab",
        "the requeued job to run",
        |s| s.get("refuse_attempts").map(String::as_str) == Some("2"),
    )
    .await;
    assert_eq!(
        storage(dir.path(), &team, "Job Lab")["doomed_attempts"],
        "3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpointed_job_resumes_after_the_step_it_saved() {
    let dir = tempfile::tempdir().unwrap();
    let (app, team) = start_lab(dir.path(), &[]);
    let api = Api::new(&app);
    let id = api
        .enqueue(
            &team,
            "Job Lab",
            json!({"name": "steps", "payload": {"total": 5, "fail_at": 2}}),
        )
        .await;
    let seen = wait_storage(dir.path(), &team, "Job Lab", "all steps", |s| {
        s.get("steps_done").is_some_and(|d| d.ends_with("4,"))
    })
    .await;
    assert_eq!(seen["steps_done"], "0,1,2,3,4,", "no step ran twice");
    let (status, _) = api
        .call(reqwest::Method::GET, &format!("/api/jobs/{id}"), None)
        .await;
    assert_eq!(status, 404, "the job succeeded and is no longer kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_wasm_jobs_can_be_cancelled_and_terminated_while_others_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let (app, team) = start_lab(dir.path(), &[]);
    let api = Api::new(&app);

    let polite = api
        .enqueue(&team, "Job Lab", json!({"name": "polite"}))
        .await;
    api.wait_job_state(&polite, "running").await;
    api.wait_checkpoint(&polite, "started").await;
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/jobs/{polite}/cancel"),
            None,
        )
        .await;
    assert_eq!((status, body["state"].as_str()), (200, Some("running")));
    let cancelled = api.wait_job_state(&polite, "cancelled").await;
    assert!(cancelled["last_error"]
        .as_str()
        .unwrap()
        .contains("cancelled"));
    assert_eq!(storage(dir.path(), &team, "Job Lab")["polite_stopped"], "1");

    let spin = api.enqueue(&team, "Job Lab", json!({"name": "spin"})).await;
    api.wait_checkpoint(&spin, "spinning").await;
    // Another job runs while the spinning one holds its slot.
    api.enqueue(
        &team,
        "Job Lab",
        json!({"name": "flaky", "payload": {"succeed_on": 1}}),
    )
    .await;
    wait_storage(dir.path(), &team, "Job Lab", "another job to run", |s| {
        s.contains_key("flaky_done")
    })
    .await;
    let asked = Instant::now();
    let out = cli(dir.path(), &["jobs", "terminate", &spin]);
    assert!(out.contains("terminated"), "{out}");
    let terminated = api.wait_job_state(&spin, "cancelled").await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "terminate took {:?}",
        asked.elapsed()
    );
    assert!(terminated["last_error"]
        .as_str()
        .unwrap()
        .contains("terminated"));

    // A job stuck in a loop never reaches a checkpoint: cancel terminates it after its grace.
    let stuck = api.enqueue(&team, "Job Lab", json!({"name": "spin"})).await;
    api.wait_job_state(&stuck, "running").await;
    let asked = Instant::now();
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/jobs/{stuck}/cancel"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    api.wait_job_state(&stuck, "cancelled").await;
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "a cancelled loop stops after the 5 s grace, not before and not never: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_mid_run_runs_again_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (app, team) = start_lab(dir.path(), &[]);
    let api = Api::new(&app);
    let slow = api
        .enqueue(
            &team,
            "Job Lab",
            json!({"name": "slow", "payload": {"ms": 3000, "tag": "k"}, "max_attempts": 1}),
        )
        .await;
    api.wait_checkpoint(&slow, "1").await;
    app.kill9();
    let kept = storage(dir.path(), &team, "Job Lab");
    assert!(
        kept.keys().all(|k| k.starts_with("setup:")),
        "a killed call's storage writes are not committed (only its instance's setup is): {kept:?}"
    );

    // It runs again although it had a single attempt: a stop of the server is not the job's
    // failure.
    let _app = Appliance::start(dir.path(), FAST);
    let seen = wait_storage(dir.path(), &team, "Job Lab", "the job to finish", |s| {
        s.contains_key("k_finished")
    })
    .await;
    assert_eq!(seen["k_runs"], "2", "it ran again from the start");
    assert_eq!(seen["k_finished"], "1", "and finished once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_and_fan_in_compose_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let (app, team) = start_lab(dir.path(), &[]);
    let api = Api::new(&app);
    api.enqueue(&team, "Job Lab", json!({"name": "extract"}))
        .await;
    api.enqueue(
        &team,
        "Job Lab",
        json!({"name": "fan-out", "payload": {"parts": 3}}),
    )
    .await;
    let seen = wait_storage(
        dir.path(),
        &team,
        "Job Lab",
        "the chain and the join",
        |s| s.contains_key("loaded") && s.contains_key("joined"),
    )
    .await;
    assert_eq!(
        seen["loaded"], "60",
        "extract → transform (×10) → load (sum)"
    );
    assert_eq!(seen["joined"], "3", "the join ran after its three parts");
    let logs = cli(dir.path(), &["plugin", "logs", "--team", &team, "Job Lab"]);
    assert!(!logs.contains("join ran with"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_plugin_config_cannot_take_every_slot_and_keys_deduplicate() {
    let dir = tempfile::tempdir().unwrap();
    let (app, team) = start_lab(dir.path(), &[("JOBS_PER_PLUGIN_CONFIG", "2")]);
    let other = create_team(dir.path(), "other", "phc_otherTeamToken456").to_string();
    enable_plugin(dir.path(), &other, "Job Lab", &[]);
    let api = Api::new(&app);
    for _ in 0..6 {
        api.enqueue(
            &team,
            "Job Lab",
            json!({"name": "slow", "payload": {"ms": 600, "tag": "c"}}),
        )
        .await;
    }
    let keyed = json!({"name": "flaky", "idempotency_key": "once"});
    let first = api.enqueue(&other, "Job Lab", keyed.clone()).await;
    let second = api.enqueue(&other, "Job Lab", keyed).await;
    assert_eq!(first, second, "the same key names the same job");

    // Jobs are claimed ahead of the slots, so the store's "running" says claimed; how many ran
    // at once is read from the spans the jobs recorded by the wall clock.
    let seen = wait_storage(dir.path(), &team, "Job Lab", "the six slow jobs", |s| {
        s.keys().filter(|k| k.starts_with("c_done:")).count() == 6
    })
    .await;
    let spans: Vec<(u64, u64)> = seen
        .iter()
        .filter(|(k, _)| k.starts_with("c_done:"))
        .map(|(_, span)| {
            let (from, to) = span.split_once('-').expect("a span");
            (from.parse().unwrap(), to.parse().unwrap())
        })
        .collect();
    let most_running = most_at_once(&spans);
    assert_eq!(most_running, 2, "{most_running} ran at once: {spans:?}");
    let other_seen = storage(dir.path(), &other, "Job Lab");
    assert_eq!(
        other_seen.get("flaky_attempts").map(String::as_str),
        Some("1"),
        "the other team's keyed job ran once: {other_seen:?}"
    );
}

/// The most `[from, to)` spans that overlap at one moment.
fn most_at_once(spans: &[(u64, u64)]) -> usize {
    let mut edges: Vec<(u64, i32)> = spans
        .iter()
        .flat_map(|&(from, to)| [(from, 1), (to, -1)])
        .collect();
    // An end and a start at the same millisecond do not overlap.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    most as usize
}

/// Starts exporting the team's events from 2026-11-01 up to `to` to the webhook exporter, through
/// the CLI; returns the export's id.
fn start_export(dir: &Path, team: &str, to: &str, page_size: &str) -> String {
    let out = cli(
        dir,
        &[
            "export",
            "start",
            "--team",
            team,
            "Webhook Exporter",
            "--from",
            "2026-11-01T00:00:00Z",
            "--to",
            to,
            "--page-size",
            page_size,
        ],
    );
    out.split_whitespace().nth(1).unwrap().to_owned()
}

fn export_status(dir: &Path, id: &str) -> Value {
    serde_json::from_str(&cli(dir, &["export", "show", id])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_historical_export_pages_through_stored_events_and_resumes_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "shop", TOKEN).to_string();
    let app = Appliance::start(dir.path(), FAST);
    // 1,000 events one second apart from 2026-11-01T00:00:00Z, stored before any exporter exists.
    send_past_events(&app, 1000).await;

    let (addr, seen) = webhook(|_| (Duration::from_millis(300), 200)).await;
    install_plugin(
        dir.path(),
        "examples/webhook-exporter",
        "webhook_exporter.wasm",
    );
    let url = format!("url=http://{addr}/hook");
    enable_plugin(dir.path(), &team, "Webhook Exporter", &[&url]);
    // The first 900 seconds: 9 pages of 100.
    let id = start_export(dir.path(), &team, "2026-11-01T00:15:00Z", "100");

    // Let three pages complete, then kill the server in the middle of the export.
    let deadline = Instant::now() + Duration::from_secs(60);
    let done_before_kill = loop {
        let status = export_status(dir.path(), &id);
        let done = status["done"].as_u64().unwrap();
        if done >= 300 {
            assert_eq!(status["total"], 900);
            break done;
        }
        assert!(
            Instant::now() < deadline,
            "the export did not progress: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    app.kill9();
    let done_at_kill = export_status(dir.path(), &id)["done"].as_u64().unwrap();
    assert!(done_at_kill >= done_before_kill && done_at_kill < 900);

    let _app = Appliance::start(dir.path(), FAST);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = export_status(dir.path(), &id);
        if status["state"] == "done" {
            assert_eq!(
                (status["done"].as_u64(), status["total"].as_u64()),
                (Some(900), Some(900))
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the export did not finish: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut received: HashMap<i64, usize> = HashMap::new();
    for (_, batch) in seen.lock().unwrap().iter() {
        for event in batch["batch"].as_array().unwrap() {
            *received
                .entry(event["properties"]["i"].as_i64().unwrap())
                .or_default() += 1;
        }
    }
    let mut exported: Vec<i64> = received.keys().copied().collect();
    exported.sort();
    assert_eq!(
        exported,
        (0..900).collect::<Vec<_>>(),
        "exactly the events in range"
    );
    for i in 0..done_at_kill as i64 {
        assert_eq!(
            received[&i], 1,
            "event {i} of a page completed before the crash was sent again"
        );
    }
    let resent = received.values().filter(|n| **n > 1).count();
    assert!(
        resent <= 100,
        "only the page in flight may be sent twice ({resent})"
    );

    // A second export, cancelled part-way: it stops, and says so.
    let second = start_export(dir.path(), &team, "2026-11-02T00:00:00Z", "50");
    let deadline = Instant::now() + Duration::from_secs(60);
    while export_status(dir.path(), &second)["done"].as_u64().unwrap() < 50 {
        assert!(Instant::now() < deadline, "the second export did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cli(dir.path(), &["export", "cancel", &second]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let batches_then = seen.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        batches_then,
        "no page after the cancel"
    );
    let status = export_status(dir.path(), &second);
    assert_eq!(status["state"], "cancelled");
    assert!(status["done"].as_u64().unwrap() < 1000, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_is_interrupted_and_retried_until_it_is_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let (app, team) = start_lab(dir.path(), &[("PLUGIN_TASK_TIMEOUT_SECS", "1")]);
    let api = Api::new(&app);
    let started = Instant::now();
    let spin = api
        .enqueue(&team, "Job Lab", json!({"name": "spin", "max_attempts": 2}))
        .await;
    let dead = api.wait_job_state(&spin, "dead").await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "two attempts of one second each"
    );
    let history = dead["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{dead}");
    assert!(history.iter().all(|a| a["error"]
        .as_str()
        .unwrap()
        .contains("ran past its deadline")));
    // The slot it held is free again: another job runs.
    api.enqueue(&team, "Job Lab", json!({"name": "flaky"}))
        .await;
    wait_storage(dir.path(), &team, "Job Lab", "the next job", |s| {
        s.contains_key("flaky_done")
    })
    .await;
}
