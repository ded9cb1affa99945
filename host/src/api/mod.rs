//! The HTTP query API (axum). Handlers read from RocksDB and the shared
//! [`Status`]; they never touch the consumer loop, so queries are answered
//! while consumption runs at full speed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{MatchedPath, Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub mod openapi;
pub mod routing;

use crate::cluster::membership::Owner;
use crate::config::{AggregationConfig, Forwarding};
use crate::metrics::{HttpLabel, Snapshot};
use crate::plugin::{LoadedPlugin, PluginInstance};
use crate::status::Status;
use crate::store::{Slot, StateStore};
use routing::Routing;

mod guard;

/// Everything the handlers need.
pub struct ApiState {
    pub store: Arc<StateStore>,
    pub status: Arc<Status>,
    pub aggregations: Vec<QueryableAggregation>,
    pub max_page: usize,
    /// Cluster mode: where keys live and how to reach them.
    pub routing: Option<routing::Routing>,
}

impl ApiState {
    /// The slots this instance serves: all of them on a single instance,
    /// the owned partitions' in a cluster (a partition that moved away may
    /// still have a stale copy here).
    fn served_slots(&self, aggregation: &str) -> Result<Vec<Slot>, ApiError> {
        let slots = self.store.slots(aggregation)?;
        if self.routing.is_none() {
            return Ok(slots);
        }
        let owned: Vec<Slot> = self
            .status
            .partitions()
            .into_iter()
            .filter(|p| p.assigned)
            .filter_map(|p| {
                Some(Slot {
                    topic_id: self.store.known_topic_id(&p.topic)?,
                    partition: p.partition as u32,
                })
            })
            .collect();
        Ok(slots.into_iter().filter(|s| owned.contains(s)).collect())
    }
}

/// An aggregation as the API sees it: its config, plugin, and a pool of
/// plugin instances used only for rendering states.
pub struct QueryableAggregation {
    pub config: AggregationConfig,
    pub plugin: LoadedPlugin,
    renderers: Mutex<Vec<PluginInstance>>,
}

impl QueryableAggregation {
    pub fn new(config: AggregationConfig, plugin: LoadedPlugin) -> Self {
        Self {
            config,
            plugin,
            renderers: Mutex::new(Vec::new()),
        }
    }

    /// Renders states with a pooled instance (created on demand).
    fn render_all(&self, states: &[Vec<u8>]) -> Result<Vec<Value>, ApiError> {
        let pooled = self
            .renderers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut instance = match pooled {
            Some(instance) => instance,
            None => self
                .plugin
                .instantiate(&self.config.params_json())
                .map_err(|e| ApiError::internal(format!("cannot instantiate the plugin: {e}")))?,
        };
        let mut rendered = Vec::with_capacity(states.len());
        for state in states {
            let json = instance
                .render(state)
                .map_err(|e| ApiError::internal(format!("rendering failed: {e}")))?;
            rendered.push(
                serde_json::from_str(&json).map_err(|e| {
                    ApiError::internal(format!("plugin rendered invalid JSON: {e}"))
                })?,
            );
        }
        self.renderers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(instance);
        Ok(rendered)
    }
}

/// A JSON error: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    fn unavailable(topic: String, partition: i32) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "partition_unavailable",
            format!(
                "partition {partition} of {topic:?} has no live owner right now (rebalancing, or its owner stopped); retry shortly"
            ),
        )
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request(format!("invalid path: {}", rejection.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(format!("invalid query string: {}", rejection.body_text()))
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            error.to_string(),
        )
    }
}

/// Longest key (after decoding) a request may name.
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest request body accepted (the API only has GETs).
const MAX_BODY_BYTES: usize = 16 * 1024;

/// Limits and authentication for the HTTP API, from `[http]`.
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    pub token: Option<String>,
    pub auth_scope: crate::config::AuthScope,
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
    pub max_uri_bytes: usize,
}

impl HttpPolicy {
    pub fn from_config(config: &crate::config::Config) -> anyhow::Result<Self> {
        let token = config.http_token().map_err(anyhow::Error::msg)?;
        Ok(Self::from_http(&config.http, token))
    }

