//! Prepaid bundles with sign-in-with-x (issue #10): pay once, then sign in per call.
//!
//! Semantics under test: a bundle of N calls grants N, the paying call is the first, so N - 1
//! sign-ins are served; a spent or expired bundle gets 402 and a fresh challenge. Handler runs
//! are counted, not only statuses.

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::siwx::*;
use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower::Layer;
use tower_x402::PaymentLayerBuilder;
use tower_x402::clock::{Clock, FixedClock};
use tower_x402::error::ConfigError;
use tower_x402::prepaid::{Bundle, Prepaid};
use tower_x402::test_util::PrivateKeySigner;

fn prepaid(clock: &FixedClock, bundle: Bundle) -> PaymentLayerBuilder {
    builder(clock)
        .resource_base(BASE)
        .prepaid(Prepaid::new(bundle).clock(clock.clone()))
}

/// A prepaid route selling `bundle`, bought once by [`payer`] at the clock's time: the clock,
/// the handler's counter and the service.
async fn bought(
    bundle: Bundle,
) -> (
    FixedClock,
    Runs,
    impl tower::Service<
        http::Request<axum::body::Body>,
        Response = http::Response<
            tower_x402::body::ResponseBody<http_body_util::Full<bytes::Bytes>>,
        >,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone,
) {
    let clock = clock();
    let runs = Runs::default();
    let svc = prepaid(&clock, bundle)
        .build()
        .unwrap()
        .layer(runs.service());
    buy(&svc, clock.now()).await;
    (clock, runs, svc)
}

#[tokio::test]
async fn the_402_sells_the_bundle_and_declares_sign_in() {
    let clock = clock();
    let runs = Runs::default();
    let layer = prepaid(&clock, Bundle::calls(10).for_price("$0.01"))
        .idempotency(tower_x402::idempotency::MemoryIdempotencyStore::new())
        .build()
        .unwrap();
    let svc = layer.layer(runs.service());
    let a = get_with(&svc, "/paid", []).await;
    let b = get_with(&svc, "/paid", []).await;
    let challenge = a.challenge();
    assert_eq!(challenge.accepts[0].amount.to_string(), "10000");
    let ext = challenge.extensions.clone().unwrap();
    // Merged next to the layer's other extensions, not in place of them.
    assert!(ext.contains_key("payment-identifier"), "{ext:?}");
    let (da, db) = (declaration(&a), declaration(&b));
    assert_eq!(da["info"]["domain"], json!("api.test"));
    assert_eq!(da["info"]["uri"], json!("http://api.test/paid"));
    assert_eq!(da["info"]["version"], json!("1"));
    assert_eq!(da["info"]["issuedAt"], json!("2025-06-15T15:06:40.000Z"));
    assert_eq!(
        da["info"]["expirationTime"],
        json!("2025-06-15T15:11:40.000Z")
    );
    assert_eq!(da["info"]["resources"], json!(["http://api.test/paid"]));
    assert_eq!(
        da["supportedChains"],
        json!([{"chainId": "eip155:84532", "type": "eip191"}])
    );
    assert_eq!(da["info"]["nonce"].as_str().unwrap().len(), 64);
    assert_ne!(
        da["info"]["nonce"], db["info"]["nonce"],
        "one nonce per 402"
    );
    assert_eq!(runs.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ten_call_bundle_serves_nine_sign_ins_under_64_concurrent_calls() {
    let clock = clock();
    let runs = Runs::default();
    let layer = prepaid(&clock, Bundle::calls(10).for_price("$0.01"))
        .build()
        .unwrap();
    let svc = layer.layer(runs.service());
    // Unpaid sign-in: a valid signature, no credit: 402 (the official client then pays).
    let early = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(
        early.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("prepaid_credit_exhausted".into())
        )
    );
    assert_eq!(runs.get(), 0);
    buy(&svc, clock.now()).await;
    assert_eq!(runs.get(), 1);
    let mut headers = Vec::new();
    for _ in 0..64 {
        headers.push(signed_header(&svc, &payer()).await);
    }
    let tasks: Vec<_> = headers
        .into_iter()
        .map(|h| {
            let svc = svc.clone();
            tokio::spawn(async move { get_with(&svc, "/paid", [h]).await })
        })
        .collect();
    let mut remaining = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::OK => {
                assert!(r.has_no_receipt(), "a sign-in settles nothing");
                assert_eq!(r.json()["paid"], json!(false));
                assert_eq!(
                    r.json()["signedIn"],
                    json!(payer().address().to_checksum(None))
                );
                remaining.push(r.json()["remaining"].as_u64().unwrap());
            }
            StatusCode::PAYMENT_REQUIRED => {
                assert_eq!(r.reason().as_deref(), Some("prepaid_credit_exhausted"));
                // A fresh challenge to buy the next bundle, with a fresh sign-in nonce.
                assert!(declaration(&r)["info"]["nonce"].is_string());
                refused += 1;
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
    }
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..9).collect::<Vec<u64>>(),
        "each call took one"
    );
    assert_eq!(refused, 55);
    assert_eq!(runs.get(), 10, "1 paid + 9 signed-in handler runs");
}

