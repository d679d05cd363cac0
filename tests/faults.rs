//! Failures after a payment was accepted, injected through a real `PaymentLayer` with the
//! wrappers of `tower_x402::test_util::faults`: nonce consume/release/reserve, idempotency
//! begin/complete/abort, prepaid ledger grant/debit/refund, sign-in nonce consume, and a
//! response body that fails after settlement.
//!
//! Each test asserts what the client sees (status, reason, `Retry-After`, receipt), how many
//! times the handler ran and the settler was called, exactly which alerts were raised
//! (`tower_x402::alert`, a delta over the whole snapshot: the tests of this file run one at a
//! time), and that nothing accepted is lost: a payment-id retry replays, paid-for credit
//! exists (or the refusal says it is owed), a proof stays unusable where money may have moved.
#![cfg(all(feature = "test-util", feature = "axum"))]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::routing::get;
use common::siwx::*;
use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tower::{Layer, ServiceExt};
use tower_x402::alert::{self, Alert};
use tower_x402::clock::FixedClock;
use tower_x402::idempotency::MemoryIdempotencyStore;
use tower_x402::prepaid::{Bundle, MemoryCreditLedger, Prepaid};
use tower_x402::primitives::{B256, U256};
use tower_x402::proto::header::PAYMENT_SIGNATURE;
use tower_x402::settle::{SettleError, Settlement, Settler};
use tower_x402::test_util::faults::{
    FailingBody, Faults, FaultyIdempotencyStore, FaultyLedger, FaultyNonceStore, Op,
};
use tower_x402::test_util::{encode, exact_payload, v2_json};
use tower_x402::{MemoryNonceStore, PaymentLayerBuilder, VerifiedPayment};

/// Alerts are process-wide counters: the tests of this file take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ID: &str = "pay_faults_0123456789abcdef";
/// `Retry-After` of an injected store failure (`faults::INJECTED_RETRY_AFTER`).
const INJECTED: &str = "3";

// ------------------------------------------------------------------------------------------------
// Harness

/// The alert counts at a point in time.
struct Alerts(Vec<(Alert, u64)>);

impl Alerts {
    fn now() -> Self {
        Self(alert::snapshot())
    }

    /// The kinds raised since, with how often.
    fn since(&self) -> Vec<(Alert, u64)> {
        alert::snapshot()
            .into_iter()
            .zip(&self.0)
            .filter(|((_, n), (_, before))| n > before)
            .map(|((kind, n), (_, before))| (kind, n - before))
            .collect()
    }
}

/// Counts settlements; each names its own transaction.
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
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Settlement {
            transaction: Some(B256::from(U256::from(n + 1))),
            amount: None,
            ..Default::default()
        })
    }
}

/// A paid route with a faulty nonce store (and, with `idempotency`, a faulty idempotency
/// store): `/paid` runs the counting handler, `/broken` and `/broken-stream` count, then send
/// a body that fails after its first chunk (bounded / unbounded size hint).
struct Paid {
    clock: FixedClock,
    hits: Hits,
    settler: CountingSettler,
    nonces: Faults,
    ids: Faults,
}

impl Paid {
    fn new() -> Self {
        Self {
            clock: clock(),
            hits: Hits::new(),
            settler: CountingSettler::default(),
            nonces: Faults::new(),
            ids: Faults::new(),
        }
    }

    fn builder(&self) -> PaymentLayerBuilder {
        let store = MemoryNonceStore::with_capacity_and_clock(1000, self.clock.clone());
        builder(&self.clock)
            .nonce_store(FaultyNonceStore::with_faults(store, self.nonces.clone()))
            .settler(self.settler.clone())
    }

