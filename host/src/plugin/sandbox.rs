//! What a plugin sees of the world beyond its call: nothing it could wait
//! on, and nothing that differs between a run and its replay.
//!
//! The WASI context already denies files, sockets, environment variables
//! and arguments. Left alone, it would still give real clocks and timers: a
//! plugin blocking on a `wasi:clocks` pollable sleeps *inside a host call*,
//! where epoch interruption (the call budget) never fires, stalling the
//! consumer thread or an HTTP worker. So:
//! - both clocks are frozen: the wall clock always reads [`FROZEN_WALL_CLOCK`]
//!   and the monotonic clock always reads 0 (event time belongs to the
//!   records: `Record::timestamp`);
//! - a timer for a later time (`subscribe-duration` > 0, `subscribe-instant`
//!   after now) traps at once with a message saying so, and the record is
//!   handled by `on_error` like any other trap (a zero or past timer is
//!   ready at once);
//! - randomness is a fixed-seed generator, reseeded before every call, so
//!   a call's result depends only on its input: replaying a batch after a
//!   crash computes the same states.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiView};

/// What the wall clock reads inside a plugin: 2000-01-01T00:00:00Z, an
/// obviously fixed instant rather than the epoch's zero.
pub const FROZEN_WALL_CLOCK: Duration = Duration::from_secs(946_684_800);

/// The seed every call's random generator starts from.
const SEED: u64 = 0x7761_6767_7761_6767; // "waggwagg"

/// The `wasi:clocks/monotonic-clock` instance whose timers are replaced.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

pub struct FrozenWallClock;

impl HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        FROZEN_WALL_CLOCK
    }
}

pub struct FrozenMonotonicClock;

impl HostMonotonicClock for FrozenMonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        0
    }
}

/// A seeded generator the host can reseed between calls (the WASI context
/// owns its generator, so it gets a handle to this one).
#[derive(Clone)]
pub struct ReseedableRng(Arc<Mutex<StdRng>>);

impl ReseedableRng {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(StdRng::seed_from_u64(SEED))))
    }

    /// Starts the sequence over: the next call sees the same numbers as
    /// every other call.
    pub fn reseed(&self) {
        *self.lock() = StdRng::seed_from_u64(SEED);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StdRng> {
        // A generator is valid in any state: a poisoned one is still usable.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl rand::TryRng for ReseedableRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        self.lock().try_next_u32()
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.lock().try_next_u64()
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.lock().try_fill_bytes(dst)
    }
}

/// A timer that has already fired.
struct Fired;

#[wasmtime_wasi::async_trait]
impl Pollable for Fired {
    async fn ready(&mut self) {}
}

/// Replaces the monotonic clock's timers in `linker` (which already has
/// WASI): a wait for later traps, a zero wait is ready at once.
pub fn deny_timers<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |store: StoreContextMut<'_, T>, (nanos,): (u64,)| fired_unless_later(store, nanos),
    )?;
    clock.func_wrap(
        "subscribe-instant",
        // The monotonic clock reads 0, so an instant is also a duration.
        |store: StoreContextMut<'_, T>, (when,): (u64,)| fired_unless_later(store, when),
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn fired_unless_later<T: WasiView>(
    mut store: StoreContextMut<'_, T>,
    nanos_from_now: u64,
) -> wasmtime::Result<(Resource<DynPollable>,)> {
    if nanos_from_now > 0 {
        wasmtime::bail!(
            "the plugin tried to wait {:?} (a sleep or timer through wasi:clocks); plugins cannot wait: time does not pass inside a call, use record timestamps instead",
            Duration::from_nanos(nanos_from_now)
        );
    }
    let table = store.data_mut().ctx().table;
    let fired = table.push(Fired)?;
    Ok((subscribe(table, fired)?,))
}
