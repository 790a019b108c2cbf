//! Events: a live tail of the latest events stored for a team (the table refreshes itself),
//! each with its properties a click away.

use axum::extract::{Query, State};
use maud::{html, Markup};
use serde::Deserialize;

use super::{blocking, layout, Admin, PageError, Shared};
use crate::ops::OpError;
use crate::sinks::StoredEvent;

/// Events shown.
const TAIL: u32 = 50;

#[derive(Deserialize, Default)]
pub struct TeamQuery {
    team: Option<u64>,
}

fn rows(events: &[StoredEvent]) -> Markup {
    html! {
        @if events.is_empty() { tr { td colspan="4" .muted { "No event stored for this team yet." } } }
        @for event in events {
            tr.event {
                td { (event.timestamp) }
                td.name { (event.event) }
                td { (event.distinct_id) }
                td {
                    details {
                        summary { "properties" }
                        pre { (pretty(&event.properties)) }
                    }
                }
            }
        }
    }
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| json.to_owned())
}

async fn latest(state: &Shared, team: u64) -> Result<Vec<StoredEvent>, PageError> {
    let reader = state.events.clone();
    blocking(state, move |_| {
        reader
            .latest_events(team, TAIL)
            .map_err(|e| OpError::Internal(e.to_string()))
    })
    .await
}

pub async fn page(
    State(state): State<Shared>,
    admin: Admin,
    Query(query): Query<TeamQuery>,
) -> Result<Markup, PageError> {
    let teams = blocking(&state, |ops| ops.list_teams()).await?;
    let team = query.team.or(teams.first().map(|t| t.id)).unwrap_or(1);
    let events = latest(&state, team).await?;
    let body = html! {
        form method="get" action="/events" {
            label for="team" { "Team" }
            select #team name="team" onchange="this.form.submit()" {
                @for t in &teams { option value=(t.id) selected[t.id == team] { (t.name) " (" (t.id) ")" } }
            }
            " " button.quiet type="submit" { "Show" }
        }
        p.muted { "The " (TAIL) " events stored last, newest first; the list follows new ones. Persons are not kept yet, so there is no person to open." }
        table {
            thead { tr { th { "timestamp" } th { "event" } th { "distinct id" } th {} } }
            tbody #tail data-refresh=(format!("/events/rows?team={team}")) { (rows(&events)) }
        }
    };
    Ok(layout(&admin, "/events", "Events", body))
}

/// The table's rows alone, for the live tail.
pub async fn rows_fragment(
    State(state): State<Shared>,
    _admin: Admin,
    Query(query): Query<TeamQuery>,
) -> Result<Markup, PageError> {
    let events = latest(&state, query.team.unwrap_or(1)).await?;
    Ok(rows(&events))
}
