//! The admin page: server-rendered HTML (maud) on the admin address, for the person who runs
//! the box. Overview, teams, plugins, jobs and exports, events, settings; first-run set-up and
//! log-in in [`auth`].
//!
//! Owns: the pages' routes, their HTML, and turning an operation's error into a page with the
//! same status `/api/` gives it.
//! Must never: hold an operation's rules (every change goes through `ops`, as the CLI's and the
//! API's do), answer a page without a live session (set-up and log-in aside), accept a form
//! without its session's CSRF token, or run store work on an async worker.

mod auth;
mod events;
mod jobs;
mod overview;
mod plugins;
mod settings;
mod teams;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup, DOCTYPE};

use super::session::{Session, Sessions};
use super::throttle::FailedAuth;
use super::AdminState;
use crate::config::Config;
use crate::ops::{OpError, Ops};
use crate::sinks::EventReader;

pub use overview::Traffic;

/// Largest plugin archive the upload form accepts.
const MAX_UPLOAD_BYTES: usize = 64 << 20;
/// Largest body of every other form (set-up and log-in included: no one needs more).
const MAX_FORM_BYTES: usize = 64 << 10;
/// Password hashes computed at once (argon2id takes ~19 MiB and tens of ms each).
const CONCURRENT_HASHES: usize = 2;

pub struct PageState {
    pub ops: Ops,
    pub sessions: Sessions,
    pub admin: Arc<AdminState>,
    pub config: Arc<Config>,
    pub traffic: Arc<Traffic>,
    pub events: Arc<dyn EventReader>,
    /// Where capture listens, once it does (the port may have been chosen by the system).
    pub capture_bound: Arc<OnceLock<SocketAddr>>,
    failures: FailedAuth,
    /// Bounds the memory and CPU that log-in and set-up attempts can take at once.
    hashing: tokio::sync::Semaphore,
}

impl PageState {
    pub fn new(
        ops: Ops,
        sessions: Sessions,
        admin: Arc<AdminState>,
        config: Arc<Config>,
        traffic: Arc<Traffic>,
        events: Arc<dyn EventReader>,
        capture_bound: Arc<OnceLock<SocketAddr>>,
    ) -> PageState {
        PageState {
            ops,
            sessions,
            admin,
            config,
            traffic,
            events,
            capture_bound,
            failures: FailedAuth::new(),
            hashing: tokio::sync::Semaphore::new(CONCURRENT_HASHES),
        }
    }
}

type Shared = Arc<PageState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(overview::page))
        .route("/setup", get(auth::setup_form).post(auth::setup))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/teams", get(teams::page).post(teams::create))
        .route("/teams/{id}", post(teams::update))
        .route("/plugins", get(plugins::page))
        .route(
            "/plugins/upload",
            post(plugins::upload).layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)),
        )
        .route(
            "/plugins/{plugin}/teams/{team}",
            get(plugins::config_form).post(plugins::configure),
        )
        .route("/plugins/{plugin}/teams/{team}/logs", get(plugins::logs))
        .route("/jobs", get(jobs::page))
        .route(
            "/jobs/exports",
            get(jobs::exports_fragment).post(jobs::start_export),
        )
        .route("/jobs/exports/{id}/cancel", post(jobs::cancel_export))
        .route("/jobs/{id}/{action}", post(jobs::control))
        .route("/events", get(events::page))
        .route("/events/rows", get(events::rows_fragment))
        .route("/settings", get(settings::page))
        .route("/settings/api-token", post(settings::rotate_api_token))
        .route("/assets/style.css", get(style))
        .route("/assets/app.js", get(script))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .with_state(state)
}

async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../../../web/style.css"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../../../web/app.js"),
    )
}

/// A signed-in request: pages take it as an argument, so none renders without a session.
pub struct Admin(pub Session);

impl FromRequestParts<Shared> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Admin, Response> {
        let ops = state.ops.clone();
        let epoch = tokio::task::spawn_blocking(move || ops.session_epoch())
            .await
            .map_err(|e| PageError::from(OpError::Internal(e.to_string())).into_response())?
            .map_err(|e| PageError::from(e).into_response())?;
        match state.sessions.check(&parts.headers, epoch) {
            Some(session) => Ok(Admin(session)),
            None => Err(Redirect::to("/login").into_response()),
        }
    }
}

