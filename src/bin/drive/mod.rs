//! The HTTP load a capture benchmark drives: request bodies (pre-built, with a fresh uuid per
//! event on every send, as an SDK makes them), many keep-alive connections, and each request's
//! latency from the time it was due, so a stalled server cannot hide its queueing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::events::{event, Events, UUID_SLOT};

/// What each request carries: one event to `/e/`, or a batch of this many to `/batch/`.
#[derive(Clone, Copy)]
pub enum Shape {
    Single,
    Batch(usize),
}

/// What one scenario's load measured.
pub struct Outcome {
    pub requests: u64,
    pub events: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

impl Outcome {
    /// Requests acknowledged per second.
    pub fn request_rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// One line: the rates, the latency quantiles and the errors.
    pub fn print(&self, label: &str) {
        let secs = self.elapsed.as_secs_f64();
        let q = |p: f64| self.latency_us.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "{label:<58} {:>9.0} req/s {:>10.0} events/s   p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>7.2} ms   errors {}",
            self.request_rate(),
            self.events as f64 / secs,
            q(0.50),
            q(0.99),
            self.latency_us.max() as f64 / 1000.0,
            self.errors
        );
    }
}

/// A request body of `shape` (the `n`th of its kind), its event count and its path.
pub fn body(shape: Shape, events: Events, token: &str, n: u64) -> (String, u64, &'static str) {
    match shape {
        Shape::Single => {
            let mut e = event(n, events);
            e["properties"]["token"] = json!(token);
            (e.to_string(), 1, "/e/")
        }
        Shape::Batch(size) => {
            let batch: Vec<Value> = (0..size as u64)
                .map(|i| event(n * size as u64 + i, events))
                .collect();
            let sent_at = chrono::Utc::now().to_rfc3339();
            (
                json!({"api_key": token, "batch": batch, "sent_at": sent_at}).to_string(),
                size as u64,
                "/batch/",
            )
        }
    }
}

/// A request body with the places of its events' uuids.
struct Template {
    text: Vec<u8>,
    slots: Vec<usize>,
}

impl Template {
    fn new(text: String) -> Template {
        let slots = text.match_indices(UUID_SLOT).map(|(at, _)| at).collect();
        Template {
            text: text.into_bytes(),
            slots,
        }
    }

    /// The body with a fresh uuid for each event.
    fn fill(&self) -> bytes::Bytes {
        let mut text = self.text.clone();
        let mut buffer = uuid::Uuid::encode_buffer();
        for &at in &self.slots {
            let fresh = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buffer);
            text[at..at + UUID_SLOT.len()].copy_from_slice(fresh.as_bytes());
        }
        bytes::Bytes::from(text)
    }
}

/// Runs one scenario. With `rate` (requests/s), requests are paced on a schedule and latency is
/// measured from each request's scheduled time, so a stalled server cannot hide its queueing.
pub async fn run(
    base: &str,
    token: &str,
    shape: Shape,
    events: Events,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Outcome {
    // Pre-built bodies: the generator should spend its CPU on HTTP, not on JSON. Each send
    // writes fresh uuids (v7, as posthog-js makes them) into its copy, as an SDK would.
    let bodies: Arc<Vec<(Template, u64)>> = Arc::new(
        (0..64)
            .map(|n| {
                let (text, count, _) = body(shape, events, token, n);
                (Template::new(text), count)
            })
            .collect(),
    );
    let path = body(shape, events, token, 0).2;
    let url = format!("{base}{path}");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (url, bodies) = (url.clone(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .expect("HTTP client");
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let (mut requests, mut events, mut errors) = (0u64, 0u64, 0u64);
            let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
            let mut next = start
                + interval
                    .map(|i| i.mul_f64(c as f64 / connections as f64))
                    .unwrap_or_default();
            let mut i = c;
            while start.elapsed() < duration {
                let scheduled = if let Some(interval) = interval {
                    tokio::time::sleep_until(next.into()).await;
                    let s = next;
                    next += interval;
                    s
                } else {
                    Instant::now()
                };
                let (template, count) = &bodies[i % bodies.len()];
                let (payload, count) = (template.fill(), *count);
                i += 1;
                let ok = match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(payload)
                    .send()
                    .await
                {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                let _ = hist.record(scheduled.elapsed().as_micros().max(1) as u64);
                requests += 1;
                if ok {
                    events += count;
                } else {
                    errors += 1;
                }
            }
            (requests, events, errors, hist)
        }));
    }
    let mut outcome = Outcome {
        requests: 0,
        events: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    };
    for t in tasks {
        let (r, e, err, h) = t.await.expect("load task");
        outcome.requests += r;
        outcome.events += e;
        outcome.errors += err;
        let _ = outcome.latency_us.add(h);
    }
    outcome.elapsed = start.elapsed();
    outcome
}
