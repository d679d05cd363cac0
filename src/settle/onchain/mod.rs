//! On-chain settlement with alloy: [`OnchainSettler`] executes the verified EIP-3009
//! authorization itself, from a relayer account you fund with gas money.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use alloy_signer_local::PrivateKeySigner;
//! use tower_x402::settle::onchain::OnchainSettler;
//! use tower_x402::{Network, PaymentLayer};
//! # let pay_to = tower_x402::primitives::Address::repeat_byte(1);
//! let relayer: PrivateKeySigner = std::env::var("RELAYER_KEY")?.parse()?;
//! let settler = OnchainSettler::connect("https://sepolia.base.org", relayer)
//!     .await?
//!     .with_max_fee_per_gas(1_000_000_000); // never pay more than 1 gwei per gas
//! let layer = PaymentLayer::builder()
//!     .pay_to(pay_to)
//!     .price("$0.001")
//!     .network(Network::BASE_SEPOLIA)
//!     .settler(settler)
//!     .build()?;
//! # let _ = layer; Ok(()) }
//! ```
//!
//! # Before the handler: [`check`](Settler::check)
//!
//! One JSON-RPC batch (one HTTP round trip) of `eth_call`s against the latest block:
//! `balanceOf(from)`, `authorizationState(from, nonce)` and, unless
//! [disabled](OnchainSettler::with_simulation), a simulation of the `transferWithAuthorization`
//! from the relayer. The payment is refused (402, the handler does not run) when the nonce is
//! already used or canceled on-chain ([`reason::NONCE_ALREADY_USED`]), when the balance is below
//! the value ([`reason::INSUFFICIENT_FUNDS`]), or when the simulation reverts (the reason of
//! the revert, see below). An RPC error or timeout is [`SettleError::Unavailable`] (503 with
//! `Retry-After`). The token is the payment's `asset` and the payment's network must be the
//! RPC's chain ([`reason::INVALID_NETWORK`] otherwise). Endpoints that refuse JSON-RPC batches
//! can use [`with_batched_check(false)`](OnchainSettler::with_batched_check): the same calls,
//! sent concurrently. The chain id is read once per settler (`eth_chainId`), unless
//! [given](OnchainSettler::with_chain_id).
//!
//! # After the handler: [`settle`](Settler::settle)
//!
//! 1. `eth_estimateGas` of the transfer from the relayer (a simulation: a revert is mapped to a
//!    reason and nothing is sent) and `eth_feeHistory`, concurrently.
//! 2. `transferWithAuthorization(from, to, value, validAfter, validBefore, nonce, v, r, s)`
//!    (selector `0xe3ee160e`) for 65-byte signatures of keys (`v` of 0/1 is normalised to
//!    27/28), the `bytes signature` overload (`0xcf092995`, FiatToken ≥ 2.2) for any other
//!    length and for every signature the verifier had the chain judge
//!    ([`SignerKind::Contract`](crate::verify::wallet::SignerKind::Contract), sent unchanged).
//!    The gas limit is explicit ([`with_gas_limit`](OnchainSettler::with_gas_limit), default
//!    120 000); a transfer estimated above it is refused rather than sent.
//!
//! # Smart wallets
//!
//! An ERC-1271 wallet's signature goes to the token as is (step 2), which asks the wallet.
//! An ERC-6492 wrapped signature (a wallet not deployed yet) names a factory and the call that
//! deploys the wallet; as in the reference facilitator:
//!
//! - [`check`](Settler::check) refuses it unless the factory is allowlisted
//!   ([`with_eip6492_factories`](OnchainSettler::with_eip6492_factories), default none:
//!   [`reason::FACTORY_NOT_ALLOWED`]) and simulates the deployment and the transfer together
//!   (one `eth_call` of Multicall3's `aggregate3`);
//! - [`settle`](Settler::settle) reads the payer's code and, when it has none, sends the factory
//!   call from the relayer first (gas limit [`DEPLOY_GAS_LIMIT`](OnchainSettler::DEPLOY_GAS_LIMIT))
//!   and waits for it: a revert refuses the payment ([`reason::DEPLOYMENT_FAILED`]), an
//!   unknown outcome answers unavailable (no money moved: the retry finds the wallet deployed).
//!   Then the transfer carries the inner signature through the `bytes signature` overload.
//! - a transfer whose signature a contract checks gets a gas limit of at least
//!   [`SMART_WALLET_GAS_LIMIT`](OnchainSettler::SMART_WALLET_GAS_LIMIT) (a passkey wallet's
//!   P-256 check is expensive without a precompile).
//!
//! Batches (the `deferred` feature) carry one transfer per payment and deploy nothing: a
//! deferred settler refuses wrapped signatures before the handler
//! ([`reason::UNDEPLOYED_SMART_WALLET`]); deployed ERC-1271 wallets batch like any payment.
//!
//! The settler is also a [`ContractSignatures`](crate::verify::wallet::ContractSignatures)
//! checker on its own RPC, carrying its factory allowlist: give it to
//! [`EvmVerifier::with_contract_signatures`](crate::verify::EvmVerifier::with_contract_signatures)
//! so that smart wallets are verified on the chain that settles them.
//! 3. EIP-1559 fees: `maxFeePerGas = 2 × next base fee + tip` (tip: median 20th-percentile
//!    reward of the last 5 blocks), clamped to the cap
//!    ([`with_max_fee_per_gas`](OnchainSettler::with_max_fee_per_gas)). When the base fee plus
//!    tip alone is above the cap, nothing is sent and the answer is unavailable (503).
//! 4. The receipt is polled (at once, then with a backoff from 25 ms up to the
//!    [`poll interval`](OnchainSettler::with_poll_interval), default 200 ms) until it
//!    has [`confirmations`](OnchainSettler::with_confirmations) (default 1) or the
//!    [`receipt timeout`](OnchainSettler::with_receipt_timeout) (default 30 s) passes. Status 1
//!    settles ([`Settlement::transaction`] is the hash); status 0 is refused with
//!    [`reason::TRANSACTION_FAILED`] and the hash. A transaction not mined after
//!    [`replace_after`](OnchainSettler::with_replace_after) (default 12 s) is replaced: see
//!    "Stuck transactions".
//!
//! # Reorgs
//!
//! With [`with_confirmations(n)`](OnchainSettler::with_confirmations), n ≥ 2, a receipt is
//! not the answer until the head is n - 1 blocks past its block; the receipt is then read
//! again and must still be in the block it was first seen in. When that block is no longer
//! the chain's (a reorg, a sequencer's unsafe head dropped), the outcome is unknown
//! ([`SettleError::Unknown`] with a [`RolledBack`] source): the transaction may be mined again
//! or dropped. The rollback is counted ([`OnchainStats::rolled_back`]) and raised
//! ([`Alert::ChainReorg`]), and the relayer's cached nonce is dropped (the chain's count went
//! back with the block). A deferred settler reads those payments from the chain before
//! anything is resent, so each settles exactly once or ends failed with the token's reason.
//! With the default of 1, mined is settled: a later reorg goes unseen. On Base the sequencer's
//! blocks are rarely reorged; on an L1, or where a wrong "settled" is costly, use more (each
//! block adds a block time to every settlement; deferred payments answer before it anyway).
//!
//! # Stuck transactions
//!
//! A transaction not mined within [`replace_after`](OnchainSettler::with_replace_after) is
//! replaced: the same nonce and call, both fees at least 12.5 % (plus one wei) above the last
//! ones sent (nodes refuse a smaller bump) or the market's current quote if higher, never
//! above the [fee cap](OnchainSettler::with_max_fee_per_gas) (no room: no replacement, the
//! wait goes on). Then every hash sent for that nonce is watched until one is mined or the
//! receipt timeout passes. A batch's replacements go through its
//! `SendLog` (the `deferred` feature) before broadcast, like the first
//! transaction, so reconciliation knows every hash that could carry its payments; only one
//! of them can be mined (one nonce).
//!
//! Revert texts map like the reference facilitator's: used or canceled →
//! [`reason::NONCE_ALREADY_USED`], expired → [`reason::VALID_BEFORE`], not yet valid →
//! [`reason::VALID_AFTER`], exceeds balance → [`reason::INSUFFICIENT_BALANCE`], invalid
//! signature (FiatToken or ECRecover) → [`reason::SIGNATURE`], anything else →
//! [`reason::TRANSACTION_FAILED`].
//!
//! # Unknown outcomes are never resent
//!
//! A transaction is sent at most once per `settle` call. When the receipt wait times out (Base
//! confirmations have been seen taking 10-28 s), the settler looks once more for the receipt,
//! then reads `authorizationState(from, nonce)`:
//!
//! - used: the money moved (the authorization can only be used with its signed `to` and
//!   `value`), so the payment is settled with the hash that was sent. The one case this gets
//!   wrong is a payer canceling the authorization (`cancelAuthorization`) while our transaction
//!   is pending; then ours reverts and no money moved.
//! - unused: the transaction may still be pending. The answer is
//!   [`SettleError::Unknown`] with the hash, whose source is an [`UnconfirmedTransaction`];
//!   the layer answers 503 `settlement_outcome_unknown` and keeps the proof's nonce reserved (an unknown outcome is never released),
//!   so the same proof cannot buy the resource again and the payer is never charged twice for
//!   it. Reconcile later with [`OnchainSettler::authorization_used`].
//!
//! A send whose own outcome is unknown (transport error or timeout on
//! `eth_sendRawTransaction`) is treated the same way when the node knows the hash, and as
//! unavailable otherwise.
//!
//! # Relayer nonces
//!
//! Settlements share the relayer account. Its nonce is managed by the settler: sign-and-send
//! is serialised by an async mutex (one RPC round trip is held, not the receipt wait), so
//! concurrent settlements get consecutive nonces and reach the node in order. Any failed send
//! drops the cached nonce, which is then re-read from the node's `pending` count, and a send
//! refused because its nonce is taken ("nonce too low": another program used the account;
//! "replacement transaction underpriced": a send whose future was dropped got through) is
//! retried once with a fresh nonce. A
//! transaction stuck in the mempool (e.g. under-priced after a fee spike) blocks the later
//! ones until it is replaced (see "Stuck transactions"): size the fee cap so that inclusion
//! is the norm, and give each relayer account to one settler (clones share it).
//!
//! # Measuring
//!
//! [`OnchainSettler::stats`] counts what was sent, settled, refused and unknown, the gas and
//! fees the relayer paid, and settlement latencies.

