//! Every code block in `README.md` and `docs/*.md` is exercised here, so
//! the documentation cannot drift from the code. Each document is a
//! walkthrough: its blocks run in order, in one scratch directory that holds
//! the example plugins as `plugins/<name>.wasm` (`count`, `sum`, `stats`,
//! `latest`, `top-n`, `distinct`), with a `wagg demo` instance standing in
//! for `http://127.0.0.1:8080`.
//!
//! What a block's info string means:
//! - `<lang> file=PATH`: the block is written to PATH (relative to the
//!   walkthrough's current directory); later blocks use it.
//! - `sh`: run by `bash -euo pipefail` with `wagg` on `PATH`; a `cd` carries
//!   over to the next block. `curl` fails on an HTTP error status
//!   (`--fail-with-body`), unless the block is `sh http-errors` (examples of
//!   error responses).
//! - `sh no-run`: starts a long-running process, needs a broker or changes
//!   the machine, so it is not run: it must be valid bash, and every
//!   `wagg ...` line must be accepted by wagg's own argument parser.
//! - `toml`: a complete config file; `wagg check-config` must accept it.
//! - `json` / `jsonl`: must parse (every line, for `jsonl`).
//! - `sse`: server-sent events: every line a `field: value` of `event`,
//!   `id` or `data` (whose value must be JSON), a `:` comment, or blank.
//! - `prometheus`: sample metrics; every metric name must be one the demo's
//!   `/metrics` exposes.
//!
//! Anything else fails the test, so a new kind of block gets a rule here.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::demo::Demo;
use common::markdown::{Block, code_blocks, run_shell_block};

const DEMO_ADDRESS: &str = "http://127.0.0.1:8080";

struct Walkthrough<'a> {
    doc: String,
    cwd: PathBuf,
    demo: &'a Demo,
    metric_names: &'a [String],
    /// `PATH` with `wagg`, and with the failing `curl` wrapper in front.
    path_env: String,
    path_env_plain_curl: String,
}

