//! What stands in front of the handlers: bearer-token authentication and
//! the request-target length limit. (Concurrency, timeouts and body size are
//! tower layers, set up in [`super::router`].)

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ApiError;
use super::routing::FORWARDED_HEADER;
use crate::cluster::secret::ClusterSecret;
use crate::config::AuthScope;
use crate::ops::status::now_millis;

/// Paths that never need a token: the probes, so liveness and readiness
/// checks work, and the dashboard page, which holds no data (its own
/// requests carry the token).
const PROBES: [&str; 3] = ["/healthz", "/readyz", "/"];
/// Paths `scope = "admin"` protects (and every path under [`ADMIN_PREFIX`]).
const ADMIN: [&str; 3] = ["/v1/aggregations", "/metrics", "/openapi.json"];
/// The endpoints that change the running instance.
const ADMIN_PREFIX: &str = "/v1/admin/";

pub struct Guard {
    /// SHA-256 of the token: comparing digests in constant time hides
    /// both the token's bytes and its length.
    token_digest: Option<[u8; 32]>,
    scope: AuthScope,
    max_uri_bytes: usize,
    /// Cluster mode: a request another instance forwards carries a tag
    /// made with this secret instead of the client's token.
    cluster_secret: Option<Arc<ClusterSecret>>,
}

impl Guard {
    pub fn new(
        token: Option<&str>,
        scope: AuthScope,
        max_uri_bytes: usize,
        cluster_secret: Option<Arc<ClusterSecret>>,
    ) -> Self {
        Self {
            token_digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
            scope,
            max_uri_bytes,
            cluster_secret,
        }
    }

    fn needs_token(&self, path: &str) -> bool {
        if self.token_digest.is_none() || PROBES.contains(&path) {
            return false;
        }
        match self.scope {
            AuthScope::All => true,
            AuthScope::Admin => ADMIN.contains(&path) || path.starts_with(ADMIN_PREFIX),
        }
    }

    fn authorized(&self, headers: &HeaderMap, path_and_query: &str) -> bool {
        let Some(expected) = &self.token_digest else {
            return true;
        };
        if let Some(secret) = &self.cluster_secret
            && let Some(forwarded) = headers.get(FORWARDED_HEADER).and_then(|v| v.to_str().ok())
            && secret.verify_forwarded(forwarded, path_and_query, now_millis())
        {
            return true;
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        match presented {
            Some(token) => {
                let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                digest.ct_eq(expected).into()
            }
            None => false,
        }
    }
}

/// Whether the request may see details: it carries the token, or auth is
/// off. The probes answer everyone, and tell only these callers why they
/// fail (reasons can quote plugin messages and broker addresses).
#[derive(Debug, Clone, Copy)]
pub struct SeesDetails(pub bool);

pub async fn guard(State(guard): State<Arc<Guard>>, mut request: Request, next: Next) -> Response {
    let path_and_query = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let target = path_and_query.len();
    if target > guard.max_uri_bytes {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "the request target is {target} bytes, over the limit of {} (`http.max_uri_bytes`)",
                guard.max_uri_bytes
            ),
        )
        .into_response();
    }
    let authorized = guard.authorized(request.headers(), path_and_query);
    if guard.needs_token(request.uri().path()) && !authorized {
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs `Authorization: Bearer <token>`",
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"wagg\""),
        );
        return response;
    }
    let sees_details = SeesDetails(authorized);
    request.extensions_mut().insert(sees_details);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_request_passes_with_the_cluster_tag_not_with_the_header_alone() {
        let secret = Arc::new(ClusterSecret::new("a-shared-cluster-secret-of-32-chars!"));
        let token = Some("client-token-0123456789");
        let guard = Guard::new(token, AuthScope::All, 8192, Some(secret.clone()));
        let path = "/v1/aggregations/count/keys/a";
        let mut headers = HeaderMap::new();
        assert!(!guard.authorized(&headers, path));
        headers.insert(FORWARDED_HEADER, HeaderValue::from_static("1"));
        assert!(!guard.authorized(&headers, path), "the header alone");
        let tag = secret.forwarded_value(path, now_millis());
        headers.insert(
            FORWARDED_HEADER,
            HeaderValue::from_str(&tag).expect("a header value"),
        );
        assert!(guard.authorized(&headers, path));
        assert!(!guard.authorized(&headers, "/metrics"), "another path");
        let without_secret = Guard::new(token, AuthScope::All, 8192, None);
        assert!(!without_secret.authorized(&headers, path));
        let other = ClusterSecret::new("another-cluster-secret-of-32-chars!!");
        let foreign = other.forwarded_value(path, now_millis());
        headers.insert(
            FORWARDED_HEADER,
            HeaderValue::from_str(&foreign).expect("a header value"),
        );
        assert!(!guard.authorized(&headers, path), "another cluster's tag");
    }
}
