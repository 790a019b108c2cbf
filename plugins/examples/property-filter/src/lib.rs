//! Property filter: removes the properties named in the `properties` setting (comma-separated)
//! from every event, like PostHog's Property Filter plugin. Nested keys use dots: `$set.email`.

use appliance_pdk::{config, Error, Event, Exports, Plugin, Value};

struct PropertyFilter;

fn filtered_keys() -> Vec<Vec<String>> {
    config::get("properties")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| k.split('.').map(str::to_owned).collect())
        .collect()
}

/// Removes a nested key from a parsed object.
fn remove_path(properties: &mut appliance_pdk::Map<String, Value>, path: &[String]) {
    match path {
        [] => {}
        [last] => {
            properties.remove(last);
        }
        [first, rest @ ..] => {
            if let Some(Value::Object(inner)) = properties.get_mut(first) {
                remove_path(inner, rest);
            }
        }
    }
}

impl Plugin for PropertyFilter {
    const EXPORTS: Exports = Exports::PROCESS_EVENT.union(Exports::PROCESS_EVENT_BATCH);

    fn process_event(event: Event) -> Result<Option<Event>, Error> {
        Ok(Self::process_event_batch(vec![event])?.pop().flatten())
    }

    fn process_event_batch(mut events: Vec<Event>) -> Result<Vec<Option<Event>>, Error> {
        let keys = filtered_keys();
        for event in &mut events {
            for path in &keys {
                match path.as_slice() {
                    // A top-level key is removed without parsing the rest of the properties.
                    [key] => {
                        event.properties.remove(key);
                    }
                    [first, ..] if event.properties.contains_key(first) => {
                        remove_path(event.properties.as_map_mut(), path);
                    }
                    _ => {}
                }
            }
        }
        Ok(events.into_iter().map(Some).collect())
    }
}

appliance_pdk::plugin!(PropertyFilter);
