//! The pipeline's person step: runs PostHog's person rules ([`crate::person::process`]) over
//! each prepared batch in queue order, with the persons read from memory in front of redb.
//!
//! What a step changes is not committed here: it waits as a pending layer until the write stage
//! commits it with the delivery mark (`Store::commit_deliveries`), so persons always stand
//! exactly at that mark. Later steps read through the pending layers, newest first, then the
//! cache of committed state (bounded by `DISTINCT_ID_LRU_SIZE`), then the store. After a crash
//! the pending layers are gone with the memory, and the batches they came from are recomputed
//! from the rows the sink stored (the rows already carry the step's rewriting, and the rules give
//! the same changes over them).

mod shared;

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Arc;

use bloomfilter::Bloom;
use lru::LruCache;
use uuid::Uuid;

use crate::event::EventRow;
use crate::ids::TeamId;
use crate::person::process::{PersonProcessor, PersonState};
use crate::person::{DistinctId, Group, Person, PersonChange, PersonColumns, PersonUpdates};
use crate::store::{PersonsReader, QueuedBatch, Store, StoreError};

/// The person step's memory: committed state cached, and the steps not yet committed.
pub struct PersonEngine {
    store: Store,
    distinct_ids: LruCache<(TeamId, String), Option<DistinctId>>,
    persons: LruCache<(TeamId, Uuid), Option<Arc<Person>>>,
    personless: LruCache<(TeamId, String), Option<bool>>,
    groups: LruCache<(TeamId, u8, String), Option<Group>>,
    group_types: LruCache<TeamId, Vec<(String, u8)>>,
    /// Changes of steps not yet committed, oldest first, with the queue position of each.
    pending: VecDeque<(u64, PersonUpdates)>,
    /// Every event the store remembers as seen is in it (built from the store on first use,
    /// fed with each commit), so a new event is known new without a look-up.
    seen_filter: Option<SeenFilter>,
}

/// A Bloom filter of seen events: "no" is certain, "maybe" is asked of the store.
struct SeenFilter {
    bloom: Bloom<(TeamId, Uuid)>,
    /// Events set since it was built: past its capacity it is built again (the store has
    /// dropped older generations by then, and the false positives would grow).
    items: u64,
}

/// Events the filter is sized for: the store keeps at most two generations.
const SEEN_FILTER_ITEMS: u64 = 2 * crate::store::SEEN_GENERATION_EVENTS;

/// What the step made of one prepared batch list.
pub struct Step {
    /// For each batch given, the person columns of each event kept.
    pub columns: Vec<Vec<PersonColumns>>,
    pub updates: PersonUpdates,
}

impl PersonEngine {
    pub fn new(store: Store, cache_size: usize) -> PersonEngine {
        let size = NonZeroUsize::new(cache_size.max(1)).unwrap_or(NonZeroUsize::MIN);
        let small = NonZeroUsize::new(cache_size.clamp(1, 1_000)).unwrap_or(NonZeroUsize::MIN);
        PersonEngine {
            store,
            distinct_ids: LruCache::new(size),
            persons: LruCache::new(size),
            personless: LruCache::new(size),
            groups: LruCache::new(small),
            group_types: LruCache::new(small),
            pending: VecDeque::new(),
            seen_filter: None,
        }
    }

    /// The seen-event filter, built from the store if there is none.
    fn seen_filter(&mut self) -> Result<&mut SeenFilter, StoreError> {
        if self.seen_filter.is_none() {
            let mut bloom =
                Bloom::new_for_fp_rate(SEEN_FILTER_ITEMS as usize, 0.01).map_err(|e| {
                    StoreError::Corrupt {
                        what: "seen-event filter",
                        detail: e.to_string(),
                    }
                })?;
            let mut items = 0;
            self.store.each_seen_event(|team, event| {
                bloom.set(&(team, event));
                items += 1;
            })?;
            self.seen_filter = Some(SeenFilter { bloom, items });
        }
        match self.seen_filter.as_mut() {
            Some(filter) => Ok(filter),
            None => Err(StoreError::Unavailable),
        }
    }

