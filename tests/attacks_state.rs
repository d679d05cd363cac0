//! Red-team batch 2 (issue #23, item 5), stateful surfaces: idempotency, prepaid credit,
//! upto metering, gRPC, two instances and the relayer. Each attack asserts what it got and
//! how often the handler ran and the settler was called (counted). Every v2 proof signs the
//! requirement the server's own 402 offered (as official clients do).
#![cfg(all(feature = "test-util", feature = "axum"))]

#[cfg(feature = "onchain")]
mod chain;
mod common;
#[cfg(feature = "redis")]
#[path = "common/redis_server.rs"]
mod redis_server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::routing::get;
use common::siwx::*;
use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower::Layer;
use tower_x402::clock::FixedClock;
use tower_x402::idempotency::MemoryIdempotencyStore;
use tower_x402::prepaid::{Bundle, Prepaid};
use tower_x402::primitives::{Address, U256, address};
use tower_x402::proto::header::PAYMENT_SIGNATURE;
use tower_x402::proto::v2::PaymentRequired;
use tower_x402::settle::{SettleError, Settlement, SettlementMode, Settler};
use tower_x402::test_util::{PrivateKeySigner, encode, exact_payload, pay_upto, upto_payload};
use tower_x402::upto::Usage;
use tower_x402::{
    Asset, EvmVerifier, MemoryNonceStore, PaymentLayer, PaymentOption, VerifiedPayment,
};

/// Counts settlements and records their amounts; yields so concurrent requests interleave.
#[derive(Clone, Default)]
struct Recording(Arc<Mutex<Vec<U256>>>);

impl Recording {
    fn calls(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn amounts(&self) -> Vec<U256> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait]
impl Settler for Recording {
    async fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        self.0.lock().unwrap().push(payment.amount);
        tokio::task::yield_now().await;
        Ok(Settlement::default())
    }
}

/// The challenge key every instance of one deployment shares.
const SHARED_KEY: [u8; 32] = [0x5a; 32];

fn shared_keys() -> tower_x402::ChallengeKeys {
    tower_x402::ChallengeKeys::new(SHARED_KEY)
}

/// The replies of spawned requests (spawned at once: they run concurrently).
async fn join_all(tasks: Vec<tokio::task::JoinHandle<Reply>>) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(tasks.len());
    for t in tasks {
        replies.push(t.await.expect("request task"));
    }
    replies
}

