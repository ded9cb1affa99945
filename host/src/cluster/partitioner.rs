//! Which partition a key belongs to, as Kafka's default partitioner decides
//! it: `murmur2(key) & 0x7fffffff % partitions` — the Java client's
//! `DefaultPartitioner` / `BuiltInPartitioner` for keyed records, and
//! librdkafka's `murmur2_random` partitioner. A lookup for a key is answered
//! by the instance that owns that partition.

/// Kafka's 32-bit murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` in a topic of `partitions` partitions (at least
/// one).
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) as u32 & 0x7fff_ffff) % partitions.max(1)
}

/// The partition of `key` under librdkafka's default `consistent_random`
/// partitioner: CRC-32 (IEEE) of the key modulo the partition count.
pub fn crc32_partition_for_key(key: &[u8], partitions: u32) -> u32 {
    crc32fast::hash(key) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use std::time::Duration;

    /// The vectors of Kafka's own `UtilsTest.testMurmur2`.
    #[test]
    fn matches_the_java_clients_murmur2() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected, "{:?}", String::from_utf8_lossy(key));
        }
    }

    /// librdkafka's `murmur2_random` partitioner (what wagg's users'
    /// non-Java producers use for Java compatibility) puts every key where
    /// `partition_for_key` says, for keys of every length modulo 4.
    #[test]
    fn matches_librdkafkas_murmur2_partitioner() {
        check_librdkafka_partitioner("murmur2_random", partition_for_key);
    }

    /// librdkafka's default partitioner (CRC-32 of the key).
    #[test]
    fn matches_librdkafkas_default_partitioner() {
        check_librdkafka_partitioner("consistent_random", crc32_partition_for_key);
    }

    fn check_librdkafka_partitioner(name: &str, partition_for_key: fn(&[u8], u32) -> u32) {
        const PARTITIONS: i32 = 7;
        let producer: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .set("partitioner", name)
            .create()
            .expect("mock cluster producer");
        producer
            .client()
            .mock_cluster()
            .expect("mock cluster")
            .create_topic("keys", PARTITIONS, 1)
            .expect("topic");
        // librdkafka needs the topic's metadata before it partitions.
        producer
            .client()
            .fetch_metadata(Some("keys"), Duration::from_secs(10))
            .expect("metadata");
        let keys: Vec<Vec<u8>> = (0..200u32)
            .map(|i| format!("user-{i}{}", "x".repeat((i % 5) as usize)).into_bytes())
            .chain([vec![0xff, 0x00, 0x80], vec![0x01]])
            .collect();
        for key in &keys {
            // The partition is chosen in `send`; `partition` on the record
            // is unset, so read the decision back from the delivery.
            producer
                .send(BaseRecord::<[u8], [u8]>::to("keys").key(key).payload(b"v"))
                .map_err(|(e, _)| e)
                .expect("enqueue");
        }
        producer.flush(Duration::from_secs(10)).expect("flush");
        let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap(&producer))
            .set("group.id", format!("partitioner-test-{name}"))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        use rdkafka::consumer::Consumer;
        use rdkafka::message::Message;
        let mut assignment = rdkafka::TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            assignment
                .add_partition_offset("keys", partition, rdkafka::Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&assignment).expect("assign");
        let mut seen = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while seen < keys.len() && std::time::Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.expect("message");
            let key = message.key().unwrap_or_default();
            assert_eq!(
                message.partition() as u32,
                partition_for_key(key, PARTITIONS as u32),
                "key {:?}",
                String::from_utf8_lossy(key)
            );
            seen += 1;
        }
        assert_eq!(seen, keys.len(), "every record read back");
    }

    fn bootstrap(producer: &BaseProducer) -> String {
        producer
            .client()
            .mock_cluster()
            .expect("mock cluster")
            .bootstrap_servers()
    }
}
