//! The operator's operations have one implementation behind the CLI and `/api/`: the same
//! mistakes get the same errors (an exit status on one side, an HTTP status on the other), and a
//! re-queued dead letter wakes the workers from either side, also from another process.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    cli, command, create_team, enable_plugin, install_plugin, wait_storage, Api, Appliance, TOKEN,
};
use serde_json::{json, Value};

/// Runs the CLI expecting failure; returns its exit status and stderr.
fn cli_failure(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = command(dir).args(args).output().unwrap();
    assert!(!out.status.success(), "appliance {args:?} should fail");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_the_api_answer_the_same_mistakes_alike() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "ops", TOKEN).to_string();
    install_plugin(dir.path(), "tests/job-lab", "job_lab.wasm");
    enable_plugin(dir.path(), &team, "Job Lab", &[]);
    let app = Appliance::start(dir.path(), &[]);
    let api = Api::new(&app);
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    // A job that does not exist: not found on both sides, with the same words.
    let unknown = "0192f0a0-0000-7000-8000-000000000001";
    for (args, method, path) in [
        (
            vec!["jobs", "show", unknown],
            get.clone(),
            format!("/api/jobs/{unknown}"),
        ),
        (
            vec!["jobs", "retry", unknown],
            post.clone(),
            format!("/api/jobs/{unknown}/retry"),
        ),
        (
            vec!["jobs", "cancel", unknown],
            post.clone(),
            format!("/api/jobs/{unknown}/cancel"),
        ),
    ] {
        let (code, stderr) = cli_failure(dir.path(), &args);
        let (status, body) = api.call(method, &path, None).await;
        assert_eq!((code, status), (3, 404), "{args:?}: {stderr} / {body}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(&format!("no job {unknown}")), "{body}");
        assert!(
            stderr.contains(message),
            "the CLI says what the API says: {stderr:?} vs {message:?}"
        );
    }

    // A malformed id: invalid input on both sides.
    let (code, stderr) = cli_failure(dir.path(), &["jobs", "show", "nope"]);
    let (status, body) = api.call(get.clone(), "/api/jobs/nope", None).await;
    assert_eq!((code, status), (4, 400), "{stderr} / {body}");
    assert!(stderr.contains("\"nope\" is not a job id"), "{stderr}");

    // An archive that is not one: refused as invalid input, not a server failure.
    let bad = dir.path().join("broken.tar.gz");
    std::fs::write(&bad, b"\x1f\x8b this is not a gzip stream").unwrap();
    let (code, stderr) = cli_failure(dir.path(), &["plugin", "install", bad.to_str().unwrap()]);
    use base64::Engine;
    let garbage =
        base64::engine::general_purpose::STANDARD.encode(b"\x1f\x8b this is not a gzip stream");
    let (status, body) = api
        .call(
            post.clone(),
            "/api/plugins",
            Some(json!({"archive_base64": garbage})),
        )
        .await;
    assert_eq!((code, status), (4, 422), "{stderr} / {body}");
    assert!(stderr.contains("not a usable plugin archive"), "{stderr}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a usable plugin archive"),
        "{body}"
    );

    // An unknown plugin: not found on both sides.
    let (code, _) = cli_failure(
        dir.path(),
        &["plugin", "logs", "--team", &team, "Nothing Here"],
    );
    let (status, _) = api
        .call(
            get,
            &format!("/api/teams/{team}/plugins/Nothing%20Here/logs"),
            None,
        )
        .await;
    assert_eq!((code, status), (3, 404));
}

/// A dead letter re-queued from `via` runs again at once: the workers are woken, they do not
/// wait for their idle poll (set to 60 s here).
async fn requeued_dead_letter_runs_at_once(via_cli: bool) {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "ops", TOKEN).to_string();
    install_plugin(dir.path(), "tests/job-lab", "job_lab.wasm");
    enable_plugin(dir.path(), &team, "Job Lab", &[]);
    let app = Appliance::start(
        dir.path(),
        &[("JOB_RETRY_BASE_MS", "100"), ("JOB_IDLE_POLL_MS", "60000")],
    );
    let api = Api::new(&app);
    // `flaky` fails on its first attempt; with one attempt allowed it becomes a dead letter.
    let id = api
        .enqueue(
            &team,
            "Job%20Lab",
            json!({"name": "flaky", "payload": {"succeed_on": 2}, "max_attempts": 1}),
        )
        .await;
    api.wait_job_state(&id, "dead").await;
    // Let the workers go idle, so only a wake-up (not a poll) can start the job soon.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let asked = Instant::now();
    if via_cli {
        cli(dir.path(), &["jobs", "retry", &id]);
    } else {
        let (status, body) = api
            .call(
                reqwest::Method::POST,
                &format!("/api/jobs/{id}/retry"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let done = wait_storage(dir.path(), &team, "Job Lab", "the retried job", |s| {
        s.contains_key("flaky_done")
    })
    .await;
    let took = asked.elapsed();
    assert_eq!(done["flaky_done"], "2");
    assert!(
        took < Duration::from_secs(10),
        "the re-queued job started {took:?} after the retry; the workers were not woken"
    );
    // Its storage write commits when the call ends, its success with the workers' next
    // transaction: gone within moments.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _): (u16, Value) = api
            .call(reqwest::Method::GET, &format!("/api/jobs/{id}"), None)
            .await;
        if status == 404 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "it succeeded and is no longer kept (still {status})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_retried_from_the_cli_wakes_the_servers_workers() {
    requeued_dead_letter_runs_at_once(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_retried_from_the_api_wakes_the_workers() {
    requeued_dead_letter_runs_at_once(false).await;
}
