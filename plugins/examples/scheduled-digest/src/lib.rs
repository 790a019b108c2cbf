//! Scheduled digest: shows schedules, jobs and storage working together. `on-event` counts
//! stored events in the cache; `run-every-minute` takes the count and hands it to a durable job
//! (`fold`), which adds it to the digest in storage (`total`, `runs`). The job's
//! idempotency key is the slot run's own job id, so one slot folds in once.

use appliance_pdk::{cache, jobs, json, storage, Error, Event, Exports, Plugin, Value};

struct ScheduledDigest;

fn number(key: &str) -> i64 {
    storage::get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

impl Plugin for ScheduledDigest {
    const EXPORTS: Exports = Exports::ON_EVENT.union(Exports::RUN_EVERY_MINUTE);
    const JOBS: &'static [&'static str] = &["fold"];

    fn on_event(_event: Event) -> Result<(), Error> {
        cache::incr("pending", 1);
        Ok(())
    }

    fn run_every_minute() -> Result<(), Error> {
        let pending = cache::incr("pending", 0);
        cache::set("pending", "0", None).map_err(Error::retry)?;
        let minute = jobs::current_job().unwrap_or_default();
        let options = jobs::options(Some(&format!("fold:{minute}")), &[]);
        jobs::enqueue_job("fold", &json!({ "events": pending }), &options).map_err(Error::retry)?;
        storage::set(
            "scheduled_runs",
            &(number("scheduled_runs") + 1).to_string(),
        )
        .map_err(Error::retry)?;
        Ok(())
    }

    fn run_job(name: &str, payload: Value) -> Result<(), Error> {
        if name != "fold" {
            return Err(Error::failed(format!("no job named {name:?}")));
        }
        let events = payload["events"].as_i64().unwrap_or(0);
        storage::set("total", &(number("total") + events).to_string()).map_err(Error::retry)?;
        storage::set("runs", &(number("runs") + 1).to_string()).map_err(Error::retry)?;
        Ok(())
    }
}

appliance_pdk::plugin!(ScheduledDigest);
