//! The command line: every subcommand, flag and its help text (part of
//! the binary, not the library; `main.rs` dispatches).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use wagg::config::OnError;
use wagg::tools::author::componentize::Language;

/// wagg: live, queryable per-key aggregates of Kafka topics, computed by
/// WebAssembly plugins.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
#[command(after_help = "Examples:
  wagg demo                                  # everything on an embedded broker, no setup
  wagg check-config wagg.toml
  wagg run wagg.toml                         # or: wagg run --config wagg.toml
  wagg query spend_per_user alice            # a key's state, from a running instance
  wagg lag                                   # per-partition progress of a running instance
  wagg completions bash > /etc/bash_completion.d/wagg")]
pub(crate) struct Cli {
    /// Log format on stderr: `human` (default) or `json` (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "WAGG_LOG_FORMAT"
    )]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Human,
    Json,
}

/// The config file, given either way: `wagg run wagg.toml` or `wagg run
/// --config wagg.toml` (every command that reads a config takes both).
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct ConfigFile {
    /// The TOML config file.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// The TOML config file (the same as FILE).
    #[arg(long = "config", short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigFile {
    pub(crate) fn path(self) -> PathBuf {
        // clap's group makes exactly one of them present.
        self.file.or(self.config).unwrap_or_default()
    }
}

/// How `query` and `lag` reach a running instance.
#[derive(Debug, clap::Args)]
pub(crate) struct EndpointArgs {
    /// The instance's HTTP address (`http.listen`).
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "WAGG_URL")]
    pub(crate) url: String,
    /// Bearer token, when `[http.auth]` is configured.
    #[arg(long, env = "WAGG_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

