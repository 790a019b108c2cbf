//! The write stage's last step: the after-write deliveries of what the sink stored, queued in
//! one transaction with the delivery mark and the deferred batches they complete.

use super::{Deliveries, Pipeline, Prepared, StepError};
use crate::plugins::tasks::{self, ToDeliver};
use crate::shutdown::Shutdown;
use crate::sinks::{StoredRows, Written};
use crate::store::{FollowRecord, QueuedBatch, WriteDone};

use super::backoff::Backoff;

impl Pipeline {
    /// Queues the deliveries of what the write inserted and of the stored batches being
    /// redelivered, retrying until they are durable; `false` if the shutdown deadline passed
    /// first (the batches are then read again at the next start, and not processed again).
    pub(super) async fn deliver(
        &self,
        prepared: &Prepared,
        written: &Written,
        shutdown: &mut Shutdown,
    ) -> bool {
        let mut backoff = Backoff::default();
        loop {
            if shutdown.deadline_passed() {
                return false;
            }
            match self.queue_deliveries(prepared, written).await {
                Ok(()) => return true,
                Err(e) => {
                    backoff
                        .wait(&self.status, "queuing deliveries", e, shutdown)
                        .await
                }
            }
        }
    }

    async fn queue_deliveries(
        &self,
        prepared: &Prepared,
        written: &Written,
    ) -> Result<(), StepError> {
        let follow = self
            .followers
            .as_ref()
            .and_then(|_| super::follow::record(prepared, written));
        let Some(deliveries) = &self.deliveries else {
            return self.finish_deferred(prepared, follow).await;
        };
        let catalog = deliveries.catalog.clone();
        let teams = tokio::task::spawn_blocking(move || tasks::exporting_teams(&catalog)).await??;
        let wanted = move |q: &QueuedBatch| teams.contains(&q.batch.team_id);
        let redeliver: Vec<QueuedBatch> = prepared
            .redeliver
            .iter()
            .filter(|q| wanted(q))
            .cloned()
            .collect();
        let fresh = prepared
            .process
            .iter()
            .zip(&prepared.deliver)
            .any(|(q, deliver)| *deliver && wanted(q));
        if redeliver.is_empty() && !fresh {
            return self.finish_deferred(prepared, follow).await;
        }
        let stored: StoredRows = prepared
            .redeliver
            .iter()
            .zip(&prepared.redeliver_rows)
            .filter(|(q, _)| wanted(q))
            .map(|(_, rows)| rows.clone())
            .collect();
        let Deliveries { catalog, queue } = deliveries;
        let (catalog, queue) = (catalog.clone(), queue.clone());
        let (process, deliver, inserted) = (
            prepared.process.clone(),
            prepared.deliver.clone(),
            written.inserted.clone(),
        );
        let (last, undefer) = (prepared.last, prepared.undefer.clone());
        let persons = prepared.persons.clone();
        tokio::task::spawn_blocking(move || {
            let mut items = Vec::new();
            for (queued, rows) in redeliver.iter().zip(&stored) {
                items.push(ToDeliver::of(&queued.batch, rows.iter().flatten()));
            }
            for ((queued, inserted), deliver) in process.iter().zip(&inserted).zip(&deliver) {
                if *deliver && wanted(queued) {
                    let rows = queued.batch.events.iter().zip(inserted);
                    let rows = rows.filter(|(_, inserted)| **inserted).map(|(row, _)| row);
                    items.push(ToDeliver::of(&queued.batch, rows));
                }
            }
            let jobs = tasks::delivery_jobs(&catalog, &items)?;
            if !jobs.is_empty() || !undefer.is_empty() || !persons.is_empty() || follow.is_some() {
                let done = WriteDone {
                    delivered: last,
                    undefer: &undefer,
                    persons: &persons,
                    follow: follow.as_ref(),
                };
                queue.commit_deliveries(jobs, done)?;
            }
            Ok::<_, StepError>(())
        })
        .await?
    }

    /// With no deliveries to queue, still commits the person changes and the follow log record,
    /// and records that deferred batches are complete.
    async fn finish_deferred(
        &self,
        prepared: &Prepared,
        follow: Option<FollowRecord>,
    ) -> Result<(), StepError> {
        if prepared.undefer.is_empty() && prepared.persons.is_empty() && follow.is_none() {
            return Ok(());
        }
        let (store, last, undefer) = (self.store.clone(), prepared.last, prepared.undefer.clone());
        let persons = prepared.persons.clone();
        tokio::task::spawn_blocking(move || {
            let done = WriteDone {
                delivered: last,
                undefer: &undefer,
                persons: &persons,
                follow: follow.as_ref(),
            };
            store.commit_deliveries(Vec::new(), crate::jobs::now_ms(), 0, done)
        })
        .await??;
        Ok(())
    }
}
