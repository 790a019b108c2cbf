//! Persons, distinct ids, group types and groups written into the SQLite sink's PostHog-shaped
//! tables, inside the write's own transaction (so they move with the events and the position).

use rusqlite::{params, Transaction};

use crate::event::timestamp_text;
use crate::person::{PersonChange, PersonUpdates};
use crate::sinks::PERSON_UPSERT;

/// Writes `updates`. A row already newer than the change (a replay) is left alone.
pub(super) fn write(tx: &Transaction<'_>, updates: &PersonUpdates) -> rusqlite::Result<()> {
    if !updates.touches_sinks() {
        return Ok(());
    }
    let text = |map: &serde_json::Map<String, serde_json::Value>| {
        serde_json::to_string(map).unwrap_or_else(|_| "{}".into())
    };
    {
        let mut upsert = tx.prepare_cached(&format!(
            "INSERT INTO posthog_person (created_at, properties_last_updated_at, properties_last_operation,
                team_id, properties, is_identified, uuid, version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) {PERSON_UPSERT}"
        ))?;
        let mut free_ids = tx.prepare_cached(
            "DELETE FROM posthog_persondistinctid WHERE person_id =
                (SELECT id FROM posthog_person WHERE team_id = ?1 AND uuid = ?2)",
        )?;
        let mut delete =
            tx.prepare_cached("DELETE FROM posthog_person WHERE team_id = ?1 AND uuid = ?2")?;
        for ((team, uuid), change) in &updates.persons {
            let uuid = uuid.to_string();
            match change {
                PersonChange::Upsert(person) => {
                    upsert.execute(params![
                        timestamp_text(person.created_at),
                        text(&person.properties_last_updated_at),
                        text(&person.properties_last_operation),
                        *team as i64,
                        text(&person.properties),
                        person.is_identified,
                        uuid,
                        person.version as i64,
                    ])?;
                }
                PersonChange::Deleted { .. } => {
                    // Ids moved to another person in this write are re-pointed below; the rest
                    // are freed with the person, as PostHog's delete does.
                    free_ids.execute(params![*team as i64, uuid])?;
                    delete.execute(params![*team as i64, uuid])?;
                }
            }
        }
    }
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO posthog_persondistinctid (team_id, person_id, distinct_id, version)
             SELECT ?1, id, ?3, ?4 FROM posthog_person WHERE team_id = ?1 AND uuid = ?2
             ON CONFLICT(team_id, distinct_id) DO UPDATE SET
                person_id = excluded.person_id, version = excluded.version
             WHERE excluded.version >= coalesce(posthog_persondistinctid.version, 0)",
        )?;
        let mut delete = tx.prepare_cached(
            "DELETE FROM posthog_persondistinctid WHERE team_id = ?1 AND distinct_id = ?2",
        )?;
        for ((team, id), now) in &updates.distinct_ids {
            match now {
                Some(now) => {
                    upsert.execute(params![
                        *team as i64,
                        now.person.to_string(),
                        id,
                        now.version as i64
                    ])?;
                }
                None => {
                    delete.execute(params![*team as i64, id])?;
                }
            }
        }
    }
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO posthog_grouptypemapping (team_id, group_type, group_type_index)
             VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )?;
        for ((team, name), index) in &updates.group_types {
            insert.execute(params![*team as i64, name, *index])?;
        }
    }
    let mut upsert = tx.prepare_cached(
        "INSERT INTO posthog_group (team_id, group_key, group_type_index, group_properties, created_at,
            properties_last_updated_at, properties_last_operation, version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(team_id, group_key, group_type_index) DO UPDATE SET
            group_properties = excluded.group_properties,
            properties_last_updated_at = excluded.properties_last_updated_at,
            properties_last_operation = excluded.properties_last_operation,
            version = excluded.version
         WHERE excluded.version >= posthog_group.version",
    )?;
    for ((team, index, key), group) in &updates.groups {
        upsert.execute(params![
            *team as i64,
            key,
            *index,
            text(&group.properties),
            timestamp_text(group.created_at),
            text(&group.properties_last_updated_at),
            text(&group.properties_last_operation),
            group.version as i64,
        ])?;
    }
    Ok(())
}
