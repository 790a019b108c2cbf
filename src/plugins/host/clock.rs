//! WASI sleeps bounded by the call's deadline. A plugin's `std::thread::sleep` (or any wait on a
//! `wasi:clocks/monotonic-clock` pollable) would block its thread, past the call's deadline and
//! out of reach of the epoch interruption that stops running code. The two subscriptions are
//! shadowed here so that a wait ends no later than the call's deadline, or as soon as its job is
//! terminated; the interruption then stops the plugin as soon as it runs again.

use std::time::Duration;

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::p2::{subscribe, DynPollable, Pollable};

use super::HostState;

/// The clock interface the WASI implementation links (its newest 0.2 version; guests built
/// against an older 0.2 link to it too).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// A wait that ends at `until`, or as soon as the running job is terminated.
struct Wake {
    until: tokio::time::Instant,
    stop: Option<std::sync::Arc<crate::jobs::StopFlags>>,
}

/// How often a wait looks whether its job was terminated.
const STOP_POLL: Duration = Duration::from_millis(20);

#[wasmtime_wasi::async_trait]
impl Pollable for Wake {
    async fn ready(&mut self) {
        loop {
            let now = tokio::time::Instant::now();
            if now >= self.until || self.stop.as_ref().is_some_and(|s| s.terminated()) {
                return;
            }
            tokio::time::sleep((self.until - now).min(STOP_POLL)).await;
        }
    }
}

/// A pollable for a wait of `wanted`, cut to what the call has left.
fn bounded_wait(
    state: &mut HostState,
    wanted: Duration,
) -> wasmtime::Result<Resource<DynPollable>> {
    let wait = wanted.min(state.remaining());
    let until = tokio::time::Instant::now() + wait;
    let stop = state.job.as_ref().map(|j| j.stop.clone());
    let resource = state.table.push(Wake { until, stop })?;
    subscribe(&mut state.table, resource)
}

/// Replaces the monotonic clock's subscriptions with bounded ones (after WASI is linked).
pub fn shadow_sleeps(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: wasmtime::StoreContextMut<'_, HostState>, (nanos,): (u64,)| {
            Ok((bounded_wait(store.data_mut(), Duration::from_nanos(nanos))?,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: wasmtime::StoreContextMut<'_, HostState>, (when,): (u64,)| {
            let state = store.data_mut();
            let wanted = Duration::from_nanos(when.saturating_sub(state.clock.now_nanos()));
            Ok((bounded_wait(state, wanted)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The monotonic clock the guest reads: nanoseconds since the instance was made. The host
/// keeps its zero, so it can turn the guest's instants into waits.
#[derive(Clone, Copy)]
pub struct InstanceClock {
    zero: std::time::Instant,
}

impl Default for InstanceClock {
    /// A clock whose zero is now.
    fn default() -> InstanceClock {
        InstanceClock {
            zero: std::time::Instant::now(),
        }
    }
}

impl InstanceClock {
    fn now_nanos(&self) -> u64 {
        self.zero.elapsed().as_nanos().min(u64::MAX as u128) as u64
    }
}

impl wasmtime_wasi::HostMonotonicClock for InstanceClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.now_nanos()
    }
}
