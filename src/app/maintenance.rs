//! The appliance's own schedule of housekeeping: every hour (the first time a minute after
//! start-up), what is past its retention is purged: idempotency keys (`JOB_KEY_RETENTION_HOURS`),
//! dead and cancelled jobs, delivery jobs with their copies of events among them
//! (`JOB_DEAD_LETTER_RETENTION_DAYS`), and plugin log lines (`PLUGIN_LOG_RETENTION_DAYS`).

use std::time::Duration;

use crate::config::{JobSettings, PluginQuotas};
use crate::jobs::now_ms;
use crate::shutdown::Shutdown;
use crate::store::Store;

const FIRST_RUN: Duration = Duration::from_secs(60);
const EVERY: Duration = Duration::from_secs(3600);

/// Runs the housekeeping until shutdown.
pub(super) async fn run(
    store: Store,
    jobs: JobSettings,
    quotas: PluginQuotas,
    mut shutdown: Shutdown,
) {
    let mut wait = FIRST_RUN;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        wait = EVERY;
        let store = store.clone();
        let log_retention = quotas.log_retention;
        let done = tokio::task::spawn_blocking(move || purge(&store, jobs, log_retention)).await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "housekeeping failed");
        }
    }
}

/// One round of purges; each failure is logged and the others still run.
pub fn purge(store: &Store, jobs: JobSettings, log_retention: Duration) {
    let now = now_ms();
    let keys_before = now - jobs.key_retention.as_millis() as i64;
    let dead_before = now - jobs.dead_retention.as_millis() as i64;
    let logs_before = chrono::Utc::now() - log_retention;
    let report = |what: &str, result: Result<usize, crate::store::StoreError>| match result {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "purged {what} past their retention"),
        Err(e) => tracing::warn!(error = %e, "cannot purge {what}"),
    };
    report("idempotency keys", store.purge_job_keys(keys_before));
    report(
        "dead and cancelled jobs",
        store.purge_final_jobs(dead_before),
    );
    report("plugin log lines", store.purge_plugin_logs(logs_before));
}
