//! The paying client as a `reqwest-middleware` middleware ([`PayingMiddleware`]), over real
//! TCP: it pays our own server (v2 and v1, a replayed POST body), follows the failure table
//! against a scripted server (429/503 `Retry-After` re-send the same proof, 401 and a repeated
//! 402 stop, signatures counted with a wrapping `Signer`), keeps to its budget, and pays the
//! reference sellers (`@x402/express` v2, `x402-express` v1) on a local chain.
//!
//! The reference-seller test needs anvil and the node packages: without them it prints
//! SKIPPED, except under `CI=true`, where it fails (run `scripts/install-test-deps.sh`).
#![cfg(all(feature = "reqwest", feature = "axum", feature = "test-util"))]

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy_primitives::{B256, U256};
use alloy_signer::Signer;
use axum::Router;
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderValue, StatusCode};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use serde_json::{Value, json};
use tower_x402::client::{
    Budget, Error, PayingLayer, PayingMiddleware, PaymentOutcome, PaymentReport, Policy,
    RetryPolicy,
};
use tower_x402::proto::X402Version;
use tower_x402::proto::header::{PAYMENT_REQUIRED, PAYMENT_RESPONSE};
use tower_x402::test_util::demo_payer;
use tower_x402::{Asset, Network, VerifiedPayment};

use common::paying::{Counting, policy};
use common::{AMOUNT, Hits, clock, requirements};

// ------------------------------------------------------------------------------------------------
// Helpers

/// A reqwest client paying through `layer`'s configuration.
fn client<Sg: Signer + Send + Sync + 'static>(layer: PayingLayer<Sg>) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(PayingMiddleware::from(layer))
        .build()
}

fn report(res: &reqwest::Response) -> PaymentReport {
    res.extensions()
        .get::<PaymentReport>()
        .cloned()
        .expect("a PaymentReport on a paid response")
}

