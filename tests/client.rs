//! The paying client ([`PayingLayer`]): against our own server over the wire (v2 and v1),
//! against a scripted server for the failure table (on tokio's paused clock, so waits are
//! measured, not slept), and the budget and policy refusals, which must come before any
//! signature (counted with a wrapping `Signer`).
#![cfg(all(feature = "client", feature = "axum", feature = "test-util"))]

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy_primitives::{B256, U256};
use async_trait::async_trait;
use axum::Router;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_x402::client::{
    Budget, Error, PayingLayer, PaymentOutcome, PaymentReport, Policy, Refusal, RetryPolicy,
};
use tower_x402::proto::X402Version;
use tower_x402::proto::header::{PAYMENT_REQUIRED, PAYMENT_RESPONSE};
use tower_x402::test_util::demo_payer;
use tower_x402::{Asset, Network};

use common::paying::{Counting, policy};
use common::{AMOUNT, Hits, NOW, clock, requirements};

/// The paying layer on the tests' fixed clock.
fn paying(signer: &Counting, policy: Policy) -> PayingLayer<Counting> {
    PayingLayer::new(signer.clone(), policy).clock(clock())
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .body(Full::default())
        .expect("valid request")
}

async fn body_json<B>(res: Response<B>) -> Value
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&bytes).expect("JSON body")
}

fn report<B>(res: &Response<B>) -> PaymentReport {
    res.extensions()
        .get::<PaymentReport>()
        .cloned()
        .expect("a PaymentReport on a paid response")
}

// ------------------------------------------------------------------------------------------------
// Our server, over the wire

/// `/paid` speaks both versions, `/v1` only v1, `/free` is free.
fn server(hits: &Hits) -> Router {
    let both = common::layer(&clock());
    let v1 = common::builder(&clock())
        .versions(true, false)
        .build()
        .expect("valid layer");
    Router::new()
        .route("/paid", common::handler(hits.clone()))
        .route_layer(both)
        .merge(
            Router::new()
                .route("/v1", common::handler(hits.clone()))
                .route_layer(v1),
        )
        .route("/free", common::handler(hits.clone()))
}

#[tokio::test]
async fn pays_our_server_over_v2_and_v1() {
    let hits = Hits::new();
    let (addr, _server) = common::serve(server(&hits)).await;
    let signer = Counting::new();
    let budget = Budget::new(U256::from(1_000_000));
    let layer = paying(&signer, policy().budget(budget.clone()));
    let mut v2 = ServiceBuilder::new()
        .layer(layer.clone())
        .service(common::client());
    let mut v1 = ServiceBuilder::new()
        .layer(layer.only_version(X402Version::V1))
        .service(common::client());

    // v2: the PAYMENT-REQUIRED header, PAYMENT-SIGNATURE, PAYMENT-RESPONSE.
    let res = v2
        .ready()
        .await
        .unwrap()
        .call(get(&format!("http://{addr}/paid")))
        .await
        .expect("paid call");
    assert_eq!(res.status(), StatusCode::OK);
    let paid = report(&res);
    assert_eq!(paid.version, X402Version::V2);
    assert_eq!(paid.outcome, PaymentOutcome::Settled);
    assert_eq!(paid.amount(), U256::from_str_radix(AMOUNT, 10).unwrap());
    assert_eq!(paid.requirements, requirements());
    assert_eq!(paid.payer(), demo_payer().address());
    assert_eq!(paid.attempts, 1);
    let receipt = paid.receipt.as_ref().expect("receipt");
    assert!(receipt.success);
    assert_eq!(receipt.payer, Some(demo_payer().address().into()));
    assert_eq!(receipt.network, Network::BASE_SEPOLIA);
    assert!(res.headers().contains_key(PAYMENT_RESPONSE));
    let body = body_json(res).await;
    assert_eq!(body["version"], json!(2), "{body}");
    assert_eq!(body["amount"], json!(AMOUNT), "{body}");

    // v1: the JSON body challenge, X-PAYMENT, X-PAYMENT-RESPONSE.
    let res = v1
        .ready()
        .await
        .unwrap()
        .call(get(&format!("http://{addr}/v1")))
        .await
        .expect("paid call");
    assert_eq!(res.status(), StatusCode::OK);
    let paid = report(&res);
    assert_eq!(paid.version, X402Version::V1);
    assert_eq!(paid.outcome, PaymentOutcome::Settled);
    assert!(res.headers().contains_key("x-payment-response"));
    assert_eq!(body_json(res).await["version"], json!(1));

    // A free route: no payment, no report.
    let res = v2
        .ready()
        .await
        .unwrap()
        .call(get(&format!("http://{addr}/free")))
        .await
        .expect("free call");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.extensions().get::<PaymentReport>().is_none());

    assert_eq!(hits.get(), 3, "each handler ran once");
    assert_eq!(signer.signatures(), 2, "one signature per paid call");
    assert_eq!(budget.spent(), U256::from(2_000));
}

