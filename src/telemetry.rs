//! The appliance's metrics: every metric's name and description in one place, the recorders
//! (Prometheus, rendered at `/metrics` on the admin address, and StatsD when `STATSD_HOST` is
//! set), and the log output's format.
//!
//! Owns: [`install`], the names ([`names`]) modules record under with the `metrics` macros, and
//! [`init_logging`] (human-readable on a terminal; JSON with `LOG_FORMAT=json` or under the
//! systemd journal).
//! Must never: block or allocate per event on a hot path beyond the `metrics` macros' own cost,
//! or label a metric with something a client controls (only teams, plugin configs, endpoints
//! and outcomes, whose number the operator bounds).

use std::sync::{Arc, OnceLock};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::{Config, LogFormat};

/// Metric names: each is recorded in exactly one place, described in [`describe`].
pub mod names {
    pub const CAPTURE_REQUESTS: &str = "appliance_capture_requests_total";
    pub const CAPTURE_EVENTS: &str = "appliance_capture_events_total";
    pub const CAPTURE_ACK_SECONDS: &str = "appliance_capture_ack_seconds";
    pub const QUEUE_BYTES: &str = "appliance_queue_bytes";
    pub const QUEUE_BATCHES: &str = "appliance_queue_batches";
    pub const QUEUE_OLDEST_AGE: &str = "appliance_queue_oldest_age_seconds";
    pub const DEFERRED_BYTES: &str = "appliance_deferred_bytes";
    pub const SINK_BATCH_EVENTS: &str = "appliance_sink_batch_events";
    pub const SINK_WRITE_SECONDS: &str = "appliance_sink_write_seconds";
    pub const SINK_EVENTS: &str = "appliance_sink_events_total";
    pub const SINK_ERRORS: &str = "appliance_sink_errors_total";
    pub const SINK_LAG: &str = "appliance_sink_lag_batches";
    pub const PLUGIN_CALLS: &str = "appliance_plugin_calls_total";
    pub const PLUGIN_CALL_SECONDS: &str = "appliance_plugin_call_seconds";
    pub const JOBS: &str = "appliance_jobs";
    pub const JOB_RUN_SECONDS: &str = "appliance_job_run_seconds";
    pub const JOBS_FINISHED: &str = "appliance_jobs_finished_total";
    pub const SCHEDULE_LAG: &str = "appliance_schedule_lag_seconds";
    pub const SCHEDULE_LEASE_HELD: &str = "appliance_schedule_lease_held";
    pub const FREE_DISK_BYTES: &str = "appliance_free_disk_bytes";
    pub const INGESTION_WARNINGS_DROPPED: &str = "appliance_ingestion_warnings_dropped_total";
    pub const PERSON_STEP_SECONDS: &str = "appliance_person_step_seconds";
    pub const PERSONS_IMPORTED: &str = "appliance_persons_imported_total";
    pub const PERSON_CONFLICTS: &str = "appliance_person_conflicts_total";
}

/// Buckets of the latency histograms, in seconds: from a group commit to a slow plugin job.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const EVENT_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 20000.0];

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// One plugin config's calls since start, for the admin page (Prometheus has the same figures
/// as counters and histograms; these read back without parsing them).
#[derive(Clone, Copy, Debug, Default)]
pub struct PluginTotals {
    pub calls: u64,
    pub failures: u64,
    /// Time spent in `process-event` calls.
    pub process_event: std::time::Duration,
}

/// Per plugin config id; one entry per config that ever ran, so bounded by the configs.
static PLUGIN_TOTALS: std::sync::Mutex<std::collections::BTreeMap<u64, PluginTotals>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Counts one finished plugin call.
pub fn count_plugin_call(config: u64, kind: &str, elapsed: std::time::Duration, failed: bool) {
    let mut totals = PLUGIN_TOTALS.lock().unwrap_or_else(|p| p.into_inner());
    let entry = totals.entry(config).or_default();
    entry.calls += 1;
    entry.failures += u64::from(failed);
    if kind == "process_event" {
        entry.process_event += elapsed;
    }
}

/// Every plugin config's totals since start.
pub fn plugin_totals() -> std::collections::BTreeMap<u64, PluginTotals> {
    PLUGIN_TOTALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Installs the recorders once per process; later calls do nothing. A StatsD recorder joins
/// when `STATSD_HOST` is set (failures to start it are reported, not fatal).
pub fn install(config: &Config) {
    if PROMETHEUS.get().is_some() {
        return;
    }
    let builder = PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(names::SINK_BATCH_EVENTS.into()),
                EVENT_BUCKETS,
            )
        });
    let prometheus = match builder {
        Ok(builder) => builder.build_recorder(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot configure the metrics histograms; using defaults");
            PrometheusBuilder::new().build_recorder()
        }
    };
    let handle = prometheus.handle();
    let mut fanout = metrics_util::layers::FanoutBuilder::default().add_recorder(prometheus);
    if let Some(host) = config.value("STATSD_HOST").map(str::to_owned) {
        let port = config
            .value("STATSD_PORT")
            .and_then(|p| p.parse().ok())
            .unwrap_or(8125);
        let prefix = config
            .value("STATSD_PREFIX")
            .unwrap_or_default()
            .trim_end_matches('.');
        match statsd_sink(&host, port).and_then(|sink| {
            metrics_exporter_statsd::StatsdBuilder::from(host.as_str(), port)
                .with_sink(sink)
                .histogram_is_timer()
                .build(Some(prefix))
                .map_err(|e| std::io::Error::other(e.to_string()))
        }) {
            Ok(statsd) => fanout = fanout.add_recorder(statsd),
            Err(e) => tracing::warn!(error = %e, "cannot send metrics to StatsD"),
        }
    }
    if metrics::set_global_recorder(fanout.build()).is_ok() {
        let _ = PROMETHEUS.set(handle);
        describe();
    }
}

