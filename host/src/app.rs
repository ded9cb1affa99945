//! Wiring: config → plugins → state store → consumer thread + HTTP server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::apply::dead_letter::DeadLetterSink;
use crate::apply::emit::EmitSink;
use crate::apply::{
    Aggregation, BatchApplier, Control, Pipeline, PluginMigrator, StartAt, migrate_before_consuming,
};
use crate::cluster::membership::Membership;
use crate::cluster::secret::ClusterSecret;
use crate::cluster::{Cluster, ClusterTopics};
use crate::config::{AggregationConfig, ClusterConfig, Config, HttpConfig};
use crate::ingest::KafkaSource;
use crate::kafka::ClientProperties;
use crate::lifecycle::Lifecycle;
use crate::ops::panics::PanicWatch;
use crate::ops::status::Status;
use crate::plugin::{LoadedPlugin, PluginRuntime, RuntimeConfig};
use crate::serve::admin::Admin;
use crate::serve::routing::Routing;
use crate::serve::{Aggregations, ApiState, ConnectionLimits, HttpPolicy, QueryableAggregation};
use crate::state::feed::ChangeFeed;
use crate::state::flush::{FlushPublisher, PublisherChain};
use crate::state::store::{AggregationMeta, Registration, StateMigrator, StateStore, StoreOptions};
use std::sync::mpsc;

/// How often progress is logged while catching up (without a terminal).
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Loads every configured plugin and checks its params: all that
/// `check-config` verifies beyond parsing.
pub fn load_plugins(config: &Config, runtime: &PluginRuntime) -> anyhow::Result<Vec<LoadedPlugin>> {
    config
        .aggregations
        .iter()
        .map(|aggregation| {
            let path = config.plugin_path(aggregation);
            let at = |field: &str| config.locate(&aggregation.name, field);
            let plugin = runtime
                .load(&path)
                .with_context(|| at(&format!("plugin {:?}", aggregation.plugin)))?;
            plugin
                .instantiate(&aggregation.params_json())
                .with_context(|| at("params"))?;
            plugin
                .check_fits(aggregation)
                .map_err(anyhow::Error::msg)
                .with_context(|| at("window"))?;
            Ok(plugin)
        })
        .collect()
}

/// Opens the state store of `config` (every configured aggregation gets a
/// column family; those of removed ones stay).
pub fn open_store(config: &Config) -> anyhow::Result<StateStore> {
    let names: Vec<&str> = config
        .aggregations
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    Ok(StateStore::open(
        &config.state_dir(),
        &names,
        &StoreOptions {
            block_cache_bytes: config.state.block_cache_mib << 20,
            sync_writes: config.state.sync_writes,
        },
    )?)
}

/// Opens the state store for the configured aggregations, checks each
/// plugin against the state it wrote before, and makes one consumer-side
/// [`Aggregation`] and one query-side [`QueryableAggregation`] per plugin.
pub fn open_aggregations(
    config: &Config,
    plugins: Vec<LoadedPlugin>,
    shutdown: &AtomicBool,
) -> anyhow::Result<(Arc<StateStore>, Vec<Aggregation>, Vec<QueryableAggregation>)> {
    let store = Arc::new(open_store(config)?);
    let configured: Vec<&str> = config
        .aggregations
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    for removed in store.mark_removed(&configured)? {
        tracing::warn!(
            aggregation = %removed,
            "aggregation no longer in the config: its stored state is kept (`wagg state drop` deletes it) but misses the records consumed from now on; if it is added back, it is rebuilt from `source.start_from`"
        );
    }
    let cache_entries = config.state.cache_entries / config.aggregations.len().max(1);
    let mut aggregations = Vec::new();
    let mut queryable = Vec::new();
    for (aggregation, plugin) in config.aggregations.iter().zip(plugins) {
        let meta = crate::lifecycle::meta_of(&plugin);
        begin_migration_if_needed(&store, aggregation, &plugin, &meta)?;
        if store.check_aggregation_meta(&aggregation.name, &meta)? == Registration::New {
            register_new(&store, config, aggregation, &meta)?;
        }
        let counters = store.counters(&aggregation.name)?;
        let mut instance = plugin.instantiate(&aggregation.params_json())?;
        if config.cluster.is_some() {
            migrate_before_joining(&store, aggregation, &mut instance, shutdown)?;
        }
        let mut consumer_side = Aggregation::new(
            aggregation.clone(),
            plugin.clone(),
            instance,
            cache_entries,
            counters,
        )
        .split_across(config.apply.threads())?;
        consumer_side.restore_stream_times(&store)?;
        if let Some(stored) = store.aggregation_meta(&aggregation.name)?
            && stored.migration.is_some()
        {
            consumer_side.migrate_first(stored);
        }
        aggregations.push(consumer_side);
        queryable.push(QueryableAggregation::new(aggregation.clone(), plugin));
    }
    Ok((store, aggregations, queryable))
}

