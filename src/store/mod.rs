//! What every store of this crate shares, whatever it stores (nonces, idempotent replies,
//! prepaid credit, and the stores to come): its error, the token that proves a claim, the
//! sharded map of the in-process stores, the Redis plumbing (behind `redis`) and the PostgreSQL plumbing (behind `postgres`). Neutral ground: it imports no other module of the crate,
//! so the stores and the request path both depend on it and never on each other.

#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisConnection;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::PostgresPool;
pub(crate) mod sharded;

use std::time::Duration;

/// Boxed error for backend causes.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Proof of holding a reservation; needed to consume or release it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClaimToken(pub u128);

impl ClaimToken {
    /// A random token (distinct across instances sharing a store).
    ///
    /// A token only has to be distinct from every other holder's (it is not a secret: the
    /// store compares it). If the OS generator fails, a process counter, the process id and
    /// the time stand in: still distinct within the process, and across instances unless two
    /// processes with the same pid draw in the same nanosecond. A constant token would let a
    /// late holder release a reservation another request took over, so that is never used.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        match getrandom::fill(&mut b) {
            Ok(()) => Self(u128::from_le_bytes(b)),
            Err(_) => Self::fallback(),
        }
    }

    fn fallback() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let low = n ^ (u64::from(std::process::id()) << 32);
        Self((u128::from(nanos) << 64) | u128::from(low))
    }
}

/// Why a store could not answer. Either way the request fails closed (503), the handler does
/// not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store is down or slow: retry later.
    #[error("nonce store unavailable")]
    Unavailable {
        /// Suggested wait.
        retry_after: Option<Duration>,
        /// The cause (logged, never sent to clients).
        #[source]
        source: BoxError,
    },
    /// The store is at its capacity limit.
    #[error("nonce store full ({capacity} entries)")]
    Full {
        /// The configured capacity.
        capacity: usize,
    },
    /// `consume`/`release` by a caller that does not hold the reservation.
    #[error("reservation not held by this caller")]
    NotHeld,
}

impl StoreError {
    /// Suggested wait before retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True for [`StoreError::Unavailable`] and [`StoreError::Full`]: retrying later may work.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Full { .. })
    }

    /// The answer to an operation on a claim: `Ok` when it changed the entry the caller
    /// holds, else [`StoreError::NotHeld`] (a stranger's token, or an expired claim). The
    /// Redis scripts answer 1 or 0; the PostgreSQL stores read their rows instead.
    #[cfg(feature = "redis")]
    pub(crate) fn held(changed: bool) -> Result<(), Self> {
        if changed { Ok(()) } else { Err(Self::NotHeld) }
    }
}

/// `name`'s `Debug` with the settings every shared store has (never its connection: the
/// address may carry a password); the caller adds its own fields and finishes it.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn debug_settings<'a, 'b>(
    f: &'a mut std::fmt::Formatter<'b>,
    name: &str,
    prefix: &str,
    timeout: Duration,
    retry_after: Option<Duration>,
) -> std::fmt::DebugStruct<'a, 'b> {
    let mut d = f.debug_struct(name);
    d.field("prefix", &prefix)
        .field("timeout", &timeout)
        .field("retry_after", &retry_after);
    d
}

/// [`StoreError::Unavailable`] with `retry_after` and `source`.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn unavailable(
    retry_after: Option<Duration>,
    source: impl Into<BoxError>,
) -> StoreError {
    StoreError::Unavailable {
        retry_after,
        source: source.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tokens_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(ClaimToken::fallback()));
        }
        assert_ne!(ClaimToken::random(), ClaimToken::random());
    }
}
