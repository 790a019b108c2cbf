//! PostHog's GeoIP step: the `$geoip_*` properties of an event's IP, also set on its person
//! (`$set`) and kept as the person's first location (`$set_once`, `$initial_geoip_*`).
//!
//! Follows PostHog's GeoIP transformation (`posthog-plugin-geoip` as PostHog ships it, notes §6):
//! the IP is `$ip`; nothing happens without one, with `$geoip_disable`, or for an address the
//! database does not know; the person's location keys are first reset to null (so a stale city
//! or subdivision does not linger), then the location's values written over them.

use serde_json::{Map, Value};

use super::properties::Edit;
use crate::geoip::GeoIp;

/// The location keys PostHog resets on the person before writing the new location.
const RESET_KEYS: [&str; 15] = [
    "city_name",
    "city_confidence",
    "subdivision_2_name",
    "subdivision_2_code",
    "subdivision_1_name",
    "subdivision_1_code",
    "country_name",
    "country_code",
    "continent_name",
    "continent_code",
    "postal_code",
    "latitude",
    "longitude",
    "accuracy_radius",
    "time_zone",
];

/// Whether GeoIP reads or writes `key` of an event's properties.
pub fn reads_property(key: &str) -> bool {
    matches!(key, "$ip" | "$geoip_disable" | "$set" | "$set_once") || key.starts_with("$geoip_")
}

/// Adds the `$geoip_*` properties of the event's `$ip`, if the database places it, to
/// `properties` (which must hold every key [`reads_property`] names that the event has),
/// recording what changed in `edit`.
pub fn add_geoip_properties(geoip: &GeoIp, properties: &mut Map<String, Value>, edit: &mut Edit) {
    if properties.get("$geoip_disable").is_some_and(super::truthy) {
        return;
    }
    let Some(Value::String(ip)) = properties.get("$ip") else {
        return;
    };
    let Some(location) = geoip.locate(ip) else {
        return;
    };
    let mut set = take_object(properties, "$set");
    let mut set_once = take_object(properties, "$set_once");
    for key in RESET_KEYS {
        set.entry(format!("$geoip_{key}")).or_insert(Value::Null);
        set_once
            .entry(format!("$initial_geoip_{key}"))
            .or_insert(Value::Null);
    }
    for (key, value) in location.properties() {
        edit.set(properties, &format!("$geoip_{key}"), value.clone());
        set.insert(format!("$geoip_{key}"), value.clone());
        set_once.insert(format!("$initial_geoip_{key}"), value);
    }
    edit.set(properties, "$set", Value::Object(set));
    edit.set(properties, "$set_once", Value::Object(set_once));
}

/// The object at `key`, taken out; an empty one if there was none. (The key stays in
/// `properties` so that writing it again is known to replace it.)
fn take_object(properties: &mut Map<String, Value>, key: &str) -> Map<String, Value> {
    match properties.get_mut(key) {
        Some(Value::Object(map)) => std::mem::take(map),
        _ => Map::new(),
    }
}
