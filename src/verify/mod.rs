//! Verification: does a payment proof pay what a requirement asks?
//!
//! [`Verifier`] is the pluggable step; [`ExactEvmVerifier`] checks `exact` EIP-3009 payments
//! in-process (EIP-712 digest + one secp256k1 public-key recovery, no network), and asks the
//! chain only about smart-wallet signatures when configured to ([`wallet`]). Verification
//! never moves money: settlement is a separate step ([`crate::settle`]).

pub mod exact;
pub mod svm;
pub mod upto;
pub mod wallet;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::{Address, B256, Bytes, U256};
use async_trait::async_trait;

pub use exact::ExactEvmVerifier;
pub use upto::UptoEvmVerifier;

use crate::Network;
use crate::clock::Clock;
use crate::nonce::NonceKey;
use crate::proto::exact::Authorization;
use crate::proto::svm::Pubkey;
use crate::proto::upto::Permit2Authorization;
use crate::proto::{PaymentPayload, X402Version, v2::PaymentRequirements};
use crate::reason::Reason;

pub use crate::store::BoxError;

/// Checks a payment proof against the server's own requirements.
///
/// Implementations must not trust `payload`'s echo of the requirements: `requirements` is
/// the server's copy and the only one to check against. Object safe: layers hold an
/// `Arc<dyn Verifier>`, so implementations use [`async_trait`](crate::async_trait), which
/// this crate re-exports (a plain `async fn verify` does not match the boxed signature).
///
/// # A custom verifier
///
/// Wrap the built-in one and add a rule; refuse with [`VerifyError::Policy`] to answer with
/// your own status (here 403) and code, instead of a 402 challenge:
///
/// ```
/// use std::collections::HashSet;
/// use tower_x402::primitives::{Address, address};
/// use tower_x402::proto::{PaymentPayload, v2::PaymentRequirements};
/// use tower_x402::rejection::Reason;
/// use tower_x402::verify::{EvmVerifier, VerifiedPayment, Verifier, VerifyError};
///
/// /// The built-in checks, then a deny-list of payers.
/// struct DenyList {
///     inner: EvmVerifier,
///     denied: HashSet<Address>,
/// }
///
/// #[tower_x402::async_trait]
/// impl Verifier for DenyList {
///     async fn verify(
///         &self,
///         payload: &PaymentPayload,
///         requirements: &PaymentRequirements,
///     ) -> Result<VerifiedPayment, VerifyError> {
///         let payment = self.inner.verify(payload, requirements).await?;
///         if self.denied.contains(&payment.payer) {
///             return Err(VerifyError::Policy {
///                 status: http::StatusCode::FORBIDDEN,
///                 reason: Reason::custom("payer_denied"),
///                 message: format!("{} may not buy this resource", payment.payer),
///             });
///         }
///         Ok(payment)
///     }
/// }
///
/// let layer = tower_x402::PaymentLayer::builder()
///     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
///     .price("$0.001")
///     .network(tower_x402::Network::BASE_SEPOLIA)
///     .verifier(DenyList {
///         inner: EvmVerifier::new(),
///         denied: HashSet::from([address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8")]),
///     })
///     .build()?;
/// # let _ = layer;
/// # Ok::<_, tower_x402::error::ConfigError>(())
/// ```
///
/// A verifier or a [hook](crate::hooks)? A rule about the *proof* (what it pays, who signed,
/// a scheme of your own) belongs in a verifier: it runs for every candidate option and its
/// refusal is typed. A rule about the *request or the payer* that needs no proof internals
/// (rate limits, quotas, logging) is simpler as a hook (`before_verify`, `after_verify`),
/// which answers with a whole response. Both run before the proof is claimed, so a refusal
/// never spends it.
#[async_trait]
pub trait Verifier: Send + Sync + 'static {
    /// Verifies `payload` against `requirements`, returning the typed proof or why not.
    async fn verify(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError>;

    /// [`Self::verify`]'s answer at once, when this verifier needs no I/O for it (the
    /// in-process ones); `None`, the default, says to await `verify`. The layer asks this
    /// first: an answer here saves the boxed future of `verify`. Must agree with `verify`.
    fn verify_now(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Option<Result<VerifiedPayment, VerifyError>> {
        let _ = (payload, requirements);
        None
    }
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

    fn verify_now(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Option<Result<VerifiedPayment, VerifyError>> {
        (**self).verify_now(payload, requirements)
    }
}

/// The validity window every in-process verifier applies: a clock, the headroom a proof
/// must keep so settlement lands in time, and the client clock skew tolerated.
#[derive(Clone)]
pub(crate) struct Timing {
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) headroom: u64,
    pub(crate) max_skew: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            clock: Arc::new(crate::clock::SystemClock),
            headroom: ExactEvmVerifier::DEFAULT_HEADROOM,
            max_skew: ExactEvmVerifier::DEFAULT_MAX_SKEW,
        }
    }
}

