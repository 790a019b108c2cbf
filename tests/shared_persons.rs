//! Persons shared by two boxes through one real Postgres (`SHARED_PERSONS`), at the HTTP
//! front: a merge of two ids whose persons live on two boxes holds on both, two boxes changing
//! one person at the same moment both keep their change, and group types and groups are one
//! set across boxes. (Two boxes in one Kafka group sharing persons through rebalances:
//! `tests/more_than_one_box.rs`.)

mod common;

use common::pg::PgServer;
use common::{cli, create_team, post_batch, send_batch, Appliance, TOKEN};
use serde_json::{json, Value};
use std::time::Duration;

/// One shared Postgres and two boxes' data directories with the same team.
struct TwoBoxes {
    _pg: PgServer,
    url: String,
    db: tokio_postgres::Client,
    dir_a: tempfile::TempDir,
    dir_b: tempfile::TempDir,
    team: u64,
}

impl TwoBoxes {
    async fn new() -> TwoBoxes {
        let pg = PgServer::start();
        let url = pg.create_database("shared").await;
        let db = pg.client("shared").await;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let team = create_team(dir_a.path(), "t", TOKEN);
        assert_eq!(create_team(dir_b.path(), "t", TOKEN), team);
        TwoBoxes {
            _pg: pg,
            url,
            db,
            dir_a,
            dir_b,
            team,
        }
    }

    /// Starts box `node` ("a" or "b") on its own directory, with `extra` settings.
    fn start(&self, node: &'static str, extra: &[(&'static str, &'static str)]) -> Appliance {
        let dir = if node == "a" {
            &self.dir_a
        } else {
            &self.dir_b
        };
        let mut env = vec![
            ("SINKS", "postgres"),
            ("DATABASE_URL", self.url.as_str()),
            ("NODE_ID", node),
            ("SHARED_PERSONS", "true"),
            ("SINK_LINGER_MS", "0"),
        ];
        env.extend_from_slice(extra);
        Appliance::start(dir.path(), &env)
    }
}

/// PostHog's person uuid for a distinct id of team `team`.
fn person_uuid(team: u64, distinct_id: &str) -> uuid::Uuid {
    let namespace = uuid::Uuid::parse_str("932979b4-65c3-4424-8467-0b66ec27bc22").unwrap();
    uuid::Uuid::new_v5(&namespace, format!("{team}:{distinct_id}").as_bytes())
}

