//! `appliance backup` and `restore` as an operator uses them: a backup taken while clients keep
//! sending events holds every event acknowledged before it started (once), and all the state;
//! a damaged archive is refused; a restore never lands on a running server or on data it was
//! not told to replace; the daily backup runs once a day and keeps `BACKUP_KEEP` archives.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    cli, command, create_team, enable_plugin, install_plugin, read_events, storage, Api, Appliance,
    TOKEN,
};
use serde_json::json;

/// Runs the CLI; returns (exit code, stdout, stderr).
fn run(data_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = command(data_dir).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends batches of events until `stop`; records each acknowledged uuid with when its answer
/// came.
async fn load(app_url: String, stop: Arc<Mutex<bool>>, acked: Arc<Mutex<Vec<(String, Instant)>>>) {
    let client = reqwest::Client::new();
    let mut n = 0u64;
    while !*stop.lock().unwrap() {
        let uuids: Vec<String> = (0..50).map(|_| uuid::Uuid::now_v7().to_string()).collect();
        let batch: Vec<_> = uuids
            .iter()
            .map(|u| {
                n += 1;
                json!({"event": "load", "distinct_id": format!("u{}", n % 97), "uuid": u,
                       "properties": {"n": n, "padding": "x".repeat(200)}})
            })
            .collect();
        let response = client
            .post(format!("{app_url}/batch/"))
            .json(&json!({"api_key": TOKEN, "batch": batch}))
            .send()
            .await;
        if let Ok(r) = response {
            if r.status() == 200 {
                let at = Instant::now();
                acked
                    .lock()
                    .unwrap()
                    .extend(uuids.into_iter().map(|u| (u, at)));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_acknowledged_event_and_all_state() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "shop", TOKEN).to_string();
    install_plugin(dir.path(), "tests/call-counter", "call_counter.wasm");
    enable_plugin(dir.path(), &team, "Call Counter", &[]);
    install_plugin(dir.path(), "tests/job-lab", "job_lab.wasm");
    enable_plugin(dir.path(), &team, "Job Lab", &[]);
    let app = Appliance::start(dir.path(), &[]);
    let api = Api::new(&app);
    // A job due tomorrow: it must come back queued.
    let job = api
        .enqueue(
            &team,
            "Job Lab",
            json!({"name": "flaky", "delay_ms": 86_400_000u64}),
        )
        .await;

    let stop = Arc::new(Mutex::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let loader = tokio::spawn(load(app.url(""), stop.clone(), acked.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let archive = dir.path().join("backups/first.tar.zst");
    let started = Instant::now();
    let (data_dir, target) = (dir.path().to_owned(), archive.clone());
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run(&data_dir, &["backup", "--to", target.to_str().unwrap()])
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(code, 0, "backup failed: {out}{err}");
    assert!(out.contains("wrote"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    *stop.lock().unwrap() = true;
    loader.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let before: Vec<&String> = acked
        .iter()
        .filter(|(_, at)| *at < started)
        .map(|(u, _)| u)
        .collect();
    let during = acked.iter().filter(|(_, at)| *at >= started).count();
    assert!(before.len() >= 200, "the load ran: {}", before.len());
    assert!(during > 0, "capture kept answering while the backup ran");
    println!(
        "backup took {took:?}; {} events acknowledged before it, {during} during and after",
        before.len()
    );
    let token = cli(dir.path(), &["api-token"]).trim().to_owned();
    let processed_before = storage(dir.path(), &team, "Call Counter").len();
    app.terminate();

    // The archive checks out, and restores into a new directory.
    let (code, out, err) = run(
        dir.path(),
        &["backup", "--verify", archive.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is sound"), "{out}");
    let restored = tempfile::tempdir().unwrap();
    let target = restored.path().join("data");
    let (code, out, err) = run(
        dir.path(),
        &[
            "restore",
            archive.to_str().unwrap(),
            "--data-dir",
            target.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");

    let app = Appliance::start(&target, &[]);
    app.wait_drained().await;
    let rows = read_events(&app.sqlite_path());
    let mut stored: HashMap<&str, usize> = HashMap::new();
    for row in &rows {
        *stored.entry(row.uuid.as_str()).or_default() += 1;
    }
    let missing: Vec<_> = before
        .iter()
        .filter(|u| !stored.contains_key(u.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events acknowledged before the backup are missing, such as {:?}",
        missing.len(),
        before.len(),
        missing.first()
    );
    assert!(stored.values().all(|&n| n == 1), "an event is stored twice");

    // The state came back: the same API token, plugins, their storage, the queued job.
    assert_eq!(cli(&target, &["api-token"]).trim(), token);
    let api = Api::new(&app);
    let kept = api.job(&job).await;
    assert_eq!(kept["state"], "scheduled", "{kept}");
    let counted = storage(&target, &team, "Call Counter").len();
    assert!(
        counted >= processed_before.min(before.len()),
        "plugin storage restored: {counted} keys"
    );
    // And the restored server takes new events, stored after everything it already holds.
    let (status, _) = common::probe_event(&app, "after restore").await;
    assert_eq!(status, 200);
    app.wait_drained().await;
    let rows = read_events(&app.sqlite_path());
    assert!(rows.iter().any(|r| r.event == "after restore"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_archive_is_refused_and_restores_only_where_told() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(dir.path(), &[]);
    let (status, _) = common::probe_event(&app, "kept").await;
    assert_eq!(status, 200);
    let archive = dir.path().join("b.tar.zst");
    // The configuration file in use travels with the backup.
    let env_file = dir.path().join("appliance.env");
    std::fs::write(&env_file, "# mine\nCAPTURE_RATE_LIMIT_PER_IP=500\n").unwrap();
    let out = command(dir.path())
        .env("APPLIANCE_ENV_FILE", &env_file)
        .args(["backup", "--to", archive.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let bytes = std::fs::read(&archive).unwrap();

    // One flipped byte anywhere in the body, or a cut, fails the check (exit 4, invalid input).
    for (name, damaged) in [
        ("flipped", {
            let mut b = bytes.clone();
            let i = b.len() / 2;
            b[i] ^= 0x40;
            b
        }),
        ("truncated", bytes[..bytes.len() - 100].to_vec()),
    ] {
        let path = dir.path().join(format!("{name}.tar.zst"));
        std::fs::write(&path, damaged).unwrap();
        let (code, out, err) = run(dir.path(), &["backup", "--verify", path.to_str().unwrap()]);
        assert_eq!(code, 4, "{name}: {out}{err}");
        assert!(err.contains("is not a sound backup"), "{name}: {err}");
        let fresh = dir.path().join(format!("restore-{name}"));
        let (code, _, err) = run(
            dir.path(),
            &[
                "restore",
                path.to_str().unwrap(),
                "--data-dir",
                fresh.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 4, "{name}: {err}");
        assert!(
            !fresh.join("state.redb").exists(),
            "nothing restored from a damaged archive"
        );
    }

    // Never under a running server, even when told to replace.
    let (code, _, err) = run(
        dir.path(),
        &["restore", archive.to_str().unwrap(), "--force"],
    );
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("a server is running"), "{err}");
    app.terminate();
    // Not over data it was not told to replace…
    let (code, _, err) = run(dir.path(), &["restore", archive.to_str().unwrap()]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("--force"), "{err}");
    // …and over it when told, with the server stopped.
    let (status, _) = {
        let app = Appliance::start(dir.path(), &[]);
        let sent = common::probe_event(&app, "after the backup").await;
        app.wait_drained().await;
        app.terminate();
        sent
    };
    assert_eq!(status, 200);
    let (code, out, err) = run(
        dir.path(),
        &["restore", archive.to_str().unwrap(), "--force"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let restored_env = dir.path().join("appliance.env.restored");
    assert!(out.contains(restored_env.to_str().unwrap()), "{out}");
    assert_eq!(
        std::fs::read_to_string(restored_env).unwrap(),
        "# mine\nCAPTURE_RATE_LIMIT_PER_IP=500\n"
    );
    let names: Vec<String> = read_events(&dir.path().join("events.sqlite3"))
        .into_iter()
        .map(|r| r.event)
        .collect();
    assert_eq!(names, ["kept"], "back to the backup's point");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_backup_runs_once_a_day_and_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let backups = dir.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    for old in ["20260101T030000Z", "20260102T030000Z", "20260103T030000Z"] {
        std::fs::write(backups.join(format!("appliance-{old}.tar.zst")), "old").unwrap();
    }
    let env = [
        ("BACKUP_DIR", backups.to_str().unwrap()),
        ("BACKUP_HOUR", "0"),
        ("BACKUP_KEEP", "2"),
    ];
    let app = Appliance::start(dir.path(), &env);
    let deadline = Instant::now() + Duration::from_secs(60);
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&backups)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    while !listing()
        .iter()
        .any(|n| n.starts_with("appliance-2026") && !n.starts_with("appliance-202601"))
    {
        assert!(
            Instant::now() < deadline,
            "no scheduled backup: {:?}",
            listing()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let names = listing();
    assert_eq!(names.len(), 2, "BACKUP_KEEP=2: {names:?}");
    assert_eq!(names[0], "appliance-20260103T030000Z.tar.zst");
    let (code, out, err) = run(
        dir.path(),
        &[
            "backup",
            "--verify",
            backups.join(&names[1]).to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    app.terminate();

    // The same day, a restart takes no second one.
    let app = Appliance::start(dir.path(), &env);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(listing(), names);
    app.terminate();
}
