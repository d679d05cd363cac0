//! Smart-wallet `exact` payments in-process (issue #23, item 3): ERC-1271 wallets and
//! ERC-6492 counterfactual wallets pay through the real `PaymentLayer`, their signatures judged
//! by one deployless `eth_call` of the ERC-6492 validator on the settler's RPC
//! (`EvmVerifier::with_contract_signatures(settler)`), and are settled by `OnchainSettler` on a
//! local anvil chain (`tests/chain`): a counterfactual wallet is deployed through its
//! allowlisted factory first, then the transfer carries the inner signature.
//!
//! The wallet is `tests/chain/contracts/TestWallet.sol` (valid iff `ecrecover(hash, sig)` is
//! its owner), deployed by `TestWalletFactory` (CREATE2) etched at [`FACTORY`]. Every payment
//! signs the requirement the server's 402 offered (`PAYMENT-REQUIRED`, `accepts[0]` with its
//! `extra`), as the official clients do. Handler runs, chain checks and balances are counted.
//!
//! Needs anvil in `$X402_TEST_DEPS` (from `scripts/install-test-deps.sh`): missing, the chain
//! tests fail under `CI=true` and print a loud SKIPPED elsewhere. The tests without a chain
//! (EOA payments make no chain call, oversized signatures never reach it) always run.
#![cfg(all(feature = "onchain", feature = "test-util", feature = "axum"))]

mod chain;
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alloy_network::TransactionBuilder;
use alloy_primitives::{Address, B256, Bytes, U256, address};
use alloy_provider::{Provider, RootProvider};
use alloy_rpc_types_eth::{BlockId, TransactionRequest};
use alloy_signer::SignerSync;
use alloy_sol_types::{SolCall, sol};
use async_trait::async_trait;
use axum::Router;
use chain::{Chain, FUNDED, PAY_TO, PAYER3_KEY, RELAYER_KEY};
use common::{Hits, Reply, app, get_with};
use http::{HeaderName, HeaderValue, StatusCode};
use tower_x402::proto::exact::ExactEvmPayload;
use tower_x402::proto::header::PAYMENT_SIGNATURE;
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::settle::onchain::OnchainSettler;
use tower_x402::test_util::{PrivateKeySigner, authorization, encode, sign, v2_json};
use tower_x402::verify::exact::{domain_separator, signing_hash};
use tower_x402::verify::wallet::{
    ContractSignatureError, ContractSignatures, Erc6492, MAX_SIGNATURE_BYTES, ProviderSignatures,
};
use tower_x402::verify::{EvmVerifier, Verifier};
use tower_x402::{Asset, Network, PaymentLayer, PaymentOption};

sol! {
    function deploy(address owner, bytes32 salt) external returns (address wallet);
    function walletAddress(address owner, bytes32 salt) external view returns (address);
}

/// Where the test factory is etched.
const FACTORY: Address = address!("0x000000000000000000000000000000000000FAC7");
const FACTORY_HEX: &str = include_str!("chain/contracts/TestWalletFactory.runtime.hex");
/// `$0.01` in 6-decimal USDC units.
const PRICE_UNITS: u64 = 10_000;

// ------------------------------------------------------------------------------------------------
// Harness

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn key(byte: u8) -> PrivateKeySigner {
    PrivateKeySigner::from_bytes(&B256::repeat_byte(byte)).expect("valid key")
}

fn option() -> PaymentOption {
    PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.01", PAY_TO).expect("valid option")
}

/// A contract-signature checker that counts its calls and can be switched to a dead RPC; it
/// passes on the factories of the checker it wraps (an `OnchainSettler`'s allowlist).
struct Switch<C> {
    up: C,
    down: ProviderSignatures,
    broken: AtomicBool,
    calls: AtomicUsize,
}