/// How long a StatsD line may wait in the buffer: without a flush, a quiet server's figures
/// would sit there until the buffer fills.
const STATSD_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A buffered UDP sink (one datagram per full buffer) that a thread of its own flushes every
/// [`STATSD_FLUSH_EVERY`].
struct FlushedUdpSink(Arc<cadence::BufferedUdpMetricSink>);

impl cadence::MetricSink for FlushedUdpSink {
    fn emit(&self, metric: &str) -> std::io::Result<usize> {
        self.0.emit(metric)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn statsd_sink(host: &str, port: u16) -> std::io::Result<FlushedUdpSink> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // Sending must never block a request: a full socket buffer drops the line instead.
    socket.set_nonblocking(true)?;
    let sink = cadence::BufferedUdpMetricSink::from((host, port), socket)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let sink = Arc::new(sink);
    let flushing = Arc::downgrade(&sink);
    std::thread::Builder::new()
        .name("statsd-flush".into())
        .spawn(move || {
            while let Some(sink) = flushing.upgrade() {
                let _ = cadence::MetricSink::flush(sink.as_ref());
                drop(sink);
                std::thread::sleep(STATSD_FLUSH_EVERY);
            }
        })?;
    Ok(FlushedUdpSink(sink))
}

/// The Prometheus text of every metric, if the recorders are installed.
pub fn render() -> Option<String> {
    PROMETHEUS.get().map(|h| {
        h.run_upkeep();
        h.render()
    })
}

fn describe() {
    use names::*;
    describe_counter!(
        CAPTURE_REQUESTS,
        "Capture requests by endpoint and outcome (ok or the error code)"
    );
    describe_counter!(
        CAPTURE_EVENTS,
        "Events in capture requests, accepted or rejected"
    );
    describe_histogram!(
        CAPTURE_ACK_SECONDS,
        Unit::Seconds,
        "Time from a capture request's arrival to its answer"
    );
    describe_gauge!(
        QUEUE_BYTES,
        Unit::Bytes,
        "Bytes of events in the ingest queue"
    );
    describe_gauge!(
        QUEUE_BATCHES,
        "Batches in the ingest queue, not trimmed yet"
    );
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest batch the sink has not stored"
    );
    describe_gauge!(
        DEFERRED_BYTES,
        Unit::Bytes,
        "Bytes of a team's events deferred for its plugins"
    );
    describe_histogram!(SINK_BATCH_EVENTS, "Events per sink write");
    describe_histogram!(
        SINK_WRITE_SECONDS,
        Unit::Seconds,
        "Duration of a sink write"
    );
    describe_counter!(
        SINK_EVENTS,
        "Events the sink stored, or skipped as already stored"
    );
    describe_counter!(SINK_ERRORS, "Failed sink writes (each retried)");
    describe_histogram!(
        PERSON_STEP_SECONDS,
        Unit::Seconds,
        "Time the person step took over one read of the queue"
    );
    describe_counter!(
        PERSONS_IMPORTED,
        "Persons taken from the shared person store because another box had moved them on"
    );
    describe_counter!(
        PERSON_CONFLICTS,
        "Writes the shared person store turned down because another box had changed their persons since the step (each step made again)"
    );
    describe_counter!(
        INGESTION_WARNINGS_DROPPED,
        "Capture's ingestion warnings dropped because their writer fell behind"
    );
    describe_gauge!(SINK_LAG, "Queue batches the sink has not stored yet");
    describe_counter!(
        PLUGIN_CALLS,
        "Plugin calls by plugin config, kind and outcome"
    );
    describe_histogram!(
        PLUGIN_CALL_SECONDS,
        Unit::Seconds,
        "Duration of plugin calls by plugin config and kind"
    );
    describe_gauge!(JOBS, "Jobs by state");
    describe_histogram!(
        JOB_RUN_SECONDS,
        Unit::Seconds,
        "Duration of job attempts by kind"
    );
    describe_counter!(JOBS_FINISHED, "Job attempts by how they ended");
    describe_gauge!(
        SCHEDULE_LEASE_HELD,
        "1 while this box holds the schedule lease (SCHEDULE_LEASE), else 0"
    );
    describe_gauge!(
        SCHEDULE_LAG,
        Unit::Seconds,
        "How late the last schedule slot was queued"
    );
    describe_gauge!(
        FREE_DISK_BYTES,
        Unit::Bytes,
        "Free space on the data directory's disk"
    );
}

/// Sets up the log output: human-readable, or one JSON object per line when asked (or when
/// stderr is the systemd journal, which stores fields).
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}
