//! Verification: does a payment proof pay what a requirement asks?
//!
//! [`Verifier`] is the pluggable step; [`ExactEvmVerifier`] checks `exact` EIP-3009 payments
//! in-process (EIP-712 digest + one secp256k1 public-key recovery, no network). Verification
//! never moves money: settlement is a separate step ([`crate::settle`]).

pub mod exact;
pub mod upto;

use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::{Address, B256, Bytes, U256};
use async_trait::async_trait;

pub use exact::ExactEvmVerifier;

use crate::Network;
use crate::nonce::NonceKey;
use crate::proto::exact::Authorization;
use crate::proto::upto::Permit2Authorization;
use crate::proto::{PaymentPayload, X402Version, v2::PaymentRequirements};

/// Boxed error for backend causes.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Checks a payment proof against the server's own requirements.
///
/// Implementations must not trust `payload`'s echo of the requirements: `requirements` is
/// the server's copy and the only one to check against. Object safe: layers hold an
/// `Arc<dyn Verifier>`.
#[async_trait]
pub trait Verifier: Send + Sync + 'static {
    /// Verifies `payload` against `requirements`, returning the typed proof or why not.
    async fn verify(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError>;
}

#[async_trait]
impl<T: Verifier + ?Sized> Verifier for Arc<T> {
    async fn verify(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        (**self).verify(payload, requirements).await
    }
}

/// A payment that passed verification (not yet settled). The layer puts it into the request
/// extensions, so handlers can see who paid what.
///
/// Non-exhaustive so fields can be added: verifiers outside this crate build one with
/// [`VerifiedPayment::exact`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedPayment {
    /// The protocol version the client spoke.
    pub version: X402Version,
    /// The network paid on.
    pub network: Network,
    /// The token paid in.
    pub asset: Address,
    /// Who paid (the authorization's `from`, proven by the signature).
    pub payer: Address,
    /// Who receives the money.
    pub pay_to: Address,
    /// Atomic units paid; for `upto`, the most that may be charged (the layer settles the
    /// metered usage, see [`crate::upto`]).
    pub amount: U256,
    /// The signed authorization, needed to settle. For `upto` it mirrors the Permit2 permit
    /// (`from`, `witness.to`, the maximum, `validAfter`, `deadline`, the nonce as 32 bytes)
    /// so that every payment has the same shape; it is not an EIP-3009 authorization and
    /// settles only through [`Self::permit2`].
    pub authorization: Authorization,
    /// Its signature.
    pub signature: Bytes,
    /// `validBefore` as Unix seconds; the proof is worthless afterwards.
    pub valid_before: u64,
    /// The `{x402Version, paymentPayload, paymentRequirements}` JSON a remote facilitator
    /// approved (set by the `facilitator` feature's `FacilitatorClient`, `None` for
    /// in-process verifiers). Its settlement sends these very bytes to `POST /settle`, so the
    /// facilitator settles exactly the proof and the server requirements it verified.
    pub facilitator_request: Option<Bytes>,
    /// The signed Permit2 permit of an `upto` payment (`None` for `exact`).
    pub permit2: Option<Permit2Authorization>,
}

impl VerifiedPayment {
    /// An `exact` EIP-3009 payment, from its signed authorization: payer, recipient, amount
    /// and expiry are the authorization's. Only for a proof that was verified (the signature
    /// recovers to `from`); the layer trusts what a verifier returns.
    pub fn exact(
        version: X402Version,
        network: Network,
        asset: Address,
        authorization: Authorization,
        signature: Bytes,
    ) -> Self {
        Self {
            version,
            network,
            asset,
            payer: authorization.from,
            pay_to: authorization.to,
            amount: authorization.value,
            valid_before: authorization.valid_before.saturating_to(),
            authorization,
            signature,
            facilitator_request: None,
            permit2: None,
        }
    }

    /// An `upto` Permit2 payment, from its signed permit: payer, recipient, maximum and
    /// expiry are the permit's. Only for a proof that was verified.
    pub fn upto(
        version: X402Version,
        network: Network,
        permit: Permit2Authorization,
        signature: Bytes,
    ) -> Self {
        let authorization = Authorization {
            from: permit.from,
            to: permit.witness.to,
            value: permit.permitted.amount,
            valid_after: permit.witness.valid_after,
            valid_before: permit.deadline,
            nonce: B256::from(permit.nonce),
        };
        Self {
            version,
            network,
            asset: permit.permitted.token,
            payer: permit.from,
            pay_to: permit.witness.to,
            amount: permit.permitted.amount,
            valid_before: permit.deadline.saturating_to(),
            authorization,
            signature,
            facilitator_request: None,
            permit2: Some(permit),
        }
    }

    /// True for an `upto` payment: [`Self::amount`] is a maximum.
    pub fn is_upto(&self) -> bool {
        self.permit2.is_some()
    }

    /// The replay-guard key of this proof: (chain, token, payer, nonce). Permit2 nonces are
    /// per owner across all tokens, so an `upto` proof's key names Permit2, not the token.
    pub fn nonce_key(&self) -> NonceKey {
        NonceKey {
            chain_id: self.network.chain_id(),
            asset: if self.is_upto() {
                upto::PERMIT2
            } else {
                self.asset
            },
            from: self.authorization.from,
            nonce: self.authorization.nonce,
        }
    }

    /// The authorization nonce.
    pub fn nonce(&self) -> B256 {
        self.authorization.nonce
    }
}

