//! The lookup load generator of `wagg bench query`: key lookups over HTTP
//! (keep-alive, loopback) at a fixed rate or as fast as possible.
//!
//! Fixed-rate runs are open-loop: each request has a scheduled send time
//! and its latency is measured from that time, so a stalled server shows up
//! in the percentiles instead of silently lowering the request rate
//! (no coordinated omission).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Rng, key};

#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub phase: String,
    pub target_rate: Option<u32>,
    pub achieved_rate: f64,
    pub requests: u64,
    /// Transport failures and statuses other than 200 and 404.
    pub errors: u64,
    /// 404s: keys not ingested yet.
    pub not_found: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

struct Worker {
    histogram: Histogram<u64>,
    requests: u64,
    errors: u64,
    not_found: u64,
}

fn lookup(client: &reqwest::blocking::Client, url: &str, worker: &mut Worker, since: Instant) {
    let outcome = client.get(url).send().map(|r| {
        let status = r.status().as_u16();
        // Read the body: a lookup is only done once its answer arrived.
        let _ = r.bytes();
        status
    });
    let micros = since.elapsed().as_micros() as u64;
    let _ = worker.histogram.record(micros.max(1));
    worker.requests += 1;
    match outcome {
        Ok(200) => {}
        Ok(404) => worker.not_found += 1,
        _ => worker.errors += 1,
    }
}

fn new_worker() -> anyhow::Result<(reqwest::blocking::Client, Worker)> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(1)
        .build()?;
    let histogram = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    Ok((
        client,
        Worker {
            histogram,
            requests: 0,
            errors: 0,
            not_found: 0,
        },
    ))
}

fn combine(
    phase: &str,
    target_rate: Option<u32>,
    workers: Vec<Worker>,
    elapsed: Duration,
) -> anyhow::Result<LoadResult> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut requests, mut errors, mut not_found) = (0, 0, 0);
    for worker in workers {
        histogram.add(&worker.histogram)?;
        requests += worker.requests;
        errors += worker.errors;
        not_found += worker.not_found;
    }
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(LoadResult {
        phase: phase.to_owned(),
        target_rate,
        achieved_rate: requests as f64 / elapsed.as_secs_f64().max(1e-9),
        requests,
        errors,
        not_found,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
    })
}

fn join_workers(
    handles: Vec<std::thread::ScopedJoinHandle<'_, anyhow::Result<Worker>>>,
) -> anyhow::Result<Vec<Worker>> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))?
        })
        .collect()
}

/// Lookups of random keys among `keys` at `rate` per second from `threads`
/// threads, until `stop` is set or `max` has passed.
pub fn fixed_rate(
    base: &str,
    aggregation: &str,
    keys: u64,
    rate: u32,
    threads: usize,
    stop: &AtomicBool,
    max: Duration,
) -> anyhow::Result<LoadResult> {
    let threads = threads.max(1);
    let interval = Duration::from_secs_f64(threads as f64 / f64::from(rate.max(1)));
    let started = Instant::now();
    let workers = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<Worker> {
                    let (client, mut worker) = new_worker()?;
                    let mut rng = Rng(0xA076_1D64_78BD_642F ^ t as u64);
                    // Threads are staggered so the requests are evenly spaced.
                    let mut due = started + interval.mul_f64(t as f64 / threads as f64);
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < max {
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        let url = format!(
                            "{base}/v1/aggregations/{aggregation}/keys/{}",
                            key(rng.next_u64() % keys)
                        );
                        lookup(&client, &url, &mut worker, due);
                        due += interval;
                    }
                    Ok(worker)
                })
            })
            .collect();
        join_workers(handles)
    })?;
    combine("during ingestion", Some(rate), workers, started.elapsed())
}

/// Lookups as fast as `threads` closed-loop clients can go, for `duration`.
pub fn max_rate(
    base: &str,
    aggregation: &str,
    keys: u64,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let started = Instant::now();
    let workers = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<Worker> {
                    let (client, mut worker) = new_worker()?;
                    let mut rng = Rng(0xE703_7ED1_A0B4_28DB ^ t as u64);
                    while started.elapsed() < duration {
                        let url = format!(
                            "{base}/v1/aggregations/{aggregation}/keys/{}",
                            key(rng.next_u64() % keys)
                        );
                        lookup(&client, &url, &mut worker, Instant::now());
                    }
                    Ok(worker)
                })
            })
            .collect();
        join_workers(handles)
    })?;
    combine(
        "ingestion stopped, max rate",
        None,
        workers,
        started.elapsed(),
    )
}