    /// Runs the step over `batches` (in the order given, which is queue order per team):
    /// events are rewritten in place and dropped ones removed. `through` is the queue position
    /// the step's changes commit with.
    pub fn process(
        &mut self,
        batches: &mut [QueuedBatch],
        through: u64,
    ) -> Result<Step, StoreError> {
        let mut view = View {
            engine: self,
            reader: None,
        };
        let mut processor = PersonProcessor::new(&mut view);
        let mut columns = Vec::with_capacity(batches.len());
        for queued in batches.iter_mut() {
            let team = queued.batch.team_id;
            let mut kept: Vec<EventRow> = Vec::with_capacity(queued.batch.events.len());
            let mut batch_columns = Vec::with_capacity(queued.batch.events.len());
            for mut row in std::mem::take(&mut queued.batch.events) {
                if let Some(found) = processor.process(team, &mut row)? {
                    kept.push(row);
                    batch_columns.push(found);
                }
            }
            queued.batch.events = kept;
            columns.push(batch_columns);
        }
        let updates = processor.updates;
        if !updates.is_empty() {
            self.pending.push_back((through, updates.clone()));
        }
        Ok(Step { columns, updates })
    }

    /// The requests not already carried out by a step waiting for its commit.
    pub fn not_in_flight(&self, requests: Vec<(TeamId, String)>) -> Vec<(TeamId, String)> {
        requests
            .into_iter()
            .filter(|r| {
                !self
                    .pending
                    .iter()
                    .any(|(_, layer)| layer.deletions_done.contains(r))
            })
            .collect()
    }

    /// Carries out operators' deletion requests: a step of its own, committed like any other.
    pub fn delete(
        &mut self,
        requests: &[(TeamId, String)],
        through: u64,
    ) -> Result<PersonUpdates, StoreError> {
        let mut view = View {
            engine: self,
            reader: None,
        };
        let mut processor = PersonProcessor::new(&mut view);
        for (team, id) in requests {
            processor.delete_person(*team, id)?;
        }
        let updates = processor.updates;
        self.pending.push_back((through, updates.clone()));
        Ok(updates)
    }

    /// Recomputes the changes (and the person columns) of batches the sink stored before a
    /// crash, from its rows.
    pub fn recompute(
        &mut self,
        batches: Vec<(TeamId, Vec<EventRow>)>,
        through: u64,
    ) -> Result<Step, StoreError> {
        let mut queued: Vec<QueuedBatch> = batches
            .into_iter()
            .map(|(team, events)| QueuedBatch {
                seq: through,
                batch: crate::event::IngestBatch {
                    team_id: team,
                    received_at: chrono::DateTime::UNIX_EPOCH,
                    sent_at: None,
                    ip: None,
                    events,
                },
            })
            .collect();
        self.process(&mut queued, through)
    }

    /// The write stage committed everything through `position`: those layers become the cache's.
    pub fn committed(&mut self, position: u64) {
        while let Some((through, _)) = self.pending.front() {
            if *through > position {
                break;
            }
            let Some((_, updates)) = self.pending.pop_front() else {
                break;
            };
            if let Some(filter) = self.seen_filter.as_mut() {
                for key in &updates.seen {
                    filter.bloom.set(key);
                }
                filter.items += updates.seen.len() as u64;
                if filter.items > SEEN_FILTER_ITEMS {
                    self.seen_filter = None;
                }
            }
            self.cache(updates);
        }
    }

    /// Forgets everything not committed (the write stage gave up: the batches are read again
    /// at the next start).
    pub fn abandon(&mut self) {
        self.pending.clear();
        self.clear_cache();
        self.seen_filter = None;
    }

    /// Forgets the cache (persons changed outside the pipeline).
    pub fn clear_cache(&mut self) {
        self.distinct_ids.clear();
        self.persons.clear();
        self.personless.clear();
        self.groups.clear();
        self.group_types.clear();
    }

    fn cache(&mut self, updates: PersonUpdates) {
        for ((team, uuid), change) in updates.persons {
            let person = match change {
                PersonChange::Upsert(person) => Some(person),
                PersonChange::Deleted { .. } => None,
            };
            self.persons.put((team, uuid), person);
        }
        for (key, now) in updates.distinct_ids {
            self.distinct_ids.put(key, now);
        }
        for (key, merged) in updates.personless {
            self.personless.put(key, Some(merged));
        }
        for ((team, _), _) in updates.group_types {
            self.group_types.pop(&team);
        }
        for (key, group) in updates.groups {
            self.groups.put(key, Some(group));
        }
    }
}

/// The state one step reads: pending layers, newest first, then the cache, then the store.
struct View<'a> {
    engine: &'a mut PersonEngine,
    reader: Option<PersonsReader>,
}