/// The timing builder methods, `Debug` and the `Verifier` impl (through `verify_sync`) of an
/// in-process verifier whose `Timing` is at `$($field).+`; `@builders` leaves out the
/// `Verifier` impl (for verifiers that may ask the chain about smart wallets).
macro_rules! in_process_verifier {
    ($ty:ident, $($field:ident).+) => {
        $crate::verify::in_process_verifier!(@builders $ty, $($field).+);

        #[::async_trait::async_trait]
        impl $crate::verify::Verifier for $ty {
            async fn verify(
                &self,
                payload: &$crate::proto::PaymentPayload,
                requirements: &$crate::proto::v2::PaymentRequirements,
            ) -> Result<$crate::verify::VerifiedPayment, $crate::verify::VerifyError> {
                self.verify_sync(payload, requirements)
            }

            fn verify_now(
                &self,
                payload: &$crate::proto::PaymentPayload,
                requirements: &$crate::proto::v2::PaymentRequirements,
            ) -> Option<Result<$crate::verify::VerifiedPayment, $crate::verify::VerifyError>> {
                Some(self.verify_sync(payload, requirements))
            }
        }
    };
    (@builders $ty:ident, $($field:ident).+) => {
        impl $ty {
            /// Uses `clock` for validity windows (tests inject a
            /// [`FixedClock`](crate::clock::FixedClock)).
            #[must_use]
            pub fn with_clock(mut self, clock: impl $crate::clock::Clock) -> Self {
                self.$($field).+.clock = ::std::sync::Arc::new(clock);
                self
            }

            /// Requires a proof to stay valid `secs` more (default 6), so settlement lands
            /// before it expires.
            #[must_use]
            pub fn with_headroom(mut self, secs: u64) -> Self {
                self.$($field).+.headroom = secs;
                self
            }

            /// Accepts a validity up to `now + maxTimeoutSeconds + secs` (default 60).
            #[must_use]
            pub fn with_max_skew(mut self, secs: u64) -> Self {
                self.$($field).+.max_skew = secs;
                self
            }
        }

        impl ::std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    .field("headroom", &self.$($field).+.headroom)
                    .field("max_skew", &self.$($field).+.max_skew)
                    .finish_non_exhaustive()
            }
        }
    };
}
pub(crate) use in_process_verifier;

/// The layer's default verifier: every scheme this crate verifies in-process on EVM chains,
/// chosen by the requirement's `scheme` (the one place a scheme's verifier is picked):
/// `exact` as [`ExactEvmVerifier`] does, `upto` as [`UptoEvmVerifier`] does, on one clock.
///
/// ```
/// use tower_x402::verify::EvmVerifier;
/// use tower_x402::clock::FixedClock;
/// let verifier = EvmVerifier::new().with_clock(FixedClock::new(1_700_000_000));
/// ```
///
/// Smart-wallet `exact` payments (ERC-1271, ERC-6492) need a chain: see
/// [`Self::with_contract_signatures`].
#[derive(Clone, Default)]
pub struct EvmVerifier {
    exact: ExactEvmVerifier,
}

in_process_verifier!(@builders EvmVerifier, exact.timing);

impl EvmVerifier {
    /// Both schemes on the system clock with the default headroom and skew.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `exact` signatures that do not recover in-process to `authorization.from`
    /// (smart wallets) with `checker`, as
    /// [`ExactEvmVerifier::with_contract_signatures`] does (see there, with an example).
    #[must_use]
    pub fn with_contract_signatures(mut self, checker: impl wallet::ContractSignatures) -> Self {
        self.exact = self.exact.with_contract_signatures(checker);
        self
    }

    /// The ERC-6492 factories whose undeployed wallets may pay, as
    /// [`ExactEvmVerifier::with_eip6492_factories`] (default none).
    #[must_use]
    pub fn with_eip6492_factories(mut self, factories: impl IntoIterator<Item = Address>) -> Self {
        self.exact = self.exact.with_eip6492_factories(factories);
        self
    }

    /// The whole check, synchronously and without the chain: smart-wallet signatures are
    /// refused here ([`Verifier::verify`] asks the chain about them when configured).
    pub fn verify_sync(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        match requirements.scheme.as_str() {
            upto::SCHEME => upto::verify(payload, requirements, &self.exact.timing),
            _ => self.exact.verify_sync(payload, requirements),
        }
    }
}

