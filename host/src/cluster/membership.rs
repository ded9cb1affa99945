//! Who owns which partition: every instance announces its HTTP address and
//! the partitions it owns on the members topic (on every change and every
//! `cluster.heartbeat_ms`) and reads everyone's announcements, so any
//! instance can route a key to its owner. librdkafka offers no way to put
//! an address in the consumer group's member metadata, hence the topic.
//!
//! It also keeps the group live: when partitions stay without a live
//! owner for longer than the group's session timeout (a broker that never
//! rebalances after a member died — tansu 0.6 is one), the lowest-addressed
//! live instance re-joins the group, which makes the coordinator hand them
//! out again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::create_client;
use serde::{Deserialize, Serialize};

use super::Cluster;
use super::secret::MAC_HEADER;
use super::topics::partition_count;
use crate::config::KeyPartitioner;
use crate::ops::status::{Status, now_millis};

/// One instance's announcement (the members topic's value; the key is the
/// instance's address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Announcement {
    http: String,
    partitions: Vec<(String, i32)>,
    /// Partitions it keeps standby copies of.
    #[serde(default)]
    standby: Vec<(String, i32)>,
    at_ms: i64,
}

impl Announcement {
    fn owns(&self, topic: &str, partition: i32) -> bool {
        holds(&self.partitions, topic, partition)
    }
}

fn holds(partitions: &[(String, i32)], topic: &str, partition: i32) -> bool {
    partitions
        .iter()
        .any(|(t, p)| t == topic && *p == partition)
}

/// Where a partition's state is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Local,
    Remote(String),
    /// No live instance owns it (rebalancing, or its owner died).
    Unknown,
}

/// The routing table.
pub struct Membership {
    me: String,
    announcements: RwLock<HashMap<String, Announcement>>,
    member_timeout: Duration,
    partition_counts: BTreeMap<String, i32>,
    key_partitioner: KeyPartitioner,
    status: Arc<Status>,
}

