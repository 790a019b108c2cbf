//! WASM plugins end to end: installed and enabled through the CLI while the server runs, events
//! sent through capture, results read from SQLite; and hostile plugins contained.
//!
//! The plugins are built from `plugins/` for wasm32-wasip2 (`.ci/run` does it first).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{
    by_event, cli, cli_error, create_team, enable_plugin, install_plugin, plugin_folder,
    read_events, Appliance, TOKEN,
};
use serde_json::{json, Value};

async fn send(app: &Appliance, token: &str, events: Vec<Value>) {
    common::send_batch(app, token, events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_property_filter_is_installed_and_enabled_on_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "shop", TOKEN).to_string();
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    let props = json!({"secret": "s3cr3t", "keep": 1, "$set": {"email": "a@b.c", "name": "Ann"}});

    send(
        &app,
        TOKEN,
        vec![json!({"event": "before", "distinct_id": "u", "properties": props})],
    )
    .await;
    let folder = plugin_folder("examples/property-filter", "property_filter.wasm");
    let installed = cli(
        dir.path(),
        &["plugin", "install", folder.path().to_str().unwrap()],
    );
    assert!(installed.contains("Property Filter"), "{installed}");
    enable_plugin(
        dir.path(),
        &team,
        "Property Filter",
        &["properties=secret,$set.email"],
    );
    send(
        &app,
        TOKEN,
        vec![json!({"event": "after", "distinct_id": "u", "properties": props})],
    )
    .await;

    let rows = read_events(&app.sqlite_path());
    assert_eq!(
        by_event(&rows, "before").properties["secret"],
        "s3cr3t",
        "events before enabling are untouched"
    );
    let after = &by_event(&rows, "after").properties;
    assert!(after.get("secret").is_none(), "{after}");
    assert!(after["$set"].get("email").is_none(), "{after}");
    assert_eq!(after["$set"]["name"], "Ann");
    assert_eq!(after["keep"], 1);

    cli(
        dir.path(),
        &["plugin", "disable", "--team", &team, "Property Filter"],
    );
    send(
        &app,
        TOKEN,
        vec![json!({"event": "disabled", "distinct_id": "u", "properties": props})],
    )
    .await;
    let rows = read_events(&app.sqlite_path());
    assert_eq!(
        by_event(&rows, "disabled").properties["secret"],
        "s3cr3t",
        "disabling applies at once"
    );
}

#[test]
fn bad_plugins_and_bad_config_are_refused_with_precise_errors() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "shop", TOKEN).to_string();
    let not_a_component = tempfile::tempdir().unwrap();
    std::fs::write(
        not_a_component.path().join("plugin.json"),
        r#"{"name": "junk", "main": "junk.wasm"}"#,
    )
    .unwrap();
    std::fs::write(not_a_component.path().join("junk.wasm"), b"\0asm garbage").unwrap();
    let error = cli_error(
        dir.path(),
        &[
            "plugin",
            "install",
            not_a_component.path().to_str().unwrap(),
        ],
    );
    assert!(error.contains("not a valid plugin component"), "{error}");

    let broken_manifest = tempfile::tempdir().unwrap();
    std::fs::write(
        broken_manifest.path().join("plugin.json"),
        r#"{"name": "x", "main": "#,
    )
    .unwrap();
    let error = cli_error(
        dir.path(),
        &[
            "plugin",
            "install",
            broken_manifest.path().to_str().unwrap(),
        ],
    );
    assert!(error.contains("plugin.json does not parse"), "{error}");

    install_plugin(
        dir.path(),
        "examples/property-filter",
        "property_filter.wasm",
    );
    let error = cli_error(
        dir.path(),
        &["plugin", "enable", "--team", &team, "Property Filter"],
    );
    assert!(
        error.contains("config \"properties\": is required"),
        "{error}"
    );
    let error = cli_error(
        dir.path(),
        &[
            "plugin",
            "enable",
            "--team",
            &team,
            "Property Filter",
            "--config",
            "colour=red",
            "--config",
            "properties=x",
        ],
    );
    assert!(error.contains("not in the plugin's schema"), "{error}");
    let error = cli_error(
        dir.path(),
        &[
            "plugin",
            "enable",
            "--team",
            "99",
            "Property Filter",
            "--config",
            "properties=x",
        ],
    );
    assert!(error.contains("no team 99"), "{error}");
}

