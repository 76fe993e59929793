//! `GET /v1/watch`: the native Server-Sent Events change stream (being
//! written; see issue 4).

use axum::response::Response;

use super::error::ApiError;

pub async fn stream() -> Result<Response, ApiError> {
    Err(ApiError::NotFound(
        "the watch stream is not built yet".into(),
    ))
}