impl<C> Switch<C> {
    fn new(up: C) -> Arc<Self> {
        let dead = RootProvider::new_http(chain::closed_port_url().parse().expect("url"));
        Arc::new(Self {
            up,
            down: ProviderSignatures::new()
                .with_provider(Network::BASE_SEPOLIA, dead)
                .with_timeout(Duration::from_secs(2)),
            broken: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl<C: ContractSignatures> ContractSignatures for Switch<C> {
    async fn is_valid(
        &self,
        chain_id: u64,
        signer: Address,
        hash: B256,
        signature: &Bytes,
    ) -> Result<bool, ContractSignatureError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.broken.load(Ordering::SeqCst) {
            self.down.is_valid(chain_id, signer, hash, signature).await
        } else {
            self.up.is_valid(chain_id, signer, hash, signature).await
        }
    }

    fn eip6492_factories(&self) -> &[Address] {
        self.up.eip6492_factories()
    }
}

/// A checker that must never be asked: it counts and answers as a dead RPC would.
struct Never(AtomicUsize);

#[async_trait]
impl ContractSignatures for Never {
    async fn is_valid(
        &self,
        _: u64,
        _: Address,
        _: B256,
        _: &Bytes,
    ) -> Result<bool, ContractSignatureError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err(ContractSignatureError::rpc("no chain in this test"))
    }
}

/// A chain with the wallet factory.
async fn wallet_chain(test: &str) -> Option<Chain> {
    let chain = Chain::start(test).await?;
    chain.set_code(FACTORY, FACTORY_HEX).await;
    Some(chain)
}

async fn settler(chain: &Chain) -> OnchainSettler {
    OnchainSettler::connect(
        chain.url(),
        RELAYER_KEY.parse::<PrivateKeySigner>().expect("key"),
    )
    .await
    .expect("settler")
    .with_poll_interval(Duration::from_millis(20))
}

async fn wallet_address(chain: &Chain, owner: Address, salt: B256) -> Address {
    let tx = TransactionRequest::default()
        .with_to(FACTORY)
        .with_input(walletAddressCall { owner, salt }.abi_encode());
    let out = chain
        .provider()
        .call(tx)
        .block(BlockId::latest())
        .await
        .expect("walletAddress");
    walletAddressCall::abi_decode_returns(&out).expect("an address")
}

/// Deploys `owner`'s wallet for `salt` (a mined transaction from anvil account #1, so the
/// relayer's nonce stays the settler's) and returns its address.
async fn deploy_wallet(chain: &Chain, owner: Address, salt: B256) -> Address {
    let data = Bytes::from(deployCall { owner, salt }.abi_encode());
    chain.send_as(FUNDED[0], FACTORY, data).await;
    let wallet = wallet_address(chain, owner, salt).await;
    assert!(!code(chain, wallet).await.is_empty(), "deployed");
    wallet
}

async fn code(chain: &Chain, at: Address) -> Bytes {
    chain.provider().get_code_at(at).await.expect("eth_getCode")
}

/// The ERC-6492 wrapping of `inner` for `owner`'s wallet at `salt`, deployed by `factory`.
fn wrap(factory: Address, owner: Address, salt: B256, inner: Bytes) -> Bytes {
    Erc6492 {
        factory,
        factory_calldata: deployCall { owner, salt }.abi_encode().into(),
        signature: inner,
    }
    .encode()
}

/// The paid route behind the layer: the verifier asks `checker` about smart wallets, the
/// settler settles on anvil (none: verification only).
fn route(
    checker: Arc<dyn ContractSignatures>,
    settler: Option<OnchainSettler>,
    hits: &Hits,
) -> Router {
    let mut builder = PaymentLayer::builder()
        .accept(option())
        .resource_base(common::BASE)
        // Above the default 8 KiB, so the signature's own bound is what refuses the longest.
        .max_header_bytes(64 * 1024)
        .verifier(EvmVerifier::new().with_contract_signatures(checker));
    if let Some(settler) = settler {
        builder = builder.settler(settler);
    }
    app(hits).route_layer(builder.build().expect("valid layer"))
}

/// What the server offers, from its 402 (`accepts[0]` with `extra`, and the resource).
async fn offered(svc: &Router) -> (PaymentRequirements, tower_x402::proto::v2::ResourceInfo) {
    let reply = get_with(svc, "/paid", []).await;
    assert_eq!(reply.status, StatusCode::PAYMENT_REQUIRED);
    let challenge = reply.challenge();
    let req = challenge.accepts.first().expect("one option").clone();
    (req, challenge.resource)
}

/// A payment from `from` for the server's offer, signed by `sign_digest` over the EIP-712
/// digest (the owner key of a wallet, raw), with `wrapping` applied to the signature.
async fn payment(
    svc: &Router,
    from: Address,
    signer: &PrivateKeySigner,
    wrapping: impl FnOnce(Bytes) -> Bytes,
) -> (ExactEvmPayload, (HeaderName, HeaderValue)) {
    let (req, resource) = offered(svc).await;
    let auth = authorization(&req, from, now());
    let sep = domain_separator(
        req.extra_str("name").expect("name"),
        req.extra_str("version").expect("version"),
        req.network.chain_id(),
        req.asset.evm().unwrap(),
    );
    let sig = signer
        .sign_hash_sync(&signing_hash(sep, &auth))
        .expect("signs");
    let payload = ExactEvmPayload {
        signature: wrapping(Bytes::copy_from_slice(&sig.as_bytes())),
        authorization: auth,
    };
    let header = (
        PAYMENT_SIGNATURE,
        encode(&v2_json(&req, &payload, Some(&resource))),
    );
    (payload, header)
}

/// The 4-byte selector of the transaction that settled `reply`.
async fn settled_selector(chain: &Chain, reply: &Reply) -> [u8; 4] {
    let receipt = reply.receipt();
    assert_eq!(receipt["success"], serde_json::json!(true), "{receipt}");
    let hash: B256 = receipt["transaction"]
        .as_str()
        .expect("a hash")
        .parse()
        .expect("a B256");
    let tx: serde_json::Value = chain
        .provider()
        .raw_request("eth_getTransactionByHash".into(), (hash,))
        .await
        .expect("eth_getTransactionByHash");
    let input: Bytes = tx["input"].as_str().expect("input").parse().expect("hex");
    input[..4].try_into().expect("a selector")
}

/// `transferWithAuthorization(..., bytes signature)`.
const BYTES_OVERLOAD: [u8; 4] = [0xcf, 0x09, 0x29, 0x95];

// ------------------------------------------------------------------------------------------------
// Chain tests

/// A deployed ERC-1271 wallet pays: one chain check, the handler runs once, the transfer goes
/// through the `bytes signature` overload and moves the money; the same header again is a
/// replay (no handler run, no chain check).
#[tokio::test]
async fn a_deployed_erc1271_wallet_pays_and_is_settled() {
    let Some(chain) = wallet_chain("a_deployed_erc1271_wallet_pays_and_is_settled").await else {
        return;
    };
    let settler = settler(&chain).await;
    let checker = Switch::new(settler.clone());
    let hits = Hits::new();
    let svc = route(checker.clone(), Some(settler.clone()), &hits);
    let owner = key(0x11);
    let wallet = deploy_wallet(&chain, owner.address(), B256::repeat_byte(1)).await;
    chain.mint(wallet, U256::from(PRICE_UNITS * 3)).await;
    let before = (chain.balance(wallet).await, chain.balance(PAY_TO).await);

    let (payload, header) = payment(&svc, wallet, &owner, |s| s).await;
    let paid = get_with(&svc, "/paid", [header.clone()]).await;
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    assert_eq!(hits.get(), 1);
    assert_eq!(checker.calls(), 1, "one eth_call judged the signature");
    assert_eq!(settled_selector(&chain, &paid).await, BYTES_OVERLOAD);
    let price = U256::from(PRICE_UNITS);
    assert_eq!(chain.balance(wallet).await, before.0 - price);
    assert_eq!(chain.balance(PAY_TO).await, before.1 + price);
    assert!(
        chain
            .authorization_used(wallet, payload.authorization.nonce)
            .await
    );

    let replay = get_with(&svc, "/paid", [header]).await;
    assert_eq!(
        replay.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_nonce_already_used".into())
        )
    );
    assert_eq!(hits.get(), 1, "a replay never runs the handler");
    assert_eq!(chain.balance(wallet).await, before.0 - price, "paid once");
    assert_eq!(settler.stats().settled, 1);
    eprintln!(
        "smart_wallet: an ERC-1271 transfer used {} gas",
        settler.stats().gas_used
    );
}

/// A counterfactual (ERC-6492) wallet whose factory is allowlisted on the settler pays: the
/// verifier accepts the factory through the settler, the settler deploys the wallet first,
/// then the transfer with the inner signature moves the money.
#[tokio::test]
async fn a_counterfactual_wallet_of_an_allowlisted_factory_is_deployed_and_settled() {
    let Some(chain) =
        wallet_chain("a_counterfactual_wallet_of_an_allowlisted_factory_is_deployed_and_settled")
            .await
    else {
        return;
    };
    let settler = settler(&chain).await.with_eip6492_factories([FACTORY]);
    let checker = Switch::new(settler.clone());
    let hits = Hits::new();
    let svc = route(checker.clone(), Some(settler.clone()), &hits);
    let owner = key(0x22);
    let salt = B256::repeat_byte(2);
    let wallet = wallet_address(&chain, owner.address(), salt).await;
    assert!(code(&chain, wallet).await.is_empty(), "counterfactual");
    // Funds can sit at an address before its code does.
    chain.mint(wallet, U256::from(PRICE_UNITS)).await;
    let to_before = chain.balance(PAY_TO).await;

    let (payload, header) = payment(&svc, wallet, &owner, |s| {
        wrap(FACTORY, owner.address(), salt, s)
    })
    .await;
    let paid = get_with(&svc, "/paid", [header.clone()]).await;
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    assert_eq!(hits.get(), 1);
    assert_eq!(checker.calls(), 1);
    assert!(!code(&chain, wallet).await.is_empty(), "deployed by settle");
    assert_eq!(settled_selector(&chain, &paid).await, BYTES_OVERLOAD);
    assert_eq!(chain.balance(wallet).await, U256::ZERO);
    assert_eq!(
        chain.balance(PAY_TO).await,
        to_before + U256::from(PRICE_UNITS)
    );
    assert!(
        chain
            .authorization_used(wallet, payload.authorization.nonce)
            .await
    );
    // Two transactions from the relayer (deployment, transfer), one settlement.
    let stats = settler.stats();
    assert_eq!((stats.sent, stats.settled), (2, 1), "{stats:?}");
    eprintln!(
        "smart_wallet: deployment + ERC-6492 transfer used {} gas",
        stats.gas_used
    );

    let replay = get_with(&svc, "/paid", [header]).await;
    assert_eq!(replay.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(hits.get(), 1);
}

/// A wrapped signature whose factory is not allowlisted is refused before any chain call and
/// the handler never runs; a verifier that allows it anyway meets the settler's pre-check,
/// which refuses it before the handler too (nothing deployed, nothing moved).
#[tokio::test]
async fn a_factory_not_on_the_allowlist_is_refused() {
    let Some(chain) = wallet_chain("a_factory_not_on_the_allowlist_is_refused").await else {
        return;
    };
    let settler = settler(&chain).await; // no factories
    let checker = Switch::new(settler.clone());
    let hits = Hits::new();
    let svc = route(checker.clone(), Some(settler.clone()), &hits);
    let owner = key(0x33);
    let salt = B256::repeat_byte(3);
    let wallet = wallet_address(&chain, owner.address(), salt).await;
    chain.mint(wallet, U256::from(PRICE_UNITS)).await;

    let (_, header) = payment(&svc, wallet, &owner, |s| {
        wrap(FACTORY, owner.address(), salt, s)
    })
    .await;
    let refused = get_with(&svc, "/paid", [header]).await;
    assert_eq!(
        refused.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("eip6492_factory_not_allowed".into())
        )
    );
    assert_eq!(checker.calls(), 0, "refused before any call");
    assert_eq!(hits.get(), 0);

    // The verifier allowlists the factory, the settler does not: its pre-check refuses.
    let lenient = PaymentLayer::builder()
        .accept(option())
        .resource_base(common::BASE)
        .verifier(
            EvmVerifier::new()
                .with_contract_signatures(checker.clone())
                .with_eip6492_factories([FACTORY]),
        )
        .settler(settler.clone())
        .build()
        .expect("valid layer");
    let svc = app(&hits).route_layer(lenient);
    // Signed against this layer's own challenge (challenges are bound per layer).
    let (_, header) = payment(&svc, wallet, &owner, |s| {
        wrap(FACTORY, owner.address(), salt, s)
    })
    .await;
    let refused = get_with(&svc, "/paid", [header]).await;
    assert_eq!(
        refused.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("eip6492_factory_not_allowed".into())
        )
    );
    assert_eq!(checker.calls(), 1, "the verifier asked the chain");
    assert_eq!(hits.get(), 0, "the handler never ran");
    assert!(code(&chain, wallet).await.is_empty(), "nothing deployed");
    assert_eq!(chain.balance(wallet).await, U256::from(PRICE_UNITS));
    assert_eq!(settler.stats().sent, 0);
}