    fn from_http(http: &crate::config::HttpConfig, token: Option<String>) -> Self {
        Self {
            token,
            auth_scope: http.auth.as_ref().map(|a| a.scope).unwrap_or_default(),
            max_concurrent_requests: http.max_concurrent_requests,
            request_timeout: Duration::from_millis(http.request_timeout_ms),
            max_uri_bytes: http.max_uri_bytes,
        }
    }
}

impl Default for HttpPolicy {
    /// `[http]`'s defaults, without auth.
    fn default() -> Self {
        Self::from_http(&crate::config::HttpConfig::default(), None)
    }
}

pub fn router(state: Arc<ApiState>, policy: &HttpPolicy) -> Router {
    let guard = Arc::new(guard::Guard::new(
        policy.token.as_deref(),
        policy.auth_scope,
        policy.max_uri_bytes,
    ));
    // Past the limit, requests are refused at once rather than queued:
    // a client retrying against a 503 beats a growing backlog.
    let shed_load = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in flight (`http.max_concurrent_requests`); retry shortly",
            )
        }))
        .load_shed()
        // Global: one semaphore for all routes, not one per route.
        .layer(GlobalConcurrencyLimitLayer::new(
            policy.max_concurrent_requests,
        ));
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/aggregations", get(list_aggregations))
        .route("/v1/aggregations/{name}/keys", get(list_keys))
        .route("/v1/aggregations/{name}/keys/{key}", get(get_key))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(|| async { ApiError::not_found("no_route", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "only GET is supported",
            )
        })
        .with_state(state.clone())
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(guard, guard::guard))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            policy.request_timeout,
        ))
        .layer(shed_load)
        .layer(axum::middleware::from_fn_with_state(state, count_request))
        .layer(TraceLayer::new_for_http())
}

/// Counts every request, shed and refused ones included, by route pattern
/// and status.
async fn count_request(
    State(state): State<Arc<ApiState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let label = HttpLabel {
        route,
        status: response.status().as_u16(),
    };
    let metrics = state.status.metrics();
    metrics
        .http_seconds
        .get_or_create(&label)
        .observe(started.elapsed().as_secs_f64());
    metrics.http_requests.get_or_create(&label).inc();
    response
}

/// The dashboard: one self-contained page (no external assets) that reads
/// the API like any client.
async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../../assets/dashboard.html"))
}

/// Prometheus scrape (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text"),
))]
async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    tokio::task::spawn_blocking(move || {
        let mut snapshot = Snapshot {
            partitions: state.status.partitions(),
            ready: state.status.readiness().ready,
            ..Snapshot::default()
        };
        for aggregation in &state.aggregations {
            let name = &aggregation.config.name;
            let keys = state.store.estimate_keys(name)?;
            snapshot
                .aggregations
                .push((name.clone(), state.status.counters(name), keys));
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
async fn healthz(State(state): State<Arc<ApiState>>) -> Response {
    match state.status.fatal() {
        None => Json(json!({ "status": "ok" })).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "failed", "reason": reason })),
        )
            .into_response(),
    }
}

/// Readiness: 503 with the reasons while the consumer is not running or
/// the broker was unreachable in the last 10 s.
#[utoipa::path(get, path = "/readyz", tag = "probes", responses(
    (status = 200, description = "Ready", body = crate::status::Readiness),
    (status = 503, description = "Not ready, with reasons", body = crate::status::Readiness),
))]
async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    let readiness = state.status.readiness();
    let code = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness)).into_response()
}