#[cfg(feature = "deferred")]
mod batch;
// Payment channels (issue #19): deposits, claims and settle through the relayer.
mod channel;
pub use crate::channel::{ChannelClaim, LocalAuthorizer, ReceiverAuthorizer, claim_digest};
pub use channel::{OnchainChannel, WatchReport};
// The channel manager (issue #19 item 5): rounds of claims, refunds, settles.
mod channel_manager;
#[cfg(feature = "channel-manager")]
#[cfg_attr(docsrs, doc(cfg(feature = "channel-manager")))]
pub use channel_manager::ChannelManagerHandle;
pub use channel_manager::{ChannelManager, ChannelManagerBuilder, RoundReport};
mod relayer;
mod revert;
mod stats;
mod upto;
mod wallet;

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_network::{Ethereum, EthereumWallet, ReceiptResponse, TransactionBuilder};
use alloy_primitives::{Address, B256, Bytes, U256};
use alloy_provider::transport::TransportError;
use alloy_provider::{DynProvider, Provider, RootProvider};
use alloy_rpc_types_eth::{BlockId, BlockNumberOrTag, TransactionReceipt, TransactionRequest};
use alloy_sol_types::{SolCall, sol};
use async_trait::async_trait;

pub use stats::OnchainStats;

use self::relayer::{BeforeSend, Relayer, SendError, with_timeout};
use self::revert::Failure;
use super::{SettleError, Settlement, Settler};
use crate::alert::{Alert, alert};
use crate::proto::exact::Authorization;
use crate::verify::{BoxError, Proof, VerifiedPayment};

/// The `errorReason` codes this settler answers with.
pub mod reason {
    use crate::reason::Reason;

    /// `check`: the payer's balance is below the value.
    pub const INSUFFICIENT_FUNDS: Reason = Reason::InsufficientFunds;
    /// `settle`: the transfer reverted with "transfer amount exceeds balance".
    pub const INSUFFICIENT_BALANCE: Reason = Reason::InvalidExactEvmInsufficientBalance;
    /// The authorization's nonce is used or canceled on-chain.
    pub const NONCE_ALREADY_USED: Reason = crate::reason::NONCE_ALREADY_USED;
    /// The authorization expired (`validBefore` passed).
    pub const VALID_BEFORE: Reason = Reason::InvalidExactEvmPayloadAuthorizationValidBefore;
    /// The authorization is not valid yet (`validAfter` not passed).
    pub const VALID_AFTER: Reason = Reason::InvalidExactEvmPayloadAuthorizationValidAfter;
    /// The token refused the signature.
    pub const SIGNATURE: Reason = Reason::InvalidExactEvmSignature;
    /// Any other revert, or a transaction mined with status 0.
    pub const TRANSACTION_FAILED: Reason = Reason::InvalidExactEvmTransactionFailed;
    /// The payment's network is not the RPC's chain.
    pub const INVALID_NETWORK: Reason = crate::reason::INVALID_NETWORK;
    /// `check`: no contract at the asset's address on this chain (a misconfigured token).
    pub const ASSET_NOT_DEPLOYED: Reason = Reason::AssetNotDeployedContract;
    /// An ERC-6492 signature names a factory this settler may not call
    /// ([`OnchainSettler::with_eip6492_factories`](super::OnchainSettler::with_eip6492_factories)).
    pub const FACTORY_NOT_ALLOWED: Reason = Reason::Eip6492FactoryNotAllowed;
    /// `settle`: the factory call deploying the payer's wallet reverted.
    pub const DEPLOYMENT_FAILED: Reason = Reason::SmartWalletDeploymentFailed;
    /// `check` of a batched (deferred) payment: ERC-6492 signatures of wallets to be deployed
    /// do not go into batches.
    pub const UNDEPLOYED_SMART_WALLET: Reason = Reason::InvalidExactEvmPayloadUndeployedSmartWallet;
}

sol! {
    /// The parts of an EIP-3009 token (Circle's FiatToken v2.2) that settlement uses.
    interface IEip3009 {
        function balanceOf(address account) external view returns (uint256);
        function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
        function transferWithAuthorization(
            address from, address to, uint256 value, uint256 validAfter, uint256 validBefore,
            bytes32 nonce, uint8 v, bytes32 r, bytes32 s
        ) external;
        function transferWithAuthorization(
            address from, address to, uint256 value, uint256 validAfter, uint256 validBefore,
            bytes32 nonce, bytes signature
        ) external;
    }
}