#[async_trait]
impl Verifier for EvmVerifier {
    async fn verify(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        // `upto` never asks the chain: the synchronous check is the whole of it.
        if requirements.scheme == upto::SCHEME {
            return self.verify_sync(payload, requirements);
        }
        // Unboxed: the trait's own future is the only box on this path.
        self.exact.verify_unboxed(payload, requirements).await
    }

    fn verify_now(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Option<Result<VerifiedPayment, VerifyError>> {
        // Only a smart-wallet checker makes `exact` ask the chain; `upto` never does.
        (requirements.scheme == upto::SCHEME || !self.exact.asks_chain())
            .then(|| self.verify_sync(payload, requirements))
    }
}

/// A payment that passed verification (not yet settled). The layer puts it into the request
/// extensions, so handlers can see who paid what.
///
/// The fields are what every scheme has; [`Self::proof`] is the scheme's own signed object,
/// which its settlement needs. Non-exhaustive so fields can be added: verifiers outside this
/// crate build one with [`VerifiedPayment::exact`] or [`VerifiedPayment::upto`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedPayment {
    /// The protocol version the client spoke.
    pub version: X402Version,
    /// The network paid on.
    pub network: Network,
    /// The token paid in.
    pub asset: Address,
    /// Who paid (proven by the signature).
    pub payer: Address,
    /// Who receives the money.
    pub pay_to: Address,
    /// Atomic units paid; for `upto`, the most that may be charged (the layer settles the
    /// metered usage, see [`crate::upto`]).
    pub amount: U256,
    /// Unix seconds after which the proof is worthless (`validBefore`, a permit's deadline).
    pub valid_before: u64,
    /// The scheme's signed object.
    pub proof: Proof,
    /// How the payer's signature was proven: recovered in-process (a key) or judged by the
    /// chain (a contract wallet, see [`ExactEvmVerifier::with_contract_signatures`]). The
    /// on-chain settler sends a contract wallet's signature as is, through the token's
    /// `bytes signature` overload.
    pub signer: wallet::SignerKind,
    /// Data a verifier hands to its own settler (a facilitator's approved request), not API.
    backend: BackendData,
}

/// The scheme-specific part of a [`VerifiedPayment`]: the signed object its settlement needs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Proof {
    /// `exact` on EVM: an EIP-3009 `transferWithAuthorization`.
    ExactEvm {
        /// The signed authorization.
        authorization: Authorization,
        /// Its signature.
        signature: Bytes,
    },
    /// `upto` on EVM: a Permit2 `permitWitnessTransferFrom` for at most the amount.
    UptoEvm {
        /// The signed permit.
        permit: Permit2Authorization,
        /// Its signature.
        signature: Bytes,
    },
    /// `exact` on Solana: the client's partially signed transaction (one `TransferChecked`),
    /// which the fee payer co-signs to settle.
    ExactSvm(Box<SvmProof>),
}

/// The verified parts of a Solana `exact` transaction ([`Proof::ExactSvm`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SvmProof {
    /// The transaction as the client sent it (the fee payer's signature slot empty).
    pub transaction: Bytes,
    /// The transfer's authority, whose signature was verified.
    pub payer: Pubkey,
    /// The requirement's `payTo` (the owner of the destination token account).
    pub pay_to: Pubkey,
    /// The token mint.
    pub mint: Pubkey,
    /// The fee payer that must co-sign (`extra.feePayer`).
    pub fee_payer: Pubkey,
    /// The payer's 64-byte ed25519 signature.
    pub signature: Bytes,
    /// SHA-256 of the signed message: the claim key. The chain deduplicates by the fee payer's
    /// signature, a function of the message, so two proofs of one message are one payment.
    pub message_hash: B256,
}

impl SvmProof {
    /// The verified parts; for the `svm` verifier (and tests), which checked them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        transaction: Bytes,
        payer: Pubkey,
        pay_to: Pubkey,
        mint: Pubkey,
        fee_payer: Pubkey,
        signature: Bytes,
        message_hash: B256,
    ) -> Self {
        Self {
            transaction,
            payer,
            pay_to,
            mint,
            fee_payer,
            signature,
            message_hash,
        }
    }
}

