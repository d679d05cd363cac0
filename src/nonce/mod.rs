//! The replay guard: one proof, one use.
//!
//! Between verification and settlement a signed authorization is only a promise; the chain
//! refuses a second settlement, but by then a second handler would already have run. A
//! [`NonceStore`] closes that window with a reservation lifecycle:
//!
//! ```text
//!            reserve (atomic, one winner)
//!   (absent) ───────────────────────────▶ Reserved ──consume──▶ Used ──(validBefore passes)──▶ evicted
//!       ▲                                    │
//!       └──────────────release───────────────┘  (handler failed before money moved)
//! ```
//!
//! * `reserve` is one atomic insert-if-absent across every instance that shares the store;
//!   every other caller sees [`Reservation::InUse`] or [`Reservation::Used`].
//! * `consume` marks the proof settled; it stays blocked until it expires (`validBefore`),
//!   after which the chain itself refuses it.
//! * `release` gives the proof back (status >= 400 from the handler: the client keeps its
//!   money and may retry with the same proof).
//! * A reservation whose outcome is unknown (crash mid-request) stays blocked until it
//!   expires: a client can never be charged twice for one proof.
//!
//! Only the holder of the [`ClaimToken`] that `reserve` returned can consume or release.

mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub(crate) mod redis;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisNonceStore;
pub use memory::MemoryNonceStore;

use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::{Address, B256};
use async_trait::async_trait;

/// Identifies one authorization: EIP-3009 nonces are unique per token and per payer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NonceKey {
    /// The chain id.
    pub chain_id: u64,
    /// The token contract.
    pub asset: Address,
    /// The payer.
    pub from: Address,
    /// The EIP-3009 nonce.
    pub nonce: B256,
}

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

/// The answer to [`NonceStore::reserve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// This caller holds the proof now.
    Reserved(ClaimToken),
    /// Another request holds it and has not finished.
    InUse,
    /// It was already used (settled).
    Used,
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
        source: crate::verify::BoxError,
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
}

/// Replay guard. `reserve` MUST be a single atomic insert-if-absent across every instance
/// sharing the store; there is deliberately no default built from a get and a put.
#[async_trait]
pub trait NonceStore: Send + Sync + 'static {
    /// Claims `key` until `expires_at` (Unix seconds, the authorization's `validBefore`).
    /// Exactly one concurrent caller gets [`Reservation::Reserved`].
    async fn reserve(&self, key: &NonceKey, expires_at: u64) -> Result<Reservation, StoreError>;

    /// The payment settled: the key stays used until it expires.
    async fn consume(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError>;

    /// No money moved: the proof may be used again.
    async fn release(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError>;
}

#[async_trait]
impl<T: NonceStore + ?Sized> NonceStore for Arc<T> {
    async fn reserve(&self, key: &NonceKey, expires_at: u64) -> Result<Reservation, StoreError> {
        (**self).reserve(key, expires_at).await
    }
    async fn consume(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError> {
        (**self).consume(key, token).await
    }
    async fn release(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError> {
        (**self).release(key, token).await
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
