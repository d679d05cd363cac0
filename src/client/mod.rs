//! The paying side: a tower layer for outgoing requests that answers x402 challenges.
//!
//! [`PayingLayer`] wraps any tower HTTP client (`Service<http::Request<B>>`, e.g. hyper-util's
//! legacy `Client`). A request that gets **402** is paid once and sent again:
//!
//! 1. The challenge is read: v2 `PAYMENT-REQUIRED` header (base64 JSON), else a v1 JSON body.
//! 2. The [`Policy`] picks the cheapest offer it allows (scheme `exact`, and `upto` with
//!    [`Policy::allow_upto`]; allowed network and token, at most the cap per request),
//!    optionally skipping offers the payer's balance cannot cover ([`BalanceSource`]), and
//!    counts it against the shared [`Budget`]. An `upto` offer costs its **maximum** in all of
//!    these (cap, order, balance, budget). Any refusal happens **before** signing and is an
//!    [`Error`].
//! 3. `exact`: the EIP-3009 `TransferWithAuthorization` is signed with the alloy [`Signer`]
//!    (domain `name`/`version` from `extra`, chain id from the network, `verifyingContract` =
//!    token), valid from 10 minutes ago until `maxTimeoutSeconds` from now, with a random
//!    nonce. `upto` (v2 only): a Permit2 `PermitWitnessTransferFrom` for the maximum, spender
//!    the x402 upto proxy, witness `{to: payTo, facilitator: extra.facilitatorAddress,
//!    validAfter: 0}`, deadline `maxTimeoutSeconds` from now, a random 256-bit nonce, as
//!    `@x402/evm`'s `UptoEvmScheme` signs it. If the challenge offers the
//!    `payment-identifier` extension, an idempotency id goes with it.
//!    Solana `exact` (feature `svm-client`, a layer given an `SvmPayer` with
//!    `PayingLayer::svm`): the official `@x402/svm` transaction, fee payer `extra.feePayer`,
//!    signed by the payer as the transfer authority (`svm::pay`).
//! 4. The request is sent again with `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1). The answer
//!    carries a [`PaymentReport`] in its extensions: what was paid, the decoded receipt
//!    (`PAYMENT-RESPONSE` / `X-PAYMENT-RESPONSE`) and the [`PaymentOutcome`]. For `upto`, a
//!    successful receipt's `amount` is what was settled
//!    ([`PaymentReport::settled_amount`]); the budget gets back the rest of the maximum.
//!
//! [`Signer`]: alloy_signer::Signer
//!
//! ## Failure table
//!
//! | answer | what the client does |
//! |---|---|
//! | 402, not paid yet | pay once (above) and resend |
//! | 402 after paying | stop, never sign again; the 402 goes back with [`PaymentOutcome::Refused`] and the reason |
//! | 402 `invalid_exact_evm_nonce_already_used` after an unknown outcome | stop: [`PaymentOutcome::AlreadyUsed`] (the proof was spent or is pending) |
//! | `upto`: 402 `permit2_allowance_required` | stop, as any 402 after paying: the payer has not approved Permit2 for the token (a one-time on-chain transaction this client does not send) |
//! | `upto`: 402 `invalid_upto_evm_payload_settlement_exceeds_amount` | stop: the server metered more than the maximum and settled nothing; the body is withheld |
//! | `upto`: 2xx with a successful receipt | [`PaymentOutcome::Settled`]; the budget keeps the receipt's `amount` (`0`: nothing sent on-chain) and gets back the rest of the maximum |
//! | `batch-settlement`: 402 corrective (`..._cumulative_amount_mismatch` with `channelState`) | once per call: adopt the server's charged amount if a voucher this client signed covers it, sign the next voucher on it and resend; otherwise stop as any 402 after paying |
//! | 401 | returned as is, no retry |
//! | 429 | wait (`Retry-After`, else exponential backoff with jitter) and resend, bounded |
//! | 500/502/503/504 | wait (`Retry-After`, else ~5 s doubling) and resend, bounded; after a proof was sent the outcome is unknown, so the **same** proof is resent |
//! | transport error before paying | [`Error::Transport`] |
//! | transport error after paying | resend the same proof, bounded; then [`Error::OutcomeUnknown`] |
//!
//! A server built with this crate answers 503 `settlement_outcome_unknown` when it cannot tell
//! whether the money moved: the resend with the same proof either gets the paid response or a
//! 402 `invalid_exact_evm_nonce_already_used`, which is reported as
//! [`PaymentOutcome::AlreadyUsed`], never paid again; the report keeps the 503's receipt, so
//! [`PaymentReport::transaction`] names the pending transaction to reconcile. See
//! [`RetryPolicy`] for the bounds.
//!
//! Whenever an `upto` payment does not end with a successful receipt stating its `amount`
//! (refused, no receipt, outcome unknown), the budget keeps its whole maximum counted: the
//! permit can still be settled, by its facilitator only, up to that maximum until its deadline.
//!
//! ## Payment channels (`batch-settlement`)
//!
//! With [`PayingLayer::channels`], `batch-settlement` offers (x402 v2, EVM) are paid too, as
//! `@x402/evm`'s `BatchSettlementEvmScheme` pays them: the first call on a channel (one per
//! server receiver, token and network) carries an EIP-3009 deposit into the escrow
//! (`ChannelPolicy::deposit_multiplier` × the price, at least what the voucher needs, at most
//! the [`ChannelPolicy`]'s cap and what the [`Budget`] has left, else
//! [`ChannelError::DepositCap`] before anything is signed); every call signs a cumulative
//! voucher (`charged + price`), and the receipt's `extra.chargedAmount` (a server may charge
//! less than the price, never more) advances the client's [`ChannelRecord`]. The budget counts
//! the price when signing and gets back what was not charged. A corrective 402 is adopted once
//! per call, only when what the server says it charged is covered by a voucher this client
//! signed (its record, or after lost state the server's copy of the client's own voucher); a
//! receipt charging more than the price is reported [`PaymentOutcome::Refused`] and counted at
//! the voucher's ceiling. [`Paying::refund_channel`] asks for the unspent deposit back.
//! Records live in a [`ChannelBook`] ([`MemoryChannelBook`] by default): calls on one channel
//! are serialized in a layer and its clones.
//!
//! ```no_run
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{Layer, Service, ServiceExt};
//! use tower_x402::client::{Budget, ChannelPolicy, PayingLayer, PaymentReport, Policy};
//! use tower_x402::primitives::U256;
//! use tower_x402::Asset;
//!
//! # async fn agent() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let signer: alloy_signer_local::PrivateKeySigner = std::env::var("PAYER_KEY")?.parse()?;
//! let policy = Policy::new(U256::from(1_000))            // ≤ $0.001 per call
//!     .allow_asset(&Asset::usdc_base())
//!     .budget(Budget::new(U256::from(1_000_000)));        // ≤ $1 in total
//! let channels = ChannelPolicy::new(U256::from(100_000)) // deposit ≤ $0.10 at a time
//!     .deposit_multiplier(100);                          // 100 calls per deposit
//! let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let mut client = PayingLayer::new(signer, policy).channels(channels).layer(http);
//! for _ in 0..10 {
//!     let req = http::Request::get("http://api.example/metered").body(Full::default())?;
//!     let res = client.ready().await?.call(req).await?;
//!     if let Some(ch) = res.extensions().get::<PaymentReport>().and_then(|r| r.channel.clone()) {
//!         println!("voucher {} (deposit {:?}), charged {:?}", ch.ceiling, ch.deposit, ch.charged);
//!     }
//! }
//! // Done with this server: the unspent deposit back.
//! let req = http::Request::get("http://api.example/metered").body(Full::default())?;
//! let refund = client.refund_channel(req, None).await?;
//! println!("refunded {} in {:?}", refund.amount, refund.transaction);
//! # Ok(())
//! # }
//! ```
//!
//! ## The request body is replayed
//!
//! A paid call sends the request at least twice, so the body type must be `Clone`: use a
//! buffered body such as `http_body_util::Full<Bytes>` or `String` (streaming bodies cannot be
//! replayed; buffer them first).
//!
//! ## Example
//!
//! ```no_run
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_x402::client::{Budget, PayingLayer, PaymentReport, Policy};
//! use tower_x402::primitives::U256;
//! use tower_x402::Asset;
//!
//! # async fn agent() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let signer: alloy_signer_local::PrivateKeySigner = std::env::var("PAYER_KEY")?.parse()?;
//! let policy = Policy::new(U256::from(10_000))           // ≤ $0.01 per request
//!     .allow_asset(&Asset::usdc_base())
//!     .budget(Budget::new(U256::from(1_000_000)));        // ≤ $1 in total
//! let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let mut client = ServiceBuilder::new()
//!     .layer(PayingLayer::new(signer, policy))
//!     .service(http);
//! let req = http::Request::get("http://api.example/weather").body(Full::default())?;
//! let res = client.ready().await?.call(req).await?;
//! if let Some(paid) = res.extensions().get::<PaymentReport>() {
//!     println!("paid {} to {}: {:?}", paid.amount(), paid.requirements.pay_to, paid.outcome);
//! }
//! # Ok(())
//! # }
//! ```

