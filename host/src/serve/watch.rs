//! Live subscriptions as server-sent events: one key's changes
//! (`/keys/{key}/watch`) or every changed key under a prefix (`/changes`),
//! fed by the state layer's [`ChangeFeed`](crate::state::feed::ChangeFeed)
//! once each flush is written.
//!
//! A stream holds no request slot (the concurrency limit covers the
//! handshake), only a subscription (`http.max_watchers`) and its buffer
//! (`http.watch_buffer` flushes' changes). It ends when its subscriber lagged
//! (`event: lagged`), when the key's partition moved to another instance
//! (`event: moved`), when a reload removed its aggregation (`event:
//! removed`), on shutdown, or when the client goes away.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::encoding::{KeyEncoding, check_query_utf8};
use super::error::ApiError;
use super::keys::{self, KeyQuery, KeyRequest};
use super::openapi::{self, KeyState, KeyWindows, WindowState};
use super::routing::Routing;
use super::{ApiState, windows};
use crate::cluster::membership::Owner;
use crate::state::feed::{Change, Interest, Subscription, WatchError};
use crate::state::store::split_window_key;

/// A comment line this often keeps proxies from closing a quiet stream.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How often a stream checks that its aggregation is still served and
/// (cluster mode, a key's watch) that this instance still owns the key's
/// partition.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Changes rendered in one blocking task.
const RENDER_BATCH: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChangesQuery {
    prefix: Option<String>,
    encoding: Option<String>,
}

/// The data of `event: delete` and `event: absent`.
#[derive(Debug, Serialize)]
struct KeyOnly {
    key: String,
    /// Windowed: the deleted window (expired, or a session merged into
    /// another).
    #[serde(skip_serializing_if = "Option::is_none")]
    window: Option<WindowBounds>,
}

#[derive(Debug, Serialize)]
struct WindowBounds {
    start: i64,
    end: i64,
}

/// One key's changes, live.
#[utoipa::path(get, path = "/v1/aggregations/{name}/keys/{key}/watch", tag = "aggregations",
    params(
        ("name" = String, Path, description = "Aggregation name"),
        ("key" = String, Path, description = "The key (percent-encoded UTF-8, or base64 with `encoding=base64`)"),
        ("encoding" = Option<openapi::Encoding>, Query, description = "`utf8` (default) or `base64`"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: first the key's state as a lookup answers it (or `event: absent`), then one event per written flush that changed the key (`id:` the flush, `data:` the lookup's body; windowed: the changed window), `event: delete` when it is deleted, `: heartbeat` every 15 s; ends with `event: lagged` (the client fell behind), `event: moved` (cluster: the key's partition moved), `event: removed` (a reload removed the aggregation), or on shutdown", content_type = "text/event-stream", body = String),
        (status = 307, description = "Cluster: another instance owns the key (`Location`: the same watch there)"),
        (status = 400, description = "Bad key or query", body = openapi::ErrorBody),
        (status = 404, description = "No such aggregation", body = openapi::ErrorBody),
        (status = 503, description = "`http.max_watchers` subscriptions are open, shutting down, or (cluster) the key's partition has no live owner", body = openapi::ErrorBody),
    ))]
pub async fn watch_key(
    State(state): State<Arc<ApiState>>,
    uri: Uri,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let KeyRequest {
        name,
        key,
        encoding,
        ..
    } = KeyRequest::parse(path, raw_query, query)?;
    let aggregation = state.aggregation(&name)?;
    let owned = match &state.routing {
        None => None,
        Some(routing) => {
            let partitions = key_partitions(routing, &aggregation.config, &key);
            match owner_of(routing, &partitions) {
                KeyOwner::Local => Some(partitions),
                KeyOwner::Remote(owner) => {
                    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
                    return Ok(Routing::redirect(&owner, path_and_query));
                }
                KeyOwner::Unknown((topic, partition)) => {
                    return Err(ApiError::unavailable(topic, partition));
                }
            }
        }
    };
    let subscription = subscribe(&state, &name, Interest::Key(key.clone()))?;
    let first = current_state(&state, &name, &key, encoding).await?;
    Ok(Watch::new(state, name, encoding, subscription, owned)
        .starting_with(first)
        .sse())
}

