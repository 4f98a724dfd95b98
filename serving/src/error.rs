//! Every error leaves as JSON: what went wrong, a machine-readable reason
//! and, for bad input, the field at fault.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use segment_core::store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// For programs: `InvalidArgument`, `NotFound`, `Unauthorized`,
    /// `Forbidden`, `WrongShard`, `StoreUnavailable` or `StoreError`.
    pub reason: String,
    /// The request field at fault, for bad input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, reason: &str, error: impl Into<String>, field: Option<&str>) -> ApiError {
        ApiError { status, body: ErrorBody { error: error.into(), reason: reason.into(), field: field.map(str::to_string) } }
    }

    pub fn invalid(field: &str, error: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "InvalidArgument", error, Some(field))
    }

    /// A request body over `limit` bytes, refused before it is read whole.
    pub fn too_large(limit: usize) -> ApiError {
        let error = format!("body: at most {limit} bytes");
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", error, Some("body"))
    }

    pub fn not_found(field: Option<&str>, error: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NotFound", error, field)
    }

    pub fn unauthorized(error: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", error, None)
    }

    pub fn forbidden(field: &str, namespace: &str) -> ApiError {
        let error = format!("this token may not read namespace {namespace:?}");
        ApiError::new(StatusCode::FORBIDDEN, "Forbidden", error, Some(field))
    }

    /// The user is held by another shard's replicas: the caller routed
    /// wrong (docs/serving.md, "Shards"). Names the shards, not the user.
    pub fn wrong_shard(field: &str, user_shard: u32, served: crate::Shard) -> ApiError {
        let error = format!(
            "{field}: the user is in shard {user_shard} of {count}, this replica serves shard {served}; route by FNV-1a 64 of the user id modulo {count}",
            count = served.count
        );
        ApiError::new(StatusCode::MISDIRECTED_REQUEST, "WrongShard", error, Some(field))
    }

    pub fn store(e: &StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "StoreUnavailable", e.to_string(), None),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "StoreError", e.to_string(), None),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}
