//! On-chain settlement, end to end on a local chain (no chain mocks): [`OnchainSettler`] behind
//! a real `PaymentLayer` on an axum router, settling EIP-3009 payments signed like the
//! official clients sign them, on anvil with our TestUSDC etched at the Base Sepolia USDC
//! address (see `tests/chain/mod.rs`). Each test starts its own anvil. Without anvil the
//! chain tests print SKIPPED (and fail under `CI=true`).
#![cfg(all(feature = "onchain", feature = "test-util"))]

mod chain;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256, Bytes, U256};
use alloy_provider::Provider;
use axum::Router;
use axum::body::Body;
use axum::routing::get;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use tower_x402::proto::X402Version;
use tower_x402::proto::exact::ExactEvmPayload;
use tower_x402::proto::header::{PAYMENT_SIGNATURE, X_PAYMENT};
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::settle::onchain::{OnchainSettler, UnconfirmedTransaction, reason};
use tower_x402::settle::{SettleError, Settler};
use tower_x402::test_util::{
    PrivateKeySigner, demo_payer, encode, exact_payload, sign, v1_json, v2_json,
};
use tower_x402::{Asset, ExactEvmVerifier, Network, PaymentLayer, PaymentOption, VerifiedPayment};

use chain::{Chain, FUNDED, MINTED, PAY_TO, PAYER3_KEY, PAYER4_KEY, RELAYER, RELAYER_KEY, TOKEN};

/// `$0.01` in 6-decimal USDC units.
const PRICE_UNITS: u64 = 10_000;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn option() -> PaymentOption {
    PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.01", PAY_TO).expect("valid option")
}

fn requirements() -> PaymentRequirements {
    option().requirements().clone()
}

fn relayer() -> PrivateKeySigner {
    RELAYER_KEY.parse().expect("anvil key #0")
}

fn key(hex: &str) -> PrivateKeySigner {
    hex.parse().expect("anvil key")
}

async fn settler(chain: &Chain) -> OnchainSettler {
    OnchainSettler::connect(chain.url(), relayer())
        .await
        .expect("settler")
}

/// A signed payment from `signer` and its v2 header.
fn signed(signer: &PrivateKeySigner) -> (ExactEvmPayload, (HeaderName, HeaderValue)) {
    let req = requirements();
    let payload = exact_payload(signer, &req, now());
    let header = (PAYMENT_SIGNATURE, encode(&v2_json(&req, &payload, None)));
    (payload, header)
}

/// The proof as the layer hands it to the settler.
fn verified(payload: &ExactEvmPayload) -> VerifiedPayment {
    let a = &payload.authorization;
    VerifiedPayment::exact(
        X402Version::V2,
        Network::BASE_SEPOLIA,
        TOKEN,
        a.clone(),
        payload.signature.clone(),
    )
}

/// A paid route counting its calls, behind the layer with `settler`.
struct App {
    router: Router,
    hits: Arc<AtomicUsize>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

fn app(settler: impl Settler) -> App {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let layer = PaymentLayer::builder()
        .no_challenge_binding()
        .accept(option())
        .verifier(ExactEvmVerifier::new())
        .settler(settler)
        .build()
        .expect("layer");
    let router = Router::new()
        .route(
            "/paid",
            get(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { "paid content" }
            }),
        )
        .route_layer(layer);
    App { router, hits }
}

