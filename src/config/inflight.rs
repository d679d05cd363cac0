//! The cap on verifications in flight: beyond it, 503 `overloaded` at once.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A non-blocking counting semaphore: beyond `max`, callers are turned away, not queued.
pub(crate) struct Inflight {
    max: usize,
    now: AtomicUsize,
}

impl Inflight {
    /// At most `max` at once.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            now: AtomicUsize::new(0),
        }
    }
}

/// One slot of an [`Inflight`], given back on drop.
pub(crate) struct InflightPermit<'a>(&'a AtomicUsize);

impl Inflight {
    pub(crate) fn try_acquire(&self) -> Option<InflightPermit<'_>> {
        let taken = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then(|| n + 1)
            })
            .is_ok();
        // `then`, not `then_some`: a permit built eagerly and dropped would give back a slot
        // it never took.
        taken.then(|| InflightPermit(&self.now))
    }
}

impl Drop for InflightPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
