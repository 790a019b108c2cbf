//! Misbehaves on purpose, as the `mode` setting says, so the tests can show that the host
//! contains it: `loop` spins forever, `memory` allocates without end, `trap` panics, `garbage`
//! returns an event that is not valid, `fetch` calls `url` (a host it may not have declared) and
//! records the answer, `tag` appends its `name` to the `chain` property, `drop` drops the event,
//! `geoip` records where the event's `$ip` is.

use appliance_pdk::{config, geoip, http, json, Error, Event, Exports, Plugin, Value};

struct Hostile;

impl Plugin for Hostile {
    const EXPORTS: Exports = Exports::PROCESS_EVENT.union(Exports::PROCESS_EVENT_BATCH);

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
                    timeout_ms: Some(2000),
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
            other => Err(Error::failed(format!("unknown mode {other:?}"))),
        }
    }
}

appliance_pdk::plugin!(Hostile);
