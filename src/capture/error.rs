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
    #[error("no event in the request was valid")]
    NoValidEvents { rejected: Vec<Rejection> },
    #[error("{accepted} events were stored; {} were rejected", rejected.len())]
    SomeEventsRejected {
        accepted: usize,
        rejected: Vec<Rejection>,
    },
    #[error("the appliance is busy; retry later")]
    Busy,
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
            NoValidEvents { .. } | SomeEventsRejected { .. } => {
                (StatusCode::BAD_REQUEST, invalid, "invalid_events")
            }
            Busy | Unavailable(_) | Idle => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "retry_later",
            ),
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            CaptureError::Busy => Some(1),
            CaptureError::Unavailable(_) | CaptureError::Idle => Some(5),
            _ => None,
        }
    }
}

impl IntoResponse for CaptureError {
    fn into_response(self) -> Response {
        let (status, kind, code) = self.classify();
        let (accepted, rejected) = match &self {
            CaptureError::NoValidEvents { rejected } => (Some(0), Some(rejected.as_slice())),
            CaptureError::SomeEventsRejected { accepted, rejected } => {
                (Some(*accepted), Some(rejected.as_slice()))
            }
            _ => (None, None),
        };
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
