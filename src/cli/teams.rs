//! `appliance team …`: teams (PostHog projects) and their project tokens.

use clap::Subcommand;

use super::CliError;
use crate::ops::Ops;

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
