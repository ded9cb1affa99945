use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::Parser;
use wagg::config::Config;
use wagg::ops::alloc_count::CountingAllocator;
use wagg::plugin::{PluginRuntime, RuntimeConfig};
use wagg::tools::author::componentize::{self, Language};
use wagg::tools::author::{build, conformance, offline, scaffold};

/// glibc's allocator spent a quarter of the engine benchmark's time in
/// malloc/free (BENCHMARKS.md); mimalloc does not. Counted only while the
/// engine benchmark measures allocations per record.
#[global_allocator]
static ALLOCATOR: CountingAllocator<mimalloc::MiMalloc> = CountingAllocator(mimalloc::MiMalloc);

mod cli;

use cli::{BenchCommand, Cli, Command, LogFormat, PluginCommand, StateCommand};

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
    // Before any thread or large allocation: see `ops::scheduling`.
    if let Err(e) = wagg::ops::scheduling::disable_transparent_huge_pages() {
        tracing::debug!(error = %e, "transparent huge pages stay on");
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
            let mut config = Config::load(&config.path())?;
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
            let path = path.path();
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
        Command::Reset {
            file,
            config,
            url,
            token,
            aggregation,
            to,
        } => {
            let message = match (file.or(config), url) {
                (Some(config), _) => {
                    let config = Config::load(&config)?;
                    wagg::tools::state_admin::reset(&config, &aggregation, to)?
                }
                (None, url) => {
                    let endpoint = wagg::tools::client::Endpoint {
                        url: wagg::tools::client::parse_url(url.as_deref().unwrap_or_default())?,
                        token,
                    };
                    wagg::tools::client::reset(&endpoint, &aggregation, &to.as_arg())?
                }
            };
            println!("{message}");
            Ok(())
        }
        Command::Reload { endpoint } => {
            print!("{}", wagg::tools::client::reload(&endpoint.endpoint()?)?);
            Ok(())
        }
        Command::Diff {
            a,
            b,
            limit,
            endpoint,
        } => {
            let summary = wagg::tools::diff::diff(&endpoint.endpoint()?, &a, &b, limit)?;
            print!("{}", summary.report(&a, &b));
            if summary.differing > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::State(StateCommand::Drop {
            config,
            aggregation,
        }) => {
            let config = Config::load(&config.path())?;
            println!(
                "{}",
                wagg::tools::state_admin::drop_state(&config, &aggregation)?
            );
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
            unpaced,
        } => {
            let options = common.options(Some(rate), max_rate_seconds);
            wagg::tools::bench::e2e::run_query(&options, unpaced)?;
        }
    }
    Ok(())
}

/// A flag set on SIGINT or SIGTERM; a second signal exits at once. (Not
/// on SIGHUP: `wagg run` reloads its config on that one.)
fn shutdown_on_signal() -> anyhow::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = shutdown.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the signal listener")?;
    // Registered here, before returning: a signal that comes before the
    // thread runs is not lost.
    let (mut interrupts, mut terminations) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .context("installing the signal handlers")?;
    std::thread::Builder::new()
        .name("wagg-signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                loop {
                    tokio::select! {
                        _ = interrupts.recv() => {}
                        _ = terminations.recv() => {}
                    }
                    if flag.swap(true, Ordering::SeqCst) {
                        tracing::warn!("second signal: exiting immediately");
                        std::process::exit(130);
                    }
                    // Through the log (not straight to stderr): in JSON
                    // logs too, and never on top of the live progress line.
                    tracing::info!("shutting down: finishing the batch in flight");
                }
            });
        })
        .context("starting the signal listener")?;
    Ok(shutdown)
}

// One match arm per `wagg plugin` subcommand, each a few lines.
fn plugin_command(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Test {
            plugin,
            golden: Some(golden),
            ..
        } => {
            let runtime = offline_runtime()?;
            let loaded = runtime.load(&plugin)?;
            let results = offline::run_golden(&loaded, &golden)?;
            let mut failed = 0;
            for result in &results {
                let how = if result.merged {
                    "two halves merged".to_owned()
                } else {
                    format!("batch size {}", result.batch_size)
                };
                match &result.mismatch {
                    None => println!("ok    {} ({how})", result.case.display()),
                    Some((got, want)) => {
                        failed += 1;
                        println!(
                            "FAIL  {} ({how})\n  got  {got}\n  want {want}",
                            result.case.display()
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
            conformance: true,
            ..
        } => {
            let runtime = offline_runtime()?;
            let results = conformance::run_conformance(&runtime.load(&plugin)?)?;
            let failed = results.iter().filter(|r| !r.problems.is_empty()).count();
            for result in &results {
                let verdict = if result.problems.is_empty() {
                    "ok  "
                } else {
                    "FAIL"
                };
                println!("{verdict}  {} ({})", result.name, result.about);
                for problem in &result.problems {
                    println!("  {problem}");
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} conformance cases fail", results.len());
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
            let runtime = offline_runtime()?;
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
        PluginCommand::New {
            name,
            lang,
            dir,
            sdk,
        } => {
            let created = scaffold::new_project(&dir, &name, lang, sdk.as_deref())?;
            let wasm = match lang {
                Language::Rust => format!(
                    "target/wasm32-wasip2/release/{}.wasm",
                    name.replace('-', "_")
                ),
                _ => componentize::OUTPUT.to_owned(),
            };
            println!("created {}", created.display());
            println!(
                "next: cd {} && wagg plugin build . && wagg plugin test {wasm} --golden golden",
                created.display(),
            );
            Ok(())
        }
        PluginCommand::Build { path, target_dir } => {
            let wasm = match Language::of_project(&path)? {
                Language::Rust => build::build_plugin_crate(&path, target_dir.as_deref())?,
                language => componentize::build_project(&path, language, &path.join("target"))?,
            };
            println!("{}", wasm.display());
            Ok(())
        }
        PluginCommand::Inspect { plugin } => {
            let runtime = offline_runtime()?;
            let loaded = runtime.load(&plugin)?;
            let report = serde_json::json!({
                "path": plugin,
                "name": loaded.metadata().name,
                "version": loaded.metadata().version,
                "state_format": loaded.metadata().state_format,
                "migrates_from": loaded.metadata().migrates_from,
                "merges": loaded.metadata().merges,
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

/// The runtime of the `wagg plugin` commands: default limits, compiled
/// plugins cached under wagg's cache directory (a Python or JavaScript
/// plugin takes seconds to compile; the second run starts at once).
fn offline_runtime() -> anyhow::Result<PluginRuntime> {
    let cache_dir = componentize::cache_dir()
        .ok()
        .map(|dir| dir.join("compiled-plugins"));
    Ok(PluginRuntime::new(RuntimeConfig {
        cache_dir,
        ..RuntimeConfig::default()
    })?)
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