impl Proof {
    /// The x402 scheme name.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::ExactEvm { .. } | Self::ExactSvm(_) => exact::SCHEME,
            Self::UptoEvm { .. } => upto::SCHEME,
        }
    }

    /// The payer's signature.
    pub fn signature(&self) -> &Bytes {
        match self {
            Self::ExactEvm { signature, .. } | Self::UptoEvm { signature, .. } => signature,
            Self::ExactSvm(p) => &p.signature,
        }
    }

    /// The proof's one-time nonce (EIP-3009 nonce; Permit2 nonce as 32 bytes; a Solana
    /// transaction's message hash).
    pub fn nonce(&self) -> B256 {
        match self {
            Self::ExactEvm { authorization, .. } => authorization.nonce,
            Self::UptoEvm { permit, .. } => B256::from(permit.nonce),
            Self::ExactSvm(p) => p.message_hash,
        }
    }
}

/// Opaque data a verifier attaches for its own settler; ignored by equality and `Debug`.
#[derive(Clone, Default)]
struct BackendData(Option<Arc<dyn Any + Send + Sync>>);

impl PartialEq for BackendData {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for BackendData {}
impl std::fmt::Debug for BackendData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
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
            proof: Proof::ExactEvm {
                authorization,
                signature,
            },
            signer: wallet::SignerKind::Key,
            backend: BackendData::default(),
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
        Self {
            version,
            network,
            asset: permit.permitted.token,
            payer: permit.from,
            pay_to: permit.witness.to,
            amount: permit.permitted.amount,
            valid_before: permit.deadline.saturating_to(),
            proof: Proof::UptoEvm { permit, signature },
            signer: wallet::SignerKind::Key,
            backend: BackendData::default(),
        }
    }

    /// A Solana `exact` payment of `amount` atomic units. The EVM-typed fields `asset`,
    /// `payer` and `pay_to` are zero: the Solana accounts are in [`Self::svm`]. `valid_before`
    /// is when its claim may be forgotten (the blockhash has long expired by then). Only for
    /// a verified transaction.
    pub fn exact_svm(
        version: X402Version,
        network: Network,
        amount: U256,
        valid_before: u64,
        proof: SvmProof,
    ) -> Self {
        Self {
            version,
            network,
            asset: Address::ZERO,
            payer: Address::ZERO,
            pay_to: Address::ZERO,
            amount,
            valid_before,
            proof: Proof::ExactSvm(Box::new(proof)),
            signer: wallet::SignerKind::Key,
            backend: BackendData::default(),
        }
    }

    /// Who paid, on the wire: [`Self::payer`], or a Solana payment's transfer authority.
    pub fn payer_account(&self) -> crate::proto::Account {
        match &self.proof {
            Proof::ExactSvm(p) => p.payer.into(),
            _ => self.payer.into(),
        }
    }

    /// The Solana transaction and accounts of a Solana `exact` payment.
    pub fn svm(&self) -> Option<&SvmProof> {
        match &self.proof {
            Proof::ExactSvm(p) => Some(p),
            _ => None,
        }
    }

    /// The x402 scheme paid with.
    pub fn scheme(&self) -> &'static str {
        self.proof.scheme()
    }

    /// True for an `upto` payment: [`Self::amount`] is a maximum.
    pub fn is_upto(&self) -> bool {
        matches!(self.proof, Proof::UptoEvm { .. })
    }

    /// The EIP-3009 authorization and signature of an `exact` payment.
    pub fn eip3009(&self) -> Option<(&Authorization, &Bytes)> {
        match &self.proof {
            Proof::ExactEvm {
                authorization,
                signature,
            } => Some((authorization, signature)),
            _ => None,
        }
    }

    /// The Permit2 permit and signature of an `upto` payment.
    pub fn permit2(&self) -> Option<(&Permit2Authorization, &Bytes)> {
        match &self.proof {
            Proof::UptoEvm { permit, signature } => Some((permit, signature)),
            _ => None,
        }
    }

    /// The payer's signature.
    pub fn signature(&self) -> &Bytes {
        self.proof.signature()
    }

    /// The replay-guard key of this proof: (chain, token, payer, nonce). Permit2 nonces are
    /// per owner across all tokens, so an `upto` proof's key names Permit2, not the token.
    pub fn nonce_key(&self) -> NonceKey {
        if let Proof::ExactSvm(p) = &self.proof {
            return NonceKey::svm(self.network, p.message_hash);
        }
        NonceKey {
            chain_id: self.network.chain_id(),
            asset: if self.is_upto() {
                upto::PERMIT2
            } else {
                self.asset
            },
            from: self.payer,
            nonce: self.proof.nonce(),
        }
    }

    /// The proof's nonce.
    pub fn nonce(&self) -> B256 {
        self.proof.nonce()
    }

    /// Attaches data for the settler that pairs with this payment's verifier (e.g. the exact
    /// request a remote facilitator approved). A custom verifier/settler pair may use it;
    /// nothing else reads it.
    pub fn with_backend_data<T: Any + Send + Sync>(mut self, data: T) -> Self {
        self.backend = BackendData(Some(Arc::new(data)));
        self
    }

    /// The data attached with [`Self::with_backend_data`], if it is a `T`.
    pub fn backend_data<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.backend.0.as_deref()?.downcast_ref()
    }
}

