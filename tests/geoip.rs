//! GeoIP by default, as PostHog's GeoIP step: every `$geoip_*` field on the event, on the person
//! (`$set`) and as its first location (`$set_once`); `$geoip_disable`; unknown addresses; a
//! team that anonymises IPs (located, then the IP gone before any plugin); a database file
//! replaced or corrupted while running. Also the capture rules around the event's IP and
//! distinct id that PostHog's capture has.

mod common;

use std::time::{Duration, Instant};

use common::{
    by_event, cli, create_team, enable_plugin, install_plugin, make_mmdb, read_events, send_batch,
    Appliance, TOKEN,
};
use serde_json::{json, Value};

fn at(ip: &str, name: &str, extra: Value) -> Value {
    let mut properties = json!({"$ip": ip});
    properties
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    json!({"event": name, "distinct_id": format!("u-{name}"), "properties": properties})
}

/// Sends events until one named `probe-N` comes back located in `city` (or none, for `None`).
async fn wait_for_city(app: &Appliance, city: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in 0.. {
        let name = format!("probe-{n}");
        send_batch(app, TOKEN, vec![at("203.0.113.7", &name, json!({}))]).await;
        let rows = read_events(&app.sqlite_path());
        if by_event(&rows, &name)
            .properties
            .get("$geoip_city_name")
            .and_then(Value::as_str)
            == city
        {
            return;
        }
        assert!(Instant::now() < deadline, "GeoIP never answered {city:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_get_posthogs_geoip_properties_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "geo", TOKEN);
    // The default file in the data directory is found without a setting.
    make_mmdb(&dir.path().join("GeoLite2-City.mmdb"), false);
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    send_batch(
        &app,
        TOKEN,
        vec![
            at(
                "203.0.113.7",
                "amsterdam",
                json!({"$set": {"$geoip_city_name": "mine", "plan": "pro"}}),
            ),
            at("2001:db8::1", "v6", json!({})),
            at("198.51.100.1", "unknown", json!({})),
            at("203.0.113.7", "disabled", json!({"$geoip_disable": true})),
        ],
    )
    .await;
    let rows = read_events(&app.sqlite_path());
    let props = &by_event(&rows, "amsterdam").properties;
    let want = json!({
        "city_name": "Amsterdam", "country_name": "Netherlands", "country_code": "NL",
        "continent_name": "Europe", "continent_code": "EU", "postal_code": "1012",
        "latitude": 52.3676, "longitude": 4.9041, "accuracy_radius": 20,
        "time_zone": "Europe/Amsterdam",
        "subdivision_1_code": "NH", "subdivision_1_name": "North Holland",
        "subdivision_2_code": "AMS", "subdivision_2_name": "Amsterdam-Amstelland",
    });
    for (key, value) in want.as_object().unwrap() {
        assert_eq!(props[format!("$geoip_{key}")], *value, "$geoip_{key}");
        assert_eq!(
            props["$set"][format!("$geoip_{key}")],
            *value,
            "$set.$geoip_{key}"
        );
        assert_eq!(
            props["$set_once"][format!("$initial_geoip_{key}")],
            *value,
            "$set_once.$initial_geoip_{key}"
        );
    }
    assert_eq!(props["$set"]["plan"], "pro", "the event's own $set stays");
    // Location keys the database has no value for are reset to null on the person.
    assert_eq!(props["$set"]["$geoip_city_confidence"], Value::Null);
    // The person holds the location, and its first location.
    let person = cli(
        dir.path(),
        &[
            "persons",
            "show",
            "--team",
            &team.to_string(),
            "u-amsterdam",
            "--json",
        ],
    );
    let person: Value = serde_json::from_str(&person).unwrap();
    assert_eq!(
        person["person"]["properties"]["$geoip_city_name"],
        "Amsterdam"
    );
    assert_eq!(
        person["person"]["properties"]["$initial_geoip_country_code"],
        "NL"
    );

    let v6 = &by_event(&rows, "v6").properties;
    assert_eq!(v6["$geoip_country_code"], "JP");
    assert!(v6.get("$geoip_city_name").is_none());
    assert_eq!(
        v6["$set"]["$geoip_city_name"],
        Value::Null,
        "a stale city is cleared"
    );
    for name in ["unknown", "disabled"] {
        let props = by_event(&rows, name)
            .properties
            .as_object()
            .unwrap()
            .clone();
        assert!(
            !props
                .keys()
                .any(|k| k.starts_with("$geoip_") && k != "$geoip_disable"),
            "{name}: {props:?}"
        );
        assert!(props.get("$set").is_none(), "{name}: left unchanged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymised_team_is_located_but_no_plugin_or_row_sees_its_ip() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "private", TOKEN).to_string();
    let mmdb = dir.path().join("city.mmdb");
    make_mmdb(&mmdb, false);
    cli(
        dir.path(),
        &["team", "set", "--team", &team, "--anonymize-ips", "true"],
    );
    install_plugin(dir.path(), "tests/hostile", "hostile.wasm");
    enable_plugin(dir.path(), &team, "Hostile", &["mode=geoip"]);
    let app = Appliance::start(
        dir.path(),
        &[
            ("SINK_LINGER_MS", "0"),
            ("GEOIP_MMDB_PATH", mmdb.to_str().unwrap()),
        ],
    );
    send_batch(&app, TOKEN, vec![at("203.0.113.7", "private", json!({}))]).await;
    let rows = read_events(&app.sqlite_path());
    let props = &by_event(&rows, "private").properties;
    assert_eq!(
        props["$geoip_city_name"], "Amsterdam",
        "located before the IP went"
    );
    assert!(props.get("$ip").is_none(), "no $ip stored");
    assert_eq!(
        props["geo"],
        Value::Null,
        "the plugin had no address to locate"
    );
    let conn = rusqlite::Connection::open(app.sqlite_path()).unwrap();
    let text: String = conn
        .query_row("SELECT properties FROM posthog_event", [], |r| r.get(0))
        .unwrap();
    assert!(!text.contains("203.0.113.7"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_database_is_loaded_and_a_corrupt_one_only_stops_geoip() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "geo", TOKEN);
    let mmdb = dir.path().join("city.mmdb");
    make_mmdb(&mmdb, false);
    let app = Appliance::start(
        dir.path(),
        &[
            ("SINK_LINGER_MS", "0"),
            ("GEOIP_MMDB_PATH", mmdb.to_str().unwrap()),
        ],
    );
    wait_for_city(&app, Some("Amsterdam")).await;

    // Replaced the way updaters do it: written aside, renamed over.
    let fresh = dir.path().join("city.mmdb.new");
    make_mmdb(&fresh, true);
    std::fs::rename(&fresh, &mmdb).unwrap();
    wait_for_city(&app, Some("Rotterdam")).await;

    // A corrupt file: one clear log line, and events flow on without GeoIP.
    std::fs::write(&mmdb, b"this is not a MaxMind database").unwrap();
    wait_for_city(&app, None).await;
    assert!(
        app.stderr_lines()
            .iter()
            .any(|l| l.contains("events flow on without GeoIP") && l.contains("city.mmdb")),
        "{:?}",
        app.stderr_lines()
    );
    // A missing file: the same, and a good file put back is loaded again.
    std::fs::remove_file(&mmdb).unwrap();
    wait_for_city(&app, None).await;
    make_mmdb(&mmdb, false);
    wait_for_city(&app, Some("Amsterdam")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_keeps_distinct_ids_and_ips_as_posthog_does() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "ids", TOKEN).to_string();
    let app = Appliance::start(
        dir.path(),
        &[("SINK_LINGER_MS", "0"), ("TRUST_PROXY", "true")],
    );
    let long = "x".repeat(250);
    let events = vec![
        json!({"event": "undefined-id", "distinct_id": "undefined"}),
        json!({"event": "zero-id", "distinct_id": "0"}),
        json!({"event": "spaced-id", "distinct_id": "  padded  "}),
        json!({"event": "nul-id", "distinct_id": "a\u{0}b"}),
        json!({"event": "long-id", "distinct_id": long}),
        json!({"event": "null-ip", "distinct_id": "u", "properties": {"$ip": null}}),
        json!({"event": "empty-ip", "distinct_id": "u", "properties": {"$ip": ""}}),
        json!({"event": "chain", "distinct_id": "u", "properties": {
            "$elements_chain": "a:href=\"/given\"", "$elements": [{"tag_name": "b"}]}}),
        json!({"event": "bad-time", "distinct_id": "u", "timestamp": "not a time"}),
        json!({"event": "future", "distinct_id": "u", "timestamp": "2999-01-01T00:00:00Z"}),
    ];
    let cookieless = |name: &str, host: &str, agent: &str| {
        json!({"event": name, "distinct_id": "$posthog_cookieless", "properties": {
            "$cookieless_mode": true, "$host": host, "$raw_user_agent": agent}})
    };
    let mut events = events;
    events.extend([
        cookieless("visit-1", "www.shop.example.com", "Firefox"),
        cookieless("visit-2", "blog.example.com", "Firefox"),
        cookieless("visit-3", "www.shop.example.com", "Safari"),
    ]);
    let response = reqwest::Client::new()
        .post(app.url("/batch/"))
        .header("X-Forwarded-For", "198.51.100.23, 10.0.0.1")
        .json(&json!({"api_key": TOKEN, "batch": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // An /engage/ payload without an event name is an $identify.
    let response = reqwest::Client::new()
        .post(app.url("/engage/"))
        .json(&json!({"api_key": TOKEN, "distinct_id": "engaged", "$set": {"plan": "pro"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.wait_drained().await;
    let rows = read_events(&app.sqlite_path());
    assert_eq!(by_event(&rows, "undefined-id").distinct_id, "undefined");
    assert_eq!(by_event(&rows, "zero-id").distinct_id, "0");
    assert_eq!(by_event(&rows, "spaced-id").distinct_id, "  padded  ");
    assert_eq!(by_event(&rows, "nul-id").distinct_id, "a\u{FFFD}b");
    assert_eq!(by_event(&rows, "long-id").distinct_id.chars().count(), 200);
    for name in ["null-ip", "empty-ip"] {
        assert_eq!(
            by_event(&rows, name).properties["$ip"],
            "198.51.100.23",
            "{name}"
        );
    }
    let chain = by_event(&rows, "chain");
    assert_eq!(chain.elements_chain, "a:href=\"/given\"");
    assert!(chain.properties.get("$elements").is_none());
    assert!(chain.properties.get("$elements_chain").is_none());
    // Cookieless mode: one visitor (address, browser, site) is one server-side id for the day.
    let visit = |name: &str| by_event(&rows, name).distinct_id.clone();
    assert!(
        visit("visit-1").starts_with("cookieless_"),
        "{}",
        visit("visit-1")
    );
    assert_eq!(visit("visit-1"), visit("visit-2"));
    assert_ne!(visit("visit-1"), visit("visit-3"));
    // Times not taken as given are ingestion warnings in PostHog's shape.
    let deadline = Instant::now() + Duration::from_secs(10);
    let kinds = loop {
        let listed = cli(
            dir.path(),
            &["persons", "warnings", "--team", &team, "--json"],
        );
        let kinds: Vec<String> = listed
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        if kinds.len() >= 2 || Instant::now() > deadline {
            break kinds;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        kinds.contains(&"ignored_invalid_timestamp".to_owned()),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"event_timestamp_in_future".to_owned()),
        "{kinds:?}"
    );
    let engaged = by_event(&rows, "$identify");
    assert_eq!(engaged.distinct_id, "engaged");
    assert_eq!(engaged.properties["$set"]["plan"], "pro");
}
