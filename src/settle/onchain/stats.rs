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
    /// Settlement transactions seen mined whose block was then rolled back (a reorg):
    /// their payments' outcome was unknown, and was read from the chain again.
    pub rolled_back: u64,
    /// Replacements sent for transactions not mined in time (same nonce, higher fees).
    pub replaced: u64,
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

impl OnchainStats {
    /// Books a mined transaction's gas and fee (see [`fee`]). Counters saturate: they are
    /// statistics, and a hostile node must not be able to make them panic.
    pub(super) fn add_mined(&mut self, gas_used: u64, fee_wei: u128) {
        self.gas_used = self.gas_used.saturating_add(gas_used);
        self.fees_wei = self.fees_wei.saturating_add(fee_wei);
    }

    /// Books `n` payments settled after `latency` each.
    pub(super) fn add_settled(&mut self, n: u64, latency: Duration) {
        if n == 0 {
            return;
        }
        self.settled = self.settled.saturating_add(n);
        self.last_latency = Some(latency);
        let each = latency.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
        self.total_latency = self.total_latency.saturating_add(each);
    }
}

/// What a mined receipt cost the relayer in wei, or `None` when `gas_used ×
/// effective_gas_price` overflows `u128` wei: more ether than exists, so a hostile reply.
pub(super) fn fee(gas_used: u64, effective_gas_price: u128) -> Option<u128> {
    u128::from(gas_used).checked_mul(effective_gas_price)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_receipt_values_do_not_overflow() {
        assert_eq!(fee(21_000, 1_000_000_000), Some(21_000_000_000_000));
        assert_eq!(fee(u64::MAX, u128::MAX), None);
        assert_eq!(fee(2, u128::MAX / 2 + 1), None);

        let mut s = OnchainStats::default();
        s.add_mined(u64::MAX, u128::MAX);
        s.add_mined(u64::MAX, u128::MAX);
        assert_eq!((s.gas_used, s.fees_wei), (u64::MAX, u128::MAX));
        s.add_settled(u64::MAX, Duration::MAX);
        s.add_settled(1, Duration::from_secs(1));
        assert_eq!(s.settled, u64::MAX);
        assert_eq!(s.total_latency, Duration::MAX);
        assert_eq!(s.last_latency, Some(Duration::from_secs(1)));
    }
}
