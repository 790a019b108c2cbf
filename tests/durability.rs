//! Nothing acknowledged is ever lost or stored twice: not across SIGKILL at an arbitrary moment
//! under load, and not across SIGTERM, which must flush the queue to the sink and exit 0.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{create_team, read_events, Appliance, TOKEN};
use serde_json::json;

/// Sends batches of events without uuids (so the server assigns them, and a replay could only be
/// caught by the queue positions) from several connections until the server goes away. Returns
/// the ids of the events acknowledged with 200.
async fn load(
    url: String,
    writers: usize,
    events_per_request: usize,
    prefix: &'static str,
) -> HashSet<String> {
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (url, acked) = (url.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for n in 0.. {
                let ids: Vec<String> = (0..events_per_request)
                    .map(|i| format!("{prefix}-{w}-{n}-{i}"))
                    .collect();
                let batch: Vec<_> = ids
                    .iter()
                    .map(|id| json!({"event": "load", "distinct_id": "u", "properties": {"k": id}}))
                    .collect();
                match client
                    .post(&url)
                    .json(&json!({"api_key": TOKEN, "batch": batch}))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => acked.lock().unwrap().extend(ids),
                    Ok(r) if r.status() == 503 => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Ok(r) => panic!("unexpected status {}", r.status()),
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
    let acked = acked.lock().unwrap().clone();
    acked
}

/// How many times each event id is stored.
fn stored_counts(sqlite: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for row in read_events(sqlite) {
        let k = row.properties["k"].as_str().expect("k property").to_owned();
        *counts.entry(k).or_insert(0) += 1;
    }
    counts
}

fn assert_each_acknowledged_event_stored_once(acked: &HashSet<String>, sqlite: &Path) {
    assert!(
        acked.len() > 100,
        "the load was real ({} acknowledged)",
        acked.len()
    );
    let counts = stored_counts(sqlite);
    let missing: Vec<_> = acked
        .iter()
        .filter(|k| !counts.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged events lost, for example {missing:?}"
    );
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(doubled.is_empty(), "events stored twice: {doubled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_event_and_duplicates_none() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    // Small sink batches so that kills also land between sink commits and queue trims.
    let env = [("SINK_BATCH_EVENTS", "50"), ("SINK_LINGER_MS", "0")];
    let mut all_acked = HashSet::new();
    for (round, prefix) in ["a", "b", "c"].into_iter().enumerate() {
        let app = Appliance::start(dir.path(), &env);
        let loader = tokio::spawn(load(app.url("/batch/"), 8, 10, prefix));
        tokio::time::sleep(Duration::from_millis(700 + 250 * round as u64)).await;
        app.kill9();
        all_acked.extend(loader.await.unwrap());
    }
    let app = Appliance::start(dir.path(), &env);
    app.wait_drained().await;
    assert_each_acknowledged_event_stored_once(&all_acked, &app.sqlite_path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_flushes_the_queue_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(dir.path(), &[("SINK_BATCH_EVENTS", "100")]);
    let loader = tokio::spawn(load(app.url("/batch/"), 8, 20, "t"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sqlite = app.sqlite_path();
    let status = tokio::task::spawn_blocking(move || app.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    // No restart: everything acknowledged is already in SQLite.
    assert_each_acknowledged_event_stored_once(&loader.await.unwrap(), &sqlite);
}
