//! Persons, distinct ids, group types and groups written into PostHog's Postgres tables inside
//! the write's own transaction, one statement per kind of change (arrays unnested by the server,
//! so a write costs the same few round trips however many persons it changes).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::statement_error;
use super::text::{json_safe, text_safe};
use crate::person::{PersonChange, PersonUpdates};
use crate::sinks::{SinkError, PERSON_UPSERT};

type Tx<'a> = deadpool_postgres::Transaction<'a>;

fn json(map: &Map<String, Value>) -> String {
    let text = serde_json::to_string(map).unwrap_or_else(|_| "{}".into());
    json_safe(&text).into_owned()
}

async fn run(
    tx: &Tx<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(), SinkError> {
    let statement = tx.prepare_cached(sql).await.map_err(statement_error)?;
    tx.execute(&statement, params)
        .await
        .map_err(statement_error)?;
    Ok(())
}

/// Writes `updates`. A row already newer than the change (a replay) is left alone. When boxes
/// share their persons here (`shared`), every change must also be made over the version its
/// step read: a person, distinct id or group another box has moved to the same or a higher
/// version (unless it is this very change, replayed), a person to delete that another box
/// changed or gave an id this box does not know, or a group type index another box gave to
/// another type, fails the whole write with [`SinkError::Conflict`].
pub(super) async fn write(
    tx: &Tx<'_>,
    updates: &PersonUpdates,
    shared: bool,
) -> Result<(), SinkError> {
    if !updates.touches_sinks() {
        return Ok(());
    }
    // Survivors first, then the ids moved to them, so that a merged person is deleted only
    // once nothing this write knows points at it.
    write_persons(tx, updates, shared).await?;
    write_distinct_ids(tx, updates, shared).await?;
    delete_persons(tx, updates, shared).await?;
    write_groups(tx, updates, shared).await
}

fn conflict(what: &str, keys: impl IntoIterator<Item = String>) -> SinkError {
    let keys: Vec<String> = keys.into_iter().take(5).collect();
    SinkError::Conflict {
        sink: super::NAME,
        detail: format!(
            "{what} changed by another box since this step read them ({}): the step is made again",
            keys.join(", ")
        ),
    }
}

/// Runs `sql`, an upsert. When `shared`, it runs with `RETURNING key`, and fails with a
/// conflict unless every one of `keys` came back (a row left alone by the upsert's condition was
/// changed by another box); otherwise nothing is sent back.
async fn run_checked(
    tx: &Tx<'_>,
    sql: &str,
    key: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    shared: bool,
    what: &str,
    keys: &[String],
) -> Result<(), SinkError> {
    if !shared {
        return run(tx, sql, params).await;
    }
    let statement = tx
        .prepare_cached(&format!("{sql} RETURNING {key}"))
        .await
        .map_err(statement_error)?;
    let rows = tx
        .query(&statement, params)
        .await
        .map_err(statement_error)?;
    all_back(&rows, what, keys)
}

/// A conflict unless the first column of `rows` holds every one of `keys`.
fn all_back(rows: &[tokio_postgres::Row], what: &str, keys: &[String]) -> Result<(), SinkError> {
    if rows.len() >= keys.len() {
        return Ok(());
    }
    let back: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    Err(conflict(
        what,
        keys.iter().filter(|k| !back.contains(*k)).cloned(),
    ))
}

async fn write_persons(
    tx: &Tx<'_>,
    updates: &PersonUpdates,
    shared: bool,
) -> Result<(), SinkError> {
    let mut upserts = PersonColumns::default();
    for ((team, _), change) in &updates.persons {
        if let PersonChange::Upsert(person) = change {
            upserts.created_at.push(person.created_at);
            upserts
                .last_updated_at
                .push(json(&person.properties_last_updated_at));
            upserts
                .last_operation
                .push(json(&person.properties_last_operation));
            upserts.team.push(*team as i64);
            upserts.properties.push(json(&person.properties));
            upserts.is_identified.push(person.is_identified);
            upserts.uuid.push(person.uuid);
            upserts.version.push(person.version as i64);
        }
    }
    if upserts.uuid.is_empty() {
        return Ok(());
    }
    let condition = if shared { SHARED_PERSON_CONDITION } else { "" };
    let keys: Vec<String> = upserts.uuid.iter().map(Uuid::to_string).collect();
    run_checked(
        tx,
        &format!(
            "INSERT INTO posthog_person (created_at, properties_last_updated_at,
                properties_last_operation, team_id, properties, is_identified, uuid, version)
             SELECT u.created_at, u.updated::jsonb, u.operation::jsonb, u.team_id,
                u.properties::jsonb, u.identified, u.uuid, u.version
             FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::int8[], $5::text[],
                $6::bool[], $7::uuid[], $8::int8[])
                AS u(created_at, updated, operation, team_id, properties, identified, uuid,
                version)
             {PERSON_UPSERT}{condition}"
        ),
        "uuid::text",
        &[
            &upserts.created_at,
            &upserts.last_updated_at,
            &upserts.last_operation,
            &upserts.team,
            &upserts.properties,
            &upserts.is_identified,
            &upserts.uuid,
            &upserts.version,
        ],
        shared,
        "persons",
        &keys,
    )
    .await
}

