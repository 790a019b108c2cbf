//! Turning a captured event into the row a sink stores: PostHog's ingestion normalisation
//! (uuid, timestamp, `$ip`, `$set`/`$set_once`, elements chain).
//!
//! It runs where events enter the queue (capture, and later the Kafka and Celery sources), once
//! per event: the result depends only on the event and its request, so it is fixed before the
//! batch is durable and a replay writes identical rows.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::properties::{Edit, EventProperties, RawObject};
use super::timestamp::{event_timestamp, TimestampWarning};
use crate::event::EventRow;
use crate::geoip::GeoIp;

/// PostHog truncates event names to this many characters.
const MAX_EVENT_NAME_CHARS: usize = 200;

/// What normalisation needs to know about the request an event came in.
pub struct RequestContext<'a> {
    pub received_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub ip: Option<&'a str>,
    /// The team's "anonymize IPs" setting: no `$ip` is kept (GeoIP has used it by then).
    pub anonymize_ips: bool,
    /// Where PostHog's GeoIP step looks addresses up (`None`: no GeoIP).
    pub geoip: Option<&'a GeoIp>,
    /// The name of an event that has none (`/engage/` payloads are `$identify`).
    pub default_event: Option<&'static str>,
    /// The team and its daily salts, for cookieless-mode events (`None`: left as sent).
    pub cookieless: Option<(u64, &'a dyn super::cookieless::Salts)>,
}

/// Whether normalisation reads (or may write) `key` of an event's properties; every other
/// property is copied as the client sent it.
fn is_read_key(key: &str) -> bool {
    matches!(
        key,
        "distinct_id" | "$ignore_sent_at" | "$elements" | "$elements_chain"
    ) || super::geo::reads_property(key)
        || super::cookieless::PROPERTIES_READ.contains(&key)
}

/// A captured event as normalisation takes it: every field but `properties` parsed (they are
/// few and small), and the properties read once, parsing only the keys normalisation reads.
pub struct CapturedEvent<'t> {
    top: Map<String, Value>,
    properties: EventProperties<'t>,
    read: Map<String, Value>,
}

