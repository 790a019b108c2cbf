//! Start-up and shutdown of the whole appliance: builds each part from the configuration,
//! wires them together, and stops them in the order that loses nothing.
//!
//! Owns: the lifecycle. Start: store → sink (migrated) → ingest writer → pipeline → HTTP.
//! Stop (SIGTERM/SIGINT): HTTP stops accepting and drains in-flight requests → the ingest
//! writer commits what it holds and exits when the last handle is gone → the pipeline flushes
//! the queue to the sink until it is empty or `SHUTDOWN_TIMEOUT_SECS` passes → exit 0.
//! Must never: exit 0 before the ingest writer has answered every request it accepted.

mod http;
mod maintenance;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::admin::{self, AdminState};
use crate::capture::{self, Admission, CaptureState, RoomLimits, TeamDirectory};
use crate::config::Config;
use crate::geoip::GeoIp;
use crate::ingest;
use crate::jobs::{self, JobQueue, Workers};
use crate::ops::Ops;
use crate::pipeline::{Deliveries, FollowMarks, Follower, PersonEngine, Pipeline, PipelineStatus};
use crate::plugins::tasks::{PluginRunner, PluginSchedules};
use crate::plugins::{Catalog, Chains, PluginError, PluginPolicy};
use crate::schedule::lease::RedisLease;
use crate::schedule::Scheduler;
use crate::shutdown;
use crate::sinks::{Sink, SinkError};
use crate::store::{ReadLimits, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("cannot prepare the admin page: {0}")]
    Admin(#[from] crate::ops::OpError),
    #[error("SCHEDULE_LEASE=redis: REDIS_URL: {0}")]
    LeaseUrl(redis::RedisError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("another appliance server is already running on the data directory {0} (its lock file is held)")]
    Locked(std::path::PathBuf),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
}

