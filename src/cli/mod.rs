//! The command line: the seed's modes as flags (`--help`, `--version`, `--healthcheck`,
//! `--migrate`, `--idle`, in that order of precedence) and the operator's subcommands.
//!
//! Owns: argument parsing (clap), one file per resource (`teams`, `plugins`, `jobs`,
//! `exports`) printing what `ops` returns, and turning every error into one line on stderr and
//! an exit status ([`CliError::exit_code`]: 78 configuration, 3 not found, 4 invalid input,
//! 5 conflict, 1 anything else).
//! Must never: contain an operation's rules (they live in `ops`, shared with `/api/`) or the
//! server's behaviour (`run` hands over to `app`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand};

mod backup;
mod exports;
mod jobs;
mod persons;
mod plugins;
mod setup;
mod sinks;
mod teams;

use crate::config::{settings_help, Config, SinkKind};
use crate::ops::{OpError, Ops};
use crate::sinks::postgres::PostgresTarget;
use crate::sinks::sqlite;
use crate::store::{Store, StoreError};
use exports::ExportCommand;
use jobs::JobsCommand;
use persons::PersonsCommand;
use plugins::PluginCommand;
use sinks::SinkCommand;
use teams::TeamCommand;

/// Exit status for a configuration error (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;
/// Exit status when what a command names does not exist (a job, plugin, team, export).
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit status when a command's input is wrong (a malformed id, payload, archive or value).
pub const EXIT_INVALID: u8 = 4;
/// Exit status when the state does not allow the command (a job already dead).
pub const EXIT_CONFLICT: u8 = 5;

/// What `--help` shows after the commands: exit statuses, then every setting.
fn help_after() -> String {
    format!(
        "Exit statuses: 0 done, 1 failed, 2 usage, {EXIT_NOT_FOUND} not found, {EXIT_INVALID} invalid input, \
         {EXIT_CONFLICT} not allowed in the current state, {EXIT_CONFIG} configuration error.\n\n{}",
        settings_help()
    )
}

#[derive(Parser, Debug)]
#[command(
    name = "appliance",
    version,
    about = "Self-hosted PostHog event ingestion in one binary: capture, durable queue, WASM plugins, jobs and schedules, storage.\n\
             With no command, or `run`, it starts the server (capture, health and admin on WEB_HOSTNAME:WEB_PORT).",
    disable_version_flag = true,
    // The settings table is laid out already; wrapping it to the terminal would break it.
    term_width = 0,
    after_help = help_after()
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
    /// Check that the appliance can start here: configuration, data directory, plugin files,
    /// configured services; one line per problem (exit 78 on a configuration error, 1 on others)
    Check {
        /// Leave out the connections to Postgres, ClickHouse, Kafka and Redis (the unit's
        /// pre-start check: the queue holds events while a service is away)
        #[arg(long)]
        skip_services: bool,
    },
    /// Print an env file with every setting, commented out at its default (the .deb installs it
    /// as /etc/appliance/appliance.env)
    EnvFile {
        /// A setting to write uncommented with this value (NAME=VALUE; repeatable)
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Manage teams (PostHog projects) and their project tokens
    Team {
        #[command(subcommand)]
        action: TeamCommand,
    },
    /// Persons: show one by a distinct id, delete one, list ingestion warnings
    Persons {
        #[command(subcommand)]
        action: PersonsCommand,
    },
    /// Sinks: the events a sink refused (dead letters), sending them again, dropping them
    Sink {
        #[command(subcommand)]
        action: SinkCommand,
    },
    /// Print the admin API token that `/api/` requires (Authorization: Bearer …)
    ApiToken {
        /// Replace it with a new one first (a running server takes the new one at once)
        #[arg(long)]
        rotate: bool,
    },
    /// The admin page's account
    Admin {
        #[command(subcommand)]
        action: AdminCommand,
    },
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
    /// Write one archive of everything the appliance holds (works while the server runs), or check one
    Backup {
        /// Where to write it (default: appliance-<UTC time>.tar.zst in the current directory)
        #[arg(long, value_name = "FILE", conflicts_with = "verify")]
        to: Option<std::path::PathBuf>,
        /// Check an archive end to end (checksums of every file) instead of writing one
        #[arg(long, value_name = "FILE")]
        verify: Option<std::path::PathBuf>,
    },
    /// Restore an archive into a new or empty data directory (never under a running server)
    Restore {
        /// The archive `appliance backup` wrote
        archive: std::path::PathBuf,
        /// Where to restore (default: DATA_DIR)
        #[arg(long, value_name = "DIR")]
        data_dir: Option<std::path::PathBuf>,
        /// Replace the appliance data already in the directory (its server must be stopped)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Print a one-time link (24 h) to set the admin password; with a password set, only with --reset
    SetupLink {
        /// Remove the current password first and end every session (a forgotten password)
        #[arg(long)]
        reset: bool,
    },
}

/// Why a command failed: each kind has its exit status (see [`CliError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Op(#[from] OpError),
    #[error("{0}")]
    Other(String),
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> CliError {
        CliError::Op(e.into())
    }
}

