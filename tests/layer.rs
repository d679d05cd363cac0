//! The layer end to end, in-process (and a little over the wire): the challenge, paid requests
//! in both protocol versions, receipts, the claim lifecycle around handler errors and failing
//! dependencies, axum wiring, pricing, several payment options, protocol versions and
//! readiness under a concurrency limit.
#![cfg(feature = "test-util")]

mod common;

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_x402::error::{SettleError, StoreError, VerifyError};
use tower_x402::nonce::{ClaimToken, NonceKey, Reservation};
use tower_x402::primitives::{U256, address};
use tower_x402::proto::header::PAYMENT_SIGNATURE;
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::proto::{PaymentPayload, X402Version};
use tower_x402::settle::{Settlement, Settler};
use tower_x402::test_util::{encode, exact_payload, pay, v2_json};
use tower_x402::{
    Asset, Network, NonceStore, PaymentLayer, PaymentOption, PaymentRejection, VerifiedPayment,
    Verifier,
};

const EXPOSED: &str = "PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE";

fn status(code: u16) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static(STATUS_HEADER),
        HeaderValue::from(code),
    )
}

/// The layer over the default app, as one in-process service.
fn stack(
    layer: PaymentLayer,
    hits: &Hits,
) -> impl Service<
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
// The challenge