/// Calldata executing `authorization` on its token: the `(v, r, s)` overload for a 65-byte
/// signature (`v` of 0/1 normalised to 27/28), the `bytes signature` overload otherwise. An
/// ERC-6492 wrapped signature is unwrapped: the wallet (deployed by then) checks the inner
/// signature, always through the `bytes signature` overload. Public so that batching settlers
/// (e.g. through Multicall3) build the same calls; [`payment_calldata`] also knows a contract
/// wallet's 65-byte signature.
pub fn transfer_calldata(authorization: &Authorization, signature: &[u8]) -> Bytes {
    let a = authorization;
    let wrapped = crate::verify::wallet::Erc6492::decode(signature).and_then(Result::ok);
    let encoded = match wrapped {
        Some(w) => bytes_calldata(a, w.signature),
        None => plain_calldata(a, signature),
    };
    encoded.into()
}

/// The calldata settling an `exact` payment: [`transfer_calldata`], except that a signature
/// the chain judged ([`SignerKind::Contract`](crate::verify::wallet::SignerKind::Contract))
/// always goes through the `bytes signature` overload unchanged (a wallet's 65 bytes need not
/// be `r ‖ s ‖ v`, so `v` is not normalised). `None` for another scheme.
pub fn payment_calldata(payment: &VerifiedPayment) -> Option<Bytes> {
    let (authorization, signature) = payment.eip3009()?;
    let contract = payment.signer == crate::verify::wallet::SignerKind::Contract;
    if contract && signature.len() == 65 {
        return Some(bytes_calldata(authorization, signature.clone()).into());
    }
    Some(transfer_calldata(authorization, signature))
}

/// [`transfer_calldata`] of a signature that is not ERC-6492 wrapped.
fn plain_calldata(a: &Authorization, signature: &[u8]) -> Vec<u8> {
    match <&[u8; 65]>::try_from(signature) {
        Ok(sig) => {
            let (rs, v) = sig.split_at(64);
            let v = match v[0] {
                v @ (0 | 1) => v + 27,
                v => v,
            };
            IEip3009::transferWithAuthorization_0Call {
                from: a.from,
                to: a.to,
                value: a.value,
                validAfter: a.valid_after,
                validBefore: a.valid_before,
                nonce: a.nonce,
                v,
                r: B256::from_slice(&rs[..32]),
                s: B256::from_slice(&rs[32..]),
            }
            .abi_encode()
        }
        Err(_) => bytes_calldata(a, Bytes::copy_from_slice(signature)),
    }
}

/// The `bytes signature` overload of `transferWithAuthorization`, `signature` as given.
fn bytes_calldata(a: &Authorization, signature: Bytes) -> Vec<u8> {
    IEip3009::transferWithAuthorization_1Call {
        from: a.from,
        to: a.to,
        value: a.value,
        validAfter: a.valid_after,
        validBefore: a.valid_before,
        nonce: a.nonce,
        signature,
    }
    .abi_encode()
}

/// The source of the [`SettleError::Unknown`] returned when a sent transaction was not
/// confirmed in time and its authorization is still unused: the outcome is unknown, and the
/// transaction may still be mined. Downcast the error's source to read the hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("settlement transaction {transaction} not confirmed within {waited:?}: outcome unknown")]
pub struct UnconfirmedTransaction {
    /// The transaction that was sent.
    pub transaction: B256,
    /// How long its receipt was waited for.
    pub waited: Duration,
}

