//! wagg's librdkafka plumbing, shared by every client of the source
//! brokers (the source consumer, the dead-letter producer, the cluster's
//! changelog producer and readers): one way to build a client from the
//! resolved properties, one producer context that reports delivery
//! failures, one rule for which errors are worth retrying, and the bridge
//! from librdkafka's log to `tracing`. Imports nothing of the host but
//! [`Status`] (where client errors are reported).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{
    ClientConfig, FromClientConfig, FromClientConfigAndContext, RDKafkaLogLevel,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};

use crate::ops::status::Status;

mod headers;

pub use headers::read_headers;

/// What every client of the source brokers is built from: the brokers and
/// the librdkafka properties the user configured for it (resolved from
/// the config once, in `app`).
#[derive(Debug, Clone, Default)]
pub struct ClientProperties {
    brokers: String,
    properties: Vec<(String, String)>,
}

impl ClientProperties {
    pub fn new<'a>(brokers: &str, properties: impl IntoIterator<Item = (&'a str, String)>) -> Self {
        Self {
            brokers: brokers.to_owned(),
            properties: properties
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect(),
        }
    }

    /// A client configuration: `bootstrap.servers`, wagg's `defaults` for
    /// this client, then the user's properties (which win), and
    /// librdkafka's log at warning level and up.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.brokers);
        for (name, value) in defaults {
            client.set(*name, *value);
        }
        for (name, value) in &self.properties {
            client.set(name, value);
        }
        client.set_log_level(RDKafkaLogLevel::Warning);
        client
    }
}

/// A client that could not be created; the message names the property at
/// fault but never shows a configured value: `[source.kafka]` and
/// `[dead_letter.kafka]` may hold credentials, and librdkafka quotes the
/// value it rejects (`Invalid value "..." for configuration property ...`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(String);

/// Creates a librdkafka client (consumer, producer, admin) from `config`.
pub fn create_client<T: FromClientConfig>(config: &ClientConfig) -> Result<T, ClientError> {
    T::from_config(config).map_err(|error| ClientError(redact(config, &error)))
}

/// [`create_client`] with a context.
pub fn create_client_with_context<T, C>(config: &ClientConfig, context: C) -> Result<T, ClientError>
where
    C: ClientContext,
    T: FromClientConfigAndContext<C>,
{
    T::from_config_and_context(config, context).map_err(|error| ClientError(redact(config, &error)))
}

/// The text of `error` without any of `config`'s values in it.
fn redact(config: &ClientConfig, error: &KafkaError) -> String {
    let text = match error {
        // librdkafka's description quotes the rejected value; only the
        // property's name (also quoted) is kept.
        KafkaError::ClientConfig(_, description, name, _) => {
            let description: String = description
                .split('"')
                .enumerate()
                .map(|(i, part)| match i % 2 {
                    1 if part != name => "\"<redacted>\"".to_owned(),
                    1 => format!("\"{part}\""),
                    _ => part.to_owned(),
                })
                .collect();
            format!("client property `{name}`: {description}")
        }
        other => other.to_string(),
    };
    // Whatever else quotes a value: every configured value long enough to
    // be recognised is replaced (the brokers are not secret and help).
    config
        .config_map()
        .into_iter()
        .filter(|(name, value)| *name != "bootstrap.servers" && value.len() >= 4)
        .fold(text, |text, (_, value)| text.replace(value, "<redacted>"))
}

/// Defaults of wagg's producers (dead letters, changelogs).
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    // Retries inside librdkafka neither duplicate nor reorder.
    ("enable.idempotence", "true"),
    // Surface an outage to the retry loops (and /readyz) after 30 s
    // rather than librdkafka's default of five minutes.
    ("message.timeout.ms", "30000"),
    ("linger.ms", "5"),
];

/// A producer context that reports client errors to `Status` and collects
/// delivery failures by the index the record was sent with (the dead-letter
/// sink's letters; the cluster's changelog producer sends everything as 0).
pub struct DeliveryContext {
    /// Which producer, in log lines and on `/readyz`.
    name: &'static str,
    status: Arc<Status>,
    failures: Mutex<Vec<(usize, KafkaError)>>,
    /// Topic → partition → the offset after the last record delivered
    /// (`None`: not tracked).
    delivered: Option<Mutex<DeliveredEnds>>,
}

/// Topic → partition → the offset after the last record delivered there.
pub type DeliveredEnds = HashMap<String, HashMap<i32, i64>>;

impl DeliveryContext {
    pub fn new(name: &'static str, status: Arc<Status>) -> Self {
        Self {
            name,
            status,
            failures: Mutex::new(Vec::new()),
            delivered: None,
        }
    }