/// How long start-up waits for the sink to answer before giving up (a database still starting
/// is waited for; one that stays away is a failed start the service manager retries).
const SINK_START_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The sink's position, asked until it answers or [`SINK_START_WAIT`] passes.
async fn sink_position_at_start(sink: &dyn Sink) -> Result<u64, AppError> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        match sink.position().await {
            Ok(position) => return Ok(position),
            // Waiting cannot help: another box's position is not this one's.
            Err(e @ SinkError::Taken { .. }) => return Err(e.into()),
            Err(e) if started.elapsed() + pause < SINK_START_WAIT => {
                tracing::warn!(error = %e, "the sink does not answer yet; waiting for it before accepting events");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs the appliance until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), AppError> {
    if config.idle {
        return run_idle(&config).await;
    }
    crate::failpoint::arm(config.failpoints.clone());
    crate::telemetry::install(&config);
    let _server_lock = lock_data_dir(&config.data_dir)?;
    let store = Store::open(&config.data_dir)?;
    let own_teams = config.teams_from_postgres.is_none();
    if let Some(team) = own_teams
        .then(|| store.ensure_default_team())
        .transpose()?
        .flatten()
    {
        println!(
            "created team {} ({}) with project token {}",
            team.id, team.name, team.api_token
        );
    }
    let opened = crate::sinks::open(&config.sinks, &config.sqlite_path, &store)?;
    let (sink, events) = (opened.lead.sink, opened.events);
    tracing::info!(
        state = %store.path().display(),
        sink = sink.name(),
        events = %opened.lead.target,
        "storage opened"
    );
    for follower in &opened.followers {
        tracing::info!(sink = follower.sink.name(), events = %follower.target, "follower sink configured");
    }
    let one = ReadLimits {
        events: 1,
        bytes: 1,
    };
    if opened.followers.is_empty() && !store.read_follow_after(0, u64::MAX, one)?.is_empty() {
        // Records kept for followers no longer configured would hold their bytes forever.
        let last = store.follow_last_seq()?;
        store.trim_follow_through(last)?;
    }
    // A restored state file may be older than the restored events: new batches must get
    // positions past everything the sink holds, so nothing is accepted before it answers.
    let sink_position = sink_position_at_start(&*sink).await?;
    if store.ensure_sequence_after(sink_position)? {
        tracing::warn!(
            sink_position,
            "the event store is ahead of the ingest queue (a restore?); new batches are numbered after it"
        );
    }
    for note in config.unbuilt_components() {
        tracing::warn!("{note}");
    }

    let wake = Arc::new(Notify::new());
    let (ingest, writer) = ingest::start(
        store.clone(),
        config.ingest_channel_capacity,
        config.ingest_commit_max_requests,
        wake.clone(),
    )
    .map_err(|source| AppError::Io {
        context: "cannot start the ingest writer",
        source,
    })?;

    let runtime = Arc::new(plugin_runtime(&config)?);
    if store.admin_api_token()?.1 {
        // The token itself is not printed: the service log is not a place for secrets.
        println!("created the admin API token for /api/; `appliance api-token` shows it");
    }
    let queue = JobQueue::new(store.clone(), config.jobs);
    if let Err(e) = crate::wake::listen(&config.data_dir, queue.wake_handle()) {
        tracing::warn!(error = %e, "no wake socket: jobs queued by the CLI start within a second instead of at once");
    }
    let now = jobs::now_ms();
    let recovered = store.recover_leases(now, now)?;
    if recovered > 0 {
        tracing::warn!(
            recovered,
            "jobs claimed by the previous run were not finished; they run again"
        );
    }
    let geoip = Arc::new(GeoIp::from_settings(
        config.disable_mmdb,
        config.geoip_mmdb.as_deref(),
        &config.data_dir,
    ));
    if !geoip.is_loaded() && !config.disable_mmdb {
        tracing::info!(
            "no GeoIP database yet (set GEOIP_MMDB_PATH or put {} in the data directory; it is loaded when it appears)",
            crate::geoip::DEFAULT_FILE
        );
    }
    spawn_geoip_watch(geoip.clone());
    let catalog = Arc::new(Catalog::new(
        runtime.clone(),
        store.clone(),
        &config.data_dir,
        PluginPolicy::new(
            config.plugin_allowed_hosts.clone(),
            config.plugin_quotas.clone(),
        ),
        Some(queue.clone()),
        geoip.clone(),
    ));
    let status = Arc::new(PipelineStatus::default());
    let (trigger, shutdown) = shutdown::channel();
    let shutdown_for_maintenance = shutdown.clone();
    let follow_wake = (!opened.followers.is_empty()).then(|| Arc::new(Notify::new()));
    let read_limits = ReadLimits {
        events: config.sink_batch_events,
        bytes: config.sink_batch_bytes,
    };
    let marks = Arc::new(FollowMarks::default());
    let mut followers = Vec::new();
    let mut follower_tasks = Vec::new();
    for follower in opened.followers {
        let follower_status = Arc::new(PipelineStatus::default());
        followers.push((follower.sink.name(), follower_status.clone()));
        follower_tasks.push(tokio::spawn(
            Follower {
                store: store.clone(),
                sink: follower.sink,
                limits: read_limits,
                status: follower_status,
                wake: follow_wake.clone().unwrap_or_default(),
                marks: marks.clone(),
            }
            .run(shutdown.clone()),
        ));
    }
    let chains = Arc::new(std::sync::Mutex::new(Chains::new(catalog.clone())));
    let pipeline = tokio::spawn(
        Pipeline {
            store: store.clone(),
            sink: sink.clone(),
            read_limits,
            linger: config.sink_linger,
            plugins: chains.clone(),
            status: status.clone(),
            wake,
            deliveries: Some(Deliveries {
                catalog: catalog.clone(),
                queue: queue.clone(),
            }),
            persons: Arc::new(Mutex::new(PersonEngine::new(
                store.clone(),
                config.distinct_id_lru_size,
            ))),
            shared_persons: config.cluster.shared_persons,
            followers: follow_wake,
        }
        .run(shutdown.clone()),
    );
    let schedule_done = Arc::new(Notify::new());
    let schedule_lease = match &config.cluster.schedule_lease {
        Some(settings) => Some(Arc::new(
            RedisLease::new(settings, store.state_id()?).map_err(AppError::LeaseUrl)?,
        )),
        None => None,
    };
    let workers = tokio::spawn(
        Workers {
            queue: queue.clone(),
            runner: Arc::new(PluginRunner::new(
                catalog.clone(),
                Some(events.clone()),
                idle_job_instances(config.jobs.slots),
            )),
            schedule_done: Some(schedule_done.clone()),
        }
        .run(shutdown.clone()),
    );
    let scheduler = tokio::spawn(
        Scheduler {
            queue: queue.clone(),
            source: Arc::new(PluginSchedules { catalog }),
            timeout: config.plugin_limits.task,
            timezone: config.schedule_timezone,
            job_done: schedule_done,
            lease: schedule_lease,
        }
        .run(shutdown),
    );

    spawn_watchdog(status.clone());
    let stopping = Arc::new(AtomicBool::new(false));
    let health = Arc::new(AdminState {
        store: store.clone(),
        sink_name: sink.name(),
        max_queue_bytes: config.ingest_max_queue_bytes,
        min_free_bytes: config.data_min_free_bytes,
        pipeline: status,
        followers,
        stopping: stopping.clone(),
    });
    tokio::spawn(watch_free_space(store.clone()));
    tokio::spawn(maintenance::backups(
        store.clone(),
        config.clone(),
        shutdown_for_maintenance.clone(),
    ));
    tokio::spawn(maintenance::run(
        store.clone(),
        config.jobs,
        config.plugin_quotas.clone(),
        shutdown_for_maintenance,
    ));
    let sources = spawn_sources(&config, &store, &ingest, &geoip, &queue);
    if config.web_enabled {
        let capture = capture::router(Arc::new(CaptureState {
            ingest,
            teams: TeamDirectory::new(store.clone()),
            limits: config.capture,
            trust_proxy: config.trust_proxy,
            geoip: geoip.clone(),
            warnings: capture::Warnings::spawn(store.clone()),
            salts: Arc::new(capture::DailySalts::new(store.clone())),
            admission: Admission::new(
                &config.capture,
                store.clone(),
                RoomLimits {
                    max_queue_bytes: config.ingest_max_queue_bytes,
                    min_free_bytes: config.data_min_free_bytes,
                    max_deferred_bytes: config.plugin_quotas.deferred_max_bytes,
                },
            ),
        }))
        .merge(admin::router(health.clone()));
        let ops = Ops::in_server(store.clone(), queue.clone(), &config.data_dir, runtime);
        let sessions = admin::session::Sessions::load(&ops)?;
        let setup_token = if ops.admin_exists()? {
            None
        } else {
            Some(ops.new_setup_token(false)?)
        };
        let traffic = Arc::new(admin::page::Traffic::default());
        let capture_bound = Arc::new(std::sync::OnceLock::new());
        traffic.spawn_sampler(health.pipeline.clone(), health.sink_name);
        let page = admin::page::router(Arc::new(admin::page::PageState::new(
            ops.clone(),
            sessions.clone(),
            health.clone(),
            Arc::new(config.clone()),
            traffic,
            events,
            capture_bound.clone(),
        )));
        let api = Arc::new(admin::api::ApiState::new(ops, sessions));
        let management = admin::api::router(api.clone())
            .merge(admin::metrics_router(health.clone(), api))
            .merge(page)
            .merge(admin::router(health));
        http::serve_both(
            &config,
            capture,
            management,
            stopping,
            setup_token,
            capture_bound,
        )
        .await?;
    } else {
        tracing::warn!("DISABLE_WEB is set: no capture endpoint; draining what is queued");
        drop(ingest);
        shutdown_signal().await;
    }

    // The sources finish the round they are in (its messages durable and acknowledged) and
    // drop their ingest handles.
    if let Some((trigger, task)) = sources {
        trigger.drain_until(tokio::time::Instant::now() + config.shutdown_timeout);
        if let Err(e) = task.await {
            tracing::error!(error = %e, "a source's task failed");
        }
    }
    // Every request handler and source has finished, so every ingest handle is gone: the
    // writer commits what it holds, answers, and exits.
    if tokio::task::spawn_blocking(move || writer.join())
        .await
        .is_err()
    {
        tracing::error!("the ingest writer thread panicked");
    }
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    trigger.drain_until(deadline);
    if let Err(e) = pipeline.await {
        tracing::error!(error = %e, "the pipeline task failed");
    }
    for task in follower_tasks {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "a follower sink's task failed");
        }
    }
    if let Err(e) = workers.await {
        tracing::error!(error = %e, "the job workers failed");
    }
    if let Err(e) = scheduler.await {
        tracing::error!(error = %e, "the scheduler failed");
    }
    // The chains' instances are torn down last, each within its deadline.
    let teardown = tokio::task::spawn_blocking(move || {
        chains
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .shut_down()
    });
    if let Err(e) = teardown.await {
        tracing::error!(error = %e, "tearing plugins down failed");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Plugin instances kept idle between jobs: one per job slot at most (each holds its memory, up
/// to `PLUGIN_MEMORY_MB`), and never more than a small share of the engine's instance pool,
/// which the event chains draw from too.
fn idle_job_instances(slots: usize) -> usize {
    slots.min(64)
}

/// Holds the data directory's server lock for as long as the returned file lives. One server
/// per data directory: the job queue treats every claim it finds at start-up as left by a dead
/// process, which is only true if no other server is running.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, AppError> {
    match crate::store::try_lock_data_dir(data_dir) {
        Ok(Some(file)) => Ok(file),
        Ok(None) => Err(AppError::Locked(data_dir.to_owned())),
        Err(source) => Err(AppError::Io {
            context: "cannot take the data directory's server lock",
            source,
        }),
    }
}

/// The plugin engine, with compiled components cached under the data directory.
pub fn plugin_runtime(config: &Config) -> Result<crate::plugins::runtime::Runtime, PluginError> {
    let cache = crate::plugins::plugin_dir(&config.data_dir).join("compiled");
    crate::plugins::runtime::Runtime::new(&cache, config.plugin_limits)
}

/// `--idle`: answers health checks and nothing else; opens no storage.
async fn run_idle(config: &Config) -> Result<(), AppError> {
    tracing::warn!("idle mode: no events are processed");
    if !config.web_enabled {
        shutdown_signal().await;
        return Ok(());
    }
    let app = capture::idle_router().merge(admin::idle_router());
    http::serve_both(
        config,
        app,
        admin::idle_router(),
        Arc::new(AtomicBool::new(false)),
        None,
        Arc::default(),
    )
    .await
}

/// How often the GeoIP database file is looked at for a replacement.
const GEOIP_WATCH: std::time::Duration = std::time::Duration::from_secs(2);

/// Starts the configured queue sources under one shutdown of their own (they stop before the
/// ingest writer, which waits for their handles).
fn spawn_sources(
    config: &Config,
    store: &Store,
    ingest: &crate::ingest::IngestHandle,
    geoip: &Arc<GeoIp>,
    jobs: &JobQueue,
) -> Option<(shutdown::ShutdownTrigger, tokio::task::JoinHandle<()>)> {
    if config.celery.is_none() && config.kafka.is_none() && config.teams_from_postgres.is_none() {
        return None;
    }
    let normalizer = crate::sources::Normalizer {
        geoip: geoip.clone(),
        salts: Arc::new(capture::DailySalts::new(store.clone())),
        max_event_bytes: config.capture.max_event_bytes,
    };
    let room = crate::sources::RoomLimits {
        max_queue_bytes: config.ingest_max_queue_bytes,
        min_free_bytes: config.data_min_free_bytes,
    };
    let (trigger, shutdown) = shutdown::channel();
    let mut tasks = Vec::new();
    if let Some(settings) = config.teams_from_postgres.clone() {
        tracing::info!(database = %crate::config::redact_url(&settings.url), "teams come from PostHog's posthog_team");
        let mirror = crate::sources::teams::TeamMirror {
            settings,
            store: store.clone(),
        };
        tasks.push(tokio::spawn(mirror.run(shutdown.clone())));
    }
    if let Some(settings) = config.celery.clone() {
        tracing::info!(queue = %settings.queue, redis = %crate::config::redact_url(&settings.redis_url), "consuming Celery tasks");
        let source = crate::sources::celery::CelerySource {
            settings,
            store: store.clone(),
            jobs: jobs.clone(),
            ingest: ingest.clone(),
            normalizer: normalizer.clone(),
            room,
        };
        tasks.push(tokio::spawn(source.run(shutdown.clone())));
    }
    if let Some(settings) = config.kafka.clone() {
        tracing::info!(topic = %settings.topic, group = %settings.group, hosts = %settings.hosts, "consuming Kafka messages");
        let source = crate::sources::kafka::KafkaSource {
            settings,
            store: store.clone(),
            ingest: ingest.clone(),
            normalizer,
            room,
        };
        tasks.push(tokio::spawn(source.run(shutdown)));
    }
    let all = tokio::spawn(async move {
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a source's task failed");
            }
        }
    });
    Some((trigger, all))
}

