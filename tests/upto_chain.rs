//! The local-chain fixture of the x402 `upto` scheme, proven end to end without the crate: the
//! canonical Permit2 and the x402 upto Permit2 proxy etched on anvil (`tests/chain/mod.rs`), a
//! payer's Permit2 `PermitWitnessTransferFrom` signed in Rust (`tests/common/upto.rs`), and
//! `proxy.settle` sent by the facilitator for less than the signed maximum. The Rust digest and
//! signature are checked against the official `@x402/evm` upto client and viem, and a payload
//! made by that official client settles on the same chain. Without anvil (or the node
//! packages, for the cross-check) the tests print SKIPPED, and fail under `CI=true`.
#![cfg(all(feature = "onchain", feature = "test-util", feature = "axum"))]

mod chain;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256, Bytes, U256, b256};
use alloy_signer_local::PrivateKeySigner;
use alloy_sol_types::{SolCall, SolError, sol};
use serde_json::{Value, json};

use chain::upto::{
    AmountExceedsPermitted, BASE_SEPOLIA_CHAIN_ID, InvalidNonce, InvalidSigner,
    UnauthorizedFacilitator, permit2_domain, settle_calldata, sign_upto_permit, upto_message,
    upto_message_from_json, upto_payload_json, upto_signing_hash,
};
use chain::{
    Chain, FUNDED, MINTED, PAY_TO, PAYER3_KEY, PAYER4_KEY, PERMIT2, RELAYER, TOKEN, UPTO_PROXY,
};

sol! {
    function DOMAIN_SEPARATOR() external view returns (bytes32);
    function PERMIT2() external view returns (address);
    function WITNESS_TYPEHASH() external view returns (bytes32);
}

/// The signed ceiling: 0.05 test USDC.
const MAX: u64 = 50_000;
/// What the server settles: 0.0123 test USDC.
const ACTUAL: u64 = 12_300;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn signer(key: &str) -> PrivateKeySigner {
    key.parse().expect("test key")
}

/// Asserts `result` is a revert whose data starts with `selector`.
fn assert_reverts_with(result: Result<Bytes, Option<Bytes>>, selector: [u8; 4], what: &str) {
    match result {
        Ok(out) => panic!("{what}: expected a revert, the call returned {out}"),
        Err(Some(data)) => assert!(
            data.starts_with(&selector),
            "{what}: reverted with {data}, expected selector 0x{}",
            alloy_primitives::hex::encode(selector)
        ),
        Err(None) => panic!("{what}: reverted without revert data"),
    }
}

