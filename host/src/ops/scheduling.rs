//! Queries first: two settings for a lookup arriving while ingestion
//! saturates the cores.
//!
//! - No transparent huge pages. With them, whole threads stalled for tens
//!   of milliseconds at a time (most likely faulting in 2 MiB pages the
//!   allocator had asked for); lookups during unpaced ingestion went from
//!   p99.9 27-40 ms to 5-8 ms without them (BENCHMARKS.md, "Queries
//!   first"). This is the one that measurably helped.
//! - The threads that ingest run at a lower CPU priority than the ones
//!   that answer queries, so that when both want a core the scheduler
//!   favours the lookup. On two cores shared with the broker this alone
//!   stayed within the noise; it costs nothing measurable.
//!
//! Linux keeps a nice value per thread and a new thread inherits its
//! creator's. `app::run` starts the HTTP runtime's threads first, then
//! lowers its own thread with [`lower_this_thread`]: every thread created
//! after that — RocksDB's, librdkafka's, the source, consumer, apply
//! workers and writer — inherits the lower priority, including the
//! libraries' threads wagg cannot name. (Raising a priority needs
//! privileges; lowering does not.)

/// Adds `nice` (0-19) to the calling thread's nice value, and so to every
/// thread it creates from now on.
pub fn lower_this_thread(nice: u8) -> std::io::Result<()> {
    if nice == 0 {
        return Ok(());
    }
    let current = thread_nice()?;
    let target = (current + i32::from(nice)).min(19);
    // SAFETY: setpriority only reads its integer arguments; `who = 0`
    // names the calling thread (Linux applies PRIO_PROCESS per thread).
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, target) };
    if result == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Stops the kernel backing this process's memory with transparent huge
/// pages (and its children's: the setting is inherited).
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory
    // of ours.
    let result = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if result == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's nice value.
pub fn thread_nice() -> std::io::Result<i32> {
    // getpriority returns -1 for nice -1 as well as for an error: errno
    // tells them apart, so clear it first.
    errno::set_errno(errno::Errno(0));
    // SAFETY: as above; getpriority only reads its integer arguments.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let error = std::io::Error::last_os_error();
    if nice == -1 && error.raw_os_error().is_some_and(|code| code != 0) {
        return Err(error);
    }
    Ok(nice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_created_after_lowering_inherit_it_and_earlier_ones_keep_theirs() {
        std::thread::spawn(|| {
            let before = thread_nice().expect("nice");
            let (started_tx, started_rx) = std::sync::mpsc::channel();
            let (check_tx, check_rx) = std::sync::mpsc::channel::<()>();
            let earlier = std::thread::spawn(move || {
                started_tx.send(()).expect("send");
                check_rx.recv().expect("recv");
                thread_nice().expect("nice")
            });
            started_rx.recv().expect("started");
            lower_this_thread(5).expect("lower");
            let later = std::thread::spawn(|| thread_nice().expect("nice"));
            assert_eq!(later.join().expect("join"), (before + 5).min(19));
            check_tx.send(()).expect("send");
            assert_eq!(earlier.join().expect("join"), before);
        })
        .join()
        .expect("test thread");
    }
}