mod balance;
mod challenge;
mod channel;
mod error;
mod flow;
mod layer;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod middleware;
mod policy;
mod retry;
mod signer;
#[cfg(feature = "svm-client")]
mod svm;

use alloy_primitives::{Address, B256, U256};

pub use balance::BalanceSource;
#[cfg(feature = "onchain")]
#[cfg_attr(docsrs, doc(cfg(feature = "onchain")))]
pub use balance::ProviderBalance;
pub use channel::{
    ChannelBook, ChannelKey, ChannelPayment, ChannelPolicy, ChannelRecord, ChannelRefund,
    MemoryChannelBook,
};
pub use error::{ChallengeError, ChannelError, Error, Refusals};
pub use layer::{Paying, PayingLayer, ResponseFuture};
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub use middleware::PayingMiddleware;
pub use policy::{Budget, Policy, Refusal};
pub use retry::RetryPolicy;
#[cfg(feature = "svm-client")]
#[cfg_attr(docsrs, doc(cfg(feature = "svm-client")))]
pub use svm::SvmPayer;

use crate::proto::exact::Authorization;
use crate::proto::upto::Permit2Authorization;
use crate::proto::v2::PaymentRequirements;
use crate::proto::{SettleResponse, X402Version};

/// What a call paid, in the response extensions (and in [`Error::OutcomeUnknown`]) whenever a
/// proof was sent.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PaymentReport {
    /// The dialect spoken.
    pub version: X402Version,
    /// The option paid (v1 offers normalized: `amount` is `maxAmountRequired`; for `upto`,
    /// `amount` is the maximum).
    pub requirements: PaymentRequirements,
    /// The signed authorization: payer (`from`), `nonce`, validity window. For `upto` it
    /// mirrors the Permit2 permit in the same terms (`from`, `witness.to`, the maximum,
    /// `validAfter`, `deadline`, the Permit2 nonce as 32 bytes); the permit itself is
    /// [`Self::permit2`].
    pub authorization: Authorization,
    /// The signed Permit2 permit of an `upto` payment (`None` for `exact`).
    pub permit2: Option<Permit2Authorization>,
    /// The Solana payer's key when a Solana offer was paid (`PayingLayer::svm`, feature `svm-client`); then
    /// [`Self::authorization`] holds the amount, the window and, as `nonce`, the SHA-256 of
    /// the signed message (the server's claim key), with zero EVM addresses.
    pub svm_payer: Option<crate::proto::svm::Pubkey>,
    /// The `payment-identifier` id sent, if the server offered the extension.
    pub payment_id: Option<String>,
    /// A `batch-settlement` payment: the channel, the voucher's ceiling, the deposit sent with
    /// it and what the receipt charged.
    pub channel: Option<ChannelPayment>,
    /// Requests sent with the proof (1 unless retried).
    pub attempts: u32,
    /// The decoded receipt of the final answer, if it had one.
    pub receipt: Option<SettleResponse>,
    /// How it ended.
    pub outcome: PaymentOutcome,
}

