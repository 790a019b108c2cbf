//! One capture request, in the order that spends the least on a request that will be refused:
//! the per-address rate limit and the room on disk and in the queue (before the body is read);
//! a token given outside the payload (before it is decoded); the body, read within its deadline
//! and charged to the memory budget as it arrives; decoding and splitting into events (on the
//! blocking pool when large, charged as it grows); the token and team (before any event is
//! built); the per-token rate limit; the events, judged and normalised one at a time; the group
//! commit; the answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use chrono::Utc;
use http_body_util::BodyExt;
use serde_json::json;

use super::budget::Charge;
use super::decode::{decode_payload, EncodedRequest};
use super::error::{CaptureError, Rejection};
use super::parse::{build_rows, find_token, split_payload, Judged, SplitPayload};
use super::{client_ip, CaptureState};
use crate::event::normalize::RequestContext;
use crate::event::timestamp::sent_at_from_query_millis;
use crate::event::IngestBatch;
use crate::ingest::IngestError;
use crate::person::IngestionWarning;
use crate::store::Team;

/// Payloads up to this size, not compressed, are decoded on the request worker itself.
const DECODE_INLINE_MAX: usize = 64 * 1024;

/// The query parameters capture reads.
#[derive(Default)]
struct CaptureQuery {
    data: Option<String>,
    compression: Option<String>,
    sent_at_millis: Option<String>,
    token: Option<String>,
}

fn parse_query(query: Option<&str>) -> CaptureQuery {
    let mut q = CaptureQuery::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let value = Some(value.into_owned());
        match key.as_ref() {
            "data" => q.data = value,
            "compression" => q.compression = value,
            "_" => q.sent_at_millis = value,
            "token" | "api_key" => q.token = value,
            _ => {}
        }
    }
    q
}

/// A request's events, ready for the group commit.
struct Accepted {
    team: Team,
    judged: Judged,
    sent_at: Option<chrono::DateTime<Utc>>,
    received_at: chrono::DateTime<Utc>,
    ip: String,
}

/// PostHog's classic protocol: `200 {"status": 1}` once every accepted event is durable.
pub(super) async fn capture_classic(
    State(state): State<Arc<CaptureState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Result<Response, CaptureError> {
    let mut charge = state.admission.budget.start();
    let (accepted, _) = intake(&state, peer, request, None, &mut charge).await?;
    let (stored, rejected, rejected_count) = commit(&state, accepted, &mut charge).await?;
    if rejected_count == 0 {
        // PostHog's answer, as serde_json writes it, from a fixed string.
        Ok((
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"status":1}"#,
        )
            .into_response())
    } else if stored == 0 {
        Err(CaptureError::NoValidEvents {
            rejected,
            rejected_count,
        })
    } else {
        Err(CaptureError::SomeEventsRejected {
            accepted: stored,
            rejected,
            rejected_count,
        })
    }
}

