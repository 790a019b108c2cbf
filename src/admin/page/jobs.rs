//! Jobs and schedules: the queue's counts, dead letters (retry), waiting and running jobs
//! (cancel, terminate), historical exports with progress bars (start, cancel; the list
//! refreshes itself), and each schedule's last and next slot.

use axum::extract::{Path, Query, State};
use axum::response::Redirect;
use axum::Form;
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use maud::{html, Markup};
use serde::Deserialize;

use super::{back_to, blocking, csrf_field, layout, Admin, CsrfForm, Outcome, PageError, Shared};
use crate::ops::exports::ExportView;
use crate::ops::jobs::{parse_job_id, parse_job_state, JobView};
use crate::ops::OpError;

/// Jobs listed per state.
const LISTED: usize = 100;

fn job_table(admin: &Admin, jobs: &[JobView], actions: &[&str]) -> Markup {
    html! {
        @if jobs.is_empty() { p.muted { "None." } } @else {
            table.jobs {
                tr { th { "job" } th { "kind" } th { "state" } th.num { "attempts" } th { "run at" } th { "last error" } th {} }
                @for job in jobs {
                    tr id=(format!("job-{}", job.id)) {
                        td { code { (job.id) } }
                        td { (job.kind) }
                        td.state { (job.state) }
                        td.num { (job.attempts) "/" (job.max_attempts) }
                        td { (job.run_at) }
                        td { @if let Some(e) = &job.last_error { code { (e) } } }
                        td {
                            @for action in actions {
                                form.inline method="post" action=(format!("/jobs/{}/{action}", job.id)) {
                                    (csrf_field(admin))
                                    button.quiet type="submit" { (action) }
                                }
                                " "
                            }
                        }
                    }
                }
            }
        }
    }
}