/// Each hostile mode runs for its own team, followed in the chain by the property filter, beside
/// a well-behaved team: every event is stored, the next plugin still runs, and the failure is
/// logged against the hostile plugin's config with the event's uuid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_contained_and_logged_against_their_config() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = plugin_folder("tests/hostile", "hostile.wasm");
    let filter = plugin_folder("examples/property-filter", "property_filter.wasm");
    cli(
        dir.path(),
        &["plugin", "install", hostile.path().to_str().unwrap()],
    );
    cli(
        dir.path(),
        &["plugin", "install", filter.path().to_str().unwrap()],
    );
    let app = Appliance::start(
        dir.path(),
        &[
            ("SINK_LINGER_MS", "0"),
            ("PLUGIN_PROCESS_EVENT_TIMEOUT_MS", "200"),
            ("PLUGIN_MEMORY_MB", "16"),
            ("PLUGIN_ALLOWED_NETWORKS", "127.0.0.0/8"),
        ],
    );
    let health = app.url("/_health");
    let undeclared = health.replace("127.0.0.1", "127.0.0.2");
    let modes: Vec<(&str, Vec<String>, &str)> = vec![
        ("loop", vec![], "ran past its deadline"),
        ("memory", vec![], "exceeded its memory limit"),
        ("trap", vec![], "this plugin traps on purpose"),
        ("garbage", vec![], "returned an invalid event"),
        (
            "fetch",
            vec![format!("url={undeclared}")],
            "is not among the hosts this plugin may call",
        ),
    ];
    let mut teams = Vec::new();
    for (mode, extra, _) in &modes {
        let token = format!("phc_hostile{mode}Token");
        let team = create_team(dir.path(), mode, &token).to_string();
        let mut args = vec![
            "plugin", "enable", "--team", &team, "Hostile", "--order", "1", "--config",
        ];
        let mode_arg = format!("mode={mode}");
        args.push(&mode_arg);
        for e in extra {
            args.push("--config");
            args.push(e);
        }
        cli(dir.path(), &args);
        cli(
            dir.path(),
            &[
                "plugin",
                "enable",
                "--team",
                &team,
                "Property Filter",
                "--order",
                "2",
                "--config",
                "properties=secret",
            ],
        );
        teams.push((team, token));
    }
    let good_token = "phc_wellBehavedTeam1";
    let good = create_team(dir.path(), "good", good_token).to_string();
    enable_plugin(dir.path(), &good, "Property Filter", &["properties=secret"]);
    // A declared host works.
    let fetcher_token = "phc_declaredFetcher1";
    let fetcher = create_team(dir.path(), "fetcher", fetcher_token).to_string();
    enable_plugin(
        dir.path(),
        &fetcher,
        "Hostile",
        &["mode=fetch", &format!("url={health}")],
    );

    let event = |name: &str, uuid: &str| json!({"event": name, "distinct_id": "u", "uuid": uuid, "properties": {"secret": 1, "kept": 2}});
    for (i, (_, token)) in teams.iter().enumerate() {
        send(
            &app,
            token,
            vec![event(
                modes[i].0,
                &format!("0192a000-0000-7000-8000-00000000000{i}"),
            )],
        )
        .await;
    }
    send(
        &app,
        good_token,
        vec![event("good", "0192a000-0000-7000-8000-0000000000a0")],
    )
    .await;
    send(
        &app,
        fetcher_token,
        vec![event(
            "declared fetch",
            "0192a000-0000-7000-8000-0000000000b0",
        )],
    )
    .await;

    let rows = read_events(&app.sqlite_path());
    for (i, (mode, _, logged)) in modes.iter().enumerate() {
        let row = by_event(&rows, mode);
        assert!(
            row.properties.get("secret").is_none(),
            "{mode}: the next plugin in the chain still ran: {}",
            row.properties
        );
        assert_eq!(row.properties["kept"], 2, "{mode}");
        let logs = cli(
            dir.path(),
            &["plugin", "logs", "--team", &teams[i].0, "Hostile"],
        );
        assert!(logs.contains(logged), "{mode}: logs say {logs:?}");
        if *mode != "fetch" {
            let uuid = format!("0192a000-0000-7000-8000-00000000000{i}");
            assert!(
                logs.contains(&uuid),
                "{mode}: the log names the event: {logs}"
            );
        } else {
            assert!(
                row.properties["fetch"]["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("not among the hosts"),
                "{}",
                row.properties
            );
        }
    }
    assert!(by_event(&rows, "good").properties.get("secret").is_none());
    assert_eq!(
        by_event(&rows, "declared fetch").properties["fetch"]["status"],
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_keeps_failing_is_disabled_visibly() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "t", TOKEN).to_string();
    install_plugin(dir.path(), "tests/hostile", "hostile.wasm");
    enable_plugin(dir.path(), &team, "Hostile", &["mode=trap"]);
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    for n in 0..appliance::plugins::DISABLE_AFTER_FAILURES {
        send(
            &app,
            TOKEN,
            vec![json!({"event": format!("e{n}"), "distinct_id": "u"})],
        )
        .await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = cli(dir.path(), &["plugin", "list"]);
        if list.contains("disabled") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not disabled: {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = cli(dir.path(), &["plugin", "logs", "--team", &team, "Hostile"]);
    assert!(
        logs.contains("disabled after 20 consecutive failures"),
        "{logs}"
    );
    assert_eq!(
        read_events(&app.sqlite_path()).len(),
        20,
        "every event was stored all the same"
    );
}

/// Storage persists across restarts and is private to each plugin config: the same person is
/// "first" again for another team.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_time_event_tracker_marks_each_first_once_even_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let shop = create_team(dir.path(), "shop", TOKEN).to_string();
    let blog = create_team(dir.path(), "blog", "phc_blogProjectToken1").to_string();
    install_plugin(
        dir.path(),
        "examples/first-time-event",
        "first_time_event.wasm",
    );
    for team in [&shop, &blog] {
        enable_plugin(
            dir.path(),
            team,
            "First Time Event Tracker",
            &["events=signed up"],
        );
    }
    let signed_up = |who: &str, n: u32| json!({"event": "signed up", "distinct_id": who, "properties": {"n": n}});
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    send(
        &app,
        TOKEN,
        vec![
            signed_up("ann", 1),
            signed_up("ann", 2),
            signed_up("bob", 3),
        ],
    )
    .await;
    send(
        &app,
        TOKEN,
        vec![json!({"event": "$pageview", "distinct_id": "ann", "properties": {"n": 4}})],
    )
    .await;
    drop(app);
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    send(&app, TOKEN, vec![signed_up("ann", 5)]).await;
    send(&app, "phc_blogProjectToken1", vec![signed_up("ann", 6)]).await;

    let rows = read_events(&app.sqlite_path());
    let first = |n: i64| {
        let row = rows
            .iter()
            .find(|r| r.properties["n"] == n)
            .unwrap_or_else(|| panic!("event {n} stored"));
        row.properties.get("$is_first_event").cloned()
    };
    assert_eq!(first(1), Some(json!(true)));
    assert_eq!(first(2), Some(json!(false)));
    assert_eq!(first(3), Some(json!(true)), "another person");
    assert_eq!(first(4), None, "untracked events are untouched");
    assert_eq!(first(5), Some(json!(false)), "remembered across a restart");
    assert_eq!(
        first(6),
        Some(json!(true)),
        "another team's config has its own storage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_does_what_the_cli_does_behind_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "shop", TOKEN);
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    let token = cli(dir.path(), &["api-token"]).trim().to_owned();
    assert!(token.starts_with("apa_"), "{token}");
    let client = reqwest::Client::new();

    let anonymous = client
        .get(app.admin_url("/api/plugins"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = client
        .get(app.admin_url("/api/plugins"))
        .bearer_auth("apa_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("examples/property-filter/plugin.json")).unwrap(),
    )
    .unwrap();
    let wasm = std::fs::read(root.join("target/wasm32-wasip2/release/property_filter.wasm"))
        .expect("plugins are built");
    use base64::Engine;
    let upload = |wasm: &[u8]| json!({"manifest": manifest, "wasm_base64": base64::engine::general_purpose::STANDARD.encode(wasm)});

    let junk = client
        .post(app.admin_url("/api/plugins"))
        .bearer_auth(&token)
        .json(&upload(b"\0asm junk"))
        .send()
        .await
        .unwrap();
    assert_eq!(junk.status(), 422);
    let body: Value = junk.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a valid plugin component"),
        "{body}"
    );

    let installed = client
        .post(app.admin_url("/api/plugins"))
        .bearer_auth(&token)
        .json(&upload(&wasm))
        .send()
        .await
        .unwrap();
    assert_eq!(installed.status(), 201);
    // The same plugin as an archive of its folder, and a body that is neither.
    let folder = plugin_folder("examples/property-filter", "property_filter.wasm");
    let tgz = folder.path().with_extension("tgz");
    let packed = std::process::Command::new("tar")
        .arg("czf")
        .arg(&tgz)
        .arg("-C")
        .arg(folder.path())
        .arg(".")
        .status()
        .unwrap();
    assert!(packed.success());
    let archive = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&tgz).unwrap());
    let _ = std::fs::remove_file(&tgz);
    for (body, status) in [
        (json!({"archive_base64": archive}), 201),
        (json!({"manifest": manifest}), 400),
    ] {
        let answer = client
            .post(app.admin_url("/api/plugins"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status);
    }
    let plugin_url = app.admin_url(&format!("/api/teams/{team}/plugins/Property%20Filter"));
    let missing_config = client
        .put(&plugin_url)
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing_config.status(), 422);
    let enabled = client
        .put(&plugin_url)
        .bearer_auth(&token)
        .json(&json!({"config": {"properties": "secret"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(enabled.status(), 200);
    let unknown_team = client
        .put(app.admin_url("/api/teams/99/plugins/Property%20Filter"))
        .bearer_auth(&token)
        .json(&json!({"config": {"properties": "secret"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_team.status(), 404);

    send(
        &app,
        TOKEN,
        vec![
            json!({"event": "via api", "distinct_id": "u", "properties": {"secret": 1, "kept": 2}}),
        ],
    )
    .await;
    let rows = read_events(&app.sqlite_path());
    assert!(by_event(&rows, "via api")
        .properties
        .get("secret")
        .is_none());

    let listed: Value = client
        .get(app.admin_url("/api/plugins"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["plugins"][0]["name"], "Property Filter");
    assert_eq!(listed["plugins"][0]["configs"][0]["enabled"], true);
    assert_eq!(
        listed["plugins"][0]["configs"][0]["config"]["properties"],
        "secret"
    );
    let logs = client
        .get(format!("{plugin_url}/logs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status(), 200);
    assert!(logs.json::<Value>().await.unwrap()["logs"].is_array());
}

/// A CA and a certificate for 127.0.0.1 that it signed, made with the openssl command line.
fn certificate_authority(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let path = |f: &str| dir.join(format!("{name}-{f}"));
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |f: &str| path(f).to_str().unwrap().to_owned();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &p("leaf.key"),
        "-out",
        &p("leaf.csr"),
    ]);
    std::fs::write(
        path("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &p("leaf.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-extfile",
        &p("ext"),
        "-out",
        &p("leaf.pem"),
    ]);
    (path("ca.pem"), path("leaf.pem"), path("leaf.key"))
}

/// An HTTPS server (Python's, with the given certificate) answering 200 to GET; returns it and
/// its port.
fn https_server(cert: &std::path::Path, key: &std::path::Path) -> (std::process::Child, u16) {
    const SERVER: &str = r#"
import http.server, ssl, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", SERVER, cert.to_str().unwrap(), key.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 is installed");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port = line.trim().parse().expect("the server prints its port");
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_fetches_are_verified_against_the_trusted_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (trusted_ca, trusted_cert, trusted_key) = certificate_authority(certs.path(), "trusted");
    let (_, other_cert, other_key) = certificate_authority(certs.path(), "unknown");
    let (mut trusted_server, trusted_port) = https_server(&trusted_cert, &trusted_key);
    let (mut other_server, other_port) = https_server(&other_cert, &other_key);

    install_plugin(dir.path(), "tests/hostile", "hostile.wasm");
    let mut tokens = Vec::new();
    for (name, port) in [("trusted", trusted_port), ("unknown", other_port)] {
        let token = format!("phc_https{name}Fetcher");
        let team = create_team(dir.path(), name, &token).to_string();
        let url = format!("url=https://127.0.0.1:{port}/");
        enable_plugin(dir.path(), &team, "Hostile", &["mode=fetch", &url]);
        tokens.push((name, token));
    }
    // The appliance trusts the system's certificates, or those SSL_CERT_FILE names.
    let app = Appliance::start(
        dir.path(),
        &[
            ("SINK_LINGER_MS", "0"),
            ("SSL_CERT_FILE", trusted_ca.to_str().unwrap()),
            ("PLUGIN_ALLOWED_NETWORKS", "127.0.0.0/8"),
        ],
    );
    for (name, token) in &tokens {
        send(
            &app,
            token,
            vec![json!({"event": name, "distinct_id": "u"})],
        )
        .await;
    }
    let rows = read_events(&app.sqlite_path());
    let trusted = &by_event(&rows, "trusted").properties;
    assert_eq!(trusted["fetch"]["status"], 200, "{trusted}");
    let refused = by_event(&rows, "unknown").properties["fetch"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(refused.contains("certificate"), "{refused}");
    let _ = trusted_server.kill();
    let _ = other_server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_locate_addresses_in_the_operators_geoip_database() {
    let dir = tempfile::tempdir().unwrap();
    // A real MaxMind DB, written by an independent writer (mmdb-writer, installed by .ci/run).
    let mmdb = dir.path().join("test-city.mmdb");
    common::make_mmdb(&mmdb, false);
    let team = create_team(dir.path(), "geo", TOKEN).to_string();
    install_plugin(dir.path(), "tests/hostile", "hostile.wasm");
    enable_plugin(dir.path(), &team, "Hostile", &["mode=geoip"]);
    let app = Appliance::start(
        dir.path(),
        &[
            ("SINK_LINGER_MS", "0"),
            ("GEOIP_MMDB_PATH", mmdb.to_str().unwrap()),
        ],
    );
    let at = |ip: &str, name: &str| json!({"event": name, "distinct_id": "u", "properties": {"$ip": ip}});
    send(
        &app,
        TOKEN,
        vec![
            at("203.0.113.7", "amsterdam"),
            at("2001:db8::1", "v6"),
            at("198.51.100.1", "unknown"),
        ],
    )
    .await;
    let rows = read_events(&app.sqlite_path());
    let geo = &by_event(&rows, "amsterdam").properties["geo"];
    assert_eq!(
        *geo,
        json!({
            "country_code": "NL", "country_name": "Netherlands", "city_name": "Amsterdam",
            "subdivision_code": "NH", "postal_code": "1012", "continent_code": "EU",
            "latitude": 52.3676, "longitude": 4.9041, "time_zone": "Europe/Amsterdam",
        })
    );
    assert_eq!(
        by_event(&rows, "v6").properties["geo"]["country_code"],
        "JP"
    );
    assert_eq!(by_event(&rows, "unknown").properties["geo"], Value::Null);

    // The same fields as PostHog's `$geoip_*` properties, also on the event itself.
    let amsterdam = &by_event(&rows, "amsterdam").properties;
    assert_eq!(amsterdam["$geoip_city_name"], "Amsterdam");
    assert_eq!(amsterdam["$geoip_subdivision_1_code"], "NH");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_install_from_tar_gz_and_zip_archives_and_hostile_archives_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let folder = plugin_folder("examples/property-filter", "property_filter.wasm");
    let archives = tempfile::tempdir().unwrap();
    // A .tar.gz with the plugin in one folder, as GitHub's source archives have it.
    let tgz = archives.path().join("property-filter.tar.gz");
    let packed = std::process::Command::new("tar")
        .arg("czf")
        .arg(&tgz)
        .arg("-C")
        .arg(folder.path().parent().unwrap())
        .arg(folder.path().file_name().unwrap())
        .status()
        .unwrap();
    assert!(packed.success());
    // A .zip with the files at the top, and one whose entry escapes the archive.
    let zip = archives.path().join("property-filter.zip");
    let evil = archives.path().join("evil.zip");
    let zipped = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile\n\
             with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n\
             \x20   z.write(sys.argv[3] + '/plugin.json', 'plugin.json')\n\
             \x20   z.write(sys.argv[3] + '/property_filter.wasm', 'property_filter.wasm')\n\
             with zipfile.ZipFile(sys.argv[2], 'w') as z:\n\
             \x20   z.writestr('../plugin.json', '{}')\n",
        )
        .arg(&zip)
        .arg(&evil)
        .arg(folder.path())
        .status()
        .unwrap();
    assert!(zipped.success());

    let out = cli(dir.path(), &["plugin", "install", tgz.to_str().unwrap()]);
    assert!(out.contains("Property Filter"), "{out}");
    let out = cli(dir.path(), &["plugin", "install", zip.to_str().unwrap()]);
    assert!(out.contains("Property Filter"), "{out}");
    let err = cli_error(dir.path(), &["plugin", "install", evil.to_str().unwrap()]);
    assert!(err.contains("leaves the archive"), "{err}");
    let err = cli_error(dir.path(), &["plugin", "install", "Cargo.toml"]);
    assert!(
        err.contains("not a plugin folder, .tar.gz or .zip archive"),
        "{err}"
    );

    // The archived plugin works.
    let team = create_team(dir.path(), "shop", TOKEN).to_string();
    enable_plugin(dir.path(), &team, "Property Filter", &["properties=secret"]);
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    send(
        &app,
        TOKEN,
        vec![json!({"event": "e", "distinct_id": "u", "properties": {"secret": 1, "kept": 2}})],
    )
    .await;
    let rows = read_events(&app.sqlite_path());
    assert_eq!(
        by_event(&rows, "e").properties,
        json!({"kept": 2, "$ip": "127.0.0.1"})
    );
}

/// The plugin instance pool reserves terabytes of address space up front; under a cap on the
/// address space (`ulimit -v`, as some hosts and valgrind impose) the appliance still starts,
/// says why, and runs plugins on instances allocated one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_run_when_the_address_space_is_capped() {
    const ADDRESS_SPACE: u64 = 128 << 30;
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "shop", TOKEN).to_string();
    install_plugin(
        dir.path(),
        "examples/property-filter",
        "property_filter.wasm",
    );
    enable_plugin(dir.path(), &team, "Property Filter", &["properties=secret"]);
    let app = Appliance::start_with(dir.path(), &[("SINK_LINGER_MS", "0")], |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                use nix::sys::resource::{setrlimit, Resource};
                setrlimit(Resource::RLIMIT_AS, ADDRESS_SPACE, ADDRESS_SPACE)
                    .map_err(std::io::Error::from)
            });
        }
    });
    send(
        &app,
        TOKEN,
        vec![
            json!({"event": "capped", "distinct_id": "u", "properties": {"secret": 1, "keep": 2}}),
        ],
    )
    .await;
    let rows = read_events(&app.sqlite_path());
    let stored = &by_event(&rows, "capped").properties;
    assert!(stored.get("secret").is_none(), "the plugin ran: {stored}");
    assert_eq!(stored["keep"], 2);
    let log = app.stderr_lines().join("\n");
    assert!(
        log.contains("plugin instances are allocated one by one"),
        "the operator is told why: {log}"
    );
}