/// Every aggregation: plugin, counters, key estimate and partition progress.
#[utoipa::path(get, path = "/v1/aggregations", tag = "aggregations", responses(
    (status = 200, description = "The aggregations", body = openapi::AggregationList),
    (status = 500, description = "State store error", body = openapi::ErrorBody),
))]
async fn list_aggregations(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let mut partitions = state.status.partitions();
    if let Some(routing) = &state.routing {
        // Every source partition, with its owner (progress only for those
        // this instance owns or owned).
        let local: std::collections::BTreeMap<(String, i32), crate::status::PartitionProgress> =
            partitions
                .into_iter()
                .map(|p| ((p.topic.clone(), p.partition), p))
                .collect();
        partitions = routing
            .membership
            .ownership()
            .into_iter()
            .map(|(topic, partition, owner)| {
                let mut progress = local
                    .get(&(topic.clone(), partition))
                    .cloned()
                    .unwrap_or_else(|| crate::status::PartitionProgress {
                        topic,
                        partition,
                        ..Default::default()
                    });
                progress.owner = owner;
                progress.standby_offset = routing
                    .cluster
                    .standby_copy(&progress.topic, progress.partition)
                    .map(|copy| copy.next_offset.unwrap_or(0));
                progress
            })
            .collect();
    }
    let mut out = Vec::new();
    for aggregation in &state.aggregations {
        let config = &aggregation.config;
        let counters = state.status.counters(&config.name);
        let metadata = aggregation.plugin.metadata();
        let lag: Vec<&crate::status::PartitionProgress> = partitions
            .iter()
            .filter(|p| config.applies_to(&p.topic))
            .collect();
        out.push(json!({
            "name": config.name,
            "plugin": {
                "name": metadata.name,
                "version": metadata.version,
                "state_format": metadata.state_format,
                "sha256": aggregation.plugin.content_hash(),
            },
            "topic": config.topic,
            "key": config.key,
            "on_error": config.on_error,
            "keys_estimate": state.store.estimate_keys(&config.name)?,
            "records_applied": counters.records_applied,
            "records_failed": counters.records_failed,
            "records_dead_lettered": counters.records_dead_lettered,
            "partitions": lag,
        }));
    }
    let instance = state
        .routing
        .as_ref()
        .map(|routing| routing.membership.me().to_owned());
    Ok(Json(json!({ "aggregations": out, "instance": instance })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyQuery {
    encoding: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyEncoding {
    Utf8,
    Base64,
}

impl KeyEncoding {
    fn parse(value: Option<&str>) -> Result<Self, ApiError> {
        match value {
            None | Some("utf8") | Some("utf-8") => Ok(Self::Utf8),
            Some("base64") => Ok(Self::Base64),
            Some(other) => Err(ApiError::bad_request(format!(
                "unknown encoding {other:?}; use `utf8` (default) or `base64`"
            ))),
        }
    }

    fn decode(self, what: &str, text: &str) -> Result<Vec<u8>, ApiError> {
        let bytes = match self {
            Self::Utf8 => text.as_bytes().to_vec(),
            Self::Base64 => decode_base64(text)
                .ok_or_else(|| ApiError::bad_request(format!("{what} is not valid base64")))?,
        };
        if bytes.len() > MAX_KEY_BYTES {
            return Err(ApiError::bad_request(format!(
                "{what} is {} bytes, over the limit of {MAX_KEY_BYTES}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Keys that are not UTF-8 show lossily in `utf8` mode; binary keys
    /// need `encoding=base64` to round-trip (e.g. as paging cursors).
    fn encode(self, key: &[u8]) -> Value {
        match self {
            Self::Utf8 => Value::String(String::from_utf8_lossy(key).into_owned()),
            Self::Base64 => Value::String(base64::engine::general_purpose::STANDARD.encode(key)),
        }
    }
}

/// Accepts standard and URL-safe alphabets, with or without padding.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
}

fn find_aggregation<'a>(
    state: &'a ApiState,
    name: &str,
) -> Result<&'a QueryableAggregation, ApiError> {
    state
        .aggregations
        .iter()
        .find(|a| a.config.name == name)
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_aggregation",
                format!("no aggregation named {name:?}"),
            )
        })
}

/// Query values decode lossily (`%ff` becomes U+FFFD), which would make a
/// binary cursor silently point somewhere else: refuse them instead.
fn check_query_utf8(raw: Option<&str>) -> Result<(), ApiError> {
    for part in raw.unwrap_or_default().split('&') {
        if percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .is_err()
        {
            return Err(ApiError::bad_request(
                "the query string is not UTF-8 once percent-decoded; pass binary keys with `encoding=base64`",
            ));
        }
    }
    Ok(())
}

/// One key's state.
#[utoipa::path(get, path = "/v1/aggregations/{name}/keys/{key}", tag = "aggregations",
    params(
        ("name" = String, Path, description = "Aggregation name"),
        ("key" = String, Path, description = "The key (percent-encoded UTF-8, or base64 with `encoding=base64`)"),
        ("encoding" = Option<openapi::Encoding>, Query, description = "`utf8` (default) or `base64`"),
    ),
    responses(
        (status = 200, description = "The key's state", body = openapi::KeyState, headers(
            ("x-wagg-served-by" = String, description = "Cluster: the owner that answered a proxied lookup"),
            ("x-wagg-standby" = String, description = "Cluster: the instance whose standby copy answered (the owner did not)"),
            ("x-wagg-staleness-ms" = i64, description = "Cluster, with x-wagg-standby: how long ago the owner wrote the commit the copy is at"),
        )),
        (status = 307, description = "Cluster with `forward = \"redirect\"`: the instance that owns the key (`Location`)"),
        (status = 400, description = "Bad key or query", body = openapi::ErrorBody),
        (status = 404, description = "No such aggregation or key", body = openapi::ErrorBody),
        (status = 502, description = "Cluster: the owning instance could not be reached", body = openapi::ErrorBody),
        (status = 503, description = "Cluster: the key's partition has no live owner right now", body = openapi::ErrorBody),
    ))]
#[allow(clippy::too_many_arguments)]
async fn get_key(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    uri: Uri,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path((name, key_text)) = path?;
    check_query_utf8(raw_query.as_deref())?;
    let Query(query) = query?;
    let encoding = KeyEncoding::parse(query.encoding.as_deref())?;
    let key = encoding.decode("key", &key_text)?;
    let not_found = || {
        ApiError::not_found(
            "unknown_key",
            format!("aggregation {name:?} has no key {key_text:?}"),
        )
    };
    let Some(routing) = &state.routing else {
        let found = lookup(state.clone(), name.clone(), None, key, encoding).await?;
        return found.map(IntoResponse::into_response).ok_or_else(not_found);
    };
    let aggregation = find_aggregation(&state, &name)?;
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let forwarded = Routing::is_forwarded(&headers);
    let topics: Vec<String> = match &aggregation.config.topic {
        Some(topic) => vec![topic.clone()],
        None => routing.membership.topics().map(str::to_owned).collect(),
    };
    // A multi-topic aggregation's key may live in each topic's partition:
    // a redirect could bounce between their owners, so those are proxied.
    let redirect = routing.cluster.config.forward == Forwarding::Redirect && topics.len() == 1;
    let mut unavailable = None;
    for topic in &topics {
        let Some(partition) = routing.membership.partition_of(topic, &key) else {
            continue;
        };
        // If the owner does not answer, a standby copy may.
        let standby = StandbyLookup {
            topic,
            partition,
            forwarded,
            path_and_query,
            headers: &headers,
        };
        match routing.membership.owner(topic, partition) {
            Owner::Local => {
                let Some(slot) = partition_slot(&state, topic, partition) else {
                    continue;
                };
                let found = lookup(
                    state.clone(),
                    name.clone(),
                    Some(slot),
                    key.clone(),
                    encoding,
                );
                if let Some(found) = found.await? {
                    return Ok(found.into_response());
                }
            }
            Owner::Remote(owner) if !forwarded => {
                if redirect {
                    return Ok(Routing::redirect(&owner, path_and_query));
                }
                match routing.proxy(&owner, path_and_query, &headers).await {
                    Ok((StatusCode::NOT_FOUND, _)) => {}
                    Ok((_, response)) => return Ok(response),
                    Err(unreachable) => {
                        match from_standby(&state, &name, &key, encoding, standby).await? {
                            FromStandby::Answered(response) => return Ok(response),
                            FromStandby::Absent => {}
                            FromStandby::NoCopy => return Err(unreachable),
                        }
                    }
                }
            }
            Owner::Remote(_) | Owner::Unknown => {
                match from_standby(&state, &name, &key, encoding, standby).await? {
                    FromStandby::Answered(response) => return Ok(response),
                    FromStandby::Absent => {}
                    FromStandby::NoCopy => unavailable = Some((topic.clone(), partition)),
                }
            }
        }
    }
    match unavailable {
        Some((topic, partition)) => Err(ApiError::unavailable(topic, partition)),
        None => Err(not_found()),
    }
}

/// The store slot of a source partition (`None`: a topic this store has
/// never seen).
fn partition_slot(state: &ApiState, topic: &str, partition: i32) -> Option<Slot> {
    state.store.known_topic_id(topic).map(|topic_id| Slot {
        topic_id,
        partition: partition as u32,
    })
}

/// A lookup whose partition's owner is not answering.
struct StandbyLookup<'a> {
    topic: &'a str,
    partition: i32,
    forwarded: bool,
    path_and_query: &'a str,
    headers: &'a HeaderMap,
}

