//! Misbehaves on purpose, as its settings say, so the tests can show that the host contains it.
//!
//! `mode` (what `process-event` does): `loop` spins forever, `memory` allocates without end,
//! `trap` panics, `garbage` returns an event that is not valid, `fetch` calls `url` and records
//! the answer, `tag` appends its `name` to the `chain` property, `drop` drops the event, `geoip`
//! records where the event's `$ip` is, `sleep` sleeps a minute, `slow` busy-waits `ms`,
//! `storage-flood` / `cache-flood` / `log-flood` / `job-flood` write until refused (recording
//! what they were told), `huge` returns a 5 MB event, `deep` returns properties nested 1,000
//! deep.
//! `setup`: `hang` spins forever, `sleep` sleeps a minute. `teardown`: `log` logs that it ran.

use std::time::{Duration, Instant};

use appliance_pdk::{
    cache, config, geoip, http, jobs, json, log, storage, Error, Event, Exports, Plugin, Value,
};

struct Hostile;

fn spin_for(ms: u64) {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// Writes until the host refuses; returns (how many got in, the refusal).
fn flood(mut write: impl FnMut(u64) -> Result<(), String>) -> (u64, Option<String>) {
    for n in 0..1_000_000u64 {
        if let Err(refusal) = write(n) {
            return (n, Some(refusal));
        }
    }
    (1_000_000, None)
}

impl Plugin for Hostile {
    const EXPORTS: Exports = Exports::PROCESS_EVENT
        .union(Exports::PROCESS_EVENT_BATCH)
        .union(Exports::SETUP)
        .union(Exports::TEARDOWN);
    const JOBS: &'static [&'static str] = &["noop"];

    fn setup() -> Result<(), Error> {
        match config::get("setup").unwrap_or_default().as_str() {
            "hang" => loop {
                std::hint::spin_loop();
            },
            "sleep" => std::thread::sleep(Duration::from_secs(60)),
            _ => {}
        }
        Ok(())
    }

    fn teardown() {
        if config::get("teardown").as_deref() == Some("log") {
            log::info("teardown ran");
        }
    }

    fn run_job(_name: &str, _payload: Value) -> Result<(), Error> {
        Ok(())
    }

    fn process_event(mut event: Event) -> Result<Option<Event>, Error> {
        match config::get("mode").unwrap_or_default().as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => panic!("this plugin traps on purpose"),
            "garbage" => {
                event.uuid = "not-a-uuid".into();
                event.timestamp = "yesterday-ish".into();
                event.team_id += 1;
                Ok(Some(event))
            }
            "fetch" => {
                let url = config::get("url").unwrap_or_default();
                let outcome = match http::fetch(&http::Request {
                    method: "GET".into(),
                    url,
                    headers: vec![],
                    body: None,
                    timeout_ms: Some(30_000),
                }) {
                    Ok(response) => json!({"status": response.status}),
                    Err(error) => json!({"error": error}),
                };
                event.properties.insert("fetch", outcome);
                Ok(Some(event))
            }
            "tag" => {
                let name = config::get("name").unwrap_or_default();
                let chain = match event.properties.remove("chain") {
                    Some(Value::String(c)) => format!("{c},{name}"),
                    _ => name,
                };
                event.properties.insert("chain", chain);
                Ok(Some(event))
            }
            "drop" => Ok(None),
            "geoip" => {
                let ip = event
                    .properties
                    .get_str("$ip")
                    .or(event.ip.clone())
                    .unwrap_or_default();
                let found = match geoip::locate(&ip) {
                    Some(l) => json!({
                        "country_code": l.country_code, "country_name": l.country_name,
                        "city_name": l.city_name, "subdivision_code": l.subdivision_code,
                        "postal_code": l.postal_code, "continent_code": l.continent_code,
                        "latitude": l.latitude, "longitude": l.longitude, "time_zone": l.time_zone,
                    }),
                    None => Value::Null,
                };
                event.properties.insert("geo", found);
                Ok(Some(event))
            }
            "sleep" => {
                std::thread::sleep(Duration::from_secs(60));
                Ok(Some(event))
            }
            "slow" => {
                let ms = config::get("ms")
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(200);
                spin_for(ms);
                event.properties.insert("slow", true);
                Ok(Some(event))
            }
            "storage-flood" => {
                let value = "s".repeat(64 * 1024);
                let (stored, refusal) = flood(|n| storage::set(&format!("k{n}"), &value));
                event
                    .properties
                    .insert("flood", json!({"stored": stored, "refusal": refusal}));
                Ok(Some(event))
            }
            "cache-flood" => {
                let value = "c".repeat(1 << 20);
                let (stored, refusal) = flood(|n| {
                    if n >= 200 {
                        return Err("enough".into());
                    }
                    cache::set(&format!("c{n}"), &value, None)
                });
                let first_kept = cache::get("c0").is_some();
                let last_kept = cache::get("c199").is_some();
                let too_big = cache::set("huge", &"h".repeat(12 << 20), None).err();
                event.properties.insert(
                    "flood",
                    json!({"stored": stored, "refusal": refusal, "first_kept": first_kept,
                           "last_kept": last_kept, "too_big": too_big}),
                );
                Ok(Some(event))
            }
            "log-flood" => {
                let line = "l".repeat(100_000);
                for _ in 0..5_000 {
                    log::info(&line);
                }
                Ok(Some(event))
            }
            "job-flood" => {
                let (queued, refusal) =
                    flood(|_| jobs::run_in("noop", &json!({}), 3_600_000).map(|_| ()));
                event
                    .properties
                    .insert("flood", json!({"queued": queued, "refusal": refusal}));
                Ok(Some(event))
            }
            "huge" => {
                event.properties.insert("big", "b".repeat(5 << 20));
                Ok(Some(event))
            }
            "deep" => {
                let mut nested = Value::Null;
                for _ in 0..1_000 {
                    nested = Value::Array(vec![nested]);
                }
                event.properties.insert("deep", nested);
                Ok(Some(event))
            }
            other => Err(Error::failed(format!("unknown mode {other:?}"))),
        }
    }
}

appliance_pdk::plugin!(Hostile);