/// Starts migrating an aggregation's stored states when its plugin has a
/// new state format and migrates from the stored one (see
/// `state::store::migration`); checks that a migration in progress can go
/// on with the configured plugin.
fn begin_migration_if_needed(
    store: &StateStore,
    aggregation: &AggregationConfig,
    plugin: &LoadedPlugin,
    meta: &AggregationMeta,
) -> anyhow::Result<()> {
    let Some(stored) = store.aggregation_meta(&aggregation.name)? else {
        return Ok(());
    };
    let migrates_from = &plugin.metadata().migrates_from;
    if let Some(migration) = &stored.migration {
        if stored.state_format == meta.state_format
            && !migrates_from.contains(&migration.from_format)
        {
            bail!(
                "aggregation {:?}: its state is being migrated from format {} ({} keys done), but the configured plugin {} does not migrate from format {} (it migrates from {:?}); configure a plugin that does, or `wagg reset` the aggregation",
                aggregation.name,
                migration.from_format,
                migration.keys_migrated,
                plugin.label(),
                migration.from_format,
                migrates_from
            );
        }
        return Ok(());
    }
    if stored.removed
        || stored.state_format == meta.state_format
        || stored.plugin_name != meta.plugin_name
        || !migrates_from.contains(&stored.state_format)
    {
        // Nothing to migrate, or refused by `check_aggregation_meta`.
        return Ok(());
    }
    let migration = store.begin_migration(&aggregation.name, &stored, meta, |topic| {
        aggregation.applies_to(topic)
    })?;
    tracing::info!(
        aggregation = %aggregation.name,
        from = %migration.from_plugin,
        from_format = migration.from_format,
        to = %plugin.label(),
        to_format = meta.state_format,
        keys_estimate = migration.keys_estimate,
        "migrating the stored state to the plugin's new state format; the aggregation applies records again (catching up) once every key is migrated"
    );
    Ok(())
}

/// In a cluster, an instance migrates its copy of an aggregation's state
/// (the partitions it owned and its standby copies) before it joins the
/// group, while the other instances consume and answer: a take-over or a
/// standby copy then only ever writes states of the plugin's format into
/// this store (see `cluster::log::FORMAT_HEADER`).
fn migrate_before_joining(
    store: &StateStore,
    aggregation: &AggregationConfig,
    instance: &mut crate::plugin::PluginInstance,
    shutdown: &AtomicBool,
) -> anyhow::Result<()> {
    let Some(stored) = store.aggregation_meta(&aggregation.name)? else {
        return Ok(());
    };
    if stored.migration.is_none() {
        return Ok(());
    }
    migrate_before_consuming(store, aggregation, instance, stored, shutdown)?;
    if let Some(stored) = store.aggregation_meta(&aggregation.name)?
        && stored.migration.is_some()
    {
        bail!(
            "stopped while migrating the state of aggregation {:?}; the migration goes on where it stopped when wagg starts again",
            aggregation.name
        );
    }
    Ok(())
}