impl CliError {
    /// The one mapping of failures to exit statuses, listed in `--help`.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) => EXIT_CONFIG,
            CliError::Op(OpError::NotFound(_)) => EXIT_NOT_FOUND,
            CliError::Op(OpError::Malformed(_) | OpError::Invalid(_)) => EXIT_INVALID,
            CliError::Op(OpError::Conflict(_)) => EXIT_CONFLICT,
            CliError::Op(OpError::Internal(_)) | CliError::Other(_) => 1,
        }
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    // Everything the appliance writes (state, events, plugins, secrets) is for its own user.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    let mut config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return report(Err(e.into())),
    };
    crate::telemetry::init_logging(&config);
    if let Err(e) = setup::act_as_data_dir_owner(&config.data_dir) {
        return report(Err(e));
    }
    if cli.healthcheck {
        return healthcheck(&config);
    }
    if cli.migrate {
        return report(migrate(&config));
    }
    config.idle |= cli.idle;
    let result = match cli.command {
        None | Some(Command::Run) => run_server(config),
        Some(command) => operate(&config, command),
    };
    report(result)
}

/// Runs an operator's command against the data directory (beside a running server or not).
fn operate(config: &Config, command: Command) -> Result<(), CliError> {
    match command {
        Command::Check { skip_services } => return setup::run_check(config, !skip_services),
        Command::EnvFile { set } => {
            print!("{}", setup::env_file_text(&set)?);
            return Ok(());
        }
        Command::Backup { to, verify } => return backup::backup(config, to, verify),
        Command::Restore {
            archive,
            data_dir,
            force,
        } => return backup::restore(config, &archive, data_dir, force),
        _ => {}
    }
    let store = Store::open(&config.data_dir)?;
    let ops = Ops::remote(store, &config.data_dir, config.jobs, config.plugin_limits);
    match command {
        Command::Run
        | Command::Check { .. }
        | Command::EnvFile { .. }
        | Command::Backup { .. }
        | Command::Restore { .. } => Ok(()),
        Command::Team { action } => teams::run(&ops, action),
        Command::Persons { action } => persons::run(&ops, action),
        Command::Sink { action } => sinks::run(&ops, action),
        Command::Plugin { action } => plugins::run(&ops, action),
        Command::Jobs { action } => jobs::run(&ops, action),
        Command::Export { action } => exports::run(&ops, action),
        Command::Admin {
            action: AdminCommand::SetupLink { reset },
        } => {
            let token = ops.new_setup_token(reset)?;
            let host = match config.admin_host {
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                ip if ip.is_ipv6() => format!("[{ip}]"),
                ip => ip.to_string(),
            };
            println!("http://{host}:{}/setup?token={token}", config.admin_port);
            Ok(())
        }
        Command::ApiToken { rotate } => {
            let token = if rotate {
                ops.rotate_api_token()?
            } else {
                ops.api_token()?.0
            };
            println!("{token}");
            Ok(())
        }
    }
}

fn report(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("appliance: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Prints a value as pretty JSON.
fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Other(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn run_server(config: Config) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_concurrency)
        .enable_all()
        .build()
        .map_err(|e| CliError::Other(format!("cannot start the runtime: {e}")))?;
    let node = config.cluster.node.clone();
    runtime
        .block_on(crate::app::run(config))
        .map_err(|e| match e {
            // A shared sink's position moved by another box: NODE_ID is what to change.
            crate::app::AppError::Sink(crate::sinks::SinkError::Taken { detail, .. }) => {
                CliError::Config(crate::config::ConfigError {
                    name: "NODE_ID",
                    value: node.unwrap_or_default(),
                    allowed: detail,
                })
            }
            e => CliError::Other(e.to_string()),
        })
}

fn migrate(config: &Config) -> Result<(), CliError> {
    let store = Store::open(&config.data_dir)?;
    println!("state store ready at {}", store.path().display());
    let failed = |e: crate::sinks::SinkError| CliError::Other(e.to_string());
    for kind in &config.sinks.kinds {
        match kind {
            SinkKind::Sqlite => {
                let applied = sqlite::migrate(&config.sqlite_path).map_err(failed)?;
                println!(
                    "{applied} SQLite migration(s) applied to {}",
                    config.sqlite_path.display()
                );
            }
            SinkKind::Postgres => {
                let url = config.sinks.postgres_url.as_deref().unwrap_or_default();
                let target = PostgresTarget::parse(url).map_err(CliError::Other)?;
                let applied = current_thread_runtime()?
                    .block_on(crate::sinks::postgres::migrate(&target))
                    .map_err(failed)?;
                println!(
                    "{applied} Postgres migration(s) applied to {}",
                    target.redacted()
                );
            }
            SinkKind::ClickHouse => {
                let settings = &config.sinks.clickhouse;
                let applied = current_thread_runtime()?
                    .block_on(crate::sinks::clickhouse::migrate(settings))
                    .map_err(failed)?;
                println!(
                    "{applied} ClickHouse migration(s) applied to {} (database {})",
                    settings.url, settings.database
                );
            }
        }
    }
    Ok(())
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Other(format!("cannot start the runtime: {e}")))
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
