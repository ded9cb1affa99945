//! Cluster mode: which instance answers a request. A lookup goes to the
//! owner of the key's partition (proxied, or redirected by option); a
//! listing asks every live instance for its page and merges them. Requests
//! an instance forwards carry [`FORWARDED_HEADER`], and are answered from
//! that instance's own partitions only, so forwarding never loops.

use std::sync::Arc;
use std::time::Duration;

use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::ApiError;
use crate::cluster::Cluster;
use crate::cluster::membership::Membership;
use crate::config::AggregationConfig;

/// Marks a request one instance sends another.
pub const FORWARDED_HEADER: &str = "x-wagg-forwarded";
/// Names the instance that answered a forwarded lookup.
pub const SERVED_BY_HEADER: &str = "x-wagg-served-by";

/// Names the instance that answered a lookup from its standby copy.
pub const STANDBY_HEADER: &str = "x-wagg-standby";
/// How old (ms) the standby copy's commit is.
pub const STALENESS_HEADER: &str = "x-wagg-staleness-ms";

/// The share of `http.request_timeout_ms` one forwarded request may take:
/// a lookup whose owner hangs still has time to ask standby copies (at
/// most [`STANDBY_ATTEMPTS`]) before the client's request times out.
const FORWARD_SHARE: u32 = 4;
/// Other instances' standby copies a lookup asks, one after another.
pub const STANDBY_ATTEMPTS: usize = 2;

pub struct Routing {
    pub membership: Arc<Membership>,
    pub cluster: Arc<Cluster>,
    client: reqwest::Client,
    /// The largest answer relayed from another instance
    /// (`http.max_response_bytes`).
    max_body_bytes: usize,
}

impl Routing {
    /// Forwards with a timeout of a quarter of `request_timeout`, and
    /// relays answers of up to `max_body_bytes`.
    pub fn new(
        membership: Arc<Membership>,
        cluster: Arc<Cluster>,
        request_timeout: Duration,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            membership,
            cluster,
            client: reqwest::Client::builder()
                .timeout(request_timeout / FORWARD_SHARE)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            max_body_bytes,
        }
    }

    /// The source topics an aggregation reads (a key may live in one
    /// partition of each).
    pub fn topics_of(&self, aggregation: &AggregationConfig) -> Vec<String> {
        match &aggregation.topic {
            Some(topic) => vec![topic.clone()],
            None => self.membership.topics().map(str::to_owned).collect(),
        }
    }

    /// Fails with 503 if a partition the aggregation reads has no live
    /// owner: a listing would silently miss its keys.
    pub fn check_every_partition_owned(
        &self,
        aggregation: &AggregationConfig,
    ) -> Result<(), ApiError> {
        let topics = self.topics_of(aggregation);
        match self
            .membership
            .ownership()
            .into_iter()
            .find(|(t, _, owner)| owner.is_none() && topics.contains(t))
        {
            Some((topic, partition, _)) => Err(ApiError::unavailable(topic, partition)),
            None => Ok(()),
        }
    }

    /// Whether another instance sent this request.
    pub fn is_forwarded(headers: &HeaderMap) -> bool {
        headers.contains_key(FORWARDED_HEADER)
    }

    /// A 307 to the same path on `owner`.
    pub fn redirect(owner: &str, path_and_query: &str) -> Response {
        let location = format!("{owner}{path_and_query}");
        match HeaderValue::from_str(&location) {
            Ok(location) => {
                (StatusCode::TEMPORARY_REDIRECT, [(LOCATION, location)]).into_response()
            }
            Err(_) => ApiError::internal("owner address is not a valid header").into_response(),
        }
    }

    /// GETs the same path on `owner` and returns its answer as it is.
    pub async fn proxy(
        &self,
        owner: &str,
        path_and_query: &str,
    ) -> Result<(StatusCode, Response), ApiError> {
        let (status, kept, body) = self.get(owner, path_and_query).await?;
        let mut response = (status, body).into_response();
        response.headers_mut().extend(kept);
        if let Ok(served_by) = HeaderValue::from_str(owner) {
            response.headers_mut().insert(SERVED_BY_HEADER, served_by);
        }
        Ok((status, response))
    }

    /// GETs a JSON answer from `instance`; anything but a 200 with a body
    /// of the expected shape is an error.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        instance: &str,
        path_and_query: &str,
    ) -> Result<T, ApiError> {
        let (status, _, body) = self.get(instance, path_and_query).await?;
        if status != StatusCode::OK {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "instance_failed",
                format!(
                    "instance {instance} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ),
            ));
        }
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "instance_failed",
                format!("instance {instance} answered invalid JSON: {e}"),
            )
        })
    }

    async fn get(
        &self,
        instance: &str,
        path_and_query: &str,
    ) -> Result<(StatusCode, HeaderMap, axum::body::Bytes), ApiError> {
        self.membership.status().metrics().forwarded_requests.inc();
        // The client's token stays here: the other instance accepts the
        // cluster's tag instead (see `serve::guard`).
        let forwarded = match &self.cluster.secret {
            Some(secret) => {
                secret.forwarded_value(path_and_query, crate::ops::status::now_millis())
            }
            None => "1".to_owned(),
        };
        let request = self
            .client
            .get(format!("{instance}{path_and_query}"))
            .header(FORWARDED_HEADER, forwarded);
        let unreachable = |e: reqwest::Error| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "instance_unreachable",
                format!("cannot reach instance {instance}: {e}"),
            )
        };
        let response = request.send().await.map_err(unreachable)?;
        let status =
            StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        // What the answer is and where it came from travel with it.
        let mut kept = HeaderMap::new();
        for name in [
            CONTENT_TYPE,
            HeaderName::from_static(STANDBY_HEADER),
            HeaderName::from_static(STALENESS_HEADER),
        ] {
            if let Some(value) = response.headers().get(&name).cloned() {
                kept.insert(name, value);
            }
        }
        let body = self.read_body(response, instance).await?;
        Ok((status, kept, body))
    }

    /// An answer's body, refused once it grows past `max_body_bytes`: a
    /// peer (or whoever answers at its address) cannot make this instance
    /// buffer without bound.
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        instance: &str,
    ) -> Result<axum::body::Bytes, ApiError> {
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "instance_unreachable",
                format!("reading the answer of instance {instance}: {e}"),
            )
        })? {
            if body.len() + chunk.len() > self.max_body_bytes {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "instance_failed",
                    format!(
                        "instance {instance} answered more than `http.max_response_bytes` ({} bytes)",
                        self.max_body_bytes
                    ),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.into())
    }
}
