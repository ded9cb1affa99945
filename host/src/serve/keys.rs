//! One key's state: from this instance's store, or (cluster mode) from
//! the key's owner, or from a standby copy while the owner is away.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::encoding::{KeyEncoding, check_query_utf8};
use super::error::ApiError;
use super::openapi::{self, KeyState};
use super::routing::{self, Routing};
use super::{ApiState, CancelOnDrop, entry_bytes, windows};
use crate::cluster::membership::Owner;
use crate::config::Forwarding;
use crate::state::store::Slot;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyQuery {
    encoding: Option<String>,
}

/// The aggregation and key a `/keys/{key}` request names.
pub(super) struct KeyRequest {
    pub(super) name: String,
    /// The key as written in the path.
    pub(super) key_text: String,
    pub(super) key: Vec<u8>,
    pub(super) encoding: KeyEncoding,
}

impl KeyRequest {
    pub(super) fn parse(
        path: Result<Path<(String, String)>, PathRejection>,
        raw_query: Option<String>,
        query: Result<Query<KeyQuery>, QueryRejection>,
    ) -> Result<Self, ApiError> {
        let Path((name, key_text)) = path?;
        check_query_utf8(raw_query.as_deref())?;
        let Query(query) = query?;
        let encoding = KeyEncoding::parse(query.encoding.as_deref())?;
        let key = encoding.decode("key", &key_text)?;
        Ok(Self {
            name,
            key_text,
            key,
            encoding,
        })
    }
}