/// Every changed key under a prefix, live.
#[utoipa::path(get, path = "/v1/aggregations/{name}/changes", tag = "aggregations",
    params(
        ("name" = String, Path, description = "Aggregation name"),
        ("prefix" = Option<String>, Query, description = "Only keys starting with this"),
        ("encoding" = Option<openapi::Encoding>, Query, description = "`utf8` (default) or `base64`, for the prefix and the keys sent"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: one event per key per written flush that changed it (`id:` the flush, `data:` the key lookup's body; windowed: the changed window), `event: delete` for a deleted key, `: heartbeat` every 15 s; ends with `event: lagged`, `event: removed` or on shutdown. Cluster: this instance's partitions only", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad query", body = openapi::ErrorBody),
        (status = 404, description = "No such aggregation", body = openapi::ErrorBody),
        (status = 503, description = "`http.max_watchers` subscriptions are open, or shutting down", body = openapi::ErrorBody),
    ))]
pub async fn watch_changes(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    check_query_utf8(raw_query.as_deref())?;
    let Query(query) = query?;
    let encoding = KeyEncoding::parse(query.encoding.as_deref())?;
    let prefix = encoding.decode("prefix", query.prefix.as_deref().unwrap_or_default())?;
    state.aggregation(&name)?;
    let subscription = subscribe(&state, &name, Interest::Prefix(prefix))?;
    Ok(Watch::new(state, name, encoding, subscription, None).sse())
}

fn subscribe(state: &ApiState, name: &str, interest: Interest) -> Result<Subscription, ApiError> {
    state
        .feed
        .subscribe(name, interest)
        .map_err(|error| match error {
            WatchError::TooMany(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_watchers",
                error.to_string(),
            ),
            WatchError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                error.to_string(),
            ),
        })
}

/// The first event of a key's watch: its state as a lookup answers it, or
/// `event: absent`.
async fn current_state(
    state: &Arc<ApiState>,
    name: &str,
    key: &[u8],
    encoding: KeyEncoding,
) -> Result<Event, ApiError> {
    let windowed = state.aggregation(name)?.config.window.is_some();
    let found = if windowed {
        windows::key_windows(
            state.clone(),
            name.to_owned(),
            None,
            key.to_vec(),
            encoding,
            Default::default(),
        )
        .await?
        .map(|windows| Event::default().json_data(windows))
    } else {
        keys::lookup_state(state.clone(), name.to_owned(), None, key.to_vec(), encoding)
            .await?
            .map(|found| Event::default().json_data(found.0))
    };
    let event = match found {
        Some(event) => event,
        None => Event::default().event("absent").json_data(KeyOnly {
            key: encoding.encode(key),
            window: None,
        }),
    };
    event.map_err(|e| ApiError::internal(format!("encoding an event: {e}")))
}

/// The topic partitions a key of `aggregation` lives in (cluster mode).
fn key_partitions(
    routing: &Routing,
    aggregation: &crate::config::AggregationConfig,
    key: &[u8],
) -> Vec<(String, i32)> {
    routing
        .topics_of(aggregation)
        .into_iter()
        .filter_map(|topic| {
            let partition = routing.membership.partition_of(&topic, key)?;
            Some((topic, partition))
        })
        .collect()
}

enum KeyOwner {
    /// This instance owns (at least one of) the key's partitions.
    Local,
    Remote(String),
    /// A partition of the key without a live owner.
    Unknown((String, i32)),
}

