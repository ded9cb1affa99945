//! The dashboard at `/` in headless Chromium against the running demo: the
//! page loads with no external assets, looks a key up (through its own
//! lookup code, driven by `?aggregation=&key=`), and shows the state the
//! API serves for that key. A screenshot is kept as a test artifact in
//! `<target>/test-artifacts/dashboard.png`.

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
fn the_dashboard_looks_a_key_up_and_shows_its_state() {
    let demo = common::demo::Demo::start();
    let (base, key) = (&demo.base, &demo.first_key);
    let before = demo
        .get(&format!("/v1/aggregations/purchases_per_user/keys/{key}"))
        .expect("the API answers")["state"]["count"]
        .as_u64()
        .expect("a count");

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

    let artifacts = common::target_dir().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifact dir");
    let screenshot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    headless(
        &[
            "--virtual-time-budget=5000",
            "--window-size=1200,1000",
            &format!("--screenshot={}", screenshot.display()),
        ],
        &page,
    );
    drop(demo);
    let png = std::fs::read(&screenshot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", screenshot.display());
}
