//! Every way a capture request can fail, and the one place they become HTTP responses.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One event of a request that was not accepted, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rejection {
    /// Position of the event in the request's list of events.
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("payload is larger than the limit of {limit} bytes once decompressed")]
    DecompressedTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("unsupported compression {0:?}: expected gzip, gzip-js, base64, lz64 or none")]
    UnsupportedCompression(String),
    #[error("unsupported Content-Encoding {0:?}: expected gzip or identity")]
    UnsupportedContentEncoding(String),
    #[error("payload is not valid base64: {0}")]
    InvalidBase64(String),
    #[error("payload is not valid gzip: {0}")]
    InvalidGzip(String),
    #[error("payload is not valid lz64 (lz-string base64)")]
    InvalidLz64,
    #[error("payload is not valid UTF-8 (invalid byte at offset {offset})")]
    InvalidUtf8 { offset: usize },
    #[error("payload is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("payload is empty")]
    EmptyPayload,
    #[error("payload must be an event object, an array of events, or {{\"api_key\", \"batch\": [...]}}; got {0}")]
    UnexpectedShape(&'static str),
    #[error("no project token: send it as api_key, token, $token, properties.token or ?token=")]
    MissingToken,
    #[error(
        "personal API keys (phx_...) are not accepted for capture; use the project token (phc_...)"
    )]
    PersonalApiKey,
    #[error("unknown project token")]
    UnknownToken,
    #[error("the events of one request name different project tokens")]
    TokenMismatch,
    #[error("the request holds more than {limit} events (CAPTURE_MAX_EVENTS_PER_REQUEST); send them in smaller batches")]
    TooManyEvents { limit: usize },
    #[error("the request body did not arrive within {secs} s")]
    BodyTimeout { secs: u64 },
    #[error("no event in the request was valid")]
    NoValidEvents {
        rejected: Vec<Rejection>,
        rejected_count: usize,
    },
    #[error("{accepted} events were stored; {rejected_count} were rejected")]
    SomeEventsRejected {
        accepted: usize,
        rejected: Vec<Rejection>,
        rejected_count: usize,
    },
    #[error("the appliance is busy; retry later")]
    Busy,
    #[error("decoding the request needs more memory than capture may use at once ({budget} bytes, CAPTURE_MAX_INFLIGHT_BYTES)")]
    OverBudget { budget: usize },
    #[error("the ingest queue holds {queued} bytes waiting for the sink, at its limit of {limit} (INGEST_MAX_QUEUE_BYTES); retry later")]
    QueueFull { queued: u64, limit: u64 },
    #[error("this project's events wait for its plugins ({bytes} bytes, at PLUGIN_DEFERRED_MAX_BYTES of {limit}); retry later")]
    TeamBacklog { bytes: u64, limit: u64 },
    #[error("the data directory's disk has {free} bytes free, under the floor of {floor} (DATA_DIR_MIN_FREE_MB); retry later")]
    DiskLow { free: u64, floor: u64 },
    #[error("too many {what}; retry in {retry_after} s")]
    RateLimited {
        what: &'static str,
        retry_after: u32,
    },
    #[error("{0}; retry later")]
    Unavailable(String),
    #[error("the appliance is idle (--idle or PLUGIN_SERVER_IDLE) and accepts no events")]
    Idle,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    accepted: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected: Option<&'a [Rejection]>,
    /// All rejected events, when more were rejected than are listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected_count: Option<usize>,
}

impl CaptureError {
    /// The status, PostHog-style error type and code.
    fn classify(&self) -> (StatusCode, &'static str, &'static str) {
        use CaptureError::*;
        let invalid = "validation_error";
        match self {
            BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, invalid, "payload_too_large"),
            DecompressedTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, invalid, "payload_too_large")
            }
            BodyRead(_) => (StatusCode::BAD_REQUEST, invalid, "invalid_body"),
            UnsupportedCompression(_) | UnsupportedContentEncoding(_) => {
                (StatusCode::BAD_REQUEST, invalid, "unsupported_compression")
            }
            InvalidBase64(_) | InvalidGzip(_) | InvalidLz64 | InvalidUtf8 { .. } => {
                (StatusCode::BAD_REQUEST, invalid, "invalid_encoding")
            }
            InvalidJson(_) | EmptyPayload | UnexpectedShape(_) => {
                (StatusCode::BAD_REQUEST, invalid, "invalid_payload")
            }
            MissingToken | PersonalApiKey | UnknownToken | TokenMismatch => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
            ),
            TooManyEvents { .. } => (StatusCode::PAYLOAD_TOO_LARGE, invalid, "too_many_events"),
            OverBudget { .. } => (StatusCode::PAYLOAD_TOO_LARGE, invalid, "payload_too_large"),
            BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, invalid, "body_timeout"),
            NoValidEvents { .. } | SomeEventsRejected { .. } => {
                (StatusCode::BAD_REQUEST, invalid, "invalid_events")
            }
            RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "rate_limited",
            ),
            Busy
            | Unavailable(_)
            | Idle
            | QueueFull { .. }
            | DiskLow { .. }
            | TeamBacklog { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "retry_later",
            ),
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            CaptureError::Busy => Some(1),
            CaptureError::RateLimited { retry_after, .. } => Some(*retry_after),
            CaptureError::Unavailable(_)
            | CaptureError::Idle
            | CaptureError::QueueFull { .. }
            | CaptureError::TeamBacklog { .. }
            | CaptureError::DiskLow { .. } => Some(5),
            _ => None,
        }
    }
}

impl IntoResponse for CaptureError {
    fn into_response(self) -> Response {
        let (status, kind, code) = self.classify();
        let (accepted, rejected, count) = match &self {
            CaptureError::NoValidEvents {
                rejected,
                rejected_count,
            } => (Some(0), Some(rejected.as_slice()), *rejected_count),
            CaptureError::SomeEventsRejected {
                accepted,
                rejected,
                rejected_count,
            } => (Some(*accepted), Some(rejected.as_slice()), *rejected_count),
            _ => (None, None, 0),
        };
        let rejected_count = rejected
            .filter(|listed| listed.len() < count)
            .map(|_| count);
        let detail = match rejected {
            Some(r) if !r.is_empty() => format!("{self}: event {}: {}", r[0].index, r[0].error),
            _ => self.to_string(),
        };
        let body = ErrorBody {
            kind,
            code,
            detail,
            accepted,
            rejected,
            rejected_count,
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