/// The source of a [`SettleError`] when an RPC reply had impossible values (a receipt whose
/// fee overflows `u128` wei, a relayer nonce at its limit): the reply is not trusted, and
/// [`Alert::HostileReply`] is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("hostile RPC reply: {0}")]
pub struct HostileReply(&'static str);

#[derive(Clone, Copy, Debug)]
struct Config {
    gas_limit: u64,
    max_fee_per_gas: u128,
    receipt_timeout: Duration,
    confirmations: u64,
    replace_after: Option<Duration>,
    poll_interval: Duration,
    rpc_timeout: Duration,
    simulate: bool,
    batched_check: bool,
    chain_id: Option<u64>,
    multicall: Address,
}

/// What all clones of a settler share.
#[derive(Debug)]
struct Shared {
    relayer: Relayer,
    chain_id: tokio::sync::OnceCell<u64>,
    stats: stats::Recorder,
}

/// Settles `exact` EIP-3009 payments on-chain from a relayer account. Cheap to clone (clones
/// share the relayer nonce and the stats). See the [module docs](self).
#[derive(Clone)]
pub struct OnchainSettler {
    provider: DynProvider,
    config: Config,
    shared: Arc<Shared>,
    /// ERC-6492 factories the relayer may call to deploy a payer's wallet.
    factories: Arc<Vec<Address>>,
}

impl std::fmt::Debug for OnchainSettler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnchainSettler")
            .field("relayer", &self.shared.relayer.address())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl OnchainSettler {
    /// Default gas limit of a settlement transaction.
    pub const DEFAULT_GAS_LIMIT: u64 = 120_000;
    /// Gas limit of an `upto` settlement (Permit2 through the x402 upto proxy), unless the
    /// configured [gas limit](Self::with_gas_limit) is higher.
    pub const UPTO_GAS_LIMIT: u64 = 200_000;
    /// Default fee cap: 5 gwei per gas.
    pub const DEFAULT_MAX_FEE_PER_GAS: u128 = 5_000_000_000;
    /// Default receipt wait.
    pub const DEFAULT_RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default wait before a pending transaction is replaced with higher fees.
    pub const DEFAULT_REPLACE_AFTER: Duration = Duration::from_secs(12);
    /// Default interval between receipt polls.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
    /// Default limit on each RPC call.
    pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(5);
    /// Gas limit of an `exact` settlement whose signature a contract wallet checks
    /// ([`SignerKind::Contract`](crate::verify::wallet::SignerKind::Contract)), unless the
    /// configured [gas limit](Self::with_gas_limit) is higher.
    pub const SMART_WALLET_GAS_LIMIT: u64 = 400_000;
    /// Gas limit of the transaction deploying a payer's ERC-6492 wallet, unless the configured
    /// [gas limit](Self::with_gas_limit) is higher (smart-wallet factories use 150-350k).
    pub const DEPLOY_GAS_LIMIT: u64 = 600_000;
    /// Multicall3's address, the same on every chain it is deployed to (Base included).
    pub const MULTICALL3: Address =
        alloy_primitives::address!("0xcA11bde05977b3631167028862bE2a173976CA11");

    /// A settler reading and sending through `provider` (any alloy provider on Ethereum-like
    /// networks; its fillers and wallet, if any, are not used) and signing with `relayer`,
    /// which pays the gas. Defaults: gas limit 120 000, fee cap 5 gwei, 1 confirmation, 30 s
    /// receipt timeout polled every 200 ms, 5 s per RPC call, simulation and batching on, the
    /// chain id read from the RPC once.
    pub fn new<P: Provider + 'static>(provider: P, relayer: impl Into<EthereumWallet>) -> Self {
        Self {
            provider: provider.erased(),
            config: Config {
                gas_limit: Self::DEFAULT_GAS_LIMIT,
                max_fee_per_gas: Self::DEFAULT_MAX_FEE_PER_GAS,
                receipt_timeout: Self::DEFAULT_RECEIPT_TIMEOUT,
                confirmations: 1,
                replace_after: Some(Self::DEFAULT_REPLACE_AFTER),
                poll_interval: Self::DEFAULT_POLL_INTERVAL,
                rpc_timeout: Self::DEFAULT_RPC_TIMEOUT,
                simulate: true,
                batched_check: true,
                chain_id: None,
                multicall: Self::MULTICALL3,
            },
            shared: Arc::new(Shared {
                relayer: Relayer::new(relayer.into()),
                chain_id: tokio::sync::OnceCell::new(),
                stats: stats::Recorder::default(),
            }),
            factories: Arc::default(),
        }
    }

    /// A settler on the JSON-RPC endpoint `rpc_url` (`http(s)://`; no request is made yet).
    /// See [`Self::new`] for the defaults.
    ///
    /// # Errors
    /// The URL does not parse or names an unsupported transport.
    pub async fn connect(
        rpc_url: &str,
        relayer: impl Into<EthereumWallet>,
    ) -> Result<Self, TransportError> {
        let provider = RootProvider::<Ethereum>::connect(rpc_url).await?;
        Ok(Self::new(provider, relayer))
    }

    setters! {
        /// The gas limit of each settlement transaction (default 120 000; a FiatToken transfer
        /// uses 60-90k). A transfer estimated above it is refused, not sent.
        pub fn with_gas_limit(gas: u64) => config.gas_limit = gas;

        /// The most the relayer pays per gas, in wei (default 5 gwei). Fees are clamped to it;
        /// when the next base fee plus tip is above it, settlements answer unavailable (503)
        /// instead of sending.
        pub fn with_max_fee_per_gas(wei: u128) => config.max_fee_per_gas = wei;

        /// How long to wait for the receipt (default 30 s). See the module docs for what happens
        /// after.
        pub fn with_receipt_timeout(wait: Duration) => config.receipt_timeout = wait;

        /// Blocks the settlement must be buried under, counting its own (default 1: mined is
        /// settled). With 2 or more, the settler waits until the head is that deep and reads the
        /// receipt again: a transaction no longer in the block it was first seen in (a reorg) is
        /// an unknown outcome, never a settlement (see the module docs, "Reorgs"). Each block
        /// more adds a block time to every settlement's latency.
        pub fn with_confirmations(blocks: u64) => config.confirmations = blocks.max(1);

        /// How long a sent transaction may stay unmined before it is replaced (same nonce, both
        /// fees raised by at least 12.5 %, capped by [`with_max_fee_per_gas`](Self::with_max_fee_per_gas));
        /// again after each such wait, until the receipt timeout. Default 12 s; `None` never
        /// replaces. Every replacement's hash goes through the batch's
        /// `SendLog` (the `deferred` feature) before it is broadcast, like the first.
        pub fn with_replace_after(wait: Option<Duration>) => config.replace_after = wait;

        /// Longest interval between receipt polls (default 200 ms). The first poll is immediate,
        /// the next ones 25 ms, 50 ms, ... apart up to this interval.
        pub fn with_poll_interval(interval: Duration) => config.poll_interval = interval;

        /// Limit on each RPC call (default 5 s); a call over it counts as the RPC being down.
        pub fn with_rpc_timeout(limit: Duration) => config.rpc_timeout = limit;

        /// Whether `check` also simulates the transfer (default on): it catches every revert
        /// before the handler runs, for one more `eth_call` in the same batch.
        pub fn with_simulation(on: bool) => config.simulate = on;

        /// Whether `check` sends its calls as one JSON-RPC batch (default on) or as concurrent
        /// requests, for endpoints that refuse batches.
        pub fn with_batched_check(on: bool) => config.batched_check = on;

        /// The Multicall3 contract batched settlements go through (default [`Self::MULTICALL3`]).
        /// Only the `deferred` feature's batches use it.
        pub fn with_multicall(address: Address) => config.multicall = address;

        /// The ERC-6492 factories the relayer may call to deploy a payer's smart wallet before
        /// its transfer (replaces the list; default none, which refuses every wrapped signature).
        ///
        /// A wrapped signature carries a factory address and call data; settling it sends that
        /// call from the relayer, so only factories you trust may be listed (the reference
        /// facilitator's `eip6492AllowedFactories`): anything else would let a payer make the
        /// relayer call any contract with any data. A payment naming another factory is refused
        /// with [`reason::FACTORY_NOT_ALLOWED`] by [`check`](Settler::check), before the handler.
        /// A verifier given this settler as its checker
        /// ([`EvmVerifier::with_contract_signatures`](crate::verify::EvmVerifier::with_contract_signatures))
        /// accepts the same factories.
        pub fn with_eip6492_factories(factories: impl IntoIterator<Item = Address>)
            => factories = Arc::new(factories.into_iter().collect());

        /// The chain id of the RPC, if known (default: read with `eth_chainId` on first use).
        pub fn with_chain_id(chain_id: u64) => config.chain_id = Some(chain_id);
    }

    /// The relayer's address (fund it with the chain's native coin).
    pub fn relayer(&self) -> Address {
        self.shared.relayer.address()
    }

    /// What this settler (and its clones) did so far.
    pub fn stats(&self) -> OnchainStats {
        self.shared.stats.snapshot()
    }

    /// Whether `nonce` of `authorizer` is used or canceled on the token `asset`: how an
    /// unknown outcome is reconciled.
    ///
    /// # Errors
    /// [`SettleError::Unavailable`] when the RPC fails.
    pub async fn authorization_used(
        &self,
        asset: Address,
        authorizer: Address,
        nonce: B256,
    ) -> Result<bool, SettleError> {
        self.authorization_state(asset, authorizer, nonce)
            .await
            .map_err(Failure::into_settle_error)
    }

    async fn authorization_state(
        &self,
        asset: Address,
        authorizer: Address,
        nonce: B256,
    ) -> Result<bool, Failure> {
        let call = IEip3009::authorizationStateCall { authorizer, nonce };
        let out = with_timeout(
            self.config.rpc_timeout,
            self.provider.call(view(asset, &call)).block(LATEST),
        )
        .await?;
        decode::<IEip3009::authorizationStateCall>(&out)
    }

    /// The RPC's chain id, read once.
    async fn chain_id(&self) -> Result<u64, Failure> {
        if let Some(id) = self.config.chain_id {
            return Ok(id);
        }
        let id = self
            .shared
            .chain_id
            .get_or_try_init(|| with_timeout(self.config.rpc_timeout, self.provider.get_chain_id()))
            .await?;
        Ok(*id)
    }

    /// The chain id, refusing payments on another network.
    async fn ensure_network(&self, payment: &VerifiedPayment) -> Result<u64, Failure> {
        let id = self.chain_id().await?;
        if id != payment.network.chain_id() {
            return Err(Failure::Revert(reason::INVALID_NETWORK));
        }
        Ok(id)
    }

    /// The settlement transaction, without fees, nonce or chain id.
    fn transfer(&self, payment: &VerifiedPayment) -> TransactionRequest {
        let tx = TransactionRequest::default().with_from(self.relayer());
        match &payment.proof {
            // upto: the proxy pulls `amount` (the metered usage, at most the permit's maximum).
            Proof::UptoEvm { permit, signature } => tx
                .with_to(upto::UPTO_PROXY)
                .with_input(upto::settle_calldata(permit, payment.amount, signature)),
            // A Solana proof never gets here: `ensure_network` refused its network first.
            Proof::ExactEvm { .. } | Proof::ExactSvm(_) => tx
                .with_to(payment.asset)
                .with_input(payment_calldata(payment).unwrap_or_default()),
        }
    }

    /// Whether the payment's authorization (EIP-3009) or permit nonce (Permit2) is used.
    async fn proof_used(&self, payment: &VerifiedPayment) -> Result<bool, Failure> {
        let Some((permit, _)) = payment.permit2() else {
            return self
                .authorization_state(payment.asset, payment.payer, payment.nonce())
                .await;
        };
        let out = with_timeout(
            self.config.rpc_timeout,
            self.provider
                .call(view(upto::PERMIT2, &upto::nonce_bitmap_call(permit)))
                .block(LATEST),
        )
        .await?;
        Ok(upto::nonce_used(
            permit,
            decode::<upto::IPermit2::nonceBitmapCall>(&out)?,
        ))
    }

    /// Balance, authorization state and (optionally) the simulation's revert reason, read in
    /// one batch or concurrently. Balance and state are read at the latest block (mined
    /// facts); the simulation runs at the node's default block, like the reference
    /// facilitator's: `eth_call` at `latest` executes with the latest block's timestamp, which
    /// on an idle dev chain (anvil mines only on demand) can be older than `validAfter`,
    /// while anvil's default (`pending`) runs at the current time.
    async fn read_state(&self, payment: &VerifiedPayment) -> Result<State, Failure> {
        let balance_tx = view(
            payment.asset,
            &IEip3009::balanceOfCall {
                account: payment.payer,
            },
        );
        let simulate = self
            .config
            .simulate
            .then(|| match wallet::erc6492(payment) {
                // The wallet may not exist yet: deploy it and transfer, in one call.
                Some(Ok(wrapped)) => self.simulate_deployed(payment, &wrapped),
                _ => self.transfer(payment),
            });
        if let Some((permit, _)) = payment.permit2() {
            let views = [
                balance_tx,
                view(payment.asset, &upto::allowance_call(permit.from)),
                view(upto::PERMIT2, &upto::nonce_bitmap_call(permit)),
            ];
            let (out, revert) = self.read_views(&views, simulate).await?;
            no_code(&out[0])?;
            return Ok(State {
                balance: decode::<IEip3009::balanceOfCall>(&out[0])?,
                allowance: Some(decode::<upto::IErc20Allowance::allowanceCall>(&out[1])?),
                used: upto::nonce_used(permit, decode::<upto::IPermit2::nonceBitmapCall>(&out[2])?),
                revert,
            });
        }
        let state_tx = view(
            payment.asset,
            &IEip3009::authorizationStateCall {
                authorizer: payment.payer,
                nonce: payment.nonce(),
            },
        );
        let (out, revert) = self.read_views(&[balance_tx, state_tx], simulate).await?;
        no_code(&out[0])?;
        Ok(State {
            balance: decode::<IEip3009::balanceOfCall>(&out[0])?,
            allowance: None,
            used: decode::<IEip3009::authorizationStateCall>(&out[1])?,
            revert,
        })
    }

    /// `views` (at most three) at the latest block and (optionally) the simulation's revert
    /// reason, read in one batch or concurrently.
    async fn read_views(
        &self,
        views: &[TransactionRequest],
        simulate: Option<TransactionRequest>,
    ) -> Result<(Vec<Bytes>, Option<crate::reason::Reason>), Failure> {
        let limit = self.config.rpc_timeout;
        let (out, simulated) = if self.config.batched_check {
            let mut batch = alloy_rpc_client::BatchRequest::new(self.provider.client());
            let waiters = views
                .iter()
                .map(|tx| batch.add_call::<_, Bytes>("eth_call", &(tx, LATEST)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(revert::classify)?;
            // No block: the node's default, as in the reference facilitator (see `read_state`).
            let simulated = match &simulate {
                Some(tx) => Some(
                    batch
                        .add_call::<_, Bytes>("eth_call", &(tx,))
                        .map_err(revert::classify)?,
                ),
                None => None,
            };
            with_timeout(limit, batch.send()).await?;
            let simulated = match simulated {
                Some(waiter) => Some(waiter.await),
                None => None,
            };
            let mut out = Vec::with_capacity(waiters.len());
            for waiter in waiters {
                out.push(waiter.await.map_err(revert::classify)?);
            }
            (out, simulated)
        } else {
            let simulation = async {
                match &simulate {
                    Some(tx) => Some(
                        tokio::time::timeout(limit, self.provider.call(tx.clone()).into_future())
                            .await,
                    ),
                    None => None,
                }
            };
            // Three slots, joined without an allocation; `read_state` never asks for more.
            debug_assert!(views.len() <= 3, "read_views reads at most three views");
            let read = |i: usize| async move {
                match views.get(i) {
                    Some(tx) => Some(
                        with_timeout(limit, self.provider.call(tx.clone()).block(LATEST)).await,
                    ),
                    None => None,
                }
            };
            let (a, b, c, simulated) = tokio::join!(read(0), read(1), read(2), simulation);
            let simulated = match simulated {
                Some(Ok(result)) => Some(result),
                Some(Err(elapsed)) => return Err(Failure::rpc(elapsed)),
                None => None,
            };
            let reads = [a, b, c].into_iter().flatten();
            (reads.collect::<Result<Vec<_>, _>>()?, simulated)
        };
        let revert = match simulated {
            None | Some(Ok(_)) => None,
            Some(Err(e)) => match revert::classify(e) {
                Failure::Revert(reason) => Some(reason),
                rpc @ Failure::Rpc { .. } => return Err(rpc),
            },
        };
        Ok((out, revert))
    }

    /// Polls the receipts of `hashes` (one nonce: the first sent and its replacements) until
    /// one has the wanted confirmations, for at most `wait`.
    async fn wait_mined(&self, hashes: &[B256], wait: Duration) -> Waited {
        // Where each hash was first seen mined: (block number, block hash).
        let mut seen: Vec<Option<(u64, B256)>> = vec![None; hashes.len()];
        let poll = async {
            // Quick first polls (25, 50, 100 ms...) up to the interval: a fast chain answers
            // within a few tens of milliseconds, a slow one costs a couple of extra calls.
            let mut delay = FIRST_POLL_DELAY.min(self.config.poll_interval);
            loop {
                for (i, hash) in hashes.iter().enumerate() {
                    match self.poll_once(*hash, &mut seen[i]).await {
                        Poll::Pending => {}
                        Poll::Confirmed(receipt) => return Waited::Confirmed(receipt),
                        Poll::RolledBack(block) => return Waited::RolledBack(*hash, block),
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(self.config.poll_interval);
            }
        };
        tokio::time::timeout(wait, poll)
            .await
            .unwrap_or(Waited::NotYet)
    }

    /// One look at `hash`'s receipt; `seen` is where it was first seen mined.
    async fn poll_once(&self, hash: B256, seen: &mut Option<(u64, B256)>) -> Poll {
        let limit = self.config.rpc_timeout;
        let receipt = match with_timeout(limit, self.provider.get_transaction_receipt(hash)).await {
            Ok(r) => r,
            Err(_) => return Poll::Pending, // the RPC hiccuped: look again
        };
        let mined = receipt
            .as_ref()
            .and_then(|r| Some((r.block_number()?, r.block_hash()?)));
        let (Some(receipt), Some(at)) = (receipt, mined) else {
            // Not mined (or no longer). Once seen mined, its block must still be canonical.
            return match *seen {
                Some((number, block)) if self.block_gone(number, block).await => {
                    Poll::RolledBack(block)
                }
                _ => Poll::Pending,
            };
        };
        if let Some((number, block)) = *seen
            && (number, block) != at
            && self.block_gone(number, block).await
        {
            // Rolled back, then mined again elsewhere: count its confirmations afresh.
            self.rolled_back(hash, block, false);
        }
        *seen = Some(at);
        if self.config.confirmations <= 1 {
            return Poll::Confirmed(Box::new(receipt));
        }
        let Ok(head) = with_timeout(limit, self.provider.get_block_number()).await else {
            return Poll::Pending;
        };
        if head.saturating_sub(at.0).saturating_add(1) < self.config.confirmations {
            return Poll::Pending;
        }
        // Deep enough: the block it is in must still be the chain's block at that height.
        match with_timeout(limit, self.provider.get_transaction_receipt(hash)).await {
            Ok(Some(again))
                if again.block_number() == Some(at.0) && again.block_hash() == Some(at.1) =>
            {
                Poll::Confirmed(Box::new(again))
            }
            Ok(_) if self.block_gone(at.0, at.1).await => Poll::RolledBack(at.1),
            _ => Poll::Pending,
        }
    }

    /// Whether the chain's block at `number` is no longer `block` (a node that lags behind,
    /// or fails to answer, is not a rollback).
    async fn block_gone(&self, number: u64, block: B256) -> bool {
        let limit = self.config.rpc_timeout;
        match with_timeout(
            limit,
            self.provider
                .get_block_by_number(BlockNumberOrTag::Number(number)),
        )
        .await
        {
            Ok(Some(b)) => b.header.hash != block,
            Ok(None) => with_timeout(limit, self.provider.get_block_number())
                .await
                .is_ok_and(|head| head < number),
            Err(_) => false,
        }
    }

    /// Books and raises a rollback of the block holding `transaction`.
    fn rolled_back(&self, transaction: B256, block: B256, unknown: bool) {
        self.shared
            .stats
            .update(|s| s.rolled_back = s.rolled_back.saturating_add(1));
        let what = if unknown {
            "its payments' outcome is unknown and they are read from the chain again"
        } else {
            "it was mined again in another block"
        };
        alert!(
            Alert::ChainReorg,
            "onchain: block {block} holding settlement transaction {transaction} was rolled \
             back; {what}"
        );
    }

    /// Books a mined receipt: settled or refused with its hash.
    fn mined(
        &self,
        receipt: &TransactionReceipt,
        started: Instant,
    ) -> Result<Settlement, SettleError> {
        let hash = receipt.transaction_hash;
        let ok = receipt.status();
        let latency = started.elapsed();
        let Some(fee) = stats::fee(receipt.gas_used, receipt.effective_gas_price) else {
            return Err(SettleError::Unknown {
                transaction: Some(hash),
                retry_after: None,
                source: Box::new(self.hostile_receipt(hash)),
            });
        };
        self.shared.stats.update(|s| {
            s.add_mined(receipt.gas_used, fee);
            if ok {
                s.add_settled(1, latency);
            } else {
                s.refused = s.refused.saturating_add(1);
            }
        });
        if ok {
            Ok(Settlement {
                transaction: Some(hash),
                amount: None,
                ..Default::default()
            })
        } else {
            Err(SettleError::Refused {
                reason: reason::TRANSACTION_FAILED,
                transaction: Some(hash),
            })
        }
    }

    /// Books a failure before anything was sent.
    fn not_sent(&self, failure: Failure) -> SettleError {
        self.shared.stats.update(|s| match failure {
            Failure::Revert(_) => s.refused += 1,
            Failure::Rpc { .. } => s.unavailable += 1,
        });
        failure.into_settle_error()
    }

    /// Books an unknown outcome: `transaction` may still be mined.
    fn unknown(&self, transaction: B256, source: BoxError) -> SettleError {
        self.shared.stats.update(|s| s.unknown += 1);
        SettleError::Unknown {
            transaction: Some(transaction),
            retry_after: None,
            source,
        }
    }

    /// A receipt with impossible values: raised, and its outcome treated as unknown (the
    /// proof stays reserved; a deferred payment is read from the chain again before any
    /// resend).
    fn hostile_receipt(&self, transaction: B256) -> HostileReply {
        let e = HostileReply("a receipt's gas × effective gas price overflows u128 wei");
        alert!(
            Alert::HostileReply,
            cause = &e,
            "onchain: receipt of {transaction} not trusted; its outcome is treated as unknown"
        );
        self.shared
            .stats
            .update(|s| s.unknown = s.unknown.saturating_add(1));
        e
    }

    /// The receipt did not come in time: settled if the authorization is used, unknown if not.
    async fn reconcile(
        &self,
        payment: &VerifiedPayment,
        hash: B256,
        started: Instant,
    ) -> Result<Settlement, SettleError> {
        let limit = self.config.rpc_timeout;
        if let Ok(Some(receipt)) =
            with_timeout(limit, self.provider.get_transaction_receipt(hash)).await
            && receipt.block_number().is_some()
        {
            // Mined, short of the wanted confirmations: its status is the answer.
            return self.mined(&receipt, started);
        }
        match self.proof_used(payment).await {
            Ok(true) => {
                let latency = started.elapsed();
                self.shared.stats.update(|s| s.add_settled(1, latency));
                Ok(Settlement {
                    transaction: Some(hash),
                    amount: None,
                    ..Default::default()
                })
            }
            Ok(false) | Err(_) => Err(self.unknown(
                hash,
                Box::new(UnconfirmedTransaction {
                    transaction: hash,
                    waited: self.config.receipt_timeout,
                }),
            )),
        }
    }
}

impl OnchainSettler {
    /// [`Settler::check`] for a payer who already owes `owed` of the same token in payments
    /// accepted but not settled yet (deferred settlement): the balance must cover both.
    ///
    /// # Errors
    /// As [`Settler::check`]: refused with a reason, or unavailable.
    pub async fn check_owed(
        &self,
        payment: &VerifiedPayment,
        owed: U256,
    ) -> Result<(), SettleError> {
        let checked = async {
            self.ensure_network(payment).await?;
            if let Some((permit, _)) = payment.permit2()
                && permit.witness.facilitator != self.relayer()
            {
                // The upto proxy lets only the signed facilitator settle: this relayer can't.
                return Err(Failure::Revert(upto::reason::FACILITATOR_MISMATCH));
            }
            if let Some(wrapped) = wallet::erc6492(payment) {
                self.allowed(&wrapped?)?;
            }
            let state = self.read_state(payment).await?;
            let needed = max_amount(payment).saturating_add(owed);
            if state.used {
                Err(Failure::Revert(reason::NONCE_ALREADY_USED))
            } else if state.balance < needed {
                Err(Failure::Revert(reason::INSUFFICIENT_FUNDS))
            } else if state.allowance.is_some_and(|a| a < needed) {
                Err(Failure::Revert(upto::reason::ALLOWANCE_REQUIRED))
            } else if let Some(reason) = state.revert {
                Err(Failure::Revert(reason))
            } else {
                Ok(())
            }
        };
        checked.await.map_err(Failure::into_settle_error)
    }

    /// The gas limit of settling `payment`: Permit2 through the proxy, and a wallet's own
    /// signature check (`isValidSignature`: a passkey's P-256 check without a precompile costs
    /// 200-300k), cost more than a bare EIP-3009 transfer.
    fn gas_limit_of(&self, payment: &VerifiedPayment) -> u64 {
        let floor = if payment.is_upto() {
            Self::UPTO_GAS_LIMIT
        } else if payment.signer == crate::verify::wallet::SignerKind::Contract {
            Self::SMART_WALLET_GAS_LIMIT
        } else {
            0
        };
        self.config.gas_limit.max(floor)
    }

    /// Settles one payment with its own `transferWithAuthorization` transaction.
    async fn settle_one(
        &self,
        payment: &VerifiedPayment,
        before: Option<BeforeSend<'_>>,
    ) -> Result<(Settlement, Option<u64>), SettleError> {
        let started = Instant::now();
        let chain_id = self
            .ensure_network(payment)
            .await
            .map_err(|f| self.not_sent(f))?;
        if payment.is_upto() && payment.amount > max_amount(payment) {
            return Err(self.not_sent(Failure::Revert(upto::reason::SETTLEMENT_EXCEEDS_AMOUNT)));
        }
        if let Some(wrapped) = wallet::erc6492(payment) {
            let wrapped = wrapped.map_err(|f| self.not_sent(f))?;
            if before.is_some() {
                // A batch's journal logs one transaction per payment: no deployment first.
                return Err(self.not_sent(Failure::Revert(reason::UNDEPLOYED_SMART_WALLET)));
            }
            self.deploy_wallet(payment, &wrapped, chain_id).await?;
        }
        let per_call = self.gas_limit_of(payment);
        let tx = self.transfer(payment).with_chain_id(chain_id);
        match self.submit(tx, 1, per_call, before).await {
            Err(Submit::NotSent(failure)) => Err(self.not_sent(failure)),
            Err(Submit::Unknown { hash, source }) => Err(self.unknown(hash, source)),
            Ok(Sent::Mined(receipt)) => self
                .mined(&receipt, started)
                .map(|s| (s, Some(receipt.gas_used))),
            Ok(Sent::Unconfirmed(hash)) => self
                .reconcile(payment, hash, started)
                .await
                .map(|s| (s, None)),
            Ok(Sent::RolledBack(r)) => Err(self.unknown(r.transaction, Box::new(r))),
        }
    }

    /// Estimates, prices, signs, sends and waits for `tx` (complete but for gas, fees, nonce
    /// and `from`), which carries `calls` transfers of at most `per_call` gas each. Counts it
    /// as sent.
    async fn submit(
        &self,
        tx: TransactionRequest,
        calls: u64,
        per_call: u64,
        before: Option<BeforeSend<'_>>,
    ) -> Result<Sent, Submit> {
        let limit = self.config.rpc_timeout;
        let relayer = &self.shared.relayer;
        let (estimate, fees) = tokio::join!(
            with_timeout(limit, self.provider.estimate_gas(tx.clone())),
            relayer.fees(&self.provider, self.config.max_fee_per_gas, limit),
        );
        let estimate = estimate.map_err(Submit::NotSent)?;
        let cap = per_call.saturating_mul(calls.max(1));
        if estimate > cap {
            return Err(Submit::NotSent(Failure::Revert(reason::TRANSACTION_FAILED)));
        }
        // One transfer: the configured limit, as always. A batch: the estimate plus an eighth
        // and one transfer's limit (state may move between estimate and inclusion), never
        // above the cap. A block takes a transaction only if its whole limit fits, and a
        // relayer's later nonces wait behind it: a smaller margin packs more batches per block.
        let gas_limit = if calls <= 1 {
            per_call
        } else {
            estimate
                .saturating_add(estimate / 8)
                .saturating_add(per_call)
                .min(cap)
        };
        let mut fees = fees.map_err(Submit::NotSent)?;
        let tx = tx.with_gas_limit(gas_limit);
        let priced = |fees: relayer::Fees| {
            tx.clone()
                .with_max_fee_per_gas(fees.max_fee_per_gas)
                .with_max_priority_fee_per_gas(fees.max_priority_fee_per_gas)
        };
        let (hash, nonce) = match relayer
            .send(&self.provider, priced(fees), limit, before)
            .await
        {
            Ok(sent) => sent,
            Err(SendError::Refused(failure)) => return Err(Submit::NotSent(failure)),
            Err(SendError::Unknown { hash, source }) => {
                // Did it reach the node? Then it may be mined: wait for it like any other.
                // (Not replaced: its nonce is not known for sure.)
                match with_timeout(limit, self.provider.get_transaction_by_hash(hash)).await {
                    Ok(Some(_)) => {
                        self.shared.stats.update(|s| s.sent += 1);
                        return Ok(self.wait_sent(&[hash], self.config.receipt_timeout).await);
                    }
                    _ => return Err(Submit::Unknown { hash, source }),
                }
            }
        };
        self.shared.stats.update(|s| s.sent += 1);
        let deadline = Instant::now() + self.config.receipt_timeout;
        let mut hashes = vec![hash];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = self.config.replace_after.map_or(left, |r| r.min(left));
            match self.wait_sent(&hashes, wait).await {
                Sent::Unconfirmed(_) if !left.is_zero() && wait < left => {}
                sent => return Ok(sent),
            }
            // Not mined in time: replace it with higher fees (same nonce), if the cap allows.
            let quote = relayer
                .fees(&self.provider, self.config.max_fee_per_gas, limit)
                .await
                .ok();
            let Some(higher) = relayer::bumped(fees, quote, self.config.max_fee_per_gas) else {
                continue; // no room under the cap: keep waiting for what was sent
            };
            match relayer
                .replace(&self.provider, priced(higher), nonce, limit, before)
                .await
            {
                Ok(replacement) => {
                    fees = higher;
                    if !hashes.contains(&replacement) {
                        hashes.push(replacement);
                    }
                    self.shared
                        .stats
                        .update(|s| s.replaced = s.replaced.saturating_add(1));
                }
                Err(SendError::Unknown { hash, .. }) => {
                    // It may be in the pool: logged before broadcast, so watch it too.
                    fees = higher;
                    if !hashes.contains(&hash) {
                        hashes.push(hash);
                    }
                }
                // Refused ("nonce too low": one of ours was just mined; underpriced): the
                // hashes sent so far are still watched.
                Err(SendError::Refused(_)) => {}
            }
        }
    }

    /// Waits up to `wait` for one of `hashes` (one nonce) to be mined with the wanted
    /// confirmations. A rollback is booked and raised, and the cached nonce dropped.
    async fn wait_sent(&self, hashes: &[B256], wait: Duration) -> Sent {
        match self.wait_mined(hashes, wait).await {
            Waited::Confirmed(receipt) => Sent::Mined(receipt),
            Waited::NotYet => Sent::Unconfirmed(*hashes.last().unwrap_or(&B256::ZERO)),
            Waited::RolledBack(hash, block) => {
                self.rolled_back(hash, block, true);
                // The chain's nonce went back with the block: a cached one would leave a gap.
                self.shared.relayer.forget_nonce().await;
                Sent::RolledBack(RolledBack {
                    transaction: hash,
                    block,
                })
            }
        }
    }
}

/// What waiting for sent transactions found.
enum Waited {
    /// Mined, with the wanted confirmations.
    Confirmed(Box<TransactionReceipt>),
    /// Seen mined in this block, which is no longer the chain's.
    RolledBack(B256, B256),
    /// None mined in time.
    NotYet,
}

/// One look at one transaction.
enum Poll {
    Pending,
    Confirmed(Box<TransactionReceipt>),
    RolledBack(B256),
}

/// The source of the [`SettleError::Unknown`] returned when a settlement transaction was seen
/// mined and its block was then rolled back (a reorg) before it had the wanted
/// [confirmations](OnchainSettler::with_confirmations): the transaction may be mined again,
/// or dropped. Reconcile before any resend (the deferred worker does, through
/// `BatchSettler::state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the block {block} holding settlement transaction {transaction} was rolled back: outcome unknown"
)]
pub struct RolledBack {
    /// The transaction.
    pub transaction: B256,
    /// The block it was seen in.
    pub block: B256,
}

/// What [`OnchainSettler::check`] reads before the handler runs.
struct State {
    balance: U256,
    /// The payer's ERC-20 allowance to Permit2 (`upto` only).
    allowance: Option<U256>,
    /// The authorization or permit nonce is used on-chain.
    used: bool,
    /// Why the simulation reverted.
    revert: Option<crate::reason::Reason>,
}

/// A transaction that went out.
enum Sent {
    /// With its receipt.
    Mined(Box<TransactionReceipt>),
    /// Not confirmed within the receipt timeout (the last hash sent for its nonce).
    Unconfirmed(B256),
    /// Seen mined, then its block was rolled back.
    RolledBack(RolledBack),
}

/// Why a transaction did not go out, or may have.
enum Submit {
    /// Nothing was sent.
    NotSent(Failure),
    /// The send's outcome is unknown and the node does not know the hash (yet).
    Unknown {
        /// The hash of the signed transaction.
        hash: B256,
        /// Why the send failed.
        source: BoxError,
    },
}

#[async_trait]
impl Settler for OnchainSettler {
    async fn check(&self, payment: &VerifiedPayment) -> Result<(), SettleError> {
        self.check_owed(payment, U256::ZERO).await
    }

    async fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        self.settle_one(payment, None).await.map(|(s, _)| s)
    }
}

