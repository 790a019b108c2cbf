//! Running as a system service: readiness and watchdog pings to systemd's notify socket, and
//! `appliance check` (the unit's `ExecStartPre=`) finding each kind of broken setup with one line.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{command, create_team, install_plugin, Appliance, TOKEN};

/// Messages sent to a notify socket, until `until` is among them or `within` passes.
fn notifications(socket: &UnixDatagram, until: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                let done = text.lines().any(|l| l == until);
                seen.push(text);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    seen
}

#[test]
fn systemd_hears_ready_then_watchdog_pings_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let app = Appliance::start(
        &dir.path().join("data"),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            // Two seconds: pings every second while the pipeline goes round.
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let started = notifications(&socket, "READY=1", Duration::from_secs(10));
    assert!(
        started.iter().any(|m| m.contains("READY=1")),
        "no readiness: {started:?}"
    );
    let pings = notifications(&socket, "never", Duration::from_millis(3500));
    let count = pings.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        (2..=5).contains(&count),
        "expected a watchdog ping about every second, got {pings:?}"
    );
    let pid = app.pid();
    let status = app.terminate();
    assert!(status.success(), "exit {status:?} (pid {pid})");
    let stopping = notifications(&socket, "STOPPING=1", Duration::from_secs(2));
    assert!(
        stopping.iter().any(|m| m.contains("STOPPING=1")),
        "no STOPPING=1: {stopping:?}"
    );
}

/// `appliance check` against `data_dir` with extra settings: (exit status, stdout lines).
fn check(data_dir: &Path, env: &[(&str, &str)]) -> (i32, Vec<String>, String) {
    let mut cmd = command(data_dir);
    cmd.arg("check");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    (
        out.status.code().unwrap_or(-1),
        lines,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn problems(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| l.starts_with("problem: "))
        .collect()
}

#[test]
fn check_passes_on_a_working_setup_and_on_a_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("not-yet");
    let (code, lines, stderr) = check(&fresh, &[]);
    assert_eq!(code, 0, "{lines:?} {stderr}");
    assert!(lines.last().unwrap().starts_with("ok: "), "{lines:?}");
    assert!(!fresh.exists(), "check created the data directory");

    let data = dir.path().join("data");
    create_team(&data, "shop", TOKEN);
    install_plugin(&data, "tests/job-lab", "job_lab.wasm");
    let (code, lines, stderr) = check(&data, &[]);
    assert_eq!(code, 0, "{lines:?} {stderr}");
    assert!(
        lines.last().unwrap().contains("1 plugin components intact"),
        "{lines:?}"
    );
}

#[test]
fn a_configuration_error_is_one_line_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let (code, lines, stderr) = check(dir.path(), &[("WEB_PORT", "eighty")]);
    assert_eq!(code, 78, "{lines:?} {stderr}");
    let stderr: Vec<&str> = stderr.lines().collect();
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert!(stderr[0].contains("WEB_PORT"), "{stderr:?}");
}

#[test]
fn damaged_and_missing_plugin_files_are_each_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    install_plugin(&data, "tests/job-lab", "job_lab.wasm");
    let component = std::fs::read_dir(data.join("plugins"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wasm"))
        .expect("an installed component");
    let mut bytes = std::fs::read(&component).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&component, &bytes).unwrap();
    let (code, lines, _) = check(&data, &[]);
    assert_eq!(code, 1, "{lines:?}");
    let found = problems(&lines);
    assert_eq!(found.len(), 1, "{lines:?}");
    assert!(
        found[0].contains("Job Lab") && found[0].contains("does not match its checksum"),
        "{found:?}"
    );

    std::fs::remove_file(&component).unwrap();
    let (code, lines, _) = check(&data, &[]);
    assert_eq!(code, 1, "{lines:?}");
    assert!(problems(&lines)[0].contains("cannot be read"), "{lines:?}");
}

#[test]
fn the_data_directory_is_checked_for_kind_permissions_space_and_schema() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let (code, lines, _) = check(&file, &[]);
    assert_eq!(code, 1);
    assert!(
        problems(&lines)[0].contains("is not a directory"),
        "{lines:?}"
    );

    let data = dir.path().join("data");
    create_team(&data, "shop", TOKEN);
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, lines, _) = check(&data, &[]);
    assert_eq!(code, 1);
    assert!(
        problems(&lines)[0].contains("writable by every user"),
        "{lines:?}"
    );
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();

    // A floor of a petabyte of free space is never met.
    let (code, lines, _) = check(&data, &[("DATA_DIR_MIN_FREE_MB", "1073741824")]);
    assert_eq!(code, 1);
    assert!(
        problems(&lines)[0].contains("below DATA_DIR_MIN_FREE_MB"),
        "{lines:?}"
    );

    // An events database written by a newer build.
    let status = command(&data).arg("--migrate").status().unwrap();
    assert!(status.success());
    let db = rusqlite::Connection::open(data.join("events.sqlite3")).unwrap();
    db.execute(
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (99, 'future', '', '0')",
        [],
    )
    .unwrap();
    drop(db);
    let (code, lines, _) = check(&data, &[]);
    assert_eq!(code, 1);
    assert!(
        problems(&lines)[0].contains("schema version 99, newer than this build knows"),
        "{lines:?}"
    );
}

#[test]
fn unreachable_services_that_settings_name_are_each_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open_port = open.local_addr().unwrap().port().to_string();
    let (code, lines, _) = check(
        dir.path(),
        &[
            (
                "DATABASE_URL",
                &format!("postgres://u:p@127.0.0.1:{closed}/posthog"),
            ),
            ("REDIS_URL", &format!("redis://127.0.0.1:{closed}")),
            (
                "KAFKA_HOSTS",
                &format!("127.0.0.1:{open_port},127.0.0.1:{closed}"),
            ),
            ("CLICKHOUSE_HOST", "no-such-host.invalid"),
        ],
    );
    assert_eq!(code, 1, "{lines:?}");
    let found = problems(&lines);
    assert_eq!(found.len(), 4, "{lines:?}");
    for (setting, reason) in [
        ("DATABASE_URL", "cannot connect to 127.0.0.1"),
        ("REDIS_URL", "cannot connect to 127.0.0.1"),
        ("KAFKA_HOSTS", &format!("127.0.0.1:{closed}")),
        ("CLICKHOUSE_HOST", "no-such-host.invalid:8123"),
    ] {
        assert!(
            found
                .iter()
                .any(|l| l.contains(setting) && l.contains(reason)),
            "{setting}: {found:?}"
        );
    }
    // The reachable broker is not a problem.
    assert!(!found.iter().any(|l| l.contains(&format!(":{open_port}"))));

    // A server on a Unix-domain socket (libpq's `<dir>/.s.PGSQL.<port>`) is reached there.
    let sockets = tempfile::tempdir().unwrap();
    let _server =
        std::os::unix::net::UnixListener::bind(sockets.path().join(".s.PGSQL.5433")).unwrap();
    let on_socket = |port: u16| {
        let url = format!(
            "postgresql:///posthog?host={}&port={port}",
            sockets.path().display()
        );
        check(dir.path(), &[("DATABASE_URL", &url)]).1
    };
    let lines = on_socket(5433);
    assert!(problems(&lines).is_empty(), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.contains(".s.PGSQL.5433")),
        "{lines:?}"
    );
    let lines = on_socket(5434);
    assert!(
        problems(&lines)
            .iter()
            .any(|l| l.contains("DATABASE_URL") && l.contains(".s.PGSQL.5434")),
        "{lines:?}"
    );
}
