//! `appliance team …`: teams (PostHog projects) and their project tokens.

use clap::Subcommand;

use super::CliError;
use crate::ops::Ops;
use crate::store::TeamChange;

#[derive(Subcommand, Debug)]
pub enum TeamCommand {
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
    /// Rename a team, rotate its project token or switch IP anonymisation (a running server
    /// sees the change within a second)
    #[command(visible_alias = "set")]
    Update {
        /// The team's id (or give it as --team)
        #[arg(required_unless_present = "team")]
        id: Option<u64>,
        #[arg(long = "team", conflicts_with = "id", value_name = "ID")]
        team: Option<u64>,
        #[arg(long)]
        name: Option<String>,
        /// Replace the project token with a new random one; the old one stops working
        #[arg(long)]
        rotate_token: bool,
        /// Do not store the request IP as $ip (true) or store it again (false)
        #[arg(long, value_name = "BOOL")]
        anonymize_ips: Option<bool>,
    },
}

pub(super) fn run(ops: &Ops, action: TeamCommand) -> Result<(), CliError> {
    match action {
        TeamCommand::Create { name, token } => {
            let team = ops.create_team(&name, token.as_deref())?;
            println!(
                "team {} ({}) created; project token {}",
                team.id, team.name, team.api_token
            );
        }
        TeamCommand::Update {
            id,
            team,
            name,
            rotate_token,
            anonymize_ips,
        } => {
            let change = TeamChange {
                name,
                anonymize_ips,
                rotate_token,
            };
            let id = id.or(team).unwrap_or_default();
            let team = ops.update_team(id, &change)?;
            println!(
                "team {} ({}) updated; project token {}; IPs {}",
                team.id,
                team.name,
                team.api_token,
                if team.anonymize_ips {
                    "anonymised"
                } else {
                    "stored"
                }
            );
        }
        TeamCommand::List => {
            println!(
                "{:>4}  {:<24}  {:<48}  created",
                "id", "name", "project token"
            );
            for t in ops.list_teams()? {
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
