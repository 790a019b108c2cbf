//! `appliance sink …`: the events a sink refused (dead letters), sending them again, dropping
//! them.

use clap::Subcommand;

use super::CliError;
use crate::ops::Ops;

#[derive(Subcommand, Debug)]
pub enum SinkCommand {
    /// List the events a sink refused, with its words, oldest first
    DeadLetters {
        /// Only those of this sink (sqlite, postgres, clickhouse)
        #[arg(long)]
        sink: Option<String>,
        /// Print JSON lines instead of text
        #[arg(long)]
        json: bool,
        /// List at most this many (oldest first)
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send dead letters again (after fixing what the sink refused); a running server writes
    /// them within a second, and those refused again stay
    Resend {
        /// Dead letter ids; none means all
        ids: Vec<u64>,
    },
    /// Drop dead letters for good
    Drop {
        /// Dead letter ids
        #[arg(required_unless_present = "all")]
        ids: Vec<u64>,
        /// Drop every dead letter
        #[arg(long)]
        all: bool,
    },
}

pub(super) fn run(ops: &Ops, action: SinkCommand) -> Result<(), CliError> {
    match action {
        SinkCommand::DeadLetters { sink, json, limit } => {
            for letter in ops.dead_letters(sink.as_deref(), Some(limit))? {
                if json {
                    println!("{}", serde_json::to_string(&letter).unwrap_or_default());
                } else {
                    println!(
                        "{}  {}  team {}  {} {:?} ({}){}  {}",
                        letter.id,
                        letter.sink,
                        letter.team,
                        letter.event.uuid,
                        letter.event.event,
                        crate::event::timestamp_text(letter.at),
                        if letter.resend { "  [to resend]" } else { "" },
                        letter.error.replace('\n', " ")
                    );
                }
            }
        }
        SinkCommand::Resend { ids } => {
            let ids = (!ids.is_empty()).then_some(ids);
            let count = ops.resend_dead_letters(ids.as_deref())?;
            println!("{count} dead letter(s) will be sent again by the server");
        }
        SinkCommand::Drop { ids, all } => {
            let ids = (!all).then_some(ids);
            let count = ops.drop_dead_letters(ids.as_deref())?;
            println!("{count} dead letter(s) dropped");
        }
    }
    Ok(())
}