    fn service(
        &self,
        idempotency: bool,
    ) -> impl tower::Service<
        http::Request<Body>,
        Response = http::Response<tower_x402::body::ResponseBody<Body>>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let mut b = self.builder();
        if idempotency {
            let ids =
                MemoryIdempotencyStore::with_limits_and_clock(100, 1 << 20, self.clock.clone());
            b = b.idempotency(FaultyIdempotencyStore::with_faults(ids, self.ids.clone()));
        }
        let (h1, h2) = (self.hits.clone(), self.hits.clone());
        let app = app(&self.hits)
            .route(
                "/broken",
                get(move |req: axum::extract::Request| async move {
                    h1.run(req.headers(), None).await;
                    Body::new(FailingBody::new(["partial"]))
                }),
            )
            .route(
                "/broken-stream",
                get(move |req: axum::extract::Request| async move {
                    h2.run(req.headers(), None).await;
                    Body::new(FailingBody::new(["partial"]).unbounded())
                }),
            );
        b.build()
            .expect("valid layer")
            .layer(Router::new().merge(app))
    }

    fn runs(&self) -> (usize, usize) {
        (self.hits.get(), self.settler.calls())
    }
}

/// A fresh v2 proof carrying the payment id `id`.
fn proof_with_id(id: &str) -> (HeaderName, HeaderValue) {
    let payload = exact_payload(&payer(), &requirements(), NOW);
    let mut json = v2_json(&requirements(), &payload, None);
    json["extensions"] =
        json!({ "payment-identifier": { "info": { "required": false, "id": id } } });
    (PAYMENT_SIGNATURE, encode(&json))
}

fn status(code: &'static str) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static(STATUS_HEADER),
        HeaderValue::from_static(code),
    )
}

fn same(a: &Reply, b: &Reply) {
    assert_eq!(
        (a.status, &a.headers, &a.body),
        (b.status, &b.headers, &b.body)
    );
}

// ------------------------------------------------------------------------------------------------
// Nonce store

#[tokio::test]
async fn consume_failing_after_settlement_serves_200_with_receipt_and_the_proof_stays_spent() {
    let _turn = SERIAL.lock().await;
    let s = Paid::new();
    let svc = s.service(false);
    s.nonces.fail_always(Op::Consume);
    let alerts = Alerts::now();
    let p = proof_v2();
    let r = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["handler"], "ran");
    assert_eq!(r.receipt()["success"], json!(true));
    assert_eq!(s.runs(), (1, 1));
    assert_eq!(alerts.since(), vec![(Alert::NonceConsume, 1)]);
    // Not consumed, still reserved: the replay is refused, nothing runs or settles again.
    s.nonces.heal();
    let again = get_with(&svc, "/paid", [p]).await;
    assert_eq!(
        again.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    assert_eq!(s.runs(), (1, 1));
}

#[tokio::test]
async fn receipt_encoding_failing_after_settlement_still_tells_the_client_it_paid() {
    let _turn = SERIAL.lock().await;
    let s = Paid::new();
    let svc = s.service(false);
    let alerts = Alerts::now();
    tower_x402::test_util::faults::fail_next_receipt_encoding();
    let r = get_with(&svc, "/paid", [proof_v2()]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["handler"], "ran");
    // The hand-written receipt: paid, by whom, which transaction.
    let receipt = r.receipt();
    assert_eq!(receipt["success"], json!(true));
    assert_eq!(receipt["payer"], json!(payer().address().to_checksum(None)));
    assert_eq!(
        receipt["transaction"],
        json!(B256::from(U256::from(1)).to_string())
    );
    assert_eq!(s.runs(), (1, 1));
    assert_eq!(alerts.since(), vec![(Alert::ReceiptEncoding, 1)]);
}