/// PostHog's v1 protocol (posthog-python `capture_mode="v1"`): a result per event uuid.
pub(super) async fn capture_v1(
    State(state): State<Arc<CaptureState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Result<Response, CaptureError> {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let mut charge = state.admission.budget.start();
    let (accepted, _) = intake(&state, peer, request, bearer, &mut charge).await?;
    let uuids: Vec<String> = accepted
        .judged
        .rows
        .iter()
        .map(|row| row.uuid.to_string())
        .collect();
    let (_, rejected, _) = commit(&state, accepted, &mut charge).await?;
    let mut results = serde_json::Map::new();
    for uuid in uuids {
        results.insert(uuid, json!({"result": "ok"}));
    }
    for r in rejected {
        let key = r.uuid.unwrap_or_else(|| r.index.to_string());
        results.insert(key, json!({"result": "drop", "details": r.error}));
    }
    Ok(Json(json!({ "results": results })).into_response())
}

/// Everything up to the group commit; `extra_token` is one given outside the payload.
async fn intake(
    state: &CaptureState,
    peer: SocketAddr,
    request: Request,
    extra_token: Option<String>,
    charge: &mut Charge,
) -> Result<(Accepted, ()), CaptureError> {
    let ip = client_ip(request.headers(), peer, state.trust_proxy);
    state.admission.rates.check_request(ip)?;
    state.admission.check_room()?;
    let query = parse_query(request.uri().query());
    let extra_token = extra_token.or_else(|| query.token.clone());
    // A token given outside the payload is checked before anything is decoded.
    if let Some(token) = extra_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        if !token.starts_with("phx_") {
            state.teams.resolve(token).await?;
        }
    }
    let encodings = Encodings::of(request.headers());
    // PostHog's `/engage/` carries person updates; one without an event name is `$identify`.
    let engage = request.uri().path().starts_with("/engage");
    let body = read_body(request, state, charge).await?;
    let split = decode_and_split(state, encodings, &query, body, charge).await?;
    let limits = state.limits;
    let token = find_token(&split, extra_token.as_deref(), limits.max_event_bytes)?;
    let team = state.teams.resolve(&token).await?;
    state.admission.check_team_backlog(team.id)?;
    state
        .admission
        .rates
        .check_events(&token, split.events.len())?;
    let received_at = Utc::now();
    let sent_at = split.sent_at.or_else(|| {
        query
            .sent_at_millis
            .as_deref()
            .and_then(sent_at_from_query_millis)
    });
    let ip_text = ip.to_string();
    let anonymize_ips = team.anonymize_ips;
    let geoip = state.geoip.clone();
    let salts = state.salts.clone();
    let team_id = team.id;
    let build = move |split: SplitPayload, ip: String| {
        let ctx = RequestContext {
            received_at,
            sent_at,
            ip: Some(&ip),
            anonymize_ips,
            geoip: Some(&geoip),
            default_event: engage.then_some("$identify"),
            cookieless: Some((team_id, &*salts)),
        };
        (build_rows(&split, limits.max_event_bytes, &ctx), ip)
    };
    let (judged, ip_text) = if split.text.len() > DECODE_INLINE_MAX {
        on_decode_slot(state, move || Ok(build(split, ip_text))).await?
    } else {
        build(split, ip_text)
    };
    // The rows hold about as much as the text they came from, which is charged; the encoded
    // batch made from them at commit time is charged there.
    Ok((
        Accepted {
            team,
            judged,
            sent_at,
            received_at,
            ip: ip_text,
        },
        (),
    ))
}

/// Reads the body within `CAPTURE_BODY_TIMEOUT_SECS` and `CAPTURE_MAX_BODY_BYTES`, charging it
/// to the memory budget as it arrives.
async fn read_body(
    request: Request,
    state: &CaptureState,
    charge: &mut Charge,
) -> Result<Bytes, CaptureError> {
    let limit = state.limits.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(CaptureError::BodyTooLarge { limit });
    }
    let deadline = state.limits.body_timeout;
    let collect = async {
        charge.grow(declared.unwrap_or(0) as usize).await?;
        let mut body = request.into_body();
        let mut buffer = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| CaptureError::BodyRead(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buffer.len() + data.len() > limit {
                return Err(CaptureError::BodyTooLarge { limit });
            }
            let needed = buffer.len() + data.len();
            if needed > charge.bytes() {
                charge.grow(needed - charge.bytes()).await?;
            }
            buffer.extend_from_slice(&data);
        }
        Ok(buffer.freeze())
    };
    tokio::time::timeout(deadline, collect)
        .await
        .map_err(|_| CaptureError::BodyTimeout {
            secs: deadline.as_secs(),
        })?
}

/// Runs CPU-heavy work on the blocking pool, at most `decode_slots` at once.
async fn on_decode_slot<T: Send + 'static>(
    state: &CaptureState,
    work: impl FnOnce() -> Result<T, CaptureError> + Send + 'static,
) -> Result<T, CaptureError> {
    let wait = std::time::Duration::from_secs(1);
    let slot = tokio::time::timeout(wait, state.admission.decode_slots.clone().acquire_owned())
        .await
        .map_err(|_| CaptureError::Busy)?
        .map_err(|_| CaptureError::Busy)?;
    let result = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work()
    })
    .await
    .map_err(|e| CaptureError::Unavailable(format!("decoding failed: {e}")))?;
    result
}