/// A signature by another key for a deployed wallet, and for a counterfactual one, is refused
/// by the chain with `invalid_exact_evm_signature`; nothing runs or moves.
#[tokio::test]
async fn a_wrong_contract_signature_is_refused() {
    let Some(chain) = wallet_chain("a_wrong_contract_signature_is_refused").await else {
        return;
    };
    let settler = settler(&chain).await.with_eip6492_factories([FACTORY]);
    let checker = Switch::new(settler.clone());
    let hits = Hits::new();
    let svc = route(checker.clone(), Some(settler.clone()), &hits);
    let owner = key(0x44);
    let stranger = key(0x45);
    let wallet = deploy_wallet(&chain, owner.address(), B256::repeat_byte(4)).await;
    chain.mint(wallet, U256::from(PRICE_UNITS)).await;

    let (_, header) = payment(&svc, wallet, &stranger, |s| s).await;
    let refused = get_with(&svc, "/paid", [header]).await;
    assert_eq!(
        refused.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_signature".into())
        )
    );
    assert_eq!(checker.calls(), 1);

    let salt = B256::repeat_byte(5);
    let future = wallet_address(&chain, owner.address(), salt).await;
    let (_, header) = payment(&svc, future, &stranger, |s| {
        wrap(FACTORY, owner.address(), salt, s)
    })
    .await;
    let refused = get_with(&svc, "/paid", [header]).await;
    assert_eq!(
        refused.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_signature".into())
        )
    );
    assert_eq!(checker.calls(), 2);
    assert_eq!(hits.get(), 0);
    assert!(code(&chain, future).await.is_empty(), "nothing deployed");
    assert_eq!(chain.balance(wallet).await, U256::from(PRICE_UNITS));
    assert_eq!(settler.stats().sent, 0);
}

