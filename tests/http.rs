//! The HTTP API against hostile requests: random paths and query strings
//! never panic it and always get a JSON answer with a sane status; bearer
//! auth, URI length and load shedding behave as documented.
//!
//! The router is driven in process (tower's `oneshot`) over a real RocksDB
//! store holding states made by the real `count` plugin; the connection
//! limits through `serve::serve` on a loopback socket.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use common::plugin;
use proptest::prelude::*;
use serde_json::Value;
use tower::ServiceExt;
use wagg::config::OnError;
use wagg::config::{AuthScope, Config};
use wagg::ops::status::Status;
use wagg::plugin::{PluginRuntime, RuntimeConfig};
use wagg::record::SourceRecord;
use wagg::serve::{ApiState, ConnectionLimits, HttpPolicy, QueryableAggregation, router, serve};
use wagg::state::store::{Slot, StateStore, StoreOptions};
use wagg::tools::author::offline::{self, StateMap};

const TOKEN: &str = "a-test-token-of-enough-length";

struct Fixture {
    _dir: tempfile::TempDir,
    state: Arc<ApiState>,
}

/// A store with `count` states for keys `k0`..`k49` (key `kN` counted N+1
/// times), plus one key that is not UTF-8.
fn fixture() -> Fixture {
    fixture_with(8 << 20)
}

/// [`fixture`] with `http.max_response_bytes` set.
fn fixture_with(max_response_bytes: usize) -> Fixture {
    fixture_of("count", "{}", max_response_bytes)
}

/// [`fixture`] with another plugin (with `params`) as the `count`
/// aggregation.
fn fixture_of(plugin_name: &str, params: &str, max_response_bytes: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::parse(
        &format!(
            "[source]\nbrokers = \"b:1\"\ntopics = [\"t\"]\n[[aggregation]]\nname = \"count\"\nplugin = {:?}\nparams = {params}\n",
            plugin(plugin_name)
        ),
        "test.toml",
        Path::new("/"),
    )
    .expect("config");
    let runtime = PluginRuntime::new(RuntimeConfig::default()).expect("runtime");
    let loaded = runtime.load(&plugin(plugin_name)).expect("plugin");
    let mut instance = loaded
        .instantiate(&config.aggregations[0].params_json())
        .expect("instance");
    let mut records = Vec::new();
    for n in 0..50u8 {
        for _ in 0..=n {
            records.push(SourceRecord {
                key: Some(format!("k{n}").into_bytes()),
                ..SourceRecord::default()
            });
        }
    }
    records.push(SourceRecord {
        key: Some(vec![0xff, 0x00, b'/']),
        ..SourceRecord::default()
    });
    let mut states = StateMap::default();
    offline::apply_chunk(&mut instance, &mut states, &records, OnError::Fail).expect("apply");
    let store = Arc::new(
        StateStore::open(
            &dir.path().join("state"),
            &["count"],
            &StoreOptions::default(),
        )
        .expect("store"),
    );
    let mut batch = store.begin_write();
    let slot = Slot {
        topic_id: store.topic_id("t").expect("topic id"),
        partition: 0,
    };
    for (key, state) in &states {
        batch.put_state("count", slot, key, state).expect("put");
    }
    store.write(batch).expect("write");
    let status = Arc::new(Status::default());
    status.set_consumer_running(true);
    let state = Arc::new(ApiState {
        store,
        status,
        aggregations: Arc::new(
            vec![QueryableAggregation::new(
                config.aggregations[0].clone(),
                loaded,
            )]
            .into(),
        ),
        max_page: 100,
        max_response_bytes,
        routing: None,
        admin: None,
        feed: wagg::state::feed::ChangeFeed::new(16, 16),
    });
    Fixture { _dir: dir, state }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio")
}

