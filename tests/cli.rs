//! The command line as an operator uses it: the seed's modes, configuration errors, teams.

mod common;

use std::time::Duration;

use common::{cli, cli_error, command, create_team, Appliance, TOKEN};

#[test]
fn help_lists_every_setting_with_its_default() {
    let out = command(std::path::Path::new("unused"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for setting in appliance::config::SETTINGS {
        assert!(help.contains(setting.name), "--help lacks {}", setting.name);
    }
    for flag in ["--version", "--healthcheck", "--migrate", "--idle"] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(help.contains("[default: '3008']"), "defaults are shown");
    let lines: Vec<&str> = help.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with("DISABLE_WEB "))
        .expect("DISABLE_WEB listed");
    assert!(lines[at].ends_with("[default: 'false']"), "{}", lines[at]);
    assert!(
        lines[at + 1].contains("seed defaulted to true"),
        "{}",
        lines[at + 1]
    );
}

#[test]
fn version_with_short_and_long_flag() {
    for flag in ["-v", "--version"] {
        let out = command(std::path::Path::new("unused"))
            .arg(flag)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            format!("appliance {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn a_bad_setting_stops_start_up_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value, allowed) in [
        (
            "WEB_PORT",
            "eighty",
            "expected a whole number from 0 to 65535",
        ),
        ("KAFKA_ENABLED", "perhaps", "expected true or false"),
        (
            "DATABASE_URL",
            "mysql://db",
            "expected a URL starting with postgres://",
        ),
        ("LOG_LEVEL", "shout", "expected one of"),
    ] {
        let out = command(dir.path())
            .env(name, value)
            .arg("run")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{name}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(&format!("{name}=\"{value}\"")) && stderr.contains(allowed),
            "{stderr}"
        );
    }
    assert!(
        !dir.path().join("state.redb").exists(),
        "nothing was started"
    );
}

#[test]
fn migrate_creates_the_storage_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path()).arg("--migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 SQLite migration(s) applied"));
    let conn = rusqlite::Connection::open(dir.path().join("events.sqlite3")).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        tables.contains(&"posthog_event".to_owned())
            && tables.contains(&"appliance_sink_position".to_owned()),
        "{tables:?}"
    );
    assert!(dir.path().join("state.redb").exists());
    let again = command(dir.path()).arg("--migrate").output().unwrap();
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("0 SQLite migration(s) applied"),
        "migrations are applied once"
    );
}

#[test]
fn teams_are_created_and_listed_even_while_the_server_runs() {
    let dir = tempfile::tempdir().unwrap();
    let first = create_team(dir.path(), "shop", TOKEN);
    let app = Appliance::start(dir.path(), &[]);
    let out = command(dir.path())
        .args(["team", "create", "blog"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created = String::from_utf8(out.stdout).unwrap();
    let token = created.split_whitespace().last().unwrap().to_owned();
    assert!(token.starts_with("phc_") && token.len() == 47, "{created}");
    let list = String::from_utf8(
        command(dir.path())
            .args(["team", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        list.contains("shop")
            && list.contains(TOKEN)
            && list.contains("blog")
            && list.contains(&token),
        "{list}"
    );
    // The running server accepts the new team's token at once.
    let status = reqwest::blocking_post(
        &app.url("/e/"),
        &format!(r#"{{"event":"e","distinct_id":"d","token":"{token}"}}"#),
    );
    assert_eq!(status, 200);
    let dup = command(dir.path())
        .args(["team", "create", "again", "--token", TOKEN])
        .output()
        .unwrap();
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains(&format!("already used by team {first}")));
}

#[test]
fn a_rotated_token_stops_working_within_a_second_and_the_new_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "shop", TOKEN).to_string();
    let app = Appliance::start(dir.path(), &[]);
    let send = |token: &str| {
        reqwest::blocking_post(
            &app.url("/e/"),
            &format!(r#"{{"event":"e","distinct_id":"d","token":"{token}"}}"#),
        )
    };
    // The running server has the old token in its cache.
    assert_eq!(send(TOKEN), 200);
    let out = cli(
        dir.path(),
        &[
            "team",
            "update",
            &team,
            "--rotate-token",
            "--name",
            "boutique",
        ],
    );
    let new_token = out
        .split("project token ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_owned();
    assert!(
        out.contains("(boutique)") && new_token.starts_with("phc_"),
        "{out}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(send(TOKEN), 401, "the old token still works");
    assert_eq!(send(&new_token), 200);
    let missing = cli_error(dir.path(), &["team", "update", "99", "--name", "x"]);
    assert!(missing.contains("no team 99"), "{missing}");
}

#[test]
fn a_fresh_data_directory_gets_a_default_team_whose_token_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(dir.path());
    cmd.arg("run").stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("created team 1 (Default project) with project token phc_"),
        "{line}"
    );
}

#[test]
fn healthcheck_answers_for_a_running_instance_only() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &[]);
    let port = app.addr.port().to_string();
    let ok = command(dir.path())
        .env("WEB_PORT", &port)
        .arg("--healthcheck")
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    drop(app);
    let down = command(dir.path())
        .env("WEB_PORT", &port)
        .arg("--healthcheck")
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
}

#[test]
fn idle_mode_serves_health_and_refuses_events_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    for how in [("--idle", None), ("", Some(("PLUGIN_SERVER_IDLE", "true")))] {
        let mut cmd = command(dir.path());
        if !how.0.is_empty() {
            cmd.arg(how.0);
        }
        if let Some((k, v)) = how.1 {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("{line}"))
            .to_owned();
        let health = reqwest::blocking_get(&format!("http://{addr}/_health"));
        assert_eq!(health, 200);
        let (status, retry_after) =
            reqwest::blocking_post_with_header(&format!("http://{addr}/e/"), "{}", "retry-after");
        assert_eq!(status, 503);
        assert_eq!(retry_after.as_deref(), Some("5"));
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            !dir.path().join("state.redb").exists(),
            "idle opens no storage"
        );
    }
}

