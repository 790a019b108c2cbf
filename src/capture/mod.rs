//! HTTP capture, compatible with the real PostHog SDKs (posthog-js, posthog-python,
//! posthog-node): their paths, encodings, token places and responses.
//!
//! Owns: the capture routes and CORS, decoding ([`decode`]), request parsing and per-event
//! validation ([`parse`]), token → team resolution, and the mapping of every failure to a
//! status and JSON body ([`error`]).
//! Must never: answer 200 before the ingest writer reports the batch committed; run plugin code,
//! sink I/O or an fsync of its own on a request task.

pub mod budget;
pub mod decode;
pub mod error;
mod event;
mod flags;
mod intake;
pub mod lz64;
pub mod parse;
pub mod ratelimit;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use axum::http::HeaderMap;
use axum::routing::{get, on, post, MethodFilter, MethodRouter};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use crate::config::CaptureLimits;
use crate::ingest::IngestHandle;
use crate::store::{Store, Team};
use budget::MemoryBudget;
use error::CaptureError;
use ratelimit::RateLimits;

/// Paths that take events in PostHog's classic protocol, each with and without a trailing slash.
const EVENT_PATHS: &[&str] = &["/e", "/capture", "/batch", "/track", "/engage", "/i/v0/e"];

/// What the capture handlers share.
pub struct CaptureState {
    pub ingest: IngestHandle,
    pub teams: TeamDirectory,
    pub limits: CaptureLimits,
    pub trust_proxy: bool,
    pub admission: Admission,
    /// Locates each event's IP before it is queued (PostHog's GeoIP step).
    pub geoip: Arc<crate::geoip::GeoIp>,
    /// Where warnings about accepted events go (kept per team, best effort).
    pub warnings: Warnings,
    /// The daily salts of cookieless mode.
    pub salts: Arc<DailySalts>,
}

/// Cookieless mode's daily salts, read from the store once per day and process.
pub struct DailySalts {
    store: Store,
    known: std::sync::Mutex<HashMap<chrono::NaiveDate, [u8; 16]>>,
}

impl DailySalts {
    pub fn new(store: Store) -> DailySalts {
        DailySalts {
            store,
            known: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

impl crate::event::cookieless::Salts for DailySalts {
    fn salt(&self, day: chrono::NaiveDate) -> Option<[u8; 16]> {
        if let Some(salt) = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&day)
        {
            return Some(*salt);
        }
        match self.store.cookieless_salt(day) {
            Ok(salt) => {
                let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
                // A handful of days at most: events are stamped around today.
                if known.len() > 8 {
                    known.clear();
                }
                known.insert(day, salt);
                Some(salt)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cookieless salt; the event keeps its distinct id");
                None
            }
        }
    }
}

/// Ingestion warnings found at capture (an event's time not taken as given), handed to a task
/// that writes them in batches; when it falls behind, warnings are dropped and counted rather
/// than held without bound or delaying a request.
#[derive(Clone)]
pub struct Warnings {
    tx: tokio::sync::mpsc::Sender<(crate::store::TeamId, crate::person::IngestionWarning)>,
}

/// Warnings waiting to be written, at most.
const WARNINGS_WAITING: usize = 4096;

impl Warnings {
    /// The sender, and the task that writes what it is given to `store`.
    pub fn spawn(store: Store) -> Warnings {
        let (tx, mut rx) = tokio::sync::mpsc::channel(WARNINGS_WAITING);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 1000).await > 0 {
                let (store, taken) = (store.clone(), std::mem::take(&mut batch));
                let written =
                    tokio::task::spawn_blocking(move || store.add_ingestion_warnings(&taken)).await;
                if let Ok(Err(e)) = written {
                    tracing::warn!(error = %e, "cannot keep ingestion warnings");
                }
            }
        });
        Warnings { tx }
    }

    pub fn note(&self, team: crate::store::TeamId, warning: crate::person::IngestionWarning) {
        if self.tx.try_send((team, warning)).is_err() {
            metrics::counter!(crate::telemetry::names::INGESTION_WARNINGS_DROPPED).increment(1);
        }
    }
}