#[tokio::test]
async fn a_replayed_sign_in_is_refused_with_a_reason() {
    let (_, runs, svc) = bought(Bundle::calls(10)).await;
    let h = signed_header(&svc, &payer()).await;
    assert_eq!(
        get_with(&svc, "/paid", [h.clone()]).await.status,
        StatusCode::OK
    );
    let replay = get_with(&svc, "/paid", [h]).await;
    assert_eq!(
        replay.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_nonce_reused".into())
        )
    );
    assert_eq!(replay.header("www-authenticate"), Some("SIWX"));
    assert_eq!(runs.get(), 2, "the replay did not run the handler");
}

#[tokio::test]
async fn expired_bundles_get_a_fresh_402() {
    let (clock, runs, svc) = bought(Bundle::calls(100).within(Duration::from_secs(3600))).await;
    clock.advance(3599);
    let ok = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(ok.json()["remaining"], json!(98));
    clock.advance(1);
    let late = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(
        late.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("prepaid_credit_expired".into())
        )
    );
    assert_eq!(runs.get(), 2);
    // Buying again starts a new bundle.
    buy(&svc, clock.now()).await;
    let again = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(again.json()["remaining"], json!(98));

    // A pure time window: unlimited calls until it closes.
    let window = prepaid(&clock, Bundle::window(Duration::from_secs(60)))
        .build()
        .unwrap()
        .layer(runs.service());
    buy(&window, clock.now()).await;
    for _ in 0..3 {
        let r = get_with(&window, "/paid", [signed_header(&window, &payer()).await]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["remaining"], Value::Null);
    }
    clock.advance(60);
    let r = get_with(&window, "/paid", [signed_header(&window, &payer()).await]).await;
    assert_eq!(r.reason().as_deref(), Some("prepaid_credit_expired"));
}

