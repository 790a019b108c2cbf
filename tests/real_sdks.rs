//! The real PostHog SDKs pointed at a running appliance: posthog-python, posthog-node, and
//! posthog-js (current and legacy) in a jsdom page on another origin. Every event they send is
//! stored. The SDKs come from tests/sdk (requirements.txt, package.json); `.ci/run`
//! installs them, and a missing SDK fails the test with the command that installs it.

mod common;

use std::process::Command;

use common::{create_team, drive, read_events, sdk_dir, Appliance, TOKEN};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_sdks_deliver_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "sdk", TOKEN);
    let app = Appliance::start(dir.path(), &[]);
    let run = std::process::id().to_string();
    let python = tokio::task::block_in_place(|| drive("python3", "python_sdk.py", &app, &[&run]));
    let node = tokio::task::block_in_place(|| drive("node", "node_sdk.mjs", &app, &[&run]));
    assert_eq!(python.len(), 30);
    assert_eq!(node.len(), 29);
    app.wait_drained().await;
    let rows = read_events(&app.sqlite_path());
    assert_eq!(
        rows.len(),
        python.len() + node.len(),
        "every SDK event stored once"
    );
    assert!(rows.iter().all(|r| r.team_id as u64 == team));

    // Python reports each event's uuid: match them one by one.
    for sent in &python {
        let uuid = sent["uuid"].as_str().unwrap();
        let row = rows
            .iter()
            .find(|r| r.uuid == uuid)
            .unwrap_or_else(|| panic!("python event {sent} not stored"));
        assert_eq!(row.event, sent["event"].as_str().unwrap());
        assert_eq!(row.distinct_id, sent["distinct_id"].as_str().unwrap());
        assert_eq!(row.properties["$lib"], "posthog-python");
    }
    let purchase = rows.iter().find(|r| r.event == "purchase").unwrap();
    assert_eq!(purchase.properties["$groups"]["company"], "acme");
    let set = rows.iter().find(|r| r.event == "$set").unwrap();
    assert_eq!(set.properties["$set"]["plan"], "pro");

    // Node: every (event, distinct_id) sent appears as many times as it was sent.
    let node_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.properties["$lib"] == "posthog-node")
        .collect();
    assert_eq!(node_rows.len(), node.len());
    for sent in &node {
        let want = (
            sent["event"].as_str().unwrap(),
            sent["distinct_id"].as_str().unwrap(),
        );
        assert!(
            node_rows
                .iter()
                .any(|r| (r.event.as_str(), r.distinct_id.as_str()) == want),
            "node event {sent} not stored"
        );
    }
    let identify = node_rows.iter().find(|r| r.event == "$identify").unwrap();
    assert_eq!(identify.properties["$set"]["plan"], "pro");
    assert_eq!(identify.properties["$set_once"]["first_seen"], "today");
    let mut pages: Vec<i64> = node_rows
        .iter()
        .filter(|r| r.event == "page viewed")
        .map(|r| r.properties["n"].as_i64().unwrap())
        .collect();
    pages.sort();
    assert_eq!(pages, (0..25).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_js_current_and_legacy_in_a_page_on_another_origin_deliver_every_event() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "web", TOKEN);
    let app = Appliance::start(dir.path(), &[]);
    let run = std::process::id().to_string();
    let drive_browser = |variant: &'static str| {
        let out = Command::new("node")
            .arg(sdk_dir().join("browser_sdk.mjs"))
            .args([&format!("http://{}", app.addr), TOKEN, &run, variant])
            .current_dir(sdk_dir())
            .output()
            .expect("run node");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "posthog-js {variant}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value =
            serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON report");
        report
    };
    // Both pages run at once, as two visitors would.
    let (current, legacy) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let current = s.spawn(|| drive_browser("current"));
            let legacy = s.spawn(|| drive_browser("legacy"));
            (current.join().unwrap(), legacy.join().unwrap())
        })
    });
    app.wait_drained().await;
    let rows = read_events(&app.sqlite_path());
    for (report, version) in [(current, "1.449.2"), (legacy, "1.130.0")] {
        let user = report["user"].as_str().unwrap();
        // Every request the page made got a readable 200: no CORS failure, so no SDK retry.
        let responses = report["responses"].as_array().expect("responses");
        assert!(
            responses.iter().any(|r| r["path"] == "/e/"),
            "posthog-js {version} sent events: {responses:?}"
        );
        assert!(
            responses.iter().all(|r| r["status"] == 200),
            "posthog-js {version}: {responses:?}"
        );
        let mine: Vec<_> = rows
            .iter()
            .filter(|r| r.properties["$lib_version"] == version)
            .collect();
        let mut names: Vec<&str> = mine.iter().map(|r| r.event.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            vec!["$identify", "$pageview", "movie played", "purchase"],
            "posthog-js {version}"
        );
        assert!(mine.iter().all(|r| r.properties["$lib"] == "web"
            && r.properties["$current_url"]
                == "https://shop.example.com/products/42?utm_source=newsletter"));
        let identify = mine.iter().find(|r| r.event == "$identify").unwrap();
        assert_eq!(identify.distinct_id, user);
        assert_eq!(identify.properties["$set"]["plan"], "pro");
        assert_eq!(identify.properties["$set_once"]["first_seen"], "today");
        let anonymous = identify.properties["$anon_distinct_id"]
            .as_str()
            .expect("$anon_distinct_id");
        let before = mine.iter().find(|r| r.event == "movie played").unwrap();
        assert_eq!(
            before.distinct_id, anonymous,
            "events before identify carry the anonymous id"
        );
        let after = mine.iter().find(|r| r.event == "purchase").unwrap();
        assert_eq!(after.distinct_id, user);
    }
}