/// What decides whether capture takes a request at all: room on disk and in the queue, memory
/// for its body and events, a decoding slot, and the optional rate limits.
pub struct Admission {
    pub budget: MemoryBudget,
    pub rates: RateLimits,
    /// Decoding and parsing that runs on the blocking pool at once, so large payloads cannot
    /// take every core from the request workers.
    pub decode_slots: Arc<Semaphore>,
    pub store: Store,
    pub max_queue_bytes: u64,
    pub min_free_bytes: u64,
    /// Bytes of one team's events that may wait for its plugins.
    pub max_deferred_bytes: u64,
}

/// The byte bounds capture keeps: the queue's, the disk's floor, a team's deferred backlog.
#[derive(Clone, Copy, Debug)]
pub struct RoomLimits {
    pub max_queue_bytes: u64,
    pub min_free_bytes: u64,
    pub max_deferred_bytes: u64,
}

impl Admission {
    pub fn new(limits: &CaptureLimits, store: Store, room: RoomLimits) -> Admission {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Admission {
            budget: MemoryBudget::new(limits.max_inflight_bytes),
            rates: RateLimits::new(limits.rate_per_ip, limits.rate_per_token),
            decode_slots: Arc::new(Semaphore::new(cores * 2)),
            store,
            max_queue_bytes: room.max_queue_bytes,
            min_free_bytes: room.min_free_bytes,
            max_deferred_bytes: room.max_deferred_bytes,
        }
    }

    /// Refuses a team whose events already wait for its plugins past the bound.
    fn check_team_backlog(&self, team: crate::store::TeamId) -> Result<(), CaptureError> {
        let waiting = self.store.deferred_bytes(team);
        if waiting >= self.max_deferred_bytes {
            return Err(CaptureError::TeamBacklog {
                bytes: waiting,
                limit: self.max_deferred_bytes,
            });
        }
        Ok(())
    }

    /// Refuses when the queue is over its byte budget or the disk under its free-space floor.
    fn check_room(&self) -> Result<(), CaptureError> {
        let room = self.store.room();
        if room.queued_bytes >= self.max_queue_bytes {
            return Err(CaptureError::QueueFull {
                queued: room.queued_bytes,
                limit: self.max_queue_bytes,
            });
        }
        if room.free_disk_bytes < self.min_free_bytes {
            return Err(CaptureError::DiskLow {
                free: room.free_disk_bytes,
                floor: self.min_free_bytes,
            });
        }
        Ok(())
    }
}

/// Project token → team, read from the store and remembered. Teams created while the server
/// runs (for example by `appliance team create` in another process) are found on first use.
/// A changed team (a rotated token, say) is noticed within [`TEAMS_RECHECK`]: the store's teams
/// generation is read at most that often, and a new one forgets everything remembered.
pub struct TeamDirectory {
    store: Store,
    known: RwLock<HashMap<String, Team>>,
    /// The teams generation `known` was read under, and when it was last compared.
    checked: std::sync::Mutex<(u64, std::time::Instant)>,
}

