//! Red-team batch 1 (issue #23, item 5): attacks against the attacker goals of SECURITY.md,
//! each asserting the status and reason it gets and how often the handler ran (counted).
//!
//! Goals: serve unpaid, make the client pay twice, exhaust memory, poison the idempotency
//! store, desynchronise two instances; across HTTP, prepaid, upto, idempotency and a remote
//! facilitator. Concurrency attacks run on a multi-threaded runtime.
#![cfg(all(feature = "test-util", feature = "facilitator"))]

#[cfg(feature = "onchain")]
mod chain;
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::Router;
use axum::routing::{get, post};
use common::siwx::*;
use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower::Layer;
use tower_x402::facilitator::FacilitatorClient;
use tower_x402::idempotency::MemoryIdempotencyStore;
use tower_x402::prepaid::{Bundle, Prepaid};
use tower_x402::primitives::U256;
use tower_x402::proto::header::PAYMENT_SIGNATURE;
use tower_x402::settle::{SettleError, Settlement, Settler};
use tower_x402::test_util::{encode, exact_payload, pay_upto, upto_payload, v1_json, v2_json};
use tower_x402::{
    Asset, MemoryNonceStore, PaymentLayer, PaymentOption, ResourceCheck, VerifiedPayment,
};

/// Counts settlements; yields so concurrent requests interleave.
#[derive(Clone, Default)]
struct CountingSettler(Arc<AtomicUsize>);

impl CountingSettler {
    fn calls(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Settler for CountingSettler {
    async fn settle(&self, _: &VerifiedPayment) -> Result<Settlement, SettleError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        Ok(Settlement::default())
    }
}

/// The replies of spawned requests (spawned at once: they run concurrently).
async fn join_all(tasks: Vec<tokio::task::JoinHandle<Reply>>) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(tasks.len());
    for t in tasks {
        replies.push(t.await.expect("request task"));
    }
    replies
}

fn refused(r: &Reply, status: StatusCode, reason: &str) {
    assert_eq!(r.outcome(), (status, Some(reason.to_owned())));
    assert_eq!(r.header("cache-control"), Some("no-store"));
}

// ------------------------------------------------------------------------------------------------
// Serve unpaid