/// Records an aggregation this store has not run before. On partitions
/// the store has consumed already, it catches up from `source.start_from`
/// on its own while the others go on live (`start_from = "latest"`: it
/// starts where they are).
fn register_new(
    store: &StateStore,
    config: &Config,
    aggregation: &AggregationConfig,
    meta: &AggregationMeta,
) -> anyhow::Result<()> {
    let consumed = store.consumed(|topic| aggregation.applies_to(topic))?;
    let start = StartAt::from(config.source.start_from).entries(&consumed);
    if !start.is_empty() {
        tracing::info!(
            aggregation = %aggregation.name,
            partitions = start.len(),
            "new aggregation: catching up from the beginning of the partitions consumed so far, while the other aggregations go on live"
        );
    }
    store
        .register_aggregation(&aggregation.name, meta, &start)
        .with_context(|| format!("registering aggregation {:?}", aggregation.name))
}

/// Each aggregation with its plugin's migration of other state formats
/// (for changelog records written by instances with another plugin
/// version).
fn migrators(
    config: &Config,
    plugins: &[LoadedPlugin],
) -> Vec<(AggregationConfig, Arc<dyn StateMigrator>)> {
    config
        .aggregations
        .iter()
        .zip(plugins)
        .map(|(aggregation, plugin)| {
            let migrator: Arc<dyn StateMigrator> =
                Arc::new(PluginMigrator::new(plugin.clone(), aggregation));
            (aggregation.clone(), migrator)
        })
        .collect()
}

/// Once `shutdown` is set, gives the process `deadline` to finish, then
/// exits with status 1. Nothing is lost by that: every batch is written
/// atomically with its offsets, so an unfinished one is simply applied again
/// after the restart.
fn enforce_shutdown_deadline(shutdown: Arc<AtomicBool>, deadline: Duration) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("wagg-shutdown-deadline".into())
        .spawn(move || {
            while !shutdown.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(deadline);
            tracing::error!(
                ?deadline,
                "shutdown deadline passed (`shutdown.deadline_ms`); exiting without waiting further. The state is consistent up to the last written batch"
            );
            std::process::exit(1);
        })
        .context("starting the shutdown watchdog")?;
    Ok(())
}