/// The first wait between receipt polls; doubled up to the configured interval.
const FIRST_POLL_DELAY: Duration = Duration::from_millis(25);

/// Reads are against the latest block, never `pending` (which some nodes, anvil among them,
/// use when the block is omitted): "used" must mean mined, not merely in a mempool.
const LATEST: BlockId = BlockId::Number(BlockNumberOrTag::Latest);

/// An `eth_call` of a view function.
fn view(token: Address, call: &impl SolCall) -> TransactionRequest {
    TransactionRequest::default()
        .with_to(token)
        .with_input(call.abi_encode())
}

/// A call to an address without code succeeds with no data, where a token's `balanceOf`
/// always returns a word: the asset is not a contract on this chain (the reference's
/// `asset_not_deployed_contract`), refused before the handler and before any transaction.
fn no_code(balance_out: &[u8]) -> Result<(), Failure> {
    if balance_out.is_empty() {
        return Err(Failure::Revert(reason::ASSET_NOT_DEPLOYED));
    }
    Ok(())
}

fn decode<C: SolCall>(out: &[u8]) -> Result<C::Return, Failure> {
    C::abi_decode_returns(out).map_err(Failure::rpc)
}

/// What the payer signed for: an upto permit's maximum (the payment's amount may be the
/// smaller metered usage), else the amount itself.
fn max_amount(payment: &VerifiedPayment) -> U256 {
    payment
        .permit2()
        .map_or(payment.amount, |(permit, _)| permit.permitted.amount)
}

