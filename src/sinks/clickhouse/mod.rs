//! The ClickHouse sink: PostHog's ClickHouse tables (`events`, `person`,
//! `person_distinct_id2`, `groups`) on a server the operator runs, written over HTTP by the
//! `clickhouse` crate (RowBinary, LZ4-compressed, many rows per request).
//!
//! ClickHouse has no transaction that could hold the rows and the position together, so the
//! position lives in the appliance's state file: before a write moves it, the write's end is
//! recorded there as begun; each insert carries a deduplication token made from its rows; the
//! position is recorded after the inserts. A crash in between costs one retried write, which
//! the follower makes cover exactly the begun range again, so ClickHouse drops every insert
//! of it as a duplicate (and `ReplacingMergeTree` collapses any row that still doubles).
//!
//! Owns: the schema (`migrations/clickhouse`), the server version check, the inserts.
//! Must never: lead (it cannot say which rows a write inserted), record a position before its
//! rows are in, or wait on the server without a deadline.

mod migrate;
pub mod rows;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use clickhouse::Client;
use tokio::sync::OnceCell;

use super::{Role, Sink, SinkError, SinkFuture, SinkWrite, StoredRows, Written};
use crate::config::ClickHouseSettings;
use crate::store::{QueuedBatch, Store};

const NAME: &str = "clickhouse";
/// The name its position is kept under in the state file (it is always a follower).
const POSITION_KEY: &str = "clickhouse:follow";

/// The longest one request may take (a stalled server is an error retried with backoff).
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// The oldest server the sink writes to: insert deduplication tokens came in 22.2.
const OLDEST_SERVER: (u32, u32) = (22, 3);

/// ClickHouse error codes that mean the data itself is refused (retrying cannot help):
/// CANNOT_PARSE_TEXT, CANNOT_PARSE_INPUT_ASSERTION_FAILED, TYPE_MISMATCH, CANNOT_CONVERT_TYPE,
/// INCORRECT_DATA, TOO_LARGE_STRING_SIZE, VIOLATED_CONSTRAINT.
const REFUSING_CODES: &[u32] = &[6, 27, 53, 70, 117, 131, 469];

pub struct ClickHouseSink {
    client: Client,
    store: Store,
    /// The server and database, without the password (for messages).
    target: String,
    database: String,
    /// Set once the server's version is checked and the migrations are applied on this run.
    ready: OnceCell<()>,
    flush_interval: Duration,
}

