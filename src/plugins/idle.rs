//! Instances kept between a plugin config's jobs, as PostHog keeps one VM per plugin config:
//! `setup` runs once per instance, not once per job, and a job costs one call.
//!
//! Owns: the idle instances, each with the catalog entry it was made from; which are still
//! usable (the same entry, so the same config and plugin build); their `teardown` when they are
//! discarded (replaced or disabled config, or past the cap).
//! Must never: hand out an instance of another config or an older build, keep an instance
//! that trapped, timed out, ran out of memory or was terminated (the caller drops those), or
//! keep more than its cap (each idle instance holds its linear memory).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use super::runtime::Instance;
use super::Entry;

struct Idle {
    entry: Arc<Entry>,
    instance: Instance,
}

/// Idle instances, most recently used last.
pub struct IdleInstances {
    kept: Mutex<Kept>,
    cap: usize,
}

#[derive(Default)]
struct Kept {
    idle: VecDeque<Idle>,
    /// The catalog generation the idle instances were last checked against.
    generation: Option<u64>,
}

impl IdleInstances {
    /// Keeps at most `cap` idle instances (0 keeps none: every job gets a fresh instance).
    pub fn new(cap: usize) -> IdleInstances {
        IdleInstances {
            kept: Mutex::default(),
            cap,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle instance made from exactly `entry`, if one is kept. When the catalog's
    /// `generation` moved, instances of entries no longer in `current` are torn down first.
    pub fn take(
        &self,
        entry: &Arc<Entry>,
        generation: u64,
        current: &[Arc<Entry>],
    ) -> Option<Instance> {
        let mut stale = Vec::new();
        let found = {
            let mut kept = self.lock();
            if kept.generation != Some(generation) {
                kept.generation = Some(generation);
                let (keep, gone): (VecDeque<Idle>, VecDeque<Idle>) = std::mem::take(&mut kept.idle)
                    .into_iter()
                    .partition(|i| current.iter().any(|c| Arc::ptr_eq(c, &i.entry)));
                kept.idle = keep;
                stale.extend(gone);
            }
            let at = kept.idle.iter().rposition(|i| Arc::ptr_eq(&i.entry, entry));
            at.and_then(|at| kept.idle.remove(at))
        };
        tear_down(stale);
        found.map(|i| i.instance)
    }

    /// Keeps `instance` for the next job of `entry`; past the cap the least recently used one
    /// is torn down.
    pub fn put(&self, entry: Arc<Entry>, instance: Instance) {
        let mut evicted = Vec::new();
        {
            let mut kept = self.lock();
            kept.idle.push_back(Idle { entry, instance });
            while kept.idle.len() > self.cap {
                evicted.extend(kept.idle.pop_front());
            }
        }
        tear_down(evicted);
    }
}

/// Runs `teardown` on discarded instances, outside the lock (it may take the setup deadline).
fn tear_down(discarded: impl IntoIterator<Item = Idle>) {
    for mut idle in discarded {
        if let Err(e) = idle.instance.teardown() {
            tracing::warn!(config = idle.entry.config.id, error = %e, "plugin teardown failed");
        }
    }
}
