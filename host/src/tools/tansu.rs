//! The test broker, tansu (a Kafka-API broker written in Rust), as a child
//! process on a free loopback port: `wagg bench e2e` starts one when no
//! brokers are given, and the integration tests start one per test.
//!
//! Storage: `memory://` loses records when a fetch starts mid-batch and
//! reports wrong high watermarks, so anything that seeks, restarts or
//! rebalances needs `sqlite://` (BENCHMARKS.md and ARCHITECTURE.md list
//! how tansu differs from Apache Kafka). tansu 0.6's SQLite schema has no
//! index on the record headers, so every fetched record scans them all:
//! fetches slow down with the square of the records with headers (the
//! changelogs), until the broker answers nothing else for a minute. The
//! broker started here gets that index.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a starting broker may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The index tansu's `header` table lacks (its rows are looked up by
/// record).
const HEADER_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS wagg_header_record ON header (topition, offset_id)";

/// The tansu binary: `explicit`, `$WAGG_TANSU`, the cache
/// `scripts/setup.sh --broker` installs into, or `tansu` on the PATH.
pub fn tansu_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_owned();
    }
    if let Some(path) = std::env::var_os("WAGG_TANSU") {
        return path.into();
    }
    match super::cache_dir().map(|c| c.join("tansu/bin/tansu")) {
        Some(cached) if cached.exists() => cached,
        _ => PathBuf::from("tansu"),
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running tansu broker, killed when dropped (its data stays in `dir`).
pub struct Tansu {
    child: Child,
    binary: PathBuf,
    address: String,
    dir: PathBuf,
    storage: String,
}

impl Tansu {
    /// Starts a broker on a free port with its working directory (and its
    /// log, `tansu.log`) in `dir`; `storage` is tansu's `--storage-engine`
    /// (relative paths are under `dir`). Returns once it listens.
    pub fn start(binary: &Path, dir: &Path, storage: &str) -> anyhow::Result<Self> {
        let address = format!("127.0.0.1:{}", free_port()?);
        let child = spawn(binary, &address, dir, storage)?;
        Ok(Self {
            child,
            binary: binary.to_owned(),
            address,
            dir: dir.to_owned(),
            storage: storage.to_owned(),
        })
    }

    /// `host:port`, for `bootstrap.servers`.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Kills the broker (its data stays on disk).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker again on the same address and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.child = spawn(&self.binary, &self.address, &self.dir, &self.storage)?;
        Ok(())
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(binary: &Path, address: &str, dir: &Path, storage: &str) -> anyhow::Result<Child> {
    let log_path = dir.join("tansu.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening the broker log {}", log_path.display()))?;
    let mut child = Command::new(binary)
        .arg("broker")
        .args(["--listener-url", &format!("tcp://{address}")])
        .args(["--advertised-listener-url", &format!("tcp://{address}")])
        .args(["--storage-engine", storage])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start the test broker {}: install it with `scripts/setup.sh --broker`, set WAGG_TANSU, or pass --brokers",
                binary.display()
            )
        })?;
    let started = Instant::now();
    while TcpStream::connect(address).is_err() {
        if started.elapsed() > START_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "tansu did not start listening on {address} within {START_TIMEOUT:?} (its log: {})",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(db) = sqlite_path(dir, storage) {
        index_headers(&db).with_context(|| {
            format!(
                "adding the header index to the test broker's database {}",
                db.display()
            )
        })?;
    }
    Ok(child)
}

/// The database file of a `sqlite://` storage URL (relative to `dir`;
/// `sqlite:////abs/path` is absolute).
fn sqlite_path(dir: &Path, storage: &str) -> Option<PathBuf> {
    let rest = storage.strip_prefix("sqlite://")?;
    let path = rest.strip_prefix('/').unwrap_or(rest);
    Some(dir.join(path))
}

/// Adds [`HEADER_INDEX`] once tansu has made its schema (before it
/// listens, as far as seen; waited for anyway).
fn index_headers(db: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let connection = rusqlite::Connection::open(db)?;
        connection.busy_timeout(Duration::from_secs(10))?;
        match connection.execute(HEADER_INDEX, []) {
            Ok(_) => return Ok(()),
            Err(e)
                if e.to_string().contains("no such table") && started.elapsed() < START_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
