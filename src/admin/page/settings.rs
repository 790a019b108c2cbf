//! Settings: the effective configuration, each value with where it came from (default, env
//! file, environment), secrets masked; the management API token (shown on demand, rotated
//! here); the daily backup's last outcome.

use axum::extract::{Query, State};
use axum::response::Redirect;
use axum::Form;
use maud::{html, Markup};

use super::{back_to, blocking, csrf_field, layout, Admin, CsrfForm, Outcome, PageError, Shared};
use crate::backup::scheduled::{ScheduledRecord, NOTE};
use crate::config::{Source, SETTINGS};

/// Whether a setting's value may hold a secret.
fn secret(name: &str) -> bool {
    ["PASSWORD", "_B64", "DSN", "DATABASE_URL", "REDIS_URL"]
        .iter()
        .any(|part| name.contains(part))
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Default => "default",
        Source::EnvFile => "env file",
        Source::Environment => "environment",
    }
}

pub async fn page(
    State(state): State<Shared>,
    admin: Admin,
    Query(outcome): Query<Outcome>,
) -> Result<Markup, PageError> {
    let (token, backup) = blocking(&state, |ops| {
        let token = ops.api_token()?.0;
        let backup: Option<ScheduledRecord> = ops.store.note(NOTE)?;
        Ok((token, backup))
    })
    .await?;
    let config = &state.config;
    let body = html! {
        (outcome.flash())
        section.card {
            h2 { "Management API token" }
            p.muted { "Scripts call " code { "/api/" } " with " code { "Authorization: Bearer <token>" } "." }
            details { summary { "Show the token" } p { code #api-token { (token) } } }
            form method="post" action="/settings/api-token" {
                (csrf_field(&admin))
                button.quiet type="submit" { "Rotate the token" }
            }
        }
        section.card {
            h2 { "Daily backup" }
            @match (&config.backup.dir, &backup) {
                (None, _) => p { "Off: set " code { "BACKUP_DIR" } " for a daily backup (" code { "appliance backup" } " makes one by hand)." }
                (Some(dir), None) => p { "Into " code { (dir.display()) } ", from " (config.backup.hour) ":00; none taken yet." }
                (Some(dir), Some(record)) => {
                    p { "Into " code { (dir.display()) } ", " (config.backup.keep) " kept, from " (config.backup.hour) ":00." }
                    p { "Last success: " (record.last_success_file.as_deref().unwrap_or("none")) " (" (super::bytes(record.last_success_bytes)) ")" }
                    @if let Some(error) = &record.last_error { p.warn { "Last attempt failed: " (error) } }
                }
            }
        }
        h2 { "Configuration" }
        p.muted {
            "Env file: "
            @match config.env_file() { Some(path) => code { (path.display()) }, None => "none" }
            ". Change settings there (or in the service's environment) and restart."
        }
        table.settings {
            tr { th { "setting" } th { "value" } th { "from" } }
            @for setting in SETTINGS {
                tr {
                    td { code { (setting.name) } }
                    td {
                        @match config.value(setting.name) {
                            Some(_) if secret(setting.name) && config.source(setting.name) != Source::Default => span.muted { "(set, hidden)" },
                            Some(value) => code { (value) },
                            None => span.muted { "unset" },
                        }
                    }
                    td { (source_name(config.source(setting.name))) }
                }
            }
        }
    };
    Ok(layout(&admin, "/settings", "Settings", body))
}

pub async fn rotate_api_token(
    State(state): State<Shared>,
    admin: Admin,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    admin.verify(&form.csrf)?;
    blocking(&state, |ops| ops.rotate_api_token()).await?;
    Ok(back_to(
        "/settings",
        "The API token was rotated; the old one no longer works",
    ))
}