impl PaymentReport {
    /// What the call is charged, in atomic token units: the price for `exact`; for `upto`
    /// the [settled amount](Self::settled_amount) once a successful receipt states it, else
    /// the [maximum](Self::max_amount) (the most the permit can still cost); for a channel,
    /// the receipt's accepted `chargedAmount`, else the price. This is what the
    /// [`Budget`] ends up counting for the call.
    pub fn amount(&self) -> U256 {
        if let Some(charged) = self.channel.as_ref().and_then(|c| c.charged) {
            return charged;
        }
        match self.settled_amount() {
            Some(settled) if self.is_upto() => settled.min(self.max_amount()),
            _ => self.max_amount(),
        }
    }

    /// The most the signature authorises: the price for `exact`, the signed maximum for
    /// `upto` (the requirement's `amount`).
    pub fn max_amount(&self) -> U256 {
        self.requirements.amount
    }

    /// The amount the server says it settled: the `amount` of a successful receipt, `None`
    /// without one (or when the receipt omits it). For `upto`, the metered usage (`0` when
    /// nothing was used and nothing sent on-chain).
    pub fn settled_amount(&self) -> Option<U256> {
        self.receipt
            .as_ref()
            .filter(|r| r.success)
            .and_then(|r| r.amount)
    }

    /// True for a metered `upto` payment.
    pub fn is_upto(&self) -> bool {
        self.permit2.is_some()
    }

    /// The payer.
    pub fn payer(&self) -> Address {
        self.authorization.from
    }

    /// The authorization nonce (with the payer and token, what identifies it on-chain; for
    /// `upto`, the Permit2 nonce, per payer across tokens, as 32 big-endian bytes).
    pub fn nonce(&self) -> B256 {
        self.authorization.nonce
    }

    /// The settlement transaction, if the receipt names one.
    pub fn transaction(&self) -> Option<B256> {
        self.receipt.as_ref().and_then(|r| r.transaction)
    }
}

/// `extra.feePayer` of a Solana requirement, as a key.
pub(crate) fn svm_fee_payer(req: &PaymentRequirements) -> Option<crate::proto::svm::Pubkey> {
    req.extra_str("feePayer")?.parse().ok()
}

/// How a paid call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PaymentOutcome {
    /// The server sent a receipt with `success: true`.
    Settled,
    /// The server answered below 400 without a receipt (it did not say whether it settled).
    Accepted,
    /// The server answered 4xx (not 402) to the paid request: x402 servers do not settle
    /// those, but the signed authorization stays valid until it expires.
    NotCharged,
    /// The server refused the proof (402 or a failed receipt); the reason code if it gave one.
    Refused {
        /// The x402 `error` / `errorReason`.
        reason: Option<String>,
    },
    /// After an unknown outcome, the server says the proof's nonce is already used: the
    /// payment went through or is pending. It was not signed again.
    AlreadyUsed,
    /// No definite answer (5xx or transport errors to the end): it may have settled.
    Unknown,
}