#[tokio::test]
async fn a_v2_first_client_pays_a_v1_only_route_in_v1() {
    // A v1-only route sends no PAYMENT-REQUIRED header, only the v1 body: a client that
    // prefers v2 falls back to v1 and pays once.
    let hits = Hits::new();
    let (addr, _server) = common::serve(server(&hits)).await;
    let signer = Counting::new();
    let mut client = ServiceBuilder::new()
        .layer(paying(&signer, policy()))
        .service(common::client());
    let res = client
        .ready()
        .await
        .unwrap()
        .call(get(&format!("http://{addr}/v1")))
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(report(&res).outcome, PaymentOutcome::Settled);
    assert!(res.headers().contains_key("x-payment-response"));
    assert_eq!(signer.signatures(), 1);
    assert_eq!(hits.get(), 1);
}

// ------------------------------------------------------------------------------------------------
// Budget and policy: refused before signing

/// Our server's layer in-process around the counting handler (no network).
fn in_process(
    hits: &Hits,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<tower_x402::body::ResponseBody<Full<Bytes>>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        .layer(common::layer(&clock()))
        .service(common::plain_service(hits.clone()))
}

#[tokio::test]
async fn budget_exhaustion_refuses_before_signing_across_clones() {
    let hits = Hits::new();
    let signer = Counting::new();
    // Room for two payments of 1000, not three.
    let budget = Budget::new(U256::from(2_500));
    let client = ServiceBuilder::new()
        .layer(paying(&signer, policy().budget(budget.clone())))
        .service(in_process(&hits));

    // Two clones pay concurrently from the one budget.
    let (a, b) = tokio::join!(
        client.clone().oneshot(get("http://api.test/paid")),
        client.clone().oneshot(get("http://api.test/paid")),
    );
    assert_eq!(a.expect("paid").status(), StatusCode::OK);
    assert_eq!(b.expect("paid").status(), StatusCode::OK);
    assert_eq!(budget.spent(), U256::from(2_000));

    let err = client
        .clone()
        .oneshot(get("http://api.test/paid"))
        .await
        .expect_err("over budget");
    assert!(err.is_budget_exceeded() && err.is_refused(), "{err}");
    match err {
        Error::BudgetExceeded { amount, remaining } => {
            assert_eq!(amount, U256::from(1_000));
            assert_eq!(remaining, U256::from(500));
        }
        other => panic!("{other}"),
    }
    assert_eq!(signer.signatures(), 2, "no signature for the refused call");
    assert_eq!(hits.get(), 2);
    assert_eq!(budget.spent(), U256::from(2_000));
}

#[tokio::test]
async fn policy_refusals_come_before_signing() {
    let hits = Hits::new();
    let signer = Counting::new();
    for (policy, refusal) in [
        (
            Policy::new(U256::from(999)).allow_asset(&Asset::usdc_base_sepolia()),
            Refusal::OverCap,
        ),
        (
            Policy::new(U256::MAX).allow_network(Network::BASE),
            Refusal::Network,
        ),
        (
            Policy::new(U256::MAX).allow_asset(&Asset::usdc_base()),
            Refusal::Asset,
        ),
    ] {
        let err = ServiceBuilder::new()
            .layer(paying(&signer, policy))
            .service(in_process(&hits))
            .oneshot(get("http://api.test/paid"))
            .await
            .expect_err("refused");
        match err {
            Error::NoAcceptableOption(r) => assert_eq!(r.0, vec![refusal]),
            other => panic!("{other}"),
        }
    }
    assert_eq!(signer.signatures(), 0);
    assert_eq!(hits.get(), 0);
}

// ------------------------------------------------------------------------------------------------
// The failure table, against a scripted server on the paused clock

