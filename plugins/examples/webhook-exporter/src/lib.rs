//! Webhook exporter: posts stored events to a URL as `{"batch": [...]}`, like PostHog's export
//! plugins. It runs after the events are stored, through the durable job queue: an answer other
//! than 2xx (or no answer) asks for a retry, and the queue tries again with backoff, so events
//! are not lost while the endpoint is down.

use appliance_pdk::{config, http, json, log, Error, Event, Exports, Plugin, Value};

struct WebhookExporter;

fn wanted(event: &Event) -> bool {
    let names = config::get("events").unwrap_or_default();
    let names: Vec<&str> = names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    names.is_empty() || names.contains(&event.event.as_str())
}

impl Plugin for WebhookExporter {
    const EXPORTS: Exports = Exports::EXPORT_EVENTS;

    fn setup() -> Result<(), Error> {
        match config::get("url") {
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => Ok(()),
            other => Err(Error::failed(format!(
                "url must be an http(s) URL, not {other:?}"
            ))),
        }
    }

    fn export_events(events: Vec<Event>) -> Result<(), Error> {
        let batch: Vec<Value> = events
            .into_iter()
            .filter(wanted)
            .map(|e| {
                json!({
                    "uuid": e.uuid,
                    "event": e.event,
                    "distinct_id": e.distinct_id,
                    "timestamp": e.timestamp,
                    "properties": e.properties,
                })
            })
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        let count = batch.len();
        let url = config::get("url").unwrap_or_default();
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        if let Some(auth) = config::get("auth_header").filter(|a| !a.is_empty()) {
            headers.push(("authorization".to_owned(), auth));
        }
        let response = http::fetch(&http::Request {
            method: "POST".into(),
            url: url.clone(),
            headers,
            body: Some(json!({ "batch": batch }).to_string().into_bytes()),
            timeout_ms: Some(10_000),
        })
        .map_err(|e| Error::retry(format!("POST {url} failed: {e}")))?;
        if !(200..300).contains(&response.status) {
            return Err(Error::retry(format!(
                "POST {url} answered {}",
                response.status
            )));
        }
        log::info(&format!("exported {count} events"));
        Ok(())
    }
}

appliance_pdk::plugin!(WebhookExporter);
