//! The appliance's own schedule of housekeeping: every hour (the first time a minute after
//! start-up), what is past its retention is purged: idempotency keys (`JOB_KEY_RETENTION_HOURS`),
//! dead and cancelled jobs, delivery jobs with their copies of events among them
//! (`JOB_DEAD_LETTER_RETENTION_DAYS`), and plugin log lines (`PLUGIN_LOG_RETENTION_DAYS`).
//! And the daily backup into `BACKUP_DIR` when it is set (see `backup::scheduled`).

use std::time::Duration;

use crate::backup::{scheduled, Sources};
use crate::config::{Config, JobSettings, PluginQuotas};
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

/// How often the daily backup looks whether it is due.
const BACKUP_CHECK_EVERY: Duration = Duration::from_secs(60);
/// After a failed scheduled backup, the wait before the next attempt.
const BACKUP_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Takes the daily backup into `BACKUP_DIR` when it is due, until shutdown.
pub(super) async fn backups(store: Store, config: Config, mut shutdown: Shutdown) {
    let Some(dir) = config.backup.dir.clone() else {
        return;
    };
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        wait = BACKUP_CHECK_EVERY;
        let now = chrono::Utc::now().with_timezone(&config.schedule_timezone);
        let record = store
            .note(scheduled::NOTE)
            .ok()
            .flatten()
            .unwrap_or_default();
        if !scheduled::due(&record, now, config.backup.hour) {
            continue;
        }
        let (store, config, dir) = (store.clone(), config.clone(), dir.clone());
        let taken = tokio::task::spawn_blocking(move || {
            let env_file = config.env_file();
            let sources = Sources::of(&store, &config, env_file.as_deref());
            scheduled::take(&sources, &dir, config.backup.keep, now)
        })
        .await;
        match taken {
            Ok(record) if record.last_error.is_none() => {}
            Ok(_) => wait = BACKUP_RETRY_AFTER,
            Err(e) => {
                tracing::error!(error = %e, "the scheduled backup's task failed");
                wait = BACKUP_RETRY_AFTER;
            }
        }
    }
}
