//! The persons, group types and groups that boxes sharing this database as their person store
//! (`SHARED_PERSONS`) read back before each person step, in one round trip of three pipelined
//! queries.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::text::text_safe;
use super::{read_error, NAME};
use crate::ids::TeamId;
use crate::person::{DistinctId, Group, Person, SharedPerson, SharedState, SharedWanted};
use crate::sinks::SinkError;

/// The most distinct ids read with one shared person besides the ones the step names, and with
/// all the step's persons together: a person's ids are what a merge of it moves, and a step
/// naming many persons with many ids must not read them all. A merge of a person beyond these
/// is left for the version check to protect (its write is turned down, and shows on `/_ready`).
const MAX_IDS_PER_PERSON: i64 = 10_000;
const MAX_IDS_PER_STEP: i64 = 200_000;

/// The persons the step's ids point at, with those ids always, and the persons' other ids up
/// to an even share of [`MAX_IDS_PER_STEP`] (at most [`MAX_IDS_PER_PERSON`] each).
const PERSONS: &str = "WITH hit AS (
        SELECT d.person_id, d.distinct_id, coalesce(d.version, 0) AS version, d.id
        FROM posthog_persondistinctid d
        JOIN unnest($1::int8[], $2::text[]) AS w(team_id, distinct_id)
            ON d.team_id = w.team_id AND d.distinct_id = w.distinct_id
     ),
     found AS (SELECT DISTINCT person_id FROM hit),
     share AS (
        SELECT least($3::int8, greatest(1, $4::int8 / greatest(1, count(*)))) AS n FROM found
     )
     SELECT p.team_id, p.uuid, p.created_at, p.properties::text,
        coalesce(p.properties_last_updated_at, '{}')::text,
        coalesce(p.properties_last_operation, '{}')::text, p.is_identified,
        coalesce(p.version, 0), ids.distinct_ids, ids.versions
     FROM found JOIN posthog_person p ON p.id = found.person_id
     CROSS JOIN LATERAL (
        SELECT array_agg(x.distinct_id ORDER BY x.id) AS distinct_ids,
            array_agg(x.version ORDER BY x.id) AS versions
        FROM (
            SELECT h.distinct_id, h.version, h.id FROM hit h WHERE h.person_id = p.id
            UNION
            (SELECT d.distinct_id, coalesce(d.version, 0), d.id
             FROM posthog_persondistinctid d WHERE d.person_id = p.id
             ORDER BY d.id LIMIT (SELECT n FROM share))
        ) x
     ) ids";

const GROUP_TYPES: &str = "SELECT team_id, group_type, group_type_index
     FROM posthog_grouptypemapping WHERE team_id = ANY($1::int8[])";

const GROUPS: &str = "SELECT g.team_id, g.group_type_index, g.group_key,
        g.group_properties::text, g.properties_last_updated_at::text,
        g.properties_last_operation::text, g.created_at, g.version
     FROM unnest($1::int8[], $2::text[], $3::text[]) AS w(team_id, group_type, group_key)
     JOIN posthog_grouptypemapping m ON m.team_id = w.team_id AND m.group_type = w.group_type
     JOIN posthog_group g ON g.team_id = w.team_id AND g.group_type_index = m.group_type_index
        AND g.group_key = w.group_key";