/// Runs wagg until `shutdown` is set. `on_listening` is called with the HTTP
/// address once queries can be served.
pub fn run(
    config: Config,
    shutdown: Arc<AtomicBool>,
    on_listening: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    enforce_shutdown_deadline(
        shutdown.clone(),
        Duration::from_millis(config.shutdown.deadline_ms),
    )?;
    let token = config.http_token().map_err(anyhow::Error::msg)?;
    let cluster_secret = config
        .cluster_secret()
        .map_err(anyhow::Error::msg)?
        .map(|secret| Arc::new(ClusterSecret::new(&secret)));
    let mut http_policy = HttpPolicy::new(&config.http, token);
    http_policy.cluster_secret = cluster_secret.clone();
    // Queries first: the threads that serve (HTTP, and the plugin time
    // budget's epoch ticker) start before this thread's priority drops;
    // every thread started after it ingests at the lower one.
    let http = http_runtime()?;
    let runtime = PluginRuntime::new(RuntimeConfig::new(
        &config.plugins,
        config.plugin_cache_dir(),
    ))?;
    if let Err(e) = crate::ops::scheduling::lower_this_thread(config.apply.ingest_nice) {
        tracing::warn!(error = %e, "cannot lower the ingesting threads' priority (`apply.ingest_nice`): queries compete with ingestion for the cores");
    }
    let plugins = load_plugins(&config, &runtime)?;
    let migrators = migrators(&config, &plugins);

    let status = Arc::new(Status::default());
    let panics = PanicWatch::start(status.clone(), shutdown.clone());
    let (store, aggregations, queryable) = open_aggregations(&config, plugins, &shutdown)?;
    for ((topic, partition), next) in store.offsets()? {
        status.set_next_offset(&topic, partition, next);
    }

    let dead_letters = open_dead_letters(&config, &status)?;
    let emit = open_emit(&config, &status, &shutdown)?;
    let scale_out = match &config.cluster {
        None => None,
        Some(cluster) => Some(start_cluster(
            &config,
            cluster,
            migrators,
            cluster_secret.clone(),
            &store,
            &status,
            &shutdown,
        )?),
    };
    let cluster = scale_out.as_ref().map(|s| s.cluster.clone());
    let (controls, control_feed) = mpsc::channel::<Control>();
    let feed = ChangeFeed::new(config.http.max_watchers, config.http.watch_buffer);
    let pipeline = start_pipeline(
        &config,
        &store,
        &status,
        aggregations,
        dead_letters,
        Publishers {
            emit,
            cluster,
            feed: feed.clone(),
        },
    )?
    .with_controls(control_feed);
    let served = Arc::new(Aggregations::from(queryable));
    let admin: Arc<dyn Admin> = Arc::new(Lifecycle::new(
        config.clone(),
        runtime,
        store.clone(),
        controls,
        served.clone(),
    ));

    let (routing, cluster_threads) = match scale_out {
        None => (None, Vec::new()),
        Some(scale_out) => (Some(scale_out.routing), scale_out.threads),
    };
    let api = Arc::new(ApiState {
        store: store.clone(),
        status: status.clone(),
        aggregations: served,
        max_page: config.http.max_page,
        max_response_bytes: config.http.max_response_bytes,
        routing,
        admin: Some(admin.clone()),
        feed,
    });
    let (server, address) = serve_http(&http, &config.http, api, &http_policy, &shutdown)?;
    http.spawn(reload_on_sighup(admin));
    tracing::info!(%address, "serving queries");
    on_listening(address);

    let consumed = consume(
        pipeline,
        status.clone(),
        &shutdown,
        config.progress_interval.unwrap_or(PROGRESS_LOG_INTERVAL),
    )?;
    shutdown.store(true, Ordering::Relaxed);
    for thread in cluster_threads {
        let _ = thread.join();
    }
    http.block_on(server).context("HTTP server task")?;
    if let Some(reason) = panics.panicked() {
        anyhow::bail!(
            "{reason}; restart wagg (nothing is lost: it resumes from the stored offsets)"
        );
    }
    consumed.context("consumer")?;
    // Stopped on purpose by another thread (a take-over that cannot be
    // done safely, a source topic whose partition count changed): an error
    // exit, so a supervisor sees it.
    match status.fatal() {
        Some(reason) => anyhow::bail!("{reason}"),
        None => Ok(()),
    }
}

/// What hears of each flush besides the store.
struct Publishers {
    emit: Option<Arc<EmitSink>>,
    cluster: Option<Arc<Cluster>>,
    feed: Arc<ChangeFeed>,
}

/// The source thread and the applier (with its writer thread), joined.
fn start_pipeline(
    config: &Config,
    store: &Arc<StateStore>,
    status: &Arc<Status>,
    aggregations: Vec<Aggregation>,
    dead_letters: Option<DeadLetterSink>,
    publishers: Publishers,
) -> anyhow::Result<Pipeline> {
    let Publishers {
        emit,
        cluster,
        feed,
    } = publishers;
    let source_client = ClientProperties::new(&config.source.brokers, config.kafka_properties());
    let source = KafkaSource::new(
        &config.source,
        &source_client,
        store.clone(),
        status.clone(),
        cluster.clone(),
    )?
    .start(&config.batch)
    .context("starting the source thread")?;
    // Emitted changes, then the changelog: both before the local write;
    // the watchers after it.
    let publishers: Vec<Arc<dyn FlushPublisher>> = [
        emit.map(|sink| sink as Arc<dyn FlushPublisher>),
        cluster.map(|cluster| cluster as Arc<dyn FlushPublisher>),
        Some(feed as Arc<dyn FlushPublisher>),
    ]
    .into_iter()
    .flatten()
    .collect();
    let publisher: Option<Arc<dyn FlushPublisher>> = Some(Arc::new(PublisherChain(publishers)));
    let applier = BatchApplier::new(
        store.clone(),
        status.clone(),
        aggregations,
        dead_letters,
        &config.batch,
        publisher,
    )
    .context("starting the state writer thread")?;
    Ok(Pipeline::new(Box::new(source), applier, status.clone()))
}

