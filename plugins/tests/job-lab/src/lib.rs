//! Jobs that behave in every way the job queue must handle, so the tests can show it does:
//! `flaky` fails until its attempt `succeed_on`, `doomed` always asks for a retry, `refuse`
//! fails permanently, `spin` never returns, `polite` runs until cancelled, `steps` saves a
//! checkpoint after each step (and fails once at `fail_at`), `slow` busy-waits `ms` (counting
//! its runs in its checkpoint), `fan-out` starts `parts` jobs and a `join` that waits for them,
//! and `extract` → `transform` → `load` is a chain; `noop` does nothing (the benchmark's job) and
//! `setup` counts itself, so the tests see how many instances ran jobs. What ran is written to
//! storage (committed when each call ends) for the tests to read; a running job shows in its
//! checkpoint, and `slow` records the wall-clock span it ran in.

use std::time::{Duration, Instant};

use appliance_pdk::{jobs, json, storage, Error, Exports, Plugin, Value};

struct JobLab;

fn incr(key: &str) -> i64 {
    let next = storage::get(key)
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
        + 1;
    // Storage is far from its quota here; a refusal would be a test failure anyway.
    let _ = storage::set(key, &next.to_string());
    next
}

fn busy_wait(ms: u64) {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// Milliseconds since the Unix epoch, by the host's wall clock (the same for every instance).
fn wall_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl Plugin for JobLab {
    const EXPORTS: Exports = Exports::SETUP;
    const JOBS: &'static [&'static str] = &[
        "flaky",
        "doomed",
        "refuse",
        "spin",
        "polite",
        "steps",
        "slow",
        "fan-out",
        "part",
        "join",
        "extract",
        "transform",
        "load",
        "reuse-key",
        "bad-after",
        "nap",
        "noop",
        "huge-follow-up",
        "echo-config",
        "record",
    ];

    fn setup() -> Result<(), Error> {
        // One key per instance: instances set up side by side would race on a counter.
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        storage::set(&format!("setup:{at}"), "1").map_err(Error::retry)
    }

    fn run_job(name: &str, payload: Value) -> Result<(), Error> {
        match name {
            "flaky" => {
                let attempt = incr("flaky_attempts");
                if attempt < payload["succeed_on"].as_i64().unwrap_or(1) {
                    return Err(Error::retry(format!("attempt {attempt} fails on purpose")));
                }
                storage::set("flaky_done", &attempt.to_string()).map_err(Error::retry)?;
                Ok(())
            }
            "doomed" => {
                incr("doomed_attempts");
                Err(Error::retry("this job never succeeds"))
            }
            "refuse" => {
                incr("refuse_attempts");
                Err(Error::failed("this job fails permanently"))
            }
            "spin" => {
                // Storage commits when a call ends; a checkpoint is durable at once, so the
                // tests see the job has started.
                jobs::save_checkpoint("spinning").map_err(Error::retry)?;
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "polite" => {
                jobs::save_checkpoint("started").map_err(Error::retry)?;
                while !jobs::cancelled() {
                    busy_wait(10);
                }
                storage::set("polite_stopped", "1").map_err(Error::retry)?;
                Ok(())
            }
            "steps" => {
                let total = payload["total"].as_u64().unwrap_or(5);
                let fail_at = payload["fail_at"].as_u64();
                let start: u64 = jobs::checkpoint().and_then(|c| c.parse().ok()).unwrap_or(0);
                for step in start..total {
                    let done = storage::get("steps_done").unwrap_or_default();
                    storage::set("steps_done", &format!("{done}{step},")).map_err(Error::retry)?;
                    jobs::save_checkpoint(&(step + 1).to_string()).map_err(Error::failed)?;
                    if Some(step) == fail_at && storage::get("steps_failed_once").is_none() {
                        storage::set("steps_failed_once", "1").map_err(Error::retry)?;
                        return Err(Error::retry(format!("failing once after step {step}")));
                    }
                }
                Ok(())
            }
            "slow" => {
                let tag = payload["tag"].as_str().unwrap_or("slow").to_owned();
                // Each run counts itself in the checkpoint, durable at once.
                let run = jobs::checkpoint()
                    .and_then(|c| c.parse::<u64>().ok())
                    .unwrap_or(0)
                    + 1;
                jobs::save_checkpoint(&run.to_string()).map_err(Error::retry)?;
                incr(&format!("{tag}_started"));
                let began = wall_ms();
                busy_wait(payload["ms"].as_u64().unwrap_or(1000));
                let span = format!("{began}-{}", wall_ms());
                incr(&format!("{tag}_finished"));
                storage::set(&format!("{tag}_runs"), &run.to_string()).map_err(Error::retry)?;
                // Jobs running side by side race on the counters above; this key is their own.
                let id = jobs::current_job().unwrap_or_default();
                storage::set(&format!("{tag}_done:{id}"), &span).map_err(Error::retry)?;
                Ok(())
            }
            "fan-out" => {
                let parts = payload["parts"].as_u64().unwrap_or(3);
                let mut ids = Vec::new();
                for i in 0..parts {
                    ids.push(jobs::run_now("part", &json!({ "i": i })).map_err(Error::failed)?);
                }
                jobs::enqueue_job(
                    "join",
                    &json!({ "parts": parts }),
                    &jobs::options(None, &ids),
                )
                .map_err(Error::failed)?;
                Ok(())
            }
            "part" => {
                let i = payload["i"].as_u64().unwrap_or(0);
                busy_wait(50 * (3 - i.min(3)));
                storage::set(&format!("part:{i}"), "done").map_err(Error::retry)?;
                Ok(())
            }
            "join" => {
                let parts = payload["parts"].as_u64().unwrap_or(0);
                let done = (0..parts)
                    .filter(|i| storage::get(&format!("part:{i}")).is_some())
                    .count();
                if done as u64 != parts {
                    return Err(Error::failed(format!(
                        "join ran with {done} of {parts} parts done"
                    )));
                }
                storage::set("joined", &done.to_string()).map_err(Error::retry)?;
                Ok(())
            }
            "extract" => {
                jobs::run_now("transform", &json!({ "rows": [1, 2, 3] })).map_err(Error::failed)?;
                Ok(())
            }
            "transform" => {
                let rows: Vec<i64> = payload["rows"]
                    .as_array()
                    .map(|r| r.iter().filter_map(Value::as_i64).map(|v| v * 10).collect())
                    .unwrap_or_default();
                jobs::run_now("load", &json!({ "rows": rows })).map_err(Error::failed)?;
                Ok(())
            }
            "load" => {
                let sum: i64 = payload["rows"]
                    .as_array()
                    .map(|r| r.iter().filter_map(Value::as_i64).sum())
                    .unwrap_or(0);
                storage::set("loaded", &sum.to_string()).map_err(Error::retry)?;
                Ok(())
            }
            "reuse-key" => {
                // A key a kept job already holds, then one new key used twice in this job.
                let key = payload["key"].as_str().unwrap_or("dup");
                let existing =
                    jobs::enqueue_job("part", &json!({}), &jobs::options(Some(key), &[]))
                        .map_err(Error::failed)?;
                let first =
                    jobs::enqueue_job("part", &json!({}), &jobs::options(Some("fresh"), &[]))
                        .map_err(Error::failed)?;
                let second =
                    jobs::enqueue_job("part", &json!({}), &jobs::options(Some("fresh"), &[]))
                        .map_err(Error::failed)?;
                storage::set("reuse_existing", &existing).map_err(Error::retry)?;
                storage::set("reuse_first", &first).map_err(Error::retry)?;
                storage::set("reuse_second", &second).map_err(Error::retry)?;
                Ok(())
            }
            "noop" => Ok(()),
            "record" => {
                // One key per job (jobs run side by side: a shared counter would race).
                let job = jobs::current_job().unwrap_or_default();
                storage::set(&format!("recorded:{job}"), &payload.to_string()).map_err(Error::retry)
            }
            "echo-config" => {
                let label = appliance_pdk::config::get("label").unwrap_or_default();
                storage::set("echoed_label", &label).map_err(Error::retry)
            }
            "huge-follow-up" => {
                // A payload past the host's limit: refused at the call, the job goes on.
                let big = json!({"blob": "x".repeat(2 << 20)});
                let refused = jobs::enqueue_job("noop", &big, &jobs::options(None, &[]));
                storage::set("huge_follow_up", &format!("{refused:?}")).map_err(Error::retry)?;
                Ok(())
            }
            "nap" => {
                jobs::save_checkpoint("napping").map_err(Error::retry)?;
                std::thread::sleep(Duration::from_secs(60));
                Ok(())
            }
            "bad-after" => {
                let unknown = payload["after"].as_str().unwrap_or_default().to_owned();
                let refused =
                    jobs::enqueue_job("part", &json!({}), &jobs::options(None, &[unknown]));
                storage::set("bad_after", &format!("{refused:?}")).map_err(Error::retry)?;
                Ok(())
            }
            other => Err(Error::failed(format!("no job named {other:?}"))),
        }
    }
}

appliance_pdk::plugin!(JobLab);
