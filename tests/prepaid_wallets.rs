//! Smart-wallet sign-ins on prepaid routes (issue #10): ERC-1271 wallets and ERC-6492
//! counterfactual wallets sign in through the real `PaymentLayer`, their signatures judged by
//! `ProviderSignatures` (one deployless `eth_call` of the ERC-6492 validator) on a local anvil
//! chain (`tests/chain`).
//!
//! The wallet is `tests/chain/contracts/TestWallet.sol` (valid iff `ecrecover(hash, sig)` is
//! its owner), deployed by `TestWalletFactory` (CREATE2), whose runtime code is etched at
//! [`FACTORY`]. A smart wallet cannot sign the EIP-3009 payment of the bundle in these tests,
//! so its credit is granted directly through the shared ledger (`CreditLedger::grant`), as a
//! settled purchase would. Handler runs and chain calls are counted, not only statuses.
//!
//! Needs anvil in `$X402_TEST_DEPS` (from `scripts/install-test-deps.sh`): missing, the chain
//! tests fail under `CI=true` and print a loud SKIPPED elsewhere.
#![cfg(all(feature = "onchain", feature = "test-util"))]

mod chain;
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use alloy_network::TransactionBuilder;
use alloy_primitives::{Address, B256, Bytes, address, hex};
use alloy_provider::{Provider, RootProvider};
use alloy_rpc_types_eth::{BlockId, TransactionRequest};
use alloy_sol_types::{SolCall, sol};
use async_trait::async_trait;
use axum::body::Body;
use chain::{Chain, RELAYER};
use common::siwx::{Runs, declaration, header, personal_sign, signed, unsigned};
use common::*;
use http::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tower::Layer;
use tower_x402::Network;
use tower_x402::clock::FixedClock;
use tower_x402::prepaid::wallets::{ERC6492_VALIDATOR_BYTECODE, Erc6492};
use tower_x402::prepaid::{
    Bundle, ContractSignatureError, ContractSignatures, CreditLedger, Grant, MemoryCreditLedger,
    Prepaid, ProviderSignatures,
};
use tower_x402::test_util::PrivateKeySigner;

sol! {
    function deploy(address owner, bytes32 salt) external returns (address wallet);
    function walletAddress(address owner, bytes32 salt) external view returns (address);
}

/// Where the test factory is etched.
const FACTORY: Address = address!("0x000000000000000000000000000000000000FAC7");
const FACTORY_HEX: &str = include_str!("chain/contracts/TestWalletFactory.runtime.hex");
/// Calls granted to a wallet.
const CALLS: u64 = 5;

// ------------------------------------------------------------------------------------------------
// Harness

/// A checker that counts its calls and can be switched to a dead RPC.
struct Switch {
    up: Option<ProviderSignatures>,
    down: ProviderSignatures,
    broken: AtomicBool,
    calls: AtomicUsize,
}