impl View<'_> {
    fn reader(&mut self) -> Result<&PersonsReader, StoreError> {
        if self.reader.is_none() {
            self.reader = Some(self.engine.store.persons_reader()?);
        }
        match &self.reader {
            Some(reader) => Ok(reader),
            None => Err(StoreError::Unavailable),
        }
    }

    fn pending<T>(&self, find: impl Fn(&PersonUpdates) -> Option<T>) -> Option<T> {
        self.engine.pending.iter().rev().find_map(|(_, u)| find(u))
    }
}

impl PersonState for View<'_> {
    type Error = StoreError;

    fn distinct_id(&mut self, team: TeamId, id: &str) -> Result<Option<DistinctId>, StoreError> {
        let key = (team, id.to_owned());
        if let Some(found) = self.pending(|u| u.distinct_ids.get(&key).cloned()) {
            return Ok(found);
        }
        if let Some(found) = self.engine.distinct_ids.get(&key) {
            return Ok(found.clone());
        }
        let found = self.reader()?.distinct_id(team, id)?;
        self.engine.distinct_ids.put(key, found.clone());
        Ok(found)
    }

    fn person(&mut self, team: TeamId, uuid: Uuid) -> Result<Option<Arc<Person>>, StoreError> {
        let key = (team, uuid);
        if let Some(found) = self.pending(|u| u.persons.get(&key).cloned()) {
            return Ok(match found {
                PersonChange::Upsert(person) => Some(person),
                PersonChange::Deleted { .. } => None,
            });
        }
        if let Some(found) = self.engine.persons.get(&key) {
            return Ok(found.clone());
        }
        let found = self.reader()?.person(team, uuid)?.map(Arc::new);
        self.engine.persons.put(key, found.clone());
        Ok(found)
    }

    fn distinct_ids_of(&mut self, team: TeamId, uuid: Uuid) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self.reader()?.distinct_ids_of(team, uuid)?;
        // Pending layers, oldest first, move ids to and from the person.
        for (_, layer) in &self.engine.pending {
            for ((t, id), now) in &layer.distinct_ids {
                if *t != team {
                    continue;
                }
                let points_here = now.as_ref().is_some_and(|d| d.person == uuid);
                match (points_here, ids.iter().position(|known| known == id)) {
                    (true, None) => ids.push(id.clone()),
                    (false, Some(at)) => {
                        ids.remove(at);
                    }
                    _ => {}
                }
            }
        }
        Ok(ids)
    }

    fn personless(&mut self, team: TeamId, id: &str) -> Result<Option<bool>, StoreError> {
        let key = (team, id.to_owned());
        if let Some(found) = self.pending(|u| u.personless.get(&key).copied()) {
            return Ok(Some(found));
        }
        if let Some(found) = self.engine.personless.get(&key) {
            return Ok(*found);
        }
        let found = self.reader()?.personless(team, id)?;
        self.engine.personless.put(key, found);
        Ok(found)
    }

    fn group_types(&mut self, team: TeamId) -> Result<Vec<(String, u8)>, StoreError> {
        let mut types = match self.engine.group_types.get(&team) {
            Some(types) => types.clone(),
            None => {
                let types = self.reader()?.group_types(team)?;
                self.engine.group_types.put(team, types.clone());
                types
            }
        };
        for (_, layer) in &self.engine.pending {
            for ((t, name), index) in &layer.group_types {
                if *t == team && !types.iter().any(|(known, _)| known == name) {
                    types.push((name.clone(), *index));
                }
            }
        }
        Ok(types)
    }

    fn seen(&mut self, team: TeamId, event: Uuid) -> Result<bool, StoreError> {
        let key = (team, event);
        if self
            .engine
            .pending
            .iter()
            .any(|(_, u)| u.seen.contains(&key))
        {
            return Ok(true);
        }
        if !self.engine.seen_filter()?.bloom.check(&key) {
            return Ok(false);
        }
        self.reader()?.seen(team, event)
    }

    fn group(&mut self, team: TeamId, index: u8, key: &str) -> Result<Option<Group>, StoreError> {
        let cache_key = (team, index, key.to_owned());
        if let Some(found) = self.pending(|u| u.groups.get(&cache_key).cloned()) {
            return Ok(Some(found));
        }
        if let Some(found) = self.engine.groups.get(&cache_key) {
            return Ok(found.clone());
        }
        let found = self.reader()?.group(team, index, key)?;
        self.engine.groups.put(cache_key, found.clone());
        Ok(found)
    }
}
