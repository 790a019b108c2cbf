//! `appliance export …`: historical exports of stored events to a plugin.

use clap::Subcommand;

use super::{print_json, CliError};
use crate::ops::Ops;

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
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

pub(super) fn run(ops: &Ops, action: ExportCommand) -> Result<(), CliError> {
    match action {
        ExportCommand::Start {
            team,
            plugin,
            from,
            to,
            page_size,
        } => {
            let export = ops.start_export(team, &plugin, (from, to), page_size)?;
            println!("export {} started", export.id);
        }
        ExportCommand::List => {
            for export in ops.list_exports()? {
                let total = export.total.map(|t| t.to_string()).unwrap_or("?".into());
                println!(
                    "export {}  config {}  {}  {}/{} events",
                    export.id, export.plugin_config, export.state, export.done, total
                );
            }
        }
        ExportCommand::Show { id } => print_json(&ops.show_export(id)?)?,
        ExportCommand::Cancel { id } => {
            ops.cancel_export(id)?;
            println!("export {id} cancelled");
        }
    }
    Ok(())
}