/// Why a signature could not be recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// Not 65 bytes: not a key's signature (a smart wallet's is checked on the chain when
    /// [`ExactEvmVerifier::with_contract_signatures`] is configured).
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
    /// Longer than [`wallet::MAX_SIGNATURE_BYTES`]: refused before any chain call.
    #[error("signature is {0} bytes, more than a contract wallet may send")]
    TooLong(usize),
    /// Ends in the ERC-6492 suffix but is not `abi.encode(address, bytes, bytes)` before it.
    #[error("malformed ERC-6492 signature")]
    Erc6492,
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
    /// The chain says the signature is not `payer`'s (ERC-1271 `isValidSignature`, or the
    /// ERC-6492 wallet's after its deployment, refused it).
    #[error("the chain refuses {payer}'s contract signature")]
    ContractSignature {
        /// `authorization.from`.
        payer: Address,
    },
    /// An ERC-6492 signature of a wallet to be deployed by a factory that is not allowlisted
    /// ([`ExactEvmVerifier::with_eip6492_factories`]).
    #[error("ERC-6492 factory {factory} is not allowlisted")]
    FactoryNotAllowed {
        /// The factory the signature names.
        factory: Address,
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
        reason: Reason,
        /// The facilitator's `invalidReason` and `invalidMessage`, sanitized and truncated.
        detail: String,
    },
    /// An `upto` permit that does not pay what is asked.
    #[error("upto permit refused: {0}")]
    Upto(#[from] upto::UptoError),
    /// A Solana `exact` transaction that does not pay what is asked, or puts the fee payer
    /// at risk.
    #[error("solana transaction refused: {0}")]
    Svm(#[from] svm::SvmError),
    /// Any other refusal, with its reason code.
    #[error("payment refused: {reason}")]
    Other {
        /// The x402 reason code.
        reason: Reason,
    },
    /// A policy refusal by a custom verifier: answered with its own `status` (e.g. 403) and a
    /// JSON body `{"error": reason, "message": message}`, not with a challenge. For a rule
    /// that depends only on who pays or what was asked (deny-lists, quotas), see also
    /// [hooks](crate::hooks).
    #[error("payment refused by policy: {reason}: {message}")]
    Policy {
        /// The status sent (4xx; anything else is sent as 403).
        status: http::StatusCode,
        /// The code sent, often [`Reason::custom`].
        reason: Reason,
        /// Human-readable, sent to the client.
        message: String,
    },
}

impl VerifyError {
    /// The x402 `invalidReason` code for this error (current reference names).
    pub fn reason(&self) -> Reason {
        match self {
            Self::Scheme(_) => Reason::InvalidExactEvmScheme,
            Self::NetworkMismatch { .. } => Reason::InvalidExactEvmNetworkMismatch,
            Self::MissingEip712Domain => Reason::InvalidExactEvmMissingEip712Domain,
            Self::InvalidPayload(_) => Reason::InvalidPayload,
            Self::RecipientMismatch { .. } => Reason::InvalidExactEvmRecipientMismatch,
            Self::ValueMismatch { .. } => Reason::InvalidExactEvmAuthorizationValue,
            Self::NotYetValid { .. } => Reason::InvalidExactEvmPayloadAuthorizationValidAfter,
            Self::Expired { .. } | Self::ValidityTooLong { .. } => {
                Reason::InvalidExactEvmPayloadAuthorizationValidBefore
            }
            Self::Signature(_) | Self::WrongSigner { .. } | Self::ContractSignature { .. } => {
                Reason::InvalidExactEvmSignature
            }
            Self::FactoryNotAllowed { .. } => Reason::Eip6492FactoryNotAllowed,
            Self::Unavailable { .. } => Reason::UnexpectedVerifyError,
            Self::RateLimited { .. } => Reason::RateLimited,
            Self::Upto(e) => e.reason(),
            Self::Svm(e) => e.reason(),
            Self::Rejected { reason, .. }
            | Self::Other { reason }
            | Self::Policy { reason, .. } => reason.clone(),
        }
    }

    /// True for a custom verifier's policy refusal ([`Self::Policy`]).
    pub fn is_policy(&self) -> bool {
        matches!(self, Self::Policy { .. })
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