/// The headers that say how a body is encoded, taken before the request is consumed.
struct Encodings {
    content_type: Option<String>,
    content_encoding: Option<String>,
}

impl Encodings {
    fn of(headers: &HeaderMap) -> Encodings {
        let text = |name: header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Encodings {
            content_type: text(header::CONTENT_TYPE),
            content_encoding: text(header::CONTENT_ENCODING),
        }
    }
}

/// Undoes the encodings and finds the events' spans; compressed or large payloads are handled on
/// the blocking pool, charging what they unpack to as it grows.
async fn decode_and_split(
    state: &CaptureState,
    encodings: Encodings,
    query: &CaptureQuery,
    body: Bytes,
    charge: &mut Charge,
) -> Result<SplitPayload, CaptureError> {
    let Encodings {
        content_type,
        content_encoding,
    } = encodings;
    let data = query.data.clone();
    let compression = query.compression.clone();
    let limits = state.limits;
    let payload_len = body.len().max(query.data.as_ref().map_or(0, String::len));
    // What a payload may unpack to decides where it is decoded: any compression, or any size
    // past a small one, goes to the blocking pool.
    let compressed = content_encoding.is_some()
        || compression.is_some()
        || body.starts_with(&[0x1f, 0x8b])
        || data.is_some();
    let work = move |charge: &mut Charge| {
        let request = EncodedRequest {
            content_type: content_type.as_deref(),
            content_encoding: content_encoding.as_deref(),
            query_data: data.as_deref(),
            query_compression: compression.as_deref(),
            body: &body,
        };
        let json = decode_payload(&request, limits.max_decompressed_bytes, charge)?;
        split_payload(json, limits.max_events_per_request)
    };
    if compressed || payload_len > DECODE_INLINE_MAX {
        let mut held = std::mem::replace(charge, state.admission.budget.start());
        let (result, held) = on_decode_slot(state, move || {
            let result = work(&mut held);
            Ok((result, held))
        })
        .await?;
        *charge = held;
        result
    } else {
        work(charge)
    }
}

/// Makes the accepted events durable and returns (stored, listed rejections, all rejections).
async fn commit(
    state: &CaptureState,
    accepted: Accepted,
    charge: &mut Charge,
) -> Result<(usize, Vec<Rejection>, usize), CaptureError> {
    let Accepted {
        team,
        judged,
        sent_at,
        received_at,
        ip,
    } = accepted;
    let Judged {
        rows,
        warnings,
        rejected,
        rejected_count,
    } = judged;
    let stored = rows.len();
    let events_metric = crate::telemetry::names::CAPTURE_EVENTS;
    if rejected_count > 0 {
        metrics::counter!(events_metric, "outcome" => "rejected").increment(rejected_count as u64);
    }
    if stored == 0 {
        return Ok((0, rejected, rejected_count));
    }
    let batch = IngestBatch {
        team_id: team.id,
        received_at,
        sent_at,
        // An anonymised team's plugins never see the client's address.
        ip: (!team.anonymize_ips).then_some(ip),
        events: rows,
    };
    let started = Instant::now();
    let encoded = batch.encode();
    drop(batch);
    charge.grow(encoded.len()).await?;
    state.ingest.submit(encoded).await.map_err(|e| match e {
        IngestError::Busy => CaptureError::Busy,
        other => CaptureError::Unavailable(other.to_string()),
    })?;
    metrics::counter!(events_metric, "outcome" => "accepted").increment(stored as u64);
    for (uuid, sent, warning) in warnings {
        let (kind, reason) = warning.kind_and_reason();
        state.warnings.note(
            team.id,
            IngestionWarning {
                kind: kind.into(),
                details: json!({"eventUuid": uuid, "field": "timestamp", "value": sent, "reason": reason})
                    .to_string(),
                timestamp: received_at,
            },
        );
    }
    tracing::trace!(
        events = stored,
        took_us = started.elapsed().as_micros() as u64,
        "committed"
    );
    Ok((stored, rejected, rejected_count))
}