#[tokio::test]
async fn upto_permit_settles_the_actual_amount_once_and_only_for_the_facilitator() {
    let Some(chain) = Chain::start("upto_permit_settles_the_actual_amount").await else {
        return;
    };
    let payer = signer(PAYER3_KEY);
    let owner = payer.address();
    assert_eq!(owner, FUNDED[1]);

    // The etched contracts are what the client signs for.
    let separator = chain
        .call_as(
            Address::ZERO,
            PERMIT2,
            DOMAIN_SEPARATORCall {}.abi_encode().into(),
        )
        .await
        .expect("DOMAIN_SEPARATOR");
    assert_eq!(
        B256::from_slice(&separator),
        permit2_domain(BASE_SEPOLIA_CHAIN_ID).separator(),
        "Permit2 must recompute its domain separator for chain 84532 at its canonical address"
    );
    let permit2 = chain
        .call_as(
            Address::ZERO,
            UPTO_PROXY,
            PERMIT2Call {}.abi_encode().into(),
        )
        .await
        .expect("PERMIT2()");
    assert_eq!(
        PERMIT2Call::abi_decode_returns(&permit2).expect("address"),
        PERMIT2
    );
    let typehash = chain
        .call_as(
            Address::ZERO,
            UPTO_PROXY,
            WITNESS_TYPEHASHCall {}.abi_encode().into(),
        )
        .await
        .expect("WITNESS_TYPEHASH()");
    assert_eq!(
        B256::from_slice(&typehash),
        alloy_primitives::keccak256("Witness(address to,address facilitator,uint256 validAfter)")
    );

    chain.approve_permit2(owner).await;
    assert_eq!(chain.allowance(owner, PERMIT2).await, U256::MAX);

    // A nonce in a high bitmap word, bit 0x5a, like the client's random 256-bit nonces.
    let nonce = U256::from_be_bytes(
        b256!("0x8000000000000000000000000000000000000000000000000000000000001f5a").0,
    );
    let message = upto_message(TOKEN, U256::from(MAX), PAY_TO, RELAYER, nonce, now() + 300);
    let signature = sign_upto_permit(&payer, &message, BASE_SEPOLIA_CHAIN_ID);
    assert_eq!(signature.len(), 65);
    assert!(!chain.permit2_nonce_used(owner, nonce).await);

    // Over the signed maximum: refused by the proxy before Permit2 is reached.
    let over = settle_calldata(&message, U256::from(MAX + 1), owner, &signature);
    assert_reverts_with(
        chain.call_as(RELAYER, UPTO_PROXY, over).await,
        AmountExceedsPermitted::SELECTOR,
        "amount > max",
    );
    // A valid settle sent by anyone but witness.facilitator.
    let call = settle_calldata(&message, U256::from(ACTUAL), owner, &signature);
    assert_reverts_with(
        chain.call_as(PAY_TO, UPTO_PROXY, call.clone()).await,
        UnauthorizedFacilitator::SELECTOR,
        "non-facilitator sender",
    );
    // A settle naming another owner: the signature does not recover to them.
    let wrong_owner = settle_calldata(&message, U256::from(ACTUAL), FUNDED[2], &signature);
    assert_reverts_with(
        chain.call_as(RELAYER, UPTO_PROXY, wrong_owner).await,
        InvalidSigner::SELECTOR,
        "wrong owner",
    );
    // The facilitator's call simulates fine.
    chain
        .call_as(RELAYER, UPTO_PROXY, call.clone())
        .await
        .unwrap_or_else(|revert| panic!("settle simulation reverted: {revert:?}"));
    assert!(
        !chain.permit2_nonce_used(owner, nonce).await,
        "eth_call must not consume the nonce"
    );

    let (payer_before, pay_to_before) = (chain.balance(owner).await, chain.balance(PAY_TO).await);
    assert_eq!(payer_before, U256::from(MINTED));
    chain.send_as(RELAYER, UPTO_PROXY, call.clone()).await;
    assert_eq!(
        chain.balance(PAY_TO).await,
        pay_to_before + U256::from(ACTUAL)
    );
    assert_eq!(
        chain.balance(owner).await,
        payer_before - U256::from(ACTUAL)
    );
    assert!(chain.permit2_nonce_used(owner, nonce).await);
    assert!(
        !chain.permit2_nonce_used(owner, nonce + U256::from(1)).await,
        "only the permit's own bit is set"
    );

    // The same permit again, even for a different amount: the nonce is spent.
    assert_reverts_with(
        chain.call_as(RELAYER, UPTO_PROXY, call).await,
        InvalidNonce::SELECTOR,
        "second settle of the same permit",
    );
    let again = settle_calldata(&message, U256::from(1), owner, &signature);
    assert_reverts_with(
        chain.call_as(RELAYER, UPTO_PROXY, again).await,
        InvalidNonce::SELECTOR,
        "second settle, other amount",
    );
    assert_eq!(
        chain.balance(owner).await,
        payer_before - U256::from(ACTUAL)
    );
}

fn deps(test: &str) -> Option<PathBuf> {
    chain::process::test_deps(test, &["node/node_modules/@x402/evm/package.json"])
}

