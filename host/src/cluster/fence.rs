//! Fencing a deposed owner (a "zombie"): an instance paused past its
//! session timeout still believes it owns its partitions when it wakes,
//! and may flush before it hears of the rebalance. Without transactions the
//! broker cannot refuse its writes, so the owner checks after each flush:
//! once its commits are acknowledged, it reads the tail of each commits
//! partition, and a higher epoch there means another instance claimed the
//! partition first. The owner then stops before writing the flush locally,
//! and the process exits with that error.
//!
//! So a zombie gets at most one commit in after the claim that deposed it,
//! which keeps the newest claim within the window that take-overs read
//! (`takeover::COMMIT_WINDOW`), and the next claim's epoch above every
//! epoch written: `(epoch, seq)` names one flush (docs/guarantees.md).

use std::collections::HashMap;
use std::time::Duration;

use super::log::Commit;
use super::takeover::commit_window;
use super::{Cluster, ClusterError};

impl Cluster {
    /// Returns `Deposed` if another owner claimed one of the partitions of
    /// `commits` (this instance's newest, acknowledged) with a higher
    /// epoch. Broker trouble is retried until shutdown.
    pub(super) fn fence(
        &self,
        commits: &HashMap<(String, i32), Commit>,
    ) -> Result<(), ClusterError> {
        let partitions: Vec<(String, i32)> = commits.keys().cloned().collect();
        let mut backoff = Duration::from_millis(200);
        let started = std::time::Instant::now();
        loop {
            match self.highest_epochs(&partitions, commit_window(&partitions)) {
                Ok(highest) => {
                    tracing::debug!(
                        partitions = partitions.len(),
                        seconds = started.elapsed().as_secs_f64(),
                        "checked the commits after a flush"
                    );
                    for ((topic, partition), commit) in commits {
                        let newer = highest
                            .get(&(topic.clone(), *partition))
                            .copied()
                            .unwrap_or(0);
                        if newer > commit.epoch {
                            // Serving on would mean answering for
                            // partitions another instance owns: the process
                            // stops, and a supervisor's restart re-joins.
                            self.deposed
                                .store(true, std::sync::atomic::Ordering::Release);
                            self.request_shutdown();
                            return Err(ClusterError::Deposed {
                                topic: topic.clone(),
                                partition: *partition,
                                epoch: commit.epoch,
                                newer,
                            });
                        }
                    }
                    return Ok(());
                }
                Err(error)
                    if error.is_broker_trouble()
                        || matches!(error, ClusterError::Client { .. }) =>
                {
                    tracing::warn!(%error, "checking the commits after a flush failed; retrying");
                    if self.shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                        return Err(ClusterError::Interrupted);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Refuses to publish once this instance has been deposed.
    pub(super) fn check_not_deposed(&self) -> Result<(), ClusterError> {
        if self.deposed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ClusterError::Fenced);
        }
        Ok(())
    }

    /// The highest epoch among the last `window` commit records of each
    /// partition, with a reader kept between calls (dropped on an error,
    /// so the next call starts with a fresh one).
    fn highest_epochs(
        &self,
        partitions: &[(String, i32)],
        window: i64,
    ) -> Result<HashMap<(String, i32), u64>, ClusterError> {
        let mut reader = self.fence_reader.lock().unwrap_or_else(|p| p.into_inner());
        let current = match reader.take() {
            Some(current) => current,
            None => self.reader()?,
        };
        let found = self.scan_commits(&current, partitions, Some(window))?;
        *reader = Some(current);
        Ok(found
            .into_iter()
            .map(|(partition, (_, max_epoch))| (partition, max_epoch))
            .collect())
    }
}