impl App {
    async fn get(&self, header: Option<(HeaderName, HeaderValue)>) -> Reply {
        let mut req = Request::get("/paid");
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        let res = self
            .router
            .clone()
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let (parts, body) = res.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn header_json(headers: &HeaderMap, name: &str) -> Value {
    let value = headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"));
    let json = base64::engine::general_purpose::STANDARD
        .decode(value.as_bytes())
        .expect("base64");
    serde_json::from_slice(&json).expect("json")
}

/// The reason of a 402 (the challenge's `error`).
fn refusal(reply: &Reply) -> String {
    assert_eq!(
        reply.status,
        StatusCode::PAYMENT_REQUIRED,
        "{:?}",
        reply.body
    );
    header_json(&reply.headers, "payment-required")["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn tx_hash(receipt: &Value) -> B256 {
    receipt["transaction"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no transaction hash in {receipt}"))
}

#[tokio::test]
async fn paid_request_settles_on_chain_and_replay_is_refused() {
    let Some(chain) = Chain::start("paid_request_settles_on_chain").await else {
        return;
    };
    let settler = settler(&chain).await;
    let app = app(settler.clone());
    let before = chain.balance(PAY_TO).await;

    let payer = demo_payer();
    let (payload, header) = signed(&payer);
    let reply = app.get(Some(header.clone())).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(&reply.body[..], b"paid content");
    let receipt = header_json(&reply.headers, "payment-response");
    assert_eq!(receipt["success"], true, "{receipt}");
    assert_eq!(receipt["network"], "eip155:84532");
    let hash = tx_hash(&receipt);

    // The receipt's hash is a real, successful transaction from the relayer to the token.
    let mined = chain
        .provider()
        .get_transaction_receipt(hash)
        .await
        .expect("rpc")
        .expect("mined");
    assert!(mined.status());
    assert_eq!(mined.from, RELAYER);
    assert_eq!(mined.to, Some(TOKEN));
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(PRICE_UNITS)
    );
    assert_eq!(
        chain.balance(payer.address()).await,
        U256::from(MINTED - PRICE_UNITS)
    );
    assert!(
        chain
            .authorization_used(payer.address(), payload.authorization.nonce)
            .await
    );
    assert_eq!(app.hits(), 1);

    // Replay: refused, not served, nothing moves.
    let reply = app.get(Some(header)).await;
    assert_eq!(refusal(&reply), reason::NONCE_ALREADY_USED);
    assert_eq!(app.hits(), 1);
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(PRICE_UNITS)
    );

    // A v1 client (X-PAYMENT) settles the same way.
    let payer3 = key(PAYER3_KEY);
    let req = requirements();
    let payload = exact_payload(&payer3, &req, now());
    let reply = app
        .get(Some((X_PAYMENT, encode(&v1_json(&req, &payload)))))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let receipt = header_json(&reply.headers, "x-payment-response");
    assert_eq!(receipt["success"], true, "{receipt}");
    assert_ne!(tx_hash(&receipt), hash);
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(2 * PRICE_UNITS)
    );

    // Measurements for the report (shown with --nocapture).
    let gas_of = |hash| {
        let provider = chain.provider().clone();
        async move {
            provider
                .get_transaction_receipt(hash)
                .await
                .expect("rpc")
                .expect("mined")
                .gas_used
        }
    };
    let (first_gas, second_gas) = (gas_of(hash).await, gas_of(tx_hash(&receipt)).await);
    let started = std::time::Instant::now();
    let (fresh, _) = signed(&key(PAYER4_KEY));
    for _ in 0..20 {
        settler.check(&verified(&fresh)).await.expect("checks");
    }
    eprintln!(
        "onchain: gas of the first settlement (payTo balance 0 -> x) {first_gas}, of the second {second_gas}; check (1 batched round trip) {:?} mean",
        started.elapsed() / 20
    );

    let stats = settler.stats();
    assert_eq!((stats.sent, stats.settled, stats.refused), (2, 2, 0));
    let gas = stats.gas_per_settlement().expect("settled");
    assert!((40_000..120_000).contains(&gas), "gas per settlement {gas}");
    eprintln!(
        "onchain: gas per settlement {gas}, settle latency last {:?} mean {:?}, fees {} wei",
        stats.last_latency.expect("latency"),
        stats.mean_latency().expect("latency"),
        stats.fees_wei,
    );
}

#[tokio::test]
async fn payer_without_funds_is_refused_before_the_handler() {
    let Some(chain) = Chain::start("payer_without_funds").await else {
        return;
    };
    for batched in [true, false] {
        let app = app(settler(&chain).await.with_batched_check(batched));
        let (_, header) = signed(&PrivateKeySigner::random());
        let reply = app.get(Some(header)).await;
        assert_eq!(
            refusal(&reply),
            reason::INSUFFICIENT_FUNDS,
            "batched {batched}"
        );
        assert_eq!(app.hits(), 0);
    }
    // Funded short of the price: still refused.
    let poor = PrivateKeySigner::random();
    chain
        .mint(poor.address(), U256::from(PRICE_UNITS - 1))
        .await;
    let app = app(settler(&chain).await);
    let (_, header) = signed(&poor);
    assert_eq!(
        refusal(&app.get(Some(header)).await),
        reason::INSUFFICIENT_FUNDS
    );
    assert_eq!(app.hits(), 0);
}

#[tokio::test]
async fn nonce_used_on_chain_is_refused_before_the_handler() {
    let Some(chain) = Chain::start("nonce_used_on_chain").await else {
        return;
    };
    let settler = settler(&chain).await;
    let payer = key(PAYER4_KEY);
    let (payload, header) = signed(&payer);
    // Settled behind the layer's back (another server, or the client itself).
    let settled = settler.settle(&verified(&payload)).await.expect("settles");
    assert!(settled.transaction.is_some());
    assert!(
        chain
            .authorization_used(payer.address(), payload.authorization.nonce)
            .await
    );
    let before = chain.balance(PAY_TO).await;

    for batched in [true, false] {
        let app = app(settler.clone().with_batched_check(batched));
        let reply = app.get(Some(header.clone())).await;
        assert_eq!(
            refusal(&reply),
            reason::NONCE_ALREADY_USED,
            "batched {batched}"
        );
        assert_eq!(app.hits(), 0);
    }
    assert_eq!(chain.balance(PAY_TO).await, before);
    // Settling it again is refused in simulation: no second transaction.
    let again = settler.settle(&verified(&payload)).await;
    assert!(
        matches!(again, Err(SettleError::Refused { reason: ref r, transaction: None }) if *r == reason::NONCE_ALREADY_USED),
        "{again:?}"
    );
    assert_eq!(settler.stats().sent, 1);
}

#[tokio::test]
async fn unreachable_rpc_answers_503_and_skips_the_handler() {
    // No chain needed: nothing listens on the port.
    let settler = OnchainSettler::connect(&chain::closed_port_url(), relayer())
        .await
        .expect("settler");
    let app = app(settler.clone());
    let (payload, header) = signed(&demo_payer());
    let reply = app.get(Some(header)).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        reply.body
    );
    let retry: u64 = reply
        .headers
        .get(http::header::RETRY_AFTER)
        .expect("Retry-After")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    assert_eq!(app.hits(), 0);
    // The settle step alone says the same, and nothing was sent.
    let e = settler.settle(&verified(&payload)).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    assert_eq!(settler.stats().unavailable, 1);
    assert_eq!(settler.stats().sent, 0);
}