/// How often capture looks whether teams changed.
const TEAMS_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl TeamDirectory {
    pub fn new(store: Store) -> TeamDirectory {
        let generation = store.teams_generation().unwrap_or(0);
        TeamDirectory {
            store,
            known: RwLock::new(HashMap::new()),
            checked: std::sync::Mutex::new((generation, std::time::Instant::now())),
        }
    }

    /// Forgets remembered teams if the store says they changed (looked at once per
    /// [`TEAMS_RECHECK`], by one request; the others go on with what is remembered).
    async fn recheck(&self) {
        let due = self
            .checked
            .try_lock()
            .ok()
            .filter(|c| c.1.elapsed() >= TEAMS_RECHECK)
            .map(|mut c| {
                c.1 = std::time::Instant::now();
                c.0
            });
        let Some(seen) = due else { return };
        let store = self.store.clone();
        let Ok(Ok(now)) = tokio::task::spawn_blocking(move || store.teams_generation()).await
        else {
            return;
        };
        if now != seen {
            // The generation first: a look-up begun under the old one will not be remembered.
            if let Ok(mut checked) = self.checked.lock() {
                checked.0 = now;
            }
            if let Ok(mut known) = self.known.write() {
                known.clear();
            }
        }
    }

    fn generation(&self) -> u64 {
        self.checked.lock().map(|c| c.0).unwrap_or(0)
    }

    async fn resolve(&self, token: &str) -> Result<Team, CaptureError> {
        self.recheck().await;
        if let Some(team) = self.known.read().ok().and_then(|m| m.get(token).cloned()) {
            return Ok(team);
        }
        let generation = self.generation();
        let store = self.store.clone();
        let key = token.to_owned();
        let found = tokio::task::spawn_blocking(move || store.team_by_token(&key))
            .await
            .map_err(|e| CaptureError::Unavailable(format!("team lookup failed: {e}")))?
            .map_err(|e| CaptureError::Unavailable(format!("team lookup failed: {e}")))?;
        let team = found.ok_or(CaptureError::UnknownToken)?;
        if let Ok(mut known) = self.known.write() {
            if self.generation() == generation {
                known.insert(token.to_owned(), team.clone());
            }
        }
        Ok(team)
    }
}

/// The capture routes, CORS included.
pub fn router(state: Arc<CaptureState>) -> Router {
    event_routes(
        on(
            MethodFilter::GET.or(MethodFilter::POST),
            intake::capture_classic,
        ),
        post(intake::capture_v1),
    )
    .with_state(state)
}

/// The routes answered while idle: the same paths, each a 503 that says why.
pub fn idle_router() -> Router {
    let idle = || async { CaptureError::Idle };
    event_routes(
        on(MethodFilter::GET.or(MethodFilter::POST), idle),
        post(idle),
    )
}

/// Every path SDKs send events to, with and without the trailing slash, plus the flag routes.
fn event_routes<S: Clone + Send + Sync + 'static>(
    classic: MethodRouter<S>,
    v1: MethodRouter<S>,
) -> Router<S> {
    let mut router = Router::new();
    for path in EVENT_PATHS {
        router = router
            .route(path, classic.clone())
            .route(&format!("{path}/"), classic.clone());
    }
    router
        .route("/i/v1/analytics/events", v1)
        .merge(flag_routes())
        .layer(axum::middleware::from_fn(record_request))
        .layer(cors())
}

/// Counts each capture request by its route and answer, and times it: for an event route the
/// time until the events were durable (or refused), which is what a client waits for.
async fn record_request(
    path: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use crate::telemetry::names;
    let started = std::time::Instant::now();
    let endpoint = path.map_or("unmatched", |p| endpoint_label(p.as_str()));
    let response = next.run(request).await;
    let status = response.status();
    // Labels borrowed from fixed strings: a request allocates none for its metrics.
    let outcome: metrics::SharedString = if status.is_success() {
        "ok".into()
    } else {
        status.as_str().to_owned().into()
    };
    metrics::histogram!(names::CAPTURE_ACK_SECONDS, "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(names::CAPTURE_REQUESTS, "endpoint" => endpoint, "outcome" => outcome)
        .increment(1);
    response
}

/// The routes besides [`EVENT_PATHS`], as metrics name them.
const OTHER_ROUTES: &[&str] = &[
    "/i/v1/analytics/events",
    "/decide",
    "/flags",
    "/array/{token}/config",
    "/array/{token}/config.js",
];

/// A matched route as metrics name it: without its trailing slash, and always one of a fixed
/// set of strings (never the URI a client sent).
fn endpoint_label(route: &str) -> &'static str {
    let route = route.trim_end_matches('/');
    EVENT_PATHS
        .iter()
        .chain(OTHER_ROUTES)
        .find(|label| **label == route)
        .copied()
        .unwrap_or("other")
}

