use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use wagg::config::{Config, OnError};
use wagg::plugin::{PluginRuntime, RuntimeConfig};
use wagg::tools::author::{build, offline};

/// glibc's allocator spent a quarter of the engine benchmark's time in
/// malloc/free (BENCHMARKS.md); mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// wagg: live, queryable per-key aggregates of Kafka topics, computed by
/// WebAssembly plugins.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
#[command(after_help = "Examples:
  wagg demo                                  # everything on an embedded broker, no setup
  wagg check-config wagg.toml
  wagg run --config wagg.toml
  wagg query spend_per_user alice            # a key's state, from a running instance
  wagg lag                                   # per-partition progress of a running instance
  wagg completions bash > /etc/bash_completion.d/wagg")]
struct Cli {
    /// Log format on stderr: `human` (default) or `json` (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "WAGG_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// How `query` and `lag` reach a running instance.
#[derive(Debug, clap::Args)]
struct EndpointArgs {
    /// The instance's HTTP address (`http.listen`).
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "WAGG_URL")]
    url: String,
    /// Bearer token, when `[http.auth]` is configured.
    #[arg(long, env = "WAGG_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl EndpointArgs {
    fn endpoint(self) -> anyhow::Result<wagg::tools::client::Endpoint> {
        Ok(wagg::tools::client::Endpoint {
            url: wagg::tools::client::parse_url(&self.url)?,
            token: self.token,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Consume the configured topics and serve the aggregations over HTTP.
    #[command(after_help = "Example:\n  wagg run --config wagg.toml")]
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Seconds between progress log lines while catching up (when
        /// stderr is not a terminal; a terminal gets a live line).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        progress_interval_secs: u64,
    },
    /// Run the whole pipeline on an in-process Kafka cluster with generated
    /// purchase events; no broker needed.
    Demo {
        /// HTTP listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Generated purchase events per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Directory with the example plugins' .wasm files (built from the
        /// workspace when absent).
        #[arg(long)]
        plugins_dir: Option<PathBuf>,
    },
    /// Validate a config file, including loading every plugin and checking
    /// its params, without starting.
    CheckConfig {
        /// The TOML config file.
        config: PathBuf,
    },
    /// Build, inspect and test aggregation plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print a key's state from a running instance (`GET
    /// /v1/aggregations/AGG/keys/KEY`).
    #[command(
        after_help = "Example:\n  wagg query spend_per_user alice --url http://127.0.0.1:8080"
    )]
    Query {
        /// The aggregation's name.
        aggregation: String,
        /// The key (UTF-8 text).
        key: String,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Show a running instance's progress: next offset, high watermark and
    /// lag per partition, records applied per aggregation.
    Lag {
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  wagg completions bash > ~/.local/share/bash-completion/completions/wagg"
    )]
    Completions { shell: clap_complete::Shell },
    /// Measure throughput and query latency (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Generated records through batcher → plugin → RocksDB, no broker.
    #[command(
        after_help = "Example:\n  wagg bench engine --plugins count,stats,top-n --keys 1000,100000,10000000"
    )]
    Engine(wagg::tools::bench::engine::EngineOptions),
    /// A raw consumer (the ceiling) against wagg on one pre-produced topic.
    #[command(after_help = "Example:\n  wagg bench e2e --records 5000000 --keys 100000")]
    E2e {
        #[command(flatten)]
        common: E2eArgs,
    },
    /// `e2e`, plus key lookups at a fixed rate while wagg ingests, and the
    /// lookup rate once it has stopped.
    #[command(after_help = "Example:\n  wagg bench query --rate 2000")]
    Query {
        #[command(flatten)]
        common: E2eArgs,
        /// Lookups per second during ingestion.
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Seconds of closed-loop lookups after ingestion.
        #[arg(long, default_value_t = 5)]
        max_rate_seconds: u64,
    },
}

