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
    let _ = child.kill();
    let _ = child.wait();
}