impl Switch {
    fn new(up: Option<ProviderSignatures>, down: ProviderSignatures) -> Arc<Self> {
        Arc::new(Self {
            broken: AtomicBool::new(up.is_none()),
            up,
            down,
            calls: AtomicUsize::new(0),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl ContractSignatures for Switch {
    async fn is_valid(
        &self,
        chain_id: u64,
        signer: Address,
        hash: B256,
        signature: &Bytes,
    ) -> Result<bool, ContractSignatureError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match &self.up {
            Some(up) if !self.broken.load(Ordering::SeqCst) => {
                up.is_valid(chain_id, signer, hash, signature).await
            }
            _ => self.down.is_valid(chain_id, signer, hash, signature).await,
        }
    }
}

/// `ProviderSignatures` for Base Sepolia at `url`.
fn signatures_at(url: &str, timeout: Duration) -> ProviderSignatures {
    let provider = RootProvider::new_http(url.parse().expect("rpc url"));
    ProviderSignatures::new()
        .with_provider(Network::BASE_SEPOLIA, provider)
        .with_timeout(timeout)
}

/// A prepaid route (bundle `$0.01`) with `ledger`, checking contract signatures with `checker`
/// when given; headers up to 64 KiB.
fn route(
    clock: &FixedClock,
    ledger: &Arc<MemoryCreditLedger>,
    checker: Option<Arc<Switch>>,
    runs: &Runs,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<impl http_body::Body<Data = bytes::Bytes, Error: std::fmt::Debug>>,
    Error = std::convert::Infallible,
> + Clone {
    let mut prepaid = Prepaid::new(Bundle::calls(10).for_price("$0.01"))
        .clock(clock.clone())
        .ledger(ledger.clone());
    if let Some(checker) = checker {
        prepaid = prepaid.contract_signatures(checker);
    }
    let layer = builder(clock)
        .resource_base(BASE)
        // Above the default 8 KiB, so the signature's own bound (8 KiB decoded, 16 KiB of
        // hex) is what refuses the longest ones.
        .max_header_bytes(64 * 1024)
        .prepaid(prepaid)
        .build()
        .expect("valid layer");
    layer.layer(runs.service())
}

/// Grants `who` [`CALLS`] calls, as a settled bundle purchase would (a smart wallet cannot
/// sign the test's EIP-3009 payment).
async fn grant(ledger: &MemoryCreditLedger, who: Address) {
    let grant = Grant {
        calls: Some(CALLS),
        expires_at: None,
    };
    ledger.grant(who, grant, NOW).await.expect("granted");
}

/// A fresh challenge's payload claiming `claimed`, unsigned.
async fn challenge<S, B>(svc: &S, claimed: Address) -> Value
where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: std::fmt::Debug,
{
    let reply = get_with(svc, "/paid", []).await;
    assert_eq!(reply.status, StatusCode::PAYMENT_REQUIRED);
    let decl = declaration(&reply);
    // Smart wallets sign the same EIP-191 message: the chain entries stay `eip191`.
    assert_eq!(decl["supportedChains"][0]["type"], json!("eip191"));
    unsigned(claimed, &decl)
}

fn key(byte: u8) -> PrivateKeySigner {
    PrivateKeySigner::from_bytes(&B256::repeat_byte(byte)).expect("valid key")
}

/// A chain with the wallet factory.
async fn wallet_chain(test: &str) -> Option<Chain> {
    let chain = Chain::start(test).await?;
    chain.set_code(FACTORY, FACTORY_HEX).await;
    Some(chain)
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

/// Deploys `owner`'s wallet for `salt` (a mined transaction) and returns its address.
async fn deploy_wallet(chain: &Chain, owner: Address, salt: B256) -> Address {
    let data = Bytes::from(deployCall { owner, salt }.abi_encode());
    chain.send_as(RELAYER, FACTORY, data).await;
    let wallet = wallet_address(chain, owner, salt).await;
    assert!(
        !code(chain, wallet).await.is_empty(),
        "the wallet is deployed"
    );
    wallet
}

async fn code(chain: &Chain, at: Address) -> Bytes {
    chain.provider().get_code_at(at).await.expect("eth_getCode")
}

// ------------------------------------------------------------------------------------------------
// Tests

/// (a) a deployed ERC-1271 wallet signs in with its owner's signature, (e) that header
/// replayed, (b) a wrong owner, a long junk signature from the wallet (never "long plus has
/// code"), and (c) an ERC-6492 signature of a wallet not deployed yet; EOAs still take the
/// in-process path.
#[tokio::test]
async fn smart_wallets_sign_in_through_the_chain() {
    let Some(chain) = wallet_chain("smart_wallets_sign_in_through_the_chain").await else {
        return;
    };
    let clock = clock();
    let ledger = Arc::new(MemoryCreditLedger::new());
    let checker = Switch::new(
        Some(signatures_at(chain.url(), Duration::from_secs(5))),
        signatures_at(&chain::closed_port_url(), Duration::from_secs(1)),
    );
    let runs = Runs::default();
    let svc = route(&clock, &ledger, Some(checker.clone()), &runs);

    let owner = key(0x11);
    let stranger = key(0x22);
    let wallet = deploy_wallet(&chain, owner.address(), B256::repeat_byte(1)).await;
    grant(&ledger, wallet).await;

    // (a) The owner's EIP-191 signature does not recover to the wallet: the chain decides.
    let p = challenge(&svc, wallet).await;
    let good = header(&signed(p.clone(), &personal_sign(&owner, &p)));
    let ok = get_with(&svc, "/paid", [good.clone()]).await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    assert_eq!(ok.json()["signedIn"], json!(wallet.to_checksum(None)));
    assert_eq!(ok.json()["remaining"], json!(CALLS - 1));
    assert_eq!(runs.get(), 1);
    assert_eq!(checker.calls(), 1);

    // (e) Replayed: refused at the nonce store, before the chain.
    let replay = get_with(&svc, "/paid", [good]).await;
    assert_eq!(
        replay.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_nonce_reused".into())
        )
    );
    assert_eq!(runs.get(), 1);
    assert_eq!(checker.calls(), 1, "a replay never reaches the chain");

    // (b) Another key signs for the wallet: the chain says no.
    let p = challenge(&svc, wallet).await;
    let wrong = get_with(
        &svc,
        "/paid",
        [header(&signed(p.clone(), &personal_sign(&stranger, &p)))],
    )
    .await;
    assert_eq!(
        wrong.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_signature".into())
        )
    );
    assert_eq!(
        wrong.headers.get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"SIWX"[..])
    );
    assert_eq!(checker.calls(), 2);
    // Refused, so its nonce was released: the same message with the owner's signature is
    // still good.
    let retried = get_with(
        &svc,
        "/paid",
        [header(&signed(p.clone(), &personal_sign(&owner, &p)))],
    )
    .await;
    assert_eq!(retried.status, StatusCode::OK, "{:?}", retried.body);
    assert_eq!(runs.get(), 2);

    // A long signature from an address with code is not accepted on its own (P3).
    let p = challenge(&svc, wallet).await;
    let mut junk = personal_sign(&owner, &p);
    junk.push(0);
    let long = get_with(&svc, "/paid", [header(&signed(p, &junk))]).await;
    assert_eq!(
        long.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_signature".into())
        )
    );
    assert_eq!(checker.calls(), 4);

    // (c) ERC-6492: a wallet not deployed yet, with the factory call that would deploy it.
    let owner2 = key(0x33);
    let salt2 = B256::repeat_byte(2);
    let future = wallet_address(&chain, owner2.address(), salt2).await;
    assert!(code(&chain, future).await.is_empty(), "counterfactual");
    grant(&ledger, future).await;
    let wrap = |sig: Vec<u8>| {
        Erc6492 {
            factory: FACTORY,
            factory_calldata: deployCall {
                owner: owner2.address(),
                salt: salt2,
            }
            .abi_encode()
            .into(),
            signature: sig.into(),
        }
        .encode()
    };
    let p = challenge(&svc, future).await;
    let by_stranger = get_with(
        &svc,
        "/paid",
        [header(&signed(
            p.clone(),
            &wrap(personal_sign(&stranger, &p)),
        ))],
    )
    .await;
    assert_eq!(
        by_stranger.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_signature".into())
        )
    );
    let by_owner = get_with(
        &svc,
        "/paid",
        [header(&signed(
            p.clone(),
            &wrap(personal_sign(&owner2, &p)),
        ))],
    )
    .await;
    assert_eq!(by_owner.status, StatusCode::OK, "{:?}", by_owner.body);
    assert_eq!(by_owner.json()["signedIn"], json!(future.to_checksum(None)));
    assert_eq!(by_owner.json()["remaining"], json!(CALLS - 1));
    assert_eq!(runs.get(), 3);
    assert_eq!(checker.calls(), 6);
    // Checked in an `eth_call`: nothing was deployed.
    assert!(
        code(&chain, future).await.is_empty(),
        "still counterfactual"
    );

