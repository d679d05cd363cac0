//! Metered billing with `upto` (Permit2), in-process: the challenge, verification refusals,
//! settling exactly the metered usage, usage above the maximum, zero usage, replays. The
//! on-chain settlement through the x402 upto proxy is in tests/upto_chain.rs.
#![cfg(all(feature = "test-util", feature = "axum"))]

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::Router;
use axum::routing::get;
use common::*;
use http::StatusCode;
use serde_json::json;
use tower::Layer;
use tower_x402::error::{ConfigError, SettleError};
use tower_x402::primitives::{Address, B256, U256, address};
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::settle::{Settlement, SettlementMode, Settler};
use tower_x402::test_util::faults::{FaultyNonceStore, Op};
use tower_x402::test_util::{pay_upto, sign_upto, upto_payload};
use tower_x402::upto::Usage;
use tower_x402::{
    Asset, EvmVerifier, MemoryNonceStore, PaymentLayer, PaymentOption, VerifiedPayment,
};

/// The account allowed to settle (the relayer).
const FACILITATOR: Address = address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
/// The signed maximum: $0.05.
const MAX: u64 = 50_000;

fn upto_option() -> PaymentOption {
    PaymentOption::upto(&Asset::usdc_base_sepolia(), "$0.05", PAY_TO, FACILITATOR)
        .expect("valid option")
}

fn upto_requirements() -> PaymentRequirements {
    upto_option().requirements().clone()
}

/// Records what it was asked to settle.
#[derive(Clone, Default)]
struct Recording(Arc<Mutex<Vec<U256>>>);

impl Recording {
    fn amounts(&self) -> Vec<U256> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait]
impl Settler for Recording {
    async fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        assert!(payment.is_upto());
        assert!(
            payment.amount
                <= payment
                    .permit2()
                    .expect("an upto permit")
                    .0
                    .permitted
                    .amount,
            "never above the maximum"
        );
        self.0.lock().unwrap().push(payment.amount);
        // A settlement takes time: other requests run meanwhile.
        tokio::task::yield_now().await;
        Ok(Settlement {
            transaction: Some(B256::repeat_byte(0xab)),
            amount: None,
            ..Default::default()
        })
    }
}

/// A route charging `?use=N` atomic units through the meter (exact also accepted at $0.001).
fn service(
    settler: &Recording,
    hits: &Hits,
) -> impl tower::Service<
    http::Request<axum::body::Body>,
    Response = http::Response<tower_x402::body::ResponseBody<axum::body::Body>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let store = MemoryNonceStore::with_capacity_and_clock(1000, clock());
    service_with(settler, hits, store)
}

