//! Counts how often `process-event` sees each event (storage key `calls:<uuid>`, durable) and
//! stamps the count on the event as `processed_times`: a test that crashes the appliance can then
//! tell whether an event went through the plugins twice, and which version was stored.

use appliance_pdk::{storage, Error, Event, Exports, Plugin};

struct CallCounter;

impl Plugin for CallCounter {
    const EXPORTS: Exports = Exports::PROCESS_EVENT;

    fn process_event(mut event: Event) -> Result<Option<Event>, Error> {
        let key = format!("calls:{}", event.uuid);
        let calls = storage::get(&key)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        storage::set(&key, &calls.to_string()).map_err(Error::retry)?;
        event.properties.insert("processed_times", calls);
        Ok(Some(event))
    }
}

appliance_pdk::plugin!(CallCounter);
