//! `appliance plugin …`: install plugins and enable them per team.

use clap::Subcommand;

use super::CliError;
use crate::ops::Ops;

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
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
    /// Show what a plugin config logged (its own lines and the host's about its failures), the
    /// newest last; each line starts with its number, for --before
    Logs {
        #[arg(long)]
        team: u64,
        plugin: String,
        /// How many lines
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only lines older than this line number (the next page back)
        #[arg(long)]
        before: Option<u64>,
    },
    /// Show what a plugin config keeps in storage, KEY=VALUE per line
    Storage {
        #[arg(long)]
        team: u64,
        plugin: String,
    },
}

pub(super) fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

pub(super) fn run(ops: &Ops, action: PluginCommand) -> Result<(), CliError> {
    match action {
        PluginCommand::Install { path } => {
            let record = ops.install_plugin_path(&path)?;
            println!(
                "plugin {} ({}) installed; component {}",
                record.id, record.name, record.sha256
            );
        }
        PluginCommand::List => {
            for p in ops.list_plugins()? {
                println!("plugin {} {} {}", p.id, p.name, p.version);
                for c in p.configs {
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
            config,
            order,
        } => {
            let given = config.into_iter().collect();
            let (record, saved) = ops.enable_plugin(team, &plugin, &given, order)?;
            println!(
                "plugin config {} enabled: {} for team {} at order {}",
                saved.id, record.name, team, saved.order
            );
        }
        PluginCommand::Disable { team, plugin } => {
            let saved = ops.disable_plugin(team, &plugin)?;
            println!("plugin config {} disabled", saved.id);
        }
        PluginCommand::Storage { team, plugin } => {
            for (key, value) in ops.plugin_storage(team, &plugin)? {
                println!("{key}={value}");
            }
        }
        PluginCommand::Logs {
            team,
            plugin,
            limit,
            before,
        } => {
            for (line, entry) in ops.plugin_logs(team, &plugin, before, limit)?.iter().rev() {
                println!(
                    "#{line} {} {:5} {}",
                    entry.at.format("%Y-%m-%d %H:%M:%S%.3f"),
                    entry.level,
                    entry.message
                );
            }
        }
    }
    Ok(())
}
