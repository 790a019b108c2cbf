//! Plugin jobs queued in bulk, from `POST …/jobs` with a list and from `appliance jobs enqueue
//! --from FILE`, each all-or-nothing, and run on instances kept between jobs: `setup` runs once
//! per instance, not once per job.

mod common;

use std::time::{Duration, Instant};

use common::{cli_error, enable_plugin, start_job_lab, storage, Api};
use serde_json::{json, Value};

/// Jobs the queue still keeps (succeeded jobs are not kept).
async fn kept(api: &Api) -> u64 {
    let (_, body) = api.call(reqwest::Method::GET, "/api/jobs", None).await;
    body["stats"]["total"].as_u64().expect("stats.total")
}

async fn wait_drained(api: &Api, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while kept(api).await > 0 {
        assert!(Instant::now() < deadline, "{what} never ran to the last");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the team's Job Lab jobs are queued through the API.
fn jobs_path(team: &str) -> String {
    format!("/api/teams/{team}/plugins/Job%20Lab/jobs")
}

fn setups(dir: &std::path::Path, team: &str) -> usize {
    storage(dir, team, "Job Lab")
        .keys()
        .filter(|k| k.starts_with("setup:"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_queued_in_bulk_run_on_instances_set_up_once() {
    let dir = tempfile::tempdir().unwrap();
    let (app, team) = start_job_lab(dir.path(), &[], &[("JOBS_PER_PLUGIN_CONFIG", "4")]);
    let api = Api::new(&app);
    let path = jobs_path(&team);

    // One misspelt field refuses the whole list, and nothing of it is queued.
    let mut list: Vec<Value> = (0..50)
        .map(|i| json!({"name": "noop", "payload": {"i": i}}))
        .collect();
    list[37] = json!({"name": "noop", "delay": 5});
    let (status, body) = api
        .call(reqwest::Method::POST, &path, Some(json!(list)))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.to_string().contains("delay"),
        "the error names the field: {body}"
    );
    assert_eq!(kept(&api).await, 0, "nothing of a refused list is queued");

    // 2,000 jobs in one request: one id each, in order, all distinct.
    let list: Vec<Value> = (0..2000)
        .map(|i| json!({"name": "noop", "payload": {"i": i}}))
        .collect();
    let (status, body) = api
        .call(reqwest::Method::POST, &path, Some(json!(list)))
        .await;
    assert_eq!(status, 202, "{body}");
    let ids = body["ids"].as_array().expect("ids");
    assert_eq!(ids.len(), 2000);
    let distinct: std::collections::HashSet<&str> = ids.iter().filter_map(Value::as_str).collect();
    assert_eq!(distinct.len(), 2000);
    wait_drained(&api, "the 2,000 jobs").await;
    // At most 4 run at once, and an instance goes back for the next job: 2,000 jobs need at most
    // 4 instances, so `setup` ran at most 4 times (once per job before).
    let first = setups(dir.path(), &team);
    assert!(
        (1..=4).contains(&first),
        "setup ran {first} times for 2,000 jobs"
    );

    // A single job still answers one id.
    let (status, body) = api
        .call(reqwest::Method::POST, &path, Some(json!({"name": "noop"})))
        .await;
    assert_eq!(status, 202, "{body}");
    assert!(body["id"].is_string(), "{body}");

    // From a file of JSON lines: a bad line refuses the file with its number, nothing queued.
    let file = dir.path().join("jobs.jsonl");
    let mut lines: Vec<String> = (0..300)
        .map(|i| json!({"name": "noop", "payload": {"i": i}}).to_string())
        .collect();
    lines[120] = "{\"name\": \"noop\", \"payload\": ".into();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let file_arg = file.display().to_string();
    let args = [
        "jobs", "enqueue", "--team", &team, "Job Lab", "--from", &file_arg,
    ];
    let error = cli_error(dir.path(), &args);
    assert!(error.contains("line 121"), "{error}");
    wait_drained(&api, "the single job").await;
    lines[120] = json!({"name": "noop", "idempotency_key": "once"}).to_string();
    lines.push(json!({"name": "noop", "idempotency_key": "once"}).to_string());
    lines.push(String::new());
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = common::cli(dir.path(), &args);
    assert!(out.starts_with("300 jobs queued (1 "), "{out}");
    wait_drained(&api, "the file's jobs").await;
    let all = setups(dir.path(), &team);
    assert!(all <= 4, "setup ran {all} times for 2,302 jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_job_payloads_and_files_are_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let (app, team) = start_job_lab(dir.path(), &[], &[]);
    let api = Api::new(&app);
    let path = jobs_path(&team);

    // An operator's payload past 1 MiB, alone or in a list: refused, nothing queued.
    let big = json!({"name": "noop", "payload": {"blob": "x".repeat(2 << 20)}});
    let (status, body) = api
        .call(reqwest::Method::POST, &path, Some(big.clone()))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("at most 1048576"), "{body}");
    let list = json!([{"name": "noop"}, big]);
    let (status, body) = api.call(reqwest::Method::POST, &path, Some(list)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.to_string().contains("job 2"),
        "the error names the job: {body}"
    );
    assert_eq!(kept(&api).await, 0);

    // A file whose line is longer than any job could be is refused without reading it whole.
    let file = dir.path().join("jobs.jsonl");
    let long = format!(
        "{{\"name\": \"noop\", \"payload\": \"{}\"}}\n",
        "y".repeat(3 << 20)
    );
    std::fs::write(&file, format!("{{\"name\": \"noop\"}}\n{long}")).unwrap();
    let file_arg = file.display().to_string();
    let error = cli_error(
        dir.path(),
        &[
            "jobs", "enqueue", "--team", &team, "Job Lab", "--from", &file_arg,
        ],
    );
    assert!(
        error.contains("line 2 is longer than a job can be"),
        "{error}"
    );
    assert_eq!(kept(&api).await, 0);

    // A plugin asking for a follow-up with such a payload is refused at the call.
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            &path,
            Some(json!({"name": "huge-follow-up"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let seen = common::wait_storage(dir.path(), &team, "Job Lab", "the huge follow-up", |s| {
        s.contains_key("huge_follow_up")
    })
    .await;
    assert!(
        seen["huge_follow_up"].contains("at most 1048576"),
        "{}",
        seen["huge_follow_up"]
    );
    wait_drained(&api, "the job").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconfigured_plugin_runs_its_next_jobs_on_a_new_instance_with_the_new_config() {
    let dir = tempfile::tempdir().unwrap();
    let (app, team) = start_job_lab(dir.path(), &["label=first"], &[]);
    let api = Api::new(&app);
    let echo = || async {
        api.enqueue(&team, "Job Lab", json!({"name": "echo-config"}))
            .await;
        wait_drained(&api, "the echo job").await;
        storage(dir.path(), &team, "Job Lab")["echoed_label"].clone()
    };
    assert_eq!(echo().await, "first");
    assert_eq!(echo().await, "first");
    assert_eq!(
        setups(dir.path(), &team),
        1,
        "the second job reused the instance"
    );

    enable_plugin(dir.path(), &team, "Job Lab", &["label=second"]);
    assert_eq!(
        echo().await,
        "second",
        "the kept instance is not used after the change"
    );
    assert_eq!(
        setups(dir.path(), &team),
        2,
        "a new instance was set up for it"
    );
}