impl<'t> CapturedEvent<'t> {
    /// The event of the fields `top` (without `properties`) and the properties' text.
    pub fn new(top: Map<String, Value>, properties: &'t str) -> CapturedEvent<'t> {
        let (properties, read) = EventProperties::read(properties, is_read_key);
        CapturedEvent {
            top,
            properties,
            read,
        }
    }

    /// The event of the fields `top` (without `properties`) and the properties' entries, met
    /// while parsing the event.
    pub fn of_object(top: Map<String, Value>, properties: RawObject<'t>) -> CapturedEvent<'t> {
        let (properties, read) = EventProperties::of_object(properties, is_read_key);
        CapturedEvent {
            top,
            properties,
            read,
        }
    }

    /// One of the event's fields other than `properties`.
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.top.get(key)
    }

    /// Sets one of the event's fields other than `properties`.
    pub fn set_field(&mut self, key: &str, value: Value) {
        self.top.insert(key.to_owned(), value);
    }

    /// The `distinct_id` given in the properties, if any.
    pub fn distinct_id_property(&self) -> Option<&Value> {
        self.read.get("distinct_id")
    }
}

/// Normalises one event given as a parsed tree (the queue sources); as [`normalize`].
pub fn normalize_tree(
    ctx: &RequestContext<'_>,
    mut event: Map<String, Value>,
) -> (EventRow, Option<TimestampWarning>) {
    let text = match event.remove("properties") {
        Some(properties @ Value::Object(_)) => properties.to_string(),
        _ => "{}".to_owned(),
    };
    normalize(ctx, CapturedEvent::new(event, &text))
}

/// Normalises one event. Deterministic: the same input gives the same row. Properties it does
/// not read are copied as they came, in the order they came.
pub fn normalize(
    ctx: &RequestContext<'_>,
    event: CapturedEvent<'_>,
) -> (EventRow, Option<TimestampWarning>) {
    let CapturedEvent {
        top: mut event,
        properties: parsed,
        read: mut properties,
    } = event;
    let ignore_sent_at = properties
        .get("$ignore_sent_at")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (timestamp, warning) =
        event_timestamp(ctx.received_at, ctx.sent_at, ignore_sent_at, &event);
    let mut edit = Edit::new();
    // Top-level $set / $set_once (posthog-js, posthog-python set()) join those in properties;
    // the top-level values win.
    for key in ["$set", "$set_once"] {
        if let Some(Value::Object(top)) = event.remove(key) {
            match properties.get_mut(key) {
                Some(Value::Object(existing)) => {
                    existing.extend(top);
                    edit.wrote(key, true);
                }
                _ => edit.set(&mut properties, key, Value::Object(top)),
            }
        }
    }
    // A client's own `$ip` wins over the request's address, unless it is null or empty.
    let client_ip = matches!(properties.get("$ip"), Some(Value::String(ip)) if !ip.is_empty())
        || matches!(properties.get("$ip"), Some(v) if !v.is_null() && !v.is_string());
    if let (false, Some(ip)) = (client_ip, ctx.ip) {
        edit.set(&mut properties, "$ip", Value::String(ip.to_owned()));
    }
    let mut distinct_id = text_of(event.get("distinct_id")).to_owned();
    if let (Some((team, salts)), Some(Value::String(ip))) = (ctx.cookieless, properties.get("$ip"))
    {
        if super::cookieless::wanted(&distinct_id, &properties) {
            let day = timestamp.date_naive();
            if let Some(id) = super::cookieless::distinct_id(salts, team, day, ip, &properties) {
                distinct_id = id;
            }
        }
    }
    if let Some(geoip) = ctx.geoip {
        super::geo::add_geoip_properties(geoip, &mut properties, &mut edit);
    }
    if ctx.anonymize_ips {
        edit.remove(&mut properties, "$ip");
    }
    // The client's chain wins over `$elements`; both leave the properties.
    let elements = properties.get("$elements").cloned();
    edit.remove(&mut properties, "$elements");
    let chain = properties.get("$elements_chain").cloned();
    edit.remove(&mut properties, "$elements_chain");
    let elements_chain = match chain {
        Some(Value::String(chain)) if !chain.is_empty() => chain,
        _ => match elements {
            Some(Value::Array(elements)) => elements_to_chain(&elements),
            _ => String::new(),
        },
    };
    let name: String = text_of(event.get("event"))
        .chars()
        .take(MAX_EVENT_NAME_CHARS)
        .collect();
    let uuid = text_of(event.get("uuid"))
        .parse::<Uuid>()
        .unwrap_or_else(|_| {
            Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                Value::Object(event).to_string().as_bytes(),
            )
        });
    let properties = edit
        .apply(&parsed, &properties)
        .or_else(|| parsed.text().map(str::to_owned))
        .unwrap_or_else(|| "{}".to_owned());
    let row = EventRow {
        uuid,
        event: name,
        distinct_id,
        properties,
        timestamp,
        elements_chain,
    };
    (row, warning)
}

/// PostHog's `elementsToString` keeps this much of an element's text and href.
const MAX_ELEMENT_TEXT_CHARS: usize = 400;
const MAX_ELEMENT_HREF_CHARS: usize = 2048;

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

fn text_of(value: Option<&Value>) -> &str {
    value.and_then(Value::as_str).unwrap_or_default()
}

