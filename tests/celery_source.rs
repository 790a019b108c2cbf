//! The Celery source against a real `redis-server`, fed by the real `celery` package sending
//! PostHog's `process_event_with_plugins` tasks as PostHog's Django did: every task becomes one
//! stored event, a message that cannot be read goes to the dead-letter list with the reason,
//! and a kill between durability and acknowledgement takes the message again without storing
//! it twice. PostHog's `plugin_job` tasks (its app's "run job" button) queue the plugin
//! config's job once, however often the task is delivered.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{
    cli, create_team, enable_plugin, install_plugin, read_events, sdk_dir, storage, wait_storage,
    wait_stored, Appliance, TOKEN,
};
use redis::Commands;
use serde_json::Value;

const QUEUE: &str = "posthog-plugins";

/// Sends `count` tasks numbered from `first` with Celery's task protocol `protocol`.
fn send_tasks(redis: &RedisServer, team: u64, count: usize, protocol: u8, first: usize) {
    let out = Command::new("python3")
        .arg(sdk_dir().join("celery_send.py"))
        .args([
            redis.url(),
            QUEUE.into(),
            team.to_string(),
            count.to_string(),
            protocol.to_string(),
            first.to_string(),
        ])
        .output()
        .expect("run python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'celery'"),
        "the celery package is not installed: pip install -r tests/sdk/requirements.txt"
    );
    assert!(out.status.success(), "celery_send.py failed: {stderr}");
}

/// The appliance on `dir`, consuming the Celery queue in `redis`.
fn start_consuming(dir: &std::path::Path, redis: &RedisServer) -> Appliance {
    Appliance::start(dir, &[("REDIS_URL", redis.url().as_str())])
}

fn list(con: &mut redis::Connection, key: &str) -> Vec<String> {
    con.lrange(key, 0, -1).expect("LRANGE")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sent_by_the_real_celery_package_become_events_and_bad_ones_dead_letters() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "t", TOKEN);
    let app = start_consuming(dir.path(), &redis);
    tokio::task::block_in_place(|| {
        send_tasks(&redis, team, 40, 2, 0);
        send_tasks(&redis, team, 10, 1, 40);
        send_tasks(&redis, team + 100, 1, 2, 50);
    });
    let mut con = redis.connection();
    let _: () = con.lpush(QUEUE, "not a celery message").unwrap();
    let rows = wait_stored(&app, 50).await;
    assert_eq!(rows.len(), 50, "one event per task, protocols 2 and 1");
    let mut seen: Vec<i64> = rows
        .iter()
        .map(|r| r.properties["i"].as_i64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
    let first = rows.iter().find(|r| r.properties["i"] == 0).unwrap();
    assert_eq!(first.event, "celery event");
    assert_eq!(first.distinct_id, "user0");
    assert_eq!(first.properties["$ip"], "1.2.3.4", "the task's ip");
    // PostHog's clock-skew rule with the task's `now` (one second before its `sent_at`), not
    // the consumer's clock.
    assert_eq!(first.timestamp, "2026-11-02T09:59:59.000000Z");

    let deadline = Instant::now() + Duration::from_secs(10);
    let dead = loop {
        let dead = list(&mut con, &format!("{QUEUE}.appliance.dead"));
        if dead.len() >= 2 || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["reason"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("not a JSON message")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(&format!("no team {}", team + 100))),
        "{reasons:?}"
    );
    assert!(list(&mut con, QUEUE).is_empty());
    assert!(list(&mut con, &format!("{QUEUE}.appliance.processing")).is_empty());
    assert!(app.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_before_the_acknowledgement_takes_the_messages_again_and_stores_each_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "t", TOKEN);
    let url = redis.url();
    let mut env = vec![("REDIS_URL", url.as_str())];
    tokio::task::block_in_place(|| send_tasks(&redis, team, 30, 2, 0));
    env.push(("APPLIANCE_FAILPOINTS", "celery.before_ack"));
    let mut crashing = Appliance::start(dir.path(), &env);
    assert!(
        !crashing.wait_exit(Duration::from_secs(30)).success(),
        "aborted after the batches were durable"
    );
    let mut con = redis.connection();
    let left = list(&mut con, &format!("{QUEUE}.appliance.processing"));
    assert!(
        !left.is_empty(),
        "messages were left in the processing list"
    );
    env.pop();

    let app = Appliance::start(dir.path(), &env);
    tokio::task::block_in_place(|| send_tasks(&redis, team, 5, 2, 30));
    let rows = wait_stored(&app, 35).await;
    app.wait_drained().await;
    let rows = if rows.len() < 35 {
        read_events(&app.sqlite_path())
    } else {
        rows
    };
    let mut seen: Vec<i64> = rows
        .iter()
        .map(|r| r.properties["i"].as_i64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..35).collect::<Vec<_>>(), "each task once");
    assert!(list(&mut con, &format!("{QUEUE}.appliance.processing")).is_empty());
    assert!(list(&mut con, QUEUE).is_empty());
}

/// Sends one `plugin_job` task as PostHog's Django sent it; answers the task id.
fn send_job(redis: &RedisServer, team: &str, config: u64, name: &str, op: &str, payload: &str) {
    let out = Command::new("python3")
        .arg(sdk_dir().join("celery_job.py"))
        .args([
            &redis.url(),
            QUEUE,
            team,
            &config.to_string(),
            name,
            op,
            payload,
        ])
        .output()
        .expect("run python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "celery_job.py failed: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_s_plugin_job_tasks_queue_the_config_s_job_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "lab", TOKEN).to_string();
    install_plugin(dir.path(), "tests/job-lab", "job_lab.wasm");
    enable_plugin(dir.path(), &team, "Job Lab", &[]);
    // "  config 1 team 1 enabled order 0", as `plugin list` prints it.
    let config: u64 = cli(dir.path(), &["plugin", "list"])
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("config ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .expect("the config's id");
    tokio::task::block_in_place(|| {
        send_job(&redis, &team, config, "record", "start", r#"{"a": 1}"#);
        send_job(&redis, &team, config, "record", "stop", "{}");
        send_job(&redis, &team, config + 50, "record", "start", "{}");
    });
    // Redis delivered the first task twice (a consumer crashed before acknowledging it).
    let mut con = redis.connection();
    let first: Vec<String> = con.lrange(QUEUE, -1, -1).unwrap();
    let _: () = con.rpush(QUEUE, &first[0]).unwrap();
    let app = start_consuming(dir.path(), &redis);
    let recorded = |s: &std::collections::HashMap<String, String>| -> Vec<Value> {
        s.iter()
            .filter(|(k, _)| k.starts_with("recorded:"))
            .map(|(_, v)| serde_json::from_str(v).unwrap())
            .collect()
    };
    wait_storage(dir.path(), &team, "Job Lab", "two recorded jobs", |s| {
        recorded(s).len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // One job per task: the task delivered twice ran once.
    let payloads = recorded(&storage(dir.path(), &team, "Job Lab"));
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    assert!(
        payloads.contains(&serde_json::json!({"a": 1, "$operation": "start"})),
        "{payloads:?}"
    );
    assert!(
        payloads.contains(&serde_json::json!({"$operation": "stop"})),
        "{payloads:?}"
    );
    let dead = list(&mut con, &format!("{QUEUE}.appliance.dead"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].contains(&format!(
            "no enabled plugin config {} of team {team}",
            config + 50
        )),
        "{dead:?}"
    );
    assert!(list(&mut con, &format!("{QUEUE}.appliance.processing")).is_empty());
    assert!(app.terminate().success());
}