/// Runs the pipeline on the `wagg-consumer` thread (with progress reports)
/// until it stops; after a failure, keeps the process (and so the queries
/// and the failure on `/readyz`) up until `shutdown`.
fn consume(
    pipeline: Pipeline,
    status: Arc<Status>,
    shutdown: &Arc<AtomicBool>,
    progress_interval: Duration,
) -> anyhow::Result<Result<(), crate::apply::PipelineError>> {
    let consumer_shutdown = shutdown.clone();
    let consumer = std::thread::Builder::new()
        .name("wagg-consumer".into())
        .spawn(move || pipeline.run(&consumer_shutdown))
        .context("starting the consumer thread")?;
    let progress_stop = Arc::new(AtomicBool::new(false));
    let progress = {
        let stop = progress_stop.clone();
        std::thread::Builder::new()
            .name("wagg-progress".into())
            .spawn(move || crate::ops::progress::report(status, &stop, progress_interval))
            .context("starting the progress reporter")?
    };
    let consumed = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("the consumer thread panicked"))?;
    progress_stop.store(true, Ordering::Relaxed);
    let _ = progress.join();
    if let Err(e) = &consumed {
        // Keep answering queries (and reporting the failure on /readyz)
        // until told to stop: the state up to the failure stays readable.
        tracing::error!(error = %e, "consumption stopped; still serving queries until shutdown");
        while !shutdown.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(consumed)
}

/// The dead-letter sink, checked to reach its topic, when configured.
fn open_dead_letters(
    config: &Config,
    status: &Arc<Status>,
) -> anyhow::Result<Option<DeadLetterSink>> {
    let Some(dead_letter) = &config.dead_letter else {
        return Ok(None);
    };
    let client = ClientProperties::new(&config.source.brokers, config.dead_letter_properties());
    let sink = DeadLetterSink::new(dead_letter, &client, status.clone())?;
    sink.check_topic(Duration::from_secs(10))?;
    tracing::info!(
        topic = sink.topic(),
        "rejected records go to the dead-letter topic"
    );
    Ok(Some(sink))
}

/// The producer of emitted changes, checked to reach its topics, when an
/// aggregation emits.
fn open_emit(
    config: &Config,
    status: &Arc<Status>,
    shutdown: &Arc<AtomicBool>,
) -> anyhow::Result<Option<Arc<EmitSink>>> {
    let topics = config.emit_topics();
    if topics.is_empty() {
        return Ok(None);
    }
    let client = ClientProperties::new(&config.source.brokers, config.emit_properties());
    let sink = EmitSink::new(&client, status.clone(), shutdown.clone())?;
    sink.check_topics(&topics, Duration::from_secs(10))?;
    tracing::info!(?topics, "aggregations emit their changes");
    Ok(Some(Arc::new(sink)))
}

