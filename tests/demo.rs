//! `wagg demo` as the README runs it: no broker installed, and the printed
//! `curl` commands answer with real data within 30 s of start.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[test]
fn demo_answers_its_printed_curl_commands_within_30_seconds() {
    // Build the plugins first (as `scripts/demo.sh` would have), so the 30 s
    // measure the demo itself.
    common::plugins();
    let port = common::broker::free_port();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wagg"))
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start wagg demo");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut urls = Vec::new();
    while urls.len() < 6 {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(30).saturating_sub(started.elapsed()))
            .expect("the demo printed its curl commands in time");
        if let Some(command) = line.trim().strip_prefix("curl -s ") {
            urls.push(command.trim_matches('\'').to_owned());
        }
    }

    let client = reqwest::blocking::Client::new();
    for url in &urls {
        loop {
            let response = client.get(url).timeout(Duration::from_secs(5)).send();
            if let Ok(response) = response
                && response.status().is_success()
            {
                let body: serde_json::Value = response.json().expect("JSON body");
                let empty = body
                    .get("items")
                    .is_some_and(|items| items.as_array().is_some_and(Vec::is_empty))
                    || body
                        .get("aggregations")
                        .is_some_and(|a| a.as_array().is_some_and(Vec::is_empty));
                if !empty {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{url} gave no non-empty answer within 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // SIGTERM, so the demo removes its temporary state directory.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// On a terminal, `wagg demo` (like `wagg run`) shows a live progress line;
/// log lines, including the one the shutdown signal prints, are written
/// above it — each starts on a cleared line, never after the progress text.
#[test]
fn on_a_terminal_log_lines_never_land_on_the_progress_line() {
    common::plugins();
    let port = common::broker::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let transcript = dir.path().join("typescript");
    // `script` (util-linux) gives wagg a pseudo-terminal; `timeout` inside
    // it sends the SIGINT a person's Ctrl-C would.
    let command = format!(
        "timeout -s INT 6 {} demo --listen 127.0.0.1:{port}",
        env!("CARGO_BIN_EXE_wagg")
    );
    let status = Command::new("script")
        .args(["-qfc", &command])
        .arg(&transcript)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("run script (bsdutils)");
    assert!(status.code().is_some(), "{status}");
    let text =
        String::from_utf8_lossy(&std::fs::read(&transcript).expect("transcript")).into_owned();
    assert!(
        text.contains("records (") && text.contains("caught up"),
        "no live progress line:\n{text:?}"
    );
    assert!(
        text.contains("shutting down: finishing the batch in flight"),
        "{text:?}"
    );
    // Log lines start with their timestamp (dimmed on a terminal).
    let starts: Vec<usize> = text.match_indices("\x1b[2m20").map(|(i, _)| i).collect();
    assert!(starts.len() >= 3, "log lines expected:\n{text:?}");
    for start in starts {
        let before = &text[..start];
        assert!(
            before.is_empty() || before.ends_with('\n') || before.ends_with("\r\x1b[2K"),
            "a log line lands on the progress line: {:?}",
            &text[start.saturating_sub(120)..(start + 80).min(text.len())]
        );
    }
}