/// The RPC is down while verifying: 503 with `Retry-After`, the handler does not run and the
/// proof is not spent, so the same header pays once the RPC is back (and only once).
#[tokio::test]
async fn rpc_down_answers_503_and_the_same_proof_pays_once_it_is_back() {
    let Some(chain) =
        wallet_chain("rpc_down_answers_503_and_the_same_proof_pays_once_it_is_back").await
    else {
        return;
    };
    let settler = settler(&chain).await;
    let checker = Switch::new(settler.clone());
    let hits = Hits::new();
    let svc = route(checker.clone(), Some(settler.clone()), &hits);
    let owner = key(0x55);
    let wallet = deploy_wallet(&chain, owner.address(), B256::repeat_byte(6)).await;
    chain.mint(wallet, U256::from(PRICE_UNITS)).await;
    let (_, header) = payment(&svc, wallet, &owner, |s| s).await;

    checker.broken.store(true, Ordering::SeqCst);
    let down = get_with(&svc, "/paid", [header.clone()]).await;
    assert_eq!(
        down.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert!(down.header("retry-after").is_some(), "{:?}", down.headers);
    assert_eq!(hits.get(), 0);
    assert_eq!(checker.calls(), 1);

    checker.broken.store(false, Ordering::SeqCst);
    let back = get_with(&svc, "/paid", [header.clone()]).await;
    assert_eq!(back.status, StatusCode::OK, "{:?}", back.body);
    assert_eq!(hits.get(), 1);
    assert_eq!(chain.balance(wallet).await, U256::ZERO, "paid");
    let again = get_with(&svc, "/paid", [header]).await;
    assert_eq!(again.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(hits.get(), 1);
}

/// 16 concurrent copies of one smart-wallet proof on a multi-threaded runtime: each may be
/// verified, one is claimed, the handler runs once and the wallet pays once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_copies_of_a_smart_wallet_proof_run_the_handler_once() {
    let Some(chain) =
        wallet_chain("concurrent_copies_of_a_smart_wallet_proof_run_the_handler_once").await
    else {
        return;
    };
    let settler = settler(&chain).await;
    let checker = Switch::new(settler.clone());
    let hits = Hits::new();
    let svc = route(checker.clone(), Some(settler.clone()), &hits);
    let owner = key(0x66);
    let wallet = deploy_wallet(&chain, owner.address(), B256::repeat_byte(7)).await;
    chain.mint(wallet, U256::from(PRICE_UNITS * 5)).await;
    let (_, header) = payment(&svc, wallet, &owner, |s| s).await;

    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let svc = svc.clone();
            let header = header.clone();
            tokio::spawn(async move { get_with(&svc, "/paid", [header]).await.status })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        let status = task.await.expect("no panic");
        if status == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(hits.get(), 1, "one handler run");
    assert_eq!(
        chain.balance(wallet).await,
        U256::from(PRICE_UNITS * 4),
        "paid once"
    );
    assert_eq!(settler.stats().settled, 1);
}

/// The settler alone, given a counterfactual payment whose factory call reverts (a verifier
/// would have refused it; a race or a custom verifier might not): the pre-check refuses it
/// before the handler, and `settle` answers `smart_wallet_deployment_failed` without sending
/// the transfer. Nothing is deployed, nothing moves.
#[tokio::test]
async fn a_factory_call_that_reverts_is_refused_and_nothing_is_sent() {
    let Some(chain) =
        wallet_chain("a_factory_call_that_reverts_is_refused_and_nothing_is_sent").await
    else {
        return;
    };
    let settler = settler(&chain).await.with_eip6492_factories([FACTORY]);
    let owner = key(0x99);
    let salt = B256::repeat_byte(9);
    let wallet = wallet_address(&chain, owner.address(), salt).await;
    chain.mint(wallet, U256::from(PRICE_UNITS)).await;
    let req = option().requirements().clone();
    let auth = authorization(&req, wallet, now());
    let inner = sign(&owner, &req, &auth);
    let signature = Erc6492 {
        factory: FACTORY,
        // No such function on the factory: the call reverts.
        factory_calldata: Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef]),
        signature: inner,
    }
    .encode();
    let mut payment = tower_x402::VerifiedPayment::exact(
        tower_x402::proto::X402Version::V2,
        Network::BASE_SEPOLIA,
        req.asset.evm().unwrap(),
        auth,
        signature,
    );
    payment.signer = tower_x402::verify::wallet::SignerKind::Contract;

    use tower_x402::settle::{SettleError, Settler};
    match settler.check(&payment).await {
        Err(SettleError::Refused { reason, .. }) => {
            assert_eq!(
                reason, "invalid_exact_evm_signature",
                "the simulation reverts"
            )
        }
        other => panic!("{other:?}"),
    }
    match settler.settle(&payment).await {
        Err(SettleError::Refused {
            reason,
            transaction,
        }) => {
            assert_eq!(reason, "smart_wallet_deployment_failed");
            assert_eq!(transaction, None, "not sent");
        }
        other => panic!("{other:?}"),
    }
    assert!(code(&chain, wallet).await.is_empty());
    assert_eq!(chain.balance(wallet).await, U256::from(PRICE_UNITS));
    assert_eq!(settler.stats().sent, 0);
}