/// In a shared person store, a person is written over a lower version only, or over the same
/// version with the same properties (this write again, after a crash).
const SHARED_PERSON_CONDITION: &str = "
    AND (excluded.version > coalesce(posthog_person.version, 0)
         OR excluded.properties = posthog_person.properties)";

async fn delete_persons(
    tx: &Tx<'_>,
    updates: &PersonUpdates,
    shared: bool,
) -> Result<(), SinkError> {
    let (mut teams, mut uuids, mut versions) = (Vec::new(), Vec::new(), Vec::new());
    for ((team, uuid), change) in &updates.persons {
        if let PersonChange::Deleted { version } = change {
            teams.push(*team as i64);
            uuids.push(*uuid);
            versions.push(*version as i64);
        }
    }
    if uuids.is_empty() {
        return Ok(());
    }
    let gone: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&teams, &uuids, &versions];
    if shared {
        // Every row to delete is locked first: an id another box adds takes a share lock on its
        // person and waits. Then, in a statement of its own (which sees all that committed
        // before the lock), each is judged: changed since the step, or still named by an id.
        run(
            tx,
            "SELECT 1 FROM posthog_person p
             JOIN unnest($1::int8[], $2::uuid[], $3::int8[]) AS u(team_id, uuid, version)
               ON p.team_id = u.team_id AND p.uuid = u.uuid
             FOR UPDATE OF p",
            &gone,
        )
        .await?;
        let statement = tx
            .prepare_cached(
                "SELECT p.uuid::text FROM posthog_person p
                 JOIN unnest($1::int8[], $2::uuid[], $3::int8[]) AS u(team_id, uuid, version)
                   ON p.team_id = u.team_id AND p.uuid = u.uuid
                 WHERE coalesce(p.version, 0) > u.version
                    OR EXISTS (SELECT 1 FROM posthog_persondistinctid d WHERE d.person_id = p.id)",
            )
            .await
            .map_err(statement_error)?;
        let moved = tx.query(&statement, &gone).await.map_err(statement_error)?;
        if !moved.is_empty() {
            return Err(conflict(
                "persons to delete",
                moved.iter().map(|r| r.get::<_, String>(0)),
            ));
        }
    }
    // Ids this write moved are pointed elsewhere already; the rest are freed with the person,
    // as PostHog's delete does (in a shared store there are none left: see above).
    run(
        tx,
        "DELETE FROM posthog_persondistinctid d USING posthog_person p,
            unnest($1::int8[], $2::uuid[], $3::int8[]) AS u(team_id, uuid, version)
         WHERE p.team_id = u.team_id AND p.uuid = u.uuid AND d.person_id = p.id",
        &gone,
    )
    .await?;
    run(
        tx,
        "DELETE FROM posthog_person p
         USING unnest($1::int8[], $2::uuid[], $3::int8[]) AS u(team_id, uuid, version)
         WHERE p.team_id = u.team_id AND p.uuid = u.uuid",
        &gone,
    )
    .await
}

/// The columns of the persons one write upserts.
#[derive(Default)]
struct PersonColumns {
    created_at: Vec<DateTime<Utc>>,
    last_updated_at: Vec<String>,
    last_operation: Vec<String>,
    team: Vec<i64>,
    properties: Vec<String>,
    is_identified: Vec<bool>,
    uuid: Vec<Uuid>,
    version: Vec<i64>,
}

