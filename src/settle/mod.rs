//! Settlement: moving the money a verified proof promises.
//!
//! [`Settler`] is the pluggable step the layer runs after the handler succeeded. This crate
//! ships [`VerifyOnly`], which settles **nothing**: it accepts the verified authorization and
//! leaves it to you to execute later (for instance in a batch). Its receipts say so: the
//! `transaction` field is empty. On-chain and facilitator settlers plug in here.

use std::time::Duration;

use alloy_primitives::{B256, U256};
use async_trait::async_trait;

use crate::reason::Reason;
use crate::verify::{BoxError, VerifiedPayment};

#[cfg(feature = "deferred")]
#[cfg_attr(docsrs, doc(cfg(feature = "deferred")))]
pub mod deferred;
#[cfg(feature = "onchain")]
#[cfg_attr(docsrs, doc(cfg(feature = "onchain")))]
pub mod onchain;

/// When the layer settles, relative to the handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SettlementMode {
    /// verify → handler → settle (the reference behaviour). A handler answer ≥ 400 is not
    /// settled; a failed settlement answers 402 with a failed receipt and withholds the
    /// handler's body. The response is held until settlement ends (its body is not read, so
    /// nothing is buffered, but headers wait for the chain).
    #[default]
    AfterHandler,
    /// verify → settle → handler: the handler runs only once the money moved, and its
    /// response streams out at once (SSE, LLM tokens). Refund risk is the seller's: a handler
    /// that fails after settlement was still paid for.
    BeforeHandler,
}

/// What a settler did.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Settlement {
    /// The transaction that moved the money, if one was sent.
    pub transaction: Option<B256>,
    /// The amount settled, when it differs from the authorized one.
    pub amount: Option<U256>,
    /// A Solana settlement's transaction id (its fee payer's signature); `transaction` holds
    /// EVM hashes only.
    pub signature: Option<crate::proto::svm::Signature>,
}

/// Why a settlement failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettleError {
    /// Refused (reverted, insufficient funds, nonce used): no money moved.
    #[error("settlement refused: {reason}")]
    Refused {
        /// The x402 `errorReason` code.
        reason: Reason,
        /// The transaction, if one was mined and reverted.
        transaction: Option<B256>,
    },
    /// The settlement backend is unavailable and **nothing was sent**: retrying later with
    /// the same proof is safe. The layer answers 503 and releases the proof.
    #[error("settlement backend unavailable")]
    Unavailable {
        /// Suggested wait.
        retry_after: Option<Duration>,
        /// The cause (logged, never sent to clients).
        #[source]
        source: BoxError,
    },
    /// The settlement backend rate-limits us and nothing was sent. The layer answers 429 with
    /// `Retry-After` and releases the proof.
    #[error("settlement backend rate-limited")]
    RateLimited {
        /// Suggested wait.
        retry_after: Option<Duration>,
    },
    /// The settlement **may** have gone through (sent, but no receipt in time; connection lost
    /// after sending). The layer keeps the proof reserved, so it cannot buy a second
    /// settlement, and answers 503 with reason `settlement_outcome_unknown` and a receipt
    /// carrying the transaction, if known: the client must not pay again.
    #[error("settlement outcome unknown")]
    Unknown {
        /// The transaction that may settle the payment, if one was sent.
        transaction: Option<B256>,
        /// Suggested wait.
        retry_after: Option<Duration>,
        /// The cause (logged, never sent to clients).
        #[source]
        source: BoxError,
    },
}

impl SettleError {
    /// The x402 `errorReason` code.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Refused { reason, .. } => reason.clone(),
            Self::Unavailable { .. } => Reason::UnexpectedSettleError,
            Self::RateLimited { .. } => Reason::RateLimited,
            Self::Unknown { .. } => Reason::SettlementOutcomeUnknown,
        }
    }

    /// True when retrying later may succeed (unavailable, rate-limited or unknown).
    pub fn is_retryable(&self) -> bool {
        !self.is_refused()
    }

    /// True when the payment was refused and no money moved.
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }

    /// True when the backend rate-limits us.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Self::RateLimited { .. })
    }

    /// True when the money may have moved: the proof must stay spent.
    pub fn is_unknown(&self) -> bool {
        matches!(self, Self::Unknown { .. })
    }

    /// The transaction involved, if any (a reverted or possibly pending one).
    pub fn transaction(&self) -> Option<B256> {
        match self {
            Self::Refused { transaction, .. } | Self::Unknown { transaction, .. } => *transaction,
            Self::Unavailable { .. } | Self::RateLimited { .. } => None,
        }
    }

    /// Suggested wait before retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. }
            | Self::RateLimited { retry_after }
            | Self::Unknown { retry_after, .. } => *retry_after,
            Self::Refused { .. } => None,
        }
    }
}

/// Executes a verified payment.
#[async_trait]
pub trait Settler: Send + Sync + 'static {
    /// Checks, before the handler runs, that the payment can still settle (balance, nonce
    /// unused on-chain). A refusal answers 402 with its reason and the handler does not run.
    /// Default: nothing to check.
    async fn check(&self, _payment: &VerifiedPayment) -> Result<(), SettleError> {
        Ok(())
    }

    /// Settles `payment`; called once per proof, after the handler answered below 400.
    async fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, SettleError>;

    /// True if other processes share this settler's state (a deferred settler on a shared
    /// queue): the layer then requires a challenge key configured the same on every instance,
    /// as for shared stores. Default `false`.
    fn is_shared(&self) -> bool {
        false
    }

    /// [`Self::check`]'s answer at once, when this settler needs no I/O for it (the
    /// in-process ones); `None`, the default, says to await `check`. The layer asks this
    /// first: an answer here saves the boxed future of `check`. Must agree with `check`.
    fn check_now(&self, payment: &VerifiedPayment) -> Option<Result<(), SettleError>> {
        let _ = payment;
        None
    }

    /// [`Self::settle`] at once, as [`Self::check_now`]; `None` (the default): await
    /// `settle`, which then has not run.
    fn settle_now(&self, payment: &VerifiedPayment) -> Option<Result<Settlement, SettleError>> {
        let _ = payment;
        None
    }
}

#[async_trait]
impl<T: Settler + ?Sized> Settler for std::sync::Arc<T> {
    async fn check(&self, payment: &VerifiedPayment) -> Result<(), SettleError> {
        (**self).check(payment).await
    }
    async fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        (**self).settle(payment).await
    }
    fn is_shared(&self) -> bool {
        (**self).is_shared()
    }
    fn check_now(&self, payment: &VerifiedPayment) -> Option<Result<(), SettleError>> {
        (**self).check_now(payment)
    }
    fn settle_now(&self, payment: &VerifiedPayment) -> Option<Result<Settlement, SettleError>> {
        (**self).settle_now(payment)
    }
}

/// Verify-only mode: no money moves, no transaction is sent, and the receipt's `transaction`
/// is empty. The proof is still claimed once in the nonce store, and the handler can read the
/// [`VerifiedPayment`] (with the signed authorization) to settle it by other means.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerifyOnly;

#[async_trait]
impl Settler for VerifyOnly {
    async fn settle(&self, _payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        Ok(Settlement::default())
    }

    fn check_now(&self, _payment: &VerifiedPayment) -> Option<Result<(), SettleError>> {
        Some(Ok(()))
    }

    fn settle_now(&self, _payment: &VerifiedPayment) -> Option<Result<Settlement, SettleError>> {
        Some(Ok(Settlement::default()))
    }
}
