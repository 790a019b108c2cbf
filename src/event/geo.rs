//! PostHog's GeoIP step: the `$geoip_*` properties of an event's IP, also set on its person
//! (`$set`) and kept as the person's first location (`$set_once`, `$initial_geoip_*`).
//!
//! Follows PostHog's GeoIP transformation (`posthog-plugin-geoip` as PostHog ships it, notes §6):
//! the IP is `$ip`; nothing happens without one, with `$geoip_disable`, or for an address the
//! database does not know; the person's location keys are first reset to null (so a stale city
//! or subdivision does not linger), then the location's values written over them.

use serde_json::{Map, Value};

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

/// Adds the `$geoip_*` properties of the event's `$ip`, if the database places it.
pub fn add_geoip_properties(geoip: &GeoIp, properties: &mut Map<String, Value>) {
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
        properties.insert(format!("$geoip_{key}"), value.clone());
        set.insert(format!("$geoip_{key}"), value.clone());
        set_once.insert(format!("$initial_geoip_{key}"), value);
    }
    properties.insert("$set".into(), Value::Object(set));
    properties.insert("$set_once".into(), Value::Object(set_once));
}

fn take_object(properties: &mut Map<String, Value>, key: &str) -> Map<String, Value> {
    match properties.remove(key) {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    }
}
