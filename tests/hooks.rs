//! Lifecycle hooks, dependency outages (429 / 503 / unknown settlement outcome), the cap on
//! verifications in flight (the `tracing` span is in tests/tracing.rs).
#![cfg(all(feature = "test-util", feature = "tracing"))]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode, Uri};
use serde_json::json;
use tokio::sync::Notify;
use tower::Layer;
use tower_x402::error::{SettleError, VerifyError};
use tower_x402::hooks::{PaymentFailure, PaymentHooks, PaymentRequest};
use tower_x402::primitives::b256;
use tower_x402::proto::PaymentPayload;
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::settle::{Settlement, Settler};
use tower_x402::{ExactEvmVerifier, PaymentLayer, VerifiedPayment, Verifier};

fn stack(
    layer: PaymentLayer,
    hits: &Hits,
) -> impl tower::Service<
    http::Request<axum::body::Body>,
    Response = http::Response<tower_x402::body::ResponseBody<axum::body::Body>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    layer.layer(app(hits))
}

// ------------------------------------------------------------------------------------------------
// Hooks

/// Records every hook call, in order.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<String>>>,
    /// Refuse in `before_verify` requests whose path is this.
    refuse_path: Option<&'static str>,
    /// Refuse in `after_verify` after this many payments per payer.
    per_payer_limit: Option<usize>,
}

impl Recorder {
    fn log(&self, entry: String) {
        self.calls.lock().unwrap().push(entry);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn count(&self, prefix: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }
}

#[async_trait]
impl PaymentHooks for Recorder {
    async fn on_challenge(&self, method: &Method, uri: &Uri) {
        self.log(format!("challenge {method} {}", uri.path()));
    }

    async fn before_verify(
        &self,
        request: &PaymentRequest<'_>,
    ) -> Result<(), http::Response<Bytes>> {
        self.log(format!(
            "before_verify {} v{}",
            request.uri.path(),
            request.payload.version().number()
        ));
        if Some(request.uri.path()) == self.refuse_path {
            return Err(http::Response::builder()
                .status(StatusCode::FORBIDDEN)
                .body(Bytes::from_static(b"{\"error\":\"blocked\"}"))
                .unwrap());
        }
        Ok(())
    }

    async fn after_verify(
        &self,
        payment: &VerifiedPayment,
        _elapsed: Duration,
    ) -> Result<(), http::Response<Bytes>> {
        let before = self.count("after_verify");
        self.log(format!("after_verify {}", payment.payer));
        if let Some(limit) = self.per_payer_limit
            && before >= limit
        {
            return Err(http::Response::builder()
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header("retry-after", "60")
                .body(Bytes::from_static(b"{\"error\":\"payer_limit\"}"))
                .unwrap());
        }
        Ok(())
    }

    async fn after_settle(&self, payment: &VerifiedPayment, s: &Settlement, _: Duration) {
        self.log(format!(
            "after_settle {} {:?}",
            payment.amount, s.transaction
        ));
    }