#[tokio::test]
async fn release_failing_after_a_handler_error_keeps_its_answer_and_blocks_the_proof() {
    let _turn = SERIAL.lock().await;
    let s = Paid::new();
    let svc = s.service(false);
    s.nonces.fail_always(Op::Release);
    let alerts = Alerts::now();
    let p = proof_v2();
    let r = get_with(&svc, "/paid", [p.clone(), status("500")]).await;
    assert_eq!(
        r.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the handler's answer"
    );
    assert_eq!(r.json()["handler"], "ran");
    assert!(r.has_no_receipt(), "nothing was charged");
    assert_eq!(s.runs(), (1, 0));
    assert_eq!(alerts.since(), vec![(Alert::NonceRelease, 1)]);
    // The proof could not be given back: it stays blocked until it expires (never charged).
    s.nonces.heal();
    let again = get_with(&svc, "/paid", [p]).await;
    assert_eq!(
        again.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    assert_eq!(s.runs(), (1, 0));
}

#[tokio::test]
async fn reserve_failing_is_503_with_the_store_retry_after_and_the_proof_stays_usable() {
    let _turn = SERIAL.lock().await;
    let s = Paid::new();
    let svc = s.service(false);
    s.nonces.fail_next(Op::Reserve);
    let alerts = Alerts::now();
    let p = proof_v2();
    let r = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert_eq!(r.header("retry-after"), Some(INJECTED));
    assert!(r.has_no_receipt());
    assert_eq!(s.runs(), (0, 0));
    assert_eq!(
        alerts.since(),
        vec![],
        "a refusal before acceptance is no alert"
    );
    let again = get_with(&svc, "/paid", [p]).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(s.runs(), (1, 1));
}

// ------------------------------------------------------------------------------------------------
// Idempotency store

#[tokio::test]
async fn begin_failing_is_503_before_the_handler_and_the_retry_runs() {
    let _turn = SERIAL.lock().await;
    let s = Paid::new();
    let svc = s.service(true);
    s.ids.fail_next(Op::Begin);
    let alerts = Alerts::now();
    let p = proof_with_id(ID);
    let r = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert_eq!(r.header("retry-after"), Some(INJECTED));
    assert_eq!(s.runs(), (0, 0));
    assert_eq!(alerts.since(), vec![]);
    let again = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(again.status, StatusCode::OK);
    same(&again, &get_with(&svc, "/paid", [p]).await);
    assert_eq!(s.runs(), (1, 1));
}

#[tokio::test]
async fn complete_failing_once_is_retried_and_the_response_is_replayed() {
    let _turn = SERIAL.lock().await;
    let s = Paid::new();
    let svc = s.service(true);
    s.ids.fail_next(Op::Complete);
    let alerts = Alerts::now();
    let p = proof_with_id(ID);
    let first = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(s.ids.calls(Op::Complete), 2, "one retry");
    assert_eq!(alerts.since(), vec![], "a blip absorbed is no alert");
    same(&first, &get_with(&svc, "/paid", [p]).await);
    assert_eq!(s.runs(), (1, 1));
}

#[tokio::test]
async fn complete_failing_keeps_the_id_in_progress_never_nonce_used() {
    let _turn = SERIAL.lock().await;
    let s = Paid::new();
    let svc = s.service(true);
    s.ids.fail_always(Op::Complete);
    let alerts = Alerts::now();
    let p = proof_with_id(ID);
    let first = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(first.status, StatusCode::OK, "the client gets its answer");
    assert_eq!(first.receipt()["success"], json!(true));
    assert_eq!(s.ids.calls(Op::Complete), 2);
    assert_eq!(s.ids.calls(Op::Abort), 0, "the id is not forgotten");
    assert_eq!(alerts.since(), vec![(Alert::IdempotencyStore, 1)]);
    // A retry that lost the answer is told to wait, not that its proof is used up (which
    // would invite paying again); the handler does not run again.
    s.ids.heal();
    let retry = get_with(&svc, "/paid", [p]).await;
    assert_eq!(
        retry.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("payment_in_progress".into())
        )
    );
    assert_eq!(s.runs(), (1, 1));
}

#[tokio::test]
async fn abort_failing_after_a_handler_error_keeps_the_id_in_progress() {
    let _turn = SERIAL.lock().await;
    let s = Paid::new();
    let svc = s.service(true);
    s.ids.fail_always(Op::Abort);
    let alerts = Alerts::now();
    let p = proof_with_id(ID);
    let r = get_with(&svc, "/paid", [p.clone(), status("503")]).await;
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the handler's answer"
    );
    assert!(r.has_no_receipt());
    assert_eq!(alerts.since(), vec![(Alert::IdempotencyStore, 1)]);
    s.ids.heal();
    let retry = get_with(&svc, "/paid", [p]).await;
    assert_eq!(
        retry.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("payment_in_progress".into())
        )
    );
    assert_eq!(s.runs(), (1, 0), "never a second run, nothing charged");
}