#[derive(clap::Args)]
struct E2eArgs {
    /// A running broker; default: start tansu (in-memory storage) on a
    /// free loopback port.
    #[arg(long)]
    brokers: Option<String>,
    /// The tansu binary to start.
    #[arg(long)]
    tansu: Option<PathBuf>,
    #[arg(long, default_value_t = 5_000_000)]
    records: u64,
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    #[arg(long, default_value = "count")]
    plugin: String,
    #[arg(long)]
    plugins_dir: Option<PathBuf>,
    /// wagg's `batch.commit_interval_ms`.
    #[arg(long, default_value_t = 1000)]
    commit_interval_ms: u64,
    /// A librdkafka consumer property for both the raw consumer and wagg
    /// (`[source.kafka]`), e.g. `fetch.max.bytes=104857600`; repeatable.
    #[arg(long = "consumer-property", value_name = "KEY=VALUE", value_parser = parse_property)]
    consumer_properties: Vec<(String, String)>,
    /// Write the results as JSON here (`.query.json` beside it for lookups).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

impl E2eArgs {
    fn options(
        self,
        query_rate: Option<u32>,
        max_rate_seconds: u64,
    ) -> wagg::tools::bench::e2e::E2eOptions {
        wagg::tools::bench::e2e::E2eOptions {
            brokers: self.brokers,
            tansu: self.tansu,
            records: self.records,
            partitions: self.partitions,
            keys: self.keys,
            plugin: self.plugin,
            plugins_dir: self.plugins_dir,
            query_rate,
            max_rate_seconds,
            commit_interval_ms: self.commit_interval_ms,
            consumer_properties: self.consumer_properties,
            out: self.out,
        }
    }
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Feed JSON-lines records through a plugin and print every key's state.
    ///
    /// Each input line is `{"key": "k", "value": ...}` with optional
    /// `timestamp` (ms), `partition` and `headers` ({"name": "value"}). A JSON
    /// string value is passed as raw text, any other JSON value as its JSON
    /// text, null as a tombstone.
    ///
    /// With `--golden DIR`, runs every case `DIR/<case>/` (`input.jsonl`,
    /// `params.json`, `expected.json`) at batch sizes 1, 3 and 1000 and fails
    /// on any difference.
    #[command(
        after_help = "Example:\n  wagg plugin test count.wasm --input records.jsonl\n  wagg plugin test stats.wasm --input records.jsonl --params '{\"field\": \"/amount\"}'\n  wagg plugin test my_plugin.wasm --golden golden"
    )]
    Test {
        /// The plugin component (.wasm).
        plugin: PathBuf,
        /// JSON-lines input file; `-` reads stdin.
        #[arg(
            long,
            short,
            required_unless_present = "golden",
            conflicts_with = "golden"
        )]
        input: Option<PathBuf>,
        /// A directory of golden cases to check instead.
        #[arg(long)]
        golden: Option<PathBuf>,
        /// The plugin's params as a JSON object.
        #[arg(long, default_value = "{}")]
        params: String,
        /// Records per plugin call.
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
        /// What to do with records the plugin rejects.
        #[arg(long, value_enum, default_value_t = OnError::Fail)]
        on_error: OnError,
    },
    /// Create a plugin crate from a template (uses the guest SDK, builds to
    /// wasm32-wasip2 as is, has a golden test).
    #[command(
        after_help = "Example:\n  wagg plugin new spend-total\n  cd spend-total && wagg plugin build . && wagg plugin test target/wasm32-wasip2/release/spend_total.wasm --golden golden"
    )]
    New {
        /// The plugin's name (also the crate's and directory's).
        name: String,
        /// Where to create it.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The wagg guest SDK crate (default: the one in the workspace this
        /// binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build a plugin crate into a .wasm component and print its path.
    Build {
        /// The plugin crate's directory.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Cargo target directory (default: `$CARGO_TARGET_DIR`, else the
        /// crate's `target/`).
        #[arg(long, env = "CARGO_TARGET_DIR")]
        target_dir: Option<PathBuf>,
    },
    /// Show a plugin's metadata.
    Inspect {
        /// The plugin component (.wasm).
        plugin: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colour only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Steps around `wagg run`'s live progress line on a terminal.
        .with_writer(wagg::ops::progress::LogWriter);
    match cli.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            config,
            progress_interval_secs,
        } => {
            let mut config = Config::load(&config)?;
            config.progress_interval = Some(std::time::Duration::from_secs(progress_interval_secs));
            wagg::app::run(config, shutdown_on_signal()?, |_| {})
        }
        Command::Demo {
            listen,
            rate,
            plugins_dir,
        } => wagg::tools::demo::run(
            wagg::tools::demo::DemoOptions {
                listen,
                rate,
                plugins_dir,
            },
            shutdown_on_signal()?,
        ),
        Command::CheckConfig { config: path } => {
            let config = Config::load(&path)?;
            let runtime = PluginRuntime::new(RuntimeConfig::new(
                &config.plugins,
                config.plugin_cache_dir(),
            ))?;
            let plugins = wagg::app::load_plugins(&config, &runtime)?;
            for (aggregation, plugin) in config.aggregations.iter().zip(&plugins) {
                println!(
                    "aggregation {:?}: {} (params ok)",
                    aggregation.name,
                    plugin.label()
                );
            }
            println!("{}: ok", path.display());
            Ok(())
        }
        Command::Query {
            aggregation,
            key,
            endpoint,
        } => {
            let state = wagg::tools::client::query(&endpoint.endpoint()?, &aggregation, &key)?;
            println!("{}", serde_json::to_string_pretty(&state)?);
            Ok(())
        }
        Command::Lag { endpoint } => {
            print!("{}", wagg::tools::client::lag(&endpoint.endpoint()?)?);
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "wagg", &mut std::io::stdout());
            Ok(())
        }
        Command::Plugin(command) => plugin_command(command),
        Command::Bench(command) => bench_command(command),
    }
}