#[tokio::test]
async fn a_proof_for_the_cheap_route_does_not_buy_the_dear_one() {
    // /paid costs $0.001, /premium $0.01: the cheap proof, echoing the cheap price, on the
    // dear route.
    let hits = Hits::new();
    let clock = clock();
    let dear = PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.01", PAY_TO).unwrap();
    let svc = Router::new()
        .route("/paid", handler(hits.clone()))
        .route_layer(layer(&clock))
        .merge(
            Router::new()
                .route("/premium", handler(hits.clone()))
                .route_layer(unpriced_builder(&clock).accept(dear).build().unwrap()),
        );
    let r = get_with(&svc, "/premium", [proof_v2()]).await;
    refused(
        &r,
        StatusCode::PAYMENT_REQUIRED,
        "invalid_payment_requirements",
    );
    // v1 carries no echo: the authorization's value decides.
    let r = get_with(&svc, "/premium", [proof_v1()]).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{:?}", r.reason());
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn duplicate_json_keys_cannot_smuggle_a_second_accepted() {
    // A parser taking the first `accepted` and another the last would check one and settle
    // the other: the header is refused outright.
    let req = requirements();
    let v = v2_json(&req, &exact_payload(&payer(), &req, NOW), None);
    let doc = v.to_string();
    let cheap = json!({ "accepted": { "amount": "1" } }).to_string();
    let smuggled = format!("{},{}", &doc[..doc.len() - 1], &cheap[1..]);
    let header = HeaderValue::try_from(base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        smuggled,
    ))
    .unwrap();
    let hits = Hits::new();
    let svc = app(&hits).route_layer(layer(&clock()));
    let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, header)]).await;
    refused(&r, StatusCode::BAD_REQUEST, "invalid_payload");
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn a_forged_host_cannot_launder_a_foreign_resource_when_the_origin_is_fixed() {
    // `ResourceCheck::Url` with a fixed `resource_base`: the Host header (attacker's) does not
    // decide the origin compared.
    let hits = Hits::new();
    let svc = app(&hits).route_layer(
        builder(&clock())
            .resource_base("https://api.example.com")
            .resource_check(ResourceCheck::Url)
            .build()
            .unwrap(),
    );
    let req = requirements();
    let mut v = v2_json(&req, &exact_payload(&payer(), &req, NOW), None);
    v["resource"] = json!({ "url": "https://evil.example/paid" });
    let mut request = http::Request::get("/paid")
        .header("host", "evil.example")
        .header(PAYMENT_SIGNATURE, encode(&v))
        .body(axum::body::Body::empty())
        .unwrap();
    request
        .headers_mut()
        .insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
    let r = send(&svc, request).await;
    refused(&r, StatusCode::PAYMENT_REQUIRED, "resource_mismatch");
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn a_facilitator_answering_200_is_valid_false_is_a_refusal() {
    // The reference's 2026 fix: HTTP 200 does not mean valid. Handler not run, nothing settled.
    let settles = Arc::new(AtomicUsize::new(0));
    let s = settles.clone();
    let fake = Router::new()
        .route(
            "/verify",
            post(|| async {
                axum::Json(json!({
                    "isValid": false,
                    "invalidReason": "invalid_exact_evm_payload_signature",
                    "payer": payer().address().to_checksum(None),
                }))
            }),
        )
        .route(
            "/settle",
            post(move || {
                s.fetch_add(1, Ordering::SeqCst);
                async {
                    axum::Json(
                        json!({ "success": true, "transaction": "0x", "network": "eip155:84532" }),
                    )
                }
            }),
        )
        .route(
            "/supported",
            get(|| async {
                axum::Json(json!({ "kinds": [
                    { "x402Version": 2, "scheme": "exact", "network": "eip155:84532" },
                    { "x402Version": 1, "scheme": "exact", "network": "base-sepolia" },
                ], "extensions": [], "signers": {} }))
            }),
        );
    let (addr, server) = serve(fake).await;
    let facilitator = FacilitatorClient::builder(format!("http://{addr}"))
        .clock(clock())
        .build()
        .unwrap();
    let hits = Hits::new();
    let svc = app(&hits).route_layer(
        builder(&clock())
            .verifier(facilitator.clone())
            .settler(facilitator)
            .build()
            .unwrap(),
    );
    for proof in [proof_v2(), proof_v1()] {
        let r = get_with(&svc, "/paid", [proof]).await;
        refused(
            &r,
            StatusCode::PAYMENT_REQUIRED,
            "invalid_exact_evm_payload_signature",
        );
    }
    assert_eq!(hits.get(), 0);
    assert_eq!(settles.load(Ordering::SeqCst), 0);
    server.abort();
}

#[tokio::test]
async fn an_upto_permit_cannot_pass_as_an_exact_payment_or_the_reverse() {
    // Scheme confusion: the echo names one scheme, the payload is the other's.
    let hits = Hits::new();
    let facilitator =
        tower_x402::primitives::address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
    let upto =
        PaymentOption::upto(&Asset::usdc_base_sepolia(), "$0.001", PAY_TO, facilitator).unwrap();
    let svc = app(&hits).route_layer(
        unpriced_builder(&clock())
            .accept(option())
            .accept(upto.clone())
            .build()
            .unwrap(),
    );
    let (ureq, ereq) = (upto.requirements().clone(), requirements());
    let permit = upto_payload(&payer(), &ureq, NOW);
    let (_, upto_header) = pay_upto(&ureq, &permit);
    let upto_doc: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            upto_header.as_bytes(),
        )
        .unwrap(),
    )
    .unwrap();
    // The upto payload under an exact echo.
    let mut a = upto_doc.clone();
    a["accepted"] = json!(ereq);
    // An exact payload under an upto echo.
    let b = v2_json(&ureq, &exact_payload(&payer(), &ereq, NOW), None);
    for doc in [a, b] {
        let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&doc))]).await;
        assert!(
            r.status == StatusCode::BAD_REQUEST || r.status == StatusCode::PAYMENT_REQUIRED,
            "{:?}",
            r.outcome()
        );
        assert!(r.reason().is_some(), "a reason is given");
    }
    assert_eq!(hits.get(), 0);
}

