//! Progress while `wagg run` works through a backlog: a live line on an
//! interactive terminal, periodic structured log lines otherwise.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ops::status::Status;

/// One reading of the consumer's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Records received since start (redeliveries excluded).
    pub records: u64,
    /// Records per second since the previous reading.
    pub rate: f64,
    /// Sum of the known per-partition lags.
    pub lag: i64,
    /// `topic/partition=lag` for the partitions still behind.
    pub behind: Vec<String>,
    /// Seconds to catch up at `rate`, when behind and moving.
    pub eta_seconds: Option<f64>,
}

/// Reads `Status` and computes rates between readings.
pub struct Tracker {
    status: Arc<Status>,
    last: Option<(Instant, u64)>,
}

impl Tracker {
    pub fn new(status: Arc<Status>) -> Self {
        Self { status, last: None }
    }

    pub fn read(&mut self) -> Progress {
        let metrics = self.status.metrics();
        let records = metrics
            .records_consumed
            .get()
            .saturating_sub(metrics.records_redelivered.get());
        let now = Instant::now();
        let rate = match self.last {
            Some((at, before)) => {
                let seconds = now.duration_since(at).as_secs_f64();
                if seconds > 0.0 {
                    records.saturating_sub(before) as f64 / seconds
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, records));
        let partitions = self.status.partitions();
        let behind: Vec<String> = partitions
            .iter()
            .filter(|p| p.assigned && p.lag.unwrap_or(0) > 0)
            .map(|p| format!("{}/{}={}", p.topic, p.partition, p.lag.unwrap_or(0)))
            .collect();
        let lag: i64 = partitions
            .iter()
            .filter(|p| p.assigned)
            .filter_map(|p| p.lag)
            .sum();
        let eta_seconds = (lag > 0 && rate > 0.0).then(|| lag as f64 / rate);
        Progress {
            records,
            rate,
            lag,
            behind,
            eta_seconds,
        }
    }
}

impl Progress {
    /// One line for humans.
    pub fn summary(&self) -> String {
        let eta = match self.eta_seconds {
            Some(seconds) => format!(", caught up in ~{}", human_duration(seconds)),
            None if self.lag == 0 => ", caught up".to_owned(),
            None => String::new(),
        };
        format!(
            "{} records ({:.0}/s), lag {} over {} partition(s){eta}",
            self.records,
            self.rate,
            self.lag,
            self.behind.len()
        )
    }
}

fn human_duration(seconds: f64) -> String {
    let seconds = seconds.round() as u64;
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 => format!("{} min {} s", seconds / 60, seconds % 60),
        _ => format!("{} h {} min", seconds / 3600, (seconds % 3600) / 60),
    }
}

/// The live progress line while one is shown, so log output can step
/// around it.
static LIVE_LINE: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Log output to stderr that never lands on the live progress line: each
/// event is buffered and written in one piece with the line cleared, then
/// the line is drawn again below it. Use as `tracing_subscriber`'s writer.
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter(Vec::new())
    }
}

/// One log event's bytes, written out when the event is complete.
pub struct EventWriter(Vec<u8>);

impl Write for EventWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let write = || {
            let _ = std::io::stderr().lock().write_all(&self.0);
        };
        let live = LIVE_LINE.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match live {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }
}

fn show_live_line(bar: Option<indicatif::ProgressBar>) {
    *LIVE_LINE.lock().unwrap_or_else(|p| p.into_inner()) = bar;
}

/// Reports progress until `shutdown`: a spinner line on a terminal
/// (refreshed twice a second), otherwise a log line every `interval` while
/// there is a backlog or records are flowing, and one when caught up.
pub fn report(status: Arc<Status>, shutdown: &AtomicBool, interval: Duration) {
    let mut tracker = Tracker::new(status);
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        show_live_line(Some(bar.clone()));
        while !shutdown.load(Ordering::Relaxed) {
            bar.set_message(tracker.read().summary());
            bar.tick();
            std::thread::sleep(Duration::from_millis(500));
        }
        show_live_line(None);
        bar.finish_and_clear();
        return;
    }
    let mut was_busy = false;
    let mut next = Instant::now() + interval;
    while !shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        if Instant::now() < next {
            continue;
        }
        next = Instant::now() + interval;
        let progress = tracker.read();
        let busy = progress.lag > 0 || progress.rate > 0.0;
        if busy {
            tracing::info!(
                records = progress.records,
                rate = progress.rate.round() as u64,
                lag = progress.lag,
                eta_seconds = progress.eta_seconds.map(|s| s.round() as u64),
                behind = %progress.behind.join(","),
                "progress: {}",
                progress.summary()
            );
        } else if was_busy {
            tracing::info!(records = progress.records, "caught up");
        }
        was_busy = busy;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_give_rate_lag_and_eta() {
        let status = Arc::new(Status::default());
        status.set_assigned("t", 0, true);
        status.set_assigned("t", 1, true);
        status.set_next_offset("t", 0, 100);
        status.set_high_watermark("t", 0, 1100);
        status.set_next_offset("t", 1, 50);
        status.set_high_watermark("t", 1, 50);
        let mut tracker = Tracker::new(status.clone());
        let first = tracker.read();
        assert_eq!(first.lag, 1000);
        assert_eq!(first.behind, vec!["t/0=1000".to_owned()]);
        assert_eq!(first.eta_seconds, None, "no rate yet");
        status.metrics().records_consumed.inc_by(500);
        std::thread::sleep(Duration::from_millis(100));
        let second = tracker.read();
        assert_eq!(second.records, 500);
        assert!(second.rate > 0.0);
        let eta = second.eta_seconds.expect("eta");
        assert!((eta - 1000.0 / second.rate).abs() < 1e-9);
        assert!(
            second.summary().contains("caught up in ~"),
            "{}",
            second.summary()
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(42.4), "42 s");
        assert_eq!(human_duration(125.0), "2 min 5 s");
        assert_eq!(human_duration(7300.0), "2 h 1 min");
    }
}