#[cfg(test)]
mod tests {
    use alloy_primitives::{address, b256};

    use super::*;

    fn authorization() -> Authorization {
        Authorization {
            from: address!("0x857b06519E91e3A54538791bDbb0E22373e36b66"),
            to: address!("0x209693Bc6afc0C5328bA36FaF03C514EF312287C"),
            value: U256::from(10_000),
            valid_after: U256::from(1_740_672_089u64),
            valid_before: U256::from(1_740_672_154u64),
            nonce: b256!("0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"),
        }
    }

    #[test]
    fn eoa_signatures_use_the_vrs_overload() {
        let mut sig = [0x11u8; 65];
        sig[64] = 28;
        let data = transfer_calldata(&authorization(), &sig);
        assert_eq!(data[..4], [0xe3, 0xee, 0x16, 0x0e]);
        let call = IEip3009::transferWithAuthorization_0Call::abi_decode(&data).expect("decodes");
        assert_eq!(
            (call.v, call.r, call.s),
            (28, B256::repeat_byte(0x11), B256::repeat_byte(0x11))
        );
        assert_eq!(call.nonce, authorization().nonce);
        // yParity is normalised: USDC only takes 27/28.
        sig[64] = 0;
        let call = IEip3009::transferWithAuthorization_0Call::abi_decode(&transfer_calldata(
            &authorization(),
            &sig,
        ))
        .expect("decodes");
        assert_eq!(call.v, 27);
    }