/// What the scripted server answers next.
#[derive(Clone)]
enum Step {
    /// 402 with a v2 challenge for the test requirements, with an optional `error` reason
    /// and extensions.
    Challenge {
        error: Option<&'static str>,
        extensions: Option<Value>,
    },
    /// A plain status, with an optional `Retry-After` (seconds) and JSON body.
    Status(u16, Option<u64>, Option<Value>),
    /// 200 with a successful receipt.
    Paid,
    /// The transport fails (the request may or may not have arrived).
    Fail,
    /// 503 `settlement_outcome_unknown`, `Retry-After: 1`, a failed receipt naming a
    /// transaction (what our server answers when a settlement does not confirm in time).
    OutcomeUnknown,
}

fn challenge() -> Step {
    Step::Challenge {
        error: None,
        extensions: None,
    }
}

/// One request as the scripted server saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Duration,
    payment: Option<HeaderValue>,
}

#[derive(Clone)]
struct Script {
    steps: Arc<Mutex<VecDeque<Step>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    start: Instant,
}

impl Script {
    fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        Self {
            steps: Arc::new(Mutex::new(steps.into_iter().collect())),
            seen: Arc::default(),
            start: Instant::now(),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Seconds since the start at which each request arrived.
    fn times(&self) -> Vec<f64> {
        self.seen()
            .iter()
            .map(|s| s.at.as_secs_f64())
            .collect::<Vec<_>>()
    }

    fn payments(&self) -> Vec<Option<HeaderValue>> {
        self.seen().into_iter().map(|s| s.payment).collect()
    }

    fn service(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = std::io::Error,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let script = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let script = script.clone();
            async move {
                let payment = req
                    .headers()
                    .get("payment-signature")
                    .or_else(|| req.headers().get("x-payment"))
                    .cloned();
                script.seen.lock().unwrap().push(Seen {
                    at: script.start.elapsed(),
                    payment,
                });
                let step = script
                    .steps
                    .lock()
                    .unwrap()
                    .pop_front()
                    .expect("the script has a step for every request");
                respond(step)
            }
        })
    }
}

fn respond(step: Step) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let mut res = Response::new(Full::new(Bytes::new()));
    match step {
        Step::Challenge { error, extensions } => {
            *res.status_mut() = StatusCode::PAYMENT_REQUIRED;
            let mut c = json!({
                "x402Version": 2,
                "resource": { "url": "http://api.test/paid" },
                "accepts": [requirements()],
            });
            if let Some(e) = error {
                c["error"] = json!(e);
            }
            if let Some(x) = extensions {
                c["extensions"] = x;
            }
            let value = STANDARD.encode(c.to_string());
            res.headers_mut()
                .insert(PAYMENT_REQUIRED, value.parse().unwrap());
        }
        Step::Status(code, retry_after, body) => {
            *res.status_mut() = StatusCode::from_u16(code).unwrap();
            if let Some(secs) = retry_after {
                res.headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
            }
            if let Some(b) = body {
                *res.body_mut() = Full::new(Bytes::from(b.to_string()));
            }
        }
        Step::Paid => {
            let receipt = json!({
                "success": true,
                "transaction": format!("{:#x}", B256::repeat_byte(0xab)),
                "network": "eip155:84532",
                "payer": demo_payer().address(),
            });
            res.headers_mut().insert(
                PAYMENT_RESPONSE,
                STANDARD.encode(receipt.to_string()).parse().unwrap(),
            );
        }
        Step::Fail => return Err(std::io::Error::other("connection reset")),
        Step::OutcomeUnknown => {
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            res.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            let receipt = json!({
                "success": false,
                "errorReason": "settlement_outcome_unknown",
                "transaction": format!("{:#x}", B256::repeat_byte(0xef)),
                "network": "eip155:84532",
            });
            res.headers_mut().insert(
                PAYMENT_RESPONSE,
                STANDARD.encode(receipt.to_string()).parse().unwrap(),
            );
            *res.body_mut() = Full::new(Bytes::from(
                json!({ "error": "settlement_outcome_unknown" }).to_string(),
            ));
        }
    }
    Ok(res)
}

/// Calls the scripted server once through a paying layer with `retry`.
async fn call(
    script: &Script,
    signer: &Counting,
    retry: RetryPolicy,
) -> Result<Response<tower_x402::body::ResponseBody<Full<Bytes>>>, Error> {
    ServiceBuilder::new()
        .layer(paying(signer, policy()).retry(retry))
        .service(script.service())
        .oneshot(get("http://api.test/paid"))
        .await
}

