//! Beside a PostHog app: with `TEAMS_FROM_POSTGRES`, the teams and their tokens come from
//! PostHog's `posthog_team` (a real PostgreSQL seeded with PostHog's columns), and a change
//! there takes effect on PostHog's `reload-plugins` Redis message (a real redis-server).

mod common;

use std::time::{Duration, Instant};

use common::pg::PgServer;
use common::redis::RedisServer;
use common::{post_batch, read_events, Appliance};
use redis::Commands;
use serde_json::json;

/// PostHog's `posthog_team` with the columns its plugin server reads (a subset of Django's).
const POSTHOG_TEAM: &str = "
    CREATE TABLE posthog_team (
        id serial PRIMARY KEY,
        uuid uuid NOT NULL DEFAULT gen_random_uuid(),
        organization_id uuid NOT NULL DEFAULT gen_random_uuid(),
        api_token varchar(200) NOT NULL UNIQUE,
        name varchar(200) NOT NULL,
        anonymize_ips boolean NOT NULL DEFAULT false,
        app_urls varchar(200)[] NOT NULL DEFAULT '{}',
        ingested_event boolean NOT NULL DEFAULT false,
        session_recording_opt_in boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO posthog_team (id, api_token, name, anonymize_ips)
        VALUES (2, 'phc_posthogTeamTwo000001', 'web', false),
               (5, 'phc_posthogTeamFive00001', 'app', true);";

async fn status_until(app: &Appliance, token: &str, want: u16) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let event = json!({"event": "e", "distinct_id": "d", "properties": {"token_used": token}});
        let status = post_batch(app, token, vec![event]).await;
        if status == want || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_come_from_posthog_s_database_and_follow_its_reload_message() {
    let pg = PgServer::start();
    let url = pg.create_database("posthog").await;
    let db = pg.client("posthog").await;
    db.batch_execute(POSTHOG_TEAM).await.unwrap();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let redis_url = redis.url();
    let app = Appliance::start(
        dir.path(),
        &[
            ("DATABASE_URL", url.as_str()),
            ("TEAMS_FROM_POSTGRES", "true"),
            ("REDIS_URL", redis_url.as_str()),
            ("CELERY_SOURCE", "false"),
        ],
    );
    assert_eq!(
        status_until(&app, "phc_posthogTeamTwo000001", 200).await,
        200
    );
    assert_eq!(
        status_until(&app, "phc_posthogTeamFive00001", 200).await,
        200
    );
    app.wait_drained().await;
    let rows = read_events(&app.sqlite_path());
    let team_of = |token: &str| {
        rows.iter()
            .find(|r| r.properties["token_used"] == token)
            .map(|r| (r.team_id, r.properties.get("$ip").is_some()))
    };
    assert_eq!(
        team_of("phc_posthogTeamTwo000001"),
        Some((2, true)),
        "PostHog's id"
    );
    assert_eq!(
        team_of("phc_posthogTeamFive00001"),
        Some((5, false)),
        "PostHog's anonymize_ips"
    );
    let tables: Vec<String> = db
        .query(
            "SELECT tablename::text FROM pg_tables WHERE tablename = 'posthog_event'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        tables.is_empty(),
        "no events are written into PostHog's database"
    );

    // A token rotated in PostHog, then its reload message: the new one works, the old does not.
    db.batch_execute(
        "UPDATE posthog_team SET api_token = 'phc_posthogTeamTwoRotated' WHERE id = 2",
    )
    .await
    .unwrap();
    let mut con = redis.connection();
    let started = Instant::now();
    let _: i64 = con.publish("reload-plugins", "").unwrap();
    assert_eq!(
        status_until(&app, "phc_posthogTeamTwoRotated", 200).await,
        200
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the reload message, not the minute's refresh, brought the change"
    );
    assert_eq!(
        status_until(&app, "phc_posthogTeamTwo000001", 401).await,
        401
    );
}
