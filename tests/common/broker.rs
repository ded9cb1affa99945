//! A real Kafka-API broker (tansu, SQLite storage) on a free loopback port,
//! stopped when dropped.

use std::process::{Command, Stdio};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use wagg::tools::tansu::{self, Tansu, tansu_binary};

pub struct Broker {
    tansu: Tansu,
    pub address: String,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    tansu::free_port().expect("a free loopback port")
}

impl Broker {
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let tansu = Tansu::start(&tansu_binary(None), dir.path(), "sqlite://tansu.db")
            .unwrap_or_else(|e| panic!("{e:#}"));
        Broker {
            address: tansu.address().to_owned(),
            tansu,
            _dir: dir,
        }
    }

    /// Kills the broker (its data stays on disk).
    pub fn stop(&mut self) {
        self.tansu.stop();
    }

    /// Starts the broker again on the same address and data.
    pub fn restart(&mut self) {
        self.tansu.restart().unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(self.tansu.binary())
            .args(["topic", "create", name])
            .args(["--partitions", &partitions.to_string()])
            .args(["--broker", &format!("tcp://{}", self.address)])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "creating topic {name} failed");
    }

    pub fn producer(&self) -> ThreadedProducer<DefaultProducerContext> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.address)
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .set("batch.num.messages", "2000")
            .create()
            .expect("producer")
    }

    /// Produces `(partition, key, value)` records and waits until all are
    /// acknowledged.
    pub fn produce(&self, topic: &str, records: &[(i32, String, String)]) {
        send_all(&self.producer(), topic, records);
    }
}

/// A producer for a broker started elsewhere (e.g. from another thread).
pub struct ProducerOnly {
    producer: ThreadedProducer<DefaultProducerContext>,
}

impl ProducerOnly {
    pub fn new(address: &str) -> Self {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", address)
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .create()
            .expect("producer");
        Self { producer }
    }

    pub fn produce(&self, topic: &str, records: &[(i32, String, String)]) {
        send_all(&self.producer, topic, records);
    }
}

fn send_all(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    records: &[(i32, String, String)],
) {
    for (partition, key, value) in records {
        let mut record = BaseRecord::to(topic)
            .partition(*partition)
            .key(key)
            .payload(value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, returned)) => {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "produce failed: {e}"
                    );
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

/// A record read back from a topic.
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub timestamp: Option<i64>,
    pub headers: std::collections::BTreeMap<String, String>,
}

impl Broker {
    /// Every record of `topic` (of `partitions` partitions) up to its high
    /// watermarks as they are now, in each partition's order.
    #[allow(dead_code)]
    pub fn read_all(&self, topic: &str, partitions: u32) -> Vec<ReadRecord> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        use rdkafka::{Offset, TopicPartitionList};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.address)
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        let mut ends = std::collections::BTreeMap::new();
        for partition in 0..partitions as i32 {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .expect("partition");
            let (_, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .expect("watermarks");
            ends.insert(partition, high);
        }
        consumer.assign(&assignment).expect("assign");
        let mut read = std::collections::BTreeMap::new();
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        while ends
            .iter()
            .any(|(p, end)| read.get(p).copied().unwrap_or(0) < *end)
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{topic} not read to its end: {read:?} of {ends:?}"
            );
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.expect("topic readable");
            read.insert(message.partition(), message.offset() + 1);
            let mut headers = std::collections::BTreeMap::new();
            if let Some(list) = message.headers() {
                for header in list.iter() {
                    let value = header
                        .value
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    headers.insert(header.key.to_owned(), value.unwrap_or_default());
                }
            }
            out.push(ReadRecord {
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().unwrap_or_default().to_vec(),
                value: message.payload().map(<[u8]>::to_vec),
                timestamp: message.timestamp().to_millis(),
                headers,
            });
        }
        out
    }
}