fn event(name: &str, distinct_id: &str, properties: Value) -> Value {
    json!({"event": name, "distinct_id": distinct_id, "properties": properties,
           "uuid": uuid::Uuid::now_v7().to_string()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shared_persons_a_merge_made_on_one_box_holds_on_the_other() {
    let two = TwoBoxes::new().await;
    let (db, team, dir_b) = (&two.db, two.team, two.dir_b.path());
    let box_a = two.start("a", &[]);
    let box_b = two.start("b", &[]);

    // Each id's person is made on a box of its own (Kafka would put the two ids on partitions
    // of different boxes).
    let on_b = event("$pageview", "anon-1", json!({"$set": {"device": "phone"}}));
    send_batch(&box_b, TOKEN, vec![on_b]).await;
    let on_a = event("$pageview", "user-1", json!({"$set": {"plan": "pro"}}));
    send_batch(&box_a, TOKEN, vec![on_a]).await;
    // Box A merges them: it takes anon-1's person from the shared store, so the merged person
    // has both boxes' properties and anon-1's person is gone.
    let identify = event(
        "$identify",
        "user-1",
        json!({"$anon_distinct_id": "anon-1", "$set": {"email": "one@example.com"}}),
    );
    send_batch(&box_a, TOKEN, vec![identify]).await;
    // Box B sees anon-1 again: it must follow the merge made on A, not its own old person.
    let again = event("$pageview", "anon-1", json!({"$set": {"seen_again": true}}));
    let again_uuid = again["uuid"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .unwrap();
    send_batch(&box_b, TOKEN, vec![again]).await;

    let survivor = person_uuid(team, "user-1");
    let row = db
        .query_one(
            "SELECT person_id, person_properties::text FROM posthog_event WHERE uuid = $1",
            &[&again_uuid],
        )
        .await
        .expect("box B's event stored");
    let (person_id, person_properties): (Option<uuid::Uuid>, String) = (row.get(0), row.get(1));
    let person_properties: Value = serde_json::from_str(&person_properties).unwrap();
    assert_eq!(
        person_id,
        Some(survivor),
        "box B's event is the merged person's"
    );
    for key in ["device", "plan", "email", "seen_again"] {
        assert!(
            person_properties.get(key).is_some(),
            "{key} in {person_properties}"
        );
    }
    let persons = db
        .query(
            "SELECT uuid, properties::text, version FROM posthog_person WHERE team_id = $1",
            &[&(team as i64)],
        )
        .await
        .unwrap();
    assert_eq!(
        persons.len(),
        1,
        "one person for the two ids, on both boxes"
    );
    assert_eq!(persons[0].get::<_, uuid::Uuid>(0), survivor);
    let properties: Value = serde_json::from_str(persons[0].get(1)).unwrap();
    assert_eq!(
        (
            &properties["device"],
            &properties["plan"],
            &properties["email"],
            &properties["seen_again"]
        ),
        (
            &json!("phone"),
            &json!("pro"),
            &json!("one@example.com"),
            &json!(true)
        )
    );
    let ids = db
        .query(
            "SELECT d.distinct_id, p.uuid FROM posthog_persondistinctid d
             JOIN posthog_person p ON p.id = d.person_id WHERE d.team_id = $1
             ORDER BY d.distinct_id",
            &[&(team as i64)],
        )
        .await
        .unwrap();
    let ids: Vec<(String, uuid::Uuid)> = ids.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        ids,
        vec![
            ("anon-1".to_owned(), survivor),
            ("user-1".to_owned(), survivor)
        ]
    );
    // Box B's own state follows too: its old person of anon-1 is gone, as on A.
    let shown = cli(
        dir_b,
        &[
            "persons",
            "show",
            "--team",
            &team.to_string(),
            "anon-1",
            "--json",
        ],
    );
    let shown: Value = serde_json::from_str(&shown).unwrap_or_else(|e| panic!("{e}: {shown}"));
    assert_eq!(shown["person"]["uuid"], survivor.to_string());
    assert!(
        box_b.metric("appliance_persons_imported_total").await >= 1.0,
        "box B counts its import"
    );
    assert!(box_b.terminate().success());
    assert!(box_a.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shared_persons_two_boxes_changing_one_person_at_once_both_keep_their_change() {
    let two = TwoBoxes::new().await;
    let (db, team) = (&two.db, two.team);
    // Box A holds each of its writes for 4 s after its person step: box B writes in between.
    let box_a = two.start(
        "a",
        &[(
            "APPLIANCE_FAILPOINTS",
            "pipeline.before_sink_write=pause:4000",
        )],
    );
    let box_b = two.start("b", &[]);

    let first = event("$pageview", "u", json!({"$set": {"first": true}}));
    send_batch(&box_b, TOKEN, vec![first]).await;
    // A reads the person (version 0) and makes version 1 with its change, then holds the write.
    let on_a = event("$pageview", "u", json!({"$set": {"from_a": true}}));
    let on_a_uuid = on_a["uuid"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .unwrap();
    assert_eq!(post_batch(&box_a, TOKEN, vec![on_a]).await, 200);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Meanwhile B makes its own version 1 of the same person, and writes it first.
    let on_b = event("$pageview", "u", json!({"$set": {"from_b": true}}));
    send_batch(&box_b, TOKEN, vec![on_b]).await;
    // A's write over version 1 is turned down; A makes its step again over B's version.
    box_a.wait_drained().await;

    let person = db
        .query_one(
            "SELECT properties::text, version FROM posthog_person WHERE team_id = $1 AND uuid = $2",
            &[&(team as i64), &person_uuid(team, "u")],
        )
        .await
        .expect("u's person");
    let properties: Value = serde_json::from_str(person.get(0)).unwrap();
    assert_eq!(
        (
            &properties["first"],
            &properties["from_a"],
            &properties["from_b"]
        ),
        (&json!(true), &json!(true), &json!(true)),
        "both boxes' changes kept: {properties}"
    );
    assert_eq!(person.get::<_, i64>(1), 2, "one version per change");
    let row = db
        .query_one(
            "SELECT person_properties::text FROM posthog_event WHERE uuid = $1",
            &[&on_a_uuid],
        )
        .await
        .expect("A's event stored once");
    let on_row: Value = serde_json::from_str(row.get(0)).unwrap();
    assert_eq!(
        on_row["from_b"], true,
        "A's event was made again over B's change"
    );
    assert!(
        box_a.metric("appliance_person_conflicts_total").await >= 1.0,
        "box A's write was turned down"
    );
    assert!(box_b.terminate().success());
    assert!(box_a.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shared_persons_group_types_and_groups_are_one_set_across_boxes() {
    let two = TwoBoxes::new().await;
    let (db, team) = (&two.db, two.team);
    let box_a = two.start("a", &[]);
    let box_b = two.start("b", &[]);

    // A gives index 0 to "company" and sets the group's plan.
    let on_a = vec![event(
        "$groupidentify",
        "admin-a",
        json!({"$group_type": "company", "$group_key": "acme", "$group_set": {"plan": "pro"}}),
    )];
    send_batch(&box_a, TOKEN, on_a).await;
    // B's first group type is "project": index 1, since A took 0; and B's change to acme keeps
    // A's plan.
    let in_project = event("$pageview", "user-b", json!({"$groups": {"project": "p1"}}));
    let in_project_uuid = in_project["uuid"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .unwrap();
    let seats = event(
        "$groupidentify",
        "admin-b",
        json!({"$group_type": "company", "$group_key": "acme", "$group_set": {"seats": 10}}),
    );
    send_batch(&box_b, TOKEN, vec![in_project, seats]).await;

    let types = db
        .query(
            "SELECT group_type, group_type_index FROM posthog_grouptypemapping
             WHERE team_id = $1 ORDER BY group_type_index",
            &[&(team as i64)],
        )
        .await
        .unwrap();
    let types: Vec<(String, i32)> = types.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(types, vec![("company".into(), 0), ("project".into(), 1)]);
    let row = db
        .query_one(
            "SELECT properties::text FROM posthog_event WHERE uuid = $1",
            &[&in_project_uuid],
        )
        .await
        .unwrap();
    let properties: Value = serde_json::from_str(row.get(0)).unwrap();
    assert_eq!(properties["$group_1"], "p1", "{properties}");
    assert!(properties.get("$group_0").is_none(), "{properties}");
    let acme = db
        .query_one(
            "SELECT group_properties::text, version FROM posthog_group
             WHERE team_id = $1 AND group_key = 'acme' AND group_type_index = 0",
            &[&(team as i64)],
        )
        .await
        .unwrap();
    let acme_properties: Value = serde_json::from_str(acme.get(0)).unwrap();
    assert_eq!(acme_properties, json!({"plan": "pro", "seats": 10}));
    assert_eq!(acme.get::<_, i64>(1), 2);
    assert!(box_b.terminate().success());
    assert!(box_a.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shared_persons_a_person_with_more_ids_than_are_read_is_still_found_by_each() {
    let two = TwoBoxes::new().await;
    let (db, team) = (&two.db, two.team);
    let box_a = two.start("a", &[]);
    // The tables exist once the box has written.
    send_batch(&box_a, TOKEN, vec![event("$pageview", "first", json!({}))]).await;
    // Another box's person with 10,050 ids: more than one person's ids are read.
    let big = person_uuid(team, "id-0");
    db.batch_execute(&format!(
        "INSERT INTO posthog_person (created_at, properties, team_id, is_identified, uuid, version)
         VALUES (now(), '{{\"plan\": \"pro\"}}', {team}, true, '{big}', 7);
         INSERT INTO posthog_persondistinctid (team_id, person_id, distinct_id, version)
         SELECT {team}, p.id, 'id-' || n, 0 FROM posthog_person p, generate_series(0, 10049) n
         WHERE p.uuid = '{big}';"
    ))
    .await
    .unwrap();
    // An event of its last id is that person's, as any of its ids would be.
    let last = event("$pageview", "id-10049", json!({"$set": {"seen": true}}));
    let last_uuid = last["uuid"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .unwrap();
    send_batch(&box_a, TOKEN, vec![last]).await;
    let row = db
        .query_one(
            "SELECT person_id FROM posthog_event WHERE uuid = $1",
            &[&last_uuid],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<uuid::Uuid>>(0), Some(big));
    let person = db
        .query_one(
            "SELECT properties::text, version FROM posthog_person WHERE uuid = $1",
            &[&big],
        )
        .await
        .unwrap();
    let properties: Value = serde_json::from_str(person.get(0)).unwrap();
    assert_eq!(
        (&properties["plan"], &properties["seen"]),
        (&json!("pro"), &json!(true))
    );
    assert_eq!(person.get::<_, i64>(1), 8);
    assert!(box_a.terminate().success());
}
