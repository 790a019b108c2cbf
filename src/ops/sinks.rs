//! Sink dead-letter operations: list the events a sink refused, have them sent again (the
//! sink's writer takes them at its next idle moment), or drop them.

use super::{OpError, Ops};
use crate::store::DeadLetter;

/// Most dead letters one listing returns (each holds an event of up to a MiB).
const MAX_LISTED: usize = 10_000;

impl Ops {
    /// At most `limit` dead letters (100 if not given, at most 10,000), oldest first, of one
    /// sink if named.
    pub fn dead_letters(
        &self,
        sink: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<DeadLetter>, OpError> {
        let limit = limit.unwrap_or(100).min(MAX_LISTED);
        Ok(self.store.dead_letters(sink, false, limit)?)
    }

    /// Marks dead letters (`None`: all) to be sent again; a running server writes them within
    /// a second, and those the sink refuses again stay with its new words.
    pub fn resend_dead_letters(&self, ids: Option<&[u64]>) -> Result<usize, OpError> {
        self.found(ids, self.store.resend_dead_letters(ids)?)
    }

    /// Drops dead letters (`None`: all) for good.
    pub fn drop_dead_letters(&self, ids: Option<&[u64]>) -> Result<usize, OpError> {
        self.found(ids, self.store.drop_dead_letters(ids)?)
    }

    /// `count` if every named dead letter was there, else which were not.
    fn found(&self, ids: Option<&[u64]>, count: usize) -> Result<usize, OpError> {
        match ids {
            Some(ids) if count < ids.len() => Err(OpError::NotFound(format!(
                "{} of the dead letters {ids:?} do not exist",
                ids.len() - count
            ))),
            _ => Ok(count),
        }
    }
}
