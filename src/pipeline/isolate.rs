//! Events a sink refuses: when a write is refused for its data (not for a failure to reach the
//! sink), the write is tried again in halves, each half the sink takes is stored, and each event
//! it refuses alone is set aside as a dead letter with the sink's words; the rest of the write
//! then goes through. Dead letters an operator marks for resending are written again here.
//!
//! Side writes (halves, resends) record position 0, which never moves a sink's position (the
//! sinks keep the greater), and are idempotent like every write; only the final write of the
//! remainder moves the position.

use std::sync::Arc;

use crate::person::{PersonColumns, PersonUpdates};
use crate::sinks::{Sink, SinkError, SinkWrite, Written};
use crate::store::{DeadLetter, FollowColumns, QueuedBatch, Store, StoreError};

/// An event of a write: (batch index, event index).
type At = (usize, usize);

/// Resent dead letters taken per round.
const RESEND_AT_ONCE: usize = 500;

/// The events of `items`, as a write of their own (no person changes).
fn subset(write: &SinkWrite, items: &[At]) -> SinkWrite {
    let (mut batches, mut columns) = (Vec::<QueuedBatch>::new(), Vec::<Vec<PersonColumns>>::new());
    let mut last_batch = None;
    for &(b, e) in items {
        let Some(queued) = write.batches.get(b) else {
            continue;
        };
        if last_batch != Some(b) {
            let mut header = queued.clone();
            header.batch.events = Vec::new();
            batches.push(header);
            columns.push(Vec::new());
            last_batch = Some(b);
        }
        if let (Some(event), Some(batch)) = (queued.batch.events.get(e), batches.last_mut()) {
            batch.batch.events.push(event.clone());
        }
        let column = write.columns.get(b).and_then(|c| c.get(e));
        if let (Some(column), Some(out)) = (column, columns.last_mut()) {
            out.push(column.clone());
        }
    }
    SinkWrite {
        batches: Arc::new(batches),
        columns: Arc::new(columns),
        persons: Arc::new(PersonUpdates::default()),
    }
}

/// Writes `write` in halves until each refused event is alone; returns those with the sink's
/// words, and the events the halves stored. With `refused_whole`, the write as a whole is known to be refused, so it starts from
/// its halves. Fails with the first error that is not a refusal (the sink went away: retry
/// later).
pub(super) async fn refused_events(
    sink: &dyn Sink,
    write: &SinkWrite,
    refused_whole: bool,
) -> Result<(Vec<(At, String)>, Vec<At>), SinkError> {
    let all: Vec<At> = write
        .batches
        .iter()
        .enumerate()
        .flat_map(|(b, q)| (0..q.batch.events.len()).map(move |e| (b, e)))
        .collect();
    let (mut refused, mut stored) = (Vec::new(), Vec::new());
    let mut pending = if refused_whole && all.len() > 1 {
        let (left, right) = all.split_at(all.len() / 2);
        vec![right.to_vec(), left.to_vec()]
    } else {
        vec![all]
    };
    while let Some(items) = pending.pop() {
        if items.is_empty() {
            continue;
        }
        match sink.write(subset(write, &items), 0).await {
            Ok(_) => stored.extend(items),
            Err(SinkError::Refused { detail, .. }) if items.len() == 1 => {
                refused.push((items[0], detail));
            }
            Err(SinkError::Refused { .. }) => {
                let (left, right) = items.split_at(items.len() / 2);
                pending.push(right.to_vec());
                pending.push(left.to_vec());
            }
            Err(other) => return Err(other),
        }
    }
    Ok((refused, stored))
}

/// `write` without the `refused` events (its person changes kept).
pub(super) fn remainder(write: &SinkWrite, refused: &[At]) -> SinkWrite {
    let batches = write
        .batches
        .iter()
        .enumerate()
        .map(|(b, q)| {
            let mut q = q.clone();
            q.batch.events = q
                .batch
                .events
                .into_iter()
                .enumerate()
                .filter(|(e, _)| !refused.contains(&(b, *e)))
                .map(|(_, event)| event)
                .collect();
            q
        })
        .collect();
    let columns = write
        .columns
        .iter()
        .enumerate()
        .map(|(b, c)| {
            c.iter()
                .enumerate()
                .filter(|(e, _)| !refused.contains(&(b, *e)))
                .map(|(_, column)| column.clone())
                .collect()
        })
        .collect();
    SinkWrite {
        batches: Arc::new(batches),
        columns: Arc::new(columns),
        persons: write.persons.clone(),
    }
}