#[tokio::test]
async fn challenge_carries_v2_header_and_v1_body() {
    let clock = clock();
    let hits = Hits::new();
    let layer = builder(&clock)
        .description("Weather report")
        .mime_type("application/json")
        .build()
        .unwrap();
    let svc = stack(layer, &hits);
    let r = get_with(&svc, "/paid?city=paris", []).await;

    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.reason(), None, "a first challenge has no error");
    assert_eq!(
        r.rejection,
        Some(PaymentRejection {
            status: StatusCode::PAYMENT_REQUIRED,
            reason: None,
            retry_after: None
        })
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.header("access-control-expose-headers"),
        None,
        "off by default"
    );
    assert!(r.has_no_receipt());

    // v2: the header, checked as raw JSON so the wire forms (strings, checksums) are pinned.
    let raw: Value = serde_json::from_slice(
        &STANDARD
            .decode(r.header("payment-required").unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(raw["x402Version"], json!(2));
    assert_eq!(
        raw["resource"],
        json!({
            "url": "http://api.test/paid?city=paris",
            "description": "Weather report",
            "mimeType": "application/json",
        })
    );
    let accepts = raw["accepts"].as_array().unwrap();
    assert_eq!(accepts.len(), 1);
    assert_eq!(
        accepts[0],
        json!({
            "scheme": "exact",
            "network": "eip155:84532",
            "amount": AMOUNT,
            "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            "payTo": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
            "maxTimeoutSeconds": 300,
            "extra": { "name": "USDC", "version": "2" },
        })
    );
    // The typed decoder agrees.
    let typed = r.challenge();
    assert_eq!(typed.accepts[0], requirements());
    assert_eq!(typed.resource.url, "http://api.test/paid?city=paris");

    // v1: the JSON body.
    let body = r.json();
    assert_eq!(body["x402Version"], json!(1));
    assert!(body.get("error").is_none());
    let v1 = body["accepts"].as_array().unwrap();
    assert_eq!(v1.len(), 1);
    assert_eq!(
        v1[0],
        json!({
            "scheme": "exact",
            "network": "base-sepolia",
            "maxAmountRequired": AMOUNT,
            "resource": "http://api.test/paid?city=paris",
            "description": "Weather report",
            "mimeType": "application/json",
            "payTo": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
            "maxTimeoutSeconds": 300,
            "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            "extra": { "name": "USDC", "version": "2" },
        })
    );
    assert_eq!(
        r.v1_challenge().accepts[0].max_amount_required,
        U256::from(1000)
    );
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn v1_description_is_present_and_empty_without_one() {
    let clock = clock();
    let hits = Hits::new();
    let svc = stack(layer(&clock), &hits);
    let r = get_with(&svc, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    // v1 requires the field; it may be empty.
    assert_eq!(r.json()["accepts"][0]["description"], json!(""));
    assert_eq!(r.challenge().resource.description, None);
}

#[tokio::test]
async fn expose_headers_only_when_enabled() {
    let clock = clock();
    for on in [false, true] {
        let hits = Hits::new();
        let svc = stack(builder(&clock).expose_headers(on).build().unwrap(), &hits);
        let want = on.then_some(EXPOSED);
        let challenge = get_with(&svc, "/paid", []).await;
        assert_eq!(challenge.status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(
            challenge.header("access-control-expose-headers"),
            want,
            "402, expose={on}"
        );
        let paid = get_with(&svc, "/paid", [proof_v2()]).await;
        assert_eq!(paid.status, StatusCode::OK);
        assert_eq!(
            paid.header("access-control-expose-headers"),
            want,
            "200, expose={on}"
        );
        let bad = get_with(
            &svc,
            "/paid",
            [(PAYMENT_SIGNATURE, HeaderValue::from_static("!"))],
        )
        .await;
        assert_eq!(
            bad.outcome(),
            (StatusCode::BAD_REQUEST, Some("invalid_payload".into()))
        );
        assert_eq!(
            bad.header("access-control-expose-headers"),
            want,
            "400, expose={on}"
        );
        assert_eq!(hits.get(), 1);
    }
}

// ------------------------------------------------------------------------------------------------
// Paying

#[tokio::test]
async fn paid_v2_gets_200_and_a_receipt() {
    let clock = clock();
    let hits = Hits::new();
    let svc = stack(layer(&clock), &hits);
    let r = get_with(&svc, "/paid", [proof_v2()]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(r.rejection, None);
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "a paid body belongs to one payer"
    );
    assert_eq!(r.header("access-control-expose-headers"), None);
    assert!(!r.headers.contains_key("payment-required"));
    assert!(
        !r.headers.contains_key("x-payment-response"),
        "v2 gets the v2 receipt only"
    );
    assert_success_receipt(&r.receipt(), "eip155:84532");
    let body = r.json();
    assert_eq!(body["handler"], json!("ran"));
    assert_eq!(body["payer"], json!(payer().address().to_checksum(None)));
    assert_eq!(body["amount"], json!(AMOUNT));
    assert_eq!(body["version"], json!(2));
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn paid_v1_gets_200_and_an_x_payment_response() {
    let clock = clock();
    let hits = Hits::new();
    let svc = stack(layer(&clock), &hits);
    let r = get_with(&svc, "/paid", [proof_v1()]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(
        !r.headers.contains_key("payment-response"),
        "v1 gets the v1 receipt only"
    );
    assert_success_receipt(&r.v1_receipt(), "base-sepolia");
    assert_eq!(r.json()["version"], json!(1));
    assert_eq!(r.json()["amount"], json!(AMOUNT));
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn verified_payment_is_in_the_request_extensions() {
    let clock = clock();
    let seen = Arc::new(std::sync::Mutex::new(None::<VerifiedPayment>));
    let inner = {
        let seen = seen.clone();
        tower::service_fn(move |req: http::Request<axum::body::Body>| {
            let seen = seen.clone();
            async move {
                *seen.lock().unwrap() = req.extensions().get::<VerifiedPayment>().cloned();
                Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::from("ok")))
            }
        })
    };
    let svc = layer(&clock).layer(inner);
    let req = requirements();
    let payload = exact_payload(&payer(), &req, NOW);
    let r = get_with(
        &svc,
        "/x",
        [(PAYMENT_SIGNATURE, encode(&v2_json(&req, &payload, None)))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let p = seen
        .lock()
        .unwrap()
        .clone()
        .expect("the handler saw the payment");
    assert_eq!(p.version, X402Version::V2);
    assert_eq!(p.network, Network::BASE_SEPOLIA);
    assert_eq!(p.asset, USDC);
    assert_eq!(p.payer, payer().address());
    assert_eq!(p.pay_to, PAY_TO);
    assert_eq!(p.amount, U256::from(1000));
    assert_eq!(p.eip3009().map(|(a, _)| a), Some(&payload.authorization));
    assert_eq!(p.signature(), &payload.signature);
    assert_eq!(p.valid_before, NOW + 300);
    assert_eq!(p.nonce(), payload.authorization.nonce);
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn axum_extractor_shows_payer_and_amount() {
    use axum::routing::get;
    async fn paid(p: VerifiedPayment) -> String {
        format!("{} paid {}", p.payer, p.amount)
    }
    async fn maybe(p: Option<VerifiedPayment>) -> String {
        format!("{:?}", p.map(|p| p.payer))
    }
    let clock = clock();
    let app = Router::new()
        .route("/paid", get(paid))
        .route_layer(layer(&clock))
        .route("/free", get(maybe))
        .route("/forgot-the-layer", get(paid));
    let r = get_with(&app, "/paid", [proof_v2()]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        String::from_utf8(r.body.to_vec()).unwrap(),
        format!("{} paid 1000", payer().address())
    );
    assert_success_receipt(&r.receipt(), "eip155:84532");
    let r = get_with(&app, "/free", []).await;
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"None"[..]));
    // The extractor without a layer is a server bug (500), never a free pass.
    let r = get_with(&app, "/forgot-the-layer", []).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
}

// ------------------------------------------------------------------------------------------------
// The claim around handler errors

#[tokio::test]
async fn handler_error_releases_the_claim() {
    for (code, version) in [
        (500, X402Version::V2),
        (404, X402Version::V2),
        (500, X402Version::V1),
        (404, X402Version::V1),
    ] {
        let clock = clock();
        let hits = Hits::new();
        let svc = stack(layer(&clock), &hits);
        let proof = pay(&payer(), &requirements(), NOW, version);

        let failed = get_with(&svc, "/paid", [proof.clone(), status(code)]).await;
        assert_eq!(failed.status.as_u16(), code, "{version:?}");
        assert!(
            failed.has_no_receipt(),
            "nothing settled on {code}, so no receipt"
        );
        assert_eq!(
            failed.rejection, None,
            "the handler answered, not the layer"
        );
        assert_eq!(
            failed.json()["handler"],
            json!("ran"),
            "the handler's body goes through"
        );
        assert_eq!(failed.header("cache-control"), Some("no-store"));
        assert_eq!(hits.get(), 1);

        // The same proof buys the resource once more...
        let ok = get_with(&svc, "/paid", [proof.clone()]).await;
        assert_eq!(
            ok.status,
            StatusCode::OK,
            "{code} {version:?}: {:?}",
            ok.reason()
        );
        match version {
            X402Version::V2 => assert_success_receipt(&ok.receipt(), "eip155:84532"),
            X402Version::V1 => assert_success_receipt(&ok.v1_receipt(), "base-sepolia"),
        }
        assert_eq!(hits.get(), 2);

        // ...and only once.
        let again = get_with(&svc, "/paid", [proof]).await;
        assert_eq!(
            again.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
        );
        assert_eq!(hits.get(), 2);
    }
}

/// The inner service failing (its `Err`, not an error status) moves no money either.
#[tokio::test]
async fn inner_service_error_releases_the_claim() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let clock = clock();
    let calls = Arc::new(AtomicUsize::new(0));
    let flaky = {
        let calls = calls.clone();
        tower::service_fn(move |_req: http::Request<axum::body::Body>| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    Err("backend exploded")
                } else {
                    Ok(http::Response::new(axum::body::Body::from("ok")))
                }
            }
        })
    };
    let svc = layer(&clock).layer(flaky);
    let proof = proof_v2();
    // (`ResponseBody` has no `Debug`, so no `unwrap_err`.)
    let Err(err) = svc.clone().oneshot(request("/paid", [proof.clone()])).await else {
        panic!("the inner error is passed through")
    };
    assert_eq!(err, "backend exploded");
    let r = get_with(&svc, "/paid", [proof.clone()]).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "released after the error: {:?}",
        r.reason()
    );
    assert_success_receipt(&r.receipt(), "eip155:84532");
    let r = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn redirects_are_settled_like_successes() {
    let clock = clock();
    let hits = Hits::new();
    let svc = stack(layer(&clock), &hits);
    let proof = proof_v2();
    let r = get_with(&svc, "/paid", [proof.clone(), status(303)]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_success_receipt(&r.receipt(), "eip155:84532");
    let again = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(
        again.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    assert_eq!(hits.get(), 1);
}

// ------------------------------------------------------------------------------------------------
// Failing dependencies

struct RefusingSettler;

#[async_trait]
impl Settler for RefusingSettler {
    async fn settle(&self, _: &VerifiedPayment) -> Result<Settlement, SettleError> {
        Err(SettleError::Refused {
            reason: tower_x402::rejection::Reason::from_wire(
                "invalid_exact_evm_insufficient_balance",
            )
            .expect("a catalogued reason"),
            transaction: None,
        })
    }
}

struct DownSettler;

#[async_trait]
impl Settler for DownSettler {
    async fn settle(&self, _: &VerifiedPayment) -> Result<Settlement, SettleError> {
        Err(SettleError::Unavailable {
            retry_after: None,
            source: "facilitator timed out".into(),
        })
    }
}

/// A nonce store whose `reserve` always fails with `error()`.
struct BrokenStore(fn() -> StoreError);

#[async_trait]
impl NonceStore for BrokenStore {
    async fn reserve(&self, _: &NonceKey, _: u64) -> Result<Reservation, StoreError> {
        Err((self.0)())
    }
    async fn consume(&self, _: &NonceKey, _: ClaimToken) -> Result<(), StoreError> {
        panic!("nothing was reserved, nothing may be consumed")
    }
    async fn release(&self, _: &NonceKey, _: ClaimToken) -> Result<(), StoreError> {
        panic!("nothing was reserved, nothing may be released")
    }
}

struct DownVerifier(Option<Duration>);

#[async_trait]
impl Verifier for DownVerifier {
    async fn verify(
        &self,
        _: &PaymentPayload,
        _: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        Err(VerifyError::Unavailable {
            retry_after: self.0,
            source: "facilitator down".into(),
        })
    }
}

#[tokio::test]
async fn refused_settlement_withholds_the_body_and_spends_the_proof() {
    for version in [X402Version::V2, X402Version::V1] {
        let clock = clock();
        let hits = Hits::new();
        let svc = stack(
            builder(&clock).settler(RefusingSettler).build().unwrap(),
            &hits,
        );
        let proof = pay(&payer(), &requirements(), NOW, version);
        let r = get_with(&svc, "/paid", [proof.clone()]).await;
        assert_eq!(
            r.outcome(),
            (
                StatusCode::PAYMENT_REQUIRED,
                Some("invalid_exact_evm_insufficient_balance".into())
            ),
            "{version:?}"
        );
        assert_eq!(hits.get(), 1, "the handler ran before settlement");
        assert!(
            !String::from_utf8_lossy(&r.body).contains("handler"),
            "unpaid body withheld"
        );
        assert_eq!(
            r.json()["x402Version"],
            json!(1),
            "the body is the v1 challenge"
        );
        assert_eq!(
            r.json()["error"],
            json!("invalid_exact_evm_insufficient_balance")
        );
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let (receipt, network) = match version {
            X402Version::V2 => (r.receipt(), "eip155:84532"),
            X402Version::V1 => (r.v1_receipt(), "base-sepolia"),
        };
        assert_eq!(
            receipt,
            json!({
                "success": false,
                "errorReason": "invalid_exact_evm_insufficient_balance",
                "payer": payer().address().to_checksum(None),
                "transaction": "",
                "network": network,
            })
        );
        // A refused settlement still spent the proof: it cannot buy the handler again.
        let again = get_with(&svc, "/paid", [proof]).await;
        assert_eq!(
            again.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
        );
        assert_eq!(hits.get(), 1);
    }
}

#[tokio::test]
async fn unavailable_settler_is_503_and_releases_the_proof() {
    let clock = clock();
    let hits = Hits::new();
    let svc = stack(builder(&clock).settler(DownSettler).build().unwrap(), &hits);
    let proof = proof_v2();
    let r = get_with(&svc, "/paid", [proof.clone()]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(hits.get(), 1);
    assert!(
        !String::from_utf8_lossy(&r.body).contains("handler"),
        "unpaid body withheld"
    );
    let receipt = r.receipt();
    assert_eq!(receipt["success"], json!(false));
    assert_eq!(receipt["errorReason"], json!("unexpected_settle_error"));
    // Nothing was sent: the same proof may come back (and is served again, since the first
    // answer was withheld), instead of being refused as a replay.
    let again = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(
        again.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn unavailable_nonce_store_is_503_and_the_handler_does_not_run() {
    let clock = clock();
    type Failure = fn() -> StoreError;
    let cases: [(Failure, &str); 3] = [
        (
            || StoreError::Unavailable {
                retry_after: None,
                source: "redis down".into(),
            },
            "5",
        ),
        (
            || StoreError::Unavailable {
                retry_after: Some(Duration::from_secs(2)),
                source: "redis busy".into(),
            },
            "2",
        ),
        (|| StoreError::Full { capacity: 1 }, "5"),
    ];
    for (error, retry_after) in cases {
        let hits = Hits::new();
        let layer = builder(&clock)
            .nonce_store(BrokenStore(error))
            .build()
            .unwrap();
        let svc = stack(layer, &hits);
        for proof in [proof_v2(), proof_v1()] {
            let r = get_with(&svc, "/paid", [proof]).await;
            assert_eq!(
                r.outcome(),
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some("service_unavailable".into())
                )
            );
            assert_eq!(r.header("retry-after"), Some(retry_after));
            assert_eq!(r.header("cache-control"), Some("no-store"));
            assert!(r.has_no_receipt());
            assert_eq!(
                r.rejection.as_ref().map(|x| x.status),
                Some(StatusCode::SERVICE_UNAVAILABLE)
            );
        }
        assert_eq!(
            hits.get(),
            0,
            "fail closed: no handler on an unclaimed proof"
        );
    }
}

#[tokio::test]
async fn unavailable_verifier_is_503_and_the_handler_does_not_run() {
    for (own, configured, want) in [
        (None, None, "5"),
        (Some(Duration::from_secs(7)), None, "7"),
        (None, Some(Duration::from_millis(1500)), "2"),
        (None, Some(Duration::ZERO), "1"),
    ] {
        let clock = clock();
        let hits = Hits::new();
        let mut b = builder(&clock).verifier(DownVerifier(own));
        if let Some(wait) = configured {
            b = b.retry_after(wait);
        }
        let svc = stack(b.build().unwrap(), &hits);
        let r = get_with(&svc, "/paid", [proof_v2()]).await;
        assert_eq!(
            r.outcome(),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("service_unavailable".into())
            )
        );
        assert_eq!(r.header("retry-after"), Some(want));
        assert_eq!(
            r.json(),
            json!({ "error": "service_unavailable" }),
            "no backend detail leaks"
        );
        assert_eq!(hits.get(), 0);
    }
}

// ------------------------------------------------------------------------------------------------
// axum wiring

#[tokio::test]
async fn route_layer_charges_matched_routes_only() {
    let clock = clock();
    let hits = Hits::new();
    let routed = Router::new()
        .route("/paid", handler(hits.clone()))
        .route_layer(layer(&clock));
    let r = get_with(&routed, "/nope", []).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "route_layer: unmatched stays 404"
    );
    assert!(!r.headers.contains_key("payment-required"));
    assert_eq!(
        get_with(&routed, "/paid", []).await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    assert_eq!(
        get_with(&routed, "/paid", [proof_v2()]).await.status,
        StatusCode::OK
    );

    let layered = Router::new()
        .route("/paid", handler(hits.clone()))
        .layer(layer(&clock));
    let r = get_with(&layered, "/nope", []).await;
    assert_eq!(
        r.status,
        StatusCode::PAYMENT_REQUIRED,
        "layer: the fallback is charged too"
    );
    assert_eq!(r.challenge().resource.url, "http://api.test/nope");
    assert_eq!(
        get_with(&layered, "/paid", [proof_v2()]).await.status,
        StatusCode::OK
    );
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn per_route_layer_on_a_method_router() {
    let clock = clock();
    let hits = Hits::new();
    let app = Router::new()
        .route("/paid", handler(hits.clone()).layer(layer(&clock)))
        .route("/free", handler(hits.clone()));
    let r = get_with(&app, "/free", []).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("cache-control"),
        None,
        "an uncharged route is untouched"
    );
    assert_eq!(
        get_with(&app, "/paid", []).await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    let r = get_with(&app, "/paid", [proof_v2()]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_success_receipt(&r.receipt(), "eip155:84532");
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn over_the_wire_resource_url_comes_from_host_or_base() {
    let clock = clock();
    let hits = Hits::new();
    let (addr, server) = serve(app(&hits).layer(layer(&clock))).await;
    let based = serve(
        app(&hits).layer(
            builder(&clock)
                .resource_base("https://api.example.com/")
                .build()
                .unwrap(),
        ),
    )
    .await;
    let client = client();
    let r = wire(&client, addr, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.challenge().resource.url, format!("http://{addr}/paid"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = wire(&client, based.0, "/paid?q=1", []).await;
    assert_eq!(
        r.challenge().resource.url,
        "https://api.example.com/paid?q=1"
    );
    assert_eq!(
        r.json()["accepts"][0]["resource"],
        json!("https://api.example.com/paid?q=1")
    );
    let r = wire(&client, addr, "/paid", [proof_v2()]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_success_receipt(&r.receipt(), "eip155:84532");
    assert_eq!(hits.get(), 1);
    server.abort();
    based.1.abort();
}

// ------------------------------------------------------------------------------------------------
// Pricing and options

#[tokio::test]
async fn pricing_closure_frees_and_prices_per_request() {
    let clock = clock();
    let hits = Hits::new();
    let usdc = Asset::usdc_base_sepolia();
    let cheap: Arc<[PaymentOption]> = Arc::new([option()]);
    let dear_option = PaymentOption::exact(&usdc, "$0.01", PAY_TO).unwrap();
    let dear: Arc<[PaymentOption]> = Arc::new([dear_option.clone()]);
    let layer = unpriced_builder(&clock)
        .pricing(move |parts| match parts.uri.path() {
            "/free" => None,
            "/premium" => Some(dear.clone()),
            _ => Some(cheap.clone()),
        })
        .build()
        .unwrap();
    let svc = stack(layer, &hits);

    let r = get_with(&svc, "/free", []).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json()["payer"],
        Value::Null,
        "no payment on a free request"
    );
    for name in [
        "cache-control",
        "payment-required",
        "payment-response",
        "access-control-expose-headers",
    ] {
        assert!(!r.headers.contains_key(name), "free path adds no {name}");
    }
    assert_eq!(hits.get(), 1);

    let r = get_with(&svc, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.challenge().accepts[0].amount, U256::from(1000));
    let r = get_with(&svc, "/premium", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        r.challenge().accepts,
        vec![dear_option.requirements().clone()]
    );
    assert_eq!(r.json()["accepts"][0]["maxAmountRequired"], json!("10000"));

    // The cheap proof does not buy the dear route; the dear one does.
    let r = get_with(&svc, "/premium", [proof_v2()]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_payment_requirements".into())
        )
    );
    let r = get_with(
        &svc,
        "/premium",
        [pay(
            &payer(),
            dear_option.requirements(),
            NOW,
            X402Version::V2,
        )],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(r.json()["amount"], json!("10000"));
    // A v1 client pays the dear route by scheme and network only.
    let r = get_with(
        &svc,
        "/premium",
        [pay(
            &payer(),
            dear_option.requirements(),
            NOW,
            X402Version::V1,
        )],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(hits.get(), 3);
}

/// A second EIP-3009 token on Base Sepolia (EIP-712 domain of our own).
fn test_token() -> Asset {
    Asset {
        network: Network::BASE_SEPOLIA,
        address: address!("0x1111111111111111111111111111111111111111"),
        eip712_name: "Test Token".into(),
        eip712_version: "1".into(),
        decimals: 18,
    }
}

fn several_options() -> [PaymentOption; 4] {
    [
        option(),
        PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.01", PAY_TO).unwrap(),
        PaymentOption::exact(&test_token(), "0.5", PAY_TO)
            .unwrap()
            .with_max_timeout(60)
            .unwrap(),
        PaymentOption::exact(&Asset::usdc_base(), "$0.002", PAY_TO).unwrap(),
    ]
}

fn several_options_layer(clock: &tower_x402::clock::FixedClock) -> PaymentLayer {
    let mut b = PaymentLayer::builder()
        .no_challenge_binding()
        .verifier(tower_x402::ExactEvmVerifier::new().with_clock(clock.clone()))
        .nonce_store(tower_x402::MemoryNonceStore::with_capacity_and_clock(
            100,
            clock.clone(),
        ));
    for o in several_options() {
        b = b.accept(o);
    }
    b.build().unwrap()
}

#[tokio::test]
async fn several_options_each_can_be_paid_in_v2() {
    let clock = clock();
    let hits = Hits::new();
    let svc = stack(several_options_layer(&clock), &hits);
    let options = several_options();

    let r = get_with(&svc, "/paid", []).await;
    let offered: Vec<_> = options.iter().map(|o| o.requirements().clone()).collect();
    assert_eq!(
        r.challenge().accepts,
        offered,
        "offered in configuration order"
    );
    let v1 = r.json();
    let networks: Vec<_> = v1["accepts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["network"].clone())
        .collect();
    assert_eq!(
        networks,
        [
            json!("base-sepolia"),
            json!("base-sepolia"),
            json!("base-sepolia"),
            json!("base")
        ]
    );
    assert_eq!(
        v1["accepts"][2]["maxAmountRequired"],
        json!("500000000000000000")
    );

    for (i, o) in options.iter().enumerate() {
        let r = get_with(
            &svc,
            "/paid",
            [pay(&payer(), o.requirements(), NOW, X402Version::V2)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "option {i}: {:?}", r.reason());
        assert_eq!(
            r.json()["amount"],
            json!(o.requirements().amount.to_string()),
            "option {i}"
        );
        let receipt = r.receipt();
        assert_eq!(
            receipt["network"],
            json!(o.requirements().network.caip2()),
            "option {i}"
        );
        assert_eq!(receipt["success"], json!(true));
    }
    assert_eq!(hits.get(), 4);

    // A proof signed for option 1 but echoing option 0 is checked against option 0: refused.
    let mut mixed = v2_json(
        &requirements(),
        &exact_payload(&payer(), options[1].requirements(), NOW),
        None,
    );
    mixed["accepted"] = json!(options[0].requirements());
    let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&mixed))]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_authorization_value".into())
        )
    );
    assert_eq!(hits.get(), 4);
}

/// A v1 payload names only scheme and network; with two options on one network, the
/// verifier must still find the one the authorization pays for. Each option is advertised in
/// the v1 challenge body, so a v1 client may pick any of them.
#[tokio::test]
async fn several_options_each_can_be_paid_in_v1() {
    let clock = clock();
    let hits = Hits::new();
    let svc = stack(several_options_layer(&clock), &hits);
    let mut failures = Vec::new();
    for (i, o) in several_options().iter().enumerate() {
        let r = get_with(
            &svc,
            "/paid",
            [pay(&payer(), o.requirements(), NOW, X402Version::V1)],
        )
        .await;
        if r.status != StatusCode::OK {
            failures.push(format!(
                "v1 option {i} ({}): {:?}",
                o.requirements().amount,
                r.outcome()
            ));
        } else {
            assert_eq!(
                r.json()["amount"],
                json!(o.requirements().amount.to_string())
            );
        }
    }
    assert!(
        failures.is_empty(),
        "v1 payments refused:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn versions_switch_refuses_the_disabled_header() {
    let clock = clock();
    for (v1, v2) in [(false, true), (true, false)] {
        let hits = Hits::new();
        let svc = stack(builder(&clock).versions(v1, v2).build().unwrap(), &hits);
        let (refused, accepted) = if v2 {
            (proof_v1(), proof_v2())
        } else {
            (proof_v2(), proof_v1())
        };
        let r = get_with(&svc, "/paid", [refused]).await;
        assert_eq!(
            r.outcome(),
            (
                StatusCode::PAYMENT_REQUIRED,
                Some("invalid_x402_version".into())
            ),
            "versions({v1}, {v2})"
        );
        // The challenge offers only the accepted form: a client that prefers v2 must not
        // be lured into paying in a version the route refuses.
        assert_eq!(r.header("payment-required").is_some(), v2);
        assert_eq!(r.json()["x402Version"], json!(if v1 { 1 } else { 2 }));
        assert_eq!(hits.get(), 0);
        let r = get_with(&svc, "/paid", [accepted]).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "versions({v1}, {v2}): {:?}",
            r.reason()
        );
        assert_eq!(hits.get(), 1);
    }
    assert!(builder(&clock).versions(false, false).build().is_err());
}

#[tokio::test]
async fn header_at_the_size_limit_is_accepted_one_above_is_431() {
    let clock = clock();
    let hits = Hits::new();
    let svc = stack(layer(&clock), &hits);
    // Pads a v2 payload (extensions are free-form) until its base64 is exactly `len` bytes.
    let padded = |len: usize| {
        let req = requirements();
        let mut doc = v2_json(&req, &exact_payload(&payer(), &req, NOW), None);
        doc["extensions"] = json!({ "pad": "" });
        let base = serde_json::to_vec(&doc).unwrap().len();
        let json_len = len / 4 * 3;
        doc["extensions"]["pad"] = json!("x".repeat(json_len - base));
        let value = encode(&doc);
        assert_eq!(value.len(), len);
        (PAYMENT_SIGNATURE, value)
    };
    let r = get_with(&svc, "/paid", [padded(8192)]).await;
    assert_eq!(r.status, StatusCode::OK, "exactly 8 KiB: {:?}", r.reason());
    let r = get_with(&svc, "/paid", [padded(8196)]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Some("invalid_payload".into())
        )
    );
    assert_eq!(hits.get(), 1);
    // The limit is configurable.
    let small = stack(
        builder(&clock).max_header_bytes(512).build().unwrap(),
        &hits,
    );
    let proof = proof_v2();
    assert!(proof.1.len() > 512, "a proof is {} bytes", proof.1.len());
    let r = get_with(&small, "/paid", [proof]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Some("invalid_payload".into())
        )
    );
    assert_eq!(hits.get(), 1);
}

// ------------------------------------------------------------------------------------------------
// Readiness

/// Buffer → Payment → ConcurrencyLimit(1) → handler. The layer must hand the readied inner
/// service (holding the only permit) to the paid future: calling an un-readied clone would
/// panic inside `ConcurrencyLimit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buffered_stack_under_a_concurrency_limit_serves_every_request() {
    let clock = clock();
    let hits = Hits::new();
    let svc = ServiceBuilder::new()
        .buffer(64)
        .layer(layer(&clock))
        .layer(ConcurrencyLimitLayer::new(1))
        .service(plain_service::<axum::body::Body>(hits.clone()));
    let mut tasks = Vec::new();
    for i in 0..96 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let headers = match i % 3 {
                0 => vec![proof_v2()],
                1 => vec![proof_v1()],
                _ => vec![],
            };
            let res = svc
                .oneshot(request("/paid", headers))
                .await
                .expect("buffer and inner do not fail");
            (i, Reply::read(res).await)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.expect("no panic");
        let want = if i % 3 == 2 {
            StatusCode::PAYMENT_REQUIRED
        } else {
            StatusCode::OK
        };
        assert_eq!(r.status, want, "request {i}: {:?}", r.reason());
    }
    assert_eq!(hits.get(), 64);
}

/// One service instance, `ready().call()` in a loop with each future spawned: the permit
/// travels with the paid call and comes back when it finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_call_hands_the_readied_service_to_the_paid_future() {
    let clock = clock();
    let hits = Hits::gated();
    let mut svc = layer(&clock).layer(
        ConcurrencyLimitLayer::new(1).layer(plain_service::<axum::body::Body>(hits.clone())),
    );

    // Unpaid requests never reach the inner service and keep its permit for the next call.
    for _ in 0..3 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(request("/paid", []))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    }

    let first = tokio::spawn(
        svc.ready()
            .await
            .unwrap()
            .call(request("/paid", [proof_v2()])),
    );
    while hits.get() == 0 {
        tokio::task::yield_now().await;
    }
    // The in-flight paid call holds the only permit: the service is not ready.
    let pending = poll_fn(|cx| Poll::Ready(svc.poll_ready(cx).is_pending())).await;
    assert!(pending, "the permit went with the paid call");
    hits.open();
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);

    let mut running = Vec::new();
    for i in 0..32 {
        let headers = if i % 2 == 0 {
            vec![proof_v2()]
        } else {
            vec![proof_v1()]
        };
        let fut = svc.ready().await.unwrap().call(request("/paid", headers));
        running.push(tokio::spawn(fut));
    }
    for (i, t) in running.into_iter().enumerate() {
        let res = t.await.expect("no panic").unwrap();
        assert_eq!(res.status(), StatusCode::OK, "request {i}");
    }
    assert_eq!(hits.get(), 33);
}