impl Membership {
    pub fn new(
        cluster: &Cluster,
        partition_counts: BTreeMap<String, i32>,
        status: Arc<Status>,
    ) -> Self {
        Self {
            me: cluster
                .config
                .advertised_http
                .trim_end_matches('/')
                .to_owned(),
            announcements: RwLock::new(HashMap::new()),
            member_timeout: cluster.config.member_timeout(),
            partition_counts,
            key_partitioner: cluster.config.key_partitioner,
            status,
        }
    }

    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }

    /// The source topics and their partition counts.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.partition_counts.keys().map(String::as_str)
    }

    /// This instance's address.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The source partition of a key, as the producers chose it.
    pub fn partition_of(&self, topic: &str, key: &[u8]) -> Option<i32> {
        let count = *self.partition_counts.get(topic)?;
        let partition = match self.key_partitioner {
            KeyPartitioner::Murmur2 => {
                crate::cluster::partitioner::partition_for_key(key, count as u32)
            }
            KeyPartitioner::Crc32 => {
                crate::cluster::partitioner::crc32_partition_for_key(key, count as u32)
            }
        };
        Some(partition as i32)
    }

    fn owned_locally(&self) -> BTreeSet<(String, i32)> {
        self.status
            .partitions()
            .into_iter()
            .filter(|p| p.assigned)
            .map(|p| (p.topic, p.partition))
            .collect()
    }

    fn live(&self) -> Vec<Announcement> {
        let now = now_millis();
        let timeout = self.member_timeout.as_millis() as i64;
        self.announcements
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|a| a.http != self.me && now - a.at_ms <= timeout)
            .cloned()
            .collect()
    }

    pub fn owner(&self, topic: &str, partition: i32) -> Owner {
        if self
            .owned_locally()
            .contains(&(topic.to_owned(), partition))
        {
            return Owner::Local;
        }
        self.live()
            .into_iter()
            .filter(|a| a.owns(topic, partition))
            .max_by_key(|a| a.at_ms)
            .map_or(Owner::Unknown, |a| Owner::Remote(a.http))
    }

    /// The partitions this instance should keep standby copies of: for
    /// each partition another live instance owns, the `replicas` live
    /// instances other than the owner that rank highest for it (rendezvous
    /// hashing: a copy moves only when its instance leaves or a higher
    /// ranked one arrives). A partition without a live owner keeps its
    /// copies where they are (it is between owners, or its owner died and
    /// the copy is what answers for it).
    pub fn standby_targets(
        &self,
        replicas: usize,
        current: &BTreeSet<(String, i32)>,
    ) -> BTreeSet<(String, i32)> {
        let mut live = self.others();
        live.push(self.me.clone());
        let mut targets = BTreeSet::new();
        for (topic, partition, owner) in self.ownership() {
            let id = (topic, partition);
            let Some(owner) = owner else {
                if current.contains(&id) {
                    targets.insert(id);
                }
                continue;
            };
            if owner == self.me {
                continue;
            }
            let mut ranked: Vec<(i32, &String)> = live
                .iter()
                .filter(|instance| **instance != owner)
                .map(|instance| {
                    let seed = format!("{instance}\n{}\n{}", id.0, id.1);
                    (
                        crate::cluster::partitioner::murmur2(seed.as_bytes()),
                        instance,
                    )
                })
                .collect();
            ranked.sort_unstable_by(|a, b| b.cmp(a));
            if ranked
                .iter()
                .take(replicas)
                .any(|(_, instance)| **instance == self.me)
            {
                targets.insert(id);
            }
        }
        targets
    }

    /// Live instances (other than this one) that keep a standby copy of the
    /// partition.
    pub fn standbys_of(&self, topic: &str, partition: i32) -> Vec<String> {
        let mut standbys: Vec<String> = self
            .live()
            .into_iter()
            .filter(|a| holds(&a.standby, topic, partition))
            .map(|a| a.http)
            .collect();
        standbys.sort();
        standbys
    }

    /// The other live instances' addresses.
    pub fn others(&self) -> Vec<String> {
        let mut others: Vec<String> = self.live().into_iter().map(|a| a.http).collect();
        others.sort();
        others
    }

    /// Every source partition with its owner's address (`None`: no live
    /// owner).
    pub fn ownership(&self) -> Vec<(String, i32, Option<String>)> {
        let mut out = Vec::new();
        for (topic, count) in &self.partition_counts {
            for partition in 0..*count {
                let owner = match self.owner(topic, partition) {
                    Owner::Local => Some(self.me.clone()),
                    Owner::Remote(http) => Some(http),
                    Owner::Unknown => None,
                };
                out.push((topic.clone(), partition, owner));
            }
        }
        out
    }

    /// Partitions whose last claimant is dead (stopped announcing without
    /// giving them up) and that no live instance owns: what a broker that
    /// never expires the dead member leaves unassigned. Partitions between
    /// owners in an ordinary rebalance do not count: their last owner is
    /// alive, or said goodbye.
    fn orphans(&self) -> usize {
        let now = now_millis();
        let timeout = self.member_timeout.as_millis() as i64;
        let table = self
            .announcements
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut orphans = 0;
        for (topic, count) in &self.partition_counts {
            for partition in 0..*count {
                if self.owner(topic, partition) != Owner::Unknown {
                    continue;
                }
                let last_claimant = table
                    .values()
                    .filter(|a| a.owns(topic, partition))
                    .max_by_key(|a| a.at_ms);
                if last_claimant.is_some_and(|a| a.http != self.me && now - a.at_ms > timeout) {
                    orphans += 1;
                }
            }
        }
        orphans
    }

    fn record(&self, announcement: Announcement) {
        let mut table = self
            .announcements
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let newer = table
            .get(&announcement.http)
            .is_none_or(|known| known.at_ms <= announcement.at_ms);
        if newer {
            table.insert(announcement.http.clone(), announcement);
        }
    }

    /// The lowest address among the live instances, this one included.
    fn is_lowest_live(&self) -> bool {
        self.others().iter().all(|other| self.me < *other)
    }
}