enum FromStandby {
    Answered(Response),
    /// A standby copy has no such key.
    Absent,
    /// No standby copy could answer.
    NoCopy,
}

/// Answers a lookup from this instance's standby copy of the partition, or
/// (unless the request was forwarded) from another live instance's. The
/// answer names the copy's instance and how old its commit is.
async fn from_standby(
    state: &Arc<ApiState>,
    name: &str,
    key: &[u8],
    encoding: KeyEncoding,
    lookup_of: StandbyLookup<'_>,
) -> Result<FromStandby, ApiError> {
    let Some(routing) = &state.routing else {
        return Ok(FromStandby::NoCopy);
    };
    let StandbyLookup {
        topic,
        partition,
        forwarded,
        path_and_query,
        headers,
    } = lookup_of;
    if let Some(copy) = routing.cluster.standby_copy(topic, partition)
        && let Some(slot) = partition_slot(state, topic, partition)
    {
        let found = lookup(
            state.clone(),
            name.to_owned(),
            Some(slot),
            key.to_vec(),
            encoding,
        );
        let found = found.await?;
        state.status.metrics().standby_lookups.inc();
        let Some(found) = found else {
            return Ok(FromStandby::Absent);
        };
        let mut response = found.into_response();
        let staleness = if copy.at_ms > 0 {
            (crate::status::now_millis() - copy.at_ms).max(0)
        } else {
            0
        };
        for (header, value) in [
            (routing::STANDBY_HEADER, routing.membership.me().to_owned()),
            (routing::STALENESS_HEADER, staleness.to_string()),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(header, value);
            }
        }
        return Ok(FromStandby::Answered(response));
    }
    if forwarded {
        return Ok(FromStandby::NoCopy);
    }
    for standby in routing.membership.standbys_of(topic, partition) {
        match routing.proxy(&standby, path_and_query, headers).await {
            Ok((StatusCode::OK, response)) => return Ok(FromStandby::Answered(response)),
            Ok((StatusCode::NOT_FOUND, _)) => return Ok(FromStandby::Absent),
            Ok(_) | Err(_) => {}
        }
    }
    Ok(FromStandby::NoCopy)
}

