//! Configuration errors, and re-exports of the per-concern error enums.

pub use crate::network::NetworkParseError;
pub use crate::nonce::StoreError;
pub use crate::price::PriceError;
pub use crate::proto::header::HeaderError;
pub use crate::settle::SettleError;
pub use crate::verify::{SignatureError, VerifyError};

/// A [`PaymentLayer`](crate::PaymentLayer) that cannot be built as configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The price does not parse for the asset's decimals.
    #[error(transparent)]
    Price(#[from] PriceError),
    /// A zero price: x402 payments must move some value.
    #[error("price must be greater than zero")]
    ZeroPrice,
    /// No `pay_to` address, or the zero address.
    #[error("pay_to must be a non-zero address")]
    PayTo,
    /// No network/asset for the simple price; or no USDC preset for the network.
    #[error("no asset: call .asset(..) or .network(..) with a network that has a USDC preset")]
    NoAsset,
    /// Neither a price nor payment options nor a pricing function.
    #[error("no payment option configured")]
    NoOptions,
    /// An asset without an EIP-712 name or version: every client and facilitator would fail.
    #[error("asset {0} lacks the EIP-712 name/version")]
    MissingEip712Domain(crate::primitives::Address),
    /// `max_timeout_seconds` of zero.
    #[error("max timeout must be at least one second")]
    ZeroTimeout,
    /// Both protocol versions disabled.
    #[error("at least one protocol version must be enabled")]
    NoVersion,
    /// An `upto` option without the account that settles it.
    #[error("an upto option needs a non-zero facilitator (settling) address")]
    UptoFacilitator,
    /// An `upto` option with [`SettlementMode::BeforeHandler`](crate::settle::SettlementMode):
    /// the amount to settle is known only once the handler has run.
    #[error("upto payments settle after the handler: use SettlementMode::AfterHandler")]
    UptoBeforeHandler,
    /// Builder calls that contradict each other (one would silently undo the other); the
    /// message says which and what to do.
    #[error("contradictory configuration: {0}")]
    Contradictory(&'static str),
    /// Challenges are bound by default with a key of this process, but a store shared
    /// between instances (Redis) says there are several: each would refuse the others' ids.
    #[error(
        "a shared store serves several instances, but challenges are bound with a random key of this process: set the same 32-byte key on every instance with .bind_challenges(ChallengeKeys::from_env()?) (X402_CHALLENGE_KEY, 64 hex digits) or ChallengeKeys::new(key), or opt out with .no_challenge_binding()"
    )]
    ChallengeKeyRequired,
    /// The OS random source failed while making a key.
    #[error("the OS random source failed; cannot make a challenge key")]
    NoRandomness,
    /// A [paywall](crate::paywall) that cannot be built.
    #[cfg(feature = "paywall")]
    #[error(transparent)]
    Paywall(#[from] crate::paywall::PaywallError),
    /// A [prepaid](crate::prepaid) route that cannot be built.
    #[error(transparent)]
    Prepaid(#[from] crate::prepaid::BundleError),
    /// Discovery metadata ([`bazaar`](crate::discovery::Bazaar), service name, tags, icon) or
    /// a [manifest](crate::discovery::Manifest) that cannot be built.
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// A `batch-settlement` option with a zero receiver authorizer or a withdraw delay
    /// outside 15 minutes to 30 days.
    #[error("batch-settlement option: {0}")]
    Channel(#[from] crate::channel::verify::BatchError),
}
