//! `wagg demo` as a fixture: started on a free loopback port, killed on
//! drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Demo {
    child: Child,
    pub base: String,
    /// A key of `purchases_per_user` that exists once the demo is up.
    pub first_key: String,
}

impl Demo {
    /// Starts the demo and waits until it has state to query.
    pub fn start() -> Self {
        super::plugins();
        let port = super::broker::free_port();
        let base = format!("http://127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_wagg"))
            .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wagg demo");
        let mut demo = Self {
            child,
            base,
            first_key: String::new(),
        };
        let started = Instant::now();
        demo.first_key = loop {
            let first = demo
                .get("/v1/aggregations/purchases_per_user/keys?limit=1")
                .and_then(|body| body["items"][0]["key"].as_str().map(str::to_owned));
            if let Some(key) = first {
                break key;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the demo did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        demo
    }

    /// The `count` field of `key`'s state in `aggregation`, as served now.
    pub fn count(&self, aggregation: &str, key: &str) -> u64 {
        self.get(&format!("/v1/aggregations/{aggregation}/keys/{key}"))
            .expect("the API answers")["state"]["count"]
            .as_u64()
            .expect("a count")
    }

    pub fn get(&self, path: &str) -> Option<serde_json::Value> {
        reqwest::blocking::Client::new()
            .get(format!("{}{path}", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .ok()?
            .json()
            .ok()
    }
}

impl Drop for Demo {
    /// SIGTERM first, so the demo removes its temporary state directory
    /// (≈ 80 MB; a SIGKILL left one behind per test run); SIGKILL if it
    /// has not exited within 10 s.
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
