//! Plugins: upload an archive, enable per team with a form generated from the plugin's config
//! schema (secrets masked, kept when left empty), order, disable, failure counts, storage use,
//! and logs with a filter.

use std::collections::BTreeMap;

use axum::extract::{Multipart, Path, Query, State};
use axum::response::Redirect;
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;

use super::{back_to, blocking, bytes, csrf_field, layout, Admin, Outcome, PageError, Shared};
use crate::ops::plugins::{config_of, find, Upload};
use crate::ops::OpError;
use crate::plugins::manifest::{ConfigField, FieldKind, Manifest};

pub async fn page(
    State(state): State<Shared>,
    admin: Admin,
    Query(outcome): Query<Outcome>,
) -> Result<Markup, PageError> {
    let (plugins, teams, usage) = blocking(&state, |ops| {
        let plugins = ops.list_plugins()?;
        let mut usage = BTreeMap::new();
        for config in plugins.iter().flat_map(|p| &p.configs) {
            usage.insert(config.id, ops.store.plugin_storage_usage(config.id)?);
        }
        Ok((plugins, ops.list_teams()?, usage))
    })
    .await?;
    let totals = crate::telemetry::plugin_totals();
    let body = html! {
        (outcome.flash())
        section.card {
            h2 { "Upload a plugin" }
            p.muted { "A .tar.gz or .zip of the plugin's folder: plugin.json and its WebAssembly component." }
            form method="post" action="/plugins/upload" enctype="multipart/form-data" {
                (csrf_field(&admin))
                input #archive type="file" name="archive" required accept=".zip,.tar.gz,.tgz";
                " " button type="submit" { "Upload" }
            }
        }
        @if plugins.is_empty() { p.muted { "No plugin is installed yet." } }
        @for plugin in &plugins {
            section.card id=(format!("plugin-{}", plugin.id)) {
                h2 { (plugin.name) " " span.muted { (plugin.version) } }
                p.muted { "sha256 " code { (plugin.sha256) } ", installed " (plugin.installed_at.format("%Y-%m-%d %H:%M UTC")) }
                table {
                    tr { th { "team" } th { "state" } th { "order" } th.num { "calls" } th.num { "failures" } th.num { "storage" } th {} }
                    @for team in &teams {
                        @let config = plugin.configs.iter().find(|c| c.team_id == team.id);
                        tr {
                            td { (team.name) " (" (team.id) ")" }
                            @match config {
                                Some(config) => {
                                    @let total = totals.get(&config.id).copied().unwrap_or_default();
                                    @let (keys, used) = usage.get(&config.id).copied().unwrap_or_default();
                                    td { (if config.enabled { "enabled" } else { "disabled" }) }
                                    td { (config.order) }
                                    td.num { (total.calls) }
                                    td.num { (total.failures) }
                                    td.num { (keys) " keys, " (bytes(used)) }
                                    td {
                                        a href=(format!("/plugins/{}/teams/{}", plugin.id, team.id)) { "Configure" }
                                        " · "
                                        a href=(format!("/plugins/{}/teams/{}/logs", plugin.id, team.id)) { "Logs" }
                                    }
                                }
                                None => {
                                    td.muted { "not enabled" } td {} td {} td {} td {}
                                    td { a href=(format!("/plugins/{}/teams/{}", plugin.id, team.id)) { "Enable" } }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&admin, "/plugins", "Plugins", body))
}

pub async fn upload(
    State(state): State<Shared>,
    admin: Admin,
    mut multipart: Multipart,
) -> Result<Redirect, PageError> {
    let malformed = |e: axum::extract::multipart::MultipartError| {
        PageError::from(OpError::Malformed(format!("the upload: {e}")))
    };
    let (mut csrf, mut archive) = (String::new(), None);
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        match field.name() {
            Some("csrf") => csrf = field.text().await.map_err(malformed)?,
            Some("archive") => archive = Some(field.bytes().await.map_err(malformed)?.to_vec()),
            _ => {}
        }
    }
    admin.verify(&csrf)?;
    let archive = archive
        .filter(|a| !a.is_empty())
        .ok_or_else(|| OpError::Malformed("choose a plugin archive to upload".into()))?;
    let record = blocking(&state, move |ops| {
        ops.install_plugin_upload(Upload::Archive(archive))
    })
    .await?;
    Ok(back_to(
        "/plugins",
        &format!("Installed {} (plugin {})", record.name, record.id),
    ))
}

/// One input for a config field: its current value shown unless the field is secret.
fn field_input(field: &ConfigField, current: Option<&String>) -> Markup {
    let name = format!("config.{}", field.key);
    let label = if field.name.is_empty() {
        &field.key
    } else {
        &field.name
    };
    let default = field.default.as_ref().map(|d| match d {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let value = current.cloned().or(default).unwrap_or_default();
    html! {
        label for=(name) { (label) @if field.required { " *" } }
        @if !field.hint.is_empty() { div.muted { (field.hint) } }
        @match field.kind {
            FieldKind::Choice => {
                select id=(name) name=(name) {
                    @for choice in &field.choices {
                        option value=(choice) selected[*choice == value] { (choice) }
                    }
                }
            }
            FieldKind::Json => {
                textarea id=(name) name=(name) rows="4" cols="60" { (value) }
            }
            _ if field.secret => {
                input id=(name) type="password" name=(name) autocomplete="off"
                    placeholder=(if current.is_some() { "stored; leave empty to keep it" } else { "" });
            }
            _ => {
                input id=(name) type="text" name=(name) value=(value) size="50";
            }
        }
    }
}

pub async fn config_form(
    State(state): State<Shared>,
    admin: Admin,
    Path((plugin, team)): Path<(String, u64)>,
    Query(outcome): Query<Outcome>,
) -> Result<Markup, PageError> {
    let (record, config) = blocking(&state, move |ops| {
        let record = find(&ops.store, &plugin)?;
        let config = config_of(&ops.store, team, &record).ok();
        Ok((record, config))
    })
    .await?;
    let manifest: Manifest = serde_json::from_value(record.manifest.clone())
        .map_err(|e| OpError::Internal(format!("the stored plugin.json: {e}")))?;
    let action = format!("/plugins/{}/teams/{team}", record.id);
    let current = |key: &str| config.as_ref().and_then(|c| c.config.get(key));
    let body = html! {
        (outcome.flash())
        @if !manifest.description.is_empty() { p { (manifest.description) } }
        section.card {
            form method="post" action=(action) {
                (csrf_field(&admin))
                input type="hidden" name="action" value="enable";
                @for field in &manifest.config { (field_input(field, current(&field.key))) }
                label for="order" { "Order in the team's chain (lower runs first)" }
                input #order type="text" name="order" value=(config.as_ref().map(|c| c.order).unwrap_or(0)) size="6";
                p {}
                button type="submit" { (if config.as_ref().is_some_and(|c| c.enabled) { "Save and keep enabled" } else { "Enable" }) }
            }
        }
        @if config.as_ref().is_some_and(|c| c.enabled) {
            form method="post" action=(action) {
                (csrf_field(&admin))
                input type="hidden" name="action" value="disable";
                button.quiet type="submit" { "Disable for this team" }
            }
        }
    };
    let title = format!("{} for team {team}", record.name);
    Ok(layout(&admin, "/plugins", &title, body))
}

pub async fn configure(
    State(state): State<Shared>,
    admin: Admin,
    Path((plugin, team)): Path<(String, u64)>,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Redirect, PageError> {
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    admin.verify(&field("csrf"))?;
    let back = format!("/plugins/{plugin}/teams/{team}");
    match field("action").as_str() {
        "disable" => {
            blocking(&state, move |ops| ops.disable_plugin(team, &plugin)).await?;
            Ok(back_to(&back, "Disabled"))
        }
        "enable" => {
            let order = match field("order").trim() {
                "" => None,
                text => Some(text.parse::<i64>().map_err(|_| {
                    OpError::Malformed(format!("the order must be a whole number, not {text:?}"))
                })?),
            };
            let given: BTreeMap<String, String> = form
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("config.")?.to_owned(), v.clone())))
                .filter(|(_, v)| !v.is_empty())
                .collect();
            blocking(&state, move |ops| {
                ops.enable_plugin(team, &plugin, &given, order)
            })
            .await?;
            Ok(back_to(&back, "Saved and enabled"))
        }
        other => Err(OpError::Malformed(format!("unknown plugin action {other:?}")).into()),
    }
}

#[derive(Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    q: String,
    before: Option<u64>,
}

/// Log lines shown per page.
const LOG_PAGE: usize = 200;

pub async fn logs(
    State(state): State<Shared>,
    admin: Admin,
    Path((plugin, team)): Path<(String, u64)>,
    Query(query): Query<LogQuery>,
) -> Result<Markup, PageError> {
    let name = plugin.clone();
    let before = query.before;
    let lines = blocking(&state, move |ops| {
        ops.plugin_logs(team, &name, before, LOG_PAGE)
    })
    .await?;
    let needle = query.q.to_lowercase();
    let next = lines.last().map(|(n, _)| *n);
    let shown: Vec<_> = lines
        .iter()
        .filter(|(_, e)| {
            needle.is_empty()
                || e.message.to_lowercase().contains(&needle)
                || e.level.to_lowercase() == needle
        })
        .collect();
    let path = format!("/plugins/{plugin}/teams/{team}/logs");
    let body = html! {
        form method="get" action=(path) {
            input type="text" name="q" value=(query.q) placeholder="filter: text or a level (error, warn…)";
            " " button.quiet type="submit" { "Filter" }
        }
        p.muted { (shown.len()) " of the " (lines.len()) " newest lines on this page match." }
        table.logs {
            tr { th { "at" } th { "level" } th { "message" } }
            @for (_, entry) in &shown {
                tr { td { (entry.at.format("%Y-%m-%d %H:%M:%S")) } td { (entry.level) } td { code { (entry.message) } } }
            }
        }
        @if let (Some(next), true) = (next, lines.len() == LOG_PAGE) {
            p { a href=(format!("{path}?before={next}&q={}", urlencode(&query.q))) { "Older lines" } }
        }
    };
    let title = format!("Logs of {plugin} for team {team}");
    Ok(layout(&admin, "/plugins", &title, body))
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
