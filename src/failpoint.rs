//! Named failure points for crash tests: with `APPLIANCE_FAILPOINTS=name,…` set, the process
//! aborts (as a `kill -9` would stop it) the first time it reaches a named point, so a test can
//! crash it at exactly the moment an invariant is about (between a sink write and the queuing of
//! its deliveries, say) instead of hoping a signal lands there. A point armed as
//! `name=pause:MS` pauses there instead, each time, so a test can act in between (another box
//! writing while this one holds a write).
//!
//! Owns: the armed names, [`hit`] and [`pause`].
//! Must never: cost more than an atomic load when no point is armed (the default), or import
//! another module of the crate (it is the bottom layer).

use std::sync::OnceLock;

static ARMED: OnceLock<Vec<String>> = OnceLock::new();

/// The points this build has, for `--help` and validation.
pub const POINTS: &[&str] = &[
    // After the sink committed a write that stored events, before their deliveries are queued.
    "pipeline.after_sink_write",
    // After the Postgres sink's parallel inserts committed, before the position's transaction.
    "postgres.before_position",
    // After the ClickHouse sink's inserts, before it records its position.
    "clickhouse.before_position",
    // After the Celery source's batches are durable, before its messages leave the processing
    // list.
    "celery.before_ack",
    // After the Kafka source's batches are durable, before its offsets are committed.
    "kafka.before_commit",
    // Before each sink write of the pipeline (for `=pause:MS`).
    "pipeline.before_sink_write",
];

/// Arms the named points (once, at start-up).
pub fn arm(names: Vec<String>) {
    let _ = ARMED.set(names);
}

/// Aborts the process if `name` is armed.
pub fn hit(name: &str) {
    if ARMED
        .get()
        .is_some_and(|armed| armed.iter().any(|n| n == name))
    {
        eprintln!("failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// How long to pause at `name`, if it is armed as `name=pause:MS`.
pub fn pause(name: &str) -> Option<std::time::Duration> {
    ARMED.get()?.iter().find_map(|armed| {
        let (point, action) = armed.split_once('=')?;
        let millis = action.strip_prefix("pause:")?.parse().ok()?;
        (point == name).then(|| std::time::Duration::from_millis(millis))
    })
}