impl EndpointArgs {
    pub(crate) fn endpoint(self) -> anyhow::Result<wagg::tools::client::Endpoint> {
        Ok(wagg::tools::client::Endpoint {
            url: wagg::tools::client::parse_url(&self.url)?,
            token: self.token,
        })
    }
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Consume the configured topics and serve the aggregations over HTTP.
    #[command(after_help = "Example:\n  wagg run wagg.toml")]
    Run {
        #[command(flatten)]
        config: ConfigFile,
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
    #[command(after_help = "Example:\n  wagg check-config wagg.toml")]
    CheckConfig {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Clear one aggregation's state and have it rebuilt from a point of
    /// its topics while the others go on: on a running instance (`--url`),
    /// or on a stopped one's store (`--config`).
    #[command(
        after_help = "Examples:\n  wagg reset --url http://127.0.0.1:8080 --aggregation spend_per_user --to earliest\n  wagg reset wagg.toml --aggregation spend_per_user --to 2026-11-29T00:00:00Z"
    )]
    #[command(group(clap::ArgGroup::new("where").args(["file", "config", "url"]).required(true)))]
    Reset {
        /// The TOML config file of a stopped instance.
        #[arg(value_name = "FILE", conflicts_with_all = ["config", "url"])]
        file: Option<PathBuf>,
        /// The TOML config file of a stopped instance (the same as FILE).
        #[arg(long, short, value_name = "FILE", conflicts_with = "url")]
        config: Option<PathBuf>,
        /// A running instance's HTTP address (`POST /v1/admin/reset`).
        /// Not taken from `WAGG_URL`: where the reset happens is said
        /// explicitly.
        #[arg(long)]
        url: Option<String>,
        /// Bearer token, when `[http.auth]` is configured.
        #[arg(long, env = "WAGG_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The aggregation to reset.
        #[arg(long)]
        aggregation: String,
        /// `earliest` (the first record the broker holds), `latest` (where
        /// the other aggregations are) or an RFC 3339 time (the first
        /// record at or after it).
        #[arg(long)]
        to: wagg::tools::state_admin::ResetTo,
    },
    /// Have a running instance re-read its config file (`POST
    /// /v1/admin/reload`; `SIGHUP` does the same) and print what changed.
    #[command(after_help = "Example:\n  wagg reload --url http://127.0.0.1:8080")]
    Reload {
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// List the keys whose states differ between two aggregations of a
    /// running instance (e.g. a new plugin version run beside the old one
    /// on the same topic); exits with status 1 when some differ.
    #[command(after_help = "Example:\n  wagg diff spend spend_v2 --url http://127.0.0.1:8080")]
    Diff {
        /// The first aggregation.
        a: String,
        /// The second aggregation.
        b: String,
        /// How many differences to show.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Manage the stored state (wagg must be stopped).
    #[command(subcommand)]
    State(StateCommand),
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
pub(crate) enum BenchCommand {
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
        /// Run a second time with `fetch.wait.max.ms=10` (ingestion as fast
        /// as the broker serves, not paced by its fetch wait) and report
        /// both.
        #[arg(long)]
        unpaced: bool,
    },
}

#[derive(clap::Args)]
pub(crate) struct E2eArgs {
    /// A running broker; default: start tansu (in-memory storage) on a
    /// free loopback port.
    #[arg(long)]
    pub(crate) brokers: Option<String>,
    /// The tansu binary to start.
    #[arg(long)]
    pub(crate) tansu: Option<PathBuf>,
    #[arg(long, default_value_t = 5_000_000)]
    pub(crate) records: u64,
    #[arg(long, default_value_t = 8)]
    pub(crate) partitions: i32,
    #[arg(long, default_value_t = 100_000)]
    pub(crate) keys: u64,
    #[arg(long, default_value = "count")]
    pub(crate) plugin: String,
    #[arg(long)]
    pub(crate) plugins_dir: Option<PathBuf>,
    /// wagg's `batch.commit_interval_ms`.
    #[arg(long, default_value_t = 1000)]
    pub(crate) commit_interval_ms: u64,
    /// A librdkafka consumer property for both the raw consumer and wagg
    /// (`[source.kafka]`), e.g. `fetch.max.bytes=104857600`; repeatable.
    #[arg(long = "consumer-property", value_name = "KEY=VALUE", value_parser = parse_property)]
    pub(crate) consumer_properties: Vec<(String, String)>,
    /// Have the aggregation emit its changes (`emit`) to a topic the run
    /// creates beside the source topic.
    #[arg(long)]
    pub(crate) emit: bool,
    /// Write the results as JSON here (`.query.json` beside it for lookups).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

pub(crate) fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

impl E2eArgs {
    pub(crate) fn options(
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
            emit: self.emit,
            out: self.out,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum StateCommand {
    /// Delete the stored state of an aggregation removed from the config.
    #[command(after_help = "Example:\n  wagg state drop wagg.toml --aggregation old_totals")]
    Drop {
        /// The config (without the aggregation).
        #[command(flatten)]
        config: ConfigFile,
        /// The aggregation whose state to delete.
        #[arg(long)]
        aggregation: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum PluginCommand {
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
    ///
    /// With `--conformance`, runs the ABI conformance vectors against a
    /// build of the conformance probe (`plugins/testing/conformance`, or its
    /// port to a new guest SDK) and fails on any difference.
    #[command(
        after_help = "Example:\n  wagg plugin test count.wasm --input records.jsonl\n  wagg plugin test stats.wasm --input records.jsonl --params '{\"field\": \"/amount\"}'\n  wagg plugin test my_plugin.wasm --golden golden\n  wagg plugin test probe.wasm --conformance"
    )]
    Test {
        /// The plugin component (.wasm).
        plugin: PathBuf,
        /// JSON-lines input file; `-` reads stdin.
        #[arg(
            long,
            short,
            required_unless_present_any = ["golden", "conformance"],
            conflicts_with_all = ["golden", "conformance"]
        )]
        input: Option<PathBuf>,
        /// A directory of golden cases to check instead.
        #[arg(long, conflicts_with = "conformance")]
        golden: Option<PathBuf>,
        /// Run the ABI conformance vectors instead (the plugin must be a
        /// build of the conformance probe).
        #[arg(long)]
        conformance: bool,
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
    /// Create a plugin project from a template (Rust, Python or
    /// JavaScript: the same aggregation, a copy of the guest SDK, a golden
    /// test; it builds as is).
    #[command(
        after_help = "Example:\n  wagg plugin new spend-total\n  cd spend-total && wagg plugin build . && wagg plugin test target/wasm32-wasip2/release/spend_total.wasm --golden golden\n  wagg plugin new spend-py --lang python\n  cd spend-py && wagg plugin build . && wagg plugin test target/plugin.wasm --golden golden"
    )]
    New {
        /// The plugin's name (also the project's directory's).
        name: String,
        /// The language to write the plugin in.
        #[arg(long, value_enum, default_value_t = Language::Rust)]
        lang: Language,
        /// Where to create it.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Use this guest SDK crate, by path (SDK development). By default
        /// the crate gets its own copy of the SDK embedded in wagg
        /// (`wagg-sdk/`), so it builds wherever it is copied.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build a plugin project into a .wasm component and print its path: a
    /// Rust crate with cargo, a Python project (`plugin.py`) with
    /// componentize-py, a JavaScript one (`plugin.js`) with componentize-js
    /// (both installed on first use into wagg's cache).
    Build {
        /// The plugin project's directory.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Cargo target directory for a Rust crate (default:
        /// `$CARGO_TARGET_DIR`, else the crate's `target/`).
        #[arg(long, env = "CARGO_TARGET_DIR")]
        target_dir: Option<PathBuf>,
    },
    /// Show a plugin's metadata.
    Inspect {
        /// The plugin component (.wasm).
        plugin: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    fn config_of(args: &[&str]) -> Result<PathBuf, clap::Error> {
        let cli = Cli::try_parse_from(args)?;
        Ok(match cli.command {
            Command::Run { config, .. } | Command::CheckConfig { config } => config.path(),
            Command::State(StateCommand::Drop { config, .. }) => config.path(),
            Command::Reset { file, config, .. } => file.or(config).unwrap_or_default(),
            _ => panic!("not a command with a config"),
        })
    }

    #[test]
    fn every_command_that_reads_a_config_takes_it_either_way() {
        Cli::command().debug_assert();
        for command in [
            &["wagg", "run"][..],
            &["wagg", "check-config"],
            &["wagg", "state", "drop", "--aggregation", "a"],
            &["wagg", "reset", "--aggregation", "a", "--to", "earliest"],
        ] {
            for form in [&["w.toml"][..], &["--config", "w.toml"], &["-c", "w.toml"]] {
                let args: Vec<&str> = command.iter().chain(form).copied().collect();
                assert_eq!(
                    config_of(&args).map_err(|e| e.to_string()),
                    Ok(PathBuf::from("w.toml")),
                    "{args:?}"
                );
            }
            let both: Vec<&str> = command
                .iter()
                .chain(&["a.toml", "--config", "b.toml"])
                .copied()
                .collect();
            assert!(config_of(&both).is_err(), "{both:?}");
            let neither: Vec<&str> = command.to_vec();
            assert!(config_of(&neither).is_err(), "{neither:?}");
        }
    }
}
