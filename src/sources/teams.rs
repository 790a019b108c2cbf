//! Teams from PostHog's database (`TEAMS_FROM_POSTGRES`): beside a PostHog app, the projects,
//! their tokens and `anonymize_ips` come from its `posthog_team`, mirrored into the state file
//! at start, on PostHog's `reload-plugins` Redis channel, and every minute.
//!
//! Owns: reading `posthog_team` and keeping the mirror current. Must never: stop the appliance
//! when PostHog's database is away (the last mirror stays in force), or create teams of its own.

use std::time::Duration;

use futures_util::StreamExt;

use crate::config::TeamsFromPostgres;
use crate::shutdown::Shutdown;
use crate::store::{Store, Team};

/// How often the mirror is refreshed without a reload message.
const REFRESH: Duration = Duration::from_secs(60);
/// The longest a query may take.
const DEADLINE: Duration = Duration::from_secs(30);
/// The most teams mirrored (a PostHog has far fewer; the bound keeps one query's answer small).
const MAX_TEAMS: i64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("PostHog's database: {0}")]
    Postgres(String),
    #[error("the state file: {0}")]
    Store(String),
}

pub struct TeamMirror {
    pub settings: TeamsFromPostgres,
    pub store: Store,
}

impl TeamMirror {
    /// Mirrors once now, then again on each reload message and every [`REFRESH`], until
    /// shutdown.
    pub async fn run(self, mut shutdown: Shutdown) {
        let pool = match crate::sinks::postgres::PostgresTarget::parse(&self.settings.url)
            .map_err(MirrorError::Postgres)
            .and_then(|target| {
                crate::sinks::postgres::pool(&target)
                    .map_err(|e| MirrorError::Postgres(e.to_string()))
            }) {
            Ok(pool) => pool,
            Err(e) => {
                tracing::error!(error = %e, "teams cannot be read from PostHog's database");
                return;
            }
        };
        let (tx, mut reloads) = tokio::sync::mpsc::channel::<()>(1);
        if let Some(redis_url) = self.settings.reload_redis_url.clone() {
            let channel = self.settings.reload_channel.clone();
            tokio::spawn(listen_for_reloads(redis_url, channel, tx, shutdown.clone()));
        }
        while !shutdown.is_draining() {
            match self.mirror(&pool).await {
                Ok(0) => {}
                Ok(changed) => tracing::info!(changed, "teams mirrored from PostHog's database"),
                Err(e) => {
                    tracing::warn!(error = %e, "teams could not be mirrored; the last ones stay in force")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = reloads.recv() => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn mirror(&self, pool: &deadpool_postgres::Pool) -> Result<usize, MirrorError> {
        let postgres = |e: &dyn std::fmt::Display| MirrorError::Postgres(e.to_string());
        let rows = tokio::time::timeout(DEADLINE, async {
            let client = pool.get().await.map_err(|e| postgres(&e))?;
            client
                .query(
                    "SELECT id::bigint, name::text, api_token::text, anonymize_ips,
                            created_at FROM posthog_team ORDER BY id LIMIT $1",
                    &[&(MAX_TEAMS + 1)],
                )
                .await
                .map_err(|e| postgres(&e))
        })
        .await
        .map_err(|_| {
            MirrorError::Postgres(format!("no answer within {} s", DEADLINE.as_secs()))
        })??;
        if rows.len() as i64 > MAX_TEAMS {
            tracing::warn!(
                mirrored = MAX_TEAMS,
                "posthog_team has more teams than are mirrored; those with the highest ids are left out"
            );
        }
        let teams: Vec<Team> = rows
            .iter()
            .take(MAX_TEAMS as usize)
            .filter_map(|row| {
                let id: i64 = row.get(0);
                Some(Team {
                    id: u64::try_from(id).ok()?,
                    name: row.get::<_, Option<String>>(1).unwrap_or_default(),
                    api_token: row.get::<_, Option<String>>(2)?,
                    anonymize_ips: row.get::<_, Option<bool>>(3).unwrap_or(false),
                    created_at: row
                        .get::<_, Option<chrono::DateTime<chrono::Utc>>>(4)
                        .unwrap_or_default(),
                })
            })
            .collect();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.mirror_teams(&teams))
            .await
            .map_err(|e| MirrorError::Store(e.to_string()))?
            .map_err(|e| MirrorError::Store(e.to_string()))
    }
}

/// Forwards each message of PostHog's reload channel (its payload is ignored, as PostHog's
/// plugin server ignores it); resubscribes with backoff when Redis goes away.
async fn listen_for_reloads(
    redis_url: String,
    channel: String,
    reloads: tokio::sync::mpsc::Sender<()>,
    mut shutdown: Shutdown,
) {
    let mut wait = Duration::from_millis(200);
    while !shutdown.is_draining() {
        let subscribed = async {
            let client = redis::Client::open(redis_url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        match subscribed {
            Ok(mut pubsub) => {
                wait = Duration::from_millis(200);
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            // A full channel already holds a reload to do.
                            Some(_) => { let _ = reloads.try_send(()); }
                            None => break,
                        },
                        _ = shutdown.changed() => return,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, channel, "cannot subscribe to PostHog's reload channel; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}