/// Cluster mode's parts: the changelog side, query routing, and the
/// membership and standby threads.
struct ScaleOut {
    cluster: Arc<Cluster>,
    routing: Routing,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn start_cluster(
    config: &Config,
    cluster_config: &ClusterConfig,
    aggregations: Vec<(AggregationConfig, Arc<dyn StateMigrator>)>,
    cluster_secret: Option<Arc<ClusterSecret>>,
    store: &Arc<StateStore>,
    status: &Arc<Status>,
    shutdown: &Arc<AtomicBool>,
) -> anyhow::Result<ScaleOut> {
    let cluster = Cluster::new(
        cluster_config,
        ClusterTopics::new(cluster_config, &config.source.group_id)
            .with_record_max_bytes(config.changelog_record_max_bytes()),
        &aggregations,
        config.source.start_from,
        &ClientProperties::new(&config.source.brokers, config.connection_properties()),
        status.clone(),
        shutdown.clone(),
        cluster_secret.clone(),
    )?;
    if cluster_secret.is_none() {
        tracing::warn!(
            topic = %cluster.topics.members(),
            "no `cluster.secret_env` or `secret_file`: member announcements are not authenticated, so whoever can write the members topic can route lookups to any address"
        );
    }
    let partition_counts = crate::cluster::topics::ensure_topics(&cluster, &config.source.topics)?;
    let membership = Arc::new(Membership::new(&cluster, partition_counts, status.clone()));
    let mut threads = vec![crate::cluster::membership::start(
        cluster.clone(),
        membership.clone(),
        config.session_timeout(),
        shutdown.clone(),
    )?];
    threads.extend(crate::cluster::standby::start(
        cluster.clone(),
        membership.clone(),
        store.clone(),
        shutdown.clone(),
    )?);
    tracing::info!(
        instance = membership.me(),
        standby_replicas = cluster.config.standby_replicas,
        changelogs = %cluster.topics.changelog("<aggregation>"),
        "cluster mode: partitions are restored from and written to changelog topics"
    );
    let routing = Routing::new(
        membership,
        cluster.clone(),
        Duration::from_millis(config.http.request_timeout_ms),
        config.http.max_response_bytes,
    );
    Ok(ScaleOut {
        cluster,
        routing,
        threads,
    })
}

/// Reloads the config file on every `SIGHUP` (the outcome is logged).
async fn reload_on_sighup(admin: Arc<dyn Admin>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: reload through the HTTP API instead");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config file");
        let admin = admin.clone();
        match tokio::task::spawn_blocking(move || admin.reload()).await {
            Ok(Ok(report)) if report.changed() => tracing::info!(?report, "reload done"),
            Ok(Ok(_)) => tracing::info!("reload: nothing changed"),
            Ok(Err(e)) => tracing::error!(error = %e, "reload refused; the running config stays"),
            Err(e) => tracing::error!(error = %e, "reload task failed"),
        }
    }
}

type ServerTask = tokio::task::JoinHandle<()>;

/// The runtime serving the API: its own threads, apart from ingestion's.
fn http_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("wagg-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")
}

/// Binds `http.listen` and serves the API on `http` until `shutdown` is
/// set.
fn serve_http(
    http: &tokio::runtime::Runtime,
    http_config: &HttpConfig,
    api: Arc<ApiState>,
    policy: &HttpPolicy,
    shutdown: &Arc<AtomicBool>,
) -> anyhow::Result<(ServerTask, SocketAddr)> {
    let listener = http
        .block_on(tokio::net::TcpListener::bind(http_config.listen))
        .with_context(|| format!("cannot listen on {} (`http.listen`)", http_config.listen))?;
    let address = listener
        .local_addr()
        .context("reading the listen address")?;
    let status = api.status.clone();
    // Live subscriptions end as shutdown begins: the server's drain waits
    // for open responses, and theirs would never finish.
    let feed = api.feed.clone();
    let stopping = shutdown.clone();
    http.spawn(async move {
        while !stopping.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        feed.close();
    });
    let router = crate::serve::router(api, policy);
    let limits = ConnectionLimits {
        max_connections: http_config.max_connections,
        header_read_timeout: Duration::from_millis(http_config.header_read_timeout_ms),
    };
    let server = http.spawn(crate::serve::serve(
        listener,
        router,
        limits,
        status,
        shutdown.clone(),
    ));
    Ok((server, address))
}