// ------------------------------------------------------------------------------------------------
// Response body

#[tokio::test]
async fn a_paid_body_failing_is_500_with_the_receipt_and_the_retry_gets_the_same() {
    let _turn = SERIAL.lock().await;
    let s = Paid::new();
    let svc = s.service(true);
    let alerts = Alerts::now();
    let p = proof_with_id(ID);
    let first = get_with(&svc, "/broken", [p.clone()]).await;
    assert_eq!(
        first.outcome(),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("response_body_failed".into())
        )
    );
    let receipt = first.receipt();
    assert_eq!(
        receipt["success"],
        json!(true),
        "the money moved: {receipt}"
    );
    assert_eq!(
        receipt["transaction"],
        json!(format!("{:#x}", B256::from(U256::from(1))))
    );
    assert_eq!(first.header("cache-control"), Some("no-store"));
    assert_eq!(s.runs(), (1, 1));
    assert_eq!(alerts.since(), vec![(Alert::ResponseBody, 1)]);
    // The retry with the payment id gets the same answer: no second run, no second charge,
    // never nonce_already_used.
    for _ in 0..2 {
        same(&first, &get_with(&svc, "/broken", [p.clone()]).await);
    }
    assert_eq!(s.runs(), (1, 1));
    assert_eq!(alerts.since(), vec![(Alert::ResponseBody, 1)]);
}

#[tokio::test]
async fn a_streamed_paid_body_failing_still_carries_the_receipt_in_its_headers() {
    let _turn = SERIAL.lock().await;
    let s = Paid::new();
    let alerts = Alerts::now();
    for idempotency in [false, true] {
        let svc = s.service(idempotency);
        let p = if idempotency {
            proof_with_id(ID)
        } else {
            proof_v2()
        };
        let res = svc
            .clone()
            .oneshot(request("/broken-stream", [p]))
            .await
            .expect("infallible");
        // Streamed (not buffered): the status and the receipt go out before the body fails.
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers().contains_key("payment-response"));
        let body = res.into_body().collect().await;
        assert!(body.is_err(), "the body error reaches the server");
    }
    assert_eq!(s.runs(), (2, 2));
    // The seller hears of each: the client paid and got the receipt, not all the content.
    assert_eq!(alerts.since(), vec![(Alert::ResponseBody, 2)]);
}

// ------------------------------------------------------------------------------------------------
// Prepaid ledger

/// A prepaid route selling `bundle` with a faulty ledger, bought once by the payer.
type PrepaidSvc = tower::util::BoxCloneService<
    http::Request<Body>,
    http::Response<tower_x402::body::ResponseBody<http_body_util::Full<bytes::Bytes>>>,
    std::convert::Infallible,
>;

fn prepaid(bundle: Bundle, nonces: Faults) -> (Faults, Runs, PrepaidSvc) {
    let clock = clock();
    let ledger = FaultyLedger::new(MemoryCreditLedger::new());
    let faults = ledger.faults().clone();
    let store = MemoryNonceStore::with_capacity_and_clock(1000, clock.clone());
    let runs = Runs::default();
    let svc = builder(&clock)
        .nonce_store(FaultyNonceStore::with_faults(store, nonces))
        .resource_base(BASE)
        .prepaid(
            Prepaid::new(bundle.for_price("$0.01"))
                .clock(clock.clone())
                .ledger(ledger),
        )
        .build()
        .unwrap()
        .layer(runs.service());
    (faults, runs, PrepaidSvc::new(svc))
}