async fn write_distinct_ids(
    tx: &Tx<'_>,
    updates: &PersonUpdates,
    shared: bool,
) -> Result<(), SinkError> {
    let (mut teams, mut persons, mut ids, mut versions) = (vec![], vec![], vec![], vec![]);
    let (mut freed_teams, mut freed_ids) = (vec![], vec![]);
    for ((team, id), now) in &updates.distinct_ids {
        let id = text_safe(id).into_owned();
        match now {
            Some(now) => {
                teams.push(*team as i64);
                persons.push(now.person);
                ids.push(id);
                versions.push(now.version as i64);
            }
            None => {
                freed_teams.push(*team as i64);
                freed_ids.push(id);
            }
        }
    }
    if !ids.is_empty() {
        // Shared: over a lower version only, or the same version on the same person (a replay).
        let condition = if shared {
            "excluded.version > coalesce(posthog_persondistinctid.version, 0)
             OR (excluded.version = coalesce(posthog_persondistinctid.version, 0)
                 AND excluded.person_id = posthog_persondistinctid.person_id)"
        } else {
            "excluded.version >= coalesce(posthog_persondistinctid.version, 0)"
        };
        run_checked(
            tx,
            &format!(
                "INSERT INTO posthog_persondistinctid (team_id, person_id, distinct_id, version)
                 SELECT u.team_id, p.id, u.distinct_id, u.version
                 FROM unnest($1::int8[], $2::uuid[], $3::text[], $4::int8[])
                    AS u(team_id, person, distinct_id, version)
                 JOIN posthog_person p ON p.team_id = u.team_id AND p.uuid = u.person
                 ON CONFLICT (team_id, distinct_id) DO UPDATE SET
                    person_id = excluded.person_id, version = excluded.version
                 WHERE {condition}"
            ),
            "distinct_id",
            &[&teams, &persons, &ids, &versions],
            shared,
            "distinct ids",
            &ids,
        )
        .await?;
    }
    if !freed_ids.is_empty() {
        run(
            tx,
            "DELETE FROM posthog_persondistinctid d
             USING unnest($1::int8[], $2::text[]) AS u(team_id, distinct_id)
             WHERE d.team_id = u.team_id AND d.distinct_id = u.distinct_id",
            &[&freed_teams, &freed_ids],
        )
        .await?;
    }
    Ok(())
}

async fn write_groups(tx: &Tx<'_>, updates: &PersonUpdates, shared: bool) -> Result<(), SinkError> {
    if !updates.group_types.is_empty() {
        let (mut teams, mut names, mut indexes) = (vec![], vec![], vec![]);
        for ((team, name), index) in &updates.group_types {
            teams.push(*team as i64);
            names.push(text_safe(name).into_owned());
            indexes.push(i32::from(*index));
        }
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&teams, &names, &indexes];
        run(
            tx,
            "INSERT INTO posthog_grouptypemapping (team_id, group_type, group_type_index)
             SELECT * FROM unnest($1::int8[], $2::text[], $3::int4[])
             ON CONFLICT DO NOTHING",
            &params,
        )
        .await?;
        if shared {
            // Another box may have given the index to another type, or the type another index.
            let statement = tx
                .prepare_cached(
                    "SELECT m.group_type FROM unnest($1::int8[], $2::text[], $3::int4[])
                        AS u(team_id, group_type, group_type_index)
                     JOIN posthog_grouptypemapping m ON m.team_id = u.team_id
                        AND m.group_type = u.group_type
                        AND m.group_type_index = u.group_type_index",
                )
                .await
                .map_err(statement_error)?;
            let rows = tx
                .query(&statement, &params)
                .await
                .map_err(statement_error)?;
            all_back(&rows, "group types", &names)?;
        }
    }
    if updates.groups.is_empty() {
        return Ok(());
    }
    let (mut teams, mut keys, mut indexes, mut properties) = (vec![], vec![], vec![], vec![]);
    let (mut created, mut updated, mut operations, mut versions) = (vec![], vec![], vec![], vec![]);
    for ((team, index, key), group) in &updates.groups {
        teams.push(*team as i64);
        keys.push(text_safe(key).into_owned());
        indexes.push(i32::from(*index));
        properties.push(json(&group.properties));
        created.push(group.created_at);
        updated.push(json(&group.properties_last_updated_at));
        operations.push(json(&group.properties_last_operation));
        versions.push(group.version as i64);
    }
    // Shared: over a lower version only, or the same one with the same properties (a replay).
    let condition = if shared {
        "AND (excluded.version > posthog_group.version
              OR excluded.group_properties = posthog_group.group_properties)"
    } else {
        ""
    };
    run_checked(
        tx,
        &format!(
            "INSERT INTO posthog_group (team_id, group_key, group_type_index, group_properties,
                created_at, properties_last_updated_at, properties_last_operation, version)
             SELECT u.team_id, u.group_key, u.type_index, u.properties::jsonb, u.created_at,
                u.updated::jsonb, u.operation::jsonb, u.version
             FROM unnest($1::int8[], $2::text[], $3::int4[], $4::text[], $5::timestamptz[],
                $6::text[], $7::text[], $8::int8[])
                AS u(team_id, group_key, type_index, properties, created_at, updated, operation,
                version)
             ON CONFLICT (team_id, group_key, group_type_index) DO UPDATE SET
                group_properties = excluded.group_properties,
                properties_last_updated_at = excluded.properties_last_updated_at,
                properties_last_operation = excluded.properties_last_operation,
                version = excluded.version
             WHERE excluded.version >= posthog_group.version {condition}"
        ),
        "group_key",
        &[
            &teams,
            &keys,
            &indexes,
            &properties,
            &created,
            &updated,
            &operations,
            &versions,
        ],
        shared,
        "groups",
        &keys,
    )
    .await
}
