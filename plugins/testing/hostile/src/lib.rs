//! A misbehaving plugin for the host's isolation tests; never use it for
//! real. `params.mode` picks the misbehaviour, triggered by every record
//! whose value is `"bad"` (other records are counted normally):
//! `loop`, `alloc`, `recurse`, `panic`, `error`, `open-file`, `env`,
//! `connect`, `huge-state`, `sleep` (10 s through WASI's clocks), `clock`
//! (keeps the wall clock's seconds and a hash keyed by the random source),
//! `slow-render` (rendering takes a few hundred milliseconds), `slow`
//! (every record costs `spin` loop iterations; not a misbehaviour).
//! `headers` is not a misbehaviour: it keeps the names of every header it
//! sees, in `names`, for the tests of hostile header names.

use std::hint::black_box;

use serde::{Deserialize, Serialize};
use wagg_guest_sdk::{Aggregation, Record, Result, bail};

pub struct Hostile;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub mode: String,
    /// For `connect`: where to try to connect.
    pub address: Option<String>,
    /// For `slow`: busy-loop iterations per record.
    pub spin: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub count: u64,
    pub blob: Vec<u8>,
    pub names: Vec<String>,
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let padding = black_box([depth; 64]);
    black_box(recurse(depth + 1)) + padding[3]
}

impl Aggregation for Hostile {
    const NAME: &'static str = "hostile";
    type State = State;
    type Params = Params;

    /// `slow-render`: rendering spins for a while (a few hundred
    /// milliseconds), for the tests of request timeouts.
    fn render(state: &State, params: &Params) -> Result<serde_json::Value> {
        if params.mode == "slow-render" {
            let mut x = 0u64;
            for i in 0..300_000_000u64 {
                x = black_box(x.wrapping_add(i));
            }
            black_box(x);
        }
        Ok(serde_json::to_value(state)?)
    }

    fn aggregate(state: &mut State, record: &Record<'_>, params: &Params) -> Result<()> {
        state.count += 1;
        if params.mode == "slow" {
            // Every record costs time: a pace-setter for the crash test,
            // so that the kills land while a backlog is being applied.
            let mut x = 0u64;
            for i in 0..params.spin.unwrap_or(100_000) {
                x = black_box(x.wrapping_add(i));
            }
            black_box(x);
            return Ok(());
        }
        if params.mode == "headers" {
            for (name, _) in record.headers().iter() {
                if !state.names.iter().any(|n| n == name) {
                    state.names.push(name.to_owned());
                }
            }
            return Ok(());
        }
        if record.value() != Some(b"bad".as_slice()) {
            return Ok(());
        }
        match params.mode.as_str() {
            "loop" => {
                let mut i = 0u64;
                loop {
                    i = black_box(i.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "recurse" => {
                black_box(recurse(0));
            }
            "panic" => panic!("hostile plugin panicked on offset {}", record.offset()),
            "error" => bail!("hostile plugin rejected offset {}", record.offset()),
            "open-file" => match std::fs::read("/etc/hostname") {
                Ok(bytes) => state.blob = bytes,
                Err(e) => bail!("could not read /etc/hostname: {e}"),
            },
            "env" => {
                let vars: Vec<_> = std::env::vars().collect();
                if !vars.is_empty() {
                    state.blob = format!("{vars:?}").into_bytes();
                }
            }
            "connect" => {
                let address = params.address.as_deref().unwrap_or("127.0.0.1:9");
                match std::net::TcpStream::connect(address) {
                    Ok(_) => state.blob = b"connected".to_vec(),
                    Err(e) => bail!("could not connect to {address}: {e}"),
                }
            }
            "huge-state" => state.blob = vec![7; 4 << 20],
            "sleep" => std::thread::sleep(std::time::Duration::from_secs(10)),
            "clock" => {
                let wall = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let random = std::collections::hash_map::RandomState::new();
                let hashed = std::hash::BuildHasher::hash_one(&random, 42u64);
                state.blob = format!("{wall} {hashed}").into_bytes();
            }
            other => bail!("unknown mode {other}"),
        }
        Ok(())
    }
}

wagg_guest_sdk::export_aggregation!(Hostile);