#[tokio::test]
async fn a_sign_in_signed_by_another_key_is_401() {
    let (_, runs, svc) = bought(Bundle::calls(10)).await;
    let thief = PrivateKeySigner::random();
    let decl = declaration(&get_with(&svc, "/paid", []).await);
    // Claims the payer's address, signed by another key.
    let forged = get_with(
        &svc,
        "/paid",
        [header(&payload(&thief, payer().address(), &decl, |_| {}))],
    )
    .await;
    assert_eq!(
        forged.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_signature".into())
        )
    );
    // Signed correctly as itself: valid, but it never paid.
    let own = get_with(&svc, "/paid", [signed_header(&svc, &thief).await]).await;
    assert_eq!(own.reason().as_deref(), Some("prepaid_credit_exhausted"));
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn sign_ins_bound_elsewhere_or_altered_are_401() {
    let (clock, runs, svc) = bought(Bundle::calls(10)).await;
    let decl = declaration(&get_with(&svc, "/paid", []).await);
    let me = payer();
    type Tweak = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Tweak)> = vec![
        (
            "invalid_siwx_domain_mismatch",
            Box::new(|p| p["domain"] = json!("evil.test")),
        ),
        (
            "invalid_siwx_uri_mismatch",
            Box::new(|p| p["uri"] = json!("http://api.test.evil/paid")),
        ),
        (
            "invalid_siwx_unsupported_chain",
            Box::new(|p| p["chainId"] = json!("eip155:1")),
        ),
        (
            "invalid_siwx_unsupported_chain",
            Box::new(|p| p["signatureScheme"] = json!("eip6492")),
        ),
        (
            "invalid_siwx_nonce",
            Box::new(|p| p["nonce"] = json!("ab".repeat(32))),
        ),
        (
            "invalid_siwx_nonce",
            Box::new(|p| p["expirationTime"] = json!("2099-01-01T00:00:00.000Z")),
        ),
        (
            "invalid_siwx_not_before",
            Box::new(|p| p["notBefore"] = json!("2025-06-15T15:06:40.000Z")),
        ),
    ];
    for (want, tweak) in cases {
        let r = get_with(
            &svc,
            "/paid",
            [header(&payload(&me, me.address(), &decl, tweak))],
        )
        .await;
        assert_eq!(
            r.outcome(),
            (StatusCode::UNAUTHORIZED, Some(want.into())),
            "{want}"
        );
    }
    // A message signed, then kept past its 5-minute lifetime.
    let h = signed_header(&svc, &me).await;
    clock.advance(300);
    let r = get_with(&svc, "/paid", [h]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_siwx_expired".into())
        )
    );
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn malformed_sign_in_headers_are_400() {
    let (_, runs, svc) = bought(Bundle::calls(10)).await;
    let decl = declaration(&get_with(&svc, "/paid", []).await);
    let me = payer();
    let good = payload(&me, me.address(), &decl, |_| {});
    let b64 = |s: &str| HeaderValue::try_from(STANDARD.encode(s)).unwrap();
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("nonce");
    let mut short_sig = good.clone();
    short_sig["signature"] = json!("0x1234");
    let mut bad_address = good.clone();
    bad_address["address"] = json!("0xnot-an-address");
    let cases = [
        (
            HeaderValue::from_static("not base64!"),
            "invalid_siwx_payload",
        ),
        (b64("not json"), "invalid_siwx_payload"),
        (b64("[1,2]"), "invalid_siwx_payload"),
        (b64(&missing.to_string()), "invalid_siwx_payload"),
        (b64(&bad_address.to_string()), "invalid_siwx_payload"),
        (
            b64(&short_sig.to_string()),
            "invalid_siwx_malformed_signature",
        ),
    ];
    for (value, want) in cases {
        let r = get_with(&svc, "/paid", [(SIWX, value.clone())]).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::BAD_REQUEST, Some(want.into())),
            "{value:?}"
        );
    }
    // A line break would let one signed text read as another message.
    let injected = payload(&me, me.address(), &decl, |p| {
        p["statement"] = json!("hi\nURI: http://evil.test/")
    });
    let r = get_with(&svc, "/paid", [header(&injected)]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::BAD_REQUEST, Some("invalid_siwx_payload".into()))
    );
    let big = HeaderValue::try_from("A".repeat(16 * 1024)).unwrap();
    let r = get_with(&svc, "/paid", [(SIWX, big)]).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // Repeated header: ambiguous.
    let h = header(&good).1;
    let r = get_with(&svc, "/paid", [(SIWX, h.clone()), (SIWX, h)]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(runs.get(), 1);
    // The well-formed one still works afterwards: none of the above spent its nonce.
    assert_eq!(
        get_with(&svc, "/paid", [header(&good)]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_failed_handler_gives_the_call_back() {
    let (_, runs, svc) = bought(Bundle::calls(2)).await;
    let fail = (
        HeaderName::from_static(STATUS_HEADER),
        HeaderValue::from_static("500"),
    );
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await, fail]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["remaining"], json!(0));
    let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(r.reason().as_deref(), Some("prepaid_credit_exhausted"));
    assert_eq!(runs.get(), 3);
}

#[test]
fn prepaid_needs_a_public_origin() {
    let clock = clock();
    let no_base = builder(&clock).prepaid(Bundle::calls(10)).build();
    assert!(matches!(no_base, Err(ConfigError::Prepaid(_))));
    let zero = prepaid(&clock, Bundle::calls(0)).build();
    assert!(matches!(zero, Err(ConfigError::Prepaid(_))));
}

/// The official JS client, unmodified (`tests/clients/siwx.mjs`): buys a 3-call bundle, signs
/// in for the next two calls, and buys again when the credit runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_js_client_buys_a_bundle_then_signs_in() {
    let Some(deps) = process::test_deps(
        "official_js_client_buys_a_bundle_then_signs_in",
        &["node/node_modules/@x402/extensions/package.json"],
    ) else {
        return;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let runs = Runs::default();
    // Real clocks: the JS client signs with the wall clock.
    let layer = tower_x402::PaymentLayer::builder()
        .pay_to(PAY_TO)
        .network(tower_x402::Network::BASE_SEPOLIA)
        .resource_base(format!("http://{addr}"))
        .prepaid(Bundle::calls(3).for_price("$0.003"))
        .build()
        .unwrap();
    let app = axum::Router::new().route_service("/paid", layer.layer(runs.service()));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut cmd = std::process::Command::new("node");
    cmd.arg(process::repo().join("tests/clients/siwx.mjs"))
        .args(["--url", &format!("http://{addr}/paid"), "--calls", "4"])
        .env("X402_TEST_DEPS", &deps);
    let r = tokio::task::spawn_blocking(move || {
        process::run_json(&mut cmd, Duration::from_secs(60), String::new)
    })
    .await
    .expect("client thread");
    server.abort();
    assert_eq!(r["error"], Value::Null, "{r}");
    let statuses: Vec<_> = r["calls"].as_array().unwrap().iter().collect();
    assert_eq!(
        statuses,
        [
            &json!({"status": 200, "receipt": true}),
            &json!({"status": 200, "receipt": false}),
            &json!({"status": 200, "receipt": false}),
            &json!({"status": 200, "receipt": true}),
        ],
        "{r}"
    );
    // On the wire: each call starts unauthenticated (402), retries signed in, and pays only
    // when the signed-in retry is a 402 too (first call: no credit; fourth: used up).
    let wire: Vec<(bool, bool, u64)> = r["wire"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["siwx"].as_bool().unwrap(),
                w["payment"].as_bool().unwrap(),
                w["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let buy = [(false, false, 402), (true, false, 402), (false, true, 200)];
    let sign_in = [(false, false, 402), (true, false, 200)];
    let want: Vec<_> = [&buy[..], &sign_in, &sign_in, &buy].concat();
    assert_eq!(wire, want, "{r}");
    assert_eq!(runs.get(), 4, "two paid and two signed-in handler runs");
}