    #[test]
    fn other_signatures_use_the_bytes_overload() {
        let sig = vec![0x22u8; 130];
        let data = transfer_calldata(&authorization(), &sig);
        assert_eq!(data[..4], [0xcf, 0x09, 0x29, 0x95]);
        let call = IEip3009::transferWithAuthorization_1Call::abi_decode(&data).expect("decodes");
        assert_eq!(call.signature.as_ref(), &sig[..]);
        assert_eq!(call.validBefore, authorization().valid_before);
    }

    #[test]
    fn contract_wallet_signatures_go_unchanged_through_the_bytes_overload() {
        let mut sig = [0x33u8; 65];
        sig[64] = 1; // not a `v`: a wallet's own encoding, never normalised
        let payment = |signer| {
            let mut p = VerifiedPayment::exact(
                crate::proto::X402Version::V2,
                crate::Network::BASE_SEPOLIA,
                Address::repeat_byte(9),
                authorization(),
                Bytes::copy_from_slice(&sig),
            );
            p.signer = signer;
            p
        };
        let contract =
            payment_calldata(&payment(crate::verify::wallet::SignerKind::Contract)).expect("exact");
        assert_eq!(contract[..4], [0xcf, 0x09, 0x29, 0x95]);
        let call =
            IEip3009::transferWithAuthorization_1Call::abi_decode(&contract).expect("decodes");
        assert_eq!(call.signature.as_ref(), &sig[..]);
        // A key's 65 bytes keep the (v, r, s) overload.
        let key =
            payment_calldata(&payment(crate::verify::wallet::SignerKind::Key)).expect("exact");
        assert_eq!(key[..4], [0xe3, 0xee, 0x16, 0x0e]);
    }

