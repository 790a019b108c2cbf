//! `/metrics`: every metric in Prometheus' text format, on the admin address. Readable from
//! loopback as is, from elsewhere with the admin API token.
//!
//! Owns: the gauges read at scrape time (queue depth and age, deferred bytes, jobs by state,
//! free disk, sink lag); counters and histograms are recorded where things happen.
//! Must never: hold a write transaction, or run more than one short read per gauge.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AdminState;
use crate::ids::TeamId;
use crate::telemetry::names;

/// Teams whose deferred bytes a scrape has reported.
static DEFERRED_REPORTED: Mutex<BTreeSet<TeamId>> = Mutex::new(BTreeSet::new());

/// Answers a scrape: reads the gauges, then renders everything.
pub async fn scrape(State(state): State<Arc<AdminState>>) -> Response {
    let reading = state.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || set_gauges(&reading)).await {
        tracing::warn!(error = %e, "reading the gauges failed");
    }
    match crate::telemetry::render() {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are not recording\n",
        )
            .into_response(),
    }
}

fn set_gauges(state: &AdminState) {
    let report = state.pipeline.report(state.sink_name);
    let sink = state.sink_name;
    if let Ok(queue) = state.store.ingest_stats() {
        metrics::gauge!(names::QUEUE_BYTES).set(queue.queued_bytes as f64);
        metrics::gauge!(names::QUEUE_BATCHES).set(queue.queued_batches as f64);
        let lag = queue.last_seq.saturating_sub(report.position);
        metrics::gauge!(names::SINK_LAG, "sink" => sink).set(lag as f64);
    }
    let age = match state.store.ingest_received_after(report.position) {
        Ok(Some(received)) => (chrono::Utc::now() - received).as_seconds_f64().max(0.0),
        _ => 0.0,
    };
    metrics::gauge!(names::QUEUE_OLDEST_AGE, "sink" => sink).set(age);
    if !state.followers.is_empty() {
        // A follower's lag counts lead writes (follow-log records) it has not copied yet.
        let last = state.store.follow_last_seq().unwrap_or(0);
        for (name, status) in &state.followers {
            let lag = last.saturating_sub(status.report(name).position);
            metrics::gauge!(names::SINK_LAG, "sink" => *name).set(lag as f64);
        }
    }
    let deferred = state.store.deferred_teams();
    let mut reported = DEFERRED_REPORTED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // A team no longer deferred reads 0 rather than its last figure.
    for team in reported.iter().filter(|t| !deferred.contains_key(t)) {
        metrics::gauge!(names::DEFERRED_BYTES, "team" => team.to_string()).set(0.0);
    }
    for (team, bytes) in &deferred {
        metrics::gauge!(names::DEFERRED_BYTES, "team" => team.to_string()).set(*bytes as f64);
        reported.insert(*team);
    }
    drop(reported);
    if let Ok(jobs) = state.store.job_stats() {
        metrics::gauge!(names::JOBS, "state" => "queued").set(jobs.queued as f64);
        metrics::gauge!(names::JOBS, "state" => "running").set(jobs.running as f64);
        let finished = jobs.total.saturating_sub(jobs.queued + jobs.running);
        metrics::gauge!(names::JOBS, "state" => "finished").set(finished as f64);
    }
    metrics::gauge!(names::FREE_DISK_BYTES).set(state.store.room().free_disk_bytes as f64);
}
