//! Alerts: failures *after* a payment was accepted that a seller must see, whatever features
//! are on.
//!
//! A refusal before the handler is the client's business: it gets a response it can act on.
//! A failure after acceptance is the seller's: a settlement journal that cannot be written, a
//! prepaid refund that did not land, a receipt that could not be stored. Each such failure is
//! raised here once:
//!
//! * it is counted in a process-wide counter per [`Alert`] kind ([`count`], [`snapshot`]),
//!   readable from a health check without any feature;
//! * it is logged at `error` (money or credit may be lost) or `warn` (safe, but abnormal)
//!   through the [`log`](https://docs.rs/log) facade, or through `tracing` with that feature;
//! * with the `metrics` feature it is also the counter `x402_alerts_total{kind}`.
//!
//! ```
//! use tower_x402::alert::{self, Alert};
//!
//! // In a health check: any money-losing alert since start-up is worth paging on.
//! let lost = alert::snapshot()
//!     .into_iter()
//!     .filter(|(kind, n)| kind.loses_money() && *n > 0)
//!     .count();
//! assert_eq!(lost, 0);
//! # let _ = Alert::JournalWrite;
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A kind of failure after acceptance. Each has a stable snake-case [`name`](Self::name)
/// (the log target suffix and the metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Alert {
    /// The deferred settlement queue (the journal file, or PostgreSQL) could not record a
    /// payment or write or sync a record.
    JournalWrite,
    /// Journal compaction failed (the journal keeps appending to the file it had).
    JournalCompaction,
    /// The journal holds a record it cannot read (kept, never truncated).
    JournalUnreadable,
    /// A nonce store could not mark a settled proof used (it stays reserved until it expires:
    /// safe, never charged twice).
    NonceConsume,
    /// A nonce store could not give a proof back (blocked until it expires: the client must
    /// sign a new one).
    NonceRelease,
    /// An idempotency store could not keep or drop a paid response.
    IdempotencyStore,
    /// A paid response's body (or, settling first, the service itself) failed after
    /// settlement.
    ResponseBody,
    /// A receipt could not be encoded.
    ReceiptEncoding,
    /// A prepaid credit could not be refunded after a failed call: the payer lost a call.
    CreditRefund,
    /// A prepaid bundle was paid for but its credit could not be granted.
    CreditGrant,
    /// An RPC or facilitator reply had impossible values (overflowing sums, ...).
    HostileReply,
    /// A background settlement task failed and will retry.
    SettlementRetry,
    /// A settlement was sent but its outcome could not be learnt in time (a Solana
    /// transaction without a final status): the proof stays claimed; reconcile by hand.
    SettlementUnknown,
    /// A payment channel's state could not be committed or its lease released (an
    /// unrecorded voucher cannot be claimed: money lost unless the seller acts).
    ChannelState,
    /// A block holding a settlement transaction was rolled back (a reorg) before the wanted
    /// confirmations: the payments are read from the chain again before any resend.
    ChainReorg,
}

const ALL: [Alert; 15] = [
    Alert::JournalWrite,
    Alert::JournalCompaction,
    Alert::JournalUnreadable,
    Alert::NonceConsume,
    Alert::NonceRelease,
    Alert::IdempotencyStore,
    Alert::ResponseBody,
    Alert::ReceiptEncoding,
    Alert::CreditRefund,
    Alert::CreditGrant,
    Alert::HostileReply,
    Alert::SettlementRetry,
    Alert::SettlementUnknown,
    Alert::ChannelState,
    Alert::ChainReorg,
];

static COUNTS: [AtomicU64; ALL.len()] = [const { AtomicU64::new(0) }; ALL.len()];

impl Alert {
    /// Every kind, in a fixed order.
    pub const ALL: [Alert; 15] = ALL;

