//! The real posthog-python and posthog-node SDKs, pointed at a running appliance: every event
//! they send is stored. The SDKs come from tests/sdk (requirements.txt, package.json); `.ci/run`
//! installs them, and a missing SDK fails the test with the command that installs it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{create_team, read_events, Appliance, TOKEN};
use serde_json::Value;

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

/// Runs a driver script and returns what it reports having sent.
fn drive(program: &str, script: &str, app: &Appliance, run: &str) -> Vec<Value> {
    let out = Command::new(program)
        .arg(sdk_dir().join(script))
        .args([&format!("http://{}", app.addr), TOKEN, run])
        .current_dir(sdk_dir())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}; install it (see .ci/run)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'posthog'") && !stderr.contains("Cannot find package 'posthog-node'"),
        "the SDK is not installed: run `pip install -r tests/sdk/requirements.txt` and `npm ci --prefix tests/sdk`\n{stderr}"
    );
    assert!(
        out.status.success(),
        "{script} failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} printed no report ({e}): {stdout}"));
    assert_eq!(report["errors"], serde_json::json!([]), "{script}");
    report["sent"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_sdks_deliver_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "sdk", TOKEN);
    let app = Appliance::start(dir.path(), &[]);
    let run = std::process::id().to_string();
    let python = tokio::task::block_in_place(|| drive("python3", "python_sdk.py", &app, &run));
    let node = tokio::task::block_in_place(|| drive("node", "node_sdk.mjs", &app, &run));
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