/// Why a signature could not be recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// Not 65 bytes (smart-wallet signatures need a chain and are not verified in-process).
    #[error("signature is {0} bytes, expected 65")]
    Length(usize),
    /// `v` is not 27 or 28 (USDC rejects 0/1 on-chain).
    #[error("signature v = {0}, expected 27 or 28")]
    V(u8),
    /// `s` is above n/2: malleable, and USDC reverts on it.
    #[error("signature s is not in the lower half of the curve order")]
    HighS,
    /// The curve math failed (r or s out of range, no point).
    #[error("signature does not recover to a public key")]
    Invalid,
}

/// Why a payment was refused. Each variant maps to an x402 reason code ([`Self::reason`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The scheme is not one this verifier handles.
    #[error("unsupported scheme {0:?}")]
    Scheme(String),
    /// Payload and requirements name different networks.
    #[error("network mismatch: paid on {paid}, required {required}")]
    NetworkMismatch {
        /// In the payload.
        paid: Network,
        /// In the requirements.
        required: Network,
    },
    /// The requirements lack EIP-712 `extra.name`/`extra.version`.
    #[error("requirements lack the EIP-712 domain name/version")]
    MissingEip712Domain,
    /// The scheme payload is not a valid exact-EVM payload.
    #[error("invalid exact EVM payload: {0}")]
    InvalidPayload(#[source] serde_json::Error),
    /// `authorization.to` is not `payTo`.
    #[error("authorization pays {paid}, required {required}")]
    RecipientMismatch {
        /// In the authorization.
        paid: Address,
        /// `payTo`.
        required: Address,
    },
    /// `authorization.value` differs from the required amount.
    #[error("authorization value {paid}, required exactly {required}")]
    ValueMismatch {
        /// In the authorization.
        paid: U256,
        /// Required.
        required: U256,
    },
    /// Not yet valid (`validAfter` in the future).
    #[error("authorization not valid before {valid_after}")]
    NotYetValid {
        /// In the authorization.
        valid_after: U256,
    },
    /// Expired, or too close to expiry to settle (`validBefore` < now + headroom).
    #[error("authorization expires at {valid_before}, too soon")]
    Expired {
        /// In the authorization.
        valid_before: U256,
    },
    /// Valid for longer than `maxTimeoutSeconds` allows.
    #[error("authorization valid until {valid_before}, later than the allowed {max}")]
    ValidityTooLong {
        /// In the authorization.
        valid_before: U256,
        /// Latest accepted.
        max: u64,
    },
    /// The signature is malformed or non-canonical.
    #[error("bad signature: {0}")]
    Signature(#[from] SignatureError),
    /// The signature is valid but made by someone other than `from`.
    #[error("signature recovers to {recovered}, expected {expected}")]
    WrongSigner {
        /// Recovered signer.
        recovered: Address,
        /// `authorization.from`.
        expected: Address,
    },
    /// A verifier backend (facilitator, RPC) could not be reached: retry later.
    #[error("verifier backend unavailable")]
    Unavailable {
        /// Suggested wait.
        retry_after: Option<Duration>,
        /// The cause (logged, never sent to clients).
        #[source]
        source: BoxError,
    },
    /// A verifier backend (facilitator) rate-limits us: answered with 429 and `Retry-After`.
    #[error("verifier backend rate-limited")]
    RateLimited {
        /// Suggested wait.
        retry_after: Option<Duration>,
    },
    /// A remote verifier (facilitator) refused the proof. `reason` is its x402 code when this
    /// crate knows it, else `facilitator_rejected`: the facilitator is not trusted to put
    /// arbitrary text into our responses. `detail` keeps its own words, bounded, for logs.
    #[error("facilitator refused the payment: {reason} ({detail})")]
    Rejected {
        /// The x402 reason code sent to the client.
        reason: &'static str,
        /// The facilitator's `invalidReason` and `invalidMessage`, sanitized and truncated.
        detail: String,
    },
    /// Any other refusal, with its reason code.
    #[error("payment refused: {reason}")]
    Other {
        /// The x402 reason code.
        reason: &'static str,
    },
}

impl VerifyError {
    /// The x402 `invalidReason` code for this error (current reference names).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Scheme(_) => "invalid_exact_evm_scheme",
            Self::NetworkMismatch { .. } => "invalid_exact_evm_network_mismatch",
            Self::MissingEip712Domain => "invalid_exact_evm_missing_eip712_domain",
            Self::InvalidPayload(_) => "invalid_payload",
            Self::RecipientMismatch { .. } => "invalid_exact_evm_recipient_mismatch",
            Self::ValueMismatch { .. } => "invalid_exact_evm_authorization_value",
            Self::NotYetValid { .. } => "invalid_exact_evm_payload_authorization_valid_after",
            Self::Expired { .. } | Self::ValidityTooLong { .. } => {
                "invalid_exact_evm_payload_authorization_valid_before"
            }
            Self::Signature(_) | Self::WrongSigner { .. } => "invalid_exact_evm_signature",
            Self::Unavailable { .. } => "unexpected_verify_error",
            Self::RateLimited { .. } => crate::rejection::reason::RATE_LIMITED,
            Self::Rejected { reason, .. } | Self::Other { reason } => reason,
        }
    }

    /// True when the client's proof was malformed (answered with 400, not 402).
    pub fn is_malformed(&self) -> bool {
        matches!(self, Self::InvalidPayload(_))
    }

    /// True when the failure is ours, not the client's: retry later (503, or 429).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::RateLimited { .. })
    }

    /// True when a backend rate-limits us (429).
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Self::RateLimited { .. })
    }

    /// How long to wait before retrying, for retryable errors.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } | Self::RateLimited { retry_after } => {
                *retry_after
            }
            _ => None,
        }
    }
}