#[test]
fn settings_for_components_not_built_yet_are_reported_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        dir.path(),
        &[
            ("SENTRY_DSN", "https://key@sentry.example/1"),
            ("LOG_LEVEL", "info"),
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        seen.extend(app.stderr_lines());
        if seen
            .iter()
            .any(|l| l.contains("SENTRY_DSN") && l.contains("not built yet"))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no start-up note about KAFKA_ENABLED in {seen:?}");
}

/// Tiny blocking HTTP helpers so these tests need no async runtime.
mod reqwest {
    pub fn blocking_get(url: &str) -> u16 {
        run(async { ::reqwest::get(url).await.unwrap().status().as_u16() })
    }
    pub fn blocking_post(url: &str, body: &str) -> u16 {
        blocking_post_with_header(url, body, "content-type").0
    }
    pub fn blocking_post_with_header(url: &str, body: &str, header: &str) -> (u16, Option<String>) {
        run(async {
            let r = ::reqwest::Client::new()
                .post(url)
                .body(body.to_owned())
                .send()
                .await
                .unwrap();
            let value = r
                .headers()
                .get(header)
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), value)
        })
    }
    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }
}

#[test]
fn an_env_file_configures_what_the_environment_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let file_dir = dir.path().join("from-file");
    let env_file = dir.path().join("appliance.env");
    std::fs::write(
        &env_file,
        format!(
            "# comments and quotes as shells write them\nDATA_DIR=\"{}\"\nexport LOG_LEVEL=warn\n",
            file_dir.display()
        ),
    )
    .unwrap();
    // DATA_DIR comes from the file when the environment does not set it…
    let out = std::process::Command::new(common::binary())
        .env_clear()
        .env("APPLIANCE_ENV_FILE", &env_file)
        .args(["team", "create", "from-file", "--token", "phc_fromTheFile1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(file_dir.join("state.redb").exists());
    // …and the environment wins over the file.
    let out = command(dir.path())
        .env("APPLIANCE_ENV_FILE", &env_file)
        .args(["team", "create", "from-env", "--token", "phc_fromTheEnvir1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(dir.path().join("state.redb").exists());

    // A bad value in the file is refused like one in the environment; a missing file too.
    std::fs::write(&env_file, "CAPTURE_MAX_BODY_BYTES=eighty\n").unwrap();
    for file in [env_file.clone(), dir.path().join("missing.env")] {
        let out = command(dir.path())
            .env("APPLIANCE_ENV_FILE", &file)
            .args(["team", "list"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}