async fn call(
    app: &axum::Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
) -> (StatusCode, Value, axum::http::HeaderMap) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
        .await
        .expect("body");
    // The page and `/metrics` are not JSON: their bodies read as null.
    let json = status.is_success() && {
        let path = uri.split(['?', '#']).next().unwrap_or_default();
        path != "/" && path != "/metrics"
    };
    let body = if json || !status.is_success() {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            let text = String::from_utf8_lossy(&bytes);
            let start: String = text.chars().take(200).collect();
            panic!("{uri}: body is not JSON ({e}): {start:?}")
        })
    } else {
        Value::Null
    };
    (status, body, headers)
}

#[test]
fn lookups_listing_and_errors() {
    let fixture = fixture();
    let app = router(fixture.state.clone(), &HttpPolicy::default());
    let rt = runtime();
    rt.block_on(async {
        let (status, body, _) =
            call(&app, Method::GET, "/v1/aggregations/count/keys/k7", None).await;
        assert_eq!(status, 200);
        assert_eq!(body["state"]["count"], 8);
        // The non-UTF-8 key, by base64 (URL-safe alphabet, no padding).
        let (status, body, _) = call(
            &app,
            Method::GET,
            "/v1/aggregations/count/keys/_wAv?encoding=base64",
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"]["count"], 1);
        let cases: &[(&str, u16, &str)] = &[
            ("/v1/aggregations/nope/keys/k1", 404, "unknown_aggregation"),
            ("/v1/aggregations/count/keys/absent", 404, "unknown_key"),
            ("/v1/aggregations/count/keys/%ff%fe", 400, "bad_request"),
            // A stray `%` is taken literally, as percent-decoding does.
            ("/v1/aggregations/count/keys/%zz", 404, "unknown_key"),
            (
                "/v1/aggregations/count/keys/..%2f..%2fetc%2fpasswd",
                404,
                "unknown_key",
            ),
            ("/v1/aggregations/../../etc/passwd", 404, "no_route"),
            ("/v1/aggregations/count/keys?limit=0", 400, "bad_request"),
            ("/v1/aggregations/count/keys?limit=-1", 400, "bad_request"),
            (
                "/v1/aggregations/count/keys?limit=99999999999999999999999",
                400,
                "bad_request",
            ),
            (
                "/v1/aggregations/count/keys?encoding=rot13",
                400,
                "bad_request",
            ),
            ("/v1/aggregations/count/keys?after=%ff", 400, "bad_request"),
            ("/v1/aggregations/count/keys?bogus=1", 400, "bad_request"),
            (
                "/v1/aggregations/count/keys/k1?encoding=base64",
                400,
                "bad_request",
            ),
        ];
        for (uri, want, code) in cases {
            let (status, body, _) = call(&app, Method::GET, uri, None).await;
            assert_eq!(status.as_u16(), *want, "{uri}: {body}");
            assert_eq!(body["error"]["code"], *code, "{uri}: {body}");
        }
        let long_key = format!("/v1/aggregations/count/keys/{}", "x".repeat(5000));
        let (status, body, _) = call(&app, Method::GET, &long_key, None).await;
        assert_eq!(status, 400, "{body}");
        let too_long = format!("/v1/aggregations/count/keys/{}", "x".repeat(9000));
        let (status, body, _) = call(&app, Method::GET, &too_long, None).await;
        assert_eq!(
            (status.as_u16(), body["error"]["code"].as_str()),
            (414, Some("uri_too_long"))
        );
        let (status, body, _) =
            call(&app, Method::DELETE, "/v1/aggregations/count/keys/k1", None).await;
        assert_eq!(
            (status.as_u16(), body["error"]["code"].as_str()),
            (405, Some("method_not_allowed"))
        );
        // A listing never returns more than `max_page`.
        let (status, body, _) = call(
            &app,
            Method::GET,
            "/v1/aggregations/count/keys?limit=100000",
            None,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body["items"].as_array().map(Vec::len), Some(51));
    });
}

#[test]
fn bearer_token_protects_what_its_scope_says() {
    let fixture = fixture();
    let rt = runtime();
    for scope in [AuthScope::All, AuthScope::Admin] {
        let app = router(
            fixture.state.clone(),
            &HttpPolicy {
                token: Some(TOKEN.to_owned()),
                auth_scope: scope,
                ..HttpPolicy::default()
            },
        );
        rt.block_on(async {
            for probe in ["/healthz", "/readyz"] {
                let (status, _, _) = call(&app, Method::GET, probe, None).await;
                assert_eq!(status, 200, "{probe} needs no token");
            }
            let query = "/v1/aggregations/count/keys/k1";
            let listing = "/v1/aggregations/count/keys";
            for (uri, protected) in [
                ("/v1/aggregations", true),
                ("/metrics", true),
                ("/openapi.json", true),
                (query, scope == AuthScope::All),
                (listing, scope == AuthScope::All),
            ] {
                for token in [None, Some("wrong"), Some(&TOKEN[..TOKEN.len() - 1])] {
                    let (status, body, headers) = call(&app, Method::GET, uri, token).await;
                    if protected {
                        assert_eq!(status, 401, "{scope:?} {uri} {token:?}");
                        assert_eq!(body["error"]["code"], "unauthorized");
                        assert!(headers.contains_key(header::WWW_AUTHENTICATE));
                    } else {
                        assert_eq!(status, 200, "{scope:?} {uri} {token:?}");
                    }
                }
                let (status, _, _) = call(&app, Method::GET, uri, Some(TOKEN)).await;
                assert_eq!(status, 200, "{scope:?} {uri} with the token");
            }
        });
    }
}

#[test]
fn probes_tell_why_they_fail_only_to_callers_with_the_token() {
    let fixture = fixture();
    let rt = runtime();
    let secret_reason = "plugin said: broker kafka-internal-7:9093 refused sasl user alice";
    fixture.state.status.set_fatal(secret_reason.to_owned());
    let app = router(
        fixture.state.clone(),
        &HttpPolicy {
            token: Some(TOKEN.to_owned()),
            auth_scope: AuthScope::Admin,
            ..HttpPolicy::default()
        },
    );
    rt.block_on(async {
        let (status, body, _) = call(&app, Method::GET, "/healthz", None).await;
        assert_eq!(status, 503);
        assert_eq!(body["status"], "failed");
        assert!(!body.to_string().contains("kafka-internal"), "{body}");
        let (status, body, _) = call(&app, Method::GET, "/readyz", None).await;
        assert_eq!(status, 503);
        assert!(!body.to_string().contains("kafka-internal"), "{body}");
        let (_, body, _) = call(&app, Method::GET, "/healthz", Some(TOKEN)).await;
        assert_eq!(body["reason"], secret_reason);
        let (_, body, _) = call(&app, Method::GET, "/readyz", Some(TOKEN)).await;
        assert!(body.to_string().contains("kafka-internal"), "{body}");
    });
    // Without auth there is nobody to hide from.
    let open = router(fixture.state.clone(), &HttpPolicy::default());
    rt.block_on(async {
        let (_, body, _) = call(&open, Method::GET, "/healthz", None).await;
        assert_eq!(body["reason"], secret_reason);
    });
}

/// Serves the fixture on a loopback port with `limits`; returns the
/// address and the flag that stops it.
async fn serve_fixture(
    fixture: &Fixture,
    limits: ConnectionLimits,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(serve(
        listener,
        router(fixture.state.clone(), &HttpPolicy::default()),
        limits,
        fixture.state.status.clone(),
        stop.clone(),
    ));
    (address, stop)
}

/// One lookup on a fresh connection, the way a client does it; its status.
async fn lookup_over_tcp(address: std::net::SocketAddr) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(
            b"GET /v1/aggregations/count/keys/k1 HTTP/1.1\r\nHost: wagg\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Whether the server closed `stream` (a read sees the end, or a reset).
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[test]
fn idle_and_slowloris_connections_do_not_stop_lookups_and_are_closed_after_the_timeout() {
    use tokio::io::AsyncWriteExt;
    let fixture = fixture();
    let rt = runtime();
    let timeout = Duration::from_secs(1);
    rt.block_on(async {
        let limits = ConnectionLimits {
            max_connections: 4096,
            header_read_timeout: timeout,
        };
        let (address, stop) = serve_fixture(&fixture, limits).await;
        let mut idle = Vec::new();
        for _ in 0..2000 {
            idle.push(
                tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect"),
            );
        }
        // A slowloris: a request head one byte at a time, never finished.
        let mut slow = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let trickle = tokio::spawn(async move {
            let head = b"GET /v1/aggregations/count/keys/k1 HTTP/1.1\r\nHost: wagg\r\nX-Slow: ";
            for byte in head.iter().chain(std::iter::repeat(&b'a')).take(200) {
                if slow.write_all(&[*byte]).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        });
        // Meanwhile a normal client is served at once, every time.
        for _ in 0..20 {
            let started = std::time::Instant::now();
            assert_eq!(lookup_over_tcp(address).await, 200);
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "{:?}",
                started.elapsed()
            );
        }
        tokio::time::sleep(timeout * 2).await;
        let mut still_open = 0;
        for stream in &mut idle {
            if !closed_by_server(stream).await {
                still_open += 1;
            }
            if still_open > 0 {
                break;
            }
        }
        assert_eq!(
            still_open, 0,
            "idle connections outlived the header-read timeout"
        );
        assert!(
            trickle.await.expect("task"),
            "the slowloris client was never cut off"
        );
        assert_eq!(lookup_over_tcp(address).await, 200);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

#[test]
fn past_the_connection_limit_new_connections_are_closed_at_once() {
    let fixture = fixture();
    let rt = runtime();
    rt.block_on(async {
        let limits = ConnectionLimits {
            max_connections: 10,
            header_read_timeout: Duration::from_secs(30),
        };
        let (address, stop) = serve_fixture(&fixture, limits).await;
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(
                tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect"),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut extra = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        assert!(
            closed_by_server(&mut extra).await,
            "the 11th connection was kept"
        );
        assert!(
            fixture
                .state
                .status
                .metrics()
                .http_connections_refused
                .get()
                >= 1,
            "refusals are counted"
        );
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            lookup_over_tcp(address).await,
            200,
            "served again once below the limit"
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

#[test]
fn a_request_over_its_time_is_answered_408_and_its_work_stops() {
    // Rendering one state takes a few hundred milliseconds here.
    let fixture = fixture_of("hostile", "{ mode = \"slow-render\" }", 8 << 20);
    let rt = runtime();
    let app = router(
        fixture.state.clone(),
        &HttpPolicy {
            request_timeout: Duration::from_millis(50),
            ..HttpPolicy::default()
        },
    );
    rt.block_on(async {
        for uri in [
            "/v1/aggregations/count/keys/k1",
            "/v1/aggregations/count/keys?limit=50",
        ] {
            let started = std::time::Instant::now();
            let response = app
                .clone()
                .oneshot(
                    Request::builder()
                        .uri(uri)
                        .body(Body::empty())
                        .expect("request"),
                )
                .await
                .expect("infallible");
            assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT, "{uri}");
            assert!(started.elapsed() < Duration::from_millis(200), "{uri}");
        }
        // The listing's 50 renders (many seconds of work) stop after the
        // one in flight when its client is answered 408.
        let rendered = || fixture.state.status.metrics().states_rendered.get();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after_timeout = rendered();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            rendered() <= after_timeout + 1,
            "rendering went on after the 408: {after_timeout} then {}",
            rendered()
        );
    });
}

#[test]
fn answers_are_capped_in_bytes() {
    // Each entry of a page is about 40 bytes: 400 bytes hold about ten.
    let fixture = fixture_with(400);
    let rt = runtime();
    let app = router(fixture.state.clone(), &HttpPolicy::default());
    rt.block_on(async {
        let (status, body, _) = call(
            &app,
            Method::GET,
            "/v1/aggregations/count/keys?limit=100",
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let items = body["items"].as_array().expect("items").len();
        assert!((1..20).contains(&items), "{items} items in 400 bytes");
        let next = body["next"].as_str().expect("a page cut short has a next");
        // Paging on from the cut loses nothing: every key comes once.
        let mut seen = items;
        let mut after = next.to_owned();
        loop {
            let uri = format!("/v1/aggregations/count/keys?limit=100&after={after}");
            let (_, page, _) = call(&app, Method::GET, &uri, None).await;
            seen += page["items"].as_array().expect("items").len();
            match page["next"].as_str() {
                Some(next) => after = next.to_owned(),
                None => break,
            }
        }
        assert_eq!(seen, 51, "every key (k0..k49 and the binary one) once");
    });
    let tiny = fixture_with(10);
    let app = router(tiny.state.clone(), &HttpPolicy::default());
    rt.block_on(async {
        let (status, body, _) =
            call(&app, Method::GET, "/v1/aggregations/count/keys/k1", None).await;
        assert_eq!(status, 500, "{body}");
        assert_eq!(body["error"]["code"], "state_too_large", "{body}");
        assert!(
            body["error"]["message"]
                .to_string()
                .contains("max_response_bytes")
        );
    });
}

#[test]
fn past_the_concurrency_limit_requests_are_shed_with_503() {
    let fixture = fixture();
    let rt = runtime();
    let app = router(
        fixture.state.clone(),
        &HttpPolicy {
            max_concurrent_requests: 1,
            ..HttpPolicy::default()
        },
    );
    rt.block_on(async {
        // Many listings at once against a limit of one: some must be shed,
        // and every answer is either a full page or a JSON 503.
        let mut shed = 0;
        for _round in 0..20 {
            let calls = (0..32).map(|_| {
                let app = app.clone();
                tokio::spawn(async move {
                    call(
                        &app,
                        Method::GET,
                        "/v1/aggregations/count/keys?limit=100",
                        None,
                    )
                    .await
                })
            });
            for handle in calls.collect::<Vec<_>>() {
                let (status, body, _) = handle.await.expect("task");
                match status.as_u16() {
                    200 => assert_eq!(body["items"].as_array().map(Vec::len), Some(51)),
                    503 => {
                        assert_eq!(body["error"]["code"], "overloaded");
                        shed += 1;
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
            if shed > 0 {
                break;
            }
        }
        assert!(shed > 0, "nothing was shed at a limit of 1");
    });
    // With the default limit the same burst is served in full.
    let app = router(fixture.state.clone(), &HttpPolicy::default());
    rt.block_on(async {
        let calls: Vec<_> = (0..32)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move {
                    call(
                        &app,
                        Method::GET,
                        "/v1/aggregations/count/keys?limit=100",
                        None,
                    )
                    .await
                })
            })
            .collect();
        for handle in calls {
            assert_eq!(handle.await.expect("task").0, 200);
        }
    });
}

/// Pieces random request targets are made of: route words, encodings good
/// and broken, traversal attempts, and arbitrary text.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("v1".to_owned()),
        Just("aggregations".to_owned()),
        Just("count".to_owned()),
        Just("keys".to_owned()),
        Just("k1".to_owned()),
        Just("..".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("%".to_owned()),
        Just("%zz".to_owned()),
        Just("%ff%fe%00".to_owned()),
        Just("%2F".to_owned()),
        Just("".to_owned()),
        "[a-zA-Z0-9%._~-]{0,12}",
        "\\PC{0,8}",
    ]
}

fn query() -> impl Strategy<Value = String> {
    let pair = (
        prop_oneof![
            Just("limit"),
            Just("after"),
            Just("prefix"),
            Just("encoding"),
            Just("x")
        ],
        prop_oneof![
            Just("base64".to_owned()),
            Just("-1".to_owned()),
            Just("0".to_owned()),
            Just("3".to_owned()),
            Just("%".to_owned()),
            Just("%ff".to_owned()),
            "[a-zA-Z0-9%+/=]{0,10}",
        ],
    )
        .prop_map(|(k, v)| format!("{k}={v}"));
    prop::collection::vec(pair, 0..4).prop_map(|pairs| pairs.join("&"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// With `scope = "all"`, whatever the target, nothing but the probes
    /// and the page is answered without the token.
    #[test]
    fn without_the_token_only_the_probes_and_the_page_answer(
        segments in prop::collection::vec(segment(), 0..6),
        query in query(),
    ) {
        static FIXTURE: std::sync::OnceLock<(Fixture, tokio::runtime::Runtime)> = std::sync::OnceLock::new();
        let (fixture, rt) = FIXTURE.get_or_init(|| (fixture(), runtime()));
        let app = router(
            fixture.state.clone(),
            &HttpPolicy {
                token: Some(TOKEN.to_owned()),
                auth_scope: AuthScope::All,
                ..HttpPolicy::default()
            },
        );
        let mut uri = format!("/{}", segments.join("/"));
        if !query.is_empty() {
            uri = format!("{uri}?{query}");
        }
        let Ok(parsed) = uri.parse::<axum::http::Uri>() else {
            return Ok(());
        };
        let open = ["/", "/healthz", "/readyz"].contains(&parsed.path());
        let (status, _, _) = rt.block_on(call(&app, Method::GET, &uri, None));
        if open {
            prop_assert_ne!(status.as_u16(), 401, "{}", uri);
        } else {
            // 414 comes first: a target too long is refused before auth.
            prop_assert!(status.as_u16() == 401 || status.as_u16() == 414, "{}: {}", uri, status);
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever the target, the router answers (no panic) with JSON (but
    /// for the dashboard page and `/metrics`) and a status that is not a
    /// server error.
    #[test]
    fn random_targets_get_json_answers_and_never_a_5xx(
        segments in prop::collection::vec(segment(), 0..7),
        query in query(),
        method in prop_oneof![Just(Method::GET), Just(Method::GET), Just(Method::POST), Just(Method::HEAD)],
    ) {
        static FIXTURE: std::sync::OnceLock<(Fixture, tokio::runtime::Runtime)> = std::sync::OnceLock::new();
        let (fixture, rt) = FIXTURE.get_or_init(|| (fixture(), runtime()));
        let app = router(fixture.state.clone(), &HttpPolicy::default());
        let mut uri = format!("/{}", segments.join("/"));
        if !query.is_empty() {
            uri = format!("{uri}?{query}");
        }
        // Targets `http` itself refuses never reach wagg (hyper answers 400).
        prop_assume!(uri.parse::<axum::http::Uri>().is_ok());
        let is_head = method == Method::HEAD;
        let (status, body) = rt.block_on(async {
            let response = app
                .clone()
                .oneshot(Request::builder().method(method).uri(&uri).body(Body::empty()).expect("request"))
                .await
                .expect("infallible");
            let status = response.status();
            let bytes = tokio::time::timeout(
                Duration::from_secs(10),
                axum::body::to_bytes(response.into_body(), 1 << 24),
            )
            .await
            .expect("answered in time")
            .expect("body");
            (status, bytes)
        });
        // One request at a time, far below the concurrency limit: nothing
        // is shed, so a 503 would be a fault too.
        prop_assert!(status.as_u16() < 500, "{uri}: {status}");
        // The two documented non-JSON answers: the dashboard page and the
        // Prometheus text.
        let parsed: axum::http::Uri = uri.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let path = parsed.path();
        let not_json = status.is_success() && (path == "/" || path == "/metrics");
        if !is_head && !not_json {
            let json: Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("{uri}: not JSON: {e}")))?;
            if !status.is_success() {
                prop_assert!(json["error"]["code"].is_string(), "{uri}: {json}");
            }
        }
    }
}
