//! Probes and scrapes: `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::guard::SeesDetails;
use super::{ApiState, openapi};
use crate::ops::snapshot::Snapshot;

/// Prometheus scrape (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text"),
))]
pub async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    tokio::task::spawn_blocking(move || {
        let mut snapshot = Snapshot {
            partitions: state.status.partitions(),
            catch_up_lag: state.status.catch_up_lags(),
            ready: state.status.readiness().ready,
            ..Snapshot::default()
        };
        for aggregation in state.aggregations.all() {
            let name = &aggregation.config.name;
            let keys = state.store.count_keys(name)?;
            snapshot
                .aggregations
                .push((name.clone(), state.status.counters(name), keys));
            if let Some(migration) = state
                .store
                .aggregation_meta(name)?
                .and_then(|meta| meta.migration)
            {
                snapshot
                    .migrated_keys
                    .insert(name.clone(), migration.keys_migrated);
            }
        }
        snapshot.store_bytes = state.store.size_bytes()?;
        let text = state
            .status
            .metrics()
            .render(snapshot)
            .map_err(|e| ApiError::internal(format!("encoding metrics: {e}")))?;
        Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response())
    })
    .await
    .map_err(|e| ApiError::internal(format!("metrics task failed: {e}")))?
}

/// Liveness: 503 once consumption has stopped for good (a storage fault,
/// a record rejected under `on_error = "fail"`), so a supervisor restarts
/// the process; until then queries are still served from the state.
#[utoipa::path(get, path = "/healthz", tag = "probes", responses(
    (status = 200, description = "Consuming (or able to)", body = openapi::Health),
    (status = 503, description = "Consumption stopped for good", body = openapi::Health),
))]
pub async fn healthz(
    State(state): State<Arc<ApiState>>,
    details: Option<Extension<SeesDetails>>,
) -> Response {
    let fatal = state.status.fatal().map(|reason| {
        if sees_details(details) {
            reason
        } else {
            HIDDEN.to_owned()
        }
    });
    match fatal {
        None => Json(openapi::Health {
            status: "ok".into(),
            reason: None,
        })
        .into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(openapi::Health {
                status: "failed".into(),
                reason: Some(reason),
            }),
        )
            .into_response(),
    }
}

/// Readiness: 503 with the reasons while the consumer is not running or
/// the broker was unreachable in the last 10 s.
#[utoipa::path(get, path = "/readyz", tag = "probes", responses(
    (status = 200, description = "Ready", body = crate::ops::status::Readiness),
    (status = 503, description = "Not ready, with reasons", body = crate::ops::status::Readiness),
))]
pub async fn readyz(
    State(state): State<Arc<ApiState>>,
    details: Option<Extension<SeesDetails>>,
) -> Response {
    let mut readiness = state.status.readiness();
    if !sees_details(details) && !readiness.reasons.is_empty() {
        readiness.reasons = vec![HIDDEN.to_owned()];
    }
    let code = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness)).into_response()
}

/// What a caller without the token reads instead of the reasons.
const HIDDEN: &str = "details need the bearer token (`[http.auth]`)";

/// Without the guard in front (the router always has it) nothing is known
/// about the caller: no details.
fn sees_details(details: Option<Extension<SeesDetails>>) -> bool {
    details.is_some_and(|Extension(SeesDetails(sees))| sees)
}
