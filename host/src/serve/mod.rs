//! The HTTP query API (axum). Handlers read from RocksDB and the shared
//! [`Status`]; they never touch the consumer loop, so queries are answered
//! while consumption runs at full speed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{MatchedPath, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::Value;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub mod admin;
mod api_doc;
mod encoding;
mod error;
mod guard;
mod keys;
mod listings;
pub mod openapi;
mod probes;
pub mod routing;
mod server;
mod watch;
mod windows;

use crate::cluster::secret::ClusterSecret;
use crate::config::{AggregationConfig, AuthScope, HttpConfig};
use crate::ops::metrics::HttpLabel;
use crate::ops::status::Status;
use crate::plugin::{LoadedPlugin, PluginInstance};
use crate::state::feed::ChangeFeed;
use crate::state::store::{Slot, StateStore};

/// Everything the handlers need.
pub struct ApiState {
    pub store: Arc<StateStore>,
    pub status: Arc<Status>,
    pub aggregations: Arc<Aggregations>,
    pub max_page: usize,
    /// `http.max_response_bytes`.
    pub max_response_bytes: usize,
    /// Cluster mode: where keys live and how to reach them.
    pub routing: Option<routing::Routing>,
    /// Reload and reset (none: the admin endpoints answer 404).
    pub admin: Option<Arc<dyn admin::Admin>>,
    /// Written changes, for live subscriptions.
    pub feed: Arc<ChangeFeed>,
}

/// The aggregations served; a reload replaces them.
#[derive(Default)]
pub struct Aggregations(RwLock<Vec<Arc<QueryableAggregation>>>);

impl From<Vec<QueryableAggregation>> for Aggregations {
    fn from(aggregations: Vec<QueryableAggregation>) -> Self {
        Self(RwLock::new(
            aggregations.into_iter().map(Arc::new).collect(),
        ))
    }
}

impl Aggregations {
    /// The aggregations served now.
    pub fn all(&self) -> Vec<Arc<QueryableAggregation>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<QueryableAggregation>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|a| a.config.name == name)
            .cloned()
    }

    /// Serves `aggregations` from now on.
    pub fn replace(&self, aggregations: Vec<Arc<QueryableAggregation>>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = aggregations;
    }
}

impl ApiState {
    /// The aggregation called `name`, or a 404.
    fn aggregation(&self, name: &str) -> Result<Arc<QueryableAggregation>, ApiError> {
        self.aggregations.get(name).ok_or_else(|| {
            ApiError::not_found(
                "unknown_aggregation",
                format!("no aggregation named {name:?}"),
            )
        })
    }

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

/// Set when dropped: a handler's blocking work checks it, so that work for
/// a request answered 408 (its future dropped by the timeout layer) stops
/// instead of running to the end.
struct CancelOnDrop(Arc<AtomicBool>);

impl CancelOnDrop {
    fn new() -> Self {
        Self(Arc::new(AtomicBool::new(false)))
    }

    fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The JSON size of a key's entry in an answer (its key and state).
fn entry_bytes(key: &[u8], state: &Value) -> usize {
    key.len() + serde_json::to_string(state).map_or(0, |s| s.len()) + 24
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

    /// Renders states with a pooled instance (created on demand); stops
    /// early once the request is `cancelled` (its client timed out). A
    /// state with an old format (its aggregation is migrating and has not
    /// reached it) is migrated first, in memory: queries see every key in
    /// the new format, whether the migration wrote it yet or not.
    fn render_all(
        &self,
        states: &[(Vec<u8>, Option<u32>)],
        cancelled: &AtomicBool,
        metrics: &crate::ops::metrics::Metrics,
    ) -> Result<Vec<Value>, ApiError> {
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
        // (A plugin of the old format itself, still served for an instant
        // while a reload swaps it, reads the old states as they are.)
        let native = self.plugin.metadata().state_format;
        for (state, old_format) in states {
            if cancelled.load(Ordering::Relaxed) {
                break;
            }
            metrics.states_rendered.inc();
            let migrated = match old_format.filter(|&format| format != native) {
                Some(format) => Some(instance.migrate(format, state).map_err(|e| {
                    ApiError::internal(format!(
                        "migrating the state from format {format} failed: {e}"
                    ))
                })?),
                None => None,
            };
            let json = instance
                .render(migrated.as_deref().unwrap_or(state))
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

pub use encoding::MAX_KEY_BYTES;
pub use error::ApiError;
pub use server::{ConnectionLimits, serve};
/// Largest request body accepted (the only bodies are admin requests).
const MAX_BODY_BYTES: usize = 16 * 1024;

/// How long an admin request may take: a reload compiles new plugins,
/// which can take longer than a query's `http.request_timeout_ms`.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Limits and authentication for the HTTP API, from `[http]`.
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    pub token: Option<String>,
    /// Cluster mode: accepts requests other instances forward, signed with
    /// the cluster's secret, in place of a token.
    pub cluster_secret: Option<Arc<ClusterSecret>>,
    pub auth_scope: AuthScope,
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
    pub max_uri_bytes: usize,
}

impl HttpPolicy {
    /// `[http]`'s limits, with the bearer token `[http.auth]` resolves to.
    pub fn new(http: &HttpConfig, token: Option<String>) -> Self {
        Self {
            token,
            cluster_secret: None,
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
        Self::new(&HttpConfig::default(), None)
    }
}

pub fn router(state: Arc<ApiState>, policy: &HttpPolicy) -> Router {
    let guard = Arc::new(guard::Guard::new(
        policy.token.as_deref(),
        policy.auth_scope,
        policy.max_uri_bytes,
        policy.cluster_secret.clone(),
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
    let admin = Router::new()
        .route("/v1/admin/reload", post(admin::reload))
        .route("/v1/admin/reset", post(admin::reset))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            ADMIN_TIMEOUT,
        ));
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/v1/aggregations", get(listings::list_aggregations))
        .route("/v1/aggregations/{name}/keys", get(listings::list_keys))
        .route("/v1/aggregations/{name}/keys/{key}", get(keys::get_key))
        .route(
            "/v1/aggregations/{name}/keys/{key}/windows",
            get(windows::get_windows),
        )
        .route(
            "/v1/aggregations/{name}/keys/{key}/watch",
            get(watch::watch_key),
        )
        .route("/v1/aggregations/{name}/changes", get(watch::watch_changes))
        .route("/metrics", get(probes::metrics))
        .route("/openapi.json", get(api_doc::openapi_json))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            policy.request_timeout,
        ))
        .merge(admin)
        .fallback(|| async { ApiError::not_found("no_route", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method (queries are GET, admin requests POST)",
            )
        })
        .with_state(state.clone())
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(guard, guard::guard))
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
