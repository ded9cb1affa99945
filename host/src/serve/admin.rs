//! The admin endpoints: reload the config file, reset an aggregation. The
//! work is the running instance's ([`Admin`], implemented where the
//! instance is wired together); these handlers only carry requests and
//! answers.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;

use super::openapi::{ReloadReport, ResetAnswer, ResetRequest};
use super::{ApiError, ApiState};

/// What the admin endpoints ask of the running instance. Both calls block
/// (they wait for the consumer to make the change between two batches).
pub trait Admin: Send + Sync {
    /// Re-reads the config file and applies what changed in its
    /// aggregations.
    fn reload(&self) -> Result<ReloadReport, AdminError>;
    /// Clears an aggregation's state and has it catch up from `to`
    /// (`earliest`, `latest` or an RFC 3339 time).
    fn reset(&self, aggregation: &str, to: &str) -> Result<ResetAnswer, AdminError>;
}

/// Why an admin request was not carried out; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The new config is invalid, or asks for a change a reload cannot make.
    #[error("{0}")]
    Refused(String),
    /// No such aggregation is running.
    #[error("{0}")]
    UnknownAggregation(String),
    /// Consumption has stopped, or the broker could not be asked.
    #[error("{0}")]
    Unavailable(String),
}

impl From<AdminError> for ApiError {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::Refused(message) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "refused", message)
            }
            AdminError::UnknownAggregation(message) => {
                ApiError::not_found("unknown_aggregation", message)
            }
            AdminError::Unavailable(message) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
        }
    }
}

/// Re-reads the config file: added aggregations start (catching up on the
/// records consumed so far), removed ones stop (their state is kept), a
/// new plugin build or new params take over from the next batch. An
/// invalid config changes nothing.
#[utoipa::path(post, path = "/v1/admin/reload", tag = "admin", responses(
    (status = 200, description = "Applied; what changed", body = ReloadReport),
    (status = 401, description = "Missing or wrong bearer token", body = super::openapi::ErrorBody),
    (status = 422, description = "Refused (the config's error); the running config stays", body = super::openapi::ErrorBody),
    (status = 503, description = "Consumption has stopped", body = super::openapi::ErrorBody),
))]
pub async fn reload(State(state): State<Arc<ApiState>>) -> Result<Json<ReloadReport>, ApiError> {
    let admin = admin(&state)?;
    let report = blocking(move || admin.reload()).await?;
    Ok(Json(report))
}

/// Clears one aggregation's state and has it rebuilt from `to` while the
/// others go on.
#[utoipa::path(post, path = "/v1/admin/reset", tag = "admin", request_body = ResetRequest, responses(
    (status = 200, description = "Reset; the aggregation is catching up", body = ResetAnswer),
    (status = 400, description = "Malformed body or `to`", body = super::openapi::ErrorBody),
    (status = 401, description = "Missing or wrong bearer token", body = super::openapi::ErrorBody),
    (status = 404, description = "No such aggregation", body = super::openapi::ErrorBody),
    (status = 422, description = "Refused", body = super::openapi::ErrorBody),
    (status = 503, description = "Consumption has stopped, or the broker could not be asked", body = super::openapi::ErrorBody),
))]
pub async fn reset(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<ResetRequest>, JsonRejection>,
) -> Result<Json<ResetAnswer>, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let admin = admin(&state)?;
    let answer = blocking(move || admin.reset(&request.aggregation, &request.to)).await?;
    Ok(Json(answer))
}

fn admin(state: &ApiState) -> Result<Arc<dyn Admin>, ApiError> {
    state
        .admin
        .clone()
        .ok_or_else(|| ApiError::not_found("no_route", "this server has no admin endpoints"))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AdminError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("admin task: {e}")))?
        .map_err(ApiError::from)
}
