//! Counters of what an [`OnchainSettler`](super::OnchainSettler) did: the raw numbers of the
//! unit economics (gas per payment, settlement latency, failures).

use std::sync::Mutex;
use std::time::Duration;

/// A snapshot of an [`OnchainSettler`](super::OnchainSettler)'s counters since it was built
/// (shared by its clones). Read it with [`OnchainSettler::stats`](super::OnchainSettler::stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OnchainStats {
    /// Transactions sent (each settlement sends at most one).
    pub sent: u64,
    /// Payments settled: mined with status 1, or found used on-chain after a receipt timeout.
    pub settled: u64,
    /// Settlements refused, in simulation or on-chain (status 0). Refusals by
    /// [`check`](crate::settle::Settler::check) are not counted: nothing was spent on them.
    pub refused: u64,
    /// Settlements whose outcome was unknown when the receipt wait timed out (answered as
    /// unavailable; the layer keeps the proof reserved).
    pub unknown: u64,
    /// Settlements that failed before sending because the RPC was unavailable or fees were
    /// above the cap.
    pub unavailable: u64,
    /// Gas used by every mined transaction, reverted ones included (the relayer paid for them).
    pub gas_used: u64,
    /// Fees paid by the relayer for those transactions, in wei.
    pub fees_wei: u128,
    /// Latency of the last settled payment: from `settle` being called to its receipt.
    pub last_latency: Option<Duration>,
    /// Sum of the latencies of all settled payments (divide by `settled` for the mean).
    pub total_latency: Duration,
}

impl OnchainStats {
    /// Mean gas used per settled payment, if any settled.
    pub fn gas_per_settlement(&self) -> Option<u64> {
        self.gas_used.checked_div(self.settled)
    }

    /// Mean settlement latency, if any settled.
    pub fn mean_latency(&self) -> Option<Duration> {
        u32::try_from(self.settled)
            .ok()
            .filter(|n| *n > 0)
            .map(|n| self.total_latency / n)
    }
}

/// Shared, lock-protected counters (updated once per settlement: no contention to speak of).
#[derive(Debug, Default)]
pub(super) struct Recorder(Mutex<OnchainStats>);

impl Recorder {
    pub(super) fn snapshot(&self) -> OnchainStats {
        *self.lock()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut OnchainStats)) {
        f(&mut self.lock());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OnchainStats> {
        // Counters stay meaningful even if a holder panicked mid-update.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
