//! The events the benchmarks send: a posthog-js `$pageview` in the shapes a user's events
//! come in (trimmed, in full, personless, browsing from page to page), the same for the load
//! generator (over HTTP) and the person-step benchmark (in process).

use serde_json::{json, Value};

/// What each event carries.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Events {
    Trimmed,
    PosthogJs,
    Personless,
    Browsing,
}

/// Stands for an event's uuid in a pre-built body; each send puts a fresh one in its place.
pub const UUID_SLOT: &str = "ffffffff-ffff-7fff-bfff-ffffffffffff";

/// The rest of what posthog-js 1.449 sent with a `$pageview` in the captured fixtures
/// (`../shared/notes/fixtures/js-fetch-1.json`), for a user it has identified.
const POSTHOG_JS_REST: &str = r#"{
    "$timezone": "UTC", "$timezone_offset": 0,
    "$raw_user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "$browser_language": "en-US", "$browser_language_prefix": "en",
    "$viewport_height": 768, "$viewport_width": 1024,
    "$insert_id": "k6p9zqzusmf5roh1", "$time": 1795659924.42, "$sdk_dist_channel": "cdn",
    "$initialization_time": "2026-11-26T02:25:24.349Z",
    "$configured_session_timeout_ms": 1800000,
    "$device_id": "01a215ac-0381-71a2-b97f-b6fc0eb1981e",
    "$sdk_debug_extensions_init_method": "synchronous",
    "$sdk_debug_extensions_init_time_ms": 2, "$search_engine": "google",
    "li_fat_id": null, "utm_source": "newsletter", "utm_medium": null,
    "utm_campaign": null, "utm_content": null, "utm_term": null, "gad_source": null,
    "mc_cid": null, "gclid": null, "gclsrc": null, "dclid": null, "gbraid": null,
    "wbraid": null, "fbclid": null, "msclkid": null, "twclid": null, "igshid": null,
    "ttclid": null, "rdt_cid": null, "epik": null, "qclid": null, "sccid": null,
    "oppref": null, "bfcid": null, "irclid": null, "_kx": null,
    "$referrer": "https://www.google.com/", "$referring_domain": "www.google.com",
    "title": "Demo shop", "$config_defaults": "unset",
    "$session_entry_referrer": "https://www.google.com/",
    "$session_entry_referring_domain": "www.google.com",
    "$session_entry_url": "https://shop.example.com/products/42?utm_source=newsletter",
    "$session_entry_host": "shop.example.com",
    "$session_entry_pathname": "/products/42",
    "$session_entry_utm_source": "newsletter",
    "$session_entry_search_engine": "google", "$recording_status": "disabled",
    "$sdk_debug_retry_queue_size": 0,
    "$lib_custom_api_host": "https://eu.i.posthog.com",
    "$pageview_id": "01a215ac-03a6-7f99-b406-c4155928c515",
    "$is_identified": true, "$process_person_profile": true,
    "$lib_rate_limit_remaining_tokens": 99
}"#;

/// A posthog-js `$pageview`, with the uuid every SDK puts on each event (see [`UUID_SLOT`]).
pub fn event(n: u64, events: Events) -> Value {
    let mut event = json!({
        "uuid": UUID_SLOT,
        "event": "$pageview",
        "properties": {
            "distinct_id": format!("user-{}", n % 10_000),
            "$current_url": "https://shop.example.com/products/42?utm_source=newsletter",
            "$host": "shop.example.com",
            "$pathname": "/products/42",
            "$browser": "Chrome",
            "$browser_version": 131,
            "$os": "Linux",
            "$device_type": "Desktop",
            "$lib": "web",
            "$lib_version": "1.449.2",
            "$screen_height": 1080,
            "$screen_width": 1920,
            "$session_id": "01a215ac-0381-71a2-b97f-b6fc0eb1981e",
            "$window_id": "01a215ac-0381-71a2-b97f-b6fd00000000",
            "n": n
        },
        "timestamp": "2026-11-26T02:25:24.349Z"
    });
    if let Some(properties) = event["properties"].as_object_mut() {
        match events {
            Events::Trimmed => {}
            Events::Browsing => {
                // Each event on its own page: the person's `$current_url` and `$pathname` (set
                // by every pageview) differ from the event's, as they do for a user browsing.
                let page = format!("/products/{n}");
                let url = format!("https://shop.example.com{page}?utm_source=newsletter");
                properties.insert("$current_url".into(), Value::String(url));
                properties.insert("$pathname".into(), Value::String(page));
            }
            Events::Personless => {
                properties.insert("$process_person_profile".into(), Value::Bool(false));
            }
            Events::PosthogJs => {
                if let Ok(Value::Object(rest)) = serde_json::from_str(POSTHOG_JS_REST) {
                    properties.extend(rest);
                }
            }
        }
    }
    event
}
