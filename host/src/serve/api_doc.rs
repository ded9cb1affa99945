//! The OpenAPI 3 description of the HTTP API, generated from the handlers'
//! `#[utoipa::path]` attributes and the bodies in `openapi`; served at
//! `/openapi.json` and checked against the live server by schemathesis
//! (`tests/openapi.rs`).

use utoipa::OpenApi;

use super::openapi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "wagg",
        description = "Live per-key aggregates of Kafka topics, computed by WebAssembly plugins. Every error is JSON (`ErrorBody`). With `[http.auth]`, send `Authorization: Bearer <token>` (probes are always open)."
    ),
    paths(
        super::probes::healthz,
        super::probes::readyz,
        super::listings::list_aggregations,
        super::listings::list_keys,
        super::keys::get_key,
        super::windows::get_windows,
        super::watch::watch_key,
        super::watch::watch_changes,
        super::probes::metrics,
        super::admin::reload,
        super::admin::reset,
        openapi_json
    ),
    components(schemas(
        openapi::ErrorBody,
        openapi::ErrorDetail,
        openapi::Health,
        openapi::AggregationList,
        openapi::AggregationInfo,
        openapi::PluginInfo,
        openapi::KeyState,
        openapi::KeyWindows,
        openapi::WindowState,
        openapi::KeyPage,
        openapi::Encoding,
        openapi::ReloadReport,
        openapi::AggregationUpdate,
        openapi::ResetRequest,
        openapi::ResetAnswer,
        crate::ops::status::PartitionProgress,
        crate::ops::status::Readiness
    ))
)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json")))]
pub async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described() {
        let doc = ApiDoc::openapi();
        let paths: Vec<&str> = doc.paths.paths.keys().map(String::as_str).collect();
        for route in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
            "/v1/aggregations",
            "/v1/aggregations/{name}/keys",
            "/v1/aggregations/{name}/keys/{key}",
            "/v1/aggregations/{name}/keys/{key}/windows",
            "/v1/aggregations/{name}/keys/{key}/watch",
            "/v1/aggregations/{name}/changes",
            "/v1/admin/reload",
            "/v1/admin/reset",
        ] {
            assert!(paths.contains(&route), "{route} missing from {paths:?}");
        }
        let json = serde_json::to_value(&doc).expect("serializes");
        assert!(
            json["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3."))
        );
    }
}
