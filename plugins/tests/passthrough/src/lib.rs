//! Returns every event unchanged, written against the raw bindings so that nothing is parsed:
//! what `pluginbench` measures with it is the host's cost per event (converting events, crossing
//! the boundary both ways, checking what comes back), not a plugin's work.

use appliance_pdk::bindings::appliance::plugin::types::{Event, Exports, PluginError, PluginInfo};
use appliance_pdk::bindings::Guest;

struct Passthrough;

impl Guest for Passthrough {
    fn info() -> PluginInfo {
        PluginInfo {
            exports: Exports::PROCESS_EVENT | Exports::PROCESS_EVENT_BATCH,
            jobs: Vec::new(),
        }
    }
    fn setup() -> Result<(), PluginError> {
        Ok(())
    }
    fn teardown() {}
    fn process_event(event: Event) -> Result<Option<Event>, PluginError> {
        Ok(Some(event))
    }
    fn process_event_batch(events: Vec<Event>) -> Result<Vec<Option<Event>>, PluginError> {
        Ok(events.into_iter().map(Some).collect())
    }
    fn on_event(_event: Event) -> Result<(), PluginError> {
        Ok(())
    }
    fn export_events(_events: Vec<Event>) -> Result<(), PluginError> {
        Ok(())
    }
    fn run_every_minute() -> Result<(), PluginError> {
        Ok(())
    }
    fn run_every_hour() -> Result<(), PluginError> {
        Ok(())
    }
    fn run_every_day() -> Result<(), PluginError> {
        Ok(())
    }
    fn run_job(_name: String, _payload: String) -> Result<(), PluginError> {
        Ok(())
    }
}

appliance_pdk::bindings::export!(Passthrough with_types_in appliance_pdk::bindings);
