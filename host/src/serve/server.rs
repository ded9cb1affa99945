//! The connection side of the API: accepting, limiting and closing TCP
//! connections, then handing each to hyper with the router as its service.
//!
//! `axum::serve` sets no timers and accepts without bound, so an idle or
//! slowloris client holds a connection (and its memory) for ever and 2,000
//! of them are 2,000 tasks. Here:
//! - at most `http.max_connections` are open; past it a new connection is
//!   closed as soon as it is accepted (counted in
//!   `wagg_http_connections_refused_total`);
//! - a connection that has not sent a whole request head within
//!   `http.header_read_timeout_ms` is closed — new ones, slow ones and idle
//!   keep-alive ones alike (hyper's HTTP/1 header-read timer);
//! - on shutdown, connections finish the request in flight and close;
//! - HTTP/1.1 only (as every client of the API speaks it): telling HTTP/2
//!   apart first would read from a silent connection with no timer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::ops::status::Status;

/// How long connections may take to finish their request on shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Connection limits (`[http]`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` is set.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    status: Arc<Status>,
    shutdown: Arc<AtomicBool>,
) {
    // HTTP/1.1 only: detecting HTTP/2 first would wait on a silent
    // connection with no timer at all.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let stopping = wait_for(shutdown);
    tokio::pin!(stopping);
    loop {
        let stream = tokio::select! {
            () = &mut stopping => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, usually: back off instead of
                    // spinning on the error.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            status.metrics().http_connections_refused.inc();
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are the client's (reset, timed out, bad HTTP).
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection closed with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?DRAIN_TIMEOUT,
            "some HTTP connections did not finish before shutdown"
        );
    }
}

async fn wait_for(flag: Arc<AtomicBool>) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