    // An EOA's own signature is recovered in-process: no chain call.
    let eoa = key(0x44);
    grant(&ledger, eoa.address()).await;
    let p = challenge(&svc, eoa.address()).await;
    let own = get_with(
        &svc,
        "/paid",
        [header(&signed(p.clone(), &personal_sign(&eoa, &p)))],
    )
    .await;
    assert_eq!(own.status, StatusCode::OK, "{:?}", own.body);
    assert_eq!(runs.get(), 4);
    assert_eq!(checker.calls(), 6, "the EOA path never asks the chain");

    // A long signature for an address without code: the validator reverts (ecrecover needs 65
    // bytes), which is a refusal, not an outage.
    let p = challenge(&svc, eoa.address()).await;
    let mut long = personal_sign(&eoa, &p);
    long.push(0);
    let reverted = get_with(&svc, "/paid", [header(&signed(p, &long))]).await;
    assert_eq!(
        reverted.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_signature".into())
        )
    );
    assert_eq!(checker.calls(), 7);
    assert_eq!(runs.get(), 4);
}

/// (d) The RPC is unreachable: 503 with `Retry-After`, the handler does not run and the
/// message's nonce is not spent, so the same header signs in once the chain is back (and
/// only once).
#[tokio::test]
async fn a_chain_outage_answers_503_and_keeps_the_nonce() {
    let Some(chain) = wallet_chain("a_chain_outage_answers_503_and_keeps_the_nonce").await else {
        return;
    };
    let clock = clock();
    let ledger = Arc::new(MemoryCreditLedger::new());
    let checker = Switch::new(
        Some(signatures_at(chain.url(), Duration::from_secs(5))),
        signatures_at(&chain::closed_port_url(), Duration::from_secs(2)),
    );
    checker.broken.store(true, Ordering::SeqCst);
    let runs = Runs::default();
    let svc = route(&clock, &ledger, Some(checker.clone()), &runs);
    let owner = key(0x55);
    let wallet = deploy_wallet(&chain, owner.address(), B256::repeat_byte(3)).await;
    grant(&ledger, wallet).await;

    let p = challenge(&svc, wallet).await;
    let h = header(&signed(p.clone(), &personal_sign(&owner, &p)));
    let down = get_with(&svc, "/paid", [h.clone()]).await;
    assert_eq!(
        down.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert!(down.header("retry-after").is_some(), "{:?}", down.headers);
    assert_eq!(runs.get(), 0);
    assert_eq!(checker.calls(), 1);

    checker.broken.store(false, Ordering::SeqCst);
    let back = get_with(&svc, "/paid", [h.clone()]).await;
    assert_eq!(back.status, StatusCode::OK, "{:?}", back.body);
    assert_eq!(back.json()["remaining"], json!(CALLS - 1), "one call taken");
    assert_eq!(runs.get(), 1);
    let again = get_with(&svc, "/paid", [h]).await;
    assert_eq!(
        again.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_nonce_reused".into())
        )
    );
    assert_eq!(runs.get(), 1);
}

