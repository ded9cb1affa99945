//! A panic on one of wagg's own threads stops the process.
//!
//! A thread that dies silently (the source, the applier, the writer, the
//! standby or membership threads) would leave an instance that answers
//! `/healthz` and `/readyz` while nothing is consumed. Instead, a panic on
//! any thread named `wagg-*` (except the HTTP workers, whose panics tokio
//! confines to one request) marks the instance failed (`/healthz` 503 with
//! the reason) and asks it to shut down; `app::run` then returns the panic
//! as its error, so the process exits non-zero and a supervisor restarts
//! it. Nothing is lost: what was applied but not written is read again
//! from the stored offsets. (`crate::fault_injection` makes one happen in
//! the tests.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};

use super::status::Status;

/// What a running instance hands to the hook.
struct Watched {
    status: Arc<Status>,
    shutdown: Arc<AtomicBool>,
    reason: Arc<OnceLock<String>>,
}

static WATCHED: Mutex<Vec<Watched>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

/// Registered while alive: panics on wagg's threads fail this instance.
pub struct PanicWatch {
    reason: Arc<OnceLock<String>>,
}

impl PanicWatch {
    pub fn start(status: Arc<Status>, shutdown: Arc<AtomicBool>) -> Self {
        INSTALL.call_once(install_hook);
        let reason = Arc::new(OnceLock::new());
        lock().push(Watched {
            status,
            shutdown,
            reason: reason.clone(),
        });
        Self { reason }
    }

    /// The first panic seen, as `thread NAME panicked: MESSAGE`.
    pub fn panicked(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }
}

impl Drop for PanicWatch {
    fn drop(&mut self) {
        lock().retain(|w| !Arc::ptr_eq(&w.reason, &self.reason));
    }
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Watched>> {
    // Only pushes and retains happen under the lock: a poisoned vector is
    // still whole.
    WATCHED.lock().unwrap_or_else(|p| p.into_inner())
}

fn install_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let thread = std::thread::current();
        let Some(name) = thread.name().filter(|n| is_watched_thread(n)) else {
            return;
        };
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let reason = format!("thread {name} panicked{location}: {message}");
        tracing::error!(%reason, "an internal thread died; stopping so that a supervisor restarts wagg");
        for watched in lock().iter() {
            watched.status.set_fatal(reason.clone());
            let _ = watched.reason.set(reason.clone());
            watched.shutdown.store(true, Ordering::Relaxed);
        }
    }));
}

fn is_watched_thread(name: &str) -> bool {
    name.starts_with("wagg-") && name != "wagg-http"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_on_a_wagg_thread_fails_the_instance_and_asks_for_shutdown() {
        let status = Arc::new(Status::default());
        let shutdown = Arc::new(AtomicBool::new(false));
        let watch = PanicWatch::start(status.clone(), shutdown.clone());
        let other = std::thread::Builder::new()
            .name("not-ours".into())
            .spawn(|| panic!("elsewhere"))
            .expect("thread");
        assert!(other.join().is_err());
        assert!(watch.panicked().is_none(), "only wagg-* threads count");
        let ours = std::thread::Builder::new()
            .name("wagg-writer".into())
            .spawn(|| panic!("disk on fire"))
            .expect("thread");
        assert!(ours.join().is_err());
        let reason = watch.panicked().expect("recorded");
        assert!(
            reason.starts_with("thread wagg-writer panicked"),
            "{reason}"
        );
        assert!(reason.ends_with("disk on fire"), "{reason}");
        assert!(shutdown.load(Ordering::Relaxed));
        assert_eq!(status.fatal().as_deref(), Some(reason));
    }
}