/// One key's state.
#[utoipa::path(get, path = "/v1/aggregations/{name}/keys/{key}", tag = "aggregations",
    params(
        ("name" = String, Path, description = "Aggregation name"),
        ("key" = String, Path, description = "The key (percent-encoded UTF-8, or base64 with `encoding=base64`)"),
        ("encoding" = Option<openapi::Encoding>, Query, description = "`utf8` (default) or `base64`"),
    ),
    responses(
        (status = 200, description = "The key's state (a windowed aggregation answers `KeyWindows`, as `/windows` does)", body = openapi::KeyState, headers(
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
pub async fn get_key(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    uri: Uri,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let KeyRequest {
        name,
        key_text,
        key,
        encoding,
    } = KeyRequest::parse(path, raw_query, query)?;
    let not_found = || {
        ApiError::not_found(
            "unknown_key",
            format!("aggregation {name:?} has no key {key_text:?}"),
        )
    };
    let Some(routing) = &state.routing else {
        let found = lookup(state.clone(), name.clone(), None, key, encoding).await?;
        return found.ok_or_else(not_found);
    };
    let aggregation = state.aggregation(&name)?;
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let forwarded = Routing::is_forwarded(&headers);
    let topics = routing.topics_of(&aggregation.config);
    // A multi-topic aggregation's key may live in each topic's partition:
    // a redirect could bounce between their owners, so those are proxied.
    let redirect = routing.cluster.config.forward == Forwarding::Redirect && topics.len() == 1;
    let mut unavailable = None;
    for topic in &topics {
        let Some(partition) = routing.membership.partition_of(topic, &key) else {
            continue;
        };
        let target = PartitionLookup {
            topic,
            partition,
            forwarded,
            redirect,
            path_and_query,
        };
        match ask_partition(&state, routing, &name, &key, encoding, target).await? {
            Answer::Found(response) => return Ok(response),
            Answer::Absent => {}
            Answer::Unavailable => unavailable = Some((topic.clone(), partition)),
        }
    }
    match unavailable {
        Some((topic, partition)) => Err(ApiError::unavailable(topic, partition)),
        None => Err(not_found()),
    }
}

/// What one partition's owner (or a standby copy of it) says of a key.
enum Answer {
    Found(Response),
    Absent,
    /// Neither the owner nor a standby copy could answer.
    Unavailable,
}

/// Asks the owner of the key's partition in one topic: this instance's
/// store, or the owner over HTTP (proxied or redirected), or a standby
/// copy when the owner is away or does not answer.
async fn ask_partition(
    state: &Arc<ApiState>,
    routing: &Routing,
    name: &str,
    key: &[u8],
    encoding: KeyEncoding,
    target: PartitionLookup<'_>,
) -> Result<Answer, ApiError> {
    let standby_answer = |standby: FromStandby| match standby {
        FromStandby::Answered(response) => Answer::Found(response),
        FromStandby::Absent => Answer::Absent,
        FromStandby::NoCopy => Answer::Unavailable,
    };
    match routing.membership.owner(target.topic, target.partition) {
        Owner::Local => {
            let Some(slot) = partition_slot(state, target.topic, target.partition) else {
                return Ok(Answer::Absent);
            };
            Ok(
                match lookup_in_slot(state, name, slot, key, encoding).await? {
                    Some(found) => Answer::Found(found),
                    None => Answer::Absent,
                },
            )
        }
        Owner::Remote(owner) if !target.forwarded => {
            if target.redirect {
                return Ok(Answer::Found(Routing::redirect(
                    &owner,
                    target.path_and_query,
                )));
            }
            match routing.proxy(&owner, target.path_and_query).await {
                Ok((StatusCode::NOT_FOUND, _)) => Ok(Answer::Absent),
                Ok((_, response)) => Ok(Answer::Found(response)),
                Err(unreachable) => match from_standby(state, name, key, encoding, target).await? {
                    FromStandby::NoCopy => Err(unreachable),
                    other => Ok(standby_answer(other)),
                },
            }
        }
        Owner::Remote(_) | Owner::Unknown => Ok(standby_answer(
            from_standby(state, name, key, encoding, target).await?,
        )),
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

/// A lookup of a key in one partition.
struct PartitionLookup<'a> {
    topic: &'a str,
    partition: i32,
    /// Another instance sent it: answer from this instance only.
    forwarded: bool,
    /// Redirect to a remote owner rather than proxy.
    redirect: bool,
    path_and_query: &'a str,
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
    lookup_of: PartitionLookup<'_>,
) -> Result<FromStandby, ApiError> {
    let Some(routing) = &state.routing else {
        return Ok(FromStandby::NoCopy);
    };
    let PartitionLookup {
        topic,
        partition,
        forwarded,
        path_and_query,
        ..
    } = lookup_of;
    if let Some(copy) = routing.cluster.standby_copy(topic, partition)
        && let Some(slot) = partition_slot(state, topic, partition)
    {
        let found = lookup_in_slot(state, name, slot, key, encoding).await?;
        state.status.metrics().standby_lookups.inc();
        let Some(found) = found else {
            return Ok(FromStandby::Absent);
        };
        let mut response = found;
        let staleness = if copy.at_ms > 0 {
            (crate::ops::status::now_millis() - copy.at_ms).max(0)
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
    // A few at most: each may take a forwarding timeout, and together they
    // must end before the client's request does.
    for standby in routing
        .membership
        .standbys_of(topic, partition)
        .into_iter()
        .take(routing::STANDBY_ATTEMPTS)
    {
        match routing.proxy(&standby, path_and_query).await {
            Ok((StatusCode::OK, response)) => return Ok(FromStandby::Answered(response)),
            Ok((StatusCode::NOT_FOUND, _)) => return Ok(FromStandby::Absent),
            Ok(_) | Err(_) => {}
        }
    }
    Ok(FromStandby::NoCopy)
}

/// [`lookup`] in one slot, from borrowed arguments.
async fn lookup_in_slot(
    state: &Arc<ApiState>,
    name: &str,
    slot: Slot,
    key: &[u8],
    encoding: KeyEncoding,
) -> Result<Option<Response>, ApiError> {
    lookup(
        state.clone(),
        name.to_owned(),
        Some(slot),
        key.to_vec(),
        encoding,
    )
    .await
}

/// A key's answer from this instance's store (in `slot`, or in whichever
/// slot has it): its rendered state, or a windowed aggregation's windows.
async fn lookup(
    state: Arc<ApiState>,
    name: String,
    slot: Option<Slot>,
    key: Vec<u8>,
    encoding: KeyEncoding,
) -> Result<Option<Response>, ApiError> {
    if state.aggregation(&name)?.config.window.is_some() {
        let found =
            windows::key_windows(state, name, slot, key, encoding, Default::default()).await?;
        return Ok(found.map(|windows| Json(windows).into_response()));
    }
    Ok(lookup_state(state, name, slot, key, encoding)
        .await?
        .map(IntoResponse::into_response))
}

/// A key's rendered state from this instance's store.
pub(super) async fn lookup_state(
    state: Arc<ApiState>,
    name: String,
    slot: Option<Slot>,
    key: Vec<u8>,
    encoding: KeyEncoding,
) -> Result<Option<Json<KeyState>>, ApiError> {
    let cancel = CancelOnDrop::new();
    let cancelled = cancel.flag();
    let found = tokio::task::spawn_blocking(move || {
        let aggregation = state.aggregation(&name)?;
        let (stored, behind) = state.store.reading(&name, |store| match slot {
            Some(slot) => store.get(&name, slot, &key),
            None => store.find(&name, &key),
        })?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let old_format = behind.and_then(|b| b.old_format_of(&key));
        let rendered = aggregation
            .render_all(&[(stored, old_format)], &cancelled, state.status.metrics())?
            .pop()
            .unwrap_or(Value::Null);
        let bytes = entry_bytes(&key, &rendered);
        if bytes > state.max_response_bytes {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "state_too_large",
                format!(
                    "the state of this key renders to {bytes} bytes, over `http.max_response_bytes` ({})",
                    state.max_response_bytes
                ),
            ));
        }
        Ok(Some(Json(KeyState {
            key: encoding.encode(&key),
            state: rendered,
        })))
    })
    .await;
    drop(cancel);
    found.map_err(|e| ApiError::internal(format!("query task failed: {e}")))?
}
