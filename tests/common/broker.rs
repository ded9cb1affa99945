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
