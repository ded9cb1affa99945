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

use std::process::Command;

fn schemathesis() -> String {
    std::env::var("WAGG_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".to_owned())
}

#[test]
fn responses_conform_to_the_served_openapi_document() {
    let demo = common::demo::Demo::start();
    let base = &demo.base;
    let output = Command::new(schemathesis())
        .args(["run", &format!("{base}/openapi.json")])
        .args(["--max-examples", "50", "--checks", "all"])
        .args(["--exclude-checks", "positive_data_acceptance"])
        // Live subscriptions never end by themselves (tests/watch.rs).
        .args(["--exclude-path-regex", "/(watch|changes)$"])
        .args(["--request-timeout", "5", "--generation-deterministic"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); ./scripts/setup.sh --tests installs it",
                schemathesis()
            )
        });
    drop(demo);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // It did test every operation.
    assert!(stdout.contains("Tested: 9"), "{stdout}");
}
