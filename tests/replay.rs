//! One proof, one use: concurrent copies in-process and over the wire, re-encodings of the same
//! authorization, and reuse after a handler error.
#![cfg(feature = "test-util")]

mod common;

use std::future::Future;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower::Layer;
use tower_x402::proto::X402Version;
use tower_x402::proto::exact::ExactEvmPayload;
use tower_x402::proto::header::{PAYMENT_SIGNATURE, X_PAYMENT};
use tower_x402::test_util::{authorization, encode, exact_payload, pay, sign, v1_json, v2_json};

const COPIES: usize = 64;
/// Generous bound for a loopback/in-process burst; a hang fails instead of stalling.
const PATIENCE: Duration = Duration::from_secs(60);

fn status(code: u16) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static(STATUS_HEADER),
        HeaderValue::from(code),
    )
}

/// Sends `COPIES` requests built by `send(i)` concurrently while the handler is gated. The
/// winner holds the proof inside the handler, so every other copy must come back refused
/// *before* the gate opens; then the winner completes. Returns (refused, winner).
async fn race<F, Fut>(hits: &Hits, send: F) -> (Vec<Reply>, Reply)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..COPIES {
        let tx = tx.clone();
        let fut = send(i);
        tokio::spawn(async move {
            let _ = tx.send(fut.await);
        });
    }
    let mut refused = Vec::new();
    for n in 0..COPIES - 1 {
        let r = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {n} of {} copies answered while one is held: more than one winner?",
                    COPIES - 1
                )
            })
            .expect("sender alive");
        refused.push(r);
    }
    assert_eq!(
        hits.get(),
        1,
        "the handler ran once while the proof was held"
    );
    hits.open();
    let winner = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("the winner completes once the gate opens")
        .expect("sender alive");
    (refused, winner)
}

