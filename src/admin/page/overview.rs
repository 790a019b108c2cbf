//! The overview: events per second over the last hour and day (an SVG drawn here), the queue,
//! the sink, plugin time per event, errors, the disk, the version.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use maud::{html, Markup};

use super::{bytes, layout, Admin, PageError, Shared};
use crate::pipeline::PipelineStatus;

/// Minutes of history kept: a day.
const MINUTES: usize = 24 * 60;
/// How often the sampler reads the pipeline's counter.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Events stored per minute over the last day, sampled from the pipeline's counter. Kept in
/// memory (1,440 numbers): it starts empty after a restart.
#[derive(Default)]
pub struct Traffic {
    /// (minute since the epoch, events stored in it), oldest first.
    minutes: Mutex<VecDeque<(u64, u64)>>,
}

impl Traffic {
    /// Samples `pipeline` until the process ends.
    pub fn spawn_sampler(self: &Arc<Self>, pipeline: Arc<PipelineStatus>, sink: &'static str) {
        let traffic = self.clone();
        tokio::spawn(async move {
            let mut last = pipeline.report(sink).events_stored;
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tick.tick().await;
                let now = pipeline.report(sink).events_stored;
                traffic.add(minute_now(), now.saturating_sub(last));
                last = now;
            }
        });
    }

    fn add(&self, minute: u64, events: u64) {
        let mut minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        match minutes.back_mut() {
            Some((m, count)) if *m == minute => *count += events,
            _ => minutes.push_back((minute, events)),
        }
        while minutes.len() > MINUTES {
            minutes.pop_front();
        }
    }

    /// Events per second in each of the `buckets` spans of `span_minutes` ending now.
    fn rates(&self, buckets: usize, span_minutes: u64) -> Vec<f64> {
        let minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        let now = minute_now();
        let first = now + 1 - buckets as u64 * span_minutes;
        let mut sums = vec![0u64; buckets];
        for (minute, count) in minutes.iter().filter(|(m, _)| *m >= first && *m <= now) {
            let slot = ((minute - first) / span_minutes) as usize;
            if let Some(sum) = sums.get_mut(slot) {
                *sum += count;
            }
        }
        sums.iter()
            .map(|s| *s as f64 / (span_minutes * 60) as f64)
            .collect()
    }
}

fn minute_now() -> u64 {
    (crate::jobs::now_ms() / 60_000).max(1) as u64
}

/// A line chart of `values` (oldest first) with its peak labelled.
fn chart(values: &[f64], caption: &str) -> Markup {
    let (width, height) = (600.0, 140.0);
    let highest = values.iter().cloned().fold(0.0, f64::max);
    let peak = highest.max(1.0);
    let step = width / (values.len().max(2) - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * step,
                10.0 + (height - 10.0) * (1.0 - v / peak)
            )
        })
        .collect();
    html! {
        figure {
            svg.chart viewBox="0 0 600 150" preserveAspectRatio="none" role="img" aria-label=(caption) {
                polyline points=(points.join(" ")) {}
                text x="4" y="12" { "peak " (format!("{highest:.1}")) " events/s" }
            }
            figcaption.muted { (caption) }
        }
    }
}

struct Figures {
    queued_batches: u64,
    queued_bytes: u64,
    oldest_age_s: f64,
    jobs_queued: u64,
    jobs_running: u64,
    data_dir_bytes: u64,
}

