//! Teams: create, rename, rotate a project token, anonymise IPs, and the posthog-js snippet
//! with this server's capture address and the team's token.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Redirect;
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;

use super::{back_to, blocking, csrf_field, layout, Admin, Outcome, PageError, Shared};
use crate::ops::OpError;
use crate::store::{Team, TeamChange};

/// Where SDKs reach capture, as far as this request tells: the host the admin page was reached
/// by, with the capture port.
fn capture_url(state: &Shared, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| match h.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => h,
        })
        .unwrap_or("localhost");
    let port = state
        .capture_bound
        .get()
        .map_or(state.config.web_port, |at| at.port());
    format!("http://{host}:{port}")
}

/// posthog-js, ready to paste: the CDN bundle (it defines `window.posthog`, as the SDK tests
/// load it), or the npm package.
fn snippet(url: &str, team: &Team) -> String {
    let token = &team.api_token;
    format!(
        "<script src=\"https://cdn.jsdelivr.net/npm/posthog-js@1/dist/array.full.js\" crossorigin=\"anonymous\"></script>\n\
         <script>\n  posthog.init('{token}', {{ api_host: '{url}' }})\n</script>\n\n\
         // or, bundled with your app: npm install posthog-js\n\
         import posthog from 'posthog-js'\n\
         posthog.init('{token}', {{ api_host: '{url}' }})\n"
    )
}

pub async fn page(
    State(state): State<Shared>,
    admin: Admin,
    headers: HeaderMap,
    Query(outcome): Query<Outcome>,
) -> Result<Markup, PageError> {
    let teams = blocking(&state, |ops| ops.list_teams()).await?;
    let url = capture_url(&state, &headers);
    let body = html! {
        (outcome.flash())
        section.card {
            h2 { "New team" }
            form method="post" action="/teams" {
                (csrf_field(&admin))
                label for="name" { "Name" }
                input #name type="text" name="name" required maxlength="200";
                label for="token" { "Project token (optional: keep a PostHog project's token; empty for a new one)" }
                input #token type="text" name="token" maxlength="200" placeholder="phc_…";
                p {}
                button type="submit" { "Create team" }
            }
        }
        @for team in &teams {
            section.card id=(format!("team-{}", team.id)) {
                h2 { "Team " (team.id) ": " span.team-name { (team.name) } }
                p { "Project token: " code.token { (team.api_token) } }
                p { "IP addresses: " (if team.anonymize_ips { "anonymised (not stored)" } else { "stored as $ip" }) }
                form.inline method="post" action=(format!("/teams/{}", team.id)) {
                    (csrf_field(&admin))
                    input type="hidden" name="action" value="rename";
                    input type="text" name="name" value=(team.name) required maxlength="200" aria-label="new name";
                    " " button.quiet type="submit" { "Rename" }
                }
                " "
                form.inline method="post" action=(format!("/teams/{}", team.id)) {
                    (csrf_field(&admin))
                    input type="hidden" name="action" value="rotate";
                    button.quiet type="submit" { "Rotate token" }
                }
                " "
                form.inline method="post" action=(format!("/teams/{}", team.id)) {
                    (csrf_field(&admin))
                    input type="hidden" name="action" value=(if team.anonymize_ips { "keep-ips" } else { "anonymize-ips" });
                    button.quiet type="submit" { (if team.anonymize_ips { "Store IPs" } else { "Anonymise IPs" }) }
                }
                details {
                    summary { "posthog-js snippet" }
                    p.muted { "Capture is at " code { (url) } " as this page was reached; use the address your visitors' browsers reach." }
                    pre.snippet { (snippet(&url, team)) }
                }
            }
        }
    };
    Ok(layout(&admin, "/teams", "Teams", body))
}

#[derive(Deserialize)]
pub struct CreateForm {
    csrf: String,
    name: String,
    #[serde(default)]
    token: String,
}

pub async fn create(
    State(state): State<Shared>,
    admin: Admin,
    Form(form): Form<CreateForm>,
) -> Result<Redirect, PageError> {
    admin.verify(&form.csrf)?;
    let token = Some(form.token.trim().to_owned()).filter(|t| !t.is_empty());
    let name = form.name.trim().to_owned();
    let team = blocking(&state, move |ops| ops.create_team(&name, token.as_deref())).await?;
    Ok(back_to(
        "/teams",
        &format!("Team {} ({}) created", team.id, team.name),
    ))
}

#[derive(Deserialize)]
pub struct UpdateForm {
    csrf: String,
    action: String,
    #[serde(default)]
    name: String,
}

pub async fn update(
    State(state): State<Shared>,
    admin: Admin,
    Path(id): Path<u64>,
    Form(form): Form<UpdateForm>,
) -> Result<Redirect, PageError> {
    admin.verify(&form.csrf)?;
    let change = match form.action.as_str() {
        "rename" => TeamChange {
            name: Some(form.name.trim().to_owned()),
            ..TeamChange::default()
        },
        "rotate" => TeamChange {
            rotate_token: true,
            ..TeamChange::default()
        },
        "anonymize-ips" => TeamChange {
            anonymize_ips: Some(true),
            ..TeamChange::default()
        },
        "keep-ips" => TeamChange {
            anonymize_ips: Some(false),
            ..TeamChange::default()
        },
        other => return Err(OpError::Malformed(format!("unknown team action {other:?}")).into()),
    };
    let team = blocking(&state, move |ops| ops.update_team(id, &change)).await?;
    Ok(back_to("/teams", &format!("Team {} updated", team.id)))
}