/// What the remainder's write inserted, in the shape of the whole write: refused events are not
/// inserted, and events left out of the remainder because a half stored them are.
pub(super) fn widen(
    write: &SinkWrite,
    refused: &[At],
    left_out: &[At],
    of_remainder: Written,
) -> Written {
    let mut inserted = Vec::with_capacity(write.batches.len());
    for (b, q) in write.batches.iter().enumerate() {
        let mut kept = of_remainder.inserted.get(b).into_iter().flatten().copied();
        inserted.push(
            (0..q.batch.events.len())
                .map(|e| {
                    if refused.contains(&(b, e)) {
                        false
                    } else if left_out.contains(&(b, e)) {
                        true
                    } else {
                        kept.next().unwrap_or(false)
                    }
                })
                .collect(),
        );
    }
    Written { inserted }
}

/// The refused events as dead letters of `sink`.
pub(super) fn dead_letters(
    sink: &str,
    write: &SinkWrite,
    refused: &[(At, String)],
) -> Vec<DeadLetter> {
    let now = chrono::Utc::now();
    refused
        .iter()
        .filter_map(|((b, e), error)| {
            let queued = write.batches.get(*b)?;
            let event = queued.batch.events.get(*e)?.clone();
            let columns = write
                .columns
                .get(*b)
                .and_then(|c| c.get(*e))
                .map(|c| FollowColumns {
                    person_id: c.person_id,
                    person_properties: c.person_properties.to_string(),
                    person_created_at: c.person_created_at,
                    person_mode: c.person_mode,
                });
            Some(DeadLetter {
                id: 0,
                sink: sink.to_owned(),
                team: queued.batch.team_id,
                queue_position: queued.seq,
                event,
                columns,
                error: error.clone(),
                at: now,
                resend: false,
            })
        })
        .collect()
}

/// Writes `write` to `sink` at `position`; if the sink refuses its data, sets the refused events
/// aside (in `store`) and writes the rest. What the answer says was inserted is in the shape of
/// `write`.
pub(super) async fn write_setting_aside(
    sink: &dyn Sink,
    store: &Store,
    write: SinkWrite,
    position: u64,
) -> Result<Written, StepFailure> {
    match sink.write(write.clone(), position).await {
        Err(SinkError::Refused { detail, .. }) => {
            let (refused, stored) = refused_events(sink, &write, true).await?;
            if refused.is_empty() {
                // Refused as a whole, yet every event alone is taken: the person changes are
                // what the sink refuses. Retried (and reported) like an unreachable sink.
                return Err(StepFailure::Sink(SinkError::Write {
                    sink: sink.name(),
                    detail: format!("the person changes are refused: {detail}"),
                }));
            }
            tracing::error!(
                sink = sink.name(),
                events = refused.len(),
                error = %refused[0].1,
                "the sink refuses events; they are set aside (`appliance sink dead-letters`) and the rest flows"
            );
            let letters = dead_letters(sink.name(), &write, &refused);
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.add_dead_letters(letters))
                .await
                .map_err(|e| StepFailure::Store(StoreError::Conflict(e.to_string())))??;
            let at: Vec<At> = refused.iter().map(|(at, _)| *at).collect();
            // A sink that would store an event twice is not sent what the halves stored.
            let mut left_out = at.clone();
            if !sink.deduplicates_by_key() {
                left_out.extend(stored);
            }
            let written = sink.write(remainder(&write, &left_out), position).await?;
            Ok(widen(&write, &at, &left_out, written))
        }
        other => Ok(other?),
    }
}

