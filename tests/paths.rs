//! Proofs bound to what they buy, and paths that must never reach a paid handler unpaid.
//!
//! - A v2 proof's echoed `resource.url` must name the request's path and query
//!   ([`ResourceCheck`], default `Path`): a proof bought for another route or site is refused
//!   with 402 `resource_mismatch` before verification, the handler not run.
//! - Percent-encoded and non-canonical spellings of a paid path (`/wea%74her`, `//weather`,
//!   `/weather/`, `/WEATHER`, `/weather;x=1`) reach the paid handler only paid, through
//!   axum's `route_layer`, `.layer`, a nested router, a pricing function and a plain hyper
//!   service (issue #23, item 4: the reference's payment-gate bypasses of 2026).
#![cfg(feature = "test-util")]

mod common;

use std::sync::Arc;

use axum::Router;
use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::json;
use tower::ServiceBuilder;
use tower_x402::test_util::{encode, exact_payload, v2_json};
use tower_x402::{PaymentLayerBuilder, PaymentOption, ResourceCheck};

const RESOURCE_MISMATCH: &str = "resource_mismatch";

/// A fresh v2 proof for the default requirements whose `resource.url` is `url`.
fn proof_for(url: &str) -> (HeaderName, HeaderValue) {
    let req = requirements();
    let mut v = v2_json(&req, &exact_payload(&payer(), &req, NOW), None);
    v["resource"] = json!({ "url": url });
    (HeaderName::from_static("payment-signature"), encode(&v))
}

/// The counting app behind a layer from `configure(builder)`, with `/paid` routed.
fn paid_app(
    hits: &Hits,
    configure: impl FnOnce(PaymentLayerBuilder) -> PaymentLayerBuilder,
) -> Router {
    app(hits).route_layer(configure(builder(&clock())).build().expect("valid layer"))
}

// ------------------------------------------------------------------------------------------------
// resource.url

#[tokio::test]
async fn a_fresh_proof_naming_another_sites_path_is_refused_and_the_handler_not_run() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b);
    // The probe of issue #23: a valid, unused proof for our price and payee, bought for
    // another site's resource.
    let r = get_with(
        &svc,
        "/paid",
        [proof_for("https://other.example/api/secret")],
    )
    .await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(RESOURCE_MISMATCH.into()))
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    // Another of our own routes at the same price: refused too.
    let r = get_with(&svc, "/paid", [proof_for("http://api.test/premium")]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(RESOURCE_MISMATCH.into()))
    );
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn the_challenges_own_resource_echoed_back_is_served() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b);
    let challenge = get_with(&svc, "/paid?city=paris", []).await.challenge();
    // What the official clients do: echo the challenge's resource.
    let r = get_with(
        &svc,
        "/paid?city=paris",
        [proof_for(&challenge.resource.url)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn the_same_path_on_another_host_or_scheme_is_served_by_default() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b);
    for url in [
        "https://public.example.com/paid",
        "http://10.0.0.7:8080/paid",
        "https://API.TEST/paid#fragment",
        "/paid",
    ] {
        let r = get_with(&svc, "/paid", [proof_for(url)]).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {:?}", r.reason());
    }
    assert_eq!(hits.get(), 4);
}

#[tokio::test]
async fn url_mode_compares_scheme_and_host_too() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b.resource_check(ResourceCheck::Url));
    for url in [
        "https://api.test/paid",
        "http://other.test/paid",
        "http://api.test:8080/paid",
    ] {
        let r = get_with(&svc, "/paid", [proof_for(url)]).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(RESOURCE_MISMATCH.into())),
            "{url}"
        );
    }
    assert_eq!(hits.get(), 0);
    // Case and the default port do not make another origin.
    for url in ["http://api.test/paid", "HTTP://Api.Test:80/paid"] {
        let r = get_with(&svc, "/paid", [proof_for(url)]).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {:?}", r.reason());
    }
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn off_serves_a_proof_naming_another_path() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b.resource_check(ResourceCheck::Off));
    let r = get_with(
        &svc,
        "/paid",
        [proof_for("https://other.example/elsewhere")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn query_strings_are_part_of_the_resource() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b);
    for (request, echoed) in [
        ("/paid?city=paris", "http://api.test/paid?city=london"),
        ("/paid?city=paris", "http://api.test/paid"),
        ("/paid", "http://api.test/paid?city=paris"),
        ("/paid?a=1&b=2", "http://api.test/paid?b=2&a=1"),
    ] {
        let r = get_with(&svc, request, [proof_for(echoed)]).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(RESOURCE_MISMATCH.into())),
            "{request} paid with {echoed}"
        );
    }
    assert_eq!(hits.get(), 0);
    // Same query, escapes of unreserved characters normalised, an empty query is none.
    for (request, echoed) in [
        ("/paid?city=paris", "https://cdn.example/paid?city=paris"),
        ("/paid?city=paris", "http://api.test/paid?city=p%61ris"),
        ("/paid", "http://api.test/paid?"),
        ("/paid?q=a%2fb", "http://api.test/paid?q=a%2Fb"),
    ] {
        let r = get_with(&svc, request, [proof_for(echoed)]).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{request} paid with {echoed}: {:?}",
            r.reason()
        );
    }
    assert_eq!(hits.get(), 4);
}