    #[test]
    fn erc6492_signatures_are_unwrapped_for_the_bytes_overload() {
        let inner = Bytes::from(vec![0x44u8; 65]);
        let wrapped = crate::verify::wallet::Erc6492 {
            factory: Address::repeat_byte(0xfa),
            factory_calldata: Bytes::from_static(&[1, 2, 3]),
            signature: inner.clone(),
        }
        .encode();
        let data = transfer_calldata(&authorization(), &wrapped);
        assert_eq!(data[..4], [0xcf, 0x09, 0x29, 0x95]);
        let call = IEip3009::transferWithAuthorization_1Call::abi_decode(&data).expect("decodes");
        assert_eq!(call.signature, inner);
    }

    /// A mined receipt as a hostile node could send it: `gasUsed × effectiveGasPrice` is more
    /// wei than `u128` holds.
    #[cfg(feature = "test-util")]
    fn hostile_receipt_json(status: &str) -> TransactionReceipt {
        serde_json::from_value(serde_json::json!({
            "type": "0x2",
            "status": status,
            "cumulativeGasUsed": "0xffffffffffffffff",
            "logs": [],
            "logsBloom": format!("0x{}", "00".repeat(256)),
            "transactionHash": format!("0x{}", "ab".repeat(32)),
            "transactionIndex": "0x0",
            "blockHash": format!("0x{}", "cd".repeat(32)),
            "blockNumber": "0x10",
            "gasUsed": "0xffffffffffffffff",
            "effectiveGasPrice": "0xffffffffffffffffffffffffffffffff",
            "from": format!("0x{}", "11".repeat(20)),
            "to": format!("0x{}", "22".repeat(20)),
            "contractAddress": null
        }))
        .expect("a receipt")
    }

    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn a_receipt_whose_fee_overflows_is_an_unknown_outcome_not_a_panic() {
        let provider = RootProvider::<Ethereum>::connect("http://127.0.0.1:1")
            .await
            .expect("lazy http provider");
        let settler = OnchainSettler::new(provider, crate::test_util::demo_payer());
        let before = crate::alert::count(Alert::HostileReply);
        for status in ["0x1", "0x0"] {
            let receipt = hostile_receipt_json(status);
            match settler.mined(&receipt, Instant::now()) {
                Err(SettleError::Unknown {
                    transaction,
                    source,
                    ..
                }) => {
                    assert_eq!(transaction, Some(receipt.transaction_hash));
                    assert!(source.downcast_ref::<HostileReply>().is_some(), "{source}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(crate::alert::count(Alert::HostileReply) >= before + 2);
        let stats = settler.stats();
        assert_eq!((stats.unknown, stats.settled, stats.refused), (2, 0, 0));
        assert_eq!(
            (stats.gas_used, stats.fees_wei),
            (0, 0),
            "nothing booked from it"
        );
    }
}
