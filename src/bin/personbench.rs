//! Measures the person step alone: the pipeline's [`PersonEngine`] on a real redb store runs
//! PostHog's person rules over batches of the load generator's events, in process, with no
//! HTTP, no queue and no sink, so its CPU time per event is measured without the machine's
//! noise in the end-to-end figure. Each shape runs on a fresh store; the default events and
//! the personless ones side by side show what person processing itself costs per event.
//!
//! `cargo run --release --bin personbench` (`--events 500000 --users 10000`).

mod events;

use std::time::{Duration, Instant};

use appliance::event::{EventRow, IngestBatch};
use appliance::pipeline::PersonEngine;
use appliance::store::{QueuedBatch, Store};
use chrono::{DateTime, Utc};
use clap::Parser;
use events::{event, Events};
use serde_json::Value;
use uuid::Uuid;

// The same allocator as the server, so the figures are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Person step benchmark: CPU time per event of PostHog's person rules")]
struct Args {
    /// Events per shape.
    #[arg(long, default_value_t = 500_000)]
    events: u64,
    /// Distinct users the events come from (the load generator's 10,000, the default size of
    /// the person cache, `DISTINCT_ID_LRU_SIZE`).
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Batches the step takes at once (the write stage reads up to this many per round).
    #[arg(long, default_value_t = 64)]
    batches_per_step: usize,
    /// Rounds per shape; the best is printed, as the machine is shared.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only these shapes (default all four).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Events>,
}

const EVENTS_PER_BATCH: u64 = 50;

fn main() -> Result<(), String> {
    let args = Args::parse();
    println!(
        "person step: {} events of {} users per shape, {} batches of {EVENTS_PER_BATCH} per step, best of {}",
        args.events, args.users, args.batches_per_step, args.rounds
    );
    for (label, shape) in [
        ("trimmed $pageview (loadgen's default)", Events::Trimmed),
        ("personless", Events::Personless),
        ("browsing, a new page each event", Events::Browsing),
        ("posthog-js $pageview in full", Events::PosthogJs),
    ] {
        if !args.only.is_empty() && !args.only.contains(&shape) {
            continue;
        }
        let mut best: Option<Duration> = None;
        for _ in 0..args.rounds {
            let took = run(&args, shape)?;
            best = Some(best.map_or(took, |b| b.min(took)));
        }
        let took = best.unwrap_or_default();
        println!(
            "{label:<40} {:>7.2} µs per event   {:>9.0} events/s on one core",
            took.as_secs_f64() * 1e6 / args.events as f64,
            args.events as f64 / took.as_secs_f64()
        );
    }
    Ok(())
}

/// The time the step took over all the events of `shape`, on a fresh store.
fn run(args: &Args, shape: Events) -> Result<Duration, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = Store::open(dir.path()).map_err(|e| e.to_string())?;
    let mut engine = PersonEngine::new(store, args.users as usize);
    let received_at = Utc::now();
    let timestamp: DateTime<Utc> = "2026-11-26T02:25:24.349Z"
        .parse()
        .map_err(|e: chrono::ParseError| e.to_string())?;
    let mut took = Duration::ZERO;
    let mut position = 0;
    let mut n = 0;
    while n < args.events {
        let mut step = Vec::with_capacity(args.batches_per_step);
        while step.len() < args.batches_per_step && n < args.events {
            let count = EVENTS_PER_BATCH.min(args.events - n);
            position += 1;
            step.push(batch(
                position,
                received_at,
                timestamp,
                shape,
                n,
                count,
                args.users,
            ));
            n += count;
        }
        let started = Instant::now();
        engine
            .process(&mut step, position)
            .map_err(|e| e.to_string())?;
        took += started.elapsed();
        // As the write stage does once the step's changes are stored with the delivery mark.
        engine.committed(position);
    }
    Ok(took)
}

/// A batch of `count` events as the queue holds them after capture: the event's properties as
/// text, without the envelope's keys.
fn batch(
    seq: u64,
    received_at: DateTime<Utc>,
    timestamp: DateTime<Utc>,
    shape: Events,
    first: u64,
    count: u64,
    users: u64,
) -> QueuedBatch {
    let events = (first..first + count)
        .map(|n| {
            let mut sent = event(n, shape);
            let mut properties = match sent["properties"].take() {
                Value::Object(map) => map,
                _ => serde_json::Map::new(),
            };
            properties.remove("distinct_id");
            properties.insert("$ip".into(), Value::String("127.0.0.1".into()));
            EventRow {
                uuid: Uuid::now_v7(),
                event: "$pageview".into(),
                distinct_id: format!("user-{}", n % users),
                properties: Value::Object(properties).to_string(),
                timestamp,
                elements_chain: String::new(),
            }
        })
        .collect();
    QueuedBatch {
        seq,
        batch: IngestBatch {
            team_id: 1,
            received_at,
            sent_at: None,
            ip: None,
            events,
        },
    }
}