fn assert_times(script: &Script, want: &[f64]) {
    let got = script.times();
    assert_eq!(got.len(), want.len(), "requests at {got:?}, want {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 0.01, "requests at {got:?}, want {want:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn unauthorized_is_returned_at_once() {
    let script = Script::new([Step::Status(401, None, None)]);
    let signer = Counting::new();
    let res = call(&script, &signer, RetryPolicy::default())
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.extensions().get::<PaymentReport>().is_none());
    assert_times(&script, &[0.0]);
    assert_eq!(signer.signatures(), 0);
}

#[tokio::test(start_paused = true)]
async fn rate_limited_backs_off_exponentially_and_honours_retry_after() {
    // 429 Retry-After 3 → wait 3 s; 429 → retry 1 of the backoff: 2 s; then pay.
    let script = Script::new([
        Step::Status(429, Some(3), None),
        Step::Status(429, None, None),
        challenge(),
        Step::Paid,
    ]);
    let signer = Counting::new();
    let res = call(&script, &signer, RetryPolicy::default().jitter(false))
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(report(&res).outcome, PaymentOutcome::Settled);
    assert_times(&script, &[0.0, 3.0, 5.0, 5.0]);
    assert_eq!(signer.signatures(), 1);
}

/// The wait before the first retry after `status` (no `Retry-After`), over `n` calls.
async fn first_retry_waits(status: u16, n: usize) -> Vec<f64> {
    let mut waits = Vec::with_capacity(n);
    for _ in 0..n {
        let script = Script::new([
            Step::Status(status, None, None),
            Step::Status(200, None, None),
        ]);
        call(&script, &Counting::new(), RetryPolicy::default())
            .await
            .expect("answer");
        let t = script.times();
        assert_eq!(t.len(), 2);
        waits.push(t[1] - t[0]);
    }
    waits
}

/// Jitter only lengthens the wait: many draws are never below the base (1 s after a 429,
/// 5 s after a 500, as the x402 error table says), at most 1.5 × it, and spread (without
/// jitter every draw would be the base, which fails the spread checks).
#[tokio::test(start_paused = true)]
async fn jitter_lengthens_the_first_retry_never_shortens_it() {
    for (status, base) in [(429, 1.0), (500, 5.0)] {
        let waits = first_retry_waits(status, 200).await;
        let min = waits.iter().copied().fold(f64::MAX, f64::min);
        let max = waits.iter().copied().fold(0.0, f64::max);
        assert!(
            min >= base - 0.001,
            "{status}: retried after {min} s < {base} s"
        );
        assert!(max <= base * 1.5 + 0.01, "{status}: retried after {max} s");
        let later = waits.iter().filter(|w| **w > base + 0.01).count();
        assert!(later > 150, "{status}: only {later}/200 waits lengthened");
        assert!(max - min > base / 4.0, "{status}: waits {min}..{max} s");
    }
}

#[tokio::test(start_paused = true)]
async fn rate_limit_retries_are_bounded() {
    let script = Script::new(vec![Step::Status(429, None, None); 10]);
    let res = call(
        &script,
        &Counting::new(),
        RetryPolicy::default().jitter(false),
    )
    .await
    .expect("answer");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // 3 retries after 1, 2 and 4 s.
    assert_times(&script, &[0.0, 1.0, 3.0, 7.0]);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_cap_is_not_waited_for() {
    let script = Script::new([Step::Status(429, Some(3600), None)]);
    let res = call(&script, &Counting::new(), RetryPolicy::default())
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_times(&script, &[0.0]);
}

#[tokio::test(start_paused = true)]
async fn server_errors_retry_after_5_s_doubling_and_bounded() {
    let script = Script::new([
        Step::Status(500, None, None),
        Step::Status(502, None, None),
        Step::Status(503, None, None),
        Step::Status(200, None, None),
    ]);
    let res = call(
        &script,
        &Counting::new(),
        RetryPolicy::default().jitter(false),
    )
    .await
    .expect("answer");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_times(&script, &[0.0, 5.0, 15.0]);

    let script = Script::new([
        Step::Status(503, Some(2), None),
        Step::Status(200, None, None),
    ]);
    let res = call(
        &script,
        &Counting::new(),
        RetryPolicy::default().jitter(false),
    )
    .await
    .expect("answer");
    assert_eq!(res.status(), StatusCode::OK);
    assert_times(&script, &[0.0, 2.0]);
}

#[tokio::test(start_paused = true)]
async fn a_402_after_paying_stops_without_a_second_signature() {
    let script = Script::new([
        challenge(),
        Step::Challenge {
            error: Some("invalid_exact_evm_signature"),
            extensions: None,
        },
        challenge(),
    ]);
    let signer = Counting::new();
    let res = call(&script, &signer, RetryPolicy::default())
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    let paid = report(&res);
    assert_eq!(
        paid.outcome,
        PaymentOutcome::Refused {
            reason: Some("invalid_exact_evm_signature".into())
        }
    );
    assert_eq!(signer.signatures(), 1);
    assert_eq!(script.seen().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn settlement_outcome_unknown_resends_the_same_proof() {
    let script = Script::new([
        challenge(),
        Step::Status(
            503,
            Some(1),
            Some(json!({ "error": "settlement_outcome_unknown" })),
        ),
        Step::Status(502, None, None),
        Step::Paid,
    ]);
    let signer = Counting::new();
    let res = call(&script, &signer, RetryPolicy::default().jitter(false))
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::OK);
    let paid = report(&res);
    assert_eq!(paid.outcome, PaymentOutcome::Settled);
    assert_eq!(paid.attempts, 3);
    assert_eq!(paid.transaction(), Some(B256::repeat_byte(0xab)));
    let payments = script.payments();
    assert!(payments[0].is_none());
    assert!(payments[1].is_some());
    assert!(payments[1..].iter().all(|p| *p == payments[1]), "one proof");
    assert_eq!(signer.signatures(), 1);
    // Retry-After 1, then the second server-error retry waits 5 × 2 s.
    assert_times(&script, &[0.0, 0.0, 1.0, 11.0]);
}

#[tokio::test(start_paused = true)]
async fn outcome_unknown_to_the_end_is_reported_unknown_not_refused() {
    let script = Script::new([
        challenge(),
        Step::OutcomeUnknown,
        Step::OutcomeUnknown,
        Step::OutcomeUnknown,
    ]);
    let signer = Counting::new();
    let res = call(&script, &signer, RetryPolicy::default().jitter(false))
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let paid = report(&res);
    assert_eq!(paid.outcome, PaymentOutcome::Unknown);
    assert_eq!(paid.attempts, 3);
    assert_eq!(paid.transaction(), Some(B256::repeat_byte(0xef)));
    let payments = script.payments();
    assert!(payments[1..].iter().all(|p| *p == payments[1]), "one proof");
    assert_eq!(signer.signatures(), 1);
    assert_times(&script, &[0.0, 0.0, 1.0, 2.0]);
}

#[tokio::test(start_paused = true)]
async fn nonce_already_used_after_an_unknown_outcome_is_reported_not_repaid() {
    let script = Script::new([
        challenge(),
        Step::Status(503, Some(1), None),
        Step::Challenge {
            error: Some("invalid_exact_evm_nonce_already_used"),
            extensions: None,
        },
        challenge(),
    ]);
    let signer = Counting::new();
    let res = call(&script, &signer, RetryPolicy::default())
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(report(&res).outcome, PaymentOutcome::AlreadyUsed);
    assert_eq!(signer.signatures(), 1);
    let payments = script.payments();
    assert_eq!(payments.len(), 3);
    assert_eq!(payments[1], payments[2]);
}

#[tokio::test(start_paused = true)]
async fn transport_errors_after_paying_resend_the_same_proof_then_report_unknown() {
    let script = Script::new([challenge(), Step::Fail, Step::Paid]);
    let signer = Counting::new();
    let res = call(&script, &signer, RetryPolicy::default().jitter(false))
        .await
        .expect("answer");
    assert_eq!(report(&res).outcome, PaymentOutcome::Settled);
    let payments = script.payments();
    assert_eq!(payments[1], payments[2]);
    assert_times(&script, &[0.0, 0.0, 5.0]);

    let script = Script::new([challenge(), Step::Fail, Step::Fail, Step::Fail]);
    let err = call(&script, &signer, RetryPolicy::default().jitter(false))
        .await
        .expect_err("no answer");
    assert!(err.is_outcome_unknown(), "{err}");
    let paid = err.report().expect("report");
    assert_eq!(paid.attempts, 3);
    assert_eq!(paid.outcome, PaymentOutcome::Unknown);
    let payments = script.payments();
    assert!(payments[1..].iter().all(|p| *p == payments[1]));
    assert_eq!(signer.signatures(), 2, "one per call");
}

#[tokio::test(start_paused = true)]
async fn transport_error_before_paying_is_an_error() {
    let script = Script::new([Step::Fail]);
    let err = call(&script, &Counting::new(), RetryPolicy::default())
        .await
        .expect_err("no answer");
    assert!(err.is_transport() && !err.is_outcome_unknown(), "{err}");
    assert_eq!(script.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn payment_identifier_is_sent_and_kept_across_retries() {
    let ext = json!({ "payment-identifier": { "info": { "required": true }, "schema": {} } });
    let script = Script::new([
        Step::Challenge {
            error: None,
            extensions: Some(ext),
        },
        Step::Status(503, Some(1), None),
        Step::Paid,
    ]);
    let signer = Counting::new();
    let res = call(&script, &signer, RetryPolicy::default())
        .await
        .expect("answer");
    let id = report(&res).payment_id.expect("payment id");
    let ids: Vec<String> = script.payments()[1..]
        .iter()
        .map(|p| {
            let json = STANDARD.decode(p.as_ref().unwrap().as_bytes()).unwrap();
            let v: Value = serde_json::from_slice(&json).unwrap();
            assert_eq!(v["accepted"], json!(requirements()));
            assert_eq!(v["resource"]["url"], json!("http://api.test/paid"));
            v["extensions"]["payment-identifier"]["info"]["id"]
                .as_str()
                .expect("id in the payload")
                .to_owned()
        })
        .collect();
    assert_eq!(ids, vec![id.clone(), id]);
    assert_eq!(signer.signatures(), 1);
}

#[tokio::test]
async fn the_signed_window_follows_the_clock_and_max_timeout() {
    let script = Script::new([challenge(), Step::Paid]);
    let res = call(&script, &Counting::new(), RetryPolicy::none())
        .await
        .expect("answer");
    let a = report(&res).authorization;
    assert_eq!(a.valid_after, U256::from(NOW - 600));
    assert_eq!(
        a.valid_before,
        U256::from(NOW + requirements().max_timeout_seconds)
    );
    assert_eq!(a.to, requirements().pay_to);
}

// ------------------------------------------------------------------------------------------------
// The example

#[test]
fn the_agent_example_runs_offline_and_stops_at_its_budget() {
    let stdout = common::run_example("agent");
    assert_eq!(stdout.matches("call ").count(), 3, "{stdout}");
    assert_eq!(stdout.matches("  paid 0.001000 ").count(), 2, "{stdout}");
    assert!(
        stdout.contains("call 3: not paid: budget exceeded: 1000 needed, 500 left"),
        "{stdout}"
    );
    assert!(
        stdout.contains("signed 0.002000 in total, 0.000500 left"),
        "{stdout}"
    );
}

// ------------------------------------------------------------------------------------------------
// Our server says the settlement outcome is unknown

/// A settler whose transaction never confirms in time: the layer answers 503
/// `settlement_outcome_unknown` and keeps the proof spent.
#[derive(Clone, Default)]
struct NeverConfirms {
    calls: Arc<AtomicUsize>,
}

#[async_trait]
impl tower_x402::settle::Settler for NeverConfirms {
    async fn settle(
        &self,
        _: &tower_x402::VerifiedPayment,
    ) -> Result<tower_x402::settle::Settlement, tower_x402::settle::SettleError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(tower_x402::settle::SettleError::Unknown {
            transaction: Some(B256::repeat_byte(0xcd)),
            retry_after: Some(Duration::from_secs(2)),
            source: "no receipt in time".into(),
        })
    }
}

#[tokio::test(start_paused = true)]
async fn our_servers_outcome_unknown_is_retried_with_the_same_proof_then_reported_spent() {
    let hits = Hits::new();
    let settler = NeverConfirms::default();
    let server = ServiceBuilder::new()
        .layer(
            common::builder(&clock())
                .settler(settler.clone())
                .build()
                .expect("valid layer"),
        )
        .service(common::plain_service(hits.clone()));
    let signer = Counting::new();
    let start = Instant::now();
    let res = ServiceBuilder::new()
        .layer(paying(&signer, policy()).retry(RetryPolicy::default().jitter(false)))
        .service(server)
        .oneshot(get("http://api.test/paid"))
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    let paid = report(&res);
    assert_eq!(paid.outcome, PaymentOutcome::AlreadyUsed, "{paid:?}");
    assert_eq!(paid.attempts, 2);
    // The 503's receipt named the pending transaction: the caller can reconcile it.
    assert_eq!(paid.transaction(), Some(B256::repeat_byte(0xcd)));
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(2),
        "waited the Retry-After"
    );
    assert_eq!(signer.signatures(), 1, "never signed again");
    assert_eq!(hits.get(), 1, "the handler ran once");
    assert_eq!(settler.calls.load(Ordering::SeqCst), 1);
}