/// Why a write (with its setting aside) failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum StepFailure {
    #[error("{0}")]
    Sink(#[from] SinkError),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Writes the dead letters of `sink` marked for resending: those it takes leave the dead
/// letters, those it refuses again stay with its new words.
pub(super) async fn resend(sink: &dyn Sink, store: &Store) -> Result<(), StepFailure> {
    let name = sink.name();
    let reader = store.clone();
    let letters: Vec<DeadLetter> =
        tokio::task::spawn_blocking(move || reader.dead_letters(Some(name), true, RESEND_AT_ONCE))
            .await
            .map_err(|e| StepFailure::Store(StoreError::Conflict(e.to_string())))??;
    if letters.is_empty() {
        return Ok(());
    }
    let write = SinkWrite {
        batches: Arc::new(
            letters
                .iter()
                .map(|l| QueuedBatch {
                    seq: l.queue_position,
                    batch: crate::event::IngestBatch {
                        team_id: l.team,
                        received_at: l.at,
                        sent_at: None,
                        ip: None,
                        events: vec![l.event.clone()],
                    },
                })
                .collect(),
        ),
        columns: Arc::new(
            letters
                .iter()
                .map(|l| {
                    l.columns
                        .iter()
                        .map(|c| PersonColumns {
                            person_id: c.person_id,
                            person_properties: Arc::from(c.person_properties.as_str()),
                            person_created_at: c.person_created_at,
                            person_mode: c.person_mode,
                        })
                        .collect()
                })
                .collect(),
        ),
        persons: Arc::new(PersonUpdates::default()),
    };
    let (refused, _) = refused_events(sink, &write, false).await?;
    let again: Vec<(u64, String)> = refused
        .iter()
        .filter_map(|((b, _), error)| letters.get(*b).map(|l| (l.id, error.clone())))
        .collect();
    let stored: Vec<u64> = letters
        .iter()
        .map(|l| l.id)
        .filter(|id| !again.iter().any(|(r, _)| r == id))
        .collect();
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.settle_dead_letters(&stored, &again))
        .await
        .map_err(|e| StepFailure::Store(StoreError::Conflict(e.to_string())))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventRow, IngestBatch};

    fn write(sizes: &[usize]) -> SinkWrite {
        let batches = sizes
            .iter()
            .enumerate()
            .map(|(b, n)| QueuedBatch {
                seq: b as u64 + 10,
                batch: IngestBatch {
                    team_id: 1,
                    received_at: chrono::DateTime::UNIX_EPOCH,
                    sent_at: None,
                    ip: None,
                    events: (0..*n)
                        .map(|e| EventRow {
                            uuid: uuid::Uuid::from_u128((b * 100 + e) as u128),
                            event: format!("{b}.{e}"),
                            distinct_id: "u".into(),
                            properties: "{}".into(),
                            timestamp: chrono::DateTime::UNIX_EPOCH,
                            elements_chain: String::new(),
                        })
                        .collect(),
                },
            })
            .collect();
        SinkWrite {
            batches: Arc::new(batches),
            columns: Arc::new(Vec::new()),
            persons: Arc::new(PersonUpdates::default()),
        }
    }

    fn names(write: &SinkWrite) -> Vec<Vec<String>> {
        write
            .batches
            .iter()
            .map(|q| q.batch.events.iter().map(|e| e.event.clone()).collect())
            .collect()
    }

    #[test]
    fn a_subset_keeps_its_batches_positions_and_order() {
        let w = write(&[3, 2]);
        let sub = subset(&w, &[(0, 2), (1, 0), (1, 1)]);
        assert_eq!(names(&sub), [vec!["0.2"], vec!["1.0", "1.1"]]);
        assert_eq!(sub.batches[1].seq, 11);
    }

    #[test]
    fn the_remainder_and_its_answer_keep_the_shape_of_the_write() {
        let w = write(&[3, 2]);
        let refused = [(0, 1), (1, 0)];
        let rest = remainder(&w, &refused);
        assert_eq!(names(&rest), [vec!["0.0", "0.2"], vec!["1.1"]]);
        let of_rest = Written {
            inserted: vec![vec![true, false], vec![true]],
        };
        assert_eq!(
            widen(&w, &refused, &refused, of_rest.clone()).inserted,
            [vec![true, false, false], vec![false, true]]
        );
        // Left out because a half stored it: counted as inserted.
        let left_out = [(0, 1), (1, 0), (0, 0)];
        let of_rest = Written {
            inserted: vec![vec![false], vec![true]],
        };
        assert_eq!(
            widen(&w, &refused, &left_out, of_rest).inserted,
            [vec![true, false, false], vec![false, true]]
        );
        let letters = dead_letters("postgres", &w, &[((1, 0), "no".into())]);
        assert_eq!(letters.len(), 1);
        assert_eq!(
            (letters[0].queue_position, letters[0].event.event.as_str()),
            (11, "1.0")
        );
    }
}
