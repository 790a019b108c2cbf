//! Measures the durable job queue: no-op jobs enqueued (bulk) and executed through the real
//! workers on a real redb file, at several queue sizes, and the delay from a job's run-at time to
//! its start while a backlog of future jobs sits in the queue.
//!
//! `cargo run --release --bin jobbench -- --sizes 1000,10000,100000,1000000`
//! `cargo run --release --bin jobbench -- --plugin --sizes 10000,100000` measures what users
//! run instead: a WASM plugin's no-op job (Job Lab's `noop`, built under `plugins/`), queued in
//! bulk through the same operation as `POST …/jobs` and run by the server's plugin runner with
//! `JOBS_PER_PLUGIN_CONFIG` of them at once.
//! Prints one line per size; `bench/jobs.sh` runs Graphile Worker beside it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appliance::jobs::{now_ms, Done, JobQueue, JobSettings, RunError, Runner, StopFlags, Workers};
use appliance::store::{Job, JobKind, NewJob, Store};
use clap::Parser;
use hdrhistogram::Histogram;

// The same allocator as the server, so the figures are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Queue sizes to measure, comma-separated.
    #[arg(long, default_value = "1000,10000,100000", value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Jobs running at once (WORKER_CONCURRENCY × TASKS_PER_WORKER).
    #[arg(long, default_value_t = 20)]
    slots: usize,
    /// Jobs whose start delay is measured, due one per millisecond.
    #[arg(long, default_value_t = 2000)]
    latency_jobs: usize,
    /// Run a WASM plugin's no-op job instead of the queue's internal no-op.
    #[arg(long)]
    plugin: bool,
    /// Jobs of one plugin config running at once (JOBS_PER_PLUGIN_CONFIG).
    #[arg(long, default_value_t = 4)]
    per_config: usize,
}

/// Runs no-op jobs and records how late each started.
struct Recorder {
    delays: Mutex<Histogram<u64>>,
}

impl Runner for Recorder {
    fn run(&self, job: &Job, _stop: &Arc<StopFlags>) -> Result<Done, RunError> {
        let late_us = (chrono::Utc::now().timestamp_micros() - job.run_at_ms * 1000).max(0);
        if let Ok(mut h) = self.delays.lock() {
            let _ = h.record(late_us as u64);
        }
        Ok(Done::default())
    }
}

fn noop(run_at_ms: i64) -> NewJob {
    NewJob {
        id: uuid::Uuid::now_v7(),
        kind: JobKind::Noop,
        payload: "null".into(),
        run_at_ms,
        max_attempts: 1,
        timeout_ms: 0,
        idempotency_key: None,
        after: Vec::new(),
    }
}

fn enqueue_bulk(queue: &JobQueue, count: usize, run_at_ms: impl Fn(usize) -> i64) {
    let mut done = 0;
    while done < count {
        let n = (count - done).min(10_000);
        let jobs = (done..done + n).map(|i| noop(run_at_ms(i))).collect();
        queue.enqueue(jobs).expect("enqueue");
        done += n;
    }
}

/// Waits until only `remaining` jobs are kept.
async fn drained(store: &Store, remaining: u64) {
    loop {
        let stats = store.job_stats().expect("stats");
        if stats.total <= remaining && stats.running == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.plugin {
        if let Err(e) = plugin_jobs(&args).await {
            eprintln!("jobbench: {e}");
            std::process::exit(1);
        }
        return;
    }
    println!(
        "{:>9}  {:>12}  {:>12}  {:>14}  {:>10}  {:>10}",
        "queued", "enqueue/s", "execute/s", "enq+exec/s", "start p50", "start p99"
    );
    for &size in &args.sizes {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let queue = JobQueue::new(store.clone(), settings(&args));
        let recorder = Arc::new(Recorder {
            delays: Mutex::new(Histogram::new(3).expect("histogram")),
        });
        let (trigger, shutdown) = appliance::shutdown::channel();
        let workers = tokio::spawn(
            Workers {
                queue: queue.clone(),
                runner: recorder.clone(),
                schedule_done: None,
            }
            .run(shutdown),
        );

        // Throughput: `size` no-op jobs due now, enqueued in bulk, then run to the last.
        let started = Instant::now();
        let q = queue.clone();
        let now = now_ms();
        tokio::task::spawn_blocking(move || enqueue_bulk(&q, size, |_| now))
            .await
            .expect("enqueue task");
        let enqueued = started.elapsed();
        drained(&store, 0).await;
        let total = started.elapsed();

        // Start delay: `size` future jobs stay queued while `latency_jobs` come due, one per ms.
        let q = queue.clone();
        let far = now_ms() + 3_600_000;
        tokio::task::spawn_blocking(move || enqueue_bulk(&q, size, |_| far))
            .await
            .expect("enqueue task");
        if let Ok(mut h) = recorder.delays.lock() {
            h.reset();
        }
        let q = queue.clone();
        let latency_jobs = args.latency_jobs;
        let first = now_ms() + 200;
        tokio::task::spawn_blocking(move || enqueue_bulk(&q, latency_jobs, |i| first + i as i64))
            .await
            .expect("enqueue task");
        drained(&store, size as u64).await;
        let (p50, p99) = recorder
            .delays
            .lock()
            .map(|h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99)))
            .unwrap_or_default();

        println!(
            "{}  {:>8.2}ms  {:>8.2}ms",
            rates(size, enqueued, total),
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
        );
        trigger.drain_until(tokio::time::Instant::now());
        let _ = workers.await;
    }
}

