//! Counting heap allocations, for `wagg bench engine`'s "allocations per
//! record": the binary's global allocator is a [`CountingAllocator`] around
//! mimalloc, which counts only while a [`measure`] call runs (otherwise it
//! costs one relaxed load of a flag that never changes).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// A global allocator that counts allocations (and reallocations) made
/// through `A` while [`measure`] runs.
pub struct CountingAllocator<A>(pub A);

fn count() {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the wrapped allocator, which
// upholds `GlobalAlloc`'s contract; counting touches only atomics.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAllocator<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's guarantees for `layout` are passed on.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (so from `A`) with `layout`.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as for `dealloc`, and the caller's guarantees for
        // `new_size` are passed on.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns its result with the number of allocations made
/// meanwhile by every thread (0 when the global allocator is not a
/// [`CountingAllocator`], as in unit tests). Not reentrant.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.store(true, Ordering::SeqCst);
    let result = f();
    COUNTING.store(false, Ordering::SeqCst);
    (result, ALLOCATIONS.load(Ordering::Relaxed) - before)
}

/// Whether allocations are being counted at all (the binary's allocator is
/// a [`CountingAllocator`]): checked by allocating once under [`measure`].
pub fn available() -> bool {
    let ((), counted) = measure(|| drop(std::hint::black_box(Box::new(0u64))));
    counted > 0
}