/// The 402 `svc` answers for `path` without payment.
async fn offer<S, B>(svc: &S, path: &str) -> PaymentRequired
where
    S: tower::Service<http::Request<axum::body::Body>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: std::fmt::Debug,
{
    let r = get_with(svc, path, []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{:?}", r.body);
    r.challenge()
}

/// The v2 document an official client sends for `offer.accepts[0]`, signed by `signer` at
/// `now`, carrying payment id `id` when given.
fn paying(offer: &PaymentRequired, signer: &PrivateKeySigner, now: u64, id: Option<&str>) -> Value {
    let req = &offer.accepts[0];
    let mut v = json!({
        "x402Version": 2,
        "resource": offer.resource,
        "accepted": req,
        "payload": exact_payload(signer, req, now),
    });
    if let Some(id) = id {
        v["extensions"] =
            json!({ "payment-identifier": { "info": { "required": false, "id": id } } });
    }
    v
}

fn header(v: &Value) -> (HeaderName, HeaderValue) {
    (PAYMENT_SIGNATURE, encode(v))
}

// ------------------------------------------------------------------------------------------------
// Idempotency: make the client pay twice, poison the store

/// A layer with idempotency on `clock`, settling with `settler` in `mode`.
fn idem_layer(
    clock: &FixedClock,
    store: &MemoryIdempotencyStore,
    settler: &Recording,
    mode: SettlementMode,
) -> PaymentLayer {
    builder(clock)
        .settler(settler.clone())
        .settlement_mode(mode)
        .idempotency(store.clone())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_outlasting_valid_before_keeps_its_payment_id() {
    // The handler is still running when the proof's `validBefore` passes. The client (timed
    // out) signs a fresh proof for the same logical request, same payment id: it must meet
    // the id held, not start a second run and a second charge.
    const ID: &str = "slow_handler_id_0001";
    for mode in [SettlementMode::AfterHandler, SettlementMode::BeforeHandler] {
        let clock = clock();
        let store = MemoryIdempotencyStore::with_limits_and_clock(100, 1 << 20, clock.clone());
        let (hits, settler) = (Hits::gated(), Recording::default());
        let svc = app(&hits).route_layer(idem_layer(&clock, &store, &settler, mode));
        let first_offer = offer(&svc, "/paid").await;
        let first = header(&paying(&first_offer, &payer(), NOW, Some(ID)));
        let slow = {
            let svc = svc.clone();
            tokio::spawn(async move { get_with(&svc, "/paid", [first]).await })
        };
        while hits.get() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Past the first proof's validBefore (NOW + maxTimeoutSeconds).
        let later = NOW + first_offer.accepts[0].max_timeout_seconds + 30;
        clock.set(later);
        let retry_offer = offer(&svc, "/paid").await;
        let retry = header(&paying(&retry_offer, &payer(), later, Some(ID)));
        // Before the fix this second proof started a second run (held at the gate: a hang).
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            get_with(&svc, "/paid", [retry.clone()]),
        )
        .await
        .unwrap_or_else(|_| panic!("{mode:?}: a second run started under the held id"));
        assert_eq!(
            r.outcome(),
            (
                StatusCode::CONFLICT,
                Some("payment_identifier_conflict".into())
            ),
            "{mode:?}: the id is still held while its handler runs"
        );
        hits.open();
        assert_eq!(slow.await.unwrap().status, StatusCode::OK);
        // Finished: the same retry is still a conflict, never a second run.
        let r = get_with(&svc, "/paid", [retry]).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{mode:?}");
        assert_eq!((hits.get(), settler.calls()), (1, 1), "{mode:?}");
    }
}

#[tokio::test]
async fn a_retry_with_a_fresh_proof_after_valid_before_is_not_charged_again() {
    // The client lost the answer to a served request and retries once its proof expired,
    // with a fresh proof (the old one no longer verifies) and the same payment id.
    const ID: &str = "lost_answer_id_00001";
    let clock = clock();
    let store = MemoryIdempotencyStore::with_limits_and_clock(100, 1 << 20, clock.clone());
    let (hits, settler) = (Hits::new(), Recording::default());
    let svc = app(&hits).route_layer(idem_layer(
        &clock,
        &store,
        &settler,
        SettlementMode::AfterHandler,
    ));
    let o = offer(&svc, "/paid").await;
    let r = get_with(
        &svc,
        "/paid",
        [header(&paying(&o, &payer(), NOW, Some(ID)))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    for late in [o.accepts[0].max_timeout_seconds + 1, 600, 3000] {
        clock.set(NOW + late);
        let o = offer(&svc, "/paid").await;
        let r = get_with(
            &svc,
            "/paid",
            [header(&paying(&o, &payer(), NOW + late, Some(ID)))],
        )
        .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{late} s later");
    }
    assert_eq!((hits.get(), settler.calls()), (1, 1));
}

#[tokio::test]
async fn ids_are_per_payer_so_another_payer_cannot_squat_one() {
    // The attacker (its own key) pays first under the id the victim will use.
    const ID: &str = "victim_chosen_id_0001";
    let clock = clock();
    let store = MemoryIdempotencyStore::with_limits_and_clock(100, 1 << 20, clock.clone());
    let (hits, settler) = (Hits::new(), Recording::default());
    let svc = app(&hits).route_layer(idem_layer(
        &clock,
        &store,
        &settler,
        SettlementMode::AfterHandler,
    ));
    let attacker = PrivateKeySigner::random();
    let o = offer(&svc, "/paid").await;
    let r = get_with(
        &svc,
        "/paid",
        [header(&paying(&o, &attacker, NOW, Some(ID)))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let victim = get_with(
        &svc,
        "/paid",
        [header(&paying(&o, &payer(), NOW, Some(ID)))],
    )
    .await;
    assert_eq!(victim.status, StatusCode::OK, "{:?}", victim.reason());
    assert_eq!(
        victim.json()["payer"],
        json!(payer().address().to_checksum(None)),
        "the victim got its own answer, not the attacker's"
    );
    assert_eq!((hits.get(), settler.calls()), (2, 2));
    assert_eq!(store.len(), 2);
}

#[tokio::test]
async fn junk_proofs_with_fresh_ids_never_enter_the_idempotency_store() {
    // Memory: 200 proofs that do not verify and 20 that verify but whose handler refuses,
    // each under its own id. None may stay in the store (nor in the replay guard).
    let clock = clock();
    let store = MemoryIdempotencyStore::with_limits_and_clock(1000, 1 << 20, clock.clone());
    let nonces = MemoryNonceStore::with_capacity_and_clock(1000, clock.clone());
    let (hits, settler) = (Hits::new(), Recording::default());
    let svc = app(&hits).route_layer(
        builder(&clock)
            .nonce_store(nonces.clone())
            .settler(settler.clone())
            .idempotency(store.clone())
            .build()
            .unwrap(),
    );
    let o = offer(&svc, "/paid").await;
    for i in 0..200 {
        let mut v = paying(&o, &payer(), NOW, Some(&format!("junk_id_{i:012}")));
        // Signed by someone else than `from`.
        v["payload"]["authorization"]["from"] = json!(Address::repeat_byte(0x11));
        let r = get_with(&svc, "/paid", [header(&v)]).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    }
    for i in 0..20 {
        let v = paying(&o, &payer(), NOW, Some(&format!("refused_id_{i:010}")));
        let mut req = request("/paid", [header(&v)]);
        req.headers_mut()
            .insert(STATUS_HEADER, HeaderValue::from_static("422"));
        assert_eq!(
            send(&svc, req).await.status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
    assert_eq!(store.len(), 0, "no id is held");
    assert_eq!(nonces.len(), 0, "no proof is held");
    assert_eq!((hits.get(), settler.calls()), (20, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_sharing_stores_run_one_handler_per_payment_id() {
    // Two separately built layers (two instances) on one shared nonce store and one shared
    // idempotency store: 32 copies of one proof with an id, split across both, while the
    // first run is held in its handler.
    const ID: &str = "two_instances_id_0001";
    let clock = clock();
    let ids = MemoryIdempotencyStore::with_limits_and_clock(100, 1 << 20, clock.clone());
    let nonces = MemoryNonceStore::with_capacity_and_clock(100, clock.clone());
    let (hits, settler) = (Hits::gated(), Recording::default());
    let instance = || {
        app(&hits).route_layer(
            builder(&clock)
                .bind_challenges(shared_keys())
                .nonce_store(nonces.clone())
                .settler(settler.clone())
                .idempotency(ids.clone())
                .build()
                .unwrap(),
        )
    };
    let (a, b) = (instance(), instance());
    let o = offer(&a, "/paid").await;
    let proof = header(&paying(&o, &payer(), NOW, Some(ID)));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            let proof = proof.clone();
            tokio::spawn(async move { get_with(&svc, "/paid", [proof]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    hits.open();
    let replies = join_all(tasks).await;
    let mut bodies = std::collections::HashSet::new();
    for r in &replies {
        match r.status {
            StatusCode::OK => {
                bodies.insert(r.body.clone());
            }
            _ => assert_eq!(
                r.outcome(),
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some("payment_in_progress".into())
                )
            ),
        }
    }
    assert_eq!(bodies.len(), 1, "every 200 is the one answer");
    // Afterwards both instances replay it.
    for svc in [&a, &b] {
        let r = get_with(svc, "/paid", [proof.clone()]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(bodies.contains(&r.body));
    }
    assert_eq!((hits.get(), settler.calls()), (1, 1));
}

#[tokio::test]
async fn another_body_under_the_same_proof_and_id_on_another_instance_is_not_run_again() {
    // The fingerprint covers the proof and the request target, not the body (as documented):
    // the holder of a proof re-sending it with another body, on another instance, gets the
    // first answer replayed, never a second run of the handler.
    const ID: &str = "body_swap_id_0000001";
    let clock = clock();
    let ids = MemoryIdempotencyStore::with_limits_and_clock(100, 1 << 20, clock.clone());
    let nonces = MemoryNonceStore::with_capacity_and_clock(100, clock.clone());
    let settler = Recording::default();
    let runs = Arc::new(AtomicUsize::new(0));
    let instance = || {
        let runs = runs.clone();
        Router::new()
            .route(
                "/paid",
                axum::routing::post(move |body: String| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    async move { format!("ordered {body}") }
                }),
            )
            .route_layer(
                builder(&clock)
                    .bind_challenges(shared_keys())
                    .nonce_store(nonces.clone())
                    .settler(settler.clone())
                    .idempotency(ids.clone())
                    .build()
                    .unwrap(),
            )
    };
    let (a, b) = (instance(), instance());
    let post = |body: &'static str, proof: Option<(HeaderName, HeaderValue)>| {
        let mut req = http::Request::post(format!("{BASE}/paid"))
            .body(axum::body::Body::from(body))
            .unwrap();
        req.headers_mut().extend(proof);
        req
    };
    let o = send(&a, post("1 widget", None)).await.challenge();
    let proof = header(&paying(&o, &payer(), NOW, Some(ID)));
    let first = send(&a, post("1 widget", Some(proof.clone()))).await;
    assert_eq!(&first.body[..], b"ordered 1 widget");
    let swapped = send(&b, post("1000 widgets", Some(proof))).await;
    assert_eq!(swapped.status, StatusCode::OK);
    assert_eq!(swapped.body, first.body, "the first answer, replayed");
    assert_eq!((runs.load(Ordering::SeqCst), settler.calls()), (1, 1));
}

#[tokio::test]
async fn a_stored_answer_is_not_replayed_for_another_route() {
    // The same proof and id sent to the dear route after the cheap one was served: the id is
    // bound to its request target, so it neither replays /paid's answer nor runs /premium.
    const ID: &str = "route_bound_id_00001";
    let clock = clock();
    let store = MemoryIdempotencyStore::with_limits_and_clock(100, 1 << 20, clock.clone());
    let (hits, settler) = (Hits::new(), Recording::default());
    let svc = app(&hits).route_layer(idem_layer(
        &clock,
        &store,
        &settler,
        SettlementMode::AfterHandler,
    ));
    let o = offer(&svc, "/paid").await;
    let mut v = paying(&o, &payer(), NOW, Some(ID));
    assert_eq!(
        get_with(&svc, "/paid", [header(&v)]).await.status,
        StatusCode::OK
    );
    // `resource` is optional in a v2 proof: without it, only the id's binding can refuse.
    v.as_object_mut().unwrap().remove("resource");
    let r = get_with(&svc, "/premium", [header(&v)]).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.reason());
    let r = get_with(&svc, "/paid?x=1", [header(&v)]).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.reason());
    assert_eq!((hits.get(), settler.calls()), (1, 1));
}

#[tokio::test]
async fn a_service_error_after_a_settle_first_payment_is_raised_and_never_charged_again() {
    // Settle-first: the money moves, then the inner service fails (a `tower::timeout` inside
    // the layer, say). The client paid and got nothing: that must be raised, and its retry
    // (same proof, same id) must not be charged again.
    use tower::ServiceExt;
    use tower_x402::alert::{self, Alert};
    const ID: &str = "settled_then_failed_01";
    let clock = clock();
    let store = MemoryIdempotencyStore::with_limits_and_clock(100, 1 << 20, clock.clone());
    let settler = Recording::default();
    let runs = Arc::new(AtomicUsize::new(0));
    let inner = {
        let runs = runs.clone();
        tower::service_fn(move |_req: http::Request<axum::body::Body>| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Err::<http::Response<axum::body::Body>, _>("the handler timed out") }
        })
    };
    let svc = idem_layer(&clock, &store, &settler, SettlementMode::BeforeHandler).layer(inner);
    let o = Reply::read(svc.clone().oneshot(request("/paid", [])).await.unwrap())
        .await
        .challenge();
    let proof = header(&paying(&o, &payer(), NOW, Some(ID)));
    let before = alert::count(Alert::ResponseBody);
    let failed = svc.clone().oneshot(request("/paid", [proof.clone()])).await;
    assert!(failed.is_err(), "the service error passes through");
    assert_eq!(settler.calls(), 1, "the money moved");
    assert_eq!(
        alert::count(Alert::ResponseBody) - before,
        1,
        "a settled payment without an answer is raised"
    );
    let retry = Reply::read(
        svc.clone()
            .oneshot(request("/paid", [proof]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        retry.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("payment_in_progress".into())
        )
    );
    assert_eq!((runs.load(Ordering::SeqCst), settler.calls()), (1, 1));
}

#[tokio::test]
async fn a_service_error_before_settlement_frees_the_payment_id_for_the_retry() {
    // Settle-after: the service fails, nothing is settled and the proof is given back. The
    // id must go back too, or the client's retry (same proof, same id) is locked out with
    // 503 `payment_in_progress` for as long as the id lives.
    use tower::ServiceExt;
    const ID: &str = "failed_then_retried_1";
    let clock = clock();
    let store = MemoryIdempotencyStore::with_limits_and_clock(100, 1 << 20, clock.clone());
    let settler = Recording::default();
    let runs = Arc::new(AtomicUsize::new(0));
    let inner = {
        let runs = runs.clone();
        tower::service_fn(move |_req: http::Request<axum::body::Body>| {
            // The first call fails (a transient error), the next ones answer.
            let first = runs.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    Err("transient")
                } else {
                    Ok(http::Response::new(axum::body::Body::from("served")))
                }
            }
        })
    };
    let svc = idem_layer(&clock, &store, &settler, SettlementMode::AfterHandler).layer(inner);
    let o = Reply::read(svc.clone().oneshot(request("/paid", [])).await.unwrap())
        .await
        .challenge();
    let proof = header(&paying(&o, &payer(), NOW, Some(ID)));
    let failed = svc.clone().oneshot(request("/paid", [proof.clone()])).await;
    assert!(failed.is_err());
    assert_eq!(settler.calls(), 0);
    assert_eq!(store.len(), 0, "the id was given back with the proof");
    let retry = Reply::read(
        svc.clone()
            .oneshot(request("/paid", [proof.clone()]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(retry.status, StatusCode::OK, "{:?}", retry.reason());
    assert_eq!(&retry.body[..], b"served");
    // And now it is a replay, not a third run.
    let again = Reply::read(
        svc.clone()
            .oneshot(request("/paid", [proof]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(again.body, retry.body);
    assert_eq!((runs.load(Ordering::SeqCst), settler.calls()), (2, 1));
}

// ------------------------------------------------------------------------------------------------
// Prepaid credit

fn prepaid_layer(calls: u64) -> PaymentLayer {
    let clock = clock();
    builder(&clock)
        .resource_base(BASE)
        .prepaid(Prepaid::new(Bundle::calls(calls)).clock(clock.clone()))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_credit_raced_by_32_sign_ins_is_spent_once() {
    // Ten calls bought (the paying call is the first); eight more spent; then 32 distinct,
    // valid sign-ins race for the last credit.
    let runs = Runs::default();
    let svc = prepaid_layer(10).layer(runs.service());
    buy(&svc, NOW).await;
    for _ in 0..8 {
        let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let mut headers = Vec::new();
    for _ in 0..32 {
        headers.push(signed_header(&svc, &payer()).await);
    }
    let tasks: Vec<_> = headers
        .into_iter()
        .map(|h| {
            let svc = svc.clone();
            tokio::spawn(async move { get_with(&svc, "/paid", [h]).await })
        })
        .collect();
    let replies = join_all(tasks).await;
    let served: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .collect();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].json()["remaining"], json!(0));
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(
            r.outcome(),
            (
                StatusCode::PAYMENT_REQUIRED,
                Some("prepaid_credit_exhausted".into())
            )
        );
    }
    assert_eq!(runs.get(), 10, "one paid call and nine sign-ins");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_proof_that_bought_a_bundle_replayed_32_times_at_once_buys_one_bundle() {
    // Credit is granted on settlement: 32 copies of the buying proof at once must grant one
    // bundle (10 calls, the paying one included), not 32.
    let runs = Runs::default();
    let svc = prepaid_layer(10).layer(runs.service());
    let o = offer(&svc, "/paid").await;
    let proof = header(&paying(&o, &payer(), NOW, None));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (svc, proof) = (svc.clone(), proof.clone());
            tokio::spawn(async move { get_with(&svc, "/paid", [proof]).await })
        })
        .collect();
    let replies = join_all(tasks).await;
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.status == StatusCode::OK)
            .count(),
        1
    );
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
        );
    }
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(r.json()["remaining"], json!(8), "one bundle granted");
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_sign_in_and_a_payment_in_one_request_charge_once() {
    // A client (or a proxy merging retries) sends a valid sign-in with credit and a payment
    // proof together: one of them pays for the call, never both.
    let runs = Runs::default();
    let settler = Recording::default();
    let clock = clock();
    let svc = builder(&clock)
        .resource_base(BASE)
        .settler(settler.clone())
        .prepaid(Prepaid::new(Bundle::calls(10)).clock(clock.clone()))
        .build()
        .unwrap()
        .layer(runs.service());
    buy(&svc, NOW).await;
    let before = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    let left = before.json()["remaining"].as_u64().unwrap();
    let o = offer(&svc, "/paid").await;
    let both = [
        signed_header(&svc, &payer()).await,
        header(&paying(&o, &payer(), NOW, None)),
    ];
    let r = get_with(&svc, "/paid", both).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    let settled = settler.calls() - 1;
    let after = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    let now_left = after.json()["remaining"].as_u64().unwrap();
    // Either the proof paid (a new bundle of 10, this call its first: +9, then -1 for the
    // check) or the credit did (-1, then -1): never the proof and a credit.
    match settled {
        1 => assert_eq!(
            now_left,
            left + 9 - 1,
            "the proof paid, the credit is untouched"
        ),
        0 => assert_eq!(now_left, left - 2, "the credit paid, nothing settled"),
        n => panic!("{n} settlements for one call"),
    }
    assert_eq!(runs.get(), 4);
}

#[tokio::test]
async fn a_sign_in_claiming_a_payer_with_credit_is_refused_and_takes_none() {
    // The victim holds credit; the attacker signs with its own key a message claiming the
    // victim's address.
    let runs = Runs::default();
    let svc = prepaid_layer(10).layer(runs.service());
    buy(&svc, NOW).await;
    let attacker = PrivateKeySigner::random();
    for _ in 0..3 {
        let decl = declaration(&get_with(&svc, "/paid", []).await);
        let forged = common::siwx::header(&payload(&attacker, payer().address(), &decl, |_| {}));
        let r = get_with(&svc, "/paid", [forged]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.reason());
        assert!(r.reason().is_some_and(|c| c.starts_with("invalid_siwx_")));
    }
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json()["remaining"],
        json!(8),
        "the forgeries took nothing"
    );
    assert_eq!(runs.get(), 2);
}

/// An edit of a sign-in message before it is signed.
type Tweak = Box<dyn Fn(&mut Value)>;

#[tokio::test]
async fn a_sign_in_phished_for_another_site_or_stale_is_refused() {
    // Messages the victim really signed, but not for this server's challenge: another domain
    // or URI (phished on another site), a nonce it never issued, or expired.
    let runs = Runs::default();
    let svc = prepaid_layer(10).layer(runs.service());
    buy(&svc, NOW).await;
    let tweaks: Vec<(&str, Tweak)> = vec![
        ("domain", Box::new(|p| p["domain"] = json!("evil.example"))),
        (
            "uri",
            Box::new(|p| p["uri"] = json!("https://evil.example/paid")),
        ),
        (
            "nonce",
            Box::new(|p| p["nonce"] = json!("a1b2c3d4e5f6a7b8c9d0")),
        ),
        (
            "expirationTime",
            Box::new(|p| p["expirationTime"] = json!("2025-06-15T00:00:00Z")),
        ),
        ("chainId", Box::new(|p| p["chainId"] = json!("eip155:1"))),
    ];
    for (what, tweak) in tweaks {
        let decl = declaration(&get_with(&svc, "/paid", []).await);
        let h = common::siwx::header(&payload(&payer(), payer().address(), &decl, |p| tweak(p)));
        let r = get_with(&svc, "/paid", [h]).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{what}: {:?}",
            r.reason()
        );
        assert!(
            r.reason().is_some_and(|c| c.starts_with("invalid_siwx_")),
            "{what}"
        );
    }
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(r.json()["remaining"], json!(8));
    assert_eq!(runs.get(), 2);
}

// ------------------------------------------------------------------------------------------------
// upto

const FACILITATOR: Address = address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");

fn upto_option() -> PaymentOption {
    PaymentOption::upto(&Asset::usdc_base_sepolia(), "$0.05", PAY_TO, FACILITATOR).unwrap()
}

/// A metered route at `path` charging `?use=N` in `?parts=K` concurrent charges.
fn metered_route(path: &str, hits: &Hits) -> Router {
    let hits = hits.clone();
    Router::new().route(
        path,
        get(move |usage: Option<Usage>, uri: http::Uri| {
            let hits = hits.clone();
            async move {
                hits.run(&http::HeaderMap::new(), None).await;
                let Some(usage) = usage else {
                    return "unmetered".to_owned();
                };
                let q: Vec<u64> = uri
                    .query()
                    .unwrap_or_default()
                    .split('&')
                    .filter_map(|kv| kv.split_once('=')?.1.parse().ok())
                    .collect();
                let (each, parts) = (
                    q.first().copied().unwrap_or(0),
                    q.get(1).copied().unwrap_or(1),
                );
                let tasks: Vec<_> = (0..parts)
                    .map(|_| {
                        let usage = usage.clone();
                        tokio::spawn(async move { usage.charge_atomic(each) })
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
                format!("{}", usage.total())
            }
        }),
    )
}

fn upto_layer(nonces: &MemoryNonceStore, settler: &Recording) -> PaymentLayer {
    let clock = clock();
    PaymentLayer::builder()
        .accept(upto_option())
        .verifier(EvmVerifier::new().with_clock(clock))
        .nonce_store(nonces.clone())
        .settler(settler.clone())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_metering_past_the_permit_settles_nothing_above_it() {
    // 16 concurrent charges of 1/10 of the maximum each: the meter must never let the
    // settled amount pass the signed maximum (50 000), whatever the interleaving.
    let (hits, settler) = (Hits::new(), Recording::default());
    let nonces = MemoryNonceStore::with_capacity_and_clock(100, clock());
    let svc = metered_route("/gen", &hits).layer(upto_layer(&nonces, &settler));
    // Each call pays the requirement its own target's 402 offered (bound to path and query).
    let over = "/gen?each=5000&parts=16";
    let req = offer(&svc, over).await.accepts[0].clone();
    let max = req.amount;
    let proof = pay_upto(&req, &upto_payload(&payer(), &req, NOW));
    let r = get_with(&svc, over, [proof]).await;
    // Overrun: nothing settled, the body withheld.
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_upto_evm_payload_settlement_exceeds_amount".into())
        )
    );
    assert!(!String::from_utf8_lossy(&r.body).contains("50000"));
    // Exactly the maximum, in 10 concurrent parts: settled in full, not a unit more.
    let exact = "/gen?each=5000&parts=10";
    let req = offer(&svc, exact).await.accepts[0].clone();
    let proof = pay_upto(&req, &upto_payload(&payer(), &req, NOW));
    let r = get_with(&svc, exact, [proof]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(settler.amounts(), vec![max]);
    assert_eq!(hits.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_upto_permit_sent_to_two_metered_routes_at_once_settles_once() {
    // Two routes, each its own layer, one shared replay guard: 32 copies of one permit
    // bought at /a. (The copies at /b are refused by /a's bound challenge or by the replay
    // guard: either way, never served.)
    let (hits, settler) = (Hits::new(), Recording::default());
    let nonces = MemoryNonceStore::with_capacity_and_clock(100, clock());
    let svc = metered_route("/a", &hits)
        .layer(upto_layer(&nonces, &settler))
        .merge(metered_route("/b", &hits).layer(upto_layer(&nonces, &settler)));
    let req = offer(&svc, "/a?each=7").await.accepts[0].clone();
    let proof = pay_upto(&req, &upto_payload(&payer(), &req, NOW));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (svc, proof) = (svc.clone(), proof.clone());
            let path = if i % 2 == 0 { "/a?each=7" } else { "/b?each=7" };
            tokio::spawn(async move { get_with(&svc, path, [proof]).await })
        })
        .collect();
    let replies = join_all(tasks).await;
    let served = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(served, 1);
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{:?}", r.reason());
    }
    assert_eq!(hits.get(), 1);
    assert_eq!(settler.amounts(), vec![U256::from(7)]);
}

// ------------------------------------------------------------------------------------------------
// gRPC

#[cfg(feature = "tonic")]
fn grpc_call(
    headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
) -> http::Request<axum::body::Body> {
    let mut req = http::Request::post(format!("{BASE}/weather.Weather/Forecast"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(axum::body::Body::empty())
        .unwrap();
    req.headers_mut().extend(headers);
    req
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn a_proof_in_binary_metadata_is_not_a_payment_and_stays_unspent() {
    // gRPC `-bin` metadata is base64 on the wire and decoded by gRPC libraries: a proof put
    // there is not the `payment-signature` header, so it buys nothing and is not consumed.
    let (hits, settler) = (Hits::new(), Recording::default());
    let svc = builder(&clock())
        .settler(settler.clone())
        .build()
        .unwrap()
        .grpc()
        .layer(plain_service::<axum::body::Body>(hits.clone()));
    let challenge = send(&svc, grpc_call([])).await;
    assert_eq!(challenge.header("grpc-status"), Some("9"));
    let o = challenge.challenge();
    let (_, value) = header(&paying(&o, &payer(), NOW, None));
    for name in ["payment-signature-bin", "x-payment-bin"] {
        let r = send(
            &svc,
            grpc_call([(HeaderName::from_static(name), value.clone())]),
        )
        .await;
        assert_eq!(r.header("grpc-status"), Some("9"), "{name}");
        assert!(r.body.is_empty(), "trailers-only: no paid content");
    }
    assert_eq!((hits.get(), settler.calls()), (0, 0));
    let r = send(&svc, grpc_call([(PAYMENT_SIGNATURE, value)])).await;
    assert_eq!(r.header("grpc-status"), None, "the proof was never spent");
    assert_eq!((hits.get(), settler.calls()), (1, 1));
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn a_grpc_error_status_is_not_charged_and_the_proof_pays_the_retry() {
    // The handler answers trailers-only `grpc-status: 14` (UNAVAILABLE) on HTTP 200: the
    // client must not pay for the error, and its retry with the same proof is served once.
    let (hits, settler) = (Hits::new(), Recording::default());
    let fail = Arc::new(AtomicUsize::new(1));
    let inner = {
        let (hits, fail) = (hits.clone(), fail.clone());
        tower::service_fn(move |_req: http::Request<axum::body::Body>| {
            let (hits, fail) = (hits.clone(), fail.clone());
            async move {
                hits.run(&http::HeaderMap::new(), None).await;
                let mut res = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                res.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                if fail.fetch_sub(1, Ordering::SeqCst) > 0 {
                    res.headers_mut()
                        .insert("grpc-status", HeaderValue::from_static("14"));
                } else {
                    fail.store(0, Ordering::SeqCst);
                }
                Ok::<_, std::convert::Infallible>(res)
            }
        })
    };
    let svc = builder(&clock())
        .settler(settler.clone())
        .build()
        .unwrap()
        .grpc()
        .layer(inner);
    let o = send(&svc, grpc_call([])).await.challenge();
    let proof = header(&paying(&o, &payer(), NOW, None));
    let r = send(&svc, grpc_call([proof.clone()])).await;
    assert_eq!(r.header("grpc-status"), Some("14"));
    assert!(r.has_no_receipt(), "no receipt for an error");
    assert_eq!(settler.calls(), 0);
    let r = send(&svc, grpc_call([proof.clone()])).await;
    assert_eq!(r.header("grpc-status"), None);
    assert_eq!(settler.calls(), 1);
    let r = send(&svc, grpc_call([proof])).await;
    assert_eq!(r.header("grpc-status"), Some("9"), "spent now");
    assert_eq!((hits.get(), settler.calls()), (2, 1));
}

// ------------------------------------------------------------------------------------------------
// Two instances on one Redis

#[cfg(feature = "redis")]
#[tokio::test]
async fn two_instances_on_one_redis_hold_a_payment_id_past_valid_before() {
    use redis::AsyncCommands;
    use tower_x402::idempotency::RedisIdempotencyStore;
    use tower_x402::nonce::RedisNonceStore;
    const ID: &str = "redis_held_id_000001";
    let Some(server) = redis_server::RedisServer::start(
        "two_instances_on_one_redis_hold_a_payment_id_past_valid_before",
    ) else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (hits, settler) = (Hits::new(), Recording::default());
    let mut instances = Vec::new();
    for _ in 0..2 {
        let nonces = RedisNonceStore::connect(&server.url()).await.unwrap();
        let ids = RedisIdempotencyStore::new(nonces.connection());
        instances.push(
            app(&hits).route_layer(
                PaymentLayer::builder()
                    .pay_to(PAY_TO)
                    .price(PRICE)
                    .network(tower_x402::Network::BASE_SEPOLIA)
                    .bind_challenges(shared_keys())
                    .nonce_store(nonces)
                    .idempotency(ids)
                    .settler(settler.clone())
                    .build()
                    .unwrap(),
            ),
        );
    }
    let o = offer(&instances[0], "/paid").await;
    let r = get_with(
        &instances[0],
        "/paid",
        [header(&paying(&o, &payer(), now, Some(ID)))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // The id outlives the proof's validBefore (now + maxTimeoutSeconds) by far.
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!(
        "x402:idem:{}:{ID}",
        tower_x402::primitives::hex::encode(payer().address().as_slice())
    );
    let pttl: i64 = raw.pttl(&key).await.unwrap();
    let valid_for = o.accepts[0].max_timeout_seconds as i64 * 1000;
    assert!(pttl > valid_for * 10, "pttl {pttl} ms");
    // The other instance, a fresh proof, the same id: a conflict, not a second charge.
    let o = offer(&instances[1], "/paid").await;
    let r = get_with(
        &instances[1],
        "/paid",
        [header(&paying(&o, &payer(), now, Some(ID)))],
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.reason());
    assert_eq!((hits.get(), settler.calls()), (1, 1));
}

// ------------------------------------------------------------------------------------------------
// Drain the relayer

#[cfg(feature = "onchain")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payer_emptying_its_wallet_while_the_handler_runs_costs_the_relayer_nothing() {
    use alloy_provider::Provider;
    use alloy_sol_types::SolCall;
    use tower_x402::settle::onchain::OnchainSettler;
    alloy_sol_types::sol! {
        function transfer(address to, uint256 value) external returns (bool);
    }
    let Some(chain) = chain::Chain::start("payer_empties_wallet").await else {
        return;
    };
    let sent_before = chain
        .provider()
        .get_transaction_count(chain::RELAYER)
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let relayer: PrivateKeySigner = chain::RELAYER_KEY.parse().unwrap();
    let settler = OnchainSettler::connect(chain.url(), relayer).await.unwrap();
    let hits = Hits::gated();
    let svc = app(&hits).route_layer(
        PaymentLayer::builder()
            .pay_to(PAY_TO)
            .price(PRICE)
            .network(tower_x402::Network::BASE_SEPOLIA)
            .settler(settler)
            .build()
            .unwrap(),
    );
    let o = offer(&svc, "/paid").await;
    let proof = header(&paying(&o, &payer(), now, None));
    let paid = {
        let (svc, proof) = (svc.clone(), proof.clone());
        tokio::spawn(async move { get_with(&svc, "/paid", [proof]).await })
    };
    while hits.get() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Checked and running: now the payer moves everything away.
    let all = chain.balance(payer().address()).await;
    let data = transferCall {
        to: Address::repeat_byte(0x77),
        value: all,
    }
    .abi_encode();
    chain
        .send_as(payer().address(), chain::TOKEN, data.into())
        .await;
    hits.open();
    let r = paid.await.unwrap();
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{:?}", r.reason());
    assert!(
        !String::from_utf8_lossy(&r.body).contains("\"handler\""),
        "body withheld"
    );
    // Retries of the same proof cost nothing either.
    for _ in 0..3 {
        let r = get_with(&svc, "/paid", [proof.clone()]).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{:?}", r.reason());
    }
    let sent_after = chain
        .provider()
        .get_transaction_count(chain::RELAYER)
        .await
        .unwrap();
    assert_eq!(sent_after, sent_before, "the relayer sent no transaction");
    assert_eq!(hits.get(), 1, "the retries were refused before the handler");
}