/// A key's rendered state from this instance's store: in `slot`, or in
/// whichever slot has it.
async fn lookup(
    state: Arc<ApiState>,
    name: String,
    slot: Option<Slot>,
    key: Vec<u8>,
    encoding: KeyEncoding,
) -> Result<Option<Json<Value>>, ApiError> {
    tokio::task::spawn_blocking(move || {
        let aggregation = find_aggregation(&state, &name)?;
        let stored = match slot {
            Some(slot) => state.store.get(&name, slot, &key)?,
            None => state.store.find(&name, &key)?,
        };
        let Some(stored) = stored else {
            return Ok(None);
        };
        let rendered = aggregation
            .render_all(&[stored])?
            .pop()
            .unwrap_or(Value::Null);
        Ok(Some(Json(
            json!({ "key": encoding.encode(&key), "state": rendered }),
        )))
    })
    .await
    .map_err(|e| ApiError::internal(format!("query task failed: {e}")))?
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
    encoding: Option<String>,
}

const DEFAULT_PAGE: usize = 100;

/// Keys and states of an aggregation in byte order, a page at a time.
#[utoipa::path(get, path = "/v1/aggregations/{name}/keys", tag = "aggregations",
    params(
        ("name" = String, Path, description = "Aggregation name"),
        ("prefix" = Option<String>, Query, description = "Only keys starting with this"),
        ("after" = Option<String>, Query, description = "Keys after this one (the previous page's `next`)"),
        ("limit" = Option<usize>, Query, minimum = 1, description = "Page size (capped by `http.max_page`; default 100)"),
        ("encoding" = Option<openapi::Encoding>, Query, description = "`utf8` (default) or `base64`, for keys in and out"),
    ),
    responses(
        (status = 200, description = "A page of keys", body = openapi::KeyPage),
        (status = 400, description = "Bad query", body = openapi::ErrorBody),
        (status = 404, description = "No such aggregation", body = openapi::ErrorBody),
        (status = 502, description = "Cluster: another instance could not be reached", body = openapi::ErrorBody),
        (status = 503, description = "Cluster: a partition has no live owner right now", body = openapi::ErrorBody),
    ))]
