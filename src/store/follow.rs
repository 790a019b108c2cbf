//! The follow log: what the pipeline wrote to the lead sink, kept for the other sinks
//! (followers), each of which copies it into its own store at its own pace.
//!
//! A record is appended in the transaction that commits the lead write's deliveries and person
//! changes, so it exists exactly when the lead's write counts as done; records are numbered by a
//! sequence of their own (a record may hold batches taken back from deferral, whose queue
//! positions lie behind the queue's read position). Its bytes count against the ingest queue's
//! budget, so a follower that stays away makes capture refuse rather than fill the disk.
//! Records are trimmed once every configured follower has stored them.

use redb::{TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ingest::{adjust_queued_bytes, ReadLimits};
use super::{decode_value, encode_value, meta_get, Store, StoreError, META};
use crate::event::IngestBatch;
use crate::ids::TeamId;
use crate::person::{DistinctId, Group, Person, PersonMode};

/// Sequence → encoded [`FollowRecord`].
pub(in crate::store) const FOLLOW_LOG: TableDefinition<u64, &[u8]> =
    TableDefinition::new("follow_log");
const NEXT_FOLLOW_SEQ: &str = "follow_next_seq";

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(FOLLOW_LOG)?;
    Ok(())
}

/// One event's person columns, as a follower writes them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FollowColumns {
    pub person_id: Uuid,
    pub person_properties: String,
    #[serde(with = "crate::event::micros")]
    pub person_created_at: chrono::DateTime<chrono::Utc>,
    pub person_mode: PersonMode,
}

/// One lead write, as the followers write it: the batches with their queue positions, each
/// event's person columns, and the persons, distinct ids and groups it changed (last state).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FollowRecord {
    pub batches: Vec<(u64, IngestBatch)>,
    pub columns: Vec<Vec<FollowColumns>>,
    pub persons: Vec<(TeamId, Uuid, FollowPerson)>,
    pub distinct_ids: Vec<(TeamId, String, Option<DistinctId>)>,
    pub group_types: Vec<(TeamId, String, u8)>,
    pub groups: Vec<(TeamId, u8, String, Group)>,
}

/// A person's last state in a lead write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FollowPerson {
    Upsert(Person),
    /// Merged away or deleted, at this version (ClickHouse's deletion row goes past it).
    Deleted {
        version: u64,
    },
}

/// The key a sink without transactions keeps its position under in `META`, and the key of the
/// write it has begun (see [`Store::begin_sink_write`]).
fn sink_keys(sink: &str) -> (String, String) {
    (
        format!("sink_position:{sink}"),
        format!("sink_writing:{sink}"),
    )
}

/// Appends `record` in `txn` (the lead write's commit); returns its sequence number.
pub(in crate::store) fn append(
    txn: &WriteTransaction,
    record: &FollowRecord,
) -> Result<u64, StoreError> {
    // Compressed: a record repeats the lead write's events, and its bytes are written (and
    // fsynced) in a transaction that capture's commits wait behind.
    let bytes =
        zstd::bulk::compress(&encode_value(record), 1).map_err(|e| StoreError::Corrupt {
            what: "follow log record",
            detail: e.to_string(),
        })?;
    let seq = {
        let mut meta = txn.open_table(META)?;
        let seq = meta_get(&meta, NEXT_FOLLOW_SEQ)?.max(1);
        meta.insert(NEXT_FOLLOW_SEQ, seq + 1)?;
        seq
    };
    txn.open_table(FOLLOW_LOG)?.insert(seq, bytes.as_slice())?;
    adjust_queued_bytes(txn, bytes.len() as i64)?;
    Ok(seq)
}