/// An RPC that accepts the connection and never answers: the checker's timeout turns it into
/// a 503 in about that time, not a hung request. No chain needed.
#[tokio::test]
async fn a_silent_rpc_times_out_into_503() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    // Accepts and holds connections without a word.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let clock = clock();
    let ledger = Arc::new(MemoryCreditLedger::new());
    let checker = Switch::new(None, signatures_at(&url, Duration::from_millis(300)));
    let runs = Runs::default();
    let svc = route(&clock, &ledger, Some(checker.clone()), &runs);
    let wallet = address!("0x00000000000000000000000000000000000a11e7");
    grant(&ledger, wallet).await;

    let p = challenge(&svc, wallet).await;
    let started = Instant::now();
    let reply = get_with(
        &svc,
        "/paid",
        [header(&signed(p.clone(), &personal_sign(&key(0x66), &p)))],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        reply.body
    );
    assert!(reply.header("retry-after").is_some());
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(checker.calls(), 1);
    assert_eq!(runs.get(), 0);
    silent.abort();
}

/// Without a checker nothing changes: a signature of another key is 401, any other length
/// is malformed (400), and nothing reaches a chain. With one, the length is bounded before
/// any call and a broken ERC-6492 wrapping is malformed.
#[tokio::test]
async fn signatures_are_bounded_and_eoa_only_without_a_checker() {
    let clock = clock();
    let ledger = Arc::new(MemoryCreditLedger::new());
    let runs = Runs::default();
    let plain = route(&clock, &ledger, None, &runs);
    let wallet = address!("0x00000000000000000000000000000000000a11e7");
    grant(&ledger, wallet).await;
    let owner = key(0x77);

    let p = challenge(&plain, wallet).await;
    let sig = personal_sign(&owner, &p);
    let other_key = get_with(&plain, "/paid", [header(&signed(p.clone(), &sig))]).await;
    assert_eq!(
        other_key.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_signature".into())
        )
    );
    let mut long = sig.clone();
    long.push(0);
    let malformed = get_with(&plain, "/paid", [header(&signed(p.clone(), &long))]).await;
    assert_eq!(
        malformed.outcome(),
        (
            StatusCode::BAD_REQUEST,
            Some("invalid_siwx_malformed_signature".into())
        )
    );

    // A checker on a dead RPC: none of these may reach it.
    let checker = Switch::new(
        None,
        signatures_at(&chain::closed_port_url(), Duration::from_secs(1)),
    );
    let svc = route(&clock, &ledger, Some(checker.clone()), &runs);
    let p = challenge(&svc, wallet).await;
    let too_long = vec![7u8; 8 * 1024 + 1];
    let mut broken = vec![0xffu8; 64];
    broken.extend_from_slice(&hex!(
        "6492649264926492649264926492649264926492649264926492649264926492"
    ));
    for sig in [too_long, broken, Vec::new()] {
        let reply = get_with(&svc, "/paid", [header(&signed(p.clone(), &sig))]).await;
        assert_eq!(
            reply.outcome(),
            (
                StatusCode::BAD_REQUEST,
                Some("invalid_siwx_malformed_signature".into())
            ),
            "{} bytes",
            sig.len()
        );
    }
    assert_eq!(checker.calls(), 0);
    // At the bound it goes to the chain (down here: 503).
    let at_bound = vec![7u8; 8 * 1024];
    let reply = get_with(&svc, "/paid", [header(&signed(p.clone(), &at_bound))]).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        reply.body
    );
    assert_eq!(checker.calls(), 1);
    assert_eq!(runs.get(), 0);
}

/// The validator bytecode is viem's, byte for byte (the crate cites viem 2.57.20
/// `constants/contracts.ts`); the installed viem is the pinned one.
#[test]
fn the_validator_bytecode_is_viems() {
    let Some(deps) = common::process::test_deps(
        "the_validator_bytecode_is_viems",
        &["node/node_modules/viem/constants/contracts.ts"],
    ) else {
        return;
    };
    let viem = deps.join("node/node_modules/viem");
    let source = std::fs::read_to_string(viem.join("constants/contracts.ts")).expect("readable");
    let package = std::fs::read_to_string(viem.join("package.json")).expect("package.json");
    assert!(
        package.contains("\"version\": \"2.57.20\""),
        "viem is pinned at 2.57.20"
    );
    let rest = source
        .split("export const erc6492SignatureValidatorByteCode =")
        .nth(1)
        .expect("viem defines erc6492SignatureValidatorByteCode");
    let literal = rest.split('\'').nth(1).expect("a quoted hex literal");
    let bytes = hex::decode(literal).expect("hex");
    assert_eq!(bytes, ERC6492_VALIDATOR_BYTECODE);
}