impl Walkthrough<'_> {
    fn run(&mut self, block: &Block) {
        let at = format!("{}:{} ({} block)", self.doc, block.line, block.lang);
        if let Some(file) = block.attr("file") {
            let path = self.cwd.join(file);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(&path, &block.text).expect("write block file");
            return;
        }
        match (block.lang.as_str(), block.flag("no-run")) {
            ("sh", false) => self.run_shell(&at, &block.text, block.flag("http-errors")),
            ("sh", true) => self.check_shell(&at, &block.text),
            ("toml", _) => {
                let config = self.cwd.join(".doc-block.toml");
                std::fs::write(&config, &block.text).expect("write config");
                let output = self.wagg(&["check-config", config.to_str().expect("utf-8")]);
                assert!(
                    output.status.success(),
                    "{at}: wagg check-config rejects it:\n{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            ("json", _) => {
                serde_json::from_str::<serde_json::Value>(&block.text)
                    .unwrap_or_else(|e| panic!("{at}: not JSON: {e}"));
            }
            ("jsonl", _) => {
                for line in block.text.lines().filter(|l| !l.trim().is_empty()) {
                    serde_json::from_str::<serde_json::Value>(line)
                        .unwrap_or_else(|e| panic!("{at}: {line:?} is not JSON: {e}"));
                }
            }
            ("sse", _) => {
                for line in block
                    .text
                    .lines()
                    .filter(|l| !l.is_empty() && !l.starts_with(':'))
                {
                    let (field, value) = line
                        .split_once(": ")
                        .unwrap_or_else(|| panic!("{at}: {line:?} is not `field: value`"));
                    match field {
                        "event" | "id" => {}
                        "data" => {
                            serde_json::from_str::<serde_json::Value>(value)
                                .unwrap_or_else(|e| panic!("{at}: {value:?} is not JSON: {e}"));
                        }
                        other => panic!("{at}: {other:?} is not an event field"),
                    }
                }
            }
            ("prometheus", _) => {
                for line in block.text.lines() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let name = line
                        .split(['{', ' '])
                        .next()
                        .expect("split yields one item");
                    let family = ["_total", "_sum", "_count", "_bucket", "_created"]
                        .iter()
                        .find_map(|suffix| name.strip_suffix(suffix))
                        .unwrap_or(name);
                    assert!(
                        self.metric_names.iter().any(|m| m == name || m == family),
                        "{at}: {name} is not exposed by /metrics"
                    );
                }
            }
            (lang, _) => panic!("{at}: no rule for `{lang}` blocks (see tests/docs.rs)"),
        }
    }

    fn wagg(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_wagg"))
            .args(args)
            .current_dir(&self.cwd)
            .output()
            .expect("run wagg")
    }

    fn run_shell(&mut self, at: &str, script: &str, block_allows_http_errors: bool) {
        let script = script.replace(DEMO_ADDRESS, &self.demo.base);
        let path = if block_allows_http_errors {
            &self.path_env_plain_curl
        } else {
            &self.path_env
        };
        self.cwd = run_shell_block(at, &script, &self.cwd, |command| {
            command
                .env("PATH", path)
                // Plugin builds share one warm target directory (never the
                // host build's: a nested cargo would wait on its lock).
                .env(
                    "CARGO_TARGET_DIR",
                    common::target_dir().join("wasm-plugins"),
                )
                .env_remove("WAGG_URL")
                .env_remove("WAGG_TOKEN");
        });
    }

    fn check_shell(&self, at: &str, script: &str) {
        let syntax = Command::new("bash")
            .args(["-n", "-c", script])
            .output()
            .expect("run bash -n");
        assert!(
            syntax.status.success(),
            "{at}: not valid bash: {}",
            String::from_utf8_lossy(&syntax.stderr)
        );
        for line in script.lines().map(str::trim) {
            // `NAME=value wagg ...`: the environment prefix is not wagg's.
            let mut command = line;
            while let Some((word, rest)) = command.split_once(' ')
                && word.contains('=')
                && !word.starts_with('-')
            {
                command = rest.trim_start();
            }
            let Some(args) = command.strip_prefix("wagg ") else {
                continue;
            };
            let args = args.split(" #").next().expect("split yields one item");
            let mut words = shell_words(args);
            words.push("--help".into());
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            let output = self.wagg(&words);
            assert!(
                output.status.success(),
                "{at}: `{line}` is not a valid wagg command line:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// Splits a simple command line (plain words, single or double quotes).
fn shell_words(line: &str) -> Vec<String> {
    let output = Command::new("bash")
        .args(["-c", &format!("printf '%s\\0' {line}")])
        .output()
        .expect("run bash");
    String::from_utf8_lossy(&output.stdout)
        .split('\0')
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

fn documents() -> Vec<PathBuf> {
    let root = common::workspace_root();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, root.join("README.md"));
    docs
}

#[test]
fn every_code_block_in_the_docs_runs() {
    let demo = Demo::start();
    // The examples look up keys the demo's generator produces within
    // seconds (1,000 purchases/s over a few thousand users).
    let started = std::time::Instant::now();
    for path in [
        "/v1/aggregations/spend_per_user/keys/user-0001",
        "/v1/aggregations/spend_per_user/keys/user-0002",
        "/v1/aggregations/buyers_per_item/keys/apple",
    ] {
        while demo
            .get(path)
            .is_none_or(|body| body.get("state").is_none())
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the demo has no {path}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    let metrics = reqwest::blocking::get(format!("{}/metrics", demo.base))
        .and_then(|r| r.text())
        .expect("/metrics");
    let metric_names: Vec<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(metric_names.len() > 10, "{metrics}");

    let bin_dir = Path::new(env!("CARGO_BIN_EXE_wagg"))
        .parent()
        .expect("binary dir")
        .to_owned();
    let path_env_plain_curl = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let wrappers = tempfile::tempdir().expect("tempdir");
    let curl = wrappers.path().join("curl");
    let real_curl = Command::new("bash")
        .args(["-c", "command -v curl"])
        .output()
        .expect("bash");
    let real_curl = String::from_utf8_lossy(&real_curl.stdout).trim().to_owned();
    assert!(
        !real_curl.is_empty(),
        "curl is needed (scripts/setup.sh --tests installs it)"
    );
    std::fs::write(
        &curl,
        format!("#!/bin/sh\nexec {real_curl} --fail-with-body \"$@\"\n"),
    )
    .expect("write curl wrapper");
    let mut permissions = std::fs::metadata(&curl).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&curl, permissions).expect("chmod");
    let path_env = format!("{}:{path_env_plain_curl}", wrappers.path().display());
    let mut checked = 0;
    for doc in documents() {
        let scratch = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(scratch.path().join("plugins")).expect("mkdir");
        for (name, wasm) in common::plugins() {
            std::fs::copy(wasm, scratch.path().join(format!("plugins/{name}.wasm")))
                .expect("copy plugin");
        }
        let text = std::fs::read_to_string(&doc).expect("read doc");
        let name = doc
            .strip_prefix(common::workspace_root())
            .unwrap_or(&doc)
            .display()
            .to_string();
        let mut walkthrough = Walkthrough {
            doc: name,
            cwd: scratch.path().to_owned(),
            demo: &demo,
            metric_names: &metric_names,
            path_env: path_env.clone(),
            path_env_plain_curl: path_env_plain_curl.clone(),
        };
        for block in code_blocks(&text) {
            walkthrough.run(&block);
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} blocks found");
    eprintln!("{checked} code blocks checked");
}

#[test]
fn code_blocks_are_found_with_their_info_strings() {
    let blocks = code_blocks("text\n```sh no-run\na\n```\n\n  ```toml file=x.toml\nb = 1\n  ```\n");
    assert_eq!(blocks.len(), 2);
    assert_eq!((blocks[0].line, blocks[0].lang.as_str()), (2, "sh"));
    assert!(blocks[0].flag("no-run"));
    assert_eq!(blocks[1].attr("file"), Some("x.toml"));
    assert_eq!(blocks[1].text, "b = 1\n");
}