    async fn on_failure(&self, f: &PaymentFailure<'_>) {
        self.log(format!(
            "failure {:?} {} {} payer={}",
            f.stage,
            f.rejection.status.as_u16(),
            f.rejection.reason.as_ref().map_or("-", |r| r.as_str()),
            f.payment.is_some(),
        ));
    }
}

#[tokio::test]
async fn hooks_see_each_step_of_a_paid_request_in_order() {
    let clock = clock();
    let hits = Hits::new();
    let rec = Recorder::default();
    let svc = stack(builder(&clock).hook(rec.clone()).build().unwrap(), &hits);

    let r = get_with(&svc, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    let proof = proof_v2();
    let r = get_with(&svc, "/paid", [proof.clone()]).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    assert_eq!(hits.get(), 1);
    let payer = payer().address();
    assert_eq!(
        rec.calls(),
        [
            "challenge GET /paid".to_owned(),
            "before_verify /paid v2".to_owned(),
            format!("after_verify {payer}"),
            "after_settle 1000 None".to_owned(),
            "before_verify /paid v2".to_owned(),
            format!("after_verify {payer}"),
            format!("failure Reserve 402 {NONCE_USED} payer=true"),
        ]
    );
}

#[tokio::test]
async fn a_malformed_header_is_reported_as_a_decode_failure() {
    let clock = clock();
    let hits = Hits::new();
    let rec = Recorder::default();
    let svc = stack(builder(&clock).hook(rec.clone()).build().unwrap(), &hits);
    let bad = (
        tower_x402::proto::header::PAYMENT_SIGNATURE,
        http::HeaderValue::from_static("not base64!"),
    );
    let r = get_with(&svc, "/paid", [bad]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        rec.calls(),
        ["failure Decode 400 invalid_payload payer=false"]
    );
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn before_verify_can_refuse_with_its_own_response() {
    let clock = clock();
    let hits = Hits::new();
    let rec = Recorder {
        refuse_path: Some("/paid"),
        ..Recorder::default()
    };
    let svc = stack(builder(&clock).hook(rec.clone()).build().unwrap(), &hits);
    let proof = proof_v2();
    let r = get_with(&svc, "/paid", [proof.clone()]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json(), json!({"error": "blocked"}));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        r.rejection.as_ref().unwrap().reason,
        Some(tower_x402::rejection::Reason::RefusedByHook)
    );
    assert_eq!(hits.get(), 0);
    assert_eq!(rec.count("after_verify"), 0, "refused before verification");
    // Nothing was claimed: the same proof pays another route.
    let r = get_with(&svc, "/premium", [proof]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn after_verify_enforces_a_per_payer_limit_without_claiming_the_proof() {
    let clock = clock();
    let hits = Hits::new();
    let rec = Recorder {
        per_payer_limit: Some(2),
        ..Recorder::default()
    };
    let svc = stack(builder(&clock).hook(rec.clone()).build().unwrap(), &hits);
    for _ in 0..2 {
        assert_eq!(
            get_with(&svc, "/paid", [proof_v2()]).await.status,
            StatusCode::OK
        );
    }
    let r = get_with(&svc, "/paid", [proof_v2()]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), Some("60"));
    assert_eq!(
        r.rejection.as_ref().unwrap().retry_after,
        Some(Duration::from_secs(60))
    );
    assert_eq!(hits.get(), 2);
    assert_eq!(rec.count("after_settle"), 2);
    assert_eq!(rec.count("failure Hook 429 refused_by_hook payer=true"), 1);
}

// ------------------------------------------------------------------------------------------------
// Outages

/// A settler scripted per call.
#[derive(Clone)]
struct Scripted {
    calls: Arc<Mutex<usize>>,
    answer: fn(usize) -> Result<Settlement, SettleError>,
}

impl Scripted {
    fn new(answer: fn(usize) -> Result<Settlement, SettleError>) -> Self {
        Self {
            calls: Arc::default(),
            answer,
        }
    }
    fn calls(&self) -> usize {
        *self.calls.lock().unwrap()
    }
}

#[async_trait]
impl Settler for Scripted {
    async fn settle(&self, _: &VerifiedPayment) -> Result<Settlement, SettleError> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            *calls
        };
        (self.answer)(n)
    }
}

const TX: tower_x402::primitives::B256 =
    b256!("0x1111111111111111111111111111111111111111111111111111111111111111");

#[tokio::test]
async fn rate_limited_settlement_is_429_and_the_same_proof_pays_later() {
    let clock = clock();
    let hits = Hits::new();
    let settler = Scripted::new(|n| match n {
        1 => Err(SettleError::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
        }),
        _ => Ok(Settlement {
            transaction: Some(TX),
            amount: None,
            ..Default::default()
        }),
    });
    let svc = stack(
        builder(&clock).settler(settler.clone()).build().unwrap(),
        &hits,
    );
    let proof = proof_v2();
    let r = get_with(&svc, "/paid", [proof.clone()]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited".into()))
    );
    assert_eq!(r.header("retry-after"), Some("7"));
    assert!(
        !String::from_utf8_lossy(&r.body).contains("handler"),
        "withheld"
    );
    let r = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.receipt()["transaction"], json!(TX.to_string()));
    assert_eq!(settler.calls(), 2);
}

