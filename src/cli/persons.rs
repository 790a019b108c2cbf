//! `appliance persons …`: a person by one of its distinct ids, deleting it, and a team's
//! ingestion warnings.

use clap::Subcommand;

use super::CliError;
use crate::ops::Ops;
use crate::store::PersonView;

#[derive(Subcommand, Debug)]
pub enum PersonsCommand {
    /// Show the person a distinct id belongs to: properties, versions, all its distinct ids
    Show {
        #[arg(long)]
        team: u64,
        distinct_id: String,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Delete the person a distinct id belongs to (PostHog's delete: its distinct ids are freed
    /// and the person is removed from every sink; a running server does it within a second)
    Delete {
        #[arg(long)]
        team: u64,
        distinct_id: String,
    },
    /// List the team's ingestion warnings (refused merges, illegal ids, dropped events), newest
    /// first
    Warnings {
        #[arg(long)]
        team: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON lines instead of text
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn run(ops: &Ops, action: PersonsCommand) -> Result<(), CliError> {
    match action {
        PersonsCommand::Show {
            team,
            distinct_id,
            json,
        } => {
            let view = ops.show_person(team, &distinct_id)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&view).unwrap_or_default()
                );
            } else {
                print_person(&view);
            }
        }
        PersonsCommand::Delete { team, distinct_id } => {
            let view = ops.delete_person(team, &distinct_id)?;
            println!(
                "person {} ({} distinct ids) will be deleted by the server",
                view.person.uuid,
                view.distinct_ids.len()
            );
        }
        PersonsCommand::Warnings { team, limit, json } => {
            for warning in ops.ingestion_warnings(team, Some(limit))? {
                if json {
                    println!("{}", serde_json::to_string(&warning).unwrap_or_default());
                } else {
                    println!(
                        "{}  {}  {}",
                        crate::event::timestamp_text(warning.timestamp),
                        warning.kind,
                        warning.details
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_person(view: &PersonView) {
    let p = &view.person;
    println!("person {}", p.uuid);
    println!(
        "  created_at     {}",
        crate::event::timestamp_text(p.created_at)
    );
    println!("  version        {}", p.version);
    println!("  is_identified  {}", p.is_identified);
    println!("  distinct ids");
    for (id, version) in &view.distinct_ids {
        println!("    {id}  (version {version})");
    }
    println!("  properties");
    for (key, value) in &p.properties {
        println!("    {key} = {value}");
    }
}