#[tokio::test]
async fn a_grant_failing_after_settlement_serves_the_call_and_the_credit_is_owed_not_lost() {
    let _turn = SERIAL.lock().await;
    let (ledger, runs, svc) = prepaid(Bundle::calls(3), Faults::new());
    ledger.fail_always(Op::Grant);
    let alerts = Alerts::now();
    let paid = buy(&svc, NOW).await;
    assert_eq!(paid.receipt()["success"], json!(true), "the money moved");
    assert_eq!(runs.get(), 1);
    assert_eq!(ledger.calls(Op::Grant), 3, "tried three times");
    assert_eq!(alerts.since(), vec![(Alert::CreditGrant, 1)]);
    // While the ledger is down, a sign-in is told to come back (503), never "exhausted".
    let h = signed_header(&svc, &payer()).await;
    let r = get_with(&svc, "/paid", [h.clone()]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert_eq!(r.header("retry-after"), Some(INJECTED));
    assert_eq!(runs.get(), 1);
    // The ledger is back: the same header is served on the owed credit (3 - 1 - 1 = 1 left).
    ledger.heal();
    let r = get_with(&svc, "/paid", [h]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["remaining"], json!(1));
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(r.json()["remaining"], json!(0));
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(r.reason().as_deref(), Some("prepaid_credit_exhausted"));
    assert_eq!(runs.get(), 3, "exactly the calls paid for");
    assert_eq!(alerts.since(), vec![(Alert::CreditGrant, 1)]);
}

#[tokio::test]
async fn a_grant_failing_once_is_retried_and_no_alert_is_raised() {
    let _turn = SERIAL.lock().await;
    let (ledger, runs, svc) = prepaid(Bundle::calls(2), Faults::new());
    ledger.fail_next(Op::Grant);
    let alerts = Alerts::now();
    buy(&svc, NOW).await;
    assert_eq!(ledger.calls(Op::Grant), 2);
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(r.json()["remaining"], json!(0));
    assert_eq!(runs.get(), 2);
    assert_eq!(alerts.since(), vec![]);
}

#[tokio::test]
async fn a_refund_failing_is_kept_and_given_back_at_the_next_sign_in() {
    let _turn = SERIAL.lock().await;
    let (ledger, runs, svc) = prepaid(Bundle::calls(3), Faults::new());
    buy(&svc, NOW).await;
    ledger.fail_always(Op::Refund);
    let alerts = Alerts::now();
    let h = signed_header(&svc, &payer()).await;
    let r = get_with(&svc, "/paid", [h, status("500")]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(ledger.calls(Op::Refund), 3);
    assert_eq!(alerts.since(), vec![(Alert::CreditRefund, 1)]);
    ledger.heal();
    // The failed call's credit comes back first: 2 left before this call, 1 after.
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["remaining"], json!(1));
    assert_eq!(runs.get(), 3);
}

#[tokio::test]
async fn a_debit_failing_is_503_and_the_same_sign_in_works_once_the_ledger_is_back() {
    let _turn = SERIAL.lock().await;
    let (ledger, runs, svc) = prepaid(Bundle::calls(2), Faults::new());
    buy(&svc, NOW).await;
    ledger.fail_next(Op::Debit);
    let alerts = Alerts::now();
    let h = signed_header(&svc, &payer()).await;
    let r = get_with(&svc, "/paid", [h.clone()]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert_eq!(r.header("retry-after"), Some(INJECTED));
    assert_eq!(runs.get(), 1);
    let r = get_with(&svc, "/paid", [h]).await;
    assert_eq!(r.status, StatusCode::OK, "the message was not spent");
    assert_eq!(r.json()["remaining"], json!(0));
    assert_eq!(runs.get(), 2);
    assert_eq!(alerts.since(), vec![]);
}

#[tokio::test]
async fn a_sign_in_nonce_consume_failing_serves_the_call_and_the_message_stays_single_use() {
    let _turn = SERIAL.lock().await;
    let nonces = Faults::new();
    let (_ledger, runs, svc) = prepaid(Bundle::calls(5), nonces.clone());
    buy(&svc, NOW).await;
    nonces.fail_always(Op::Consume);
    let alerts = Alerts::now();
    let h = signed_header(&svc, &payer()).await;
    let r = get_with(&svc, "/paid", [h.clone()]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(alerts.since(), vec![(Alert::NonceConsume, 1)]);
    nonces.heal();
    let again = get_with(&svc, "/paid", [h]).await;
    assert_eq!(
        again.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_nonce_reused".into())
        )
    );
    assert_eq!(runs.get(), 2);
}