fn bench_command(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Engine(options) => {
            wagg::tools::bench::engine::run(&options)?;
        }
        BenchCommand::E2e { common } => {
            wagg::tools::bench::e2e::run(&common.options(None, 0))?;
        }
        BenchCommand::Query {
            common,
            rate,
            max_rate_seconds,
        } => {
            wagg::tools::bench::e2e::run(&common.options(Some(rate), max_rate_seconds))?;
        }
    }
    Ok(())
}

/// A flag set on SIGINT or SIGTERM; a second signal exits at once.
fn shutdown_on_signal() -> anyhow::Result<Arc<AtomicBool>> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = shutdown.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            tracing::warn!("second signal: exiting immediately");
            std::process::exit(130);
        }
        // Through the log (not straight to stderr): in JSON logs too, and
        // never on top of the live progress line.
        tracing::info!("shutting down: finishing the batch in flight");
    })
    .context("installing the signal handler")?;
    Ok(shutdown)
}

fn plugin_command(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Test {
            plugin,
            golden: Some(golden),
            ..
        } => {
            let runtime = PluginRuntime::new(RuntimeConfig::default())?;
            let loaded = runtime.load(&plugin)?;
            let results = offline::run_golden(&loaded, &golden)?;
            let mut failed = 0;
            for result in &results {
                match &result.mismatch {
                    None => println!(
                        "ok    {} (batch size {})",
                        result.case.display(),
                        result.batch_size
                    ),
                    Some((got, want)) => {
                        failed += 1;
                        println!(
                            "FAIL  {} (batch size {})\n  got  {got}\n  want {want}",
                            result.case.display(),
                            result.batch_size
                        );
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} golden runs differ", results.len());
            }
            Ok(())
        }
        PluginCommand::Test {
            plugin,
            input,
            params,
            batch_size,
            on_error,
            ..
        } => {
            let input = input.context("--input or --golden is required")?;
            let params = normalize_params(&params)?;
            let runtime = PluginRuntime::new(RuntimeConfig::default())?;
            let loaded = runtime.load(&plugin)?;
            let mut instance = loaded.instantiate(&params)?;
            let records = if input == Path::new("-") {
                offline::read_jsonl(std::io::stdin().lock())?
            } else {
                let file = std::fs::File::open(&input)
                    .with_context(|| format!("cannot open {}", input.display()))?;
                offline::read_jsonl(std::io::BufReader::new(file))
                    .with_context(|| input.display().to_string())?
            };
            let states = offline::run(
                &mut instance,
                &records,
                batch_size,
                on_error,
                |record, message| {
                    eprintln!("line {}: skipped: {message}", record.offset);
                },
            )?;
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut stdout, &offline::to_json_object(states))?;
            writeln!(stdout)?;
            Ok(())
        }
        PluginCommand::New { name, dir, sdk } => {
            let sdk = match sdk {
                Some(sdk) => sdk,
                None => wagg::tools::author::scaffold::default_sdk_path().context(
                    "the guest SDK of the workspace this binary was built from is gone; pass --sdk PATH/guest-sdk",
                )?,
            };
            let created = wagg::tools::author::scaffold::new_plugin(&dir, &name, &sdk)?;
            println!("created {}", created.display());
            println!(
                "next: cd {} && wagg plugin build . && wagg plugin test target/wasm32-wasip2/release/{}.wasm --golden golden",
                created.display(),
                name.replace('-', "_")
            );
            Ok(())
        }
        PluginCommand::Build { path, target_dir } => {
            let wasm = build::build_plugin_crate(&path, target_dir.as_deref())?;
            println!("{}", wasm.display());
            Ok(())
        }
        PluginCommand::Inspect { plugin } => {
            let runtime = PluginRuntime::new(RuntimeConfig::default())?;
            let loaded = runtime.load(&plugin)?;
            let report = serde_json::json!({
                "path": plugin,
                "name": loaded.metadata().name,
                "version": loaded.metadata().version,
                "state_format": loaded.metadata().state_format,
                "sha256": loaded.content_hash(),
                "size_bytes": std::fs::metadata(&plugin).map(|m| m.len()).ok(),
                "exports": loaded.exports(),
                "imports": loaded.imports(),
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

/// Checks that `params` is a JSON object, so mistakes show up as a clear
/// message here rather than as a plugin's parse error.
fn normalize_params(params: &str) -> anyhow::Result<String> {
    let value: serde_json::Value =
        serde_json::from_str(params).context("--params is not valid JSON")?;
    anyhow::ensure!(
        value.is_object(),
        "--params must be a JSON object, got {value}"
    );
    Ok(value.to_string())
}