/// posthog-js `$elements` (autocapture) in PostHog's `elements_chain` notation:
/// `tag.class1.class2:attr="value"…` per element, joined by `;`, attributes sorted by name.
fn elements_to_chain(elements: &[Value]) -> String {
    let mut chain = Vec::with_capacity(elements.len());
    for element in elements.iter().filter_map(Value::as_object) {
        let mut out = text_of(element.get("tag_name")).to_owned();
        if let Some(classes) = element.get("attr__class").and_then(Value::as_str) {
            let mut classes: Vec<&str> = classes.split_whitespace().collect();
            classes.sort_unstable();
            for class in classes {
                out.push('.');
                out.push_str(&class.replace('"', ""));
            }
        }
        let mut attributes: Vec<(String, String)> = Vec::new();
        if let Some(t) = element
            .get("$el_text")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            attributes.push(("text".into(), truncate(t, MAX_ELEMENT_TEXT_CHARS)));
        }
        for (key, name) in [("nth_child", "nth-child"), ("nth_of_type", "nth-of-type")] {
            let n = element.get(key).and_then(Value::as_i64).unwrap_or(0);
            attributes.push((name.into(), n.to_string()));
        }
        if let Some(href) = element.get("attr__href").and_then(Value::as_str) {
            attributes.push(("href".into(), truncate(href, MAX_ELEMENT_HREF_CHARS)));
        }
        if let Some(id) = element.get("attr__id").and_then(Value::as_str) {
            attributes.push(("attr_id".into(), id.to_owned()));
        }
        for (key, value) in element.iter().filter(|(k, _)| k.starts_with("attr__")) {
            let value = value
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            attributes.push((key.clone(), value));
        }
        attributes.sort();
        out.push(':');
        for (key, value) in attributes {
            out.push_str(&format!(
                "{}=\"{}\"",
                key.replace('"', "\\\""),
                value.replace('"', "\\\"")
            ));
        }
        chain.push(out);
    }
    chain.join(";")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(anonymize_ips: bool) -> RequestContext<'static> {
        RequestContext {
            received_at: Utc::now(),
            sent_at: None,
            ip: Some("203.0.113.9"),
            anonymize_ips,
            geoip: None,
            default_event: None,
            cookieless: None,
        }
    }

    fn props(row: &EventRow) -> Map<String, Value> {
        serde_json::from_str(&row.properties).unwrap()
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn set_and_ip_are_merged_into_properties() {
        let e = obj(
            json!({"event": "$identify", "distinct_id": "u", "uuid": "0190a0b0-0000-7000-8000-000000000001",
            "$set": {"a": 1}, "$set_once": {"b": 2}, "properties": {"$set": {"a": 0, "c": 3}}}),
        );
        let (s, _) = normalize_tree(&ctx(false), e);
        let p = props(&s);
        assert_eq!(p["$set"], json!({"a": 1, "c": 3}));
        assert_eq!(p["$set_once"], json!({"b": 2}));
        assert_eq!(p["$ip"], "203.0.113.9");
        assert_eq!(s.uuid.to_string(), "0190a0b0-0000-7000-8000-000000000001");
    }

    #[test]
    fn a_clients_ip_wins_and_anonymize_removes_it() {
        for empty in [json!(null), json!("")] {
            let e = obj(json!({"event": "e", "distinct_id": "u", "properties": {"$ip": empty}}));
            assert_eq!(
                props(&normalize_tree(&ctx(false), e).0)["$ip"],
                "203.0.113.9"
            );
        }
        let e = obj(json!({"event": "e", "distinct_id": "u", "properties": {"$ip": "1.2.3.4"}}));
        assert_eq!(props(&normalize_tree(&ctx(false), e).0)["$ip"], "1.2.3.4");
        let e = obj(json!({"event": "e", "distinct_id": "u", "properties": {"$ip": "1.2.3.4"}}));
        assert!(!props(&normalize_tree(&ctx(true), e).0).contains_key("$ip"));
    }

    #[test]
    fn autocapture_elements_become_an_elements_chain() {
        let e = obj(
            json!({"event": "$autocapture", "distinct_id": "u", "properties": {"$elements": [
                {"tag_name": "button", "$el_text": "Buy", "attr__class": "btn primary", "nth_child": 2, "nth_of_type": 1, "attr__id": "buy"},
                {"tag_name": "a", "attr__href": "/x", "nth_child": 1, "nth_of_type": 1}
            ]}}),
        );
        let (s, _) = normalize_tree(&ctx(false), e);
        assert_eq!(
            s.elements_chain,
            "button.btn.primary:attr__class=\"btn primary\"attr__id=\"buy\"attr_id=\"buy\"nth-child=\"2\"nth-of-type=\"1\"text=\"Buy\";a:attr__href=\"/x\"href=\"/x\"nth-child=\"1\"nth-of-type=\"1\""
        );
        assert!(!props(&s).contains_key("$elements"));
        let e = obj(
            json!({"event": "$autocapture", "distinct_id": "u", "properties": {
            "$elements_chain": "a:href=\"/given\"", "$elements": [{"tag_name": "b"}]}}),
        );
        let (s, _) = normalize_tree(&ctx(false), e);
        assert_eq!(s.elements_chain, "a:href=\"/given\"");
        let p = props(&s);
        assert!(!p.contains_key("$elements") && !p.contains_key("$elements_chain"));
    }
}
