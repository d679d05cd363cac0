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
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::PostgresNonceStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisNonceStore;
pub use crate::store::{ClaimToken, StoreError};
pub use memory::MemoryNonceStore;

use std::sync::Arc;

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

impl NonceKey {
    /// The key of a Solana transaction: `chain_id` is the cluster's id in this crate (at or
    /// above 2^63, never an EVM chain's), `asset` and `from` are zero, and `nonce` is the hash
    /// of the signed message. The fields and so the stores' layouts stay those of EVM keys.
    pub fn svm(network: crate::Network, message_hash: B256) -> Self {
        Self {
            chain_id: network.chain_id(),
            asset: Address::ZERO,
            from: Address::ZERO,
            nonce: message_hash,
        }
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

    /// True if other processes share this store (Redis, a database): the layer then
    /// requires a challenge key configured the same on every instance. Default `false`.
    fn is_shared(&self) -> bool {
        false
    }

    /// [`Self::reserve`]'s answer at once, when this store needs no I/O for it (the memory
    /// store); `None`, the default, says to await `reserve`. The layer asks this first: an
    /// answer here saves the boxed future of `reserve`. Must agree with `reserve`.
    fn reserve_now(
        &self,
        key: &NonceKey,
        expires_at: u64,
    ) -> Option<Result<Reservation, StoreError>> {
        let _ = (key, expires_at);
        None
    }

    /// [`Self::consume`] at once, as [`Self::reserve_now`]; `None` (the default): await
    /// `consume`, which then has not run.
    fn consume_now(&self, key: &NonceKey, token: ClaimToken) -> Option<Result<(), StoreError>> {
        let _ = (key, token);
        None
    }

    /// [`Self::release`] at once, as [`Self::reserve_now`]; `None` (the default): await
    /// `release`, which then has not run.
    fn release_now(&self, key: &NonceKey, token: ClaimToken) -> Option<Result<(), StoreError>> {
        let _ = (key, token);
        None
    }
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
    fn is_shared(&self) -> bool {
        (**self).is_shared()
    }
    fn reserve_now(
        &self,
        key: &NonceKey,
        expires_at: u64,
    ) -> Option<Result<Reservation, StoreError>> {
        (**self).reserve_now(key, expires_at)
    }
    fn consume_now(&self, key: &NonceKey, token: ClaimToken) -> Option<Result<(), StoreError>> {
        (**self).consume_now(key, token)
    }
    fn release_now(&self, key: &NonceKey, token: ClaimToken) -> Option<Result<(), StoreError>> {
        (**self).release_now(key, token)
    }
}
