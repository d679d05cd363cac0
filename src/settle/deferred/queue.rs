//! [`SettlementQueue`]: where a [`DeferredSettler`](super::DeferredSettler) keeps accepted
//! payments until they settle. The file journal ([`JournalQueue`](super::JournalQueue)) is one
//! implementation (one process, local disk); `PostgresSettlementQueue` (feature `postgres`) is
//! shared by every instance on one database.

use std::time::Duration;

use alloy_primitives::{B256, U256};
use async_trait::async_trait;

use crate::store::StoreError;
use crate::verify::VerifiedPayment;

/// Who holds a lease: one per [`DeferredSettler`](super::DeferredSettler) (random).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseOwner(pub u128);

impl LeaseOwner {
    /// A fresh random owner (the OS's random source; the clock and process id if that
    /// fails: owners only need to differ between live workers).
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        if getrandom::fill(&mut bytes).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            return Self(nanos ^ (u128::from(std::process::id()) << 96));
        }
        Self(u128::from_be_bytes(bytes))
    }
}

/// What [`SettlementQueue::append`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Appended {
    /// Durable under this id: the payment is accepted.
    Accepted(u64),
    /// The queue already holds this authorization (same payer, token, nonce) unsettled or
    /// settled: nothing was written.
    Duplicate,
}

/// What the queue knows about a payment's payer before the handler runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Exposure {
    /// Payments in the queue without a final outcome (for the backlog bound).
    pub pending: usize,
    /// What the payer owes in queued, unsettled payments of the same token.
    pub owed: U256,
    /// This authorization is already queued.
    pub queued: bool,
}

impl Exposure {
    /// An exposure.
    pub fn new(pending: usize, owed: U256, queued: bool) -> Self {
        Self {
            pending,
            owed,
            queued,
        }
    }
}

/// What a lease asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseRequest {
    /// Who takes the lease.
    pub owner: LeaseOwner,
    /// Most payments to lease.
    pub max: usize,
    /// How long the lease holds unless renewed; past it another worker may take them over.
    pub ttl: Duration,
    /// Unix ms: a payment accepted at or before this is ripe. Younger ones are leased only
    /// when at least `max` payments are due (a full batch goes at once).
    pub ripe_ms: u64,
}

impl LeaseRequest {
    /// A lease request.
    pub fn new(owner: LeaseOwner, max: usize, ttl: Duration, ripe_ms: u64) -> Self {
        Self {
            owner,
            max,
            ttl,
            ripe_ms,
        }
    }
}

/// A payment leased to a worker.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Leased {
    /// The queue's id.
    pub id: u64,
    /// The payment as accepted.
    pub payment: VerifiedPayment,
    /// When it was accepted (Unix ms).
    pub accepted_ms: u64,
    /// Transactions recorded as carrying it (possibly never broadcast).
    pub sent: Vec<B256>,
    /// Failed rounds so far (for the backoff).
    pub attempts: u32,
    /// It may have been worked on before without a final outcome (leased earlier, by this or
    /// another instance, or read back after a restart): the worker reads the chain before
    /// it sends anything.
    pub recovered: bool,
}

impl Leased {
    /// A leased payment.
    pub fn new(
        id: u64,
        payment: VerifiedPayment,
        accepted_ms: u64,
        sent: Vec<B256>,
        attempts: u32,
        recovered: bool,
    ) -> Self {
        Self {
            id,
            payment,
            accepted_ms,
            sent,
            attempts,
            recovered,
        }
    }
}

/// A payment's final outcome, as the queue records it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Final {
    /// The money moved.
    Settled {
        /// The transaction, when known.
        tx: Option<B256>,
        /// Its share of the gas, when known.
        gas_used: Option<u64>,
    },
    /// It never will.
    Failed {
        /// The x402 reason.
        reason: String,
        /// The transaction that failed to settle it, if any.
        tx: Option<B256>,
    },
}

/// Durable storage for a [`DeferredSettler`](super::DeferredSettler): accepted payments,
/// leased in batches to a worker, each moving `pending → sent(tx) → settled | failed`.
///
/// Every method is one atomic step. The exactly-once rules hold for any implementation
/// that keeps these promises:
///
/// - [`append`](Self::append) returns only once the payment is durable (the layer answers
///   the paid request then), and refuses an authorization it already holds.
/// - [`lease`](Self::lease) never hands one payment to two live leases; a lease that is
///   neither renewed nor released expires after its TTL, and its payments go to the next
///   lease with [`Leased::recovered`] set.
/// - [`sent`](Self::sent) is durable before it returns, and fails (changing nothing) when
///   the owner no longer holds the lease: the worker then does not broadcast.
/// - [`finish`](Self::finish) records a final outcome once; a second one for the same id
///   changes nothing.
#[async_trait]
pub trait SettlementQueue: Send + Sync + 'static {
    /// Adds an accepted payment; returns once it is durable.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]: not accepted (the layer answers 503 and releases the
    /// proof).
    async fn append(
        &self,
        payment: &VerifiedPayment,
        accepted_ms: u64,
    ) -> Result<Appended, StoreError>;

    /// The backlog, what `payment`'s payer owes in queued payments of its token, and whether
    /// its authorization is queued (asked before the handler runs).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn exposure(&self, payment: &VerifiedPayment) -> Result<Exposure, StoreError>;

    /// Leases up to `req.max` due payments, oldest first (see [`LeaseRequest`]). A payment is
    /// due when no live lease holds it and its retry time has come.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn lease(&self, req: LeaseRequest) -> Result<Vec<Leased>, StoreError>;

    /// Records that `tx` carries `ids`; durable before it returns, **before** `tx` is
    /// broadcast.
    ///
    /// # Errors
    /// [`StoreError::NotHeld`] when `owner` no longer holds them; [`StoreError::Unavailable`].
    /// Either way: do not broadcast.
    async fn sent(&self, owner: LeaseOwner, ids: &[u64], tx: B256) -> Result<(), StoreError>;

    /// Records final outcomes; returns, in order, whether each was recorded now (false: it
    /// was already final, or is unknown).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]: nothing is known to be recorded (the worker reads the
    /// chain again before anything is resent).
    async fn finish(&self, outcomes: &[(u64, Final)]) -> Result<Vec<bool>, StoreError>;

    /// Extends `owner`'s lease on `ids` to `ttl` from now.
    ///
    /// # Errors
    /// [`StoreError::NotHeld`] when it was lost; [`StoreError::Unavailable`].
    async fn renew(&self, owner: LeaseOwner, ids: &[u64], ttl: Duration) -> Result<(), StoreError>;

    /// Gives `owner`'s lease on `ids` back: due again after `retry_in`; with `failed`, their
    /// attempt count grows by one.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] (the lease then expires by itself).
    async fn release(
        &self,
        owner: LeaseOwner,
        ids: &[u64],
        retry_in: Duration,
        failed: bool,
    ) -> Result<(), StoreError>;

    /// Payments without a final outcome.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn pending(&self) -> Result<usize, StoreError>;

    /// True when several processes share this queue (their workers settle each other's
    /// payments); false for one process's queue (the default).
    fn is_shared(&self) -> bool {
        false
    }
}
