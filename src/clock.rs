//! Time source for validity windows and nonce expiry, injectable for tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current Unix time in seconds.
///
/// The verifier compares `validAfter`/`validBefore` with it and the nonce stores use it to
/// evict expired reservations. Tests use [`FixedClock`] instead of sleeping.
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
}

/// The system wall clock. Keep it NTP-synced: the chain judges validity by block time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        // A clock before 1970 is a broken host; 0 makes every authorization look not yet valid.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// ```
/// use tower_x402::clock::{Clock, FixedClock};
/// let clock = FixedClock::new(1_700_000_000);
/// clock.advance(5);
/// assert_eq!(clock.now(), 1_700_000_005);
/// ```
#[derive(Debug, Clone, Default)]
pub struct FixedClock(Arc<AtomicU64>);

impl FixedClock {
    /// A clock stopped at `now` (Unix seconds).
    pub fn new(now: u64) -> Self {
        Self(Arc::new(AtomicU64::new(now)))
    }

    /// Sets the time.
    pub fn set(&self, now: u64) {
        self.0.store(now, Ordering::SeqCst);
    }

    /// Moves the time forward by `secs`.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for FixedClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> u64 {
        (**self).now()
    }
}