    /// Also keeps where delivered records landed (see `take_delivered`).
    pub fn tracking_offsets(mut self) -> Self {
        self.delivered = Some(Mutex::new(HashMap::new()));
        self
    }

    /// The status this producer reports its errors to.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// The failures reported since the last call.
    pub fn take_failures(&self) -> Vec<(usize, KafkaError)> {
        std::mem::take(&mut *self.failures.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Where the records delivered since the last call end, per topic and
    /// partition (empty unless `tracking_offsets`).
    pub fn take_delivered(&self) -> DeliveredEnds {
        self.delivered
            .as_ref()
            .map_or_else(HashMap::new, |delivered| {
                std::mem::take(&mut *delivered.lock().unwrap_or_else(|p| p.into_inner()))
            })
    }
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(repeated) = REPEATS.admit(&format!("{} {error} {reason}", self.name)) {
            tracing::warn!(%error, reason, producer = self.name, repeated, "producer error");
        }
        self.status
            .broker_error(format!("{}: {error}: {reason}", self.name));
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(level, fac, log_message);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        match result {
            Err((error, _)) => self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((index, error.clone())),
            Ok(message) => {
                let Some(delivered) = &self.delivered else {
                    return;
                };
                let mut delivered = delivered.lock().unwrap_or_else(|p| p.into_inner());
                let end = message.offset() + 1;
                let partitions = match delivered.get_mut(message.topic()) {
                    Some(partitions) => partitions,
                    None => delivered.entry(message.topic().to_owned()).or_default(),
                };
                let slot = partitions.entry(message.partition()).or_insert(end);
                *slot = (*slot).max(end);
            }
        }
    }
}

/// Errors a later attempt may get past: the broker is away or slow.
pub fn is_transient(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageTimedOut
                | AllBrokersDown
                | BrokerTransportFailure
                | RequestTimedOut
                | NetworkException
                | LeaderNotAvailable
                | NotLeaderForPartition
                | NotEnoughReplicas
                | NotEnoughReplicasAfterAppend
                | QueueFull
                | OperationTimedOut
                | Resolve
        )
    )
}

/// librdkafka's log lines, through `tracing` at the matching level;
/// warnings and errors that repeat are rate-limited ([`Repeats`]).
pub fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, log_message: &str) {
    let error = match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => true,
        RDKafkaLogLevel::Warning => false,
        _ => {
            tracing::debug!(target: "librdkafka", fac, "{log_message}");
            return;
        }
    };
    let Some(repeated) = REPEATS.admit(&format!("{fac} {log_message}")) else {
        return;
    };
    if error {
        tracing::error!(target: "librdkafka", fac, repeated, "{log_message}");
    } else {
        tracing::warn!(target: "librdkafka", fac, repeated, "{log_message}");
    }
}

/// Every broker warning and error of the process goes through this one
/// limiter.
pub static REPEATS: Repeats = Repeats::new(Duration::from_secs(10));

/// A limiter of repeated log lines: a broker that is down makes every
/// client say the same thing many times a second. A line is logged the
/// first time, then at most once per `every` with how many like it were
/// left out meanwhile (`repeated`). Lines are alike when they differ only
/// in digits (times, ports, counts).
pub struct Repeats {
    every: Duration,
    seen: Mutex<Option<HashMap<String, (Instant, u64)>>>,
}

/// Distinct lines remembered; past it the memory starts over (a flood of
/// distinct lines is logged, never held).
const MAX_REMEMBERED_LINES: usize = 1024;

