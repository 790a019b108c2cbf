//! The daily backup (`BACKUP_DIR`, `BACKUP_KEEP`, `BACKUP_HOUR`): when one is due, and taking it
//! with its record and the pruning of old ones. The server's maintenance task calls [`due`]
//! every minute and [`take`] when it says so.
//!
//! A day's backup is due from `BACKUP_HOUR` in `SCHEDULE_TIMEZONE` until one succeeds; the day
//! of the last success is kept in the state file, so a restart neither repeats nor skips one.

use std::path::Path;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

use super::Sources;
use crate::store::Store;

/// Name of the record in the state file's notes.
pub const NOTE: &str = "scheduled_backup";

/// What the last scheduled backup did, for the admin page.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScheduledRecord {
    /// The local day (`YYYY-MM-DD`) of the last backup that succeeded.
    pub last_success_day: Option<String>,
    pub last_success_file: Option<String>,
    pub last_success_bytes: u64,
    /// When the last attempt ended (RFC 3339) and its error, if it failed.
    pub last_attempt_at: Option<String>,
    pub last_error: Option<String>,
}

/// Whether a backup is due at `now` in `tz`, from `hour` on, given the record.
pub fn due<Tz: TimeZone>(record: &ScheduledRecord, now: DateTime<Tz>, hour: u32) -> bool {
    let today = day_of(&now);
    now.hour() >= hour && record.last_success_day.as_deref() != Some(today.as_str())
}

fn day_of<Tz: TimeZone>(at: &DateTime<Tz>) -> String {
    format!("{:04}-{:02}-{:02}", at.year(), at.month(), at.day())
}

/// Takes a backup into `dir`, prunes beyond `keep`, and records the outcome; returns the record.
pub fn take<Tz: TimeZone>(
    sources: &Sources,
    dir: &Path,
    keep: usize,
    now: DateTime<Tz>,
) -> ScheduledRecord {
    let store: &Store = sources.store;
    let mut record: ScheduledRecord = store.note(NOTE).ok().flatten().unwrap_or_default();
    let target = dir.join(super::scheduled_name(Utc::now()));
    let result = super::create(sources, &target, &mut |_| {});
    record.last_attempt_at = Some(Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    match result {
        Ok(_) => {
            record.last_success_day = Some(day_of(&now));
            record.last_success_file = Some(target.display().to_string());
            record.last_success_bytes = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
            record.last_error = None;
            for old in super::prune(dir, keep) {
                tracing::info!(file = %old.display(), "deleted a scheduled backup past BACKUP_KEEP");
            }
            tracing::info!(file = %target.display(), bytes = record.last_success_bytes, "scheduled backup written");
        }
        Err(e) => {
            tracing::error!(error = %e, "the scheduled backup failed; it is tried again within the hour");
            record.last_error = Some(e.to_string());
        }
    }
    if let Err(e) = store.put_note(NOTE, &record) {
        tracing::warn!(error = %e, "cannot record the scheduled backup");
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_is_due_from_its_hour_until_it_succeeds() {
        let tz = chrono_tz::Europe::Paris;
        let at = |h| tz.with_ymd_and_hms(2026, 12, 2, h, 30, 0).unwrap();
        let mut record = ScheduledRecord::default();
        assert!(!due(&record, at(2), 3), "before the hour");
        assert!(due(&record, at(3), 3));
        record.last_success_day = Some("2026-12-02".into());
        assert!(!due(&record, at(23), 3), "done today");
        record.last_success_day = Some("2026-11-30".into());
        assert!(due(&record, at(4), 3), "a missed day is made up");
    }
}
