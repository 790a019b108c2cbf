//! First-run set-up (the one-time link sets the password), log-in (throttled per address, the
//! password checked with argon2 off the async workers) and log-out.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;

use super::{bare, blocking, Admin, CsrfForm, PageError, Shared};
use crate::admin::session::is_https;
use crate::ops::admin::{PASSWORD_MAX_CHARS, PASSWORD_MIN_CHARS};
use crate::ops::OpError;

/// The hashing semaphore is never closed; this maps the impossible error.
fn closed(_: tokio::sync::AcquireError) -> PageError {
    OpError::Internal("the password check is unavailable".into()).into()
}

#[derive(Deserialize)]
pub struct SetupQuery {
    #[serde(default)]
    token: String,
}

pub async fn setup_form(
    State(state): State<Shared>,
    Query(query): Query<SetupQuery>,
) -> Result<Response, PageError> {
    let token = query.token.clone();
    let (exists, valid) = blocking(&state, move |ops| {
        Ok((ops.admin_exists()?, ops.setup_token_valid(&token)?))
    })
    .await?;
    if exists {
        return Ok(Redirect::to("/login").into_response());
    }
    if !valid {
        return Err(PageError::Forbidden(
            "this set-up link is not valid (used, replaced or expired); `sudo appliance admin setup-link` prints a new one"
                .into(),
        ));
    }
    Ok(bare(
        "Set the admin password",
        html! {
            p { "Choose the password for this appliance's admin page. There is no default one." }
            form method="post" action="/setup" {
                input type="hidden" name="token" value=(query.token);
                (password_fields())
                button type="submit" { "Set password and sign in" }
            }
        },
    )
    .into_response())
}

fn password_fields() -> Markup {
    html! {
        label for="password" { "Password (" (PASSWORD_MIN_CHARS) " to " (PASSWORD_MAX_CHARS) " characters)" }
        input #password type="password" name="password" autocomplete="new-password" required
            minlength=(PASSWORD_MIN_CHARS) maxlength=(PASSWORD_MAX_CHARS);
        label for="confirm" { "The same again" }
        input #confirm type="password" name="confirm" autocomplete="new-password" required;
        p {}
    }
}

#[derive(Deserialize)]
pub struct SetupForm {
    token: String,
    password: String,
    confirm: String,
}

pub async fn setup(
    State(state): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<SetupForm>,
) -> Result<Response, PageError> {
    if form.password != form.confirm {
        return Err(OpError::Invalid("the two passwords differ".into()).into());
    }
    let _permit = state.hashing.acquire().await.map_err(closed)?;
    let epoch = blocking(&state, move |ops| {
        ops.complete_setup(&form.token, &form.password)
    })
    .await?;
    tracing::info!("the admin password was set through the set-up link");
    let jar = state.sessions.start(epoch, is_https(&headers));
    Ok((jar, Redirect::to("/")).into_response())
}

#[derive(Deserialize, Default)]
pub struct LoginQuery {
    error: Option<String>,
}

pub async fn login_form(
    State(state): State<Shared>,
    Query(query): Query<LoginQuery>,
) -> Result<Markup, PageError> {
    let exists = blocking(&state, |ops| ops.admin_exists()).await?;
    Ok(bare(
        "Log in",
        html! {
            @if !exists {
                div.flash.error {
                    "No admin password is set yet. Open the set-up link the appliance printed at start, or run "
                    code { "sudo appliance admin setup-link" } " on the server for a new one."
                }
            } @else {
                @if let Some(error) = &query.error { div.flash.error { (error) } }
                form method="post" action="/login" {
                    label for="password" { "Admin password" }
                    input #password type="password" name="password" autocomplete="current-password" required autofocus;
                    p {}
                    button type="submit" { "Log in" }
                }
            }
        },
    ))
}

#[derive(Deserialize)]
pub struct LoginForm {
    password: String,
}

pub async fn login(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, PageError> {
    if let Some(until) = state.failures.locked_until(peer.ip()) {
        let seconds = until.saturating_duration_since(Instant::now()).as_secs() + 1;
        return Err(PageError::Throttled(seconds));
    }
    let permit = state.hashing.acquire().await.map_err(closed)?;
    let epoch = blocking(&state, move |ops| ops.verify_admin_password(&form.password)).await?;
    drop(permit);
    match epoch {
        Some(epoch) => {
            let jar = state.sessions.start(epoch, is_https(&headers));
            Ok((jar, Redirect::to("/")).into_response())
        }
        None => {
            state.failures.failed(peer.ip());
            tracing::warn!(peer = %peer.ip(), "a failed admin log-in");
            Ok(Redirect::to("/login?error=Wrong+password").into_response())
        }
    }
}

pub async fn logout(
    State(state): State<Shared>,
    admin: Admin,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    admin.verify(&form.csrf)?;
    let jar = state.sessions.end(is_https(&headers));
    Ok((jar, Redirect::to("/login")).into_response())
}
