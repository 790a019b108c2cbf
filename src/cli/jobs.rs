//! `appliance jobs …`: the durable job queue, beside a running server.

use clap::Subcommand;

use super::{print_json, CliError};
use crate::ops::jobs::{parse_job_id, parse_job_state, read_job_lines, JobRequest};
use crate::ops::{OpError, Ops};
use crate::store::{Control, JobState};

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// List kept jobs (queued, waiting, running, retrying, dead letters, cancelled)
    List {
        /// Only jobs in this state: scheduled, waiting, running, retrying, dead, cancelled
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one job with its history, as JSON
    Show { id: String },
    /// Queue a plugin's job for a team, or many from a file
    Enqueue {
        /// Team id
        #[arg(long)]
        team: u64,
        /// Plugin name or id
        plugin: String,
        /// Job name, as the plugin declares it
        #[arg(required_unless_present = "from")]
        name: Option<String>,
        /// Queue the jobs of this file (`-` for standard input) in one transaction: one JSON
        /// object per line, {"name": …, "payload": …, "idempotency_key": …, "delay_ms": …,
        /// "max_attempts": …}, at most 100,000
        #[arg(long, value_name = "FILE", conflicts_with_all = ["name", "payload", "key", "delay_ms", "max_attempts"])]
        from: Option<std::path::PathBuf>,
        /// JSON payload
        #[arg(long, default_value = "null")]
        payload: String,
        /// Idempotency key: a job already queued with it (within the retention window) is not
        /// queued again
        #[arg(long)]
        key: Option<String>,
        /// Run after this many milliseconds
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Attempts before it becomes a dead letter
        #[arg(long)]
        max_attempts: Option<u32>,
    },
    /// Cancel a job: at once if it is not running, else it stops at its next checkpoint
    /// (terminated if it has not stopped within 5 s)
    Cancel { id: String },
    /// Stop a job now, even in the middle of plugin code
    Terminate { id: String },
    /// Put a dead or cancelled job back in the queue with fresh attempts
    Retry { id: String },
}

pub(super) fn run(ops: &Ops, action: JobsCommand) -> Result<(), CliError> {
    match action {
        JobsCommand::List { state, limit } => {
            let state = state.as_deref().map(parse_job_state).transpose()?;
            let (stats, jobs) = ops.list_jobs(state, limit)?;
            println!(
                "{} queued, {} running, {} kept in all",
                stats.queued, stats.running, stats.total
            );
            for view in jobs {
                println!(
                    "{}  {:<9}  config {:<4}  {:<32}  attempts {}/{}  run at {}  {}",
                    view.id,
                    view.state,
                    view.plugin_config
                        .map(|c| c.to_string())
                        .unwrap_or("-".into()),
                    view.kind,
                    view.attempts,
                    view.max_attempts,
                    view.run_at,
                    view.last_error.unwrap_or_default()
                );
            }
        }
        JobsCommand::Show { id } => print_json(&ops.show_job(parse_job_id(&id)?)?)?,
        JobsCommand::Enqueue {
            team,
            plugin,
            from: Some(file),
            ..
        } => {
            let requests = if file.as_os_str() == "-" {
                read_job_lines(std::io::stdin().lock())?
            } else {
                let opened = std::fs::File::open(&file)
                    .map_err(|e| OpError::Malformed(format!("{}: {e}", file.display())))?;
                read_job_lines(std::io::BufReader::new(opened))?
            };
            let ids = ops.enqueue_jobs(team, &plugin, requests)?;
            let distinct: std::collections::HashSet<_> = ids.iter().collect();
            match ids.len() - distinct.len() {
                0 => println!("{} jobs queued", distinct.len()),
                again => println!(
                    "{} jobs queued ({again} lines named a job of the file again by its idempotency key)",
                    distinct.len()
                ),
            }
        }
        JobsCommand::Enqueue {
            team,
            plugin,
            name,
            payload,
            key,
            delay_ms,
            max_attempts,
            from: None,
        } => {
            let request = JobRequest {
                name: name.unwrap_or_default(),
                payload,
                idempotency_key: key,
                delay_ms,
                max_attempts,
                timeout_ms: 0,
            };
            let id = ops.enqueue_job(team, &plugin, request)?;
            println!("job {id} queued");
        }
        JobsCommand::Cancel { id } => {
            match ops.control_job(parse_job_id(&id)?, Control::Cancel)? {
                JobState::Running => {
                    println!("job {id} is running; asked to stop at its next checkpoint")
                }
                _ => println!("job {id} cancelled"),
            }
        }
        JobsCommand::Terminate { id } => {
            match ops.control_job(parse_job_id(&id)?, Control::Terminate)? {
                JobState::Running => println!("job {id} is running; it is being terminated"),
                _ => println!("job {id} cancelled before it ran"),
            }
        }
        JobsCommand::Retry { id } => {
            ops.retry_job(parse_job_id(&id)?)?;
            println!("job {id} queued again");
        }
    }
    Ok(())
}