/// What the database holds of `wanted`.
pub(super) async fn read_shared(
    client: &deadpool_postgres::Object,
    wanted: &SharedWanted,
) -> Result<SharedState, SinkError> {
    if wanted.is_empty() {
        return Ok(SharedState::default());
    }
    let id_teams: Vec<i64> = wanted.ids.iter().map(|(team, _)| *team as i64).collect();
    let ids: Vec<String> = wanted
        .ids
        .iter()
        .map(|(_, id)| text_safe(id).into_owned())
        .collect();
    let teams: Vec<i64> = wanted.teams.iter().map(|team| *team as i64).collect();
    let group_teams: Vec<i64> = wanted.groups.iter().map(|(t, _, _)| *t as i64).collect();
    let group_types: Vec<String> = wanted
        .groups
        .iter()
        .map(|(_, name, _)| text_safe(name).into_owned())
        .collect();
    let group_keys: Vec<String> = wanted
        .groups
        .iter()
        .map(|(_, _, key)| text_safe(key).into_owned())
        .collect();
    let (persons, types, groups) = (
        client.prepare_cached(PERSONS),
        client.prepare_cached(GROUP_TYPES),
        client.prepare_cached(GROUPS),
    );
    let (persons, types, groups) = tokio::try_join!(persons, types, groups).map_err(read_error)?;
    type Params<'a> = [&'a (dyn tokio_postgres::types::ToSql + Sync)];
    let person_params: &Params = &[&id_teams, &ids, &MAX_IDS_PER_PERSON, &MAX_IDS_PER_STEP];
    let type_params: &Params = &[&teams];
    let group_params: &Params = &[&group_teams, &group_types, &group_keys];
    let (persons, types, groups) = tokio::try_join!(
        client.query(&persons, person_params),
        client.query(&types, type_params),
        client.query(&groups, group_params),
    )
    .map_err(read_error)?;
    Ok(SharedState {
        persons: persons
            .iter()
            .map(shared_person)
            .collect::<Result<_, _>>()?,
        group_types: types
            .iter()
            .map(|r| {
                let index: i32 = r.get(2);
                (
                    r.get::<_, i64>(0) as TeamId,
                    r.get(1),
                    index.clamp(0, 255) as u8,
                )
            })
            .collect(),
        groups: groups.iter().map(shared_group).collect::<Result<_, _>>()?,
    })
}

fn object(
    row: &tokio_postgres::Row,
    at: usize,
    what: &str,
) -> Result<Map<String, Value>, SinkError> {
    let text: Option<String> = row.get(at);
    match text {
        None => Ok(Map::new()),
        Some(text) => serde_json::from_str(&text).map_err(|e| SinkError::Read {
            sink: NAME,
            detail: format!("{what} is not a JSON object: {e}"),
        }),
    }
}

fn shared_person(row: &tokio_postgres::Row) -> Result<SharedPerson, SinkError> {
    let uuid: Uuid = row.get(1);
    let ids: Vec<String> = row.get::<_, Option<Vec<String>>>(8).unwrap_or_default();
    let versions: Vec<i64> = row.get::<_, Option<Vec<i64>>>(9).unwrap_or_default();
    Ok(SharedPerson {
        team: row.get::<_, i64>(0) as TeamId,
        person: Person {
            uuid,
            properties: object(row, 3, "posthog_person.properties")?,
            properties_last_updated_at: object(
                row,
                4,
                "posthog_person.properties_last_updated_at",
            )?,
            properties_last_operation: object(row, 5, "posthog_person.properties_last_operation")?,
            created_at: row.get(2),
            version: row.get::<_, i64>(7).max(0) as u64,
            is_identified: row.get(6),
            text: Default::default(),
        },
        distinct_ids: ids
            .into_iter()
            .zip(versions)
            .map(|(id, version)| {
                let version = version.max(0) as u64;
                (
                    id,
                    DistinctId {
                        person: uuid,
                        version,
                    },
                )
            })
            .collect(),
    })
}

fn shared_group(row: &tokio_postgres::Row) -> Result<(TeamId, u8, String, Group), SinkError> {
    let index: i32 = row.get(1);
    Ok((
        row.get::<_, i64>(0) as TeamId,
        index.clamp(0, 255) as u8,
        row.get(2),
        Group {
            properties: object(row, 3, "posthog_group.group_properties")?,
            properties_last_updated_at: object(row, 4, "posthog_group.properties_last_updated_at")?,
            properties_last_operation: object(row, 5, "posthog_group.properties_last_operation")?,
            created_at: row.get::<_, DateTime<Utc>>(6),
            version: row.get::<_, i64>(7).max(0) as u64,
        },
    ))
}
