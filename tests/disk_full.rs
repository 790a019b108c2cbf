//! A disk that fills up: writes start failing (here with a file-size limit, `RLIMIT_FSIZE`, and
//! `SIGXFSZ` ignored, so a write past it fails with EFBIG as on a full disk). Capture answers 503
//! while it cannot persist, nothing acknowledged is lost, and once space returns (the limit is
//! raised on the running process) the appliance recovers by itself — redb refuses every
//! transaction after a failed commit until the file is reopened, which the store does.

mod common;

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::{create_team, read_events, Appliance, TOKEN};
use serde_json::json;

/// The file-size limit the appliance starts with.
const LIMIT_BYTES: u64 = 6 << 20;

fn raise_file_size_limit(pid: i32) {
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg("--fsize=unlimited:unlimited")
        .output()
        .expect("prlimit (util-linux) raises the running process's limit");
    assert!(
        out.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_loses_nothing_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start_with(dir.path(), &[("SINK_LINGER_MS", "0")], |cmd| {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
                use nix::sys::signal::{signal, SigHandler, Signal};
                signal(Signal::SIGXFSZ, SigHandler::SigIgn).map_err(std::io::Error::from)?;
                setrlimit(Resource::RLIMIT_FSIZE, LIMIT_BYTES, RLIM_INFINITY)
                    .map_err(std::io::Error::from)?;
                Ok(())
            });
        }
    });
    let client = reqwest::Client::new();
    let filler = "y".repeat(20_000);
    let mut acked = Vec::new();
    let mut refused = 0;
    let mut n = 0;
    let send = |n: usize| {
        let body = json!({"api_key": TOKEN, "batch": (0..10).map(|i| json!({"event": "fill", "distinct_id": "d", "properties": {"n": n * 10 + i, "filler": filler}})).collect::<Vec<_>>()});
        client.post(app.url("/batch/")).json(&body).send()
    };
    // Fill until writes fail: 503s, each saying why.
    let deadline = Instant::now() + Duration::from_secs(60);
    while refused < 20 {
        assert!(
            Instant::now() < deadline,
            "writes never failed ({} acknowledged)",
            acked.len()
        );
        n += 1;
        let r = send(n).await.unwrap();
        match r.status().as_u16() {
            200 => acked.push(n),
            503 => {
                refused += 1;
                assert!(r.headers().contains_key("retry-after"));
            }
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
    }
    assert!(!acked.is_empty());
    // Space returns: the appliance recovers without a restart.
    raise_file_size_limit(app.pid());
    let recovered_by = Instant::now() + Duration::from_secs(30);
    loop {
        n += 1;
        let status = send(n).await.unwrap().status().as_u16();
        if status == 200 {
            acked.push(n);
            break;
        }
        assert!(
            Instant::now() < recovered_by,
            "still {status} 30 s after space returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        n += 1;
        assert_eq!(send(n).await.unwrap().status(), 200);
        acked.push(n);
    }
    app.wait_drained().await;
    let mut stored: Vec<i64> = read_events(&app.sqlite_path())
        .iter()
        .map(|r| r.properties["n"].as_i64().unwrap() / 10)
        .collect();
    stored.sort();
    stored.dedup();
    let acked: Vec<i64> = acked.iter().map(|n| *n as i64).collect();
    assert_eq!(
        stored, acked,
        "exactly the acknowledged requests are stored"
    );
    let lines = app.stderr_lines().join("\n");
    assert!(
        lines.contains("reopened after a storage failure"),
        "{lines}"
    );
}
