//! First-time event tracker: sets `$is_first_event` to true on the first event of each tracked
//! name for each person (distinct id), and to false afterwards, like PostHog's First Time Event
//! Tracker. What has been seen is kept in plugin storage, so it survives restarts; the cache
//! spares a storage read for people seen recently.

use appliance_pdk::{cache, config, storage, Error, Event, Exports, Plugin};

struct FirstTimeEvent;

/// Event names to track, from the `events` setting; empty means every event.
fn tracked() -> Vec<String> {
    config::get("events")
        .unwrap_or_default()
        .split(',')
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect()
}

fn seen_before(key: &str) -> bool {
    if cache::get(key).is_some() {
        return true;
    }
    let seen = storage::get(key).is_some();
    // A full storage or cache only means the next event is checked again.
    if !seen && storage::set(key, "1").is_err() {
        return seen;
    }
    let _ = cache::set(key, "1", Some(3600));
    seen
}

impl Plugin for FirstTimeEvent {
    const EXPORTS: Exports = Exports::PROCESS_EVENT;

    fn process_event(mut event: Event) -> Result<Option<Event>, Error> {
        let tracked = tracked();
        if !tracked.is_empty() && !tracked.contains(&event.event) {
            return Ok(Some(event));
        }
        let key = format!("seen/{}/{}", event.event, event.distinct_id);
        let first = !seen_before(&key);
        event.properties.insert("$is_first_event", first);
        Ok(Some(event))
    }
}

appliance_pdk::plugin!(FirstTimeEvent);
