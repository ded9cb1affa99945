//! The README, followed the way a newcomer does: install wagg with the
//! README's command, go through the quickstart with that installed `wagg`
//! in a scratch directory, then start the demo with the README's command
//! and run every query it prints. The blocks are the README's own, found
//! by their `newcomer=install|quickstart|demo` tags, so the README cannot
//! drift from what works.
//!
//! Ignored inside `cargo test`: `cargo install` and the demo's `cargo run`
//! take the build lock a running `cargo test` holds. `scripts/test.sh`
//! runs it afterwards, executing this test binary directly. It also checks
//! that neither command compiles anything after the tests' build (same
//! feature resolution), and that Ctrl-C stops the demo with status 0 and
//! no ERROR or WARN line.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::markdown::{Block, code_blocks, run_shell_block};

/// The README's blocks tagged `newcomer=<step>`, in order.
fn blocks(step: &str) -> Vec<Block> {
    let readme = std::fs::read_to_string(common::workspace_root().join("README.md"))
        .expect("read README.md");
    let blocks: Vec<Block> = code_blocks(&readme)
        .into_iter()
        .filter(|b| b.attr("newcomer") == Some(step))
        .collect();
    assert!(!blocks.is_empty(), "README.md has no newcomer={step} block");
    blocks
}

/// `PATH` with `bin` first, and no cargo target directory (the tests'
/// `wagg` must not stand in for the installed one).
fn path_with(bin: &Path) -> String {
    let target = common::target_dir();
    let rest = std::env::var("PATH").unwrap_or_default();
    let rest = rest
        .split(':')
        .filter(|dir| !Path::new(dir).starts_with(&target));
    std::iter::once(bin.display().to_string())
        .chain(rest.map(str::to_owned))
        .collect::<Vec<_>>()
        .join(":")
}

/// Lines of cargo's output saying it compiled something.
fn compiled(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("Compiling "))
        .collect()
}

#[test]
#[ignore = "run by scripts/test.sh after `cargo test`: it runs cargo itself"]
fn a_newcomer_follows_the_readme() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let root = common::workspace_root();
    let bin = scratch.path().join("cargo/bin");
    let path_env = path_with(&bin);

    // Install, from the clone, into the scratch directory's cargo root.
    let started = Instant::now();
    for block in blocks("install") {
        let output = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &block.text])
            .current_dir(&root)
            .env("PATH", &path_env)
            .env("CARGO_INSTALL_ROOT", scratch.path().join("cargo"))
            .output()
            .expect("run bash");
        assert!(
            output.status.success(),
            "README install failed ({}):\n{}\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            block.text,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            compiled(&stderr),
            Vec::<&str>::new(),
            "the install rebuilt what the tests had built (feature resolution differs):\n{stderr}"
        );
    }
    assert!(bin.join("wagg").is_file(), "no wagg in {}", bin.display());
    eprintln!("install: {:.1} s", started.elapsed().as_secs_f64());

    // The quickstart, with the installed wagg. Plugin builds share the
    // tests' warm wasm target directory (a newcomer's first one compiles
    // the SDK's dependencies, about a minute on two cores).
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    let mut cwd = work.clone();
    let started = Instant::now();
    for block in blocks("quickstart") {
        if let Some(file) = block.attr("file") {
            let path = cwd.join(file);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(&path, &block.text).expect("write block file");
            continue;
        }
        let at = format!("README.md:{}", block.line);
        cwd = run_shell_block(&at, &block.text, &cwd, |command| {
            command.env("PATH", &path_env).env(
                "CARGO_TARGET_DIR",
                common::target_dir().join("wasm-plugins"),
            );
        });
    }
    eprintln!(
        "quickstart, from `plugin new` to `check-config` ok: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The demo, with the README's command; then every query it prints.
    let demos = blocks("demo");
    let [demo_block] = &demos[..] else {
        panic!("one newcomer=demo block")
    };
    let started = Instant::now();
    let mut demo = Demo::start(&demo_block.text, &root, &path_env);
    let queries = demo.printed_queries();
    eprintln!(
        "demo: queries printed {:.1} s after the command",
        started.elapsed().as_secs_f64()
    );
    assert!(queries.len() >= 5, "{queries:?}");
    for query in &queries {
        let body = answer(query, &path_env);
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap_or_else(|e| panic!("`{query}` answered {body:?}, not JSON: {e}"));
    }
    let (status, stderr) = demo.interrupt();
    assert!(status.success(), "the demo exited with {status}:\n{stderr}");
    assert_eq!(
        compiled(&stderr),
        Vec::<&str>::new(),
        "the demo rebuilt what the tests had built:\n{stderr}"
    );
    let alarming: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .collect();
    assert!(
        alarming.is_empty(),
        "Ctrl-C of the demo logged:\n{}",
        alarming.join("\n")
    );
}

/// Runs a printed `curl` query until it answers (the demo's keys appear
/// within seconds of its start); returns the body.
fn answer(query: &str, path_env: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = Command::new("bash")
            .args(["-c", &format!("{query} --fail-with-body --max-time 5")])
            .env("PATH", path_env)
            .output()
            .expect("run curl");
        if output.status.success() {
            return String::from_utf8_lossy(&output.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "`{query}` does not answer: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The demo started by the README's command, in its own process group
/// (Ctrl-C at a terminal signals the whole group).
struct Demo {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    stderr: std::thread::JoinHandle<String>,
}

impl Demo {
    fn start(script: &str, root: &Path, path_env: &str) -> Self {
        let mut child = Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(root)
            .env("PATH", path_env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start the demo");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The `curl` lines the demo prints once it serves.
    fn printed_queries(&mut self) -> Vec<String> {
        let mut queries = Vec::new();
        let mut line = String::new();
        // Printed together, right after the server starts listening.
        while queries.len() < 6 {
            line.clear();
            let read = self.stdout.read_line(&mut line).expect("read the demo");
            assert!(read > 0, "the demo ended after printing {queries:?}");
            if let Some(query) = line.trim().strip_prefix("curl ") {
                queries.push(format!("curl {query}"));
            }
        }
        queries
    }

    /// Ctrl-C: SIGINT to the group; the exit status and everything logged.
    fn interrupt(mut self) -> (std::process::ExitStatus, String) {
        signal_group(self.child.id(), "-INT");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the demo") {
                break status;
            }
            if Instant::now() > deadline {
                let threads = threads_of(self.child.id());
                signal_group(self.child.id(), "-KILL");
                let _ = self.child.wait();
                let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
                panic!(
                    "the demo did not stop on Ctrl-C; its threads: {threads}\n--- stderr\n{}",
                    stderr.join().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        (status, stderr.join().expect("stderr reader"))
    }
}

impl Drop for Demo {
    /// A failed test leaves no demo holding port 8080.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal_group(self.child.id(), "-KILL");
            let _ = self.child.wait();
        }
    }
}

fn signal_group(group: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, "--", &format!("-{group}")])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {signal} -{group}");
}

/// Each thread's name and what it waits in, for a process that hangs.
fn threads_of(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(gone)".into();
    };
    tasks
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            Some(format!(
                "{} ({})",
                read("comm").trim(),
                read("wchan").trim()
            ))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
