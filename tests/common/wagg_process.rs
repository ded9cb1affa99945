//! The real `wagg` binary, run with a config in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Wagg {
    child: Option<Child>,
    pub http: String,
    pub dir: PathBuf,
}

impl Wagg {
    /// Writes `config` to `dir/wagg.toml` and starts `wagg run` on it; waits
    /// until `/healthz` answers.
    pub fn start(dir: &Path, config: &str, http_port: u16) -> Wagg {
        Self::start_with(dir, config, http_port, |_| {})
    }

    /// Like [`Wagg::start`], with extra environment variables.
    #[allow(dead_code)]
    pub fn start_with_env(dir: &Path, config: &str, http_port: u16, env: &[(&str, &str)]) -> Wagg {
        Self::spawn_with_env(dir, config, http_port, env).serving()
    }

    /// Starts `wagg run` with extra environment variables, without waiting
    /// for it to serve (for a process expected to stop before it does).
    #[allow(dead_code)]
    pub fn spawn_with_env(dir: &Path, config: &str, http_port: u16, env: &[(&str, &str)]) -> Wagg {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Self::spawn(dir, config, http_port, move |command| {
            command.envs(env);
        })
    }

    /// Waits up to `timeout` for the process to exit on its own.
    #[allow(dead_code)]
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Like [`Wagg::start`], with every file the process writes limited to
    /// `bytes` (RLIMIT_FSIZE): writes past it fail with EFBIG, as on a full
    /// disk, even for root (which ignores permissions).
    #[allow(dead_code)]
    pub fn start_with_file_size_limit(
        dir: &Path,
        config: &str,
        http_port: u16,
        bytes: u64,
    ) -> Wagg {
        use std::os::unix::process::CommandExt;
        Self::start_with(dir, config, http_port, move |command| {
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    // Fail the write with EFBIG instead of killing the process.
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let limit = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    }

    fn start_with(
        dir: &Path,
        config: &str,
        http_port: u16,
        customize: impl FnOnce(&mut Command),
    ) -> Wagg {
        Self::spawn(dir, config, http_port, customize).serving()
    }

    /// Waits until `/healthz` answers.
    fn serving(self) -> Wagg {
        let started = Instant::now();
        while self.try_get("/healthz").is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "wagg did not start; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self
    }

    fn spawn(
        dir: &Path,
        config: &str,
        http_port: u16,
        customize: impl FnOnce(&mut Command),
    ) -> Wagg {
        std::fs::write(dir.join("wagg.toml"), config).expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("wagg.log"))
            .expect("log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_wagg"));
        command
            .args(["run", "--config"])
            .arg(dir.join("wagg.toml"))
            .args(["--progress-interval-secs", "1"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        customize(&mut command);
        let child = command.spawn().expect("start wagg");
        Wagg {
            child: Some(child),
            http: format!("http://127.0.0.1:{http_port}"),
            dir: dir.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("wagg.log")).unwrap_or_default()
    }

    /// `GET /metrics` as `series → value` (`name{labels}` as exposed).
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        let response = reqwest::blocking::Client::new()
            .get(format!("{}/metrics", self.http))
            .timeout(Duration::from_secs(10))
            .send()
            .unwrap_or_else(|e| panic!("GET /metrics failed: {e}; log:\n{}", self.log()));
        assert_eq!(response.status().as_u16(), 200);
        let text = response.text().expect("metrics text");
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics: {text}");
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("series value");
                (series.to_owned(), value.parse().expect("number"))
            })
            .collect()
    }

    /// A POST with a JSON body (admin requests), answered or a panic.
    #[allow(dead_code)]
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = reqwest::blocking::Client::new()
            .post(format!("{}{path}", self.http))
            .json(body)
            .timeout(Duration::from_secs(120))
            .send()
            .unwrap_or_else(|e| panic!("POST {path} failed: {e}; log:\n{}", self.log()));
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// Runs the `wagg` CLI (`reload`, `reset`, `diff`, ...) against this
    /// instance's HTTP address; its success and output.
    #[allow(dead_code)]
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_wagg"))
            .args(args)
            .args(["--url", &self.http])
            .output()
            .expect("run the wagg CLI");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// Rewrites the config file this instance was started with (for a
    /// reload).
    #[allow(dead_code)]
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(self.dir.join("wagg.toml"), config).expect("write config");
    }

    fn try_get(&self, path: &str) -> Option<(u16, Value)> {
        let response = reqwest::blocking::Client::new()
            .get(format!("{}{path}", self.http))
            .timeout(Duration::from_secs(10))
            .send()
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().unwrap_or(Value::Null)))
    }

    /// A GET that must be answered: a busy instance gets three tries, a
    /// process that exited fails at once.
    pub fn get(&self, path: &str) -> (u16, Value) {
        for _ in 0..3 {
            if let Some(answer) = self.try_get(path) {
                return answer;
            }
            if !self.is_running() {
                panic!("GET {path}: wagg has exited; log:\n{}", self.log());
            }
        }
        panic!("GET {path} failed three times; log:\n{}", self.log())
    }

    /// The process exists and is not a zombie (it is only reaped on drop).
    fn is_running(&self) -> bool {
        self.child.as_ref().is_some_and(|child| {
            std::fs::read_to_string(format!("/proc/{}/stat", child.id())).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            })
        })
    }

    /// Records applied by each aggregation, by name.
    pub fn applied(&self) -> std::collections::BTreeMap<String, u64> {
        let (_, body) = self.get("/v1/aggregations");
        body["aggregations"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|a| {
                        (
                            a["name"].as_str().unwrap_or_default().to_owned(),
                            a["records_applied"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until every aggregation has applied the expected number of
    /// records (and not more).
    pub fn wait_for(&self, expected: &std::collections::BTreeMap<String, u64>, timeout: Duration) {
        let started = Instant::now();
        loop {
            let applied = self.applied();
            for (name, want) in expected {
                let got = applied.get(name).copied().unwrap_or(0);
                assert!(
                    got <= *want,
                    "{name} applied {got} records, more than the {want} produced"
                );
            }
            if &applied == expected {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "not caught up after {timeout:?}: {applied:?} != {expected:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every key of an aggregation with its rendered state, paging through
    /// the listing endpoint.
    pub fn all_states(&self, aggregation: &str) -> std::collections::BTreeMap<String, Value> {
        let mut out = std::collections::BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/v1/aggregations/{aggregation}/keys?limit=1000");
            if let Some(after) = &after {
                path.push_str(&format!("&after={}", urlencode(after)));
            }
            let (status, body) = self.get(&path);
            assert_eq!(status, 200, "{path}: {body}");
            for item in body["items"].as_array().expect("items") {
                out.insert(
                    item["key"].as_str().expect("key").to_owned(),
                    item["state"].clone(),
                );
            }
            match body["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return out,
            }
        }
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`, …) to the running process.
    #[allow(dead_code)]
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{signal} failed");
    }

    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("wagg did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Wagg {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