#[tokio::test]
async fn unknown_settlement_outcome_keeps_the_proof_spent_and_says_so() {
    for mode in [
        tower_x402::settle::SettlementMode::AfterHandler,
        tower_x402::settle::SettlementMode::BeforeHandler,
    ] {
        let clock = clock();
        let hits = Hits::new();
        let settler = Scripted::new(|_| {
            Err(SettleError::Unknown {
                transaction: Some(TX),
                retry_after: Some(Duration::from_secs(12)),
                source: "receipt timeout".into(),
            })
        });
        let svc = stack(
            builder(&clock)
                .settler(settler.clone())
                .settlement_mode(mode)
                .build()
                .unwrap(),
            &hits,
        );
        let proof = proof_v2();
        let r = get_with(&svc, "/paid", [proof.clone()]).await;
        assert_eq!(
            r.outcome(),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("settlement_outcome_unknown".into())
            ),
            "{mode:?}"
        );
        assert_eq!(r.header("retry-after"), Some("12"));
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .contains("do not pay again")
        );
        let receipt = r.receipt();
        assert_eq!(receipt["success"], json!(false));
        assert_eq!(receipt["errorReason"], json!("settlement_outcome_unknown"));
        assert_eq!(receipt["transaction"], json!(TX.to_string()));
        // The proof can never buy a second settlement.
        let again = get_with(&svc, "/paid", [proof]).await;
        assert_eq!(
            again.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
        );
        assert_eq!(settler.calls(), 1, "{mode:?}");
        let want_runs = usize::from(mode == tower_x402::settle::SettlementMode::AfterHandler);
        assert_eq!(hits.get(), want_runs, "{mode:?}");
    }
}

struct RateLimitedVerifier;

#[async_trait]
impl Verifier for RateLimitedVerifier {
    async fn verify(
        &self,
        _: &PaymentPayload,
        _: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        Err(VerifyError::RateLimited { retry_after: None })
    }
}

#[tokio::test]
async fn rate_limited_verifier_is_429_with_the_default_retry_after() {
    let clock = clock();
    let hits = Hits::new();
    let svc = stack(
        builder(&clock)
            .verifier(RateLimitedVerifier)
            .retry_after(Duration::from_millis(2500))
            .build()
            .unwrap(),
        &hits,
    );
    let r = get_with(&svc, "/paid", [proof_v2()]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited".into()))
    );
    assert_eq!(r.header("retry-after"), Some("3"), "rounded up");
    assert_eq!(hits.get(), 0);
}

// ------------------------------------------------------------------------------------------------
// Verifications in flight

/// Verifies with the real verifier, after waiting for the test's signal.
struct Gated {
    inner: ExactEvmVerifier,
    entered: Arc<Notify>,
    go: Arc<Notify>,
}

#[async_trait]
impl Verifier for Gated {
    async fn verify(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        self.entered.notify_one();
        self.go.notified().await;
        self.inner.verify(payload, requirements).await
    }
}

#[tokio::test]
async fn verifications_beyond_the_cap_are_503_overloaded_at_once() {
    let clock = clock();
    let hits = Hits::new();
    let entered = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let verifier = Gated {
        inner: ExactEvmVerifier::new().with_clock(clock.clone()),
        entered: entered.clone(),
        go: go.clone(),
    };
    let svc = stack(
        builder(&clock)
            .verifier(verifier)
            .max_concurrent_verifications(1)
            .build()
            .unwrap(),
        &hits,
    );
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { get_with(&svc, "/paid", [proof_v2()]).await }
    });
    entered.notified().await;
    // The only slot is taken: the next proof is turned away without being verified.
    let r = get_with(&svc, "/paid", [proof_v2()]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded".into()))
    );
    assert_eq!(r.header("retry-after"), Some("5"));
    go.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    // The slot is back.
    let third = tokio::spawn({
        let svc = svc.clone();
        async move { get_with(&svc, "/paid", [proof_v2()]).await }
    });
    entered.notified().await;
    go.notify_one();
    assert_eq!(third.await.unwrap().status, StatusCode::OK);
    assert_eq!(hits.get(), 2);
}
