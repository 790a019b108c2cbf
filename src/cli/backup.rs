//! `appliance backup [--to FILE]`, `appliance backup --verify FILE` and
//! `appliance restore FILE [--data-dir DIR] [--force]`: progress on a terminal, plain lines
//! otherwise, and a summary of what the archive holds.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::CliError;
use crate::backup::{self, BackupError, Manifest, RestoreTarget, Sources, Step};
use crate::config::Config;
use crate::ops::OpError;
use crate::store::Store;

impl From<BackupError> for CliError {
    fn from(e: BackupError) -> CliError {
        CliError::Op(match e {
            BackupError::Store(e) => e.into(),
            BackupError::Corrupt { .. } => OpError::Invalid(e.to_string()),
            BackupError::Refused(_) => OpError::Conflict(e.to_string()),
            other => OpError::Internal(other.to_string()),
        })
    }
}

/// Shows a backup's steps: a spinner with counts on a terminal, one line per stage otherwise.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress { bar }
    }

    fn step(&self, step: Step) {
        let text = match step {
            Step::Stage(stage) => format!("backing up: {stage}"),
            Step::Rows(rows) => format!("backing up: state, {rows} rows copied"),
            Step::Written(bytes) => format!("writing the archive: {} MiB", bytes >> 20),
        };
        match (&self.bar, step) {
            (Some(bar), _) => bar.set_message(text),
            (None, Step::Stage(_)) => eprintln!("{text}"),
            (None, _) => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `appliance backup`: writes an archive (by default `appliance-<time>.tar.zst` here), or with
/// `--verify` checks one.
pub fn backup(
    config: &Config,
    to: Option<PathBuf>,
    verify: Option<PathBuf>,
) -> Result<(), CliError> {
    if let Some(archive) = verify {
        let manifest = backup::verify(&archive)?;
        println!("{} is sound", archive.display());
        summarise(&manifest);
        return Ok(());
    }
    let target = to.unwrap_or_else(|| PathBuf::from(backup::scheduled_name(chrono::Utc::now())));
    let store = Store::open(&config.data_dir)?;
    let env_file = config.env_file();
    let sources = Sources::of(&store, config, env_file.as_deref());
    let progress = Progress::new();
    let result = backup::create(&sources, &target, &mut |step| progress.step(step));
    progress.finish();
    let manifest = result?;
    let size = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({} bytes)", target.display(), size);
    summarise(&manifest);
    Ok(())
}

/// `appliance restore`: verifies the archive, then restores it into the data directory.
pub fn restore(
    config: &Config,
    archive: &Path,
    data_dir: Option<PathBuf>,
    force: bool,
) -> Result<(), CliError> {
    let data_dir = data_dir.unwrap_or_else(|| config.data_dir.clone());
    // SQLITE_PATH if the operator set one; otherwise the events go in the data directory.
    let sqlite_path = if config.source("SQLITE_PATH") == crate::config::Source::Default {
        data_dir.join("events.sqlite3")
    } else {
        config.sqlite_path.clone()
    };
    let report = backup::restore(
        archive,
        &RestoreTarget {
            data_dir: &data_dir,
            sqlite_path: &sqlite_path,
            force,
        },
    )?;
    println!("restored {} into {}", archive.display(), data_dir.display());
    summarise(&report.manifest);
    if let Some(env) = report.env_file {
        println!(
            "its configuration file is at {}; compare it with the one in use before replacing it",
            env.display()
        );
    }
    Ok(())
}

fn summarise(manifest: &Manifest) {
    println!(
        "taken {} by appliance {}: {} tables ({} rows), {} batches queued for the sink, {} stored events through queue position {}, {} files",
        manifest.created_at,
        manifest.appliance_version,
        manifest.state.tables,
        manifest.state.rows,
        manifest.state.queued_batches,
        manifest.events.events,
        manifest.events.sink_position,
        manifest.files.len()
    );
}
