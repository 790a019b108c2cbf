//! Reading stored events back from Postgres for exports and the admin page's live tail. The
//! readers are called from blocking threads, so each runs its query on the sink's runtime.

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use super::{read_error, PostgresSink, REQUEST_DEADLINE};
use crate::event::timestamp_text;
use crate::sinks::{EventReader, SinkError, StoredEvent};

const COLUMNS: &str =
    "id, uuid::text, event, distinct_id, team_id, timestamp, properties::text, elements_chain";

impl PostgresSink {
    /// Runs one query from a blocking thread, under the request deadline.
    fn query_blocking(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, SinkError> {
        self.runtime.block_on(async {
            let work = async {
                let client = self.client().await?;
                let statement = client.prepare_cached(sql).await.map_err(read_error)?;
                client.query(&statement, params).await.map_err(read_error)
            };
            tokio::time::timeout(REQUEST_DEADLINE, work)
                .await
                .map_err(|_| SinkError::Read {
                    sink: super::NAME,
                    detail: format!("no answer from {}", self.target),
                })?
        })
    }
}

fn stored_event(row: &tokio_postgres::Row) -> StoredEvent {
    StoredEvent {
        row_id: row.get(0),
        uuid: row.get(1),
        event: row.get(2),
        distinct_id: row.get(3),
        team_id: row.get::<_, i64>(4) as u64,
        timestamp: timestamp_text(row.get::<_, DateTime<Utc>>(5)),
        properties: row.get(6),
        elements_chain: row.get(7),
    }
}

impl EventReader for PostgresSink {
    fn count_events(&self, team: u64, from: &str, to: &str) -> Result<u64, SinkError> {
        let rows = self.query_blocking(
            "SELECT count(*) FROM posthog_event WHERE team_id = $1
               AND timestamp >= $2::text::timestamptz AND timestamp < $3::text::timestamptz",
            &[&(team as i64), &from, &to],
        )?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    fn read_events(
        &self,
        team: u64,
        range: (&str, &str),
        after: Option<&(String, i64)>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, SinkError> {
        let (after_time, after_id) = after
            .map(|(time, id)| (time.as_str(), *id))
            .unwrap_or(("-infinity", 0));
        let sql = format!(
            "SELECT {COLUMNS} FROM posthog_event WHERE team_id = $1
               AND timestamp >= $2::text::timestamptz AND timestamp < $3::text::timestamptz
               AND (timestamp, id) > ($4::text::timestamptz, $5)
             ORDER BY timestamp, id LIMIT $6"
        );
        let rows = self.query_blocking(
            &sql,
            &[
                &(team as i64),
                &range.0,
                &range.1,
                &after_time,
                &after_id,
                &i64::from(limit),
            ],
        )?;
        Ok(rows.iter().map(stored_event).collect())
    }

    fn latest_events(&self, team: u64, limit: u32) -> Result<Vec<StoredEvent>, SinkError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM posthog_event WHERE team_id = $1 ORDER BY id DESC LIMIT $2"
        );
        let rows = self.query_blocking(&sql, &[&(team as i64), &i64::from(limit)])?;
        Ok(rows.iter().map(stored_event).collect())
    }
}