/// The paying client's own error inside a middleware error.
fn paying_error(e: &reqwest_middleware::Error) -> &Error {
    match e {
        reqwest_middleware::Error::Middleware(e) => e
            .downcast_ref::<Error>()
            .unwrap_or_else(|| panic!("not a paying-client error: {e:?}")),
        other => panic!("not a middleware error: {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Our server

/// `/paid` speaks both versions, `/v1` only v1, `/echo` (POST, paid) answers the body it got,
/// `/free` is free.
fn server(hits: &Hits) -> Router {
    let echo_hits = hits.clone();
    let echo = post(move |payment: VerifiedPayment, body: String| {
        let hits = echo_hits.clone();
        async move {
            hits.run(&http::HeaderMap::new(), Some(payment)).await;
            axum::Json(json!({ "echo": body }))
        }
    });
    Router::new()
        .route("/paid", common::handler(hits.clone()))
        .route("/echo", echo)
        .route_layer(common::layer(&clock()))
        .merge(
            Router::new()
                .route("/v1", common::handler(hits.clone()))
                .route_layer(
                    common::builder(&clock())
                        .versions(true, false)
                        .build()
                        .expect("valid layer"),
                ),
        )
        .route("/free", common::handler(hits.clone()))
}

#[tokio::test]
async fn pays_our_server_over_v2_and_v1() {
    let hits = Hits::new();
    let (addr, _server) = common::serve(server(&hits)).await;
    let signer = Counting::new();
    let budget = Budget::new(U256::from(1_000_000));
    let layer = PayingLayer::new(signer.clone(), policy().budget(budget.clone())).clock(clock());
    let v2 = client(layer.clone());
    let v1 = client(layer.only_version(X402Version::V1));

    // v2: PAYMENT-REQUIRED header, PAYMENT-SIGNATURE, PAYMENT-RESPONSE.
    let url = format!("http://{addr}/paid");
    let res = v2.get(&url).send().await.expect("paid call");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.url().as_str(), url, "the response keeps its URL");
    let paid = report(&res);
    assert_eq!(paid.version, X402Version::V2);
    assert_eq!(paid.outcome, PaymentOutcome::Settled);
    assert_eq!(paid.amount(), U256::from_str_radix(AMOUNT, 10).unwrap());
    assert_eq!(paid.requirements, requirements());
    assert_eq!(paid.payer(), demo_payer().address());
    assert_eq!(paid.attempts, 1);
    let receipt = paid.receipt.as_ref().expect("receipt");
    assert!(receipt.success);
    assert_eq!(receipt.network, Network::BASE_SEPOLIA);
    assert!(res.headers().contains_key(PAYMENT_RESPONSE));
    let body: Value = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap();
    assert_eq!(body["version"], json!(2), "{body}");
    assert_eq!(body["amount"], json!(AMOUNT), "{body}");

    // v1: the JSON body challenge, X-PAYMENT, X-PAYMENT-RESPONSE; a v2-first client falls
    // back to it on a v1-only route.
    for client in [&v1, &v2] {
        let res = client
            .get(format!("http://{addr}/v1"))
            .send()
            .await
            .expect("paid call");
        assert_eq!(res.status(), StatusCode::OK);
        let paid = report(&res);
        assert_eq!(paid.version, X402Version::V1);
        assert_eq!(paid.outcome, PaymentOutcome::Settled);
        assert!(res.headers().contains_key("x-payment-response"));
        let body: Value = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap();
        assert_eq!(body["version"], json!(1), "{body}");
    }

    // A POST body is sent again, unchanged, with the proof.
    let res = v2
        .post(format!("http://{addr}/echo"))
        .header("content-type", "text/plain")
        .body("order #42")
        .send()
        .await
        .expect("paid call");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(report(&res).outcome, PaymentOutcome::Settled);
    let body: Value = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap();
    assert_eq!(body["echo"], json!("order #42"));

    // A free route: no payment, no report.
    let res = v2
        .get(format!("http://{addr}/free"))
        .send()
        .await
        .expect("free call");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.extensions().get::<PaymentReport>().is_none());

    assert_eq!(hits.get(), 5, "each handler ran once");
    assert_eq!(signer.signatures(), 4, "one signature per paid call");
    assert_eq!(budget.spent(), U256::from(4_000));
}

#[tokio::test]
async fn the_budget_refuses_before_signing() {
    let hits = Hits::new();
    let (addr, _server) = common::serve(server(&hits)).await;
    let signer = Counting::new();
    // Room for one payment of 1000, not two.
    let budget = Budget::new(U256::from(1_500));
    let middleware = PayingMiddleware::from(
        PayingLayer::new(signer.clone(), policy().budget(budget.clone())).clock(clock()),
    );
    assert_eq!(middleware.budget().map(Budget::limit), Some(budget.limit()));
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build();
    let url = format!("http://{addr}/paid");
    let res = client.get(&url).send().await.expect("first call");
    assert_eq!(res.status(), StatusCode::OK);

    let err = client.get(&url).send().await.expect_err("over budget");
    let err = paying_error(&err);
    assert!(err.is_budget_exceeded(), "{err:?}");
    match err {
        Error::BudgetExceeded { amount, remaining } => {
            assert_eq!(*amount, U256::from(1_000));
            assert_eq!(*remaining, U256::from(500));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(signer.signatures(), 1, "nothing signed over budget");
    assert_eq!(hits.get(), 1);
    assert_eq!(budget.spent(), U256::from(1_000));
}

#[tokio::test]
async fn a_streaming_body_is_not_paid() {
    // A body that cannot be sent twice: the 402 comes back as it is, nothing signed.
    let hits = Hits::new();
    let (addr, _server) = common::serve(server(&hits)).await;
    let signer = Counting::new();
    let client = client(PayingLayer::new(signer.clone(), policy()).clock(clock()));
    let res = client
        .post(format!("http://{addr}/echo"))
        .body(reqwest::Body::wrap(String::from("order #42")))
        .send()
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    assert!(res.headers().contains_key(PAYMENT_REQUIRED));
    assert!(res.extensions().get::<PaymentReport>().is_none());
    assert_eq!(signer.signatures(), 0);
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn errors_below_the_middleware_come_back_unchanged() {
    // Nothing listens on port 9 of loopback: reqwest's own connect error, nothing paid.
    let signer = Counting::new();
    let client = client(PayingLayer::new(signer.clone(), policy()).clock(clock()));
    let err = client
        .get("http://127.0.0.1:9/paid")
        .send()
        .await
        .expect_err("no server");
    assert!(
        matches!(&err, reqwest_middleware::Error::Reqwest(e) if e.is_connect()),
        "{err:?}"
    );
    assert_eq!(signer.signatures(), 0);
}

// ------------------------------------------------------------------------------------------------
// A scripted server over TCP: the failure table

/// One scripted answer.
#[derive(Clone, Debug)]
enum Step {
    /// 402 with a v2 challenge for the default requirements (and an `error` if given).
    Challenge(Option<&'static str>),
    /// This status, with `Retry-After` seconds if given.
    Status(u16, Option<u64>),
    /// 200 with a successful receipt.
    Paid,
    /// 503 `settlement_outcome_unknown`, `Retry-After: 1`, a failed receipt.
    OutcomeUnknown,
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

    fn router(&self) -> Router {
        let script = self.clone();
        Router::new().fallback(move |headers: http::HeaderMap| {
            let script = script.clone();
            async move {
                let payment = headers
                    .get("payment-signature")
                    .or_else(|| headers.get("x-payment"))
                    .cloned();
                script.seen.lock().unwrap().push(Seen {
                    at: script.start.elapsed(),
                    payment,
                });
                let step = script.steps.lock().unwrap().pop_front();
                respond(step.expect("the script has a step for every request"))
            }
        })
    }
}

fn respond(step: Step) -> http::Response<axum::body::Body> {
    let mut res = http::Response::new(axum::body::Body::empty());
    let encode = |v: Value| HeaderValue::try_from(STANDARD.encode(v.to_string())).unwrap();
    match step {
        Step::Challenge(error) => {
            *res.status_mut() = StatusCode::PAYMENT_REQUIRED;
            let mut c = json!({
                "x402Version": 2,
                "resource": { "url": "http://api.test/paid" },
                "accepts": [requirements()],
            });
            if let Some(e) = error {
                c["error"] = json!(e);
            }
            res.headers_mut().insert(PAYMENT_REQUIRED, encode(c));
        }
        Step::Status(code, retry_after) => {
            *res.status_mut() = StatusCode::from_u16(code).unwrap();
            if let Some(secs) = retry_after {
                res.headers_mut()
                    .insert("retry-after", HeaderValue::from(secs));
            }
        }
        Step::Paid => {
            let receipt = json!({
                "success": true,
                "transaction": format!("{:#x}", B256::repeat_byte(0xab)),
                "network": "eip155:84532",
                "payer": demo_payer().address(),
            });
            res.headers_mut().insert(PAYMENT_RESPONSE, encode(receipt));
        }
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
            res.headers_mut().insert(PAYMENT_RESPONSE, encode(receipt));
        }
    }
    res
}

/// Serves `script` and calls it once through the middleware (jitter off, so waits are exact).
async fn call(
    script: &Script,
    signer: &Counting,
) -> Result<reqwest::Response, reqwest_middleware::Error> {
    let (addr, _server) = common::serve(script.router()).await;
    let retry = RetryPolicy::default()
        .jitter(false)
        .rate_limited(3, Duration::from_millis(100));
    client(
        PayingLayer::new(signer.clone(), policy())
            .clock(clock())
            .retry(retry),
    )
    .get(format!("http://{addr}/paid"))
    .send()
    .await
}

#[tokio::test]
async fn honours_retry_after_on_429_and_503_resending_the_same_proof() {
    let script = Script::new([
        Step::Challenge(None),
        Step::Status(429, Some(1)),
        Step::OutcomeUnknown,
        Step::Paid,
    ]);
    let signer = Counting::new();
    let res = call(&script, &signer).await.expect("answer");
    assert_eq!(res.status(), StatusCode::OK);
    let paid = report(&res);
    assert_eq!(paid.outcome, PaymentOutcome::Settled);
    assert_eq!(paid.attempts, 3);
    assert_eq!(signer.signatures(), 1, "signed once");

    let seen = script.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen[0].payment.is_none());
    let proof = seen[1].payment.clone().expect("the paid attempt");
    assert!(
        seen[2..].iter().all(|s| s.payment.as_ref() == Some(&proof)),
        "every retry re-sends the same proof: {seen:?}"
    );
    // Each `Retry-After: 1` was waited for (and not much more).
    for pair in seen[1..].windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_secs(1) && gap < Duration::from_secs(3),
            "retried after {gap:?}: {seen:?}"
        );
    }
}

#[tokio::test]
async fn stops_on_401_before_and_after_paying() {
    let script = Script::new([Step::Status(401, None)]);
    let signer = Counting::new();
    let res = call(&script, &signer).await.expect("answer");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.extensions().get::<PaymentReport>().is_none());
    assert_eq!(script.seen().len(), 1);
    assert_eq!(signer.signatures(), 0);

    let script = Script::new([Step::Challenge(None), Step::Status(401, None)]);
    let res = call(&script, &signer).await.expect("answer");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(report(&res).outcome, PaymentOutcome::NotCharged);
    assert_eq!(script.seen().len(), 2, "no retry after a 401");
    assert_eq!(signer.signatures(), 1);
}