#[tokio::test]
async fn non_canonical_spellings_of_another_path_do_not_match() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b);
    for echoed in [
        "http://api.test/paid/",
        "http://api.test//paid",
        "http://api.test/PAID",
        "http://api.test/paid;x=1",
        "http://api.test/paid%2F",
        "http://api.test/a/../paid",
    ] {
        let r = get_with(&svc, "/paid", [proof_for(echoed)]).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(RESOURCE_MISMATCH.into())),
            "{echoed}"
        );
    }
    // An escaped unreserved character is the same path (RFC 3986 §6.2.2.2).
    let r = get_with(&svc, "/paid", [proof_for("http://api.test/p%61id")]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn hostile_resource_urls_are_a_clear_402_never_a_panic() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b.resource_check(ResourceCheck::Url));
    let long = format!("http://api.test/{}", "a".repeat(4000));
    for url in [
        "",
        "%",
        "%zz",
        "%e2%82",
        "://",
        ":///paid?",
        "http://",
        "http://api.test:99999999999999999999/paid",
        "javascript:alert(1)",
        "/pa\u{e9}id",
        "http://api.test/%c3%a9%",
        long.as_str(),
    ] {
        let r = get_with(&svc, "/paid", [proof_for(url)]).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(RESOURCE_MISMATCH.into())),
            "{url:?}"
        );
    }
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn a_resource_base_with_a_path_prefix_is_the_path_compared() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b.resource_base("https://api.example.com/v1/"));
    let challenge = get_with(&svc, "/paid", []).await.challenge();
    assert_eq!(challenge.resource.url, "https://api.example.com/v1/paid");
    let r = get_with(&svc, "/paid", [proof_for("https://api.example.com/paid")]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(RESOURCE_MISMATCH.into()))
    );
    let r = get_with(&svc, "/paid", [proof_for(&challenge.resource.url)]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn v1_proofs_and_v2_proofs_without_a_resource_are_not_checked() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b.resource_check(ResourceCheck::Url));
    assert_eq!(
        get_with(&svc, "/paid", [proof_v1()]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get_with(&svc, "/paid", [proof_v2()]).await.status,
        StatusCode::OK
    );
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn a_mismatched_proof_is_not_spent() {
    let hits = Hits::new();
    let svc = paid_app(&hits, |b| b);
    let req = requirements();
    let mut v = v2_json(&req, &exact_payload(&payer(), &req, NOW), None);
    v["resource"] = json!({ "url": "http://api.test/premium" });
    let wrong = encode(&v);
    v["resource"] = json!({ "url": "http://api.test/paid" });
    let right = encode(&v);
    let name = HeaderName::from_static("payment-signature");
    let r = get_with(&svc, "/paid", [(name.clone(), wrong)]).await;
    assert_eq!(r.reason().as_deref(), Some(RESOURCE_MISMATCH));
    // Refused before the claim: the same authorization still pays the resource it names.
    let r = get_with(&svc, "/paid", [(name, right)]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(hits.get(), 1);
}

// ------------------------------------------------------------------------------------------------
// Non-canonical request paths never reach a paid handler unpaid

/// Spellings of `/weather` a router or a proxy may treat as it, or not.
const SPELLINGS: &[&str] = &[
    "/weather",
    "/wea%74her",
    "/%77eather",
    "//weather",
    "/weather/",
    "/WEATHER",
    "/weather;x=1",
    "/weather%2F",
    "/./weather",
    "/x/../weather",
    "/weather?x=1",
    "/weather#frag",
];

/// Sends every spelling without payment, and asserts the handler never ran.
async fn unpaid_never_served<S, B>(svc: &S, hits: &Hits, prefix: &str)
where
    S: tower::Service<http::Request<axum::body::Body>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: std::fmt::Debug,
{
    for path in SPELLINGS {
        let path = format!("{prefix}{path}");
        let Ok(req) = http::Request::get(format!("{BASE}{path}")).body(axum::body::Body::empty())
        else {
            continue; // not a URI a server can receive
        };
        let r = send(svc, req).await;
        assert_ne!(r.status, StatusCode::OK, "{path} served unpaid");
        assert_eq!(hits.get(), 0, "{path} ran the handler unpaid");
    }
}

fn weather(hits: &Hits) -> Router {
    Router::new().route("/weather", handler(hits.clone()))
}

#[tokio::test]
async fn route_layer_non_canonical_paths_never_reach_the_handler_unpaid() {
    let hits = Hits::new();
    let svc = weather(&hits).route_layer(layer(&clock()));
    unpaid_never_served(&svc, &hits, "").await;
    // And it does serve the canonical path, paid.
    assert_eq!(
        get_with(&svc, "/weather", [proof_v2()]).await.status,
        StatusCode::OK
    );
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn layer_non_canonical_paths_never_reach_the_handler_unpaid() {
    let hits = Hits::new();
    let svc = weather(&hits).layer(layer(&clock()));
    unpaid_never_served(&svc, &hits, "").await;
    assert_eq!(
        get_with(&svc, "/weather", [proof_v2()]).await.status,
        StatusCode::OK
    );
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn nested_router_non_canonical_paths_never_reach_the_handler_unpaid() {
    let hits = Hits::new();
    let svc = Router::new().nest("/api", weather(&hits).route_layer(layer(&clock())));
    unpaid_never_served(&svc, &hits, "/api").await;
    unpaid_never_served(&svc, &hits, "/API").await;
    unpaid_never_served(&svc, &hits, "/%61pi").await;
    unpaid_never_served(&svc, &hits, "/api/").await;
    assert_eq!(
        get_with(&svc, "/api/weather", [proof_v2()]).await.status,
        StatusCode::OK
    );
    assert_eq!(hits.get(), 1);
}

/// The rule for pricing functions: charge by default and list what is free, on the path as
/// the router sees it (`parts.uri.path()`, unchanged). A function that lists what is paid
/// lets through every spelling it did not think of, whenever the router is more lenient
/// than its comparison.
fn priced(free: &'static [&'static str]) -> PaymentLayerBuilder {
    let options: Arc<[PaymentOption]> = Arc::new([option()]);
    unpriced_builder(&clock())
        .pricing(move |parts| (!free.contains(&parts.uri.path())).then(|| options.clone()))
}

#[tokio::test]
async fn pricing_function_non_canonical_paths_never_reach_the_handler_unpaid() {
    let hits = Hits::new();
    let svc = weather(&hits)
        .route("/", axum::routing::get(|| async { "free" }))
        .layer(priced(&["/"]).build().expect("valid layer"));
    unpaid_never_served(&svc, &hits, "").await;
    assert_eq!(get_with(&svc, "/", []).await.status, StatusCode::OK);
    assert_eq!(
        get_with(&svc, "/weather", [proof_v2()]).await.status,
        StatusCode::OK
    );
    assert_eq!(hits.get(), 1);
}

/// A handler that routes leniently (case- and trailing-slash-insensitive), as some plain
/// hyper services do by hand.
fn lenient_weather(
    hits: Hits,
) -> impl tower::Service<
    http::Request<axum::body::Body>,
    Response = http::Response<http_body_util::Full<bytes::Bytes>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let inner = plain_service::<axum::body::Body>(hits);
    tower::service_fn(move |req: http::Request<axum::body::Body>| {
        let mut inner = inner.clone();
        async move {
            let path = req.uri().path().trim_end_matches('/').to_ascii_lowercase();
            if path == "/weather" {
                tower::Service::call(&mut inner, req).await
            } else {
                let mut res = http::Response::new(http_body_util::Full::default());
                *res.status_mut() = StatusCode::NOT_FOUND;
                Ok(res)
            }
        }
    })
}

#[tokio::test]
async fn plain_hyper_style_non_canonical_paths_never_reach_the_handler_unpaid() {
    // The example's stack: service_fn → ServiceBuilder with the layer, a pricing function
    // charging every path but the free ones.
    let hits = Hits::new();
    let svc = ServiceBuilder::new()
        .layer(priced(&["/"]).build().expect("valid layer"))
        .service(lenient_weather(hits.clone()));
    unpaid_never_served(&svc, &hits, "").await;
    assert_eq!(
        get_with(&svc, "/WEATHER/", [proof_v2()]).await.status,
        StatusCode::OK
    );
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn a_pricing_function_listing_paid_paths_is_bypassed_by_a_lenient_router() {
    // Why the rule in the `pricing` docs: "free unless the path is exactly /weather" against
    // a handler that also answers /WEATHER and /weather/ serves those unpaid. The crate
    // cannot see how the inner service routes; the pricing function must fail closed.
    let hits = Hits::new();
    let options: Arc<[PaymentOption]> = Arc::new([option()]);
    let paid_list = unpriced_builder(&clock())
        .pricing(move |parts| (parts.uri.path() == "/weather").then(|| options.clone()))
        .build()
        .expect("valid layer");
    let svc = ServiceBuilder::new()
        .layer(paid_list)
        .service(lenient_weather(hits.clone()));
    assert_eq!(
        get_with(&svc, "/weather", []).await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    assert_eq!(get_with(&svc, "/WEATHER", []).await.status, StatusCode::OK);
    assert_eq!(
        hits.get(),
        1,
        "the unsafe pattern is bypassed: the docs forbid it"
    );
}

#[tokio::test]
async fn paid_proof_for_weather_does_not_pay_a_non_canonical_spelling_with_a_resource() {
    // A proof echoing /weather sent to /WEATHER on the lenient service: refused, since the
    // challenge of /WEATHER names /WEATHER (the client must pay the resource it requests).
    let hits = Hits::new();
    let svc = ServiceBuilder::new()
        .layer(priced(&["/"]).build().expect("valid layer"))
        .service(lenient_weather(hits.clone()));
    let r = get_with(&svc, "/WEATHER", [proof_for("http://api.test/weather")]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(RESOURCE_MISMATCH.into()))
    );
    assert_eq!(hits.get(), 0);
}