impl Repeats {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            seen: Mutex::new(None),
        }
    }

    /// `Some(left out since the last time it was logged)` when `line`
    /// should be logged now (`Some(None)` when none was: a log field of
    /// `None` is not written); `None` when it is left out.
    pub fn admit(&self, line: &str) -> Option<Option<u64>> {
        let shape: String = line
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(200)
            .collect();
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = seen.get_or_insert_with(HashMap::new);
        if seen.len() >= MAX_REMEMBERED_LINES && !seen.contains_key(&shape) {
            seen.clear();
        }
        match seen.get_mut(&shape) {
            Some((last, left_out)) if now.duration_since(*last) < self.every => {
                *left_out += 1;
                None
            }
            Some((last, left_out)) => {
                *last = now;
                Some(Some(std::mem::take(left_out)).filter(|&n| n > 0))
            }
            None => {
                seen.insert(shape, (now, 0));
                Some(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::producer::BaseProducer;

    use super::*;

    #[test]
    fn repeated_lines_are_logged_once_per_period_with_the_count_left_out() {
        let repeats = Repeats::new(Duration::from_millis(200));
        let line =
            |ms: u32| format!("Connect to 127.0.0.1:9 failed (after {ms}ms in state CONNECT)");
        assert_eq!(repeats.admit(&line(1)), Some(None));
        for ms in 2..12 {
            assert_eq!(
                repeats.admit(&line(ms)),
                None,
                "alike: differs in digits only"
            );
        }
        assert_eq!(repeats.admit("another line"), Some(None));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(repeats.admit(&line(99)), Some(Some(10)));
        assert_eq!(repeats.admit(&line(100)), None);
    }

    #[test]
    fn a_rejected_property_is_named_but_its_value_is_never_shown() {
        let secret = "hunter2-very-secret";
        let properties = ClientProperties::new(
            "127.0.0.1:9",
            [
                ("sasl.password", secret.to_owned()),
                // Invalid: librdkafka's message quotes the value.
                ("security.protocol", secret.to_owned()),
            ],
        );
        let config = properties.client_config(&[]);
        let error = create_client::<BaseProducer>(&config)
            .err()
            .expect("an invalid protocol must be refused");
        let message = error.to_string();
        assert!(message.contains("security.protocol"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        // rdkafka's own message shows it: the redaction is what hides it.
        let raw = config.create::<BaseProducer>().err().expect("refused");
        assert!(raw.to_string().contains(secret), "{raw}");
    }
}

/// Why a producer's records were not all acknowledged.
#[derive(Debug)]
pub enum Unacknowledged {
    /// A failure no retry gets past, of the record with opaque `index`.
    Permanent { index: usize, error: KafkaError },
    /// Shutting down with this many records unacknowledged.
    Interrupted { undelivered: usize },
}

/// Queues `record` (its opaque is its index), waiting while the queue is
/// full, until `shutdown`.
pub fn send_patiently<K, P>(
    producer: &BaseProducer<DeliveryContext>,
    mut record: BaseRecord<'_, K, P, usize>,
    shutdown: &AtomicBool,
) -> Result<(), Unacknowledged>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                if shutdown.load(Ordering::Relaxed) {
                    return Err(Unacknowledged::Interrupted {
                        undelivered: producer.in_flight_count().max(0) as usize + 1,
                    });
                }
                record = returned;
                producer.poll(Duration::from_millis(50));
            }
            Err((error, returned)) => {
                return Err(Unacknowledged::Permanent {
                    index: returned.delivery_opaque,
                    error,
                });
            }
        }
    }
}

/// Sends records `0..count` (`send` queues record `i`, e.g. with
/// [`send_patiently`]) and returns once the broker has acknowledged all of
/// them. Transient failures are retried — the failed records, in order —
/// with backoff until `shutdown`, each round logged and reported to the
/// status as `what`.
pub fn deliver_all(
    producer: &BaseProducer<DeliveryContext>,
    count: usize,
    shutdown: &AtomicBool,
    what: &str,
    mut send: impl FnMut(usize) -> Result<(), Unacknowledged>,
) -> Result<(), Unacknowledged> {
    let mut pending: Vec<usize> = (0..count).collect();
    let mut backoff = Duration::from_millis(200);
    while !pending.is_empty() {
        for &index in &pending {
            send(index)?;
        }
        while producer.in_flight_count() > 0 {
            if shutdown.load(Ordering::Relaxed) {
                return Err(Unacknowledged::Interrupted {
                    undelivered: producer.in_flight_count().max(0) as usize,
                });
            }
            // Flush returns early once everything is acknowledged.
            let _ = producer.flush(Duration::from_millis(200));
        }
        let mut failures = producer.context().take_failures();
        if let Some((index, error)) = failures.iter().find(|(_, e)| !is_transient(e)) {
            return Err(Unacknowledged::Permanent {
                index: *index,
                error: error.clone(),
            });
        }
        failures.sort_by_key(|(index, _)| *index);
        pending = failures.iter().map(|(index, _)| *index).collect();
        if let Some((_, error)) = failures.first() {
            tracing::warn!(%error, unacknowledged = pending.len(), what, "records not acknowledged; retrying");
            producer
                .context()
                .status()
                .broker_error(format!("{what}: {error}"));
            sleep_unless(shutdown, backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    Ok(())
}

/// Sleeps for `duration`, or less if `shutdown` is set meanwhile.
pub fn sleep_unless(shutdown: &AtomicBool, duration: Duration) {
    let until = Instant::now() + duration;
    while Instant::now() < until && !shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}