/// Who serves a watch of a key living in `partitions`. A key of a
/// multi-topic aggregation whose partitions have different owners is
/// watched where one of them is local (each owner sees its topics'
/// changes).
fn owner_of(routing: &Routing, partitions: &[(String, i32)]) -> KeyOwner {
    let mut remote = None;
    for (topic, partition) in partitions {
        match routing.membership.owner(topic, *partition) {
            Owner::Local => return KeyOwner::Local,
            Owner::Remote(owner) => remote = remote.or(Some(KeyOwner::Remote(owner))),
            Owner::Unknown => {
                remote = remote.or(Some(KeyOwner::Unknown((topic.clone(), *partition))));
            }
        }
    }
    remote.unwrap_or(KeyOwner::Local)
}

/// A live subscription's stream of events.
struct Watch {
    state: Arc<ApiState>,
    name: String,
    encoding: KeyEncoding,
    subscription: Subscription,
    /// Received changes not rendered yet.
    queued: VecDeque<Arc<Change>>,
    /// Events ready to send, with when their flush was written (for the
    /// delivery-latency histogram).
    pending: VecDeque<(Event, Option<Instant>)>,
    /// Cluster mode, a key's watch: the key's partitions, which this
    /// instance must keep owning.
    owned: Option<Vec<(String, i32)>>,
    ended: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.state.status.metrics().watchers.dec();
    }
}

impl Watch {
    fn new(
        state: Arc<ApiState>,
        name: String,
        encoding: KeyEncoding,
        subscription: Subscription,
        owned: Option<Vec<(String, i32)>>,
    ) -> Self {
        state.status.metrics().watchers.inc();
        Self {
            state,
            name,
            encoding,
            subscription,
            queued: VecDeque::new(),
            pending: VecDeque::new(),
            owned,
            ended: false,
        }
    }

    /// Sends `first` before any change.
    fn starting_with(mut self, first: Event) -> Self {
        self.pending.push_front((first, None));
        self
    }

    /// The streamed response.
    fn sse(self) -> Response {
        let events = futures_util::stream::unfold(self, |mut watch| async move {
            let event = watch.next_event().await?;
            Some((Ok::<_, Infallible>(event), watch))
        });
        let mut response = Sse::new(events)
            .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat"))
            .into_response();
        // Reverse proxies (nginx) buffer responses unless told otherwise.
        response.headers_mut().insert(
            "x-accel-buffering",
            axum::http::HeaderValue::from_static("no"),
        );
        response
    }

    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some((event, written_at)) = self.pending.pop_front() {
                if let Some(written_at) = written_at {
                    let delivery = &self.state.status.metrics().watch_delivery_seconds;
                    delivery.observe(written_at.elapsed().as_secs_f64());
                }
                return Some(event);
            }
            if !self.queued.is_empty() {
                let changes: Vec<Arc<Change>> = self
                    .queued
                    .drain(..self.queued.len().min(RENDER_BATCH))
                    .collect();
                match self.render(changes).await {
                    Ok(events) => self.pending.extend(events),
                    Err(error) => {
                        tracing::warn!(aggregation = %self.name, %error, "a watched change could not be rendered");
                        let event = message_event("error", &error.to_string());
                        self.pending.push_back((event, None));
                    }
                }
                continue;
            }
            if self.ended {
                return None;
            }
            let flush = tokio::select! {
                changes = self.subscription.changes.recv() => changes,
                last = interrupted(&self.state, &self.name, self.owned.as_deref()) => {
                    self.ended = true;
                    return Some(last);
                }
            };
            let Some(changes) = flush else {
                self.ended = true;
                if self.subscription.lagged() {
                    self.state.status.metrics().watch_lagged.inc();
                    return Some(message_event(
                        "lagged",
                        "this subscriber fell behind (`http.watch_buffer` flushes waiting) and is closed; reconnect to read the current state",
                    ));
                }
                return None;
            };
            self.queued.extend(changes);
        }
    }

    /// The events of `changes`, rendered on a blocking thread (plugin
    /// calls) unless that is done already.
    async fn render(
        &self,
        changes: Vec<Arc<Change>>,
    ) -> Result<Vec<(Event, Option<Instant>)>, ApiError> {
        let state = self.state.clone();
        let name = self.name.clone();
        let encoding = self.encoding;
        // Already rendered for another subscriber: no plugin call, no
        // blocking thread.
        if changes
            .iter()
            .all(|c| c.state.is_none() || c.rendered.get().is_some())
        {
            return render_changes(&state, &name, encoding, &changes);
        }
        tokio::task::spawn_blocking(move || render_changes(&state, &name, encoding, &changes))
            .await
            .map_err(|e| ApiError::internal(format!("render task failed: {e}")))?
    }
}