#[tokio::test]
async fn concurrent_payments_from_many_payers_all_settle() {
    let Some(chain) = Chain::start("concurrent_payments").await else {
        return;
    };
    let payers: Vec<PrivateKeySigner> = (0..8).map(|_| PrivateKeySigner::random()).collect();
    for p in &payers {
        chain.mint(p.address(), U256::from(PRICE_UNITS)).await;
    }
    let settler = settler(&chain).await;
    let app = Arc::new(app(settler.clone()));
    let before = chain.balance(PAY_TO).await;

    let mut tasks = tokio::task::JoinSet::new();
    for p in payers.clone() {
        let app = app.clone();
        tasks.spawn(async move {
            let (_, header) = signed(&p);
            app.get(Some(header)).await
        });
    }
    let mut hashes = Vec::new();
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.expect("task");
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        hashes.push(tx_hash(&header_json(&reply.headers, "payment-response")));
    }
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), 8, "one transaction per payment");
    assert_eq!(app.hits(), 8);
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(8 * PRICE_UNITS)
    );
    for p in &payers {
        assert_eq!(chain.balance(p.address()).await, U256::ZERO);
    }
    let stats = settler.stats();
    assert_eq!((stats.sent, stats.settled), (8, 8));
    eprintln!(
        "onchain: 8 concurrent settlements: gas per settlement {}, settle latency mean {:?}, last {:?}",
        stats.gas_per_settlement().expect("settled"),
        stats.mean_latency().expect("settled"),
        stats.last_latency.expect("settled"),
    );
}

#[tokio::test]
async fn token_reverts_map_to_reasons_without_sending() {
    let Some(chain) = Chain::start("token_reverts").await else {
        return;
    };
    let settler = settler(&chain).await;
    let req = requirements();
    let payer = demo_payer();
    let t = now();

    // Expired: validBefore in the past (the token's clock is the block's).
    let mut payload = exact_payload(&payer, &req, t);
    payload.authorization.valid_before = U256::from(t - 5);
    payload.signature = sign(&payer, &req, &payload.authorization);
    let expired = verified(&payload);

    // Not yet valid.
    let mut payload = exact_payload(&payer, &req, t);
    payload.authorization.valid_after = U256::from(t + 3600);
    payload.signature = sign(&payer, &req, &payload.authorization);
    let early = verified(&payload);

    // Signed by someone else.
    let mut payload = exact_payload(&payer, &req, t);
    payload.signature = sign(&key(PAYER3_KEY), &req, &payload.authorization);
    let forged = verified(&payload);

    // High s (the malleable twin of a valid signature).
    let mut payload = exact_payload(&payer, &req, t);
    payload.signature = high_s_twin(&payload.signature);
    let malleable = verified(&payload);

    // No balance: settle without the check first.
    let poor = exact_payload(&PrivateKeySigner::random(), &req, t);
    let poor = verified(&poor);

    let cases = [
        (&expired, reason::VALID_BEFORE),
        (&early, reason::VALID_AFTER),
        (&forged, reason::SIGNATURE),
        (&malleable, reason::SIGNATURE),
        (&poor, reason::INSUFFICIENT_BALANCE),
    ];
    for (payment, want) in cases.clone() {
        let got = settler.settle(payment).await;
        assert!(
            matches!(&got, Err(SettleError::Refused { reason, transaction: None }) if *reason == want),
            "want {want}, got {got:?}"
        );
    }
    // The pre-check sees the same reverts through its simulation (balance first).
    for (payment, want) in &cases[..4] {
        let got = settler.check(payment).await;
        assert!(
            matches!(&got, Err(SettleError::Refused { reason, .. }) if reason == want),
            "check: want {want}, got {got:?}"
        );
    }
    assert!(matches!(
        settler.check(&poor).await,
        Err(SettleError::Refused {
            reason: reason::INSUFFICIENT_FUNDS,
            ..
        })
    ));
    let stats = settler.stats();
    assert_eq!((stats.sent, stats.refused), (0, 5));

    // A payment on another network is refused before any transaction.
    let mut other = verified(&exact_payload(&payer, &req, t));
    other.network = Network::BASE;
    assert!(matches!(
        settler.check(&other).await,
        Err(SettleError::Refused {
            reason: reason::INVALID_NETWORK,
            ..
        })
    ));

    // v as yParity (0/1) is normalised to 27/28 and settles.
    let mut payload = exact_payload(&payer, &req, t);
    let mut sig = payload.signature.to_vec();
    sig[64] -= 27;
    payload.signature = Bytes::from(sig);
    let ok = settler.settle(&verified(&payload)).await.expect("settles");
    assert!(ok.transaction.is_some());
}