/// Starts announcing and following on the `wagg-members` thread; it stops
/// (announcing that this instance owns nothing) once `shutdown` is set.
// The thread's whole loop (announce, follow, expire) in one place.
pub fn start(
    cluster: Arc<Cluster>,
    membership: Arc<Membership>,
    session_timeout: Duration,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let topic = cluster.topics.members();
    let producer: BaseProducer = create_client(
        cluster
            .client_config()
            .set("linger.ms", "0")
            .set("message.timeout.ms", "10000"),
    )
    .context("creating the members producer")?;
    let follower: BaseConsumer = create_client(
        cluster
            .client_config()
            .set("group.id", format!("{topic}-follower"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false"),
    )
    .context("creating the members reader")?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&topic, 0, Offset::Beginning)
        .context("reading the members topic")?;
    follower
        .assign(&assignment)
        .context("reading the members topic")?;
    // An owner missing for longer than the group needs to notice a dead
    // member, plus a heartbeat timeout for the announcements to settle.
    let orphan_grace = session_timeout + cluster.config.member_timeout();
    std::thread::Builder::new()
        .name("wagg-members".into())
        .spawn(move || {
            let mut announcer = Announcer {
                producer,
                topic,
                membership: membership.clone(),
                cluster: cluster.clone(),
                last: None,
            };
            let mut orphaned_since: Option<Instant> = None;
            // Announcements refused so far (logged at powers of two).
            let mut forged = 0u64;
            let mut last_rejoin: Option<Instant> = None;
            let mut last_check = Instant::now();
            let mut last_count_check = Instant::now();
            let heartbeat = cluster.config.heartbeat();
            while !shutdown.load(Ordering::Relaxed) {
                announcer.announce_if_due(heartbeat);
                if let Some(Ok(message)) = follower.poll(Duration::from_millis(100))
                    && let Some(payload) = message.payload()
                {
                    if !authentic(&cluster, &message) {
                        forged += 1;
                        if forged.is_power_of_two() {
                            tracing::error!(
                                topic = %message.topic(),
                                offset = message.offset(),
                                ignored = forged,
                                "ignoring a member announcement that fails authentication with the cluster's secret (forged, or from an instance with another secret)"
                            );
                        }
                        continue;
                    }
                    match serde_json::from_slice::<Announcement>(payload) {
                        Ok(announcement) => membership.record(announcement),
                        Err(e) => tracing::debug!(error = %e, "ignoring a malformed announcement"),
                    }
                }
                if last_check.elapsed() < Duration::from_secs(1) {
                    continue;
                }
                last_check = Instant::now();
                if last_count_check.elapsed() >= PARTITION_COUNT_CHECK {
                    last_count_check = Instant::now();
                    let seen = partition_counts_now(&follower, membership.topics());
                    if let Some(reason) = changed_partition_counts(&membership.partition_counts, &seen) {
                        tracing::error!(%reason, "stopping");
                        membership.status.set_fatal(reason);
                        cluster.request_shutdown();
                    }
                }
                let orphans = membership.orphans();
                if orphans == 0 {
                    orphaned_since = None;
                } else if orphaned_since.get_or_insert_with(Instant::now).elapsed() > orphan_grace
                    && last_rejoin.is_none_or(|at| at.elapsed() > orphan_grace * 2)
                {
                    orphaned_since = None;
                    if membership.is_lowest_live() {
                        last_rejoin = Some(Instant::now());
                        tracing::warn!(
                            orphans,
                            "partitions have had no live owner for longer than the group's session timeout; re-joining the group to have them reassigned"
                        );
                        cluster.rejoin.store(true, Ordering::Release);
                    }
                }
            }
            announcer.announce(Vec::new(), Vec::new());
            let _ = announcer.producer.flush(Duration::from_secs(2));
        })
        .context("starting the membership thread")
}

/// How often the source topics' partition counts are compared with the
/// ones this instance started with.
const PARTITION_COUNT_CHECK: Duration = Duration::from_secs(30);

/// The partition counts the broker reports now (topics it does not answer
/// for are left out: a metadata hiccup is not a change).
fn partition_counts_now<'a>(
    reader: &BaseConsumer,
    topics: impl Iterator<Item = &'a str>,
) -> BTreeMap<String, i32> {
    topics
        .filter_map(|topic| {
            let count = partition_count(reader.client(), topic, Duration::from_secs(5)).ok()??;
            Some((topic.to_owned(), count))
        })
        .collect()
}