// ------------------------------------------------------------------------------------------------
// Serve twice for one payment (the seller's loss) / pay twice (the client's)

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_authorization_as_v1_and_v2_on_two_routes_runs_one_handler() {
    // 64 copies of one signed authorization, half in the v1 dialect, half in v2, spread over
    // two routes with their own layers on the process-wide default store.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hits = Hits::new();
    let settler = CountingSettler::default();
    let route = |path: &str| {
        Router::new()
            .route(path, handler(hits.clone()))
            .route_layer(
                PaymentLayer::builder()
                    .no_challenge_binding()
                    .pay_to(PAY_TO)
                    .price(PRICE)
                    .network(tower_x402::Network::BASE_SEPOLIA)
                    .settler(settler.clone())
                    .build()
                    .unwrap(),
            )
    };
    let svc = route("/paid").merge(route("/premium"));
    let req = requirements();
    let payload = exact_payload(&payer(), &req, now);
    let v2 = encode(&v2_json(&req, &payload, None));
    let v1 = encode(&v1_json(&req, &payload));
    let x_payment = HeaderName::from_static("x-payment");
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let svc = svc.clone();
            let header = if i % 2 == 0 {
                (PAYMENT_SIGNATURE, v2.clone())
            } else {
                (x_payment.clone(), v1.clone())
            };
            let path = if i % 4 < 2 { "/paid" } else { "/premium" };
            tokio::spawn(async move { get_with(&svc, path, [header]).await })
        })
        .collect();
    let replies = join_all(tasks).await;
    let served = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(served, 1);
    for r in &replies {
        if r.status != StatusCode::OK {
            assert_eq!(
                r.outcome(),
                (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
            );
        }
    }
    assert_eq!(hits.get(), 1);
    assert_eq!(settler.calls(), 1);
}

#[tokio::test]
async fn a_malleated_signature_is_the_same_spent_proof() {
    // (r, n - s, v ^ 1) is another valid encoding of the same ECDSA signature: it must not
    // buy a second run.
    const N: U256 = U256::from_be_slice(&[
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xfe, 0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36,
        0x41, 0x41,
    ]);
    let req = requirements();
    let payload = exact_payload(&payer(), &req, NOW);
    let sig = payload.signature.to_vec();
    let s = U256::from_be_slice(&sig[32..64]);
    let mut twin = sig.clone();
    twin[32..64].copy_from_slice(&(N - s).to_be_bytes::<32>());
    twin[64] = if sig[64] == 27 { 28 } else { 27 };
    let mut malleated = payload.clone();
    malleated.signature = twin.into();
    let hits = Hits::new();
    let svc = app(&hits).route_layer(layer(&clock()));
    let first = get_with(
        &svc,
        "/paid",
        [(PAYMENT_SIGNATURE, encode(&v2_json(&req, &payload, None)))],
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    let second = get_with(
        &svc,
        "/paid",
        [(PAYMENT_SIGNATURE, encode(&v2_json(&req, &malleated, None)))],
    )
    .await;
    assert_eq!(
        second.status,
        StatusCode::PAYMENT_REQUIRED,
        "{:?}",
        second.reason()
    );
    assert_eq!(hits.get(), 1);
}

// ------------------------------------------------------------------------------------------------
// Exhaust memory

#[tokio::test]
async fn a_full_nonce_store_never_evicts_a_live_proof_to_make_room() {
    // Fill the replay guard with fresh proofs, then replay the first: if the store made room
    // by forgetting a live entry, the replay would be served again.
    let clock = clock();
    let store = MemoryNonceStore::with_capacity_and_clock(64, clock.clone());
    let capacity = store.capacity();
    let hits = Hits::new();
    let svc = app(&hits).route_layer(
        builder(&clock)
            .nonce_store(store)
            .settler(CountingSettler::default())
            .build()
            .unwrap(),
    );
    let first = proof_v2();
    assert_eq!(
        get_with(&svc, "/paid", [first.clone()]).await.status,
        StatusCode::OK
    );
    let mut full = 0;
    for _ in 0..capacity * 2 {
        let r = get_with(&svc, "/paid", [proof_v2()]).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            full += 1;
            assert_eq!(r.reason().as_deref(), Some("service_unavailable"));
            assert!(r.header("retry-after").is_some());
        } else {
            assert_eq!(r.status, StatusCode::OK);
        }
    }
    assert!(full > 0, "the store filled up");
    let served = hits.get();
    assert!(
        served <= capacity,
        "{served} live proofs in a store of {capacity}"
    );
    let replay = get_with(&svc, "/paid", [first]).await;
    refused(&replay, StatusCode::PAYMENT_REQUIRED, NONCE_USED);
    assert_eq!(hits.get(), served);
}

// ------------------------------------------------------------------------------------------------
// Poison the idempotency store

