//! Prometheus metrics: instruments updated where the work happens (per
//! batch, per write, per request — never per record), rendered with a
//! scrape-time collector of the totals kept elsewhere (`snapshot`).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AggregationLabel {
    pub aggregation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    pub aggregation: String,
    /// `hit` (in memory) or `miss` (read from RocksDB).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabel {
    /// The route pattern (`/v1/aggregations/{name}/keys/{key}`), never the
    /// raw path, so keys do not become label values.
    pub route: String,
    pub status: u16,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The live instruments. Clones share their values.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub records_consumed: Counter,
    pub records_redelivered: Counter,
    pub batch_records: Histogram,
    pub batch_seconds: Histogram,
    pub plugin_call_seconds: HistogramFamily<AggregationLabel>,
    pub state_lookups: Family<CacheLabel, Counter>,
    pub write_seconds: Histogram,
    pub write_states: Histogram,
    pub http_requests: Family<HttpLabel, Counter>,
    pub http_seconds: HistogramFamily<HttpLabel>,
    pub http_connections_refused: Counter,
    pub states_rendered: Counter,
    pub changelog_records: Counter,
    pub restored_records: Counter,
    pub forwarded_requests: Counter,
    pub standby_records: Counter,
    pub standby_lookups: Counter,
    /// Seconds from a flush's write to its event for a watcher.
    pub watch_delivery_seconds: Histogram,
    pub watch_lagged: Counter,
    pub watchers: Gauge,
}

fn seconds_histogram() -> Histogram {
    // 100 µs .. ~18 s
    Histogram::new(exponential_buckets(0.000_1, 3.0, 12))
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            records_consumed: Counter::default(),
            records_redelivered: Counter::default(),
            batch_records: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            batch_seconds: seconds_histogram(),
            plugin_call_seconds: Family::new_with_constructor(seconds_histogram),
            state_lookups: Family::default(),
            write_seconds: seconds_histogram(),
            write_states: Histogram::new(exponential_buckets(1.0, 4.0, 11)),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(seconds_histogram),
            http_connections_refused: Counter::default(),
            states_rendered: Counter::default(),
            changelog_records: Counter::default(),
            restored_records: Counter::default(),
            forwarded_requests: Counter::default(),
            standby_records: Counter::default(),
            standby_lookups: Counter::default(),
            // 100 µs .. ~13 s in steps of 1.5x: fine enough for p50/p99.
            watch_delivery_seconds: Histogram::new(exponential_buckets(0.000_1, 1.5, 30)),
            watch_lagged: Counter::default(),
            watchers: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Drops the series of an aggregation no longer applied (a reload
    /// removed it): a scrape should not show it frozen.
    pub fn forget_aggregation(&self, aggregation: &str) {
        self.plugin_call_seconds.remove(&AggregationLabel {
            aggregation: aggregation.to_owned(),
        });
        for result in ["hit", "miss"] {
            self.state_lookups.remove(&CacheLabel {
                aggregation: aggregation.to_owned(),
                result,
            });
        }
    }

    /// The text exposition (OpenMetrics) of the live instruments and
    /// `snapshot` (the totals read at scrape time).
    // A list of registrations, one per instrument.
    pub fn render(&self, snapshot: impl Collector + 'static) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::with_prefix("wagg");
        registry.register(
            "records_consumed",
            "Records received from the broker (including redeliveries)",
            self.records_consumed.clone(),
        );
        registry.register(
            "records_redelivered",
            "Records received again below their partition's next offset and dropped",
            self.records_redelivered.clone(),
        );
        registry.register(
            "batch_records",
            "Records per applied batch",
            self.batch_records.clone(),
        );
        registry.register(
            "batch_apply_seconds",
            "Time to apply one batch to every aggregation (plugin calls, state reads, dead letters)",
            self.batch_seconds.clone(),
        );
        registry.register(
            "plugin_call_seconds",
            "Time of one plugin call (one batch of one aggregation)",
            self.plugin_call_seconds.clone(),
        );
        registry.register(
            "state_lookups",
            "State reads by the consumer: hit = in memory, miss = read from RocksDB",
            self.state_lookups.clone(),
        );
        registry.register(
            "state_write_seconds",
            "Time of one state write (states, counters and offsets in one RocksDB write batch)",
            self.write_seconds.clone(),
        );
        registry.register(
            "state_write_states",
            "States per state write",
            self.write_states.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            self.http_requests.clone(),
        );
        registry.register(
            "http_request_seconds",
            "HTTP request latency by route and status",
            self.http_seconds.clone(),
        );
        registry.register(
            "changelog_records",
            "State records produced to changelog topics (cluster mode)",
            self.changelog_records.clone(),
        );
        registry.register(
            "restored_records",
            "Changelog records applied while restoring partitions taken over (cluster mode)",
            self.restored_records.clone(),
        );
        registry.register(
            "http_connections_refused",
            "Connections closed at once because `http.max_connections` were open",
            self.http_connections_refused.clone(),
        );
        registry.register(
            "states_rendered",
            "States rendered by plugins for HTTP answers",
            self.states_rendered.clone(),
        );
        registry.register(
            "forwarded_requests",
            "Lookups and listings forwarded to (or asked of) other instances (cluster mode)",
            self.forwarded_requests.clone(),
        );
        registry.register(
            "standby_records",
            "Changelog records applied to standby copies of other instances' partitions (cluster mode)",
            self.standby_records.clone(),
        );
        registry.register(
            "standby_lookups",
            "Lookups answered from a standby copy because the owner was not answering (cluster mode)",
            self.standby_lookups.clone(),
        );
        registry.register(
            "watch_delivery_seconds",
            "Seconds from a flush's write to its event for a live subscriber (rendered, handed to the connection)",
            self.watch_delivery_seconds.clone(),
        );
        registry.register(
            "watch_lagged",
            "Live subscriptions closed because their subscriber fell behind (`http.watch_buffer`)",
            self.watch_lagged.clone(),
        );
        registry.register(
            "watchers",
            "Open live subscriptions (`/watch`, `/changes`)",
            self.watchers.clone(),
        );
        registry.register_collector(Box::new(snapshot));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    }
}
