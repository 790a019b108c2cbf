//! When the sink cannot take writes, capture keeps acknowledging (events wait durably in the
//! queue) and everything arrives once the sink is back. When the queue itself is saturated,
//! capture answers 503 with Retry-After instead of queueing without bound.

mod common;

use std::time::Duration;

use common::{create_team, read_events, Appliance, TOKEN};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_in_the_queue_while_the_sink_is_locked_and_arrive_after() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(dir.path(), &[]);
    let client = reqwest::Client::new();
    let send = |name: String| {
        let client = client.clone();
        let url = app.url("/batch/");
        async move {
            let body = json!({"api_key": TOKEN, "batch": [{"event": name, "distinct_id": "u"}]});
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(send("before".into()).await, 200);
    app.wait_drained().await;

    // Another process holds SQLite's write lock: the sink cannot commit.
    let sqlite = app.sqlite_path();
    let holder = rusqlite::Connection::open(&sqlite).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    for n in 0..20 {
        assert_eq!(
            send(format!("during-{n}")).await,
            200,
            "capture does not depend on the sink"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready: Value = client
        .get(app.url("/_ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        ready["queue"]["last_seq"].as_u64() > ready["sink"]["position"].as_u64(),
        "the events are queued, not yet in the sink: {ready}"
    );
    holder.execute_batch("ROLLBACK").unwrap();
    drop(holder);

    app.wait_drained().await;
    let names: Vec<String> = read_events(&sqlite).into_iter().map(|r| r.event).collect();
    assert_eq!(names.len(), 21);
    assert!(
        (0..20).all(|n| names.contains(&format!("during-{n}"))),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_ingest_queue_answers_503_with_retry_after_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(
        dir.path(),
        &[
            ("INGEST_CHANNEL_CAPACITY", "1"),
            ("INGEST_COMMIT_MAX_REQUESTS", "1"),
        ],
    );
    let client = reqwest::Client::new();
    let mut requests = Vec::new();
    for n in 0..300 {
        let (client, url) = (client.clone(), app.url("/e/"));
        requests.push(tokio::spawn(async move {
            let body = json!({"event": "burst", "distinct_id": "u", "token": TOKEN, "properties": {"n": n}});
            let r = client.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let body: Value = r.json().await.unwrap();
            (n, status, retry_after, body)
        }));
    }
    let mut acked = Vec::new();
    let mut refused = 0;
    for r in requests {
        let (n, status, retry_after, body) = r.await.unwrap();
        match status {
            200 => acked.push(n),
            503 => {
                refused += 1;
                assert_eq!(retry_after.as_deref(), Some("1"));
                assert_eq!(body["code"], "retry_later", "{body}");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(
        refused > 0,
        "300 simultaneous requests against a queue of one are partly refused"
    );
    assert!(!acked.is_empty());
    app.wait_drained().await;
    let mut stored: Vec<i64> = read_events(&app.sqlite_path())
        .iter()
        .map(|r| r.properties["n"].as_i64().unwrap())
        .collect();
    stored.sort();
    acked.sort();
    assert_eq!(stored, acked, "exactly the acknowledged events are stored");
}
