//! Sink dead letters: events a sink refuses (a value out of its type's range, a constraint it
//! violates), set aside with the sink's words so the events after them flow, until an operator
//! sends them again or drops them.
//!
//! Their bytes count against the ingest queue's budget: they are acknowledged events not yet
//! stored, so a sink that refuses everything ends in capture's 503, never in lost events.

use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::follow::FollowColumns;
use super::ingest::adjust_queued_bytes;
use super::{decode_value, encode_value, meta_get, Store, StoreError, META};
use crate::event::EventRow;
use crate::ids::TeamId;

/// Id → encoded [`DeadLetter`].
pub(in crate::store) const SINK_DEAD_LETTERS: TableDefinition<u64, &[u8]> =
    TableDefinition::new("sink_dead_letters");
const NEXT_DEAD_LETTER: &str = "sink_dead_letter_next_id";
/// How many dead letters are marked for resending, so a writer's idle check reads one counter
/// rather than every dead letter.
const MARKED: &str = "sink_dead_letters_marked";

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(SINK_DEAD_LETTERS)?;
    Ok(())
}

/// One event a sink refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    /// The sink that refused it.
    pub sink: String,
    pub team: TeamId,
    /// The ingest-queue position of its batch.
    pub queue_position: u64,
    pub event: EventRow,
    pub columns: Option<FollowColumns>,
    /// What the sink said.
    pub error: String,
    pub at: DateTime<Utc>,
    /// Set by an operator: the sink's writer tries it again at its next write.
    pub resend: bool,
}

impl Store {
    /// Keeps `letters` (their ids are given here); returns the ids.
    pub fn add_dead_letters(&self, letters: Vec<DeadLetter>) -> Result<Vec<u64>, StoreError> {
        let txn = self.write()?;
        let mut ids = Vec::with_capacity(letters.len());
        let mut added = 0i64;
        {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(SINK_DEAD_LETTERS)?;
            let mut next = meta_get(&meta, NEXT_DEAD_LETTER)?.max(1);
            for mut letter in letters {
                letter.id = next;
                let bytes = encode_value(&letter);
                added += bytes.len() as i64;
                table.insert(next, bytes.as_slice())?;
                ids.push(next);
                next += 1;
            }
            meta.insert(NEXT_DEAD_LETTER, next)?;
        }
        let queued = adjust_queued_bytes(&txn, added)?;
        self.commit(txn)?;
        self.set_queued_bytes(queued);
        Ok(ids)
    }

    /// At most `limit` dead letters, oldest first, of `sink` only if given, and only those
    /// marked for resending if `marked`.
    pub fn dead_letters(
        &self,
        sink: Option<&str>,
        marked: bool,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let txn = self.read()?;
        if marked && meta_get(&txn.open_table(META)?, MARKED)? == 0 {
            return Ok(Vec::new());
        }
        let table = txn.open_table(SINK_DEAD_LETTERS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            if out.len() >= limit {
                break;
            }
            let letter: DeadLetter = decode_value("sink dead letter", row?.1.value())?;
            if sink.is_none_or(|s| s == letter.sink) && (letter.resend || !marked) {
                out.push(letter);
            }
        }
        Ok(out)
    }

    /// Marks dead letters to be sent again (`None`: all); returns how many were marked.
    pub fn resend_dead_letters(&self, ids: Option<&[u64]>) -> Result<usize, StoreError> {
        self.change_dead_letters(ids, |mut letter| {
            letter.resend = true;
            Some(letter)
        })
    }

    /// Drops dead letters for good (`None`: all); returns how many.
    pub fn drop_dead_letters(&self, ids: Option<&[u64]>) -> Result<usize, StoreError> {
        self.change_dead_letters(ids, |_| None)
    }

    /// After a writer tried resending: the stored ones go, the refused ones stay (with the new
    /// error, no longer marked).
    pub fn settle_dead_letters(
        &self,
        stored: &[u64],
        refused: &[(u64, String)],
    ) -> Result<(), StoreError> {
        self.change_dead_letters(Some(stored), |_| None)?;
        for (id, error) in refused {
            self.change_dead_letters(Some(&[*id]), |mut letter| {
                letter.resend = false;
                letter.error = error.clone();
                Some(letter)
            })?;
        }
        Ok(())
    }

    /// Applies `change` to the given dead letters (`None`: all): `Some` keeps the new value,
    /// `None` removes it. Returns how many it was applied to.
    fn change_dead_letters(
        &self,
        ids: Option<&[u64]>,
        change: impl Fn(DeadLetter) -> Option<DeadLetter>,
    ) -> Result<usize, StoreError> {
        let txn = self.write()?;
        let (count, delta, marked) = {
            let mut table = txn.open_table(SINK_DEAD_LETTERS)?;
            let wanted: Vec<u64> = match ids {
                Some(ids) => ids.to_vec(),
                None => table
                    .iter()?
                    .map(|row| row.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()?,
            };
            let (mut count, mut delta, mut marked) = (0usize, 0i64, 0i64);
            for id in wanted {
                let Some(old) = table.get(id)?.map(|v| v.value().to_vec()) else {
                    continue;
                };
                let letter: DeadLetter = decode_value("sink dead letter", &old)?;
                count += 1;
                delta -= old.len() as i64;
                marked -= i64::from(letter.resend);
                match change(letter) {
                    Some(new) => {
                        marked += i64::from(new.resend);
                        let bytes = encode_value(&new);
                        delta += bytes.len() as i64;
                        table.insert(id, bytes.as_slice())?;
                    }
                    None => {
                        table.remove(id)?;
                    }
                }
            }
            (count, delta, marked)
        };
        {
            let mut meta = txn.open_table(META)?;
            let now = meta_get(&meta, MARKED)?.saturating_add_signed(marked);
            meta.insert(MARKED, now)?;
        }
        let queued = adjust_queued_bytes(&txn, delta)?;
        self.commit(txn)?;
        self.set_queued_bytes(queued);
        Ok(count)
    }
}