/// An idempotency store on the proofs' clock (ids are held an hour past the proof's
/// `validBefore`, at most the store's maximum TTL).
fn id_store() -> MemoryIdempotencyStore {
    MemoryIdempotencyStore::with_limits_and_clock(1000, 1 << 20, clock())
}

/// A v2 proof carrying payment id `id`.
fn with_id(id: &str) -> (HeaderName, HeaderValue) {
    let req = requirements();
    let mut v = v2_json(&req, &exact_payload(&payer(), &req, NOW), None);
    v["extensions"] = json!({ "payment-identifier": { "info": { "required": false, "id": id } } });
    (PAYMENT_SIGNATURE, encode(&v))
}

#[tokio::test]
async fn an_attacker_squatting_a_victims_payment_id_does_not_charge_the_victim() {
    // The attacker pays once with the id the victim will use (ids leak: logs, guessable
    // client code). The victim's request is a 409, its proof not spent: with a new id it pays.
    const VICTIM_ID: &str = "victim_payment_0001";
    let hits = Hits::new();
    let settler = CountingSettler::default();
    let svc = app(&hits).route_layer(
        builder(&clock())
            .settler(settler.clone())
            .idempotency(id_store())
            .build()
            .unwrap(),
    );
    let attacker = get_with(&svc, "/paid", [with_id(VICTIM_ID)]).await;
    assert_eq!(attacker.status, StatusCode::OK);
    let req = requirements();
    let victim_payload = exact_payload(&payer(), &req, NOW);
    let victim = |id: &str| {
        let mut v = v2_json(&req, &victim_payload, None);
        v["extensions"] =
            json!({ "payment-identifier": { "info": { "required": false, "id": id } } });
        (PAYMENT_SIGNATURE, encode(&v))
    };
    let r = get_with(&svc, "/paid", [victim(VICTIM_ID)]).await;
    refused(&r, StatusCode::CONFLICT, "payment_identifier_conflict");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("\"handler\""),
        "the attacker's stored answer is not handed to the victim"
    );
    assert_eq!((hits.get(), settler.calls()), (1, 1));
    let r = get_with(&svc, "/paid", [victim("victim_payment_0002")]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!((hits.get(), settler.calls()), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_proofs_racing_for_one_payment_id_get_one_run_each_at_most() {
    // 32 distinct proofs under one id at once: each is a distinct payment, but the id can
    // stand for one answer only. At most one is served; the others are 409/503, unspent.
    const ID: &str = "shared_id_raced_0001";
    let hits = Hits::gated();
    let settler = CountingSettler::default();
    let clock = clock();
    // On the proofs' clock: an id is held an hour past the proof's `validBefore` (a store on
    // the system clock would see these 2025 proofs as long expired and hold the id one second
    // only).
    let store = MemoryIdempotencyStore::with_limits_and_clock(1000, 1 << 20, clock.clone());
    let svc = app(&hits).route_layer(
        builder(&clock)
            .settler(settler.clone())
            .idempotency(store)
            .build()
            .unwrap(),
    );
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let svc = svc.clone();
            let proof = with_id(ID);
            tokio::spawn(async move { get_with(&svc, "/paid", [proof]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    hits.open();
    let replies = join_all(tasks).await;
    let served = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(served, 1);
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        let (status, reason) = r.outcome();
        assert!(
            matches!(
                (status, reason.as_deref()),
                (StatusCode::CONFLICT, Some("payment_identifier_conflict"))
                    | (StatusCode::SERVICE_UNAVAILABLE, Some("payment_in_progress"))
            ),
            "{status} {reason:?}"
        );
        assert_eq!(r.header("cache-control"), Some("no-store"));
    }
    assert_eq!((hits.get(), settler.calls()), (1, 1));
}

// ------------------------------------------------------------------------------------------------
// Prepaid credit and desynchronised instances

fn prepaid_layer() -> PaymentLayer {
    let clock = clock();
    builder(&clock)
        .resource_base(BASE)
        .prepaid(Prepaid::new(Bundle::calls(10)).clock(clock.clone()))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_sign_in_nonce_minted_by_another_instance_is_refused() {
    // Two instances without shared sign-in state: a message signed against instance A's
    // challenge is not honoured by B (B never issued its nonce), so B serves nothing unpaid.
    let (a_runs, b_runs) = (Runs::default(), Runs::default());
    let a = prepaid_layer().layer(a_runs.service());
    let b = prepaid_layer().layer(b_runs.service());
    buy(&b, NOW).await;
    let from_a = signed_header(&a, &payer()).await;
    let r = get_with(&b, "/paid", [from_a]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.reason());
    assert!(r.reason().is_some_and(|c| c.starts_with("invalid_siwx_")));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        (a_runs.get(), b_runs.get()),
        (0, 1),
        "only B's paid call ran"
    );
}

#[tokio::test]
async fn credit_bought_for_a_cheap_product_does_not_pay_a_dear_one() {
    // Two prepaid layers (two products, each its own default ledger): a bundle bought on the
    // cheap one, then a valid sign-in at the dear one. A bundle covers the routes of its own
    // layer only. (Layers sharing one ledger share credit: see SECURITY.md.)
    let (cheap_runs, dear_runs) = (Runs::default(), Runs::default());
    let clock = clock();
    let dear_layer = builder(&clock)
        .resource_base(BASE)
        .prepaid(Prepaid::new(Bundle::calls(10).for_price("$1")).clock(clock.clone()))
        .build()
        .unwrap();
    let cheap = prepaid_layer().layer(cheap_runs.service());
    let dear = dear_layer.layer(dear_runs.service());
    buy(&cheap, NOW).await;
    let r = get_with(&dear, "/paid", [signed_header(&dear, &payer()).await]).await;
    refused(&r, StatusCode::PAYMENT_REQUIRED, "prepaid_credit_exhausted");
    assert_eq!((cheap_runs.get(), dear_runs.get()), (1, 0));
}

#[tokio::test]
async fn refusals_of_opt_in_features_are_never_cacheable() {
    // 401 (sign-in), 409 (id conflict), 402 (credit exhausted): a shared cache must not
    // replay a refusal to another client. (The main table's answers: tests/catalogue.rs.)
    let runs = Runs::default();
    let svc = prepaid_layer().layer(runs.service());
    let decl = declaration(&get_with(&svc, "/paid", []).await);
    let forged = header(&payload(
        &tower_x402::test_util::PrivateKeySigner::random(),
        payer().address(),
        &decl,
        |_| {},
    ));
    let r = get_with(&svc, "/paid", [forged]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    refused(&r, StatusCode::PAYMENT_REQUIRED, "prepaid_credit_exhausted");
    assert_eq!(runs.get(), 0);

    let hits = Hits::new();
    let svc = app(&hits).route_layer(builder(&clock()).idempotency(id_store()).build().unwrap());
    assert_eq!(
        get_with(&svc, "/paid", [with_id("cache_test_id_0001")])
            .await
            .status,
        StatusCode::OK
    );
    let r = get_with(&svc, "/paid", [with_id("cache_test_id_0001")]).await;
    refused(&r, StatusCode::CONFLICT, "payment_identifier_conflict");
    assert_eq!(hits.get(), 1);
}

// ------------------------------------------------------------------------------------------------
// gRPC

/// A gRPC call (`POST`, `application/grpc`) to `path` with `headers` as metadata.
#[cfg(feature = "tonic")]
fn grpc_call(
    path: &str,
    headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
) -> http::Request<axum::body::Body> {
    let mut req = http::Request::post(format!("{BASE}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(axum::body::Body::empty())
        .unwrap();
    req.headers_mut().extend(headers);
    req
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn a_proof_bought_for_an_http_route_does_not_pay_a_grpc_method() {
    let hits = Hits::new();
    let svc = layer(&clock())
        .grpc()
        .layer(plain_service::<axum::body::Body>(hits.clone()));
    let req = requirements();
    let mut v = v2_json(&req, &exact_payload(&payer(), &req, NOW), None);
    v["resource"] = json!({ "url": "http://api.test/paid" });
    let r = send(
        &svc,
        grpc_call(
            "/weather.Weather/Forecast",
            [(PAYMENT_SIGNATURE, encode(&v))],
        ),
    )
    .await;
    // Trailers-only FAILED_PRECONDITION, the reason in the challenge metadata.
    assert_eq!(r.header("grpc-status"), Some("9"));
    assert_eq!(r.challenge().error.as_deref(), Some("resource_mismatch"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(hits.get(), 0);
    // The method's own resource pays.
    v["resource"] = json!({ "url": "http://api.test/weather.Weather/Forecast" });
    let r = send(
        &svc,
        grpc_call(
            "/weather.Weather/Forecast",
            [(PAYMENT_SIGNATURE, encode(&v))],
        ),
    )
    .await;
    assert_eq!(r.header("grpc-status"), None, "{:?}", r.headers);
    assert_eq!(hits.get(), 1);
}

#[cfg(feature = "tonic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_proof_over_http_and_grpc_at_once_runs_one_handler() {
    // One layer serving a REST route and a gRPC service: 64 copies of one proof, half each way.
    let hits = Hits::new();
    let paywall = layer(&clock());
    let rest = app(&hits).route_layer(paywall.clone());
    let grpc = paywall
        .grpc()
        .layer(plain_service::<axum::body::Body>(hits.clone()));
    let proof = proof_v2();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (rest, grpc, proof) = (rest.clone(), grpc.clone(), proof.clone());
            tokio::spawn(async move {
                if i % 2 == 0 {
                    get_with(&rest, "/paid", [proof]).await
                } else {
                    send(&grpc, grpc_call("/weather.Weather/Forecast", [proof])).await
                }
            })
        })
        .collect();
    let replies = join_all(tasks).await;
    let served = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK && r.header("grpc-status").is_none())
        .count();
    assert_eq!(served, 1);
    assert_eq!(hits.get(), 1);
    for r in replies.iter().filter(|r| r.header("grpc-status").is_some()) {
        assert_eq!(r.header("grpc-status"), Some("9"));
        assert_eq!(r.challenge().error.as_deref(), Some(NONCE_USED));
    }
}

// ------------------------------------------------------------------------------------------------
// A token that is not there (the reference's `asset_not_deployed_contract`)

#[cfg(feature = "onchain")]
#[tokio::test]
async fn an_asset_without_contract_code_is_refused_before_the_handler_and_any_transaction() {
    use alloy_provider::Provider;
    use tower_x402::settle::onchain::OnchainSettler;
    let Some(chain) = chain::Chain::start("asset_without_code").await else {
        return;
    };
    // The route's token address holds no code on this chain (a wrong address, another chain).
    chain.set_code(chain::TOKEN, "0x").await;
    let sent_before = chain
        .provider()
        .get_transaction_count(chain::RELAYER)
        .await
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hits = Hits::new();
    for batched in [true, false] {
        let relayer: tower_x402::test_util::PrivateKeySigner = chain::RELAYER_KEY.parse().unwrap();
        let settler = OnchainSettler::connect(chain.url(), relayer)
            .await
            .unwrap()
            .with_batched_check(batched);
        let svc = app(&hits).route_layer(
            PaymentLayer::builder()
                .no_challenge_binding()
                .pay_to(PAY_TO)
                .price(PRICE)
                .network(tower_x402::Network::BASE_SEPOLIA)
                .settler(settler)
                .build()
                .unwrap(),
        );
        let proof = tower_x402::test_util::pay(
            &payer(),
            &requirements(),
            now,
            tower_x402::proto::X402Version::V2,
        );
        let r = get_with(&svc, "/paid", [proof.clone()]).await;
        refused(
            &r,
            StatusCode::PAYMENT_REQUIRED,
            "asset_not_deployed_contract",
        );
        // Refused in the pre-check: the proof was not spent, and still cannot buy anything.
        let r = get_with(&svc, "/paid", [proof]).await;
        refused(
            &r,
            StatusCode::PAYMENT_REQUIRED,
            "asset_not_deployed_contract",
        );
    }
    assert_eq!(hits.get(), 0);
    let sent_after = chain
        .provider()
        .get_transaction_count(chain::RELAYER)
        .await
        .unwrap();
    assert_eq!(sent_after, sent_before, "no transaction was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_sign_in_header_sent_32_times_at_once_takes_one_call() {
    // A captured (or replayed by a buggy client) sign-in, raced: its nonce is single-use,
    // so one call is served and one credit taken; the rest are 401 `invalid_siwx_nonce_reused`.
    let runs = Runs::default();
    let svc = prepaid_layer().layer(runs.service());
    buy(&svc, NOW).await;
    let h = signed_header(&svc, &payer()).await;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (svc, h) = (svc.clone(), h.clone());
            tokio::spawn(async move { get_with(&svc, "/paid", [h]).await })
        })
        .collect();
    let replies = join_all(tasks).await;
    let served: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .collect();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].json()["remaining"], json!(8), "one credit taken");
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        refused(r, StatusCode::UNAUTHORIZED, "invalid_siwx_nonce_reused");
    }
    assert_eq!(runs.get(), 2, "the paying call and one sign-in");
}