pub async fn page(State(state): State<Shared>, admin: Admin) -> Result<Markup, PageError> {
    let admin_state = state.admin.clone();
    let sink = admin_state.sink_name;
    let report = admin_state.pipeline.report(sink);
    let position = report.position;
    let data_dir = state.config.data_dir.clone();
    let figures = super::blocking(&state, move |_| {
        let store = &admin_state.store;
        let queue = store.ingest_stats()?;
        let jobs = store.job_stats()?;
        let oldest_age_s = match store.ingest_received_after(position)? {
            Some(received) => (chrono::Utc::now() - received).as_seconds_f64().max(0.0),
            None => 0.0,
        };
        Ok(Figures {
            queued_batches: queue.queued_batches,
            queued_bytes: queue.queued_bytes,
            oldest_age_s,
            jobs_queued: jobs.queued,
            jobs_running: jobs.running,
            data_dir_bytes: dir_size(&data_dir),
        })
    })
    .await?;
    let followers: Vec<_> = state
        .admin
        .followers
        .iter()
        .map(|(name, status)| (*name, status.report(name)))
        .collect();
    let follow_last = if followers.is_empty() {
        0
    } else {
        let store = state.admin.store.clone();
        super::blocking(&state, move |_| Ok(store.follow_last_seq()?)).await?
    };
    let room = state.admin.store.room();
    let floor = state.admin.min_free_bytes;
    let disk_low = room.free_disk_bytes < floor.saturating_mul(2);
    let totals = crate::telemetry::plugin_totals();
    let plugin_time: Duration = totals.values().map(|t| t.process_event).sum();
    let failures: u64 = totals.values().map(|t| t.failures).sum();
    let per_event_us = if report.events_stored > 0 {
        plugin_time.as_secs_f64() * 1e6 / report.events_stored as f64
    } else {
        0.0
    };
    let body = html! {
        @if disk_low {
            div.flash.error {
                "Free disk space is low: " (bytes(room.free_disk_bytes)) " left; capture refuses events below "
                (bytes(floor)) " (DATA_DIR_MIN_FREE_MB)."
            }
        }
        @if let Some(error) = &report.last_error {
            div.flash.error { "The sink's last error: " (error) }
        }
        (chart(&state.traffic.rates(60, 1), "Events stored per second, last hour (per minute)"))
        (chart(&state.traffic.rates(144, 10), "Events stored per second, last day (per 10 minutes)"))
        section.card {
            div.grid {
                div.figure { "Events stored since start" b { (report.events_stored) } }
                div.figure { "Queue (" (sink) ")" b { (figures.queued_batches) " batches" } span.muted { (bytes(figures.queued_bytes)) ", oldest unstored " (format!("{:.1}", figures.oldest_age_s)) " s" } }
                div.figure { "Sink position (" (sink) ")" b { (position) } span.muted { (if report.healthy { "healthy" } else { "failing" }) } }
                div.figure { "Plugin time per event" b { (format!("{per_event_us:.0}")) " µs" } span.muted { (failures) " failed plugin calls since start" } }
                div.figure { "Jobs" b { (figures.jobs_queued) " queued" } span.muted { (figures.jobs_running) " running" } }
                div.figure { "Data directory" b { (bytes(figures.data_dir_bytes)) } span.muted { (bytes(room.free_disk_bytes)) " free on its disk" } }
                div.figure { "Duplicates skipped" b { (report.duplicates_skipped) } }
                div.figure { "Version" b { (env!("CARGO_PKG_VERSION")) } }
            }
        }
        @if !followers.is_empty() {
            h2 { "Follower sinks" }
            table {
                tr { th { "sink" } th { "position" } th { "behind" } th { "events stored since start" } th { "state" } }
                @for (name, follower) in &followers {
                    tr {
                        td { (name) }
                        td { (follower.position) }
                        td { (follow_last.saturating_sub(follower.position)) " lead writes" }
                        td { (follower.events_stored) }
                        td { @match &follower.last_error { Some(error) => { "failing: " (error) }, None => { (if follower.healthy { "healthy" } else { "starting" }) } } }
                    }
                }
            }
        }
        @if !report.waiting_teams.is_empty() {
            h2 { "Teams whose events wait for their plugins" }
            table {
                tr { th { "team" } th { "why" } }
                @for (team, why) in &report.waiting_teams { tr { td { (team) } td { (why) } } }
            }
        }
    };
    Ok(layout(&admin, "/", "Overview", body))
}

/// Bytes of the files under `dir` (not following links).
fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                Ok(kind) if kind.is_file() => {
                    total += entry.metadata().map(|m| m.len()).unwrap_or(0)
                }
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_spread_minutes_into_buckets_ending_now() {
        let traffic = Traffic::default();
        let now = minute_now();
        traffic.add(now, 600);
        traffic.add(now - 1, 60);
        traffic.add(now - 5000, 1_000_000);
        let hour = traffic.rates(60, 1);
        assert_eq!(hour.len(), 60);
        assert_eq!(hour[59], 10.0);
        assert_eq!(hour[58], 1.0);
        let day = traffic.rates(144, 10);
        assert_eq!(day[143], 660.0 / 600.0);
        assert_eq!(day.iter().sum::<f64>(), 660.0 / 600.0);
    }
}
