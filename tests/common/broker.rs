//! A real Kafka-API broker (tansu, SQLite storage) on a free loopback port,
//! stopped when dropped.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

pub struct Broker {
    child: Child,
    pub address: String,
    binary: PathBuf,
    _dir: tempfile::TempDir,
}

fn tansu_binary() -> PathBuf {
    wagg::tools::bench::e2e::tansu_binary(None)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn spawn_tansu(binary: &Path, address: &str, dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("tansu.log"))
        .expect("log file");
    let child = Command::new(binary)
        .arg("broker")
        .args(["--listener-url", &format!("tcp://{address}")])
        .args(["--advertised-listener-url", &format!("tcp://{address}")])
        .args(["--storage-engine", "sqlite://tansu.db"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start the test broker {}: {e}. Install it with `scripts/setup.sh --broker` or set WAGG_TANSU",
                binary.display()
            )
        });
    let started = Instant::now();
    while TcpStream::connect(address).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "tansu did not start listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

impl Broker {
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let address = format!("127.0.0.1:{}", free_port());
        let binary = tansu_binary();
        let child = spawn_tansu(&binary, &address, dir.path());
        Broker {
            child,
            address,
            binary,
            _dir: dir,
        }
    }

    /// Kills the broker (its data stays on disk).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker again on the same address and data.
    pub fn restart(&mut self) {
        self.child = spawn_tansu(&self.binary, &self.address, self._dir.path());
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(&self.binary)
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

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