/// A row's first columns: the size, then jobs/s enqueued, executed, and both together.
fn rates(size: usize, enqueued: Duration, total: Duration) -> String {
    let per_s = |d: Duration| size as f64 / d.as_secs_f64();
    format!(
        "{size:>9}  {:>12.0}  {:>12.0}  {:>14.0}",
        per_s(enqueued),
        per_s(total - enqueued),
        per_s(total)
    )
}

fn settings(args: &Args) -> JobSettings {
    JobSettings {
        slots: args.slots,
        per_plugin_config: args.per_config,
        retry_base: Duration::from_secs(1),
        key_retention: Duration::from_secs(3600),
        dead_retention: Duration::from_secs(86_400),
        idle_poll: Duration::from_secs(5),
    }
}

/// Plugin jobs: Job Lab's `noop`, queued in bulk (chunks of 10,000, as Graphile's `addJobs`
/// run) and run to the last by the server's worker pool and plugin runner.
async fn plugin_jobs(args: &Args) -> Result<(), String> {
    use appliance::plugins::{self, tasks::PluginRunner, Catalog, PluginPolicy};
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let wasm = root.join("target/wasm32-wasip2/release/job_lab.wasm");
    if !wasm.exists() {
        return Err(format!(
            "{} is missing: build the plugins first",
            wasm.display()
        ));
    }
    println!(
        "{:>9}  {:>12}  {:>12}  {:>14}   (plugin jobs: WASM no-op, {} of one config at once)",
        "queued", "enqueue/s", "execute/s", "enq+exec/s", args.per_config
    );
    for &size in &args.sizes {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let data = dir.path();
        let config = appliance::config::Config::from_vars([(
            "DATA_DIR".to_string(),
            data.display().to_string(),
        )])
        .map_err(|e| e.to_string())?;
        let store = Store::open(data).map_err(|e| e.to_string())?;
        let team = store
            .create_team("bench", None)
            .map_err(|e| e.to_string())?;
        let runtime = Arc::new(appliance::app::plugin_runtime(&config).map_err(|e| e.to_string())?);
        let folder = data.join("job-lab");
        std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
        std::fs::copy(
            root.join("tests/job-lab/plugin.json"),
            folder.join("plugin.json"),
        )
        .map_err(|e| e.to_string())?;
        std::fs::copy(&wasm, folder.join("job_lab.wasm")).map_err(|e| e.to_string())?;
        let plugin =
            plugins::install(&store, &runtime, data, &folder).map_err(|e| e.to_string())?;
        store
            .upsert_plugin_config(team.id, plugin.id, true, None, None)
            .map_err(|e| e.to_string())?;
        let queue = JobQueue::new(store.clone(), settings(args));
        let catalog = Arc::new(Catalog::new(
            runtime.clone(),
            store.clone(),
            data,
            PluginPolicy::closed(),
            Some(queue.clone()),
            Arc::new(appliance::geoip::GeoIp::disabled()),
        ));
        let ops = appliance::ops::Ops::in_server(store.clone(), queue.clone(), data, runtime);
        let (trigger, shutdown) = appliance::shutdown::channel();
        let workers = tokio::spawn(
            Workers {
                queue: queue.clone(),
                runner: Arc::new(PluginRunner::new(catalog, None, args.slots.min(64))),
                schedule_done: None,
            }
            .run(shutdown),
        );

        let started = Instant::now();
        let team_id = team.id;
        tokio::task::spawn_blocking(move || {
            let mut done = 0;
            while done < size {
                let n = (size - done).min(10_000);
                let requests = (0..n)
                    .map(|_| appliance::ops::jobs::JobRequest {
                        name: "noop".into(),
                        payload: "{}".into(),
                        idempotency_key: None,
                        delay_ms: 0,
                        max_attempts: None,
                        timeout_ms: 0,
                    })
                    .collect();
                ops.enqueue_jobs(team_id, "Job Lab", requests)
                    .map_err(|e| e.to_string())?;
                done += n;
            }
            Ok::<(), String>(())
        })
        .await
        .map_err(|e| e.to_string())??;
        let enqueued = started.elapsed();
        drained(&store, 0).await;
        let total = started.elapsed();
        let dead = store.job_stats().map_err(|e| e.to_string())?;
        if dead.total != 0 {
            return Err(format!("{} jobs were left in the queue", dead.total));
        }
        println!("{}", rates(size, enqueued, total));
        trigger.drain_until(tokio::time::Instant::now());
        let _ = workers.await;
    }
    Ok(())
}