    /// The stable snake-case name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::JournalWrite => "journal_write",
            Self::JournalCompaction => "journal_compaction",
            Self::JournalUnreadable => "journal_unreadable",
            Self::NonceConsume => "nonce_consume",
            Self::NonceRelease => "nonce_release",
            Self::IdempotencyStore => "idempotency_store",
            Self::ResponseBody => "response_body",
            Self::ReceiptEncoding => "receipt_encoding",
            Self::CreditRefund => "credit_refund",
            Self::CreditGrant => "credit_grant",
            Self::HostileReply => "hostile_reply",
            Self::SettlementRetry => "settlement_retry",
            Self::SettlementUnknown => "settlement_unknown",
            Self::ChannelState => "channel_state",
            Self::ChainReorg => "chain_reorg",
        }
    }

    /// True where money or credit may be lost unless the seller acts (logged at `error`);
    /// the others are safe but abnormal (logged at `warn`).
    pub const fn loses_money(self) -> bool {
        matches!(
            self,
            Self::JournalWrite
                | Self::JournalUnreadable
                | Self::CreditRefund
                | Self::CreditGrant
                | Self::ResponseBody
                | Self::SettlementUnknown
                | Self::ChannelState
        )
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How often `alert` was raised in this process.
pub fn count(alert: Alert) -> u64 {
    COUNTS[alert.index()].load(Ordering::Relaxed)
}

/// Every kind with its count.
pub fn snapshot() -> Vec<(Alert, u64)> {
    ALL.iter().map(|a| (*a, count(*a))).collect()
}

/// Raises `alert`: counts it, logs it with `detail` (and the cause, if any), and feeds the
/// `metrics` counter. Never fails, never blocks.
pub(crate) fn raise(
    alert: Alert,
    detail: fmt::Arguments<'_>,
    cause: Option<&dyn std::error::Error>,
) {
    COUNTS[alert.index()].fetch_add(1, Ordering::Relaxed);
    let cause = Cause(cause);
    if alert.loses_money() {
        emit_error(alert, detail, &cause);
    } else {
        emit_warn(alert, detail, &cause);
    }
    #[cfg(feature = "metrics")]
    ::metrics::counter!("x402_alerts_total", "kind" => alert.name()).increment(1);
}

/// The cause chain, `: a: b`, or nothing.
struct Cause<'a>(Option<&'a dyn std::error::Error>);

impl fmt::Display for Cause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut next = self.0;
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(feature = "tracing")]
fn emit_error(alert: Alert, detail: fmt::Arguments<'_>, cause: &Cause<'_>) {
    tracing::error!(target: "tower_x402::alert", kind = alert.name(), "{detail}{cause}");
}

#[cfg(feature = "tracing")]
fn emit_warn(alert: Alert, detail: fmt::Arguments<'_>, cause: &Cause<'_>) {
    tracing::warn!(target: "tower_x402::alert", kind = alert.name(), "{detail}{cause}");
}

#[cfg(not(feature = "tracing"))]
fn emit_error(alert: Alert, detail: fmt::Arguments<'_>, cause: &Cause<'_>) {
    log::error!(target: "tower_x402::alert", "[{}] {detail}{cause}", alert.name());
}

#[cfg(not(feature = "tracing"))]
fn emit_warn(alert: Alert, detail: fmt::Arguments<'_>, cause: &Cause<'_>) {
    log::warn!(target: "tower_x402::alert", "[{}] {detail}{cause}", alert.name());
}

/// `alert!(Alert::X, cause?, "format", args..)`: [`raise`] with a formatted detail.
macro_rules! alert {
    ($kind:expr, cause = $cause:expr, $($fmt:tt)+) => {
        $crate::alert::raise($kind, format_args!($($fmt)+), Some($cause))
    };
    ($kind:expr, $($fmt:tt)+) => {
        $crate::alert::raise($kind, format_args!($($fmt)+), None)
    };
}
pub(crate) use alert;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_indices_follow_all() {
        for (i, a) in ALL.iter().enumerate() {
            assert_eq!(a.index(), i, "{a}");
        }
        let mut names: Vec<_> = ALL.iter().map(|a| a.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }

    #[test]
    fn raise_counts_and_chains_the_cause() {
        let before = count(Alert::ReceiptEncoding);
        let e = std::io::Error::other("disk gone");
        alert!(
            Alert::ReceiptEncoding,
            cause = &e,
            "receipt for {}",
            "0xabc"
        );
        assert_eq!(count(Alert::ReceiptEncoding), before + 1);
        assert_eq!(Cause(Some(&e)).to_string(), ": disk gone");
    }
}