/// Runs `tests/chain/upto-sign.mjs`: the official client's payload for `requirements` with
/// `key`, viem's digest of it and viem's own signature.
fn official_upto_payload(deps: &Path, key: &str, requirements: &Value) -> Value {
    let mut cmd = Command::new("node");
    cmd.arg(chain::process::repo().join("tests/chain/upto-sign.mjs"))
        .arg(key)
        .arg(requirements.to_string())
        .env("X402_TEST_DEPS", deps);
    chain::process::run_json(&mut cmd, Duration::from_secs(60), String::new)
}

#[tokio::test]
async fn rust_signing_matches_the_official_client_and_its_payload_settles() {
    let test = "rust_signing_matches_the_official_client";
    let Some(deps) = deps(test) else { return };
    let Some(chain) = Chain::start(test).await else {
        return;
    };
    let payer = signer(PAYER4_KEY);
    let owner = payer.address();
    let requirements = json!({
        "scheme": "upto",
        "network": "eip155:84532",
        "asset": TOKEN.to_checksum(None),
        "amount": MAX.to_string(),
        "payTo": PAY_TO.to_checksum(None),
        "maxTimeoutSeconds": 300,
        "extra": { "facilitatorAddress": RELAYER.to_checksum(None), "name": "USDC", "version": "2" },
    });
    let official = official_upto_payload(&deps, PAYER4_KEY, &requirements);
    let payload = &official["payload"]["payload"];
    let (from, message) =
        upto_message_from_json(&payload["permit2Authorization"]).expect("permit2Authorization");
    assert_eq!(from, owner);
    // What the official client chose is what upto_message builds.
    let deadline: u64 = message.deadline.to::<u64>();
    assert_eq!(
        message,
        upto_message(
            TOKEN,
            U256::from(MAX),
            PAY_TO,
            RELAYER,
            message.nonce,
            deadline
        )
    );
    assert!(deadline > now() && deadline <= now() + 300);

    let digest = upto_signing_hash(&message, BASE_SEPOLIA_CHAIN_ID);
    assert_eq!(
        digest.to_string(),
        official["digest"].as_str().expect("digest")
    );
    let ours = sign_upto_permit(&payer, &message, BASE_SEPOLIA_CHAIN_ID);
    assert_eq!(
        ours.to_string(),
        official["viemSignature"].as_str().expect("viem signature")
    );
    assert_eq!(
        ours.to_string(),
        payload["signature"].as_str().expect("signature")
    );
    // Our payload JSON is the official client's, field for field.
    assert_eq!(&upto_payload_json(owner, &message, &ours), payload);
    assert_eq!(official["payload"]["x402Version"], 2);
    assert!(
        official["payload"].get("extensions").is_none(),
        "no extension without server declaration"
    );

    // And the official payload settles through the fixture.
    chain.approve_permit2(owner).await;
    let signature: Bytes = payload["signature"]
        .as_str()
        .expect("signature")
        .parse()
        .expect("hex");
    let before = chain.balance(owner).await;
    chain
        .send_as(
            RELAYER,
            UPTO_PROXY,
            settle_calldata(&message, U256::from(ACTUAL), owner, &signature),
        )
        .await;
    assert_eq!(chain.balance(owner).await, before - U256::from(ACTUAL));
    assert!(chain.permit2_nonce_used(owner, message.nonce).await);
}

// ------------------------------------------------------------------------------------------------
// The layer on the chain: `PaymentOption::upto` + `OnchainSettler`, paid by the official client.

mod layer {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use alloy_provider::Provider as _;
    use axum::Router;
    use axum::routing::get;
    use tower::ServiceExt as _;
    use tower_x402::settle::onchain::OnchainSettler;
    use tower_x402::test_util::{pay_upto, upto_payload};
    use tower_x402::upto::Usage;
    use tower_x402::{Asset, PaymentLayer, PaymentOption};

    use super::*;

    /// What the handler meters per call unless `?use=N` says otherwise.
    const USED: u64 = 1_234;

