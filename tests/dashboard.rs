//! The dashboard at `/` in headless Chromium against the running demo:
//! - driven like a person (playwright-core: pick an aggregation, type a key,
//!   press Enter), it shows the state the API serves for that key, loads
//!   nothing from outside the instance, and leaves a screenshot as a test
//!   artifact in `<target>/test-artifacts/dashboard.png`;
//! - a link with `?aggregation=&key=` opens with that lookup done (checked
//!   on the DOM Chromium renders, without any driver).

mod common;

use std::process::Command;

fn chromium() -> String {
    std::env::var("WAGG_CHROMIUM").unwrap_or_else(|_| "chromium".to_owned())
}

fn headless(args: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().expect("profile dir");
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); ./scripts/setup.sh --tests installs it",
                chromium()
            )
        })
}

#[test]
fn a_lookup_link_opens_with_the_state_shown() {
    let demo = common::demo::Demo::start();
    let (base, key) = (&demo.base, &demo.first_key);
    let before = demo.count("purchases_per_user", key);

    let page = format!("{base}/?aggregation=purchases_per_user&key={key}");
    let dom = headless(&["--virtual-time-budget=5000", "--dump-dom"], &page);
    let html = String::from_utf8_lossy(&dom.stdout);
    // The aggregations table and the looked-up state were rendered.
    assert!(html.contains("top_items_per_user"), "{html}");
    let shown = html
        .split("<pre id=\"state\"")
        .nth(1)
        .and_then(|rest| rest.split_once('>'))
        .and_then(|(_, rest)| rest.split_once("</pre>"))
        .map(|(text, _)| text.to_owned())
        .unwrap_or_else(|| panic!("no state box in the page:\n{html}"));
    let state: serde_json::Value = serde_json::from_str(&shown)
        .unwrap_or_else(|e| panic!("the state box does not hold JSON ({e}): {shown:?}"));
    let count = state["count"].as_u64().expect("the count is shown");
    // The demo keeps producing: the shown count is the API's, or newer.
    assert!(
        count >= before,
        "shown {count}, the API said {before} just before"
    );
}

#[test]
fn a_person_can_look_a_key_up_and_see_its_state() {
    let demo = common::demo::Demo::start();
    let (base, key) = (&demo.base, &demo.first_key);
    let before = demo.count("spend_per_user", key);

    let artifacts = common::target_dir().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifact dir");
    let screenshot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let node_path = playwright_path();
    let script = common::workspace_root().join("tests/support/dashboard-lookup.js");
    let output = Command::new("node")
        .arg(&script)
        .args([base.as_str(), "spend_per_user", key.as_str()])
        .arg(&screenshot)
        .env("NODE_PATH", &node_path)
        .env("WAGG_CHROMIUM", chromium_path())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run node ({e}); ./scripts/setup.sh --tests installs it")
        });
    assert!(
        output.status.success(),
        "the browser session failed (playwright-core from {node_path}):\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("the script reports JSON");
    assert_eq!(report["aggregations"], 5, "{report}");
    assert_eq!(report["external"], serde_json::json!([]), "{report}");
    assert_eq!(report["failed"], serde_json::json!([]), "{report}");
    // The chart has a line per aggregation, named with its current rate;
    // the demo applies records to every one of them.
    let legend: Vec<&str> = report["legend"]
        .as_array()
        .expect("legend entries")
        .iter()
        .filter_map(|entry| entry.as_str())
        .collect();
    assert_eq!(legend.len(), 5, "{report}");
    for entry in &legend {
        let rate: f64 = entry
            .strip_suffix(" /s")
            .and_then(|rest| rest.rsplit(' ').next())
            .map(|n| n.replace(',', ""))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{entry:?} is not `NAME RATE /s`"));
        assert!(rate > 0.0, "{entry:?}: the demo is producing");
    }
    let shown: serde_json::Value =
        serde_json::from_str(report["shown"].as_str().expect("the state box's text"))
            .unwrap_or_else(|e| panic!("the state box does not hold JSON ({e}): {report}"));
    // The demo keeps producing: what the page shows is the API's state, or
    // newer; and it is the stats plugin's rendering of it.
    let count = shown["count"].as_u64().expect("the count is shown");
    assert!(
        count >= before,
        "shown {count}, the API said {before} just before"
    );
    for field in ["min", "max", "mean", "variance"] {
        assert!(shown[field].is_number(), "{field} missing: {shown}");
    }

    let png = std::fs::read(&screenshot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", screenshot.display());
}

/// The key view follows the key live: the count on the page rises while
/// the demo produces, with no reload (the page reads the key's watch
/// stream).
#[test]
fn the_key_view_updates_live_without_a_reload() {
    let demo = common::demo::Demo::start();
    let (base, key) = (&demo.base, &demo.first_key);
    let output = Command::new("node")
        .arg(common::workspace_root().join("tests/support/dashboard-live.js"))
        .args([base.as_str(), "purchases_per_user", key.as_str()])
        .env("NODE_PATH", playwright_path())
        .env("WAGG_CHROMIUM", chromium_path())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run node ({e}); ./scripts/setup.sh --tests installs it")
        });
    assert!(
        output.status.success(),
        "the browser session failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("the script reports JSON");
    let (before, after) = (
        report["before"].as_u64().expect("a count shown first"),
        report["after"].as_u64().expect("a count shown later"),
    );
    assert!(after > before, "{report}");
    assert!(report["updates"].as_u64() >= Some(2), "{report}");
    assert_eq!(report["navigations"], 1, "the page was reloaded: {report}");
    assert_eq!(report["live"], "● live", "{report}");
    // What the page shows is what the API serves, or older.
    assert!(after <= demo.count("purchases_per_user", key), "{report}");
    eprintln!("dashboard live: {report}");
}

fn playwright_path() -> String {
    std::env::var("WAGG_PLAYWRIGHT").unwrap_or_else(|_| {
        format!(
            "{}/.cache/wagg/playwright/node_modules",
            std::env::var("HOME").unwrap_or_default()
        )
    })
}

/// The browser executable itself: playwright passes it flags directly.
fn chromium_path() -> String {
    let name = chromium();
    let found = Command::new("bash")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if found.is_empty() { name } else { found }
}