/// [`service`] with `store` as the replay guard.
fn service_with(
    settler: &Recording,
    hits: &Hits,
    store: impl tower_x402::NonceStore,
) -> impl tower::Service<
    http::Request<axum::body::Body>,
    Response = http::Response<tower_x402::body::ResponseBody<axum::body::Body>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let clock = clock();
    let layer = PaymentLayer::builder()
        .no_challenge_binding()
        .accept(upto_option())
        .accept(option())
        .verifier(EvmVerifier::new().with_clock(clock.clone()))
        .nonce_store(store)
        .settler(settler.clone())
        .build()
        .expect("valid layer");
    let hits = hits.clone();
    let app = Router::new().route(
        "/generate",
        get(move |usage: Option<Usage>, uri: http::Uri| {
            let hits = hits.clone();
            async move {
                hits.run(&http::HeaderMap::new(), None).await;
                let want: u64 = uri
                    .query()
                    .and_then(|q| q.strip_prefix("use="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let Some(usage) = usage else {
                    return "exact".to_owned();
                };
                // Charge in two steps, as a handler metering its work would.
                let half = want / 2;
                let charged = usage
                    .charge_atomic(half)
                    .and_then(|_| usage.charge_atomic(want - half));
                match charged {
                    Ok(total) => format!("used {total} of {}", usage.max()),
                    Err(e) => format!("stopped: {e}"),
                }
            }
        }),
    );
    layer.layer(app)
}

fn proof() -> (http::HeaderName, http::HeaderValue) {
    let req = upto_requirements();
    pay_upto(&req, &upto_payload(&payer(), &req, NOW))
}

#[tokio::test]
async fn the_challenge_offers_upto_with_the_settling_account() {
    let (settler, hits) = (Recording::default(), Hits::new());
    let svc = service(&settler, &hits);
    let reply = get_with(&svc, "/generate", []).await;
    assert_eq!(reply.status, StatusCode::PAYMENT_REQUIRED);
    let accepts = &serde_json::to_value(reply.challenge()).unwrap()["accepts"];
    let upto = &accepts[0];
    assert_eq!(upto["scheme"], json!("upto"));
    assert_eq!(upto["amount"], json!(MAX.to_string()));
    assert_eq!(
        upto["extra"]["facilitatorAddress"],
        json!(FACILITATOR.to_checksum(None))
    );
    assert_eq!(accepts[1]["scheme"], json!("exact"));
    // v1 clients only speak exact: the v1 body (the same challenge in JSON) leaves upto out.
    let v1 = reply.v1_challenge();
    assert!(
        v1.accepts.iter().all(|r| r.scheme == "exact"),
        "{:?}",
        v1.accepts
    );
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn settles_exactly_the_metered_usage() {
    let (settler, hits) = (Recording::default(), Hits::new());
    let svc = service(&settler, &hits);
    let reply = get_with(&svc, "/generate?use=12345", [proof()]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body, "used 12345 of 50000");
    assert_eq!(settler.amounts(), vec![U256::from(12_345)]);
    let receipt = reply.receipt();
    assert_eq!(receipt["success"], json!(true));
    assert_eq!(receipt["amount"], json!("12345"), "{receipt}");
    assert_eq!(
        receipt["transaction"],
        json!(format!("{}", B256::repeat_byte(0xab)))
    );
    // The whole maximum is also fine.
    let reply = get_with(&svc, &format!("/generate?use={MAX}"), [proof()]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(settler.amounts()[1], U256::from(MAX));
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn usage_above_the_maximum_is_refused_before_settlement() {
    let (settler, hits) = (Recording::default(), Hits::new());
    let svc = service(&settler, &hits);
    let header = proof();
    let reply = get_with(
        &svc,
        &format!("/generate?use={}", MAX + 1),
        [header.clone()],
    )
    .await;
    assert_eq!(
        reply.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_upto_evm_payload_settlement_exceeds_amount".into())
        )
    );
    assert!(settler.amounts().is_empty(), "nothing is settled");
    assert!(
        !String::from_utf8_lossy(&reply.body).contains("stopped"),
        "body withheld"
    );
    let receipt = reply.receipt();
    assert_eq!(receipt["success"], json!(false));
    assert_eq!(hits.get(), 1);
    // The proof bought one run: a replay does not run the handler again.
    let replay = get_with(&svc, "/generate?use=1", [header]).await;
    assert_eq!(
        replay.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    assert_eq!(hits.get(), 1);
    assert!(settler.amounts().is_empty());
}

#[tokio::test]
async fn zero_usage_settles_nothing_on_chain() {
    let (settler, hits) = (Recording::default(), Hits::new());
    let svc = service(&settler, &hits);
    let reply = get_with(&svc, "/generate?use=0", [proof()]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(settler.amounts().is_empty(), "no transaction for nothing");
    let receipt = reply.receipt();
    assert_eq!(receipt["success"], json!(true));
    assert_eq!(receipt["amount"], json!("0"));
    assert_eq!(receipt["transaction"], json!(""));
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn exact_payments_have_no_meter() {
    let layer = builder(&clock()).build().unwrap();
    let app = Router::new().route(
        "/generate",
        get(|usage: Option<Usage>| async move { format!("meter: {}", usage.is_some()) }),
    );
    let exact = layer.layer(app);
    let reply = get_with(&exact, "/generate", [proof_v2()]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "meter: false");
}

/// 64 copies of one permit released together on four worker threads, through a nonce store
/// that yields inside every call and a settler that yields: the copies really interleave
/// between reservation and settlement, and still one handler run, one settlement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_proof_one_handler_run_under_64_concurrent_copies() {
    let (settler, hits) = (Recording::default(), Hits::new());
    let store = FaultyNonceStore::new(MemoryNonceStore::with_capacity_and_clock(1000, clock()));
    let faults = store.faults().clone();
    faults.yield_each_call(true);
    let svc = service_with(&settler, &hits, store);
    let header = proof();
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (svc, header, barrier) = (svc.clone(), header.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let r = get_with(&svc, "/generate?use=7", [header]).await;
            match r.status {
                StatusCode::OK => (r.status, None),
                _ => r.outcome(),
            }
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            (StatusCode::OK, _) => ok += 1,
            (StatusCode::PAYMENT_REQUIRED, Some(reason)) if reason == NONCE_USED => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(hits.get(), 1, "one handler run");
    assert_eq!(settler.amounts(), vec![U256::from(7)], "one settlement");
    assert_eq!(
        faults.calls(Op::Reserve),
        64,
        "every copy reached the store"
    );
    assert_eq!(faults.calls(Op::Consume), 1);
}

/// The same 64 copies through a check-then-set store (the anti-pattern the `NonceStore`
/// contract forbids): the handler runs more than once. This shows the conditions above do let
/// requests race inside the store, so its single run is the atomic reserve's doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_then_set_store_would_run_the_handler_more_than_once_here() {
    use tower_x402::nonce::{ClaimToken, NonceKey, Reservation, StoreError};

    #[derive(Default)]
    struct CheckThenSet(Mutex<std::collections::HashSet<NonceKey>>);

    #[async_trait]
    impl tower_x402::NonceStore for CheckThenSet {
        async fn reserve(&self, key: &NonceKey, _: u64) -> Result<Reservation, StoreError> {
            if self.0.lock().unwrap().contains(key) {
                return Ok(Reservation::Used);
            }
            // The gap between the check and the set (a round trip to a remote store).
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            self.0.lock().unwrap().insert(*key);
            Ok(Reservation::Reserved(ClaimToken::random()))
        }
        async fn consume(&self, _: &NonceKey, _: ClaimToken) -> Result<(), StoreError> {
            Ok(())
        }
        async fn release(&self, key: &NonceKey, _: ClaimToken) -> Result<(), StoreError> {
            self.0.lock().unwrap().remove(key);
            Ok(())
        }
    }

    let (settler, hits) = (Recording::default(), Hits::new());
    let svc = service_with(&settler, &hits, CheckThenSet::default());
    let header = proof();
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (svc, header, barrier) = (svc.clone(), header.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                get_with(&svc, "/generate?use=7", [header]).await.status
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!(
        "64 copies through a check-then-set store: {} handler runs",
        hits.get()
    );
    assert!(hits.get() > 1, "runs: {}", hits.get());
    assert_eq!(settler.amounts().len(), hits.get());
}

/// Changes one field of a signed permit.
type Tamper = Box<dyn Fn(&mut tower_x402::proto::upto::UptoEvmPayload)>;

/// Tampers with the signed permit, re-signing where the test is about a field the signature
/// covers, to reach each check.
#[tokio::test]
async fn bad_permits_are_refused_with_the_reference_reasons() {
    let (settler, hits) = (Recording::default(), Hits::new());
    let svc = service(&settler, &hits);
    let req = upto_requirements();
    let signer = payer();
    let cases: Vec<(&str, Tamper)> = vec![
        (
            "invalid_permit2_spender",
            Box::new(|p| p.permit2_authorization.spender = Address::repeat_byte(1)),
        ),
        (
            "invalid_permit2_recipient_mismatch",
            Box::new(|p| p.permit2_authorization.witness.to = Address::repeat_byte(2)),
        ),
        (
            "upto_facilitator_mismatch",
            Box::new(|p| p.permit2_authorization.witness.facilitator = Address::repeat_byte(3)),
        ),
        (
            "permit2_deadline_expired",
            Box::new(|p| p.permit2_authorization.deadline = U256::from(NOW + 2)),
        ),
        (
            "permit2_deadline_too_far",
            Box::new(|p| p.permit2_authorization.deadline = U256::from(NOW + 3600)),
        ),
        (
            "permit2_not_yet_valid",
            Box::new(|p| p.permit2_authorization.witness.valid_after = U256::from(NOW + 60)),
        ),
        (
            "permit2_token_mismatch",
            Box::new(|p| p.permit2_authorization.permitted.token = Address::repeat_byte(4)),
        ),
    ];
    for (reason, tamper) in cases {
        let mut payload = upto_payload(&signer, &req, NOW);
        tamper(&mut payload);
        payload.signature = sign_upto(&signer, &req, &payload.permit2_authorization);
        let reply = get_with(&svc, "/generate?use=1", [pay_upto(&req, &payload)]).await;
        assert_eq!(
            reply.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(reason.into())),
            "{reason}"
        );
    }
    // A maximum other than the route's: the echo no longer matches an offered option.
    let mut other = req.clone();
    other.amount = U256::from(MAX + 1);
    let payload = upto_payload(&signer, &other, NOW);
    let reply = get_with(&svc, "/generate?use=1", [pay_upto(&other, &payload)]).await;
    assert_eq!(reply.status, StatusCode::PAYMENT_REQUIRED);
    // Signed by someone else, or changed after signing.
    let mut payload = upto_payload(&signer, &req, NOW);
    payload.permit2_authorization.from = Address::repeat_byte(5);
    let reply = get_with(&svc, "/generate?use=1", [pay_upto(&req, &payload)]).await;
    assert_eq!(
        reply.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_permit2_signature".into())
        )
    );
    let mut payload = upto_payload(&signer, &req, NOW);
    payload.permit2_authorization.permitted.amount = U256::from(1);
    let reply = get_with(&svc, "/generate?use=1", [pay_upto(&req, &payload)]).await;
    assert_eq!(
        reply.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("permit2_amount_mismatch".into())
        )
    );
    // Malformed payload: 400, not 402.
    let json = json!({ "x402Version": 2, "accepted": req, "payload": {"signature": "0x00", "permit2Authorization": {"from": "nope"}} });
    let reply = get_with(
        &svc,
        "/generate?use=1",
        [(
            tower_x402::proto::header::PAYMENT_SIGNATURE,
            tower_x402::test_util::encode(&json),
        )],
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(hits.get(), 0, "no refused permit runs the handler");
    assert!(settler.amounts().is_empty());
}

#[tokio::test]
async fn a_failed_handler_settles_nothing_and_releases_the_proof() {
    let settler = Recording::default();
    let clock = clock();
    let layer = PaymentLayer::builder()
        .no_challenge_binding()
        .accept(upto_option())
        .verifier(EvmVerifier::new().with_clock(clock.clone()))
        .nonce_store(MemoryNonceStore::with_capacity_and_clock(1000, clock))
        .settler(settler.clone())
        .build()
        .unwrap();
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = fail.clone();
    let app = Router::new().route(
        "/generate",
        get(move |usage: Usage| {
            let f = f.clone();
            async move {
                usage.charge_atomic(5).unwrap();
                if f.load(std::sync::atomic::Ordering::SeqCst) {
                    (StatusCode::INTERNAL_SERVER_ERROR, "model crashed")
                } else {
                    (StatusCode::OK, "done")
                }
            }
        }),
    );
    let svc = layer.layer(app);
    let header = proof();
    let reply = get_with(&svc, "/generate", [header.clone()]).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(settler.amounts().is_empty());
    // Released: the same proof buys the retry, metered afresh.
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let reply = get_with(&svc, "/generate", [header]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(settler.amounts(), vec![U256::from(5)]);
}

#[test]
fn upto_cannot_settle_before_the_handler() {
    let err = PaymentLayer::builder()
        .no_challenge_binding()
        .accept(upto_option())
        .settlement_mode(SettlementMode::BeforeHandler)
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::UptoBeforeHandler), "{err}");
    let zero = PaymentOption::upto(&Asset::usdc_base_sepolia(), "$0.05", PAY_TO, Address::ZERO);
    assert!(matches!(zero, Err(ConfigError::UptoFacilitator)));
}

/// `examples/metered.rs`: our client pays the metered route; each receipt names what was used.
#[cfg(feature = "client")]
#[test]
fn the_metered_example_charges_what_each_call_used() {
    let out = run_example("metered");
    for line in [
        "charged 300 units (Settled)",
        "charged 4000 units (Settled)",
        "charged 0 units (Settled)",
        "charged 10000 units (Settled)",
        "[stopped: maximum reached]",
        "budget: 14300 units spent",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}