/// A deferred settler batches deployed ERC-1271 wallets' payments like any other (their
/// signatures go through the `bytes signature` overload inside Multicall3), and refuses an
/// ERC-6492 wrapped signature at accept time, before the handler: a batch cannot deploy.
#[tokio::test]
async fn a_deferred_settler_batches_erc1271_wallets_and_refuses_wrapped_signatures() {
    let Some(chain) =
        wallet_chain("a_deferred_settler_batches_erc1271_wallets_and_refuses_wrapped_signatures")
            .await
    else {
        return;
    };
    let onchain = settler(&chain).await.with_eip6492_factories([FACTORY]);
    let dir = std::env::temp_dir().join(format!("tower-x402-smart-wallet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let deferred = tower_x402::settle::deferred::DeferredSettler::builder(onchain.clone())
        .journal(dir.join("x402.journal"))
        .max_batch(8)
        .max_wait(Duration::from_secs(600))
        .start()
        .expect("deferred settler");
    let checker = Switch::new(onchain.clone());
    let hits = Hits::new();
    let layer = PaymentLayer::builder()
        .accept(option())
        .resource_base(common::BASE)
        .verifier(EvmVerifier::new().with_contract_signatures(checker.clone()))
        .settler(deferred.clone())
        .build()
        .expect("valid layer");
    let svc = app(&hits).route_layer(layer);
    let before = chain.balance(PAY_TO).await;

    let mut wallets = Vec::new();
    for (i, byte) in [0x81u8, 0x82].into_iter().enumerate() {
        let owner = key(byte);
        let wallet = deploy_wallet(&chain, owner.address(), B256::repeat_byte(byte)).await;
        chain.mint(wallet, U256::from(PRICE_UNITS)).await;
        let (_, header) = payment(&svc, wallet, &owner, |s| s).await;
        let accepted = get_with(&svc, "/paid", [header]).await;
        assert_eq!(accepted.status, StatusCode::OK, "{:?}", accepted.body);
        assert_eq!(hits.get(), i + 1);
        wallets.push(wallet);
    }

    let owner = key(0x83);
    let salt = B256::repeat_byte(0x83);
    let future = wallet_address(&chain, owner.address(), salt).await;
    chain.mint(future, U256::from(PRICE_UNITS)).await;
    let (_, header) = payment(&svc, future, &owner, |s| {
        wrap(FACTORY, owner.address(), salt, s)
    })
    .await;
    let refused = get_with(&svc, "/paid", [header]).await;
    assert_eq!(
        refused.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_payload_undeployed_smart_wallet".into())
        )
    );
    assert_eq!(hits.get(), 2, "the handler did not run");
    assert_eq!(deferred.pending(), 2);

    deferred.flush();
    tokio::time::timeout(Duration::from_secs(30), deferred.idle())
        .await
        .expect("settled in time");
    for wallet in &wallets {
        assert_eq!(chain.balance(*wallet).await, U256::ZERO, "{wallet} paid");
    }
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(2 * PRICE_UNITS)
    );
    assert_eq!(onchain.stats().settled, 2);
    assert_eq!(onchain.stats().sent, 1, "one batch");
    assert!(code(&chain, future).await.is_empty(), "nothing deployed");
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------------------------------------
// Without a chain

/// A JSON-RPC endpoint that counts the requests it gets and fails each call: what a checker
/// on it sends is counted, whatever it is.
async fn counting_rpc() -> (String, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let stub = Router::new().route(
        "/",
        axum::routing::post(move |body: axum::body::Bytes| {
            counter.fetch_add(1, Ordering::SeqCst);
            let id = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("id").cloned())
                .unwrap_or(serde_json::Value::Null);
            async move {
                axum::Json(serde_json::json!({
                    "jsonrpc": "2.0",
                    "id": id,
                    "error": { "code": -32000, "message": "stub: unavailable" },
                }))
            }
        }),
    );
    let (addr, _server) = common::serve(stub).await;
    (format!("http://{addr}/"), seen)
}