/// Reloads the GeoIP database when its file is replaced (a metadata read every two seconds).
fn spawn_geoip_watch(geoip: Arc<GeoIp>) {
    if !geoip.is_enabled() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(GEOIP_WATCH).await;
            let geoip = geoip.clone();
            let _ = tokio::task::spawn_blocking(move || geoip.refresh()).await;
        }
    });
}

/// Under systemd with `WatchdogSec=`: pings the watchdog at half its interval for as long as the
/// pipeline's loops keep going round; a stalled pipeline (or runtime) stops the pings and
/// systemd restarts the service.
fn spawn_watchdog(pipeline: Arc<PipelineStatus>) {
    let Some(limit) = watchdog_interval() else {
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(limit / 2).await;
            let stalled = pipeline.since_beat();
            if stalled < limit {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    stalled_ms = stalled.as_millis() as u64,
                    "the pipeline has stalled; not pinging the watchdog"
                );
            }
        }
    });
}

/// The service watchdog's interval, read as libsystemd's `sd_watchdog_enabled` does:
/// `WATCHDOG_USEC`, for this process if `WATCHDOG_PID` names one (the sd-notify crate insists
/// on `WATCHDOG_PID`, which systemd sets but a supervisor need not).
fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

/// Reads the data directory's free space every second, for capture's floor and `/_ready`.
async fn watch_free_space(store: Store) {
    loop {
        let reading = store.clone();
        let _ = tokio::task::spawn_blocking(move || reading.refresh_free_space()).await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the appliance");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