/// Resolves with the stream's last event once it must end: its
/// aggregation was removed (by a reload), or (cluster mode, `owned`) this
/// instance no longer owns one of the key's partitions.
async fn interrupted(state: &ApiState, name: &str, owned: Option<&[(String, i32)]>) -> Event {
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        if state.aggregations.get(name).is_none() {
            return message_event(
                "removed",
                &format!("aggregation {name:?} is no longer served (a reload removed it)"),
            );
        }
        let (Some(routing), Some(owned)) = (&state.routing, owned) else {
            continue;
        };
        match owner_of(routing, owned) {
            KeyOwner::Local => {}
            KeyOwner::Remote(owner) => return moved_event(Some(owner)),
            KeyOwner::Unknown(_) => return moved_event(None),
        }
    }
}

/// An event of type `kind` whose data is `{"message": ...}` (JSON: a
/// message may hold any character).
fn message_event(kind: &'static str, message: &str) -> Event {
    Event::default()
        .event(kind)
        .json_data(serde_json::json!({ "message": message }))
        .unwrap_or_else(|_| Event::default().event(kind))
}

fn moved_event(owner: Option<String>) -> Event {
    #[derive(Serialize)]
    struct Moved {
        owner: Option<String>,
    }
    Event::default()
        .event("moved")
        .json_data(Moved { owner })
        .unwrap_or_else(|_| Event::default().event("moved"))
}

fn render_changes(
    state: &ApiState,
    name: &str,
    encoding: KeyEncoding,
    changes: &[Arc<Change>],
) -> Result<Vec<(Event, Option<Instant>)>, ApiError> {
    let aggregation = state.aggregation(name)?;
    // Rendered once per change, whoever watches it first: the other
    // subscribers of the key reuse it.
    let unrendered: Vec<&Arc<Change>> = changes
        .iter()
        .filter(|c| c.state.is_some() && c.rendered.get().is_none())
        .collect();
    let states: Vec<(Vec<u8>, Option<u32>)> = unrendered
        .iter()
        .filter_map(|c| Some((c.state.clone()?, None)))
        .collect();
    let never = AtomicBool::new(false);
    let rendered = aggregation.render_all(&states, &never, state.status.metrics())?;
    for (change, json) in unrendered.into_iter().zip(rendered) {
        let _ = change.rendered.set(json);
    }
    let rendered_state = |change: &Change| change.rendered.get().cloned().unwrap_or_default();
    let mut events = Vec::with_capacity(changes.len());
    for change in changes {
        let key = encoding.encode(&change.key);
        let window = match (&aggregation.config.window, &change.window_key) {
            (Some(spec), Some(window_key)) => split_window_key(window_key)
                .map(|split| (spec, spec.window_at(split.start, split.session_end))),
            _ => None,
        };
        let event = match (change.state.is_some(), window) {
            (false, window) => Event::default().event("delete").json_data(KeyOnly {
                key,
                window: window.map(|(_, w)| WindowBounds {
                    start: w.start,
                    end: w.end,
                }),
            }),
            (true, None) => Event::default().json_data(KeyState {
                key,
                state: rendered_state(change),
            }),
            (true, Some((spec, window))) => Event::default().json_data(KeyWindows {
                key,
                windows: vec![WindowState {
                    start: window.start,
                    end: window.end,
                    closed: windows::closed(state, spec, name, change.slot, window),
                    state: rendered_state(change),
                }],
            }),
        }
        .map_err(|e| ApiError::internal(format!("encoding an event: {e}")))?;
        events.push((event.id(&*change.flush), Some(change.written_at)));
    }
    Ok(events)
}