fn assert_all_refused_as_used(refused: &[Reply]) {
    for (i, r) in refused.iter().enumerate() {
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned())),
            "copy {i}"
        );
        assert!(r.has_no_receipt(), "copy {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_copies_of_a_v2_proof_buy_one_response() {
    let clock = clock();
    let hits = Hits::gated();
    let svc = layer(&clock).layer(app(&hits));
    let proof = proof_v2();
    let (refused, winner) = race(&hits, |_| {
        let svc = svc.clone();
        let proof = proof.clone();
        async move { get_with(&svc, "/paid", [proof]).await }
    })
    .await;
    assert_all_refused_as_used(&refused);
    assert_eq!(winner.status, StatusCode::OK, "{:?}", winner.reason());
    assert_success_receipt(&winner.receipt(), "eip155:84532");
    assert_eq!(hits.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_copies_of_a_v1_proof_buy_one_response() {
    let clock = clock();
    let hits = Hits::gated();
    let svc = layer(&clock).layer(app(&hits));
    let proof = proof_v1();
    let (refused, winner) = race(&hits, |_| {
        let svc = svc.clone();
        let proof = proof.clone();
        async move { get_with(&svc, "/paid", [proof]).await }
    })
    .await;
    assert_all_refused_as_used(&refused);
    assert_eq!(winner.status, StatusCode::OK, "{:?}", winner.reason());
    assert_success_receipt(&winner.v1_receipt(), "base-sepolia");
    assert_eq!(hits.get(), 1);
}

/// No gate: copies race through reserve → handler → consume in any interleaving, in both
/// protocol versions at once (one authorization, two headers). Still exactly one winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ungated_burst_across_both_versions_buys_one_response() {
    let clock = clock();
    let hits = Hits::new();
    let svc = layer(&clock).layer(app(&hits));
    let req = requirements();
    let payload = exact_payload(&payer(), &req, NOW);
    let v2 = (PAYMENT_SIGNATURE, encode(&v2_json(&req, &payload, None)));
    let v1 = (X_PAYMENT, encode(&v1_json(&req, &payload)));
    let mut tasks = Vec::new();
    for i in 0..COPIES {
        let svc = svc.clone();
        let header = if i % 2 == 0 { v2.clone() } else { v1.clone() };
        tasks.push(tokio::spawn(async move {
            get_with(&svc, "/paid", [header]).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.expect("no panic");
        match r.status {
            StatusCode::OK => ok += 1,
            _ => assert_eq!(
                r.outcome(),
                (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned()))
            ),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(hits.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_copies_over_the_wire_buy_one_response() {
    let clock = clock();
    let hits = Hits::gated();
    let (addr, server) = serve(app(&hits).layer(layer(&clock))).await;
    let client = client();
    let proof = proof_v2();
    let (refused, winner) = race(&hits, |_| {
        let client = client.clone();
        let proof = proof.clone();
        async move { wire(&client, addr, "/paid", [proof]).await }
    })
    .await;
    assert_all_refused_as_used(&refused);
    assert_eq!(winner.status, StatusCode::OK, "{:?}", winner.reason());
    assert_success_receipt(&winner.receipt(), "eip155:84532");
    assert_eq!(hits.get(), 1);
    // And a late copy after the burst.
    let late = wire(&client, addr, "/paid", [proof]).await;
    assert_eq!(
        late.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned()))
    );
    assert_eq!(hits.get(), 1);
    server.abort();
}

// ------------------------------------------------------------------------------------------------
// The same authorization, written differently

/// Rewrites every `0x` + 40 hex address string in `v` with `f`.
fn map_addresses(v: &mut Value, f: &impl Fn(&str) -> String) {
    match v {
        Value::String(s) if s.len() == 42 && s.starts_with("0x") => *s = f(s),
        Value::Array(a) => a.iter_mut().for_each(|x| map_addresses(x, f)),
        Value::Object(o) => o.values_mut().for_each(|x| map_addresses(x, f)),
        _ => {}
    }
}

fn lower(s: &str) -> String {
    s.to_lowercase()
}

fn upper(s: &str) -> String {
    format!("0x{}", s[2..].to_uppercase())
}

#[tokio::test]
async fn re_encoded_copies_of_a_spent_proof_are_refused() {
    let clock = clock();
    let hits = Hits::new();
    let svc = layer(&clock).layer(app(&hits));
    let req = requirements();
    let payload = exact_payload(&payer(), &req, NOW);
    let doc = v2_json(&req, &payload, None);
    let from = payload.authorization.from.to_checksum(None);
    assert_ne!(
        from,
        from.to_lowercase(),
        "the payer's checksum has upper-case letters"
    );
    assert_eq!(
        doc["payload"]["authorization"]["from"],
        json!(from),
        "the original is checksummed"
    );

    let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&doc))]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());

    let mut variants: Vec<(&str, (HeaderName, HeaderValue))> = Vec::new();
    let mut lower_from = doc.clone();
    lower_from["payload"]["authorization"]["from"] = json!(from.to_lowercase());
    variants.push(("lower-case from", (PAYMENT_SIGNATURE, encode(&lower_from))));
    let mut upper_from = doc.clone();
    upper_from["payload"]["authorization"]["from"] = json!(upper(&from));
    variants.push(("upper-case from", (PAYMENT_SIGNATURE, encode(&upper_from))));
    let mut all_lower = doc.clone();
    map_addresses(&mut all_lower, &lower);
    variants.push((
        "every address lower-case",
        (PAYMENT_SIGNATURE, encode(&all_lower)),
    ));
    let mut signature_upper = doc.clone();
    let sig = signature_upper["payload"]["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    signature_upper["payload"]["signature"] = json!(format!("0x{}", sig[2..].to_uppercase()));
    variants.push((
        "signature hex upper-case",
        (PAYMENT_SIGNATURE, encode(&signature_upper)),
    ));
    let mut with_extras = doc.clone();
    with_extras["resource"] = json!({ "url": "http://api.test/paid" });
    with_extras["extensions"] = json!({ "note": "same authorization, other bytes" });
    variants.push((
        "resource and extensions added",
        (PAYMENT_SIGNATURE, encode(&with_extras)),
    ));
    let pretty = serde_json::to_vec_pretty(&doc).unwrap();
    variants.push((
        "pretty-printed JSON",
        (
            PAYMENT_SIGNATURE,
            HeaderValue::try_from(STANDARD.encode(pretty)).unwrap(),
        ),
    ));
    variants.push((
        "same authorization as v1",
        (X_PAYMENT, encode(&v1_json(&req, &payload))),
    ));
    let mut v1_lower = v1_json(&req, &payload);
    map_addresses(&mut v1_lower, &lower);
    variants.push((
        "v1 with every address lower-case",
        (X_PAYMENT, encode(&v1_lower)),
    ));

    for (name, header) in variants {
        let r = get_with(&svc, "/paid", [header]).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned())),
            "{name}"
        );
    }
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn a_lower_case_first_use_blocks_the_checksummed_copy() {
    let clock = clock();
    let hits = Hits::new();
    let svc = layer(&clock).layer(app(&hits));
    let req = requirements();
    let payload = exact_payload(&payer(), &req, NOW);
    let doc = v2_json(&req, &payload, None);
    let mut lowered = doc.clone();
    map_addresses(&mut lowered, &lower);
    let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&lowered))]).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "addresses are compared as bytes: {:?}",
        r.reason()
    );
    let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&doc))]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned()))
    );
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn the_same_nonce_from_two_payers_is_two_proofs() {
    let clock = clock();
    let hits = Hits::new();
    let svc = layer(&clock).layer(app(&hits));
    let req = requirements();
    let second: tower_x402::test_util::PrivateKeySigner =
        "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"
            .parse()
            .unwrap();
    let first_auth = authorization(&req, payer().address(), NOW);
    let mut second_auth = authorization(&req, second.address(), NOW);
    second_auth.nonce = first_auth.nonce;
    for (signer, auth) in [(payer(), first_auth), (second, second_auth)] {
        let signature = sign(&signer, &req, &auth);
        let doc = v2_json(
            &req,
            &ExactEvmPayload {
                signature,
                authorization: auth,
            },
            None,
        );
        let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&doc))]).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}: {:?}",
            signer.address(),
            r.reason()
        );
        let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&doc))]).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned()))
        );
    }
    assert_eq!(hits.get(), 2);
}