    /// A route metering `?use=N` (default [`USED`]) behind an `upto` option of `MAX`, settled
    /// on `chain` by the relayer; counts handler runs.
    pub(super) async fn app(chain: &Chain) -> (Router, OnchainSettler, Arc<AtomicUsize>) {
        let settler = OnchainSettler::connect(chain.url(), signer(chain::RELAYER_KEY))
            .await
            .expect("settler");
        let option = PaymentOption::upto_atomic(
            &Asset::usdc_base_sepolia(),
            U256::from(MAX),
            PAY_TO,
            settler.relayer(),
        )
        .expect("option");
        let layer = PaymentLayer::builder()
            .no_challenge_binding()
            .accept(option)
            .settler(settler.clone())
            .build()
            .expect("layer");
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let route = get(move |usage: Usage, uri: http::Uri| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let want = uri
                    .query()
                    .and_then(|q| q.strip_prefix("use="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(USED);
                match usage.charge_atomic(want) {
                    Ok(total) => format!("generated; charged {total}"),
                    Err(e) => format!("stopped: {e}"),
                }
            }
        });
        (
            Router::new().route("/generate", route).layer(layer),
            settler,
            runs,
        )
    }

    /// Serves [`app`] on loopback: a route metering `?use=N` behind an `upto`
    /// option of `MAX`, settled on `chain` by the relayer; counts handler runs.
    pub(super) async fn serve(
        chain: &Chain,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<()>,
        OnchainSettler,
        Arc<AtomicUsize>,
    ) {
        let (app, settler, runs) = app(chain).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        (addr, task, settler, runs)
    }

    fn requirements(settler: &OnchainSettler) -> tower_x402::proto::v2::PaymentRequirements {
        PaymentOption::upto_atomic(
            &Asset::usdc_base_sepolia(),
            U256::from(MAX),
            PAY_TO,
            settler.relayer(),
        )
        .expect("option")
        .requirements()
        .clone()
    }