/// The server's code in an error answer (`Code: 469. DB::Exception: …`).
fn server_code(text: &str) -> Option<u32> {
    let after = text.split("Code: ").nth(1)?;
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn write_error(e: clickhouse::error::Error) -> SinkError {
    let detail = e.to_string();
    match &e {
        clickhouse::error::Error::BadResponse(text)
            if server_code(text).is_some_and(|c| REFUSING_CODES.contains(&c)) =>
        {
            SinkError::Refused { sink: NAME, detail }
        }
        _ => SinkError::Write { sink: NAME, detail },
    }
}

fn state_error(e: impl std::fmt::Display) -> SinkError {
    SinkError::Write {
        sink: NAME,
        detail: format!("the state file: {e}"),
    }
}

/// The client for `settings`: LZ4 both ways, rows checked against the table's columns.
fn client(settings: &ClickHouseSettings) -> Client {
    let client = Client::default()
        .with_url(&settings.url)
        .with_user(&settings.user)
        .with_database(&settings.database)
        .with_compression(clickhouse::Compression::Lz4);
    match &settings.password {
        Some(password) => client.with_password(password),
        None => client,
    }
}

/// Applies the migrations under `migrations/clickhouse`; returns how many were applied now.
pub async fn migrate(settings: &ClickHouseSettings) -> Result<usize, SinkError> {
    let client = client(settings);
    check_version(&client, &target(settings)).await?;
    with_deadline(
        &target(settings),
        migrate::apply(&client, &settings.database),
    )
    .await?
    .map_err(|e| SinkError::Migrate {
        sink: NAME,
        detail: e.to_string(),
    })
}

fn target(settings: &ClickHouseSettings) -> String {
    format!("{} (database {})", settings.url, settings.database)
}

async fn with_deadline<T>(
    target: &str,
    work: impl std::future::Future<Output = T>,
) -> Result<T, SinkError> {
    tokio::time::timeout(REQUEST_DEADLINE, work)
        .await
        .map_err(|_| SinkError::Write {
            sink: NAME,
            detail: format!(
                "no answer from {target} within {} s",
                REQUEST_DEADLINE.as_secs()
            ),
        })
}

/// Refuses a server too old for the schema and the deduplication tokens, with its version.
async fn check_version(client: &Client, target: &str) -> Result<(), SinkError> {
    // Without validation the answer is plain RowBinary, which every server speaks, so an old
    // one gets this message rather than a format error.
    // The database may not exist yet (the migrations create it).
    let asked = client
        .clone()
        .with_database("default")
        .with_validation(false)
        .query("SELECT version()")
        .fetch_one::<String>();
    let version = with_deadline(target, asked).await?.map_err(write_error)?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < OLDEST_SERVER {
        return Err(SinkError::Open {
            sink: NAME,
            target: target.to_owned(),
            detail: format!(
                "ClickHouse {version} is too old: the sink needs {}.{} or newer \
                 (DateTime64 columns and insert deduplication tokens)",
                OLDEST_SERVER.0, OLDEST_SERVER.1
            ),
        });
    }
    Ok(())
}

impl ClickHouseSink {
    /// Prepares the client; connects only when first used, so a server that is down at
    /// start-up is retried like one that goes down later.
    pub fn open(
        settings: &ClickHouseSettings,
        store: Store,
        role: Role,
    ) -> Result<ClickHouseSink, SinkError> {
        if role == Role::Lead {
            return Err(SinkError::Open {
                sink: NAME,
                target: target(settings),
                detail: "ClickHouse can only follow another sink".into(),
            });
        }
        Ok(ClickHouseSink {
            client: client(settings),
            store,
            target: target(settings),
            database: settings.database.clone(),
            ready: OnceCell::new(),
            flush_interval: settings.flush_interval,
        })
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    async fn ready(&self) -> Result<(), SinkError> {
        self.ready
            .get_or_try_init(|| async {
                check_version(&self.client, &self.target).await?;
                migrate::apply(&self.client, &self.database)
                    .await
                    .map(|_| ())
                    .map_err(|e| SinkError::Migrate {
                        sink: NAME,
                        detail: e.to_string(),
                    })
            })
            .await
            .copied()
    }

    /// Runs `work` on the state file, on the blocking pool.
    async fn in_state<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(state_error)?
            .map_err(state_error)
    }

    /// The position and the begun write, from the state file.
    async fn recorded(&self) -> Result<(u64, Option<u64>), SinkError> {
        self.in_state(|store| store.sink_position(POSITION_KEY))
            .await
    }

    async fn write_now(&self, write: SinkWrite, position: u64) -> Result<Written, SinkError> {
        self.ready().await?;
        let (recorded, _) = self.recorded().await?;
        let moves = position > recorded;
        if moves {
            self.in_state(move |store| store.begin_sink_write(POSITION_KEY, position))
                .await?;
        }
        let now = Utc::now();
        let (events, kept) = rows::events(&write, now);
        self.insert::<rows::EventRow<'static>>("events", &events)
            .await?;
        let texts = rows::person_texts(&write);
        let persons = rows::persons(&write, &texts, now);
        self.insert::<rows::PersonRow<'static>>("person", &persons)
            .await?;
        let ids = rows::distinct_ids(&write, now);
        self.insert::<rows::DistinctIdRow<'static>>("person_distinct_id2", &ids)
            .await?;
        let groups = rows::groups(&write, now);
        self.insert::<rows::GroupRow<'static>>("groups", &groups)
            .await?;
        crate::failpoint::hit("clickhouse.before_position");
        if moves {
            self.in_state(move |store| store.finish_sink_write(POSITION_KEY, position))
                .await?;
        }
        Ok(Written { inserted: kept })
    }

    /// Inserts `rows` into `table` in one request, named by a token made from the rows' keys.
    async fn insert<'r, T>(&self, table: &str, rows: &[T::Value<'r>]) -> Result<(), SinkError>
    where
        T: clickhouse::RowWrite,
        T::Value<'r>: rows::Keyed,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let token = rows::token(table, rows.iter().map(rows::Keyed::key));
        let mut insert = self
            .client
            .insert::<T>(table)
            .await
            .map_err(write_error)?
            .with_setting("insert_deduplication_token", token)
            .with_timeouts(Some(REQUEST_DEADLINE), Some(REQUEST_DEADLINE));
        for row in rows {
            insert.write(row).await.map_err(write_error)?;
        }
        insert.end().await.map_err(write_error)
    }
}

impl Sink for ClickHouseSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn position(&self) -> SinkFuture<'_, u64> {
        Box::pin(async { Ok(self.recorded().await?.0) })
    }

    fn write(&self, write: SinkWrite, position: u64) -> SinkFuture<'_, Written> {
        Box::pin(async move { with_deadline(&self.target, self.write_now(write, position)).await? })
    }

    fn stored_rows(&self, _batches: Arc<Vec<QueuedBatch>>) -> SinkFuture<'_, StoredRows> {
        Box::pin(async {
            Err(SinkError::Read {
                sink: NAME,
                detail: "ClickHouse only follows; deliveries are rebuilt from the lead".into(),
            })
        })
    }

    fn unfinished_write(&self) -> SinkFuture<'_, Option<u64>> {
        Box::pin(async { Ok(self.recorded().await?.1) })
    }

    fn min_write_interval(&self) -> Duration {
        self.flush_interval
    }

    fn deduplicates_by_key(&self) -> bool {
        // Rows collapse only when ClickHouse merges parts; until then a repeat shows twice.
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_from_outages_by_the_server_code() {
        let refused = clickhouse::error::Error::BadResponse(
            "Code: 469. DB::Exception: Constraint `c` for table events is violated".into(),
        );
        assert!(matches!(write_error(refused), SinkError::Refused { .. }));
        let busy = clickhouse::error::Error::BadResponse(
            "Code: 252. DB::Exception: Too many parts".into(),
        );
        assert!(matches!(write_error(busy), SinkError::Write { .. }));
        assert_eq!(server_code("Code: 6. DB::Exception"), Some(6));
        assert_eq!(server_code("no code"), None);
    }
}
