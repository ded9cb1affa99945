//! The OpenAPI document at `/openapi.json` against the live server:
//! schemathesis generates requests from it (bounded: 50 examples per
//! operation, deterministic) and checks every answer — status codes,
//! content types and bodies must be the documented ones, and no request
//! may produce a 5xx.
//!
//! `positive_data_acceptance` is excluded: whether `after`/`key` is valid
//! depends on `encoding` (base64 or not), which OpenAPI parameters cannot
//! express, so a schema-valid request can correctly get a 400.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn schemathesis() -> String {
    std::env::var("WAGG_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".to_owned())
}

#[test]
fn responses_conform_to_the_served_openapi_document() {
    common::plugins();
    let port = common::broker::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_wagg"))
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start wagg demo");
    let client = reqwest::blocking::Client::new();
    let started = Instant::now();
    // Wait until the demo has data, so lookups of real keys are exercised.
    loop {
        let listed = client
            .get(format!(
                "{base}/v1/aggregations/purchases_per_user/keys?limit=1"
            ))
            .timeout(Duration::from_secs(2))
            .send()
            .ok()
            .and_then(|r| r.json::<serde_json::Value>().ok());
        if listed.is_some_and(|body| body["items"].as_array().is_some_and(|i| !i.is_empty())) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the demo did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let output = Command::new(schemathesis())
        .args(["run", &format!("{base}/openapi.json")])
        .args(["--max-examples", "50", "--checks", "all"])
        .args(["--exclude-checks", "positive_data_acceptance"])
        .args(["--request-timeout", "5", "--generation-deterministic"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); ./scripts/setup.sh --tests installs it",
                schemathesis()
            )
        });
    let _ = demo.kill();
    let _ = demo.wait();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // It did test every operation.
    assert!(stdout.contains("Tested: 6"), "{stdout}");
}