impl Store {
    /// Records after `after` and through `through`, in order, until `limits` is reached (at
    /// least one if any).
    pub fn read_follow_after(
        &self,
        after: u64,
        through: u64,
        limits: ReadLimits,
    ) -> Result<Vec<(u64, FollowRecord)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(FOLLOW_LOG)?;
        let (mut out, mut events, mut bytes) = (Vec::new(), 0, 0);
        if through <= after {
            return Ok(out);
        }
        for row in table.range(after.saturating_add(1)..=through)? {
            let (seq, value) = row?;
            bytes += value.value().len();
            let plain = zstd::decode_all(value.value()).map_err(|e| StoreError::Corrupt {
                what: "follow log record",
                detail: e.to_string(),
            })?;
            let record: FollowRecord = decode_value("follow log record", &plain)?;
            events += record
                .batches
                .iter()
                .map(|(_, b)| b.events.len())
                .sum::<usize>();
            out.push((seq.value(), record));
            if events >= limits.events || bytes >= limits.bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The sequence number of the last record ever appended (0 if none).
    pub fn follow_last_seq(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        Ok(meta_get(&txn.open_table(META)?, NEXT_FOLLOW_SEQ)?.saturating_sub(1))
    }

    /// Deletes the records through `seq` (every follower has stored them).
    pub fn trim_follow_through(&self, seq: u64) -> Result<(), StoreError> {
        let txn = self.write()?;
        let bytes = {
            let mut table = txn.open_table(FOLLOW_LOG)?;
            let mut bytes = 0usize;
            for row in table.extract_from_if(..=seq, |_, _| true)? {
                bytes += row?.1.value().len();
            }
            bytes
        };
        let queued = adjust_queued_bytes(&txn, -(bytes as i64))?;
        self.commit(txn)?;
        self.set_queued_bytes(queued);
        Ok(())
    }

    /// The position of a sink that keeps it here (one with no transaction to keep it in), and
    /// the end of a write it began and did not finish, if any.
    pub fn sink_position(&self, sink: &str) -> Result<(u64, Option<u64>), StoreError> {
        let (position, writing) = sink_keys(sink);
        let txn = self.read()?;
        let meta = txn.open_table(META)?;
        let writing = meta.get(writing.as_str())?.map(|v| v.value());
        Ok((meta_get(&meta, &position)?, writing))
    }

    /// Records that the sink is about to write everything through `through`: after a crash,
    /// its first write must cover exactly that range again, so that the sink's deduplication
    /// recognises it.
    pub fn begin_sink_write(&self, sink: &str, through: u64) -> Result<(), StoreError> {
        let (_, writing) = sink_keys(sink);
        let txn = self.write()?;
        txn.open_table(META)?.insert(writing.as_str(), through)?;
        self.commit(txn)
    }

    /// Records the sink's position as `position` (never backwards) and its begun write as done.
    pub fn finish_sink_write(&self, sink: &str, position: u64) -> Result<(), StoreError> {
        let (key, writing) = sink_keys(sink);
        let txn = self.write()?;
        {
            let mut meta = txn.open_table(META)?;
            if position > meta_get(&meta, &key)? {
                meta.insert(key.as_str(), position)?;
            }
            meta.remove(writing.as_str())?;
        }
        self.commit(txn)
    }

    /// Moves the next record's number past `position` if a follower has stored that far (its
    /// copy is ahead of a restored state file): a new record must never get a number the
    /// follower counts as stored.
    pub fn ensure_follow_sequence_after(&self, position: u64) -> Result<bool, StoreError> {
        let txn = self.write()?;
        let moved = {
            let mut meta = txn.open_table(META)?;
            let next = meta_get(&meta, NEXT_FOLLOW_SEQ)?.max(1);
            if next <= position {
                meta.insert(NEXT_FOLLOW_SEQ, position + 1)?;
            }
            next <= position
        };
        self.commit(txn)?;
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append_alone(store: &Store, record: &FollowRecord) {
        let done = crate::store::WriteDone {
            delivered: 0,
            undefer: &[],
            persons: &Default::default(),
            follow: Some(record),
        };
        store.commit_deliveries(Vec::new(), 0, 0, done).unwrap();
    }

    #[test]
    fn a_sink_position_kept_here_remembers_the_write_it_began() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.sink_position("ch").unwrap(), (0, None));
        store.begin_sink_write("ch", 7).unwrap();
        assert_eq!(store.sink_position("ch").unwrap(), (0, Some(7)));
        store.finish_sink_write("ch", 7).unwrap();
        store.finish_sink_write("ch", 5).unwrap();
        assert_eq!(
            store.sink_position("ch").unwrap(),
            (7, None),
            "never backwards"
        );
        assert_eq!(store.sink_position("other").unwrap(), (0, None));
    }

    #[test]
    fn records_are_numbered_read_in_order_trimmed_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = |team: TeamId| FollowRecord {
            batches: vec![(
                team,
                IngestBatch {
                    team_id: team,
                    received_at: chrono::DateTime::UNIX_EPOCH,
                    sent_at: None,
                    ip: None,
                    events: Vec::new(),
                },
            )],
            ..FollowRecord::default()
        };
        for team in 1..=3 {
            append_alone(&store, &record(team));
        }
        assert_eq!(store.follow_last_seq().unwrap(), 3);
        let before = store.room().queued_bytes;
        assert!(before > 0, "the log counts against the queue's budget");
        let limits = ReadLimits {
            events: 10,
            bytes: usize::MAX,
        };
        let read = store.read_follow_after(1, u64::MAX, limits).unwrap();
        assert_eq!(read.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(read[0].1, record(2));
        let bounded = store.read_follow_after(1, 2, limits).unwrap();
        assert_eq!(bounded.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2]);
        store.trim_follow_through(2).unwrap();
        assert_eq!(
            store.read_follow_after(0, u64::MAX, limits).unwrap().len(),
            1
        );
        store.trim_follow_through(3).unwrap();
        assert_eq!(store.room().queued_bytes, 0);
        assert!(store.ensure_follow_sequence_after(10).unwrap());
        append_alone(&store, &record(4));
        assert_eq!(store.follow_last_seq().unwrap(), 11);
    }
}