fn exports_table(admin: &Admin, exports: &[ExportView]) -> Markup {
    html! {
        @if exports.is_empty() { p.muted { "No historical export yet." } } @else {
            table.exports {
                tr { th { "export" } th { "team" } th { "from" } th { "to" } th { "state" } th { "progress" } th {} }
                @for export in exports {
                    tr id=(format!("export-{}", export.id)) {
                        td { (export.id) }
                        td { (export.team) }
                        td { (export.from) }
                        td { (export.to) }
                        td.state { (export.state) }
                        td {
                            @match export.total {
                                Some(total) => {
                                    progress max=(total.max(1)) value=(export.done.min(total)) {}
                                    " " span.done { (export.done) } " / " (total)
                                }
                                None => { span.done { (export.done) } " (counting)" }
                            }
                        }
                        td {
                            @if export.state == "running" {
                                form.inline method="post" action=(format!("/jobs/exports/{}/cancel", export.id)) {
                                    (csrf_field(admin))
                                    button.quiet type="submit" { "cancel" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub async fn page(
    State(state): State<Shared>,
    admin: Admin,
    Query(outcome): Query<Outcome>,
) -> Result<Markup, PageError> {
    let (stats, dead, waiting, running, exports, schedules, plugins) = blocking(&state, |ops| {
        let list = |name: &str| -> Result<Vec<JobView>, OpError> {
            Ok(ops.list_jobs(Some(parse_job_state(name)?), LISTED)?.1)
        };
        let stats = ops.list_jobs(None, 0)?.0;
        Ok((
            stats,
            list("dead")?,
            list("scheduled")?,
            list("running")?,
            ops.list_exports()?,
            ops.store.list_schedules()?,
            ops.list_plugins()?,
        ))
    })
    .await?;
    let config_name = |config: u64| {
        plugins
            .iter()
            .find_map(|p| {
                p.configs
                    .iter()
                    .find(|c| c.id == config)
                    .map(|c| format!("{} (team {})", p.name, c.team_id))
            })
            .unwrap_or_else(|| format!("config {config}"))
    };
    let enabled: Vec<(String, u64)> = plugins
        .iter()
        .flat_map(|p| {
            p.configs
                .iter()
                .filter(|c| c.enabled)
                .map(move |c| (p.name.clone(), c.team_id))
        })
        .collect();
    let body = html! {
        (outcome.flash())
        p { (stats.queued) " queued, " (stats.running) " running, " (stats.total) " kept in all." }
        h2 { "Dead letters" }
        (job_table(&admin, &dead, &["retry"]))
        h2 { "Running" }
        (job_table(&admin, &running, &["cancel", "terminate"]))
        h2 { "Waiting" }
        (job_table(&admin, &waiting, &["cancel"]))
        h2 { "Historical exports" }
        div #exports data-refresh="/jobs/exports" { (exports_table(&admin, &exports)) }
        @if !enabled.is_empty() {
            section.card {
                h2 { "Start an export" }
                form method="post" action="/jobs/exports" {
                    (csrf_field(&admin))
                    label for="target" { "Plugin and team" }
                    select #target name="target" {
                        @for (plugin, team) in &enabled {
                            option value=(format!("{team}:{plugin}")) { (plugin) " for team " (team) }
                        }
                    }
                    label for="from" { "From (UTC)" }
                    input #from type="datetime-local" name="from" required;
                    label for="to" { "To (UTC, excluded)" }
                    input #to type="datetime-local" name="to" required;
                    p {}
                    button type="submit" { "Start export" }
                }
            }
        }
        h2 { "Schedules" }
        @if schedules.is_empty() { p.muted { "No plugin has a schedule yet." } } @else {
            table {
                tr { th { "plugin" } th { "every" } th { "last slot" } th { "next slot" } th { "its job" } }
                @for ((config, cadence), progress) in &schedules {
                    tr {
                        td { (config_name(*config)) }
                        td { (cadence.name()) }
                        td { (slot_time(progress.last_slot)) }
                        td { (slot_time(progress.last_slot + cadence.seconds())) }
                        td { @if let Some(job) = &progress.job { code { (job) } } }
                    }
                }
            }
        }
    };
    Ok(layout(&admin, "/jobs", "Jobs and schedules", body))
}

fn slot_time(unix: i64) -> String {
    Utc.timestamp_opt(unix, 0)
        .single()
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

/// The exports table alone, for the page's self-refreshing part.
pub async fn exports_fragment(
    State(state): State<Shared>,
    admin: Admin,
) -> Result<Markup, PageError> {
    let exports = blocking(&state, |ops| ops.list_exports()).await?;
    Ok(exports_table(&admin, &exports))
}

pub async fn control(
    State(state): State<Shared>,
    admin: Admin,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    admin.verify(&form.csrf)?;
    let id = parse_job_id(&id)?;
    let after = blocking(&state, move |ops| ops.act_on_job(id, &action)).await?;
    Ok(back_to(
        "/jobs",
        &format!("Job {id} is now {}", after.name()),
    ))
}

#[derive(Deserialize)]
pub struct ExportForm {
    csrf: String,
    target: String,
    from: String,
    to: String,
}

fn parse_utc(text: &str) -> Result<DateTime<Utc>, OpError> {
    let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| OpError::Malformed(format!("{text:?} is not a date and time")))?;
    Ok(naive.and_utc())
}

pub async fn start_export(
    State(state): State<Shared>,
    admin: Admin,
    Form(form): Form<ExportForm>,
) -> Result<Redirect, PageError> {
    admin.verify(&form.csrf)?;
    let (team, plugin) = form
        .target
        .split_once(':')
        .and_then(|(team, plugin)| Some((team.parse::<u64>().ok()?, plugin.to_owned())))
        .ok_or_else(|| OpError::Malformed("choose a plugin and team".into()))?;
    let range = (parse_utc(&form.from)?, parse_utc(&form.to)?);
    let export = blocking(&state, move |ops| {
        ops.start_export(team, &plugin, range, None)
    })
    .await?;
    Ok(back_to("/jobs", &format!("Export {} started", export.id)))
}

pub async fn cancel_export(
    State(state): State<Shared>,
    admin: Admin,
    Path(id): Path<u64>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    admin.verify(&form.csrf)?;
    blocking(&state, move |ops| ops.cancel_export(id)).await?;
    Ok(back_to("/jobs", &format!("Export {id} cancelled")))
}
