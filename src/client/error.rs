//! Why a call through [`PayingLayer`](super::PayingLayer) produced no response.
//!
//! Whenever the server answered, the caller gets that answer (with a
//! [`PaymentReport`](super::PaymentReport) in its extensions once a proof was sent); errors are
//! for the cases with no answer to give: the client refused to pay, could not sign, or the
//! transport failed.

use std::fmt;

use alloy_primitives::U256;

use super::PaymentReport;
use super::policy::Refusal;
use crate::proto::header::HeaderError;
use crate::verify::BoxError;

/// A call that ended without a response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The inner service failed before any payment proof was sent: nothing was paid.
    #[error("request failed")]
    Transport(#[source] BoxError),
    /// A proof was sent and every attempt failed in transport: the server may have settled
    /// it. The report names the authorization (payer, nonce) to reconcile on-chain (for
    /// `upto`, the Permit2 permit: its nonce is spent once settled).
    #[error("payment outcome unknown after {} attempts", report.attempts)]
    OutcomeUnknown {
        /// What was signed and sent.
        report: Box<PaymentReport>,
        /// The last transport error.
        #[source]
        source: BoxError,
    },
    /// The 402 challenge could not be read.
    #[error("unreadable 402 challenge")]
    Challenge(#[from] ChallengeError),
    /// The policy allows none of the offered ways to pay; nothing was signed.
    #[error("no acceptable payment option: {0}")]
    NoAcceptableOption(Refusals),
    /// The cheapest acceptable option costs more than the budget has left; nothing was signed.
    #[error("budget exceeded: {amount} needed, {remaining} left")]
    BudgetExceeded {
        /// The price asked (for `upto`, the maximum).
        amount: U256,
        /// What the budget has left.
        remaining: U256,
    },
    /// The balance check failed; nothing was signed.
    #[error("balance check failed")]
    Balance(#[source] BoxError),
    /// The signer refused or failed.
    #[error("signing failed")]
    Signing(#[from] alloy_signer::Error),
    /// A `batch-settlement` channel payment or refund could not be made (see
    /// [`ChannelError`]); nothing was signed unless it says so.
    #[error("payment channel: {0}")]
    Channel(#[from] ChannelError),
}

/// Why a `batch-settlement` channel payment or refund did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The deposit the voucher needs is above the deposit cap (or what the budget has left);
    /// nothing was signed.
    #[error("deposit of {needed} needed, cap {cap}")]
    DepositCap {
        /// The least deposit that covers the voucher.
        needed: U256,
        /// The cap that applied (the policy's, or the budget's remaining).
        cap: U256,
    },
    /// The layer was not given a `ChannelPolicy` (`PayingLayer::channels`).
    #[error("payment channels are not enabled on this layer")]
    NotEnabled,
    /// The server's 402 offers no `batch-settlement` option on an EVM network.
    #[error("the server offers no batch-settlement option")]
    NoOffer,
    /// The client has no record of a channel with this server.
    #[error("no channel with this server")]
    NoChannel,
    /// Nothing refundable (all charged), or a refund amount of zero or above it.
    #[error("nothing to refund")]
    NothingToRefund,
    /// The server did not refund (its status and reason code).
    #[error("refund refused (HTTP {status}): {reason:?}")]
    RefundRefused {
        /// The HTTP status.
        status: u16,
        /// The x402 reason code, if given.
        reason: Option<String>,
    },
}

impl Error {
    /// True when the client refused to pay by policy or budget (nothing was signed).
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            Self::NoAcceptableOption(_)
                | Self::BudgetExceeded { .. }
                | Self::Channel(ChannelError::DepositCap { .. })
        )
    }

    /// True for [`Error::BudgetExceeded`].
    pub fn is_budget_exceeded(&self) -> bool {
        matches!(self, Self::BudgetExceeded { .. })
    }

    /// True for transport failures (with or without a proof sent).
    pub fn is_transport(&self) -> bool {
        matches!(self, Self::Transport(_) | Self::OutcomeUnknown { .. })
    }

    /// True when money may have moved without a response: see [`Error::OutcomeUnknown`].
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Self::OutcomeUnknown { .. })
    }

    /// The payment report, when a proof was sent.
    pub fn report(&self) -> Option<&PaymentReport> {
        match self {
            Self::OutcomeUnknown { report, .. } => Some(report),
            _ => None,
        }
    }
}

/// Why a 402 challenge or receipt could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChallengeError {
    /// A 402 with neither a `PAYMENT-REQUIRED` header nor a v1 JSON body.
    #[error("402 without an x402 challenge")]
    Missing,
    /// The header is not base64 JSON, or too large.
    #[error(transparent)]
    Header(HeaderError),
    /// Not the JSON expected.
    #[error("challenge is not x402 JSON")]
    Json(#[source] serde_json::Error),
    /// An `x402Version` other than 1 or 2.
    #[error("unsupported x402Version {0}")]
    Version(u64),
    /// `accepts` is empty.
    #[error("challenge offers no way to pay")]
    NoOffers,
    /// The 402 body could not be read.
    #[error("402 body unreadable")]
    Body(#[source] BoxError),
    /// A receipt field is malformed.
    #[error("receipt field `{0}` is malformed")]
    Receipt(&'static str),
}

/// Each offered option and why the policy refused it, in the server's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusals(pub Vec<Refusal>);

impl fmt::Display for Refusals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "option {}: {r}", i + 1)?;
        }
        Ok(())
    }
}