fn flag_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let any = MethodFilter::GET.or(MethodFilter::POST);
    Router::new()
        .route("/decide", on(any, flags::decide))
        .route("/decide/", on(any, flags::decide))
        .route("/flags", on(any, flags::flags))
        .route("/flags/", on(any, flags::flags))
        .route("/array/{token}/config", get(flags::array_config))
        .route("/array/{token}/config.js", get(flags::array_config_js))
}

/// Browsers send capture requests with credentials, so the origin is echoed (never `*`) and
/// credentials allowed; otherwise posthog-js cannot read the answer and re-sends.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_credentials(true)
        .allow_methods(AllowMethods::mirror_request())
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(std::time::Duration::from_secs(3600))
}

/// The client's address. Behind a trusted proxy (`TRUST_PROXY`), as PostHog's capture takes
/// it: the leftmost `X-Forwarded-For` entry, else the `for=` of the first `Forwarded` element,
/// else `X-Real-IP`, `CF-Connecting-IP`, `True-Client-IP` or `Fly-Client-IP`; else (and always
/// without a trusted proxy) the connection's peer. These headers are whatever the client sent
/// unless the proxy in front replaces them, so `TRUST_PROXY` is only for a proxy that does.
fn client_ip(headers: &HeaderMap, peer: SocketAddr, trust_proxy: bool) -> IpAddr {
    if !trust_proxy {
        return peer.ip();
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let forwarded_for = header("x-forwarded-for")
        .and_then(|v| v.split(',').next())
        .and_then(parse_address);
    let forwarded = || {
        header("forwarded")?
            .split(',')
            .next()?
            .split(';')
            .find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                key.eq_ignore_ascii_case("for").then_some(value)
            })
            .and_then(parse_address)
    };
    let single = || {
        [
            "x-real-ip",
            "cf-connecting-ip",
            "true-client-ip",
            "fly-client-ip",
        ]
        .iter()
        .find_map(|name| header(name).and_then(parse_address))
    };
    forwarded_for
        .or_else(forwarded)
        .or_else(single)
        .unwrap_or_else(|| peer.ip())
}

/// An address as proxies write it: bare, quoted, in brackets, or with a port.
fn parse_address(text: &str) -> Option<IpAddr> {
    let text = text.trim().trim_matches('"');
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(socket) = text.parse::<SocketAddr>() {
        return Some(socket.ip());
    }
    text.strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|inner| inner.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capture_route_has_its_own_metrics_label() {
        for path in EVENT_PATHS {
            assert_eq!(endpoint_label(path), *path);
            assert_eq!(endpoint_label(&format!("{path}/")), *path);
        }
        for route in [
            "/i/v1/analytics/events",
            "/decide/",
            "/flags",
            "/array/{token}/config.js",
        ] {
            assert_eq!(endpoint_label(route), route.trim_end_matches('/'));
        }
    }

    #[test]
    fn behind_a_trusted_proxy_the_client_address_comes_from_its_headers() {
        let peer: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let with = |pairs: &[(&'static str, &str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, value.parse().unwrap());
            }
            headers
        };
        let xff = with(&[("x-forwarded-for", "203.0.113.9, 10.0.0.1")]);
        assert_eq!(client_ip(&xff, peer, true).to_string(), "203.0.113.9");
        assert_eq!(
            client_ip(&xff, peer, false),
            peer.ip(),
            "untrusted: the peer"
        );
        let forwarded = with(&[(
            "forwarded",
            "for=\"[2001:db8::7]:443\";proto=https, for=10.0.0.1",
        )]);
        assert_eq!(client_ip(&forwarded, peer, true).to_string(), "2001:db8::7");
        let real = with(&[("x-real-ip", "198.51.100.4")]);
        assert_eq!(client_ip(&real, peer, true).to_string(), "198.51.100.4");
        let junk = with(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(client_ip(&junk, peer, true), peer.ip());
    }
}
