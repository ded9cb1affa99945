//! `wagg demo`: the whole pipeline on librdkafka's in-process mock cluster,
//! fed by a generator of purchase events. Only the source's broker is
//! different from `wagg run`; config parsing, plugins, state and HTTP are
//! the same code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use crate::config::Config;
use crate::tools::rng::Rng;

pub const TOPIC: &str = "purchases";
const PARTITIONS: i32 = 4;
const USERS: u64 = 500;
const ITEMS: &[&str] = &[
    "apple",
    "banana",
    "cherry",
    "dates",
    "eggs",
    "flour",
    "grapes",
    "honey",
    "ice-cream",
    "jam",
    "kale",
    "lemons",
    "milk",
    "noodles",
    "olives",
    "pasta",
    "quinoa",
    "rice",
    "salt",
    "tea",
];

pub struct DemoOptions {
    pub listen: SocketAddr,
    /// Purchase events per second.
    pub rate: u32,
    /// Where the example plugins are (built from the workspace when absent).
    pub plugins_dir: Option<PathBuf>,
}

/// One purchase event as `(key, JSON value)`.
pub fn purchase(rng_state: &mut u64, sequence: u64) -> (String, String) {
    let mut rng = Rng(*rng_state);
    let user = format!("user-{:04}", rng.next_u64() % USERS + 1);
    let item = ITEMS[(rng.next_u64() % ITEMS.len() as u64) as usize];
    let cents = 100 + rng.next_u64() % 19_900;
    *rng_state = rng.0;
    let value = format!(
        r#"{{"user":"{user}","item":"{item}","amount":{}.{:02},"seq":{sequence}}}"#,
        cents / 100,
        cents % 100
    );
    (user, value)
}

fn demo_config(
    brokers: &str,
    plugins: &Path,
    state_dir: &Path,
    listen: SocketAddr,
) -> anyhow::Result<Config> {
    let plugin = |name: &str| crate::tools::author::build::example_plugin(plugins, name);
    let text = format!(
        r#"
[source]
brokers = "{brokers}"
group_id = "wagg-demo"
topics = ["{TOPIC}"]

[state]
dir = {state_dir:?}

[http]
listen = "{listen}"

[batch]
max_records = 1000
max_delay_ms = 50

[[aggregation]]
name = "purchases_per_user"
plugin = {count:?}

[[aggregation]]
name = "spend_per_user"
plugin = {stats:?}
params = {{ field = "/amount" }}

[[aggregation]]
name = "top_items_per_user"
plugin = {top:?}
params = {{ n = 3, field = "/amount", item = "/item" }}

[[aggregation]]
name = "buyers_per_item"
plugin = {distinct:?}
key = "/item"
params = {{ field = "/user", precision = 12 }}

[[aggregation]]
name = "last_purchase"
plugin = {latest:?}
"#,
        count = plugin("count"),
        stats = plugin("stats"),
        top = plugin("top-n"),
        distinct = plugin("distinct"),
        latest = plugin("latest"),
    );
    Ok(Config::parse(&text, "<demo config>", Path::new("/"))?)
}

// The demo's start-up in the order it prints: cluster, generator, plugins,
// config, `app::run`.
pub fn run(options: DemoOptions, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    let plugins = crate::tools::author::build::example_plugins_dir(options.plugins_dir.as_deref())?;

    // The producer owns the in-process cluster; it lives as long as the demo.
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("test.mock.num.brokers", "1")
        .set("linger.ms", "5")
        .create()
        .context("starting the in-process Kafka cluster")?;
    let brokers = {
        let cluster = producer
            .client()
            .mock_cluster()
            .context("no mock cluster")?;
        cluster
            .create_topic(TOPIC, PARTITIONS, 1)
            .context("creating the demo topic")?;
        cluster.bootstrap_servers()
    };
    // SAFETY: the mock cluster handle belongs to `producer`, which outlives
    // this call; the setter only stores an integer in the cluster.
    unsafe {
        let handle =
            rdkafka::bindings::rd_kafka_handle_mock_cluster(producer.client().native_ptr());
        if !handle.is_null() {
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(handle, 0);
        }
    }

    let state = tempfile::Builder::new()
        .prefix("wagg-demo-")
        .tempdir()
        .context("creating a state directory")?;
    let config = demo_config(&brokers, &plugins, state.path(), options.listen)?;

    let generator_shutdown = shutdown.clone();
    let rate = options.rate.max(1);
    let generator = std::thread::Builder::new()
        .name("demo-generator".into())
        .spawn(move || {
            let started = Instant::now();
            let mut rng_state = 0x9E37_79B9_7F4A_7C15_u64;
            let mut sent = 0u64;
            while !generator_shutdown.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                if sent >= due {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let (key, value) = purchase(&mut rng_state, sent);
                if let Err((e, _)) = producer.send(BaseRecord::to(TOPIC).key(&key).payload(&value))
                {
                    tracing::warn!(error = %e, "demo producer");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                sent += 1;
            }
            let _ = producer.flush(Duration::from_secs(2));
            // Handed back, not dropped: it owns the cluster, which the
            // consumer still uses while it shuts down.
            producer
        })
        .context("starting the generator")?;

    let result = crate::app::run(config, shutdown.clone(), |address| {
        println!(
            "wagg demo: {rate} purchases/s into topic `{TOPIC}` ({PARTITIONS} partitions, in-process cluster)"
        );
        println!("Try, while it runs (Ctrl-C to stop):");
        println!("  curl -s http://{address}/v1/aggregations");
        println!("  curl -s http://{address}/v1/aggregations/purchases_per_user/keys/user-0001");
        println!("  curl -s http://{address}/v1/aggregations/spend_per_user/keys/user-0001");
        println!("  curl -s http://{address}/v1/aggregations/top_items_per_user/keys/user-0001");
        println!("  curl -s http://{address}/v1/aggregations/buyers_per_item/keys/apple");
        println!(
            "  curl -s 'http://{address}/v1/aggregations/last_purchase/keys?prefix=user-00&limit=3'"
        );
    });
    shutdown.store(true, Ordering::Relaxed);
    // The cluster goes last, once nothing uses it.
    let cluster = generator.join();
    drop(cluster);
    result
}
