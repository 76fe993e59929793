//! The one place errors become HTTP answers.
//!
//! Owns `ApiError` and its mapping to status codes and the JSON error body
//! `{"error": code, "message": text}`. Every handler returns `ApiError` for
//! failures, so no other module picks a status code for an error.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::health::BeatError;
use crate::raft::ClusterError;
use crate::registry::ValidationError;
use crate::stream::IngestError;

/// A failed client request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("request body is larger than the {limit} byte limit")]
    PayloadTooLarge { limit: usize },
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("too many requests in flight on this node; retry shortly")]
    Overloaded,
    #[error("the request did not finish in time; if it was a write, its outcome is unknown")]
    RequestTimeout,
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Beat(#[from] BeatError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ClusterError as C;
        match self {
            ApiError::BadRequest(_) | ApiError::Validation(_) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::RequestTimeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ApiError::Beat(BeatError::UnknownCheck(_)) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Beat(BeatError::NotTtl(_)) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Ingest(i) => match i {
                IngestError::UnknownStream(_) => (StatusCode::NOT_FOUND, "not_found"),
                IngestError::Full { .. } => (StatusCode::TOO_MANY_REQUESTS, "stream_full"),
                IngestError::TimedOut { .. } => (StatusCode::SERVICE_UNAVAILABLE, "stream_busy"),
                IngestError::Stopping(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            },
            ApiError::Cluster(c) => match c {
                C::NoLeader | C::NotLeader => (StatusCode::SERVICE_UNAVAILABLE, "no_leader"),
                C::NoQuorum(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_quorum"),
                C::Stopped(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
                C::OutcomeUnknown { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
                C::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
                C::NotMember(_) => (StatusCode::NOT_FOUND, "not_found"),
                C::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
        }
    }
}

impl ApiError {
    /// A write answered with a `Response` its handler does not expect: a
    /// bug, reported rather than guessed at.
    pub fn unexpected(what: &str, answer: &crate::registry::Response) -> Self {
        ApiError::Cluster(ClusterError::Internal(format!(
            "a {what} write answered {answer:?}"
        )))
    }

    /// The JSON error body, as HTTP answers carry it (WebSocket peers get
    /// the same, with `status`).
    pub fn to_json(&self) -> serde_json::Value {
        let (_, code) = self.status_and_code();
        let mut body = serde_json::json!({ "error": code, "message": self.to_string() });
        if let ApiError::Ingest(
            IngestError::Full { accepted, .. } | IngestError::TimedOut { accepted, .. },
        ) = &self
        {
            // The events before the refused one are in the stream: the
            // producer resends from there.
            body["accepted"] = serde_json::json!(accepted);
        }
        body
    }

    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        }
        let body = self.to_json();
        let mut res = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

/// Maps axum's body-extraction failures (too large, unreadable) into ours.
impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: super::MAX_BODY_BYTES,
            }
        } else {
            ApiError::BadRequest(format!("could not read request body: {r}"))
        }
    }
}