/// `(r, n - s, v ^ 1)`: recovers to the same signer, but USDC refuses high s.
fn high_s_twin(sig: &[u8]) -> Bytes {
    const N: U256 = U256::from_be_bytes([
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xfe, 0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36,
        0x41, 0x41,
    ]);
    let s = U256::from_be_slice(&sig[32..64]);
    let mut out = sig.to_vec();
    out[32..64].copy_from_slice(&(N - s).to_be_bytes::<32>());
    out[64] = if sig[64] == 27 { 28 } else { 27 };
    Bytes::from(out)
}

#[tokio::test]
async fn relayer_nonce_recovers_when_the_account_is_used_elsewhere() {
    let Some(chain) = Chain::start("relayer_nonce_recovers").await else {
        return;
    };
    let settler = settler(&chain).await;
    let (first, _) = signed(&demo_payer());
    settler.settle(&verified(&first)).await.expect("first");
    // Someone else spends the relayer's next nonce.
    chain.send_as(RELAYER, Address::ZERO, Bytes::new()).await;
    let (second, _) = signed(&demo_payer());
    settler.settle(&verified(&second)).await.expect("second");
    assert_eq!(settler.stats().settled, 2);
}

#[tokio::test]
async fn receipt_timeout_is_unknown_and_never_resent() {
    let Some(chain) = Chain::start("receipt_timeout").await else {
        return;
    };
    let settler = settler(&chain)
        .await
        .with_receipt_timeout(Duration::from_millis(600))
        .with_poll_interval(Duration::from_millis(100));
    let payer = key(PAYER3_KEY);
    let (payload, _) = signed(&payer);
    let payment = verified(&payload);

    // The transaction waits in the pool: the outcome is unknown.
    chain.set_automine(false).await;
    let e = settler.settle(&payment).await.unwrap_err();
    let SettleError::Unknown {
        source,
        transaction,
        ..
    } = &e
    else {
        panic!("want unknown, got {e:?}");
    };
    assert!(e.is_unknown() && e.is_retryable());
    let pending = source
        .downcast_ref::<UnconfirmedTransaction>()
        .expect("the hash that was sent")
        .transaction;
    assert_eq!(*transaction, Some(pending));
    assert!(
        !chain
            .authorization_used(payer.address(), payload.authorization.nonce)
            .await
    );
    assert_eq!((settler.stats().sent, settler.stats().unknown), (1, 1));

    // It lands later; reconciliation reads it from the chain.
    chain.mine().await;
    chain.set_automine(true).await;
    let mined = chain
        .provider()
        .get_transaction_receipt(pending)
        .await
        .expect("rpc")
        .expect("mined");
    assert!(mined.status());
    assert!(
        settler
            .authorization_used(TOKEN, payer.address(), payload.authorization.nonce)
            .await
            .expect("rpc")
    );
    assert_eq!(
        chain.balance(payer.address()).await,
        U256::from(MINTED - PRICE_UNITS)
    );
    // Settling the same proof again sends nothing: the token refuses it in simulation.
    assert!(matches!(
        settler.settle(&payment).await,
        Err(SettleError::Refused {
            reason: reason::NONCE_ALREADY_USED,
            transaction: None
        })
    ));
    assert_eq!(settler.stats().sent, 1);

    // Funded accounts are the harness's promise.
    assert_eq!(chain.balance(FUNDED[2]).await, U256::from(MINTED));
}