/// An EOA's payment is verified fully in-process: with an `OnchainSettler` as the checker,
/// its RPC gets no request at all (a counting endpoint), through the layer and through the
/// verifier alone; a contract signature through the same checker does reach it.
#[tokio::test]
async fn an_eoa_payment_makes_no_rpc_call_in_verification() {
    let (url, rpc_requests) = counting_rpc().await;
    let checker = OnchainSettler::connect(&url, key(0x01))
        .await
        .expect("settler")
        .with_chain_id(Network::BASE_SEPOLIA.chain_id());
    let hits = Hits::new();
    let svc = route(Arc::new(checker.clone()), None, &hits);
    let eoa: PrivateKeySigner = PAYER3_KEY.parse().expect("key");
    let (_, header) = payment(&svc, eoa.address(), &eoa, |s| s).await;
    let ok = get_with(&svc, "/paid", [header]).await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    assert_eq!(hits.get(), 1);

    let verifier = EvmVerifier::new().with_contract_signatures(checker.clone());
    let req = option().requirements().clone();
    let auth = authorization(&req, eoa.address(), now());
    let payload = ExactEvmPayload {
        signature: sign(&eoa, &req, &auth),
        authorization: auth,
    };
    let wire = tower_x402::proto::PaymentPayload::V2(
        serde_json::from_str(&v2_json(&req, &payload, None).to_string()).expect("a payload"),
    );
    let verified = verifier.verify(&wire, &req).await.expect("verifies");
    assert_eq!(verified.payer, eoa.address());
    assert_eq!(
        verified.signer,
        tower_x402::verify::wallet::SignerKind::Key,
        "recovered in-process"
    );
    assert_eq!(rpc_requests.load(Ordering::SeqCst), 0, "no RPC request");

    // The counter counts: a wallet's signature goes to the same RPC (down: 503).
    let wallet = address!("0x00000000000000000000000000000000000a11e7");
    let (_, header) = payment(&svc, wallet, &eoa, |s| s).await;
    let down = get_with(&svc, "/paid", [header]).await;
    assert_eq!(
        down.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        down.body
    );
    assert_eq!(rpc_requests.load(Ordering::SeqCst), 1, "one eth_call");
    assert_eq!(hits.get(), 1);
}

