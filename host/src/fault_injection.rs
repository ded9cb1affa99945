//! Failure injection for the tests, compiled in but inert: with
//! `WAGG_FAULT_PANIC=<thread name>` in the environment, that thread panics
//! the first time it passes a fault point (the test that a dead internal
//! thread stops the process uses it); with `WAGG_FAULT_CRASH=<point>`, the
//! process aborts at that crash point, as abruptly as `kill -9` (the tests
//! of steps that must survive a crash between them use it); with
//! `WAGG_FAULT_DELAY=<point>:<milliseconds>`, every pass through that point
//! sleeps that long (to watch a step that is otherwise too quick to see
//! half-done). Otherwise a
//! fault point is one read of a cached value. Imports nothing, so any layer
//! may call it.

use std::sync::OnceLock;

/// The value of the environment variable `name`, read once into `cell`.
fn injected(cell: &'static OnceLock<Option<String>>, name: &str) -> Option<&'static str> {
    cell.get_or_init(|| std::env::var(name).ok()).as_deref()
}

/// Panics if `WAGG_FAULT_PANIC` names `thread`.
pub fn fault_point(thread: &str) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    if injected(&TARGET, "WAGG_FAULT_PANIC") == Some(thread) {
        panic!("injected fault (WAGG_FAULT_PANIC={thread})");
    }
}

/// Aborts the process (no destructors, no flushing) if `WAGG_FAULT_CRASH`
/// names `point`.
pub fn crash_point(point: &str) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    if injected(&TARGET, "WAGG_FAULT_CRASH") == Some(point) {
        eprintln!("injected crash (WAGG_FAULT_CRASH={point})");
        std::process::abort();
    }
}

/// Sleeps if `WAGG_FAULT_DELAY` names `point` (`<point>:<milliseconds>`).
pub fn delay_point(point: &str) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    if let Some((target, ms)) =
        injected(&TARGET, "WAGG_FAULT_DELAY").and_then(|v| v.split_once(':'))
        && target == point
        && let Ok(ms) = ms.parse::<u64>()
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
