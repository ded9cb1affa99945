//! `[http]`: where the API listens, its limits and its bearer token.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest `limit` a key listing accepts.
    #[serde(default = "default_max_page")]
    pub max_page: usize,
    /// Requests served at once; more are answered 503 at once.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Requests taking longer are answered 408.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Longest request target (path and query) accepted; longer is 414.
    #[serde(default = "default_max_uri_bytes")]
    pub max_uri_bytes: usize,
    /// Connections open at once; more are closed as soon as accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection that has not sent a whole request head within this
    /// time (a new one, an idle keep-alive one, or a slow client) is
    /// closed.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Largest answer body: a key page stops early (with `next`) before
    /// it; one state rendered larger is an error.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Live subscriptions (`/watch`, `/changes`) open at once; more are
    /// answered 503.
    #[serde(default = "default_max_watchers")]
    pub max_watchers: usize,
    /// Flushes whose changes one subscription may have waiting to be sent;
    /// a subscriber further behind is sent `event: lagged` and closed.
    #[serde(default = "default_watch_buffer")]
    pub watch_buffer: usize,
    /// Bearer-token authentication; none when absent.
    pub auth: Option<AuthConfig>,
}

/// Where the bearer token comes from (exactly one of the two), and what it
/// protects. The token itself never appears in the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Name of an environment variable holding the token.
    pub token_env: Option<String>,
    /// A file holding the token (surrounding whitespace ignored); relative
    /// to the config file.
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub scope: AuthScope,
}

/// Which endpoints need the token. `/healthz` and `/readyz` never do, so
/// probes keep working.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthScope {
    /// Every endpoint but the probes.
    #[default]
    All,
    /// Only admin endpoints: `/v1/aggregations` (status and configuration)
    /// and `/metrics`; key lookups and listings stay open.
    Admin,
}

fn default_max_watchers() -> usize {
    1024
}
fn default_watch_buffer() -> usize {
    16
}
fn default_max_connections() -> usize {
    4096
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_max_response_bytes() -> usize {
    8 << 20
}
fn default_max_concurrent_requests() -> usize {
    256
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_max_uri_bytes() -> usize {
    8192
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_page() -> usize {
    1000
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_page: default_max_page(),
            max_concurrent_requests: default_max_concurrent_requests(),
            request_timeout_ms: default_request_timeout_ms(),
            max_uri_bytes: default_max_uri_bytes(),
            max_connections: default_max_connections(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            max_response_bytes: default_max_response_bytes(),
            max_watchers: default_max_watchers(),
            watch_buffer: default_watch_buffer(),
            auth: None,
        }
    }
}