/// Two separately built layers (say, one per route) guard one proof only if they share a
/// store: a proof spent on one route is refused on the other.
#[tokio::test]
async fn layers_sharing_a_store_refuse_a_cross_route_replay() {
    let clock = clock();
    let hits = Hits::new();
    let store = tower_x402::MemoryNonceStore::with_capacity_and_clock(100, clock.clone());
    let app = axum::Router::new()
        .route(
            "/a",
            handler(hits.clone())
                .layer(builder(&clock).nonce_store(store.clone()).build().unwrap()),
        )
        .route(
            "/b",
            handler(hits.clone()).layer(builder(&clock).nonce_store(store).build().unwrap()),
        );
    let proof = proof_v2();
    assert_eq!(
        get_with(&app, "/a", [proof.clone()]).await.status,
        StatusCode::OK
    );
    let r = get_with(&app, "/b", [proof]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned()))
    );
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn a_spent_proof_stays_refused_after_it_expires() {
    let clock = clock();
    let hits = Hits::new();
    let svc = layer(&clock).layer(app(&hits));
    let proof = proof_v2();
    assert_eq!(
        get_with(&svc, "/paid", [proof.clone()]).await.status,
        StatusCode::OK
    );
    // validBefore is NOW + 300: once the store may forget it, the verifier refuses it.
    clock.advance(300);
    let r = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_payload_authorization_valid_before".to_owned())
        )
    );
    assert_eq!(hits.get(), 1);
}

/// A request dropped while its handler runs (client gone, timeout layer) has an unknown
/// outcome: its proof stays blocked until it expires rather than risk a second charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_in_flight_request_keeps_its_proof_blocked() {
    let clock = clock();
    let hits = Hits::gated();
    let svc = layer(&clock).layer(app(&hits));
    let proof = proof_v2();
    let in_flight = {
        let svc = svc.clone();
        let proof = proof.clone();
        tokio::spawn(async move { get_with(&svc, "/paid", [proof]).await })
    };
    while hits.get() == 0 {
        tokio::task::yield_now().await;
    }
    in_flight.abort();
    assert!(in_flight.await.unwrap_err().is_cancelled());
    hits.open();
    let r = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned()))
    );
    assert_eq!(hits.get(), 1);
    // A fresh proof works.
    assert_eq!(
        get_with(&svc, "/paid", [proof_v2()]).await.status,
        StatusCode::OK
    );
}

// ------------------------------------------------------------------------------------------------
// Reuse after a handler error

#[tokio::test]
async fn after_a_handler_500_the_proof_is_reusable_exactly_once() {
    for version in [X402Version::V2, X402Version::V1] {
        let clock = clock();
        let hits = Hits::new();
        let svc = layer(&clock).layer(app(&hits));
        let proof = pay(&payer(), &requirements(), NOW, version);
        let r = get_with(&svc, "/paid", [proof.clone(), status(500)]).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(r.has_no_receipt());
        let r = get_with(&svc, "/paid", [proof.clone(), status(500)]).await;
        assert_eq!(
            r.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{version:?}: released again"
        );
        let r = get_with(&svc, "/paid", [proof.clone()]).await;
        assert_eq!(r.status, StatusCode::OK, "{version:?}: {:?}", r.reason());
        let r = get_with(&svc, "/paid", [proof]).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned())),
            "{version:?}"
        );
        assert_eq!(hits.get(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_handler_500_a_concurrent_retry_burst_buys_one_response() {
    let clock = clock();
    let hits = Hits::new();
    let svc = layer(&clock).layer(app(&hits));
    let proof = proof_v2();
    let r = get_with(&svc, "/paid", [proof.clone(), status(500)]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let hits_after_error = hits.get();
    let mut tasks = Vec::new();
    for _ in 0..COPIES {
        let svc = svc.clone();
        let proof = proof.clone();
        tasks.push(tokio::spawn(async move {
            get_with(&svc, "/paid", [proof]).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.expect("no panic");
        if r.status == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(
                r.outcome(),
                (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned()))
            );
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(hits.get(), hits_after_error + 1);
}