/// Signatures the chain must never see: longer than `MAX_SIGNATURE_BYTES`, or a broken
/// ERC-6492 wrapping, are refused before any call (handler not run); at the bound the
/// signature goes to the chain (down here: 503). Without a checker, a contract signature is
/// refused in-process as before.
#[tokio::test]
async fn oversized_and_malformed_signatures_are_refused_before_any_call() {
    let never = Arc::new(Never(AtomicUsize::new(0)));
    let hits = Hits::new();
    let svc = route(never.clone(), None, &hits);
    let wallet = address!("0x00000000000000000000000000000000000a11e7");
    let owner = key(0x77);

    let mut broken = vec![0xffu8; 64];
    broken.extend_from_slice(tower_x402::verify::wallet::ERC6492_SUFFIX.as_slice());
    for sig in [vec![7u8; MAX_SIGNATURE_BYTES + 1], broken] {
        let len = sig.len();
        let (_, header) = payment(&svc, wallet, &owner, |_| sig.into()).await;
        let refused = get_with(&svc, "/paid", [header]).await;
        assert_eq!(
            refused.outcome(),
            (
                StatusCode::PAYMENT_REQUIRED,
                Some("invalid_exact_evm_signature".into())
            ),
            "{len} bytes"
        );
    }
    assert_eq!(never.0.load(Ordering::SeqCst), 0, "no call");

    let (_, header) = payment(&svc, wallet, &owner, |_| {
        vec![7u8; MAX_SIGNATURE_BYTES].into()
    })
    .await;
    let at_bound = get_with(&svc, "/paid", [header]).await;
    assert_eq!(at_bound.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(at_bound.header("retry-after").is_some());
    assert_eq!(never.0.load(Ordering::SeqCst), 1);
    assert_eq!(hits.get(), 0);

    // No checker: the owner's signature for the wallet is refused in-process.
    let plain = app(&hits).route_layer(
        PaymentLayer::builder()
            .accept(option())
            .resource_base(common::BASE)
            .build()
            .expect("valid layer"),
    );
    let (_, header) = payment(&plain, wallet, &owner, |s| s).await;
    let refused = get_with(&plain, "/paid", [header]).await;
    assert_eq!(
        refused.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_signature".into())
        )
    );
    assert_eq!(hits.get(), 0);
}
