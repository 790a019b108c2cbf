//! Nothing acknowledged is ever lost or stored twice: not across SIGKILL at an arbitrary moment
//! under load, and not across SIGTERM, which must flush the queue to the sink and exit 0.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{create_team, read_events, Appliance, TOKEN};
use serde_json::json;

/// Sends batches of events without uuids (so the server assigns them and a replay could only be
/// caught by the queue positions) from several connections until told to stop or the server
/// goes away. Returns the ids of events acknowledged with 200.
async fn load(
    url: String,
    writers: usize,
    events_per_request: usize,
    stop: Arc<tokio::sync::Notify>,
    prefix: &'static str,
) -> HashSet<String> {
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (url, acked, stop) = (url.clone(), acked.clone(), stop.clone());
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
                let send = client
                    .post(&url)
                    .json(&json!({"api_key": TOKEN, "batch": batch}))
                    .send();
                let result = tokio::select! {
                    r = send => r,
                    _ = stop.notified() => return,
                };
                match result {
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

fn stored_counts(app_sqlite: &std::path::Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for row in read_events(app_sqlite) {
        let k = row.properties["k"].as_str().expect("k property").to_owned();
        *counts.entry(k).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_event_and_duplicates_none() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    // Small sink batches so that kills also land between sink commits and queue trims.
    let env = [("SINK_BATCH_EVENTS", "50")];
    let mut all_acked = HashSet::new();
    for round in 0..3u64 {
        let app = Appliance::start(dir.path(), &env);
        let stop = Arc::new(tokio::sync::Notify::new());
        let loader = tokio::spawn(load(
            app.url("/batch/"),
            8,
            10,
            stop.clone(),
            ["a", "b", "c"][round as usize],
        ));
        tokio::time::sleep(Duration::from_millis(700 + 250 * round)).await;
        app.kill9();
        let acked = loader.await.unwrap();
        assert!(
            acked.len() > 100,
            "round {round}: the load was real ({} acknowledged)",
            acked.len()
        );
        all_acked.extend(acked);
    }
    let app = Appliance::start(dir.path(), &env);
    app.wait_drained().await;
    let counts = stored_counts(&app.sqlite_path());
    let missing: Vec<_> = all_acked
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
async fn sigterm_drains_in_flight_requests_flushes_the_queue_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(dir.path(), &[("SINK_BATCH_EVENTS", "100")]);
    let stop = Arc::new(tokio::sync::Notify::new());
    let loader = tokio::spawn(load(app.url("/batch/"), 8, 20, stop.clone(), "t"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sqlite = app.sqlite_path();
    let status = tokio::task::spawn_blocking(move || app.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let acked = loader.await.unwrap();
    assert!(
        acked.len() > 100,
        "the load was real ({} acknowledged)",
        acked.len()
    );
    // No restart: everything acknowledged is already in SQLite.
    let counts = stored_counts(&sqlite);
    let missing: Vec<_> = acked
        .iter()
        .filter(|k| !counts.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged events not flushed before exit, for example {missing:?}"
    );
    assert!(counts.values().all(|n| *n == 1), "no event stored twice");
}
