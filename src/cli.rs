//! The command line: the seed's modes as flags (`--help`, `--version`, `--healthcheck`,
//! `--migrate`, `--idle`, in that order of precedence) and the operator's subcommands.
//!
//! Owns: argument parsing (clap), turning every error into one line on stderr and an exit code
//! (78 for configuration, 1 for anything else), and the small commands that do not need the
//! server (`team create`, `team list`).
//! Must never: contain the server's behaviour; `run` hands over to `app`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand};

use crate::config::{settings_help, Config};
use crate::sinks::sqlite;
use crate::store::Store;

/// Exit status for a configuration error (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "appliance",
    version,
    about = "Self-hosted PostHog event ingestion in one binary: capture, durable queue, WASM plugins, jobs and schedules, storage.\n\
             With no command, or `run`, it starts the server (capture, health and admin on WEB_HOSTNAME:WEB_PORT).",
    disable_version_flag = true,
    // The settings table is laid out already; wrapping it to the terminal would break it.
    term_width = 0,
    after_help = settings_help()
)]
pub struct Cli {
    /// Print the version and exit
    #[arg(short = 'v', long = "version", action = ArgAction::Version)]
    version: Option<bool>,
    /// Exit 0 if a running appliance answers healthy on WEB_HOSTNAME:WEB_PORT, 1 otherwise
    #[arg(long)]
    healthcheck: bool,
    /// Apply the storage migrations and exit
    #[arg(long)]
    migrate: bool,
    /// Start without processing anything (health endpoints only); same as PLUGIN_SERVER_IDLE=true
    #[arg(long)]
    idle: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the server (the default)
    Run,
    /// Manage teams (PostHog projects) and their project tokens
    Team {
        #[command(subcommand)]
        action: TeamCommand,
    },
    /// Print the admin API token that `/api/` requires (Authorization: Bearer …)
    ApiToken,
    /// Install plugins and enable them per team (changes apply to a running server at once)
    Plugin {
        #[command(subcommand)]
        action: PluginCommand,
    },
    /// Inspect and steer the durable job queue (works while the server runs)
    Jobs {
        #[command(subcommand)]
        action: JobsCommand,
    },
    /// Historical exports: hand stored events between two times to a plugin's export-events
    Export {
        #[command(subcommand)]
        action: ExportCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ExportCommand {
    /// Start exporting the team's stored events with FROM <= timestamp < TO to a plugin
    Start {
        /// Team id
        #[arg(long)]
        team: u64,
        /// Plugin name or id (it must implement export-events or on-event)
        plugin: String,
        /// RFC 3339 time, for example 2026-11-01T00:00:00Z
        #[arg(long)]
        from: chrono::DateTime<chrono::Utc>,
        /// RFC 3339 time (exclusive)
        #[arg(long)]
        to: chrono::DateTime<chrono::Utc>,
        /// Events per page (one job per page)
        #[arg(long)]
        page_size: Option<u32>,
    },
    /// List exports with their progress
    List,
    /// Show one export's progress, as JSON
    Show { id: u64 },
    /// Cancel an export: no further page starts
    Cancel { id: u64 },
}

#[derive(Subcommand, Debug)]
enum JobsCommand {
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
    /// Queue a plugin's job for a team
    Enqueue {
        /// Team id
        #[arg(long)]
        team: u64,
        /// Plugin name or id
        plugin: String,
        /// Job name, as the plugin declares it
        name: String,
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

#[derive(Subcommand, Debug)]
enum PluginCommand {
    /// Install a plugin: a folder holding plugin.json and its .wasm component, or a .tar.gz or
    /// .zip archive of one
    Install { path: std::path::PathBuf },
    /// List installed plugins and their configs
    List,
    /// Enable a plugin for a team, with config values
    Enable {
        /// Team id
        #[arg(long)]
        team: u64,
        /// Plugin name or id
        plugin: String,
        /// A config value, KEY=VALUE (repeatable)
        #[arg(long = "config", value_parser = parse_key_value)]
        config: Vec<(String, String)>,
        /// Place in the team's chain (lower runs first)
        #[arg(long)]
        order: Option<i64>,
    },
    /// Disable a plugin for a team
    Disable {
        #[arg(long)]
        team: u64,
        plugin: String,
    },
    /// Show what a plugin config logged (its own lines and the host's about its failures)
    Logs {
        #[arg(long)]
        team: u64,
        plugin: String,
    },
    /// Show what a plugin config keeps in storage, KEY=VALUE per line
    Storage {
        #[arg(long)]
        team: u64,
        plugin: String,
    },
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

#[derive(Subcommand, Debug)]
enum TeamCommand {
    /// Create a team and print its id and project token
    Create {
        /// A name for people to recognise the team by
        name: String,
        /// Use this project token instead of a random one (for example the one your SDKs
        /// already send to PostHog)
        #[arg(long)]
        token: Option<String>,
    },
    /// List teams with their project tokens
    List,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("appliance: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(&config);
    if cli.healthcheck {
        return healthcheck(&config);
    }
    if cli.migrate {
        return report(migrate(&config));
    }
    config.idle |= cli.idle;
    match cli.command {
        None | Some(Command::Run) => report(run_server(config)),
        Some(Command::Team { action }) => report(team(&config, action)),
        Some(Command::Plugin { action }) => report(plugin(&config, action)),
        Some(Command::Jobs { action }) => report(jobs(&config, action)),
        Some(Command::Export { action }) => report(export(&config, action)),
        Some(Command::ApiToken) => report(
            Store::open(&config.data_dir)
                .and_then(|store| store.admin_api_token())
                .map(|(token, _)| println!("{token}"))
                .map_err(|e| e.to_string()),
        ),
    }
}

fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("appliance: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn run_server(config: Config) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_concurrency)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime
        .block_on(crate::app::run(config))
        .map_err(|e| e.to_string())
}

fn migrate(config: &Config) -> Result<(), String> {
    let store = Store::open(&config.data_dir).map_err(|e| e.to_string())?;
    let applied = sqlite::migrate(&config.sqlite_path).map_err(|e| e.to_string())?;
    println!(
        "state store ready at {}; {} SQLite migration(s) applied to {}",
        store.path().display(),
        applied,
        config.sqlite_path.display()
    );
    Ok(())
}

fn team(config: &Config, action: TeamCommand) -> Result<(), String> {
    let store = Store::open(&config.data_dir).map_err(|e| e.to_string())?;
    match action {
        TeamCommand::Create { name, token } => {
            let team = store
                .create_team(&name, token.as_deref())
                .map_err(|e| e.to_string())?;
            println!(
                "team {} ({}) created; project token {}",
                team.id, team.name, team.api_token
            );
        }
        TeamCommand::List => {
            let teams = store.list_teams().map_err(|e| e.to_string())?;
            println!(
                "{:>4}  {:<24}  {:<48}  created",
                "id", "name", "project token"
            );
            for t in teams {
                println!(
                    "{:>4}  {:<24}  {:<48}  {}",
                    t.id,
                    t.name,
                    t.api_token,
                    t.created_at.format("%Y-%m-%d %H:%M:%S UTC")
                );
            }
        }
    }
    Ok(())
}

fn plugin(config: &Config, action: PluginCommand) -> Result<(), String> {
    use crate::plugins;
    let store = Store::open(&config.data_dir).map_err(|e| e.to_string())?;
    match action {
        PluginCommand::Install { path } => {
            let runtime = crate::app::plugin_runtime(config).map_err(|e| e.to_string())?;
            let record = plugins::install(&store, &runtime, &config.data_dir, &path)
                .map_err(|e| e.to_string())?;
            println!(
                "plugin {} ({}) installed; component {}",
                record.id, record.name, record.sha256
            );
        }
        PluginCommand::List => {
            let configs = store.list_plugin_configs().map_err(|e| e.to_string())?;
            for p in store.list_plugins().map_err(|e| e.to_string())? {
                println!(
                    "plugin {} {} {}",
                    p.id,
                    p.name,
                    p.manifest["version"].as_str().unwrap_or_default()
                );
                for c in configs.iter().filter(|c| c.plugin_id == p.id) {
                    let state = if c.enabled { "enabled" } else { "disabled" };
                    println!(
                        "  config {} team {} {state} order {}",
                        c.id, c.team_id, c.order
                    );
                }
            }
        }
        PluginCommand::Enable {
            team,
            plugin,
            config: given,
            order,
        } => {
            let (record, saved) =
                plugins::enable(&store, team, &plugin, &given.into_iter().collect(), order)
                    .map_err(|e| e.to_string())?;
            println!(
                "plugin config {} enabled: {} for team {} at order {}",
                saved.id, record.name, team, saved.order
            );
        }
        PluginCommand::Disable { team, plugin } => {
            let saved = plugins::disable(&store, team, &plugin).map_err(|e| e.to_string())?;
            println!("plugin config {} disabled", saved.id);
        }
        PluginCommand::Storage { team, plugin } => {
            for (key, value) in
                plugins::storage(&store, team, &plugin).map_err(|e| e.to_string())?
            {
                println!("{key}={value}");
            }
        }
        PluginCommand::Logs { team, plugin } => {
            for entry in plugins::logs(&store, team, &plugin).map_err(|e| e.to_string())? {
                println!(
                    "{} {:5} {}",
                    entry.at.format("%Y-%m-%d %H:%M:%S%.3f"),
                    entry.level,
                    entry.message
                );
            }
        }
    }
    Ok(())
}

fn export(config: &Config, action: ExportCommand) -> Result<(), String> {
    use crate::plugins;
    let store = Store::open(&config.data_dir).map_err(|e| e.to_string())?;
    let show = |export: &crate::store::Export| {
        serde_json::to_string_pretty(&plugins::export_view(&store, export)).unwrap_or_default()
    };
    match action {
        ExportCommand::Start {
            team,
            plugin,
            from,
            to,
            page_size,
        } => {
            let export = plugins::start_export(
                &store,
                team,
                &plugin,
                (from, to),
                page_size,
                config.plugin_limits.task,
            )
            .map_err(|e| e.to_string())?;
            println!("export {} started", export.id);
        }
        ExportCommand::List => {
            for export in store.list_exports().map_err(|e| e.to_string())? {
                let total = export.total.map(|t| t.to_string()).unwrap_or("?".into());
                println!(
                    "export {}  config {}  {}  {}/{} events",
                    export.id,
                    export.config,
                    export.state.name(),
                    export.done,
                    total
                );
            }
        }
        ExportCommand::Show { id } => {
            let export = store
                .export(id)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no export {id}"))?;
            println!("{}", show(&export));
        }
        ExportCommand::Cancel { id } => {
            plugins::cancel_export(&store, id).map_err(|e| e.to_string())?;
            println!("export {id} cancelled");
        }
    }
    Ok(())
}

fn jobs(config: &Config, action: JobsCommand) -> Result<(), String> {
    use crate::jobs::{now_ms, JobView};
    use crate::store::{Control, JobId, JobState};
    let store = Store::open(&config.data_dir).map_err(|e| e.to_string())?;
    let parse_id = |id: &str| {
        id.parse::<JobId>()
            .map_err(|_| format!("{id:?} is not a job id"))
    };
    match action {
        JobsCommand::List { state, limit } => {
            let state = match state {
                Some(s) => Some(JobState::parse(&s).ok_or_else(|| {
                    format!("unknown state {s:?}: scheduled, waiting, running, retrying, dead or cancelled")
                })?),
                None => None,
            };
            let stats = store.job_stats().map_err(|e| e.to_string())?;
            println!(
                "{} queued, {} running, {} kept in all",
                stats.queued, stats.running, stats.total
            );
            for job in store.list_jobs(state, limit).map_err(|e| e.to_string())? {
                let view = JobView::from(&job);
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
        JobsCommand::Show { id } => {
            let job = store
                .job(parse_id(&id)?)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no job {id} is kept (succeeded jobs are not kept)"))?;
            let text =
                serde_json::to_string_pretty(&JobView::from(&job)).map_err(|e| e.to_string())?;
            println!("{text}");
        }
        JobsCommand::Enqueue {
            team,
            plugin,
            name,
            payload,
            key,
            delay_ms,
            max_attempts,
        } => {
            let settings = config.jobs;
            let enqueue = |jobs| {
                store.enqueue_jobs(jobs, now_ms(), settings.key_retention.as_millis() as i64)
            };
            let id = crate::plugins::enqueue_job(
                &enqueue,
                &store,
                team,
                &plugin,
                crate::plugins::JobRequest {
                    name,
                    payload,
                    idempotency_key: key,
                    delay_ms,
                    max_attempts,
                    timeout_ms: 0,
                },
            )
            .map_err(|e| e.to_string())?;
            println!("job {id} queued");
        }
        JobsCommand::Cancel { id } => {
            let state = store
                .control_job(parse_id(&id)?, Control::Cancel, now_ms())
                .map_err(|e| e.to_string())?;
            match state {
                JobState::Running => {
                    println!("job {id} is running; asked to stop at its next checkpoint")
                }
                _ => println!("job {id} cancelled"),
            }
        }
        JobsCommand::Terminate { id } => {
            let state = store
                .control_job(parse_id(&id)?, Control::Terminate, now_ms())
                .map_err(|e| e.to_string())?;
            match state {
                JobState::Running => println!("job {id} is running; it is being terminated"),
                _ => println!("job {id} cancelled before it ran"),
            }
        }
        JobsCommand::Retry { id } => {
            store
                .requeue_job(parse_id(&id)?, now_ms())
                .map_err(|e| e.to_string())?;
            println!("job {id} queued again");
        }
    }
    Ok(())
}

/// Asks `/_health` of the instance configured by WEB_HOSTNAME/WEB_PORT.
fn healthcheck(config: &Config) -> ExitCode {
    let host = match config.web_host {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        ip if ip.is_ipv6() => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let url = format!("http://{host}:{}/_health", config.web_port);
    let check = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| e.to_string())?;
        let response = client.get(&url).send().await.map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", response.status()))
        }
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(check));
    match result {
        Ok(()) => {
            println!("healthy: {url}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unhealthy: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_seed_modes_parse_as_flags() {
        let cli = Cli::try_parse_from(["appliance", "--migrate"]).unwrap();
        assert!(cli.migrate && !cli.idle);
        let cli = Cli::try_parse_from(["appliance", "--idle", "run"]).unwrap();
        assert!(cli.idle && matches!(cli.command, Some(Command::Run)));
        let cli = Cli::try_parse_from([
            "appliance",
            "team",
            "create",
            "shop",
            "--token",
            "phc_x12345678",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Team {
                action: TeamCommand::Create { .. }
            })
        ));
    }
}