impl Admin {
    /// Refuses a form whose CSRF token is not this session's.
    pub fn verify(&self, csrf: &str) -> Result<(), PageError> {
        if self.0.csrf_matches(csrf) {
            Ok(())
        } else {
            Err(PageError::Forbidden(
                "the form's security token does not match your session; reload the page and try again"
                    .into(),
            ))
        }
    }
}

/// Why a page could not do what was asked; rendered as a page with the API's status.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error(transparent)]
    Op(#[from] OpError),
    #[error("{0}")]
    Forbidden(String),
    #[error("too many failed log-ins from this address; try again in {0} s")]
    Throttled(u64),
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = match &self {
            PageError::Op(OpError::NotFound(_)) => StatusCode::NOT_FOUND,
            PageError::Op(OpError::Malformed(_)) => StatusCode::BAD_REQUEST,
            PageError::Op(OpError::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            PageError::Op(OpError::Conflict(_)) => StatusCode::CONFLICT,
            PageError::Op(OpError::Internal(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            PageError::Forbidden(_) => StatusCode::FORBIDDEN,
            PageError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
        };
        let body = bare(
            "Something went wrong",
            html! {
                div.flash.error { (self.to_string()) }
                p { a href="javascript:history.back()" { "Back" } " · " a href="/" { "Overview" } }
            },
        );
        (status, body).into_response()
    }
}

/// Runs an operation off the async workers.
pub async fn blocking<T: Send + 'static>(
    state: &Shared,
    work: impl FnOnce(&Ops) -> Result<T, OpError> + Send + 'static,
) -> Result<T, PageError> {
    let ops = state.ops.clone();
    tokio::task::spawn_blocking(move || work(&ops))
        .await
        .map_err(|e| OpError::Internal(e.to_string()))?
        .map_err(PageError::from)
}

/// The pages of the navigation bar: (path, title).
const NAV: &[(&str, &str)] = &[
    ("/", "Overview"),
    ("/teams", "Teams"),
    ("/plugins", "Plugins"),
    ("/jobs", "Jobs"),
    ("/events", "Events"),
    ("/settings", "Settings"),
];

/// The `<head>` every page shares.
fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · appliance" }
            link rel="stylesheet" href="/assets/style.css";
        }
    }
}

/// A signed-in page: the navigation, `here` marked, and `body`.
pub fn layout(admin: &Admin, here: &str, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    span.brand { "appliance" }
                    nav {
                        @for (path, name) in NAV {
                            a href=(path) class=[(*path == here).then_some("here")] { (name) }
                        }
                    }
                    form method="post" action="/logout" {
                        (csrf_field(admin))
                        button.quiet type="submit" { "Log out" }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
                script src="/assets/app.js" {}
            }
        }
    }
}

/// A page without navigation (set-up, log-in, errors).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body { main.login { h1 { (title) } (body) } }
        }
    }
}

/// The hidden field every form carries.
pub fn csrf_field(admin: &Admin) -> Markup {
    html! { input type="hidden" name="csrf" value=(admin.0.csrf()); }
}

/// A form's outcome, carried to the next page by [`back_to`] as `?done=` (or `?error=`).
#[derive(serde::Deserialize, Default)]
pub struct Outcome {
    done: Option<String>,
    error: Option<String>,
}

impl Outcome {
    /// A one-line message above a page's content.
    pub fn flash(&self) -> Markup {
        html! {
            @if let Some(text) = &self.done { div.flash.ok { (text) } }
            @if let Some(text) = &self.error { div.flash.error { (text) } }
        }
    }
}

/// A form that carries nothing but its CSRF token (a button).
#[derive(serde::Deserialize)]
pub struct CsrfForm {
    pub csrf: String,
}

/// A redirect after a form, carrying its outcome for [`flash`].
pub fn back_to(path: &str, done: &str) -> Redirect {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("done", done)
        .finish();
    let joiner = if path.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{path}{joiner}{query}"))
}

/// Bytes in a human unit.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
