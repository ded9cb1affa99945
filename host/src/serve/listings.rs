//! Listings: every aggregation with its progress, and an aggregation's
//! keys a page at a time (in cluster mode merged from every instance).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, Uri};
use serde::Deserialize;
use serde_json::Value;

use super::encoding::{KeyEncoding, check_query_utf8, decode_base64};
use super::error::ApiError;
use super::openapi::{self, AggregationInfo, AggregationList, KeyPage, KeyState, PluginInfo};
use super::routing::Routing;
use super::windows::{TimeRange, render_windows};
use super::{ApiState, CancelOnDrop, QueryableAggregation, entry_bytes};
use crate::ops::status::PartitionProgress;
use crate::state::store::Slot;
use std::sync::atomic::AtomicBool;

/// Every aggregation: plugin, counters, key estimate and partition progress.
#[utoipa::path(get, path = "/v1/aggregations", tag = "aggregations", responses(
    (status = 200, description = "The aggregations", body = openapi::AggregationList),
    (status = 500, description = "State store error", body = openapi::ErrorBody),
))]
pub async fn list_aggregations(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<AggregationList>, ApiError> {
    let mut partitions = state.status.partitions();
    if let Some(routing) = &state.routing {
        // Every source partition, with its owner (progress only for those
        // this instance owns or owned).
        let local: std::collections::BTreeMap<(String, i32), PartitionProgress> = partitions
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
                    .unwrap_or_else(|| PartitionProgress {
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
    let aggregations = state
        .aggregations
        .all()
        .iter()
        .map(|aggregation| aggregation_info(&state, aggregation, &partitions))
        .collect::<Result<_, ApiError>>()?;
    let instance = state
        .routing
        .as_ref()
        .map(|routing| routing.membership.me().to_owned());
    Ok(Json(AggregationList {
        aggregations,
        instance,
    }))
}

fn aggregation_info(
    state: &ApiState,
    aggregation: &QueryableAggregation,
    partitions: &[PartitionProgress],
) -> Result<AggregationInfo, ApiError> {
    let config = &aggregation.config;
    let counters = state.status.counters(&config.name);
    let metadata = aggregation.plugin.metadata();
    Ok(AggregationInfo {
        name: config.name.clone(),
        plugin: PluginInfo {
            name: metadata.name.clone(),
            version: metadata.version.clone(),
            state_format: metadata.state_format,
            sha256: aggregation.plugin.content_hash().to_owned(),
        },
        topic: config.topic.clone(),
        key: config.key.clone(),
        window: config.window.clone(),
        time: config.time.clone(),
        emit: config.emit.clone(),
        on_error: config.on_error,
        keys: state.store.count_keys(&config.name)?,
        migration: state
            .store
            .aggregation_meta(&config.name)?
            .and_then(|meta| {
                let migration = meta.migration?;
                Some(openapi::MigrationProgress {
                    from_format: migration.from_format,
                    from_plugin: migration.from_plugin,
                    to_format: meta.state_format,
                    keys_migrated: migration.keys_migrated,
                    keys_estimate: migration.keys_estimate,
                })
            }),
        records_applied: counters.records_applied,
        records_failed: counters.records_failed,
        records_dead_lettered: counters.records_dead_lettered,
        records_late: counters.records_late,
        records_dropped: counters.records_dropped,
        partitions: state.status.partitions_of(
            &config.name,
            partitions
                .iter()
                .filter(|p| config.applies_to(&p.topic))
                .cloned()
                .collect(),
        ),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
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
pub async fn list_keys(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<KeyPage>, ApiError> {
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
    let aggregation = state.aggregation(&name)?;
    let budget = state.max_response_bytes;
    let mut page = local_page(state.clone(), name, prefix, after, limit).await?;
    let mut missing = Vec::new();
    if let Some(routing) = &state.routing
        && !Routing::is_forwarded(&headers)
    {
        routing.check_every_partition_owned(&aggregation.config)?;
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        let others = routing.membership.others();
        // All at once: the listing takes as long as the slowest instance,
        // not the sum of them.
        let pages = futures_util::future::join_all(
            others
                .iter()
                .map(|instance| routing.get_json::<KeyPage>(instance, path_and_query)),
        )
        .await;
        for (instance, remote) in others.into_iter().zip(pages) {
            match remote {
                Ok(remote) => {
                    page.merge(remote_items(remote.items, encoding), remote.next.is_some())
                }
                Err(error) => {
                    tracing::warn!(%instance, %error, "an instance did not answer a listing; the page misses its keys");
                    missing.push(instance);
                }
            }
        }
    }
    page.finish(limit, budget);
    let next = page
        .more
        .then(|| page.items.last().map(|(k, _)| encoding.encode(k)))
        .flatten();
    let items = page
        .items
        .into_iter()
        .map(|(key, state)| KeyState {
            key: encoding.encode(&key),
            state,
        })
        .collect();
    Ok(Json(KeyPage {
        items,
        next,
        missing_instances: missing,
    }))
}

/// Another instance's page items, with keys decoded (undecodable ones
/// dropped).
fn remote_items(items: Vec<KeyState>, encoding: KeyEncoding) -> Vec<(Vec<u8>, Value)> {
    items
        .into_iter()
        .filter_map(|item| {
            let key = match encoding {
                KeyEncoding::Utf8 => Some(item.key.into_bytes()),
                KeyEncoding::Base64 => decode_base64(&item.key),
            };
            key.map(|key| (key, item.state))
        })
        .collect()
}

/// A page of keys being assembled from this instance's slots and (in a
/// cluster) every other instance's page.
struct Page {
    items: Vec<(Vec<u8>, Value)>,
    /// Whether keys may follow the last one.
    more: bool,
    /// Every key up to here is in `items`: each source's page holds its
    /// first keys, so past the smallest last key of a source that had more,
    /// that source's keys may be missing.
    complete_up_to: Option<Vec<u8>>,
}

impl Page {
    fn new(items: Vec<(Vec<u8>, Value)>, more: bool) -> Self {
        let mut page = Self {
            items: Vec::new(),
            more: false,
            complete_up_to: None,
        };
        page.merge(items, more);
        page
    }

    /// Adds a source's page (`more`: it had keys after its last).
    fn merge(&mut self, items: Vec<(Vec<u8>, Value)>, more: bool) {
        if more && let Some((last, _)) = items.last() {
            let bound = match self.complete_up_to.take() {
                Some(bound) => bound.min(last.clone()),
                None => last.clone(),
            };
            self.complete_up_to = Some(bound);
        }
        self.more |= more;
        self.items.extend(items);
    }

    /// Sorts, drops keys past what every source vouched for, and cuts to
    /// `limit` entries and `budget` bytes (at least one entry).
    fn finish(&mut self, limit: usize, budget: usize) {
        self.items.sort_by(|a, b| a.0.cmp(&b.0));
        self.items.dedup_by(|a, b| a.0 == b.0);
        if let Some(bound) = &self.complete_up_to {
            self.items.retain(|(key, _)| key <= bound);
        }
        let mut bytes = 0;
        let fits = self
            .items
            .iter()
            .take(limit)
            .take_while(|(key, state)| {
                bytes += entry_bytes(key, state);
                bytes <= budget
            })
            .count()
            .max(1);
        if fits < self.items.len() {
            self.items.truncate(fits);
            self.more = true;
        }
    }
}

/// Up to `limit` keys (with rendered states) of the slots this instance
/// serves.
async fn local_page(
    state: Arc<ApiState>,
    name: String,
    prefix: Vec<u8>,
    after: Option<Vec<u8>>,
    limit: usize,
) -> Result<Page, ApiError> {
    let cancel = CancelOnDrop::new();
    let cancelled = cancel.flag();
    let page = tokio::task::spawn_blocking(move || {
        let aggregation = state.aggregation(&name)?;
        let slots = state.served_slots(&name)?;
        if aggregation.config.window.is_some() {
            return windowed_page(
                &state,
                &aggregation,
                &slots,
                &prefix,
                after,
                limit,
                &cancelled,
            );
        }
        // One more than asked: whether keys follow the page.
        let (mut entries, behind) = state.store.reading(&name, |store| {
            store.list_in_slots(&name, &slots, &prefix, after.as_deref(), limit + 1)
        })?;
        let more = entries.len() > limit;
        entries.truncate(limit);
        let states: Vec<(Vec<u8>, Option<u32>)> = entries
            .iter()
            .map(|(key, s)| {
                let old_format = behind.as_ref().and_then(|b| b.old_format_of(key));
                (s.clone(), old_format)
            })
            .collect();
        let rendered = aggregation.render_all(&states, &cancelled, state.status.metrics())?;
        let items = entries
            .into_iter()
            .zip(rendered)
            .map(|((key, _), state)| (key, state))
            .collect();
        Ok::<_, ApiError>(Page::new(items, more))
    })
    .await;
    drop(cancel);
    page.map_err(|e| ApiError::internal(format!("query task failed: {e}")))?
}

/// A windowed aggregation's page: up to `limit` keys, each with its
/// windows (`{"windows": [...]}`, as the key lookup answers them).
fn windowed_page(
    state: &ApiState,
    aggregation: &QueryableAggregation,
    slots: &[Slot],
    prefix: &[u8],
    after: Option<Vec<u8>>,
    limit: usize,
    cancelled: &AtomicBool,
) -> Result<Page, ApiError> {
    // Windows, not keys, are stored: read a key's worth more than a page
    // of windows per key would need, then keep whole keys.
    let windows_wanted = limit.saturating_mul(WINDOWS_PER_KEY_READ).saturating_add(1);
    let (entries, behind) = state.store.reading(&aggregation.config.name, |store| {
        store.windows_in_slots(
            &aggregation.config.name,
            slots,
            prefix,
            after.as_deref(),
            windows_wanted,
        )
    })?;
    let read_all = entries.len() < windows_wanted;
    let mut grouped = render_windows(
        state,
        aggregation,
        entries,
        behind,
        TimeRange::default(),
        cancelled,
    )?;
    // The last key's windows may go on past what was read.
    let mut more = !read_all;
    if more && grouped.len() > 1 {
        grouped.pop();
    }
    if grouped.len() > limit {
        grouped.truncate(limit);
        more = true;
    }
    let items = grouped
        .into_iter()
        .map(|(key, windows)| (key, serde_json::json!({ "windows": windows })))
        .collect();
    Ok(Page::new(items, more))
}

/// How many windows per key a windowed listing reads for each key asked.
const WINDOWS_PER_KEY_READ: usize = 64;