#[tokio::test]
async fn stops_on_a_repeated_402_without_a_second_signature() {
    let script = Script::new([
        Step::Challenge(None),
        Step::Challenge(Some("invalid_exact_evm_signature")),
        Step::Challenge(None),
    ]);
    let signer = Counting::new();
    let res = call(&script, &signer).await.expect("answer");
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        report(&res).outcome,
        PaymentOutcome::Refused {
            reason: Some("invalid_exact_evm_signature".into())
        }
    );
    assert_eq!(script.seen().len(), 2, "the third step is never asked for");
    assert_eq!(signer.signatures(), 1);
}

// ------------------------------------------------------------------------------------------------
// The reference sellers, on a local chain

#[cfg(feature = "onchain")]
mod chain;

#[cfg(feature = "onchain")]
#[tokio::test]
async fn pays_the_reference_sellers_v2_and_v1_on_chain() {
    use alloy_provider::Provider;
    use chain::process::{self, repo};
    use chain::{Chain, FUNDED, PAY_TO};

    const PRICE: u64 = 10_000;
    let test = "reqwest::pays_the_reference_sellers_v2_and_v1_on_chain";
    let Some(deps) = process::test_deps(test, &["node/node_modules/@x402/express/package.json"])
    else {
        return;
    };
    let Some(chain) = Chain::start(test).await else {
        return;
    };
    let mut cmd = std::process::Command::new("node");
    cmd.arg(repo().join("tests/clients/reference-server.mjs"))
        .args(["--rpc", chain.url(), "--pay-to", &PAY_TO.to_checksum(None)])
        .env("X402_TEST_DEPS", &deps);
    // Its first line is JSON: `{"v2": URL, "v1": URL}`.
    let (sellers, line) =
        process::Server::start("reference-server.mjs", &mut cmd, Duration::from_secs(60));
    let urls: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{}", sellers.log()));

    let payer = demo_payer();
    assert_eq!(payer.address(), FUNDED[0]);
    let budget = Budget::new(U256::from(3 * PRICE));
    let client = client(PayingLayer::new(
        payer.clone(),
        Policy::new(U256::from(PRICE))
            .allow_asset(&Asset::usdc_base_sepolia())
            .budget(budget.clone()),
    ));
    for (key, version) in [("v2", X402Version::V2), ("v1", X402Version::V1)] {
        let url = format!("{}/weather", urls[key].as_str().expect("url"));
        let before = chain.balance(PAY_TO).await;
        let res = client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e:?}; sellers:\n{}", sellers.log()));
        let status = res.status();
        let paid = res.extensions().get::<PaymentReport>().cloned();
        let body = res.bytes().await.expect("body");
        assert_eq!(
            status,
            StatusCode::OK,
            "{url}: {paid:?} {}; sellers:\n{}",
            String::from_utf8_lossy(&body),
            sellers.log()
        );
        let paid = paid.expect("report");
        assert_eq!(paid.version, version);
        assert_eq!(paid.outcome, PaymentOutcome::Settled, "{paid:?}");
        let tx = paid.transaction().expect("a settlement transaction");
        let mined = chain
            .provider()
            .get_transaction_receipt(tx)
            .await
            .expect("rpc")
            .expect("the receipt's transaction is mined");
        assert!(mined.status());
        let json: Value = serde_json::from_slice(&body).expect("JSON body");
        assert_eq!(json["report"]["weather"], "sunny");
        assert!(
            chain
                .authorization_used(payer.address(), paid.nonce())
                .await
        );
        assert_eq!(chain.balance(PAY_TO).await - before, U256::from(PRICE));
    }
    assert_eq!(budget.spent(), U256::from(2 * PRICE));
}