/// Why this instance must stop, if a source topic's partition count is no
/// longer the one routing and the changelogs were sized for at start: the
/// producers' partitioner now maps keys over the new count, so lookups
/// would go to the wrong partition's owner, and the changelog and commits
/// topics have no partition for the new ones.
fn changed_partition_counts(
    known: &BTreeMap<String, i32>,
    seen: &BTreeMap<String, i32>,
) -> Option<String> {
    known.iter().find_map(|(topic, &count)| {
        let now = *seen.get(topic)?;
        (now != count).then(|| {
            format!(
                "source topic {topic:?} has {now} partitions, not the {count} this instance started with: routing and the cluster's topics are sized at start. Add partitions to the changelog and commits topics to match (at least {now}) and restart every instance"
            )
        })
    })
}

/// Whether an announcement carries the cluster secret's tag over its key
/// and value (always, when the cluster has no secret).
fn authentic(cluster: &Cluster, message: &rdkafka::message::BorrowedMessage<'_>) -> bool {
    let Some(secret) = &cluster.secret else {
        return true;
    };
    let tag = crate::kafka::read_headers(message)
        .into_iter()
        .find(|(name, _)| name == MAC_HEADER)
        .and_then(|(_, value)| value);
    tag.is_some_and(|tag| {
        secret.verify(
            &[
                message.key().unwrap_or_default(),
                message.payload().unwrap_or_default(),
            ],
            &tag,
        )
    })
}

/// Owned and standby partitions.
type Holdings = (BTreeSet<(String, i32)>, BTreeSet<(String, i32)>);

struct Announcer {
    producer: BaseProducer,
    topic: String,
    membership: Arc<Membership>,
    cluster: Arc<Cluster>,
    last: Option<(Holdings, Instant)>,
}

impl Announcer {
    fn announce_if_due(&mut self, heartbeat: Duration) {
        self.producer.poll(Duration::ZERO);
        let holdings = (
            self.membership.owned_locally(),
            self.cluster.standby_partitions(),
        );
        let due = match &self.last {
            None => true,
            Some((last, at)) => *last != holdings || at.elapsed() >= heartbeat,
        };
        if due {
            self.announce(
                holdings.0.iter().cloned().collect(),
                holdings.1.iter().cloned().collect(),
            );
            self.last = Some((holdings, Instant::now()));
        }
    }

    fn announce(&self, partitions: Vec<(String, i32)>, standby: Vec<(String, i32)>) {
        let announcement = Announcement {
            http: self.membership.me.clone(),
            partitions,
            standby,
            at_ms: now_millis(),
        };
        let value = serde_json::to_vec(&announcement).unwrap_or_default();
        let key = self.membership.me.as_bytes();
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.topic)
            .partition(0)
            .key(key)
            .payload(&value);
        let tag;
        if let Some(secret) = &self.cluster.secret {
            tag = secret.sign(&[key, &value]);
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: MAC_HEADER,
                value: Some(&tag),
            }));
        }
        if let Err((error, _)) = self.producer.send(record) {
            tracing::warn!(%error, "cannot announce this instance's partitions");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_topic_with_another_partition_count_is_a_reason_to_stop() {
        let known: BTreeMap<String, i32> = [("a".to_owned(), 8), ("b".to_owned(), 4)].into();
        assert_eq!(changed_partition_counts(&known, &known), None);
        // A topic the broker did not answer for is no change.
        let partial: BTreeMap<String, i32> = [("a".to_owned(), 8)].into();
        assert_eq!(changed_partition_counts(&known, &partial), None);
        let grown: BTreeMap<String, i32> = [("a".to_owned(), 8), ("b".to_owned(), 6)].into();
        let reason = changed_partition_counts(&known, &grown).expect("a reason");
        assert!(
            reason.contains("\"b\" has 6 partitions, not the 4"),
            "{reason}"
        );
    }
}
