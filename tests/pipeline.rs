//! The pipeline's positions end to end: uuids unique per team, a crash between the sink write
//! and the deliveries (at a named failure point) that neither runs the plugins again nor loses or
//! doubles a delivery, re-sent events that are not delivered twice, and an unreadable queue
//! record set aside while the events after it flow.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{
    create_team, delivered_events, enable_plugin, install_plugin, read_events, storage,
    webhook_exporter, Appliance, TOKEN,
};
use serde_json::{json, Value};

/// The test webhooks listen on loopback, which plugins may reach only when the operator allows.
const QUICK: &[(&str, &str)] = &[
    ("SINK_LINGER_MS", "0"),
    ("JOB_RETRY_BASE_MS", "100"),
    ("PLUGIN_ALLOWED_NETWORKS", "127.0.0.0/8"),
];

async fn post(app: &Appliance, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(app.url(path))
        .json(body)
        .send()
        .await
        .expect("capture answers")
}

fn event(uuid: &str, n: usize) -> Value {
    json!({"event": "signed up", "distinct_id": format!("user-{n}"), "uuid": uuid, "properties": {"n": n}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_teams_sending_the_same_uuid_both_keep_their_events() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "first", TOKEN);
    create_team(dir.path(), "second", "phc_secondTeamToken456");
    let app = Appliance::start(dir.path(), QUICK);
    let uuid = "0192f0a0-0000-7000-8000-00000000abcd";
    for token in [TOKEN, "phc_secondTeamToken456", TOKEN] {
        let body = json!({"api_key": token, "batch": [event(uuid, 1)]});
        assert_eq!(post(&app, "/batch/", &body).await.status(), 200);
    }
    let ready = app.wait_drained().await;
    let rows = read_events(&app.sqlite_path());
    let mut teams: Vec<i64> = rows
        .iter()
        .filter(|r| r.uuid == uuid)
        .map(|r| r.team_id)
        .collect();
    teams.sort();
    assert_eq!(teams, vec![1, 2], "one row per team: {rows:?}");
    assert_eq!(ready["sink"]["duplicates_skipped"], 1, "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_sink_write_neither_reprocesses_nor_loses_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "crash", TOKEN).to_string();
    install_plugin(dir.path(), "tests/call-counter", "call_counter.wasm");
    enable_plugin(dir.path(), &team, "Call Counter", &[]);
    let seen = webhook_exporter(dir.path(), &team).await;

    let uuids: Vec<String> = (0..20)
        .map(|n| format!("0192f0a0-0000-7000-8000-0000000000{n:02}"))
        .collect();
    let batch = json!({"api_key": TOKEN, "batch": uuids.iter().enumerate().map(|(n, u)| event(u, n)).collect::<Vec<_>>()});

    // The process aborts right after the sink commits the batch, before its deliveries are queued.
    let mut env = QUICK.to_vec();
    env.push(("APPLIANCE_FAILPOINTS", "pipeline.after_sink_write"));
    let mut crashing = Appliance::start(dir.path(), &env);
    assert_eq!(post(&crashing, "/batch/", &batch).await.status(), 200);
    let status = crashing.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the failure point aborts the process");
    let stored = read_events(&crashing.sqlite_path());
    assert_eq!(
        stored.len(),
        20,
        "the sink committed the batch before the crash"
    );
    assert!(seen.lock().unwrap().is_empty(), "nothing was delivered yet");
    drop(crashing);

    // After the restart the stored batch is not processed again; its deliveries are rebuilt
    // from the stored rows and sent once.
    let app = Appliance::start(dir.path(), QUICK);
    let delivered = delivered_events(&seen, 20).await;
    let calls = storage(dir.path(), &team, "Call Counter");
    for uuid in &uuids {
        assert_eq!(
            calls.get(&format!("calls:{uuid}")).map(String::as_str),
            Some("1"),
            "{uuid} went through the plugins once: {calls:?}"
        );
    }
    let mut per_uuid: HashMap<String, usize> = HashMap::new();
    for e in &delivered {
        *per_uuid
            .entry(e["uuid"].as_str().unwrap().to_owned())
            .or_default() += 1;
        let properties: Value = match &e["properties"] {
            Value::String(text) => serde_json::from_str(text).unwrap(),
            other => other.clone(),
        };
        assert_eq!(
            properties["processed_times"], 1,
            "the delivery carries the stored row: {e}"
        );
    }
    assert_eq!(per_uuid.len(), 20);
    assert!(
        per_uuid.values().all(|n| *n == 1),
        "each event delivered once: {per_uuid:?}"
    );

    // An SDK re-sending the same request (a retry after a timeout): stored nothing new, so
    // nothing is delivered again.
    assert_eq!(post(&app, "/batch/", &batch).await.status(), 200);
    let ready = app.wait_drained().await;
    assert_eq!(ready["sink"]["duplicates_skipped"], 20, "{ready}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let total: usize = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, body)| body["batch"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(
        total, 20,
        "re-sent events that were already stored are not delivered again"
    );
    assert_eq!(read_events(&app.sqlite_path()).len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_queue_record_is_quarantined_and_the_events_after_it_flow() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "q", TOKEN);
    {
        // A record no build can read, as a damaged disk or a future format would leave it.
        let store = appliance::store::Store::open(dir.path()).unwrap();
        store
            .append_ingest(&[b"\x01\xff\xff\xff\xff garbage".to_vec()])
            .unwrap();
    }
    let app = Appliance::start(dir.path(), QUICK);
    let body =
        json!({"api_key": TOKEN, "batch": [event("0192f0a0-0000-7000-8000-0000000000ff", 1)]});
    assert_eq!(post(&app, "/batch/", &body).await.status(), 200);
    let ready = app.wait_drained().await;
    assert_eq!(ready["sink"]["quarantined"], 1, "{ready}");
    let rows = read_events(&app.sqlite_path());
    assert_eq!(rows.len(), 1, "the event after the bad record is stored");
    let store = appliance::store::Store::open(dir.path()).unwrap();
    let (total, kept) = store.quarantined(10).unwrap();
    assert_eq!(total, 1);
    assert_eq!(kept[0].position, 1);
    assert!(
        kept[0].reason.contains("not a readable ingest batch"),
        "{}",
        kept[0].reason
    );
    assert!(kept[0].bytes.ends_with(b"garbage"));
}
