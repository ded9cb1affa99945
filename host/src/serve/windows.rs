//! Windowed aggregations' answers: a key's windows (`/keys/{key}/windows`,
//! and `/keys/{key}` itself), and the windows of each key in listings.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, RawQuery, State};
use serde::Deserialize;

use super::encoding::{KeyEncoding, check_query_utf8};
use super::error::ApiError;
use super::openapi::{self, KeyWindows, WindowState};
use super::{ApiState, CancelOnDrop, QueryableAggregation, entry_bytes};
use crate::config::{Window, WindowConfig};
use crate::state::store::{Behind, Slot, split_window_key};

/// The most windows one key's answer holds.
const MAX_WINDOWS: usize = 100_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WindowsQuery {
    from: Option<String>,
    to: Option<String>,
    encoding: Option<String>,
}

/// One key's windows of a windowed aggregation.
#[utoipa::path(get, path = "/v1/aggregations/{name}/keys/{key}/windows", tag = "aggregations",
    params(
        ("name" = String, Path, description = "Aggregation name (a windowed one)"),
        ("key" = String, Path, description = "The key (percent-encoded UTF-8, or base64 with `encoding=base64`)"),
        ("from" = Option<String>, Query, description = "Only windows ending after this time (epoch ms or RFC 3339)"),
        ("to" = Option<String>, Query, description = "Only windows starting before this time (epoch ms or RFC 3339)"),
        ("encoding" = Option<openapi::Encoding>, Query, description = "`utf8` (default) or `base64`"),
    ),
    responses(
        (status = 200, description = "The key's retained windows, in start order", body = openapi::KeyWindows),
        (status = 400, description = "Bad key or query, or not a windowed aggregation", body = openapi::ErrorBody),
        (status = 404, description = "No such aggregation, or no window of the key in the range", body = openapi::ErrorBody),
    ))]
pub async fn get_windows(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<WindowsQuery>, QueryRejection>,
) -> Result<Json<KeyWindows>, ApiError> {
    let Path((name, key_text)) = path?;
    check_query_utf8(raw_query.as_deref())?;
    let Query(query) = query?;
    let encoding = KeyEncoding::parse(query.encoding.as_deref())?;
    let key = encoding.decode("key", &key_text)?;
    let range = TimeRange {
        from: query
            .from
            .as_deref()
            .map(|t| parse_time("from", t))
            .transpose()?,
        to: query
            .to
            .as_deref()
            .map(|t| parse_time("to", t))
            .transpose()?,
    };
    let aggregation = state.aggregation(&name)?;
    if aggregation.config.window.is_none() {
        return Err(ApiError::bad_request(format!(
            "aggregation {name:?} is not windowed: look the key up at /v1/aggregations/{name}/keys/{{key}}"
        )));
    }
    key_windows(state, name.clone(), None, key, encoding, range)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_key",
                format!("aggregation {name:?} has no window of key {key_text:?} in that range"),
            )
        })
}

/// A time range of window queries: windows overlapping `[from, to)`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TimeRange {
    from: Option<i64>,
    to: Option<i64>,
}

/// Epoch milliseconds or an RFC 3339 time.
fn parse_time(name: &str, text: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            ApiError::bad_request(format!(
                "`{name}` must be epoch milliseconds or an RFC 3339 time, not {text:?}"
            ))
        })
}

/// A key's windows in `range` from this instance's store, in `slot` or
/// any (`None`: none).
pub(super) async fn key_windows(
    state: Arc<ApiState>,
    name: String,
    slot: Option<Slot>,
    key: Vec<u8>,
    encoding: KeyEncoding,
    range: TimeRange,
) -> Result<Option<KeyWindows>, ApiError> {
    let cancel = CancelOnDrop::new();
    let cancelled = cancel.flag();
    let found = tokio::task::spawn_blocking(move || {
        let aggregation = state.aggregation(&name)?;
        let (entries, behind) = state
            .store
            .reading(&name, |store| store.windows_of_key(&name, slot, &key, MAX_WINDOWS))?;
        let mut grouped = render_windows(&state, &aggregation, entries, behind, range, &cancelled)?;
        let Some((_, windows)) = grouped.pop() else {
            return Ok(None);
        };
        let answer = KeyWindows {
            key: encoding.encode(&key),
            windows,
        };
        let value = serde_json::to_value(&answer.windows).unwrap_or_default();
        let bytes = entry_bytes(&key, &value);
        if bytes > state.max_response_bytes {
            return Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "state_too_large",
                format!(
                    "the windows of this key render to {bytes} bytes, over `http.max_response_bytes` ({}): ask for a range (`from`, `to`)",
                    state.max_response_bytes
                ),
            ));
        }
        Ok(Some(answer))
    })
    .await;
    drop(cancel);
    found.map_err(|e| ApiError::internal(format!("query task failed: {e}")))?
}

/// Keys with their windows, in key order.
pub(super) type KeysWindows = Vec<(Vec<u8>, Vec<WindowState>)>;

/// Renders stored windows `(slot, window key, state)` (in key order) in
/// `range`, grouped by key: `(key, windows in start order)`.
pub(super) fn render_windows(
    state: &ApiState,
    aggregation: &QueryableAggregation,
    entries: Vec<(Slot, Vec<u8>, Vec<u8>)>,
    behind: Option<Behind>,
    range: TimeRange,
    cancelled: &AtomicBool,
) -> Result<KeysWindows, ApiError> {
    let Some(spec) = &aggregation.config.window else {
        return Ok(Vec::new());
    };
    let mut placed = Vec::new();
    let mut states = Vec::new();
    for (slot, window_key, stored) in entries {
        let Some(split) = split_window_key(&window_key) else {
            continue;
        };
        let window = spec.window_at(split.start, split.session_end);
        if !spec.overlaps(window, range.from, range.to) {
            continue;
        }
        let key = split.key;
        let old_format = behind.as_ref().and_then(|b| b.old_format_of(&window_key));
        placed.push((
            key,
            window,
            closed(state, spec, &aggregation.config.name, slot, window),
        ));
        states.push((stored, old_format));
    }
    let rendered = aggregation.render_all(&states, cancelled, state.status.metrics())?;
    let mut grouped: KeysWindows = Vec::new();
    for ((key, window, closed), rendered) in placed.into_iter().zip(rendered) {
        let entry = WindowState {
            start: window.start,
            end: window.end,
            closed,
            state: rendered,
        };
        match grouped.last_mut() {
            Some((last, windows)) if *last == key => windows.push(entry),
            _ => grouped.push((key, vec![entry])),
        }
    }
    for (_, windows) in &mut grouped {
        windows.sort_by_key(|w| w.start);
    }
    Ok(grouped)
}

/// Whether the window no longer takes records: its partition's stream time
/// (as last written) is past its end + grace.
pub(super) fn closed(
    state: &ApiState,
    spec: &WindowConfig,
    aggregation: &str,
    slot: Slot,
    window: Window,
) -> bool {
    state
        .store
        .topic_name(slot.topic_id)
        .and_then(|topic| {
            state
                .status
                .stream_time(aggregation, &topic, slot.partition as i32)
        })
        .is_some_and(|stream_time| spec.closed(window, stream_time))
}