async fn list_keys(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(name) = path?;
    check_query_utf8(raw_query.as_deref())?;
    let Query(query) = query?;
    let encoding = KeyEncoding::parse(query.encoding.as_deref())?;
    let prefix = encoding.decode("prefix", query.prefix.as_deref().unwrap_or_default())?;
    let after = query
        .after
        .as_deref()
        .map(|a| encoding.decode("after", a))
        .transpose()?;
    let limit = match query.limit {
        Some(0) => return Err(ApiError::bad_request("limit must be at least 1")),
        Some(limit) => limit.min(state.max_page),
        None => DEFAULT_PAGE.min(state.max_page),
    };
    let aggregation = find_aggregation(&state, &name)?;
    let mut items = {
        let state = state.clone();
        let name = name.clone();
        tokio::task::spawn_blocking(move || {
            let aggregation = find_aggregation(&state, &name)?;
            let slots = state.served_slots(&name)?;
            let entries =
                state
                    .store
                    .list_in_slots(&name, &slots, &prefix, after.as_deref(), limit)?;
            let states: Vec<Vec<u8>> = entries.iter().map(|(_, s)| s.clone()).collect();
            let rendered = aggregation.render_all(&states)?;
            Ok::<_, ApiError>(
                entries
                    .into_iter()
                    .zip(rendered)
                    .map(|((key, _), state)| (key, state))
                    .collect::<Vec<(Vec<u8>, Value)>>(),
            )
        })
        .await
        .map_err(|e| ApiError::internal(format!("query task failed: {e}")))??
    };
    if let Some(routing) = &state.routing
        && !Routing::is_forwarded(&headers)
    {
        // Every partition must have a live owner, or the page would
        // silently miss its keys.
        let topics: Vec<String> = routing
            .membership
            .topics()
            .filter(|t| aggregation.config.applies_to(t))
            .map(str::to_owned)
            .collect();
        if let Some((topic, partition, _)) = routing
            .membership
            .ownership()
            .into_iter()
            .find(|(t, _, owner)| owner.is_none() && topics.contains(t))
        {
            return Err(ApiError::unavailable(topic, partition));
        }
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        for instance in routing.membership.others() {
            let page = routing
                .get_json(&instance, path_and_query, &headers)
                .await?;
            for item in page["items"].as_array().into_iter().flatten() {
                let key = item["key"].as_str().and_then(|k| match encoding {
                    KeyEncoding::Utf8 => Some(k.as_bytes().to_vec()),
                    KeyEncoding::Base64 => decode_base64(k),
                });
                if let Some(key) = key {
                    items.push((key, item["state"].clone()));
                }
            }
        }
        // Each instance's page holds its first `limit` keys, so the first
        // `limit` of their union are the cluster's.
        items.sort_by(|a, b| a.0.cmp(&b.0));
        items.dedup_by(|a, b| a.0 == b.0);
        items.truncate(limit);
    }
    let next = (items.len() == limit)
        .then(|| items.last().map(|(k, _)| encoding.encode(k)))
        .flatten();
    let items: Vec<Value> = items
        .into_iter()
        .map(|(key, state)| json!({ "key": encoding.encode(&key), "state": state }))
        .collect();
    Ok(Json(json!({ "items": items, "next": next })))
}