    async fn call(
        app: &Router,
        path: &str,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    ) -> (http::StatusCode, http::HeaderMap, String) {
        let mut req = http::Request::get(format!("http://api.test{path}"))
            .body(axum::body::Body::empty())
            .expect("request");
        req.headers_mut().extend(headers);
        let res = app.clone().oneshot(req).await.expect("infallible");
        let (parts, body) = res.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.expect("body");
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    fn reason(headers: &http::HeaderMap) -> Option<String> {
        let v = headers.get("payment-response")?;
        let json = tower_x402::proto::header::decode_bytes(v, 1 << 16).ok()?;
        let receipt: Value = serde_json::from_slice(&json).ok()?;
        receipt["errorReason"].as_str().map(str::to_owned)
    }

    /// `node tests/clients/upto.mjs --url URL --key KEY --replay`: its one JSON line.
    fn official_client(deps: &Path, url: &str, key: &str) -> Value {
        let mut cmd = Command::new("node");
        cmd.arg(chain::process::repo().join("tests/clients/upto.mjs"))
            .args(["--url", url, "--key", key, "--replay"])
            .env("X402_TEST_DEPS", deps);
        chain::process::run_json(&mut cmd, Duration::from_secs(60), String::new)
    }

    #[tokio::test]
    async fn the_official_client_pays_upto_and_exactly_the_metered_amount_moves() {
        let Some(deps) = deps("upto_chain") else {
            return;
        };
        let Some(chain) = Chain::start("upto_chain").await else {
            return;
        };
        let payer = signer(PAYER3_KEY).address();
        chain.approve_permit2(payer).await;
        let (addr, server, settler, runs) = serve(&chain).await;
        let (to_before, from_before) = (chain.balance(PAY_TO).await, chain.balance(payer).await);

        let url = format!("http://{addr}/generate");
        let out = tokio::task::spawn_blocking(move || official_client(&deps, &url, PAYER3_KEY))
            .await
            .expect("client thread");
        server.abort();
        assert_eq!(out["status"], json!(200), "{out}");
        assert_eq!(
            out["body"],
            json!(format!("generated; charged {USED}")),
            "{out}"
        );
        let receipt = &out["paymentResponse"];
        assert_eq!(receipt["success"], json!(true), "{out}");
        assert_eq!(receipt["amount"], json!(USED.to_string()), "{out}");
        let tx: B256 = receipt["transaction"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .expect("a transaction hash");
        // The replayed proof is refused and does not run the handler again.
        assert_eq!(out["replayStatus"], json!(402), "{out}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        // Exactly the metered amount moved, once, by the transaction in the receipt.
        assert_eq!(chain.balance(PAY_TO).await, to_before + U256::from(USED));
        assert_eq!(chain.balance(payer).await, from_before - U256::from(USED));
        let mined = chain
            .provider()
            .get_transaction_receipt(tx)
            .await
            .expect("rpc")
            .expect("mined");
        assert!(mined.status());
        let auth = &out["paymentPayload"]["payload"]["permit2Authorization"];
        let nonce: U256 = auth["nonce"]
            .as_str()
            .and_then(|n| n.parse().ok())
            .expect("nonce");
        assert!(chain.permit2_nonce_used(payer, nonce).await);
        let stats = settler.stats();
        assert_eq!((stats.sent, stats.settled), (1, 1));
        eprintln!("upto settlement gas: {}", stats.gas_used);
    }

    #[tokio::test]
    async fn usage_above_the_maximum_sends_nothing_and_zero_usage_too() {
        let Some(chain) = Chain::start("upto_chain_refusals").await else {
            return;
        };
        let payer = signer(PAYER4_KEY);
        chain.approve_permit2(payer.address()).await;
        let (app, settler, runs) = app(&chain).await;
        let req = requirements(&settler);
        let before = chain.balance(payer.address()).await;

        // Above the maximum: 402 with the reason, body withheld, no transaction.
        let over = upto_payload(&payer, &req, now());
        let (status, headers, body) = call(
            &app,
            &format!("/generate?use={}", MAX + 1),
            vec![pay_upto(&req, &over)],
        )
        .await;
        assert_eq!(status, http::StatusCode::PAYMENT_REQUIRED, "{body}");
        assert_eq!(
            reason(&headers).as_deref(),
            Some("invalid_upto_evm_payload_settlement_exceeds_amount")
        );
        assert!(!body.contains("stopped"), "the handler's body is withheld");

        // Nothing used: 200, no transaction.
        let zero = upto_payload(&payer, &req, now());
        let (status, headers, body) =
            call(&app, "/generate?use=0", vec![pay_upto(&req, &zero)]).await;
        assert_eq!(status, http::StatusCode::OK, "{body}");
        let receipt: Value = serde_json::from_slice(
            &tower_x402::proto::header::decode_bytes(
                headers.get("payment-response").expect("receipt"),
                1 << 16,
            )
            .expect("base64"),
        )
        .expect("json");
        assert_eq!(
            (receipt["amount"].clone(), receipt["transaction"].clone()),
            (json!("0"), json!(""))
        );

        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(settler.stats().sent, 0, "no transaction for either");
        assert_eq!(chain.balance(payer.address()).await, before);
        for p in [&over, &zero] {
            assert!(
                !chain
                    .permit2_nonce_used(payer.address(), p.permit2_authorization.nonce)
                    .await
            );
        }
    }

    #[tokio::test]
    async fn a_payer_without_a_permit2_allowance_is_refused_before_the_handler() {
        let Some(chain) = Chain::start("upto_chain_allowance").await else {
            return;
        };
        let payer = signer(PAYER4_KEY); // no approve_permit2
        let (app, settler, runs) = app(&chain).await;
        let req = requirements(&settler);
        let proof = upto_payload(&payer, &req, now());
        let (status, headers, body) = call(&app, "/generate", vec![pay_upto(&req, &proof)]).await;
        assert_eq!(status, http::StatusCode::PAYMENT_REQUIRED, "{body}");
        let challenge = headers.get("payment-required").expect("challenge");
        let json = tower_x402::proto::header::decode_bytes(challenge, 1 << 16).expect("base64");
        let challenge: Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(
            challenge["error"],
            json!("permit2_allowance_required"),
            "{challenge}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        assert_eq!(settler.stats().sent, 0);
        // Approved, the same proof goes through (it was released, not spent).
        chain.approve_permit2(payer.address()).await;
        let (status, _, body) = call(&app, "/generate", vec![pay_upto(&req, &proof)]).await;
        assert_eq!(status, http::StatusCode::OK, "{body}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

// ------------------------------------------------------------------------------------------------
// Our own client: `PayingLayer` with `Policy::allow_upto` over a hyper-util client pays a
// `PaymentLayer` + `OnchainSettler` upto route on the chain.

#[cfg(feature = "client")]
mod paying_client {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use alloy_primitives::{ChainId, Signature};
    use alloy_provider::Provider as _;
    use alloy_signer::Signer;

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use tower::{ServiceBuilder, ServiceExt as _};
    use tower_x402::client::{
        Budget, Error, PayingLayer, PaymentOutcome, PaymentReport, Policy, Refusal,
    };

    use tower_x402::Asset;

    use super::*;

    /// What the handler meters on every call.
    const USED: u64 = 4_321;

    /// A payer key counting the signatures it makes.
    #[derive(Clone)]
    struct Counting {
        key: PrivateKeySigner,
        count: Arc<AtomicUsize>,
    }

    impl Counting {
        fn new(key: &str) -> Self {
            Self {
                key: signer(key),
                count: Arc::default(),
            }
        }

        fn signatures(&self) -> usize {
            self.count.load(Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl Signer for Counting {
        async fn sign_hash(&self, hash: &B256) -> alloy_signer::Result<Signature> {
            self.count.fetch_add(1, Ordering::SeqCst);
            self.key.sign_hash(hash).await
        }

        fn address(&self) -> Address {
            self.key.address()
        }

        fn chain_id(&self) -> Option<ChainId> {
            None
        }

        fn set_chain_id(&mut self, _: Option<ChainId>) {}
    }

    fn hyper() -> Client<HttpConnector, Full<Bytes>> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn get_generate(addr: std::net::SocketAddr) -> http::Request<Full<Bytes>> {
        http::Request::get(format!("http://{addr}/generate?use={USED}"))
            .body(Full::default())
            .expect("request")
    }

    /// At most `MAX` per request, Base Sepolia USDC only, within `budget`.
    fn policy(budget: &Budget) -> Policy {
        Policy::new(U256::from(MAX))
            .allow_asset(&Asset::usdc_base_sepolia())
            .budget(budget.clone())
    }

    #[tokio::test]
    async fn our_client_pays_upto_and_the_budget_spends_exactly_the_metered_amount() {
        let Some(chain) = Chain::start("upto_chain_our_client").await else {
            return;
        };
        let payer = Counting::new(PAYER3_KEY);
        let owner = payer.address();
        chain.approve_permit2(owner).await;
        let (addr, server, settler, runs) = super::layer::serve(&chain).await;
        let (to_before, from_before) = (chain.balance(PAY_TO).await, chain.balance(owner).await);
        let budget = Budget::new(U256::from(10 * MAX));

        let res = ServiceBuilder::new()
            .layer(PayingLayer::new(
                payer.clone(),
                policy(&budget).allow_upto(),
            ))
            .service(hyper())
            .oneshot(get_generate(addr))
            .await
            .expect("paid call");
        server.abort();
        let status = res.status();
        let report = res.extensions().get::<PaymentReport>().cloned();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, http::StatusCode::OK, "{report:?} {body}");
        assert_eq!(body, format!("generated; charged {USED}"));
        let report = report.expect("a report");
        assert_eq!(report.outcome, PaymentOutcome::Settled, "{report:?}");
        assert!(report.is_upto());
        assert_eq!(report.settled_amount(), Some(U256::from(USED)));
        assert_eq!(report.amount(), U256::from(USED), "what was charged");
        assert_eq!(report.max_amount(), U256::from(MAX), "what was authorised");
        assert_eq!(report.attempts, 1);
        assert_eq!(payer.signatures(), 1);
        assert_eq!(
            budget.spent(),
            U256::from(USED),
            "MAX reserved, MAX - USED given back"
        );

        // Exactly the metered amount moved, once, by the transaction in the receipt.
        assert_eq!(chain.balance(PAY_TO).await, to_before + U256::from(USED));
        assert_eq!(chain.balance(owner).await, from_before - U256::from(USED));
        let tx = report.transaction().expect("a settlement transaction");
        let mined = chain
            .provider()
            .get_transaction_receipt(tx)
            .await
            .expect("rpc")
            .expect("mined");
        assert!(mined.status());
        let permit = report.permit2.as_ref().expect("the signed permit");
        assert_eq!(permit.from, owner);
        assert_eq!(permit.witness.facilitator, settler.relayer());
        assert!(chain.permit2_nonce_used(owner, permit.nonce).await);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let stats = settler.stats();
        assert_eq!((stats.sent, stats.settled), (1, 1));
    }

    #[tokio::test]
    async fn without_allow_upto_our_client_refuses_before_signing() {
        let Some(chain) = Chain::start("upto_chain_our_client_refuses").await else {
            return;
        };
        let payer = Counting::new(PAYER4_KEY);
        let owner = payer.address();
        chain.approve_permit2(owner).await;
        let (addr, server, settler, runs) = super::layer::serve(&chain).await;
        let (to_before, from_before) = (chain.balance(PAY_TO).await, chain.balance(owner).await);
        let budget = Budget::new(U256::from(10 * MAX));

        let err = ServiceBuilder::new()
            .layer(PayingLayer::new(payer.clone(), policy(&budget)))
            .service(hyper())
            .oneshot(get_generate(addr))
            .await
            .expect_err("refused");
        server.abort();
        assert!(err.is_refused(), "{err}");
        match &err {
            Error::NoAcceptableOption(r) => assert_eq!(r.0, vec![Refusal::UptoNotAllowed]),
            other => panic!("{other}"),
        }
        assert_eq!(payer.signatures(), 0, "nothing signed");
        assert_eq!(budget.spent(), U256::ZERO);
        assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler never ran");
        assert_eq!(settler.stats().sent, 0, "no transaction");
        assert_eq!(chain.balance(PAY_TO).await, to_before);
        assert_eq!(chain.balance(owner).await, from_before);
    }
}

/// `examples/economics.rs` on its own anvil, in its `upto` and prepaid modes, small: every call
/// served, the upto row settles one transaction per call, the prepaid bundle one for all its
/// calls (the README's cost table comes from the same program, in release, at full size).
#[cfg(feature = "deferred")]
#[test]
fn the_economics_example_measures_upto_and_a_prepaid_bundle() {
    let mut cmd = Command::new(chain::process::example_bin("economics"));
    cmd.args([
        "--modes",
        "upto,prepaid",
        "--payments",
        "3",
        "--bundle",
        "5",
    ]);
    let out = chain::process::run(&mut cmd, Duration::from_secs(120), String::new);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let row = |mode: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {mode}")))
            .unwrap_or_else(|| panic!("no {mode} row in:\n{}", out.stdout))
            .split('|')
            .map(str::trim)
            .collect::<Vec<_>>()
    };
    let upto = row("upto");
    assert_eq!(upto[2], "3 for 3", "{upto:?}");
    assert_eq!(upto[9], "0", "failures: {upto:?}");
    let gas: u64 = upto[3].parse().expect("gas per call");
    assert!((60_000..150_000).contains(&gas), "{upto:?}");
    let prepaid = row("Prepaid bundle of 5 calls");
    assert_eq!(prepaid[2], "1 for 5", "{prepaid:?}");
    assert_eq!(prepaid[9], "0", "failures: {prepaid:?}");
    let per_call: u64 = prepaid[3].parse().expect("gas per call");
    assert!(
        per_call < gas / 4,
        "a bundle of 5 divides one settlement's gas: {prepaid:?}"
    );
}
