//! Bound challenges ([`tower_x402::challenge`]): each 402 requirement carries a signed,
//! expiring `extra.challenge`; a v2 proof is accepted only if its `accepted` echoes a valid one
//! for this resource, method and price. In-process tests on a fixed clock, then the official
//! JS (@x402/fetch 2.27.0) and Python (x402 2.25.0) clients against a bound server.
#![cfg(feature = "test-util")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use axum::body::Body;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use serde_json::{Value, json};
use tower::Layer;
use tower_x402::challenge::EXTRA_FIELD;
use tower_x402::clock::FixedClock;
use tower_x402::proto::header::PAYMENT_SIGNATURE;
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::test_util::{encode, exact_payload, v2_json};
use tower_x402::{Asset, ChallengeKeys, MemoryNonceStore, PaymentOption};

const INVALID_CHALLENGE: &str = "invalid_challenge";
const CHALLENGE_EXPIRED: &str = "challenge_expired";
const KEY_A: [u8; 32] = [0xa1; 32];
const KEY_B: [u8; 32] = [0xb2; 32];
const KEY_C: [u8; 32] = [0xc3; 32];

fn keys(current: [u8; 32], clock: &FixedClock) -> ChallengeKeys {
    ChallengeKeys::new(current).with_clock(clock.clone())
}

/// The default layer, bound with `keys`, over the counting handler (any method).
fn bound_svc(
    clock: &FixedClock,
    keys: ChallengeKeys,
    hits: &Hits,
) -> impl tower::Service<
    Request<Body>,
    Response = http::Response<tower_x402::body::ResponseBody<http_body_util::Full<bytes::Bytes>>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    builder(clock)
        .bind_challenges(keys)
        .build()
        .expect("valid layer")
        .layer(plain_service(hits.clone()))
}

/// `method {BASE}{path}` with `headers`.
fn request_as(
    method: Method,
    path: &str,
    headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
) -> Request<Body> {
    let mut req = request(path, headers);
    *req.method_mut() = method;
    req
}

/// The requirements of an unpaid request's 402, as the client sees them (with challenge ids).
async fn challenged<S, B>(svc: &S, method: Method, path: &str) -> Vec<PaymentRequirements>
where
    S: tower::Service<Request<Body>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: std::fmt::Debug,
{
    let r = send(svc, request_as(method, path, [])).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    r.challenge().accepts
}

/// A v2 proof paying `req` (the client's copy, `extra` included) at `now`.
fn proof_for(req: &PaymentRequirements, now: u64) -> (HeaderName, HeaderValue) {
    let payload = exact_payload(&payer(), req, now);
    (PAYMENT_SIGNATURE, encode(&v2_json(req, &payload, None)))
}

fn challenge_id(req: &PaymentRequirements) -> &str {
    req.extra_str(EXTRA_FIELD).expect("extra.challenge")
}

/// `req` with `extra.challenge` set to `value`.
fn with_challenge(req: &PaymentRequirements, value: Value) -> PaymentRequirements {
    let mut r = req.clone();
    r.extra
        .get_or_insert_with(Default::default)
        .insert(EXTRA_FIELD.into(), value);
    r
}

// ------------------------------------------------------------------------------------------------
// The challenge

#[tokio::test]
async fn opted_out_layer_sends_no_challenge_id() {
    let clock = clock();
    // `common::builder` opts out with `.no_challenge_binding()`.
    let svc = layer(&clock).layer(plain_service(Hits::new()));
    let accepts = challenged(&svc, Method::GET, "/paid").await;
    assert_eq!(accepts, vec![requirements()], "unbound 402 is unchanged");
    assert!(accepts[0].extra_str(EXTRA_FIELD).is_none());
}

/// A layer configured with nothing about challenges, on the system clock.
fn default_svc(
    hits: &Hits,
) -> impl tower::Service<
    Request<Body>,
    Response = http::Response<tower_x402::body::ResponseBody<http_body_util::Full<bytes::Bytes>>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower_x402::PaymentLayer::builder()
        .pay_to(PAY_TO)
        .price(PRICE)
        .network(tower_x402::Network::BASE_SEPOLIA)
        .nonce_store(MemoryNonceStore::new())
        .build()
        .expect("valid layer")
        .layer(plain_service(hits.clone()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bound_by_default_without_configuration() {
    let hits = Hits::new();
    let svc = default_svc(&hits);
    let now = unix_now();
    let accepts = challenged(&svc, Method::GET, "/paid").await;
    let id = challenge_id(&accepts[0]);
    assert_eq!(id.len(), 60, "{id}");

    // A proof signed from the server's own requirement, without the echo, is refused unspent.
    let unechoed = proof_for(&requirements(), now);
    let r = get_with(&svc, "/paid", [unechoed.clone()]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(INVALID_CHALLENGE.into()))
    );
    // A forged id is refused too.
    let forged = with_challenge(&accepts[0], json!("A".repeat(60)));
    let r = get_with(&svc, "/paid", [proof_for(&forged, now)]).await;
    assert_eq!(r.reason().as_deref(), Some(INVALID_CHALLENGE));
    // Layers of one process share its key: another layer's id for this URL, method and price
    // is good here (as a cloned layer's would be); another process's is not.
    let sibling = challenged(&default_svc(&Hits::new()), Method::GET, "/paid").await;
    let other_process = ChallengeKeys::random()
        .unwrap()
        .issue(&tower_x402::challenge::Binding {
            url: "http://api.test/paid",
            method: "GET",
            requirements: &requirements(),
        });
    let r = get_with(
        &svc,
        "/paid",
        [proof_for(
            &with_challenge(&accepts[0], json!(other_process)),
            now,
        )],
    )
    .await;
    assert_eq!(r.reason().as_deref(), Some(INVALID_CHALLENGE));
    assert_eq!(hits.get(), 0);

    let r = get_with(&svc, "/paid", [proof_for(&sibling[0], now)]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());

    // Echoed as a client copies it: paid once, and the replay of that proof is refused.
    let proof = proof_for(&accepts[0], now);
    let r = get_with(&svc, "/paid", [proof.clone()]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    let r = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(r.reason().as_deref(), Some(NONCE_USED));
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn default_binding_serves_v1_unbound_and_sends_both_dialects() {
    let hits = Hits::new();
    let svc = default_svc(&hits);
    let r = send(&svc, request("/paid", [])).await;
    // v1 clients cannot echo: they get the v1 body (and v2 clients the header).
    assert_eq!(r.json()["x402Version"], json!(1));
    assert_eq!(challenge_id(&r.challenge().accepts[0]).len(), 60);
    let v1 = tower_x402::test_util::pay(
        &payer(),
        &requirements(),
        unix_now(),
        tower_x402::proto::X402Version::V1,
    );
    let r = get_with(&svc, "/paid", [v1]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert_eq!(hits.get(), 1);
}

/// A store that says it is shared between instances, as the Redis stores do.
#[derive(Clone, Default)]
struct SharedStore(MemoryNonceStore);

#[tower_x402::async_trait]
impl tower_x402::NonceStore for SharedStore {
    async fn reserve(
        &self,
        key: &tower_x402::nonce::NonceKey,
        expires_at: u64,
    ) -> Result<tower_x402::nonce::Reservation, tower_x402::nonce::StoreError> {
        self.0.reserve(key, expires_at).await
    }
    async fn consume(
        &self,
        key: &tower_x402::nonce::NonceKey,
        token: tower_x402::nonce::ClaimToken,
    ) -> Result<(), tower_x402::nonce::StoreError> {
        self.0.consume(key, token).await
    }
    async fn release(
        &self,
        key: &tower_x402::nonce::NonceKey,
        token: tower_x402::nonce::ClaimToken,
    ) -> Result<(), tower_x402::nonce::StoreError> {
        self.0.release(key, token).await
    }
    fn is_shared(&self) -> bool {
        true
    }
}

#[test]
fn shared_store_without_a_key_does_not_build() {
    let base = || {
        tower_x402::PaymentLayer::builder()
            .pay_to(PAY_TO)
            .price(PRICE)
            .network(tower_x402::Network::BASE_SEPOLIA)
            .nonce_store(SharedStore::default())
    };
    let err = base().build().map(|_| ()).unwrap_err();
    assert!(
        matches!(err, tower_x402::error::ConfigError::ChallengeKeyRequired),
        "{err:?}"
    );
    // The message says what to set.
    let msg = err.to_string();
    assert!(msg.contains("X402_CHALLENGE_KEY"), "{msg}");
    assert!(msg.contains("bind_challenges"), "{msg}");
    assert!(msg.contains("no_challenge_binding"), "{msg}");
    // A configured key, or an explicit opt-out, builds.
    assert!(
        base()
            .bind_challenges(ChallengeKeys::new(KEY_A))
            .build()
            .is_ok()
    );
    assert!(base().no_challenge_binding().build().is_ok());
}

#[test]
fn keys_from_hex_and_env() {
    let hex = "a1".repeat(32);
    let clock = clock();
    let r = requirements();
    let binding = tower_x402::challenge::Binding {
        url: "http://api.test/paid",
        method: "GET",
        requirements: &r,
    };
    // The same key however it is written: ids of one verify with the other.
    let a = ChallengeKeys::from_hex(&hex)
        .unwrap()
        .with_clock(clock.clone());
    let b = ChallengeKeys::from_hex(&format!(" 0x{} \n", hex.to_uppercase()))
        .unwrap()
        .with_clock(clock.clone());
    let c = keys(KEY_A, &clock);
    let id = a.issue(&binding);
    assert_eq!(b.check(&id, &binding), Ok(()));
    assert_eq!(c.check(&id, &binding), Ok(()));
    for bad in [
        "",
        "a1",
        &"a1".repeat(31),
        &"a1".repeat(33),
        &"zz".repeat(32),
    ] {
        assert!(ChallengeKeys::from_hex(bad).is_err(), "{bad:?}");
    }
    assert!(!a.is_ephemeral());
    assert!(ChallengeKeys::random().unwrap().is_ephemeral());

    // The environment (this is the only test of the binary touching these variables).
    use tower_x402::challenge::{ENV_KEY, ENV_PREVIOUS_KEY};
    // SAFETY: no other thread of this test binary reads or writes these variables.
    unsafe {
        std::env::remove_var(ENV_KEY);
        std::env::remove_var(ENV_PREVIOUS_KEY);
    }
    assert!(ChallengeKeys::from_env().unwrap_err().is_not_set());
    unsafe { std::env::set_var(ENV_KEY, "b2".repeat(32)) };
    unsafe { std::env::set_var(ENV_PREVIOUS_KEY, &hex) };
    let rotated = ChallengeKeys::from_env().unwrap().with_clock(clock.clone());
    // Ids of the previous key still verify; new ones are made with the current key.
    assert_eq!(rotated.check(&id, &binding), Ok(()));
    let fresh = rotated.issue(&binding);
    assert_eq!(
        keys(KEY_B, &clock).check(&fresh, &binding),
        Ok(()),
        "issued with X402_CHALLENGE_KEY"
    );
    unsafe { std::env::set_var(ENV_PREVIOUS_KEY, "nothex") };
    let err = ChallengeKeys::from_env().unwrap_err();
    assert!(err.to_string().contains(ENV_PREVIOUS_KEY), "{err}");
    unsafe {
        std::env::remove_var(ENV_KEY);
        std::env::remove_var(ENV_PREVIOUS_KEY);
    }
}

#[tokio::test]
async fn bound_402_carries_an_id_and_the_same_eip712_domain() {
    let clock = clock();
    let svc = bound_svc(&clock, keys(KEY_A, &clock), &Hits::new());
    let r = send(&svc, request("/paid", [])).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    let accepts = r.challenge().accepts;
    assert_eq!(accepts.len(), 1);
    let id = challenge_id(&accepts[0]);
    assert_eq!(id.len(), 60, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{id}"
    );
    // Everything else is the server's requirement, unchanged: what the payer signs is the same.
    let mut without = accepts[0].clone();
    without.extra.as_mut().unwrap().remove(EXTRA_FIELD);
    assert_eq!(without, requirements());
    assert_eq!(accepts[0].extra_str("name"), Some("USDC"));
    assert_eq!(accepts[0].extra_str("version"), Some("2"));
    // v1 proofs are served unbound by default, so the body is the v1 document (its
    // requirement carries the id too; v1 clients ignore it).
    assert_eq!(r.json()["x402Version"], json!(1));
    // With v1 refused, no v1 body: the body is the v2 document itself.
    let v2_only = bound_svc(
        &clock,
        keys(KEY_A, &clock).accept_unbound_v1(false),
        &Hits::new(),
    );
    let r2 = send(&v2_only, request("/paid", [])).await;
    assert_eq!(r2.json()["x402Version"], json!(2));
    assert_eq!(
        r2.json()["accepts"][0]["extra"][EXTRA_FIELD]
            .as_str()
            .map(str::len),
        Some(60)
    );
    // Each 402 gets a fresh id.
    let again = challenged(&svc, Method::GET, "/paid").await;
    assert_ne!(challenge_id(&again[0]), id);
}

// ------------------------------------------------------------------------------------------------
// Retries

#[tokio::test]
async fn echoed_id_pays_once() {
    let clock = clock();
    let hits = Hits::new();
    let svc = bound_svc(&clock, keys(KEY_A, &clock), &hits);
    let req = challenged(&svc, Method::GET, "/paid").await.remove(0);
    let proof = proof_for(&req, NOW);
    let r = get_with(&svc, "/paid", [proof.clone()]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert_success_receipt(&r.receipt(), "eip155:84532");
    assert_eq!(hits.get(), 1);
    // The id is not a replay guard; the nonce store is.
    let r = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    // One id may back another payment while it is valid (new nonce).
    let r = get_with(&svc, "/paid", [proof_for(&req, NOW)]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn missing_or_non_string_id_is_refused() {
    let clock = clock();
    let hits = Hits::new();
    let svc = bound_svc(&clock, keys(KEY_A, &clock), &hits);
    let issued = challenged(&svc, Method::GET, "/paid").await.remove(0);
    let id = challenge_id(&issued).to_owned();
    let mut no_extra = requirements();
    no_extra.extra = None;
    let cases = [
        ("server requirements, no id", requirements()),
        ("no extra at all", no_extra),
        ("number", with_challenge(&issued, json!(12345))),
        ("object", with_challenge(&issued, json!({ "id": id }))),
        ("null", with_challenge(&issued, Value::Null)),
        ("empty", with_challenge(&issued, json!(""))),
        ("long", with_challenge(&issued, json!("A".repeat(4000)))),
        ("padded", with_challenge(&issued, json!(format!("{id}==")))),
        (
            "std alphabet",
            with_challenge(&issued, json!(format!("+{}", &id[1..]))),
        ),
        (
            "whitespace",
            with_challenge(&issued, json!(format!(" {}", &id[1..]))),
        ),
    ];
    for (name, req) in cases {
        let r = get_with(&svc, "/paid", [proof_for(&req, NOW)]).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(INVALID_CHALLENGE.into())),
            "{name}"
        );
    }
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn expired_id_is_refused_and_a_fresh_one_pays() {
    let clock = clock();
    let hits = Hits::new();
    let svc = bound_svc(
        &clock,
        keys(KEY_A, &clock).with_ttl(Duration::from_secs(60)),
        &hits,
    );
    let old = challenged(&svc, Method::GET, "/paid").await.remove(0);
    clock.advance(61);
    // The proof itself is fresh (signed now): only the challenge is stale.
    let r = get_with(&svc, "/paid", [proof_for(&old, NOW + 61)]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(CHALLENGE_EXPIRED.into()))
    );
    assert_eq!(hits.get(), 0);
    // The refusal carries a fresh id, which pays.
    let fresh = r.challenge().accepts.remove(0);
    assert_ne!(challenge_id(&fresh), challenge_id(&old));
    let r = get_with(&svc, "/paid", [proof_for(&fresh, NOW + 61)]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn default_ttl_is_max_timeout_seconds() {
    let clock = clock();
    let hits = Hits::new();
    let svc = bound_svc(&clock, keys(KEY_A, &clock), &hits);
    let req = challenged(&svc, Method::GET, "/paid").await.remove(0);
    clock.advance(req.max_timeout_seconds);
    let now = NOW + req.max_timeout_seconds;
    let r = get_with(&svc, "/paid", [proof_for(&req, now)]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    clock.advance(1);
    let r = get_with(&svc, "/paid", [proof_for(&req, now + 1)]).await;
    assert_eq!(r.reason().as_deref(), Some(CHALLENGE_EXPIRED));
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn id_for_another_resource_or_method_is_refused() {
    let clock = clock();
    let hits = Hits::new();
    let svc = bound_svc(&clock, keys(KEY_A, &clock), &hits);
    // Same price everywhere: only the URL or the method differs.
    let for_premium = challenged(&svc, Method::GET, "/premium").await.remove(0);
    let for_query = challenged(&svc, Method::GET, "/paid?x=1").await.remove(0);
    let for_post = challenged(&svc, Method::POST, "/paid").await.remove(0);
    for (name, req) in [
        ("other path", &for_premium),
        ("other query", &for_query),
        ("other method", &for_post),
    ] {
        let r = get_with(&svc, "/paid", [proof_for(req, NOW)]).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(INVALID_CHALLENGE.into())),
            "{name}"
        );
    }
    // Each is good where it was issued.
    let r = send(
        &svc,
        request_as(Method::POST, "/paid", [proof_for(&for_post, NOW)]),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn id_for_another_price_is_refused() {
    let clock = clock();
    let hits = Hits::new();
    let usdc = Asset::usdc_base_sepolia();
    let cheap = PaymentOption::exact(&usdc, "$0.001", PAY_TO).unwrap();
    let dear = PaymentOption::exact(&usdc, "$0.01", PAY_TO).unwrap();
    let svc = tower_x402::PaymentLayer::builder()
        .accept(cheap)
        .accept(dear)
        .verifier(tower_x402::ExactEvmVerifier::new().with_clock(clock.clone()))
        .nonce_store(MemoryNonceStore::with_capacity_and_clock(
            100,
            clock.clone(),
        ))
        .bind_challenges(keys(KEY_A, &clock))
        .build()
        .unwrap()
        .layer(plain_service(hits.clone()));
    let accepts = challenged(&svc, Method::GET, "/paid").await;
    assert_eq!(accepts.len(), 2);
    assert_ne!(challenge_id(&accepts[0]), challenge_id(&accepts[1]));
    // Pay the cheap option with the dear option's id.
    let swapped = with_challenge(&accepts[0], json!(challenge_id(&accepts[1])));
    let r = get_with(&svc, "/paid", [proof_for(&swapped, NOW)]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(INVALID_CHALLENGE.into()))
    );
    assert_eq!(hits.get(), 0);
    // select() still picks each option by asset/payTo/amount with its own id.
    for req in &accepts {
        let r = get_with(&svc, "/paid", [proof_for(req, NOW)]).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
        assert_eq!(r.json()["amount"], json!(req.amount.to_string()));
    }
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn tampered_id_is_refused_at_every_position() {
    let clock = clock();
    let hits = Hits::new();
    let svc = bound_svc(&clock, keys(KEY_A, &clock), &hits);
    let req = challenged(&svc, Method::GET, "/paid").await.remove(0);
    let id = challenge_id(&req).to_owned();
    for i in 0..id.len() {
        let mut bytes = id.clone().into_bytes();
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        let r = get_with(
            &svc,
            "/paid",
            [proof_for(&with_challenge(&req, json!(tampered)), NOW)],
        )
        .await;
        // The last character carries 2 unused bits; a change there may only flip those, which
        // strict decoding refuses too.
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(INVALID_CHALLENGE.into())),
            "position {i}: {tampered}"
        );
    }
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn rotation_previous_key_verifies_removed_key_fails() {
    let clock = clock();
    let hits = Hits::new();
    let store = MemoryNonceStore::with_capacity_and_clock(100, clock.clone());
    let bound = |keys: ChallengeKeys| {
        builder(&clock)
            .nonce_store(store.clone())
            .bind_challenges(keys)
            .build()
            .unwrap()
            .layer(plain_service(hits.clone()))
    };
    let a = bound(keys(KEY_A, &clock));
    let from_a = challenged(&a, Method::GET, "/paid").await.remove(0);
    let from_a_proof = proof_for(&from_a, NOW);

    // Rotated: B signs, A still verifies.
    let b = bound(keys(KEY_B, &clock).with_previous(KEY_A));
    let from_b = challenged(&b, Method::GET, "/paid").await.remove(0);
    assert_ne!(
        challenge_id(&from_b)[..8],
        challenge_id(&from_a)[..8],
        "key id"
    );
    let r = get_with(&b, "/paid", [from_a_proof]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    let r = get_with(&b, "/paid", [proof_for(&from_b, NOW)]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());

    // A removed: its ids fail, B's still pass.
    let c = bound(keys(KEY_C, &clock).with_previous(KEY_B));
    let r = get_with(&c, "/paid", [proof_for(&from_a, NOW)]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(INVALID_CHALLENGE.into()))
    );
    let r = get_with(&c, "/paid", [proof_for(&from_b, NOW)]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    // And with B gone too.
    let d = bound(keys(KEY_C, &clock));
    let r = get_with(&d, "/paid", [proof_for(&from_b, NOW)]).await;
    assert_eq!(r.reason().as_deref(), Some(INVALID_CHALLENGE));
    assert_eq!(hits.get(), 3);
}

#[tokio::test]
async fn v1_served_unbound_by_default_refused_when_switched_off() {
    let clock = clock();
    let hits = Hits::new();
    let svc = bound_svc(&clock, keys(KEY_A, &clock).accept_unbound_v1(false), &hits);
    let r = get_with(&svc, "/paid", [proof_v1()]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_x402_version".into())
        )
    );
    // The refusal offers only v2 (the header, and the v2 document as the body): a client
    // able to speak v2 can pay bound, a v1-only client is not lured into signing.
    assert_eq!(r.json()["x402Version"], json!(2));
    assert!(challenge_id(&r.challenge().accepts[0]).len() == 60);
    assert_eq!(hits.get(), 0);

    let svc = bound_svc(&clock, keys(KEY_A, &clock), &hits);
    let r = get_with(&svc, "/paid", [proof_v1()]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert_eq!(r.v1_receipt()["success"], json!(true));
    // v2 stays bound.
    let r = get_with(&svc, "/paid", [proof_v2()]).await;
    assert_eq!(r.reason().as_deref(), Some(INVALID_CHALLENGE));
    assert_eq!(hits.get(), 1);

    // A v1-only route cannot be bound without letting v1 through unbound.
    let err = builder(&clock)
        .versions(true, false)
        .bind_challenges(keys(KEY_A, &clock).accept_unbound_v1(false))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("protocol version"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// Official clients against a bound server (real clock: the clients sign with the wall clock)

/// Runs a driver (bounded in time) and returns its JSON line.
fn run_client(deps: &Path, program: &str, args: &[&str]) -> Value {
    let mut cmd = Command::new(program);
    cmd.args(args).env("X402_TEST_DEPS", deps);
    process::run_json(&mut cmd, Duration::from_secs(60), String::new)
}

/// Serves the default price on `/paid`, bound, on the system clock; returns its URL.
async fn bound_server(hits: &Hits, keys: ChallengeKeys) -> (String, tokio::task::JoinHandle<()>) {
    let layer = tower_x402::PaymentLayer::builder()
        .pay_to(PAY_TO)
        .price(PRICE)
        .network(tower_x402::Network::BASE_SEPOLIA)
        // The legacy v1 client (x402-fetch 1.2.0) refuses a challenge without mimeType.
        .mime_type("application/json")
        .nonce_store(MemoryNonceStore::new())
        .bind_challenges(keys)
        .build()
        .unwrap();
    let (addr, task) = serve(app(hits).route_layer(layer)).await;
    (format!("http://{addr}/paid"), task)
}

/// The official client paid through a bound challenge: 200, the id echoed verbatim in
/// `accepted.extra`, and the replay refused.
fn assert_paid_bound(r: &Value, hits: &Hits) {
    assert_eq!(r["status"], 200, "{r:#}");
    assert_eq!(r["paymentHeaderName"], "PAYMENT-SIGNATURE", "{r:#}");
    let sent: Value = serde_json::from_slice(
        &STANDARD
            .decode(r["paymentHeader"].as_str().expect("payment header"))
            .expect("base64"),
    )
    .expect("JSON");
    let id = sent["accepted"]["extra"][EXTRA_FIELD]
        .as_str()
        .unwrap_or_else(|| panic!("client did not echo extra.challenge: {sent:#}"));
    assert_eq!(id.len(), 60, "{sent:#}");
    assert_eq!(sent["accepted"]["extra"]["name"], "USDC", "{sent:#}");
    assert_eq!(r["paymentResponse"]["success"], true, "{r:#}");
    assert_eq!(r["replayStatus"], 402, "{r:#}");
    assert_eq!(r["replayError"], NONCE_USED, "{r:#}");
    assert_eq!(hits.get(), 1);
}

/// Runs `tests/clients/pay.mjs` with `args` against `url` (off the runtime's threads).
async fn pay_js(deps: std::path::PathBuf, url: String, args: &'static [&'static str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/pay.mjs");
    tokio::task::spawn_blocking(move || {
        let script = script.to_str().unwrap().to_owned();
        let mut all = vec![script.as_str(), "--url", &url];
        all.extend_from_slice(args);
        run_client(&deps, "node", &all)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_v2_client_echoes_the_id_and_pays() {
    let Some(deps) = process::test_deps(
        "js_v2_bound",
        &["node/node_modules/@x402/fetch/package.json"],
    ) else {
        return;
    };
    let hits = Hits::new();
    let (url, server) = bound_server(&hits, ChallengeKeys::new(KEY_A)).await;
    let r = pay_js(deps, url, &["--client", "v2", "--replay"]).await;
    assert_paid_bound(&r, &hits);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_v1_client_never_signs_when_v1_is_refused() {
    let Some(deps) = process::test_deps(
        "js_v1_bound",
        &["node/node_modules/x402-fetch/package.json"],
    ) else {
        return;
    };
    let hits = Hits::new();
    let (url, server) =
        bound_server(&hits, ChallengeKeys::new(KEY_A).accept_unbound_v1(false)).await;
    let r = pay_js(deps, url, &["--client", "v1"]).await;
    // The route offers no v1 form: the v1 client cannot parse the v2-only challenge
    // and stops before signing anything.
    assert_eq!(r["paymentHeader"], Value::Null, "{r:#}");
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("ZodError")),
        "{r:#}"
    );
    assert_eq!(hits.get(), 0);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_v1_client_pays_unbound_on_a_default_layer() {
    let Some(deps) = process::test_deps(
        "js_v1_default",
        &["node/node_modules/x402-fetch/package.json"],
    ) else {
        return;
    };
    let hits = Hits::new();
    let (url, server) = bound_server(&hits, ChallengeKeys::new(KEY_A)).await;
    let r = pay_js(deps, url, &["--client", "v1", "--replay"]).await;
    // v1 cannot echo: served unbound, checked against the route's requirements, once.
    assert_eq!(r["status"], 200, "{r:#}");
    assert_eq!(r["paymentHeaderName"], "X-PAYMENT", "{r:#}");
    assert_eq!(r["replayStatus"], 402, "{r:#}");
    assert_eq!(hits.get(), 1);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_v2_client_echoes_the_id_and_pays() {
    let Some(deps) = process::test_deps("python_v2_bound", &["venv/bin/python"]) else {
        return;
    };
    let hits = Hits::new();
    // Rotated keys: the server signs with B; the client neither knows nor cares.
    let keys = ChallengeKeys::new(KEY_B).with_previous(KEY_A);
    let (url, server) = bound_server(&hits, keys).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/pay.py");
    let python = deps.join("venv/bin/python");
    let r = tokio::task::spawn_blocking(move || {
        let (script, python) = (script.to_str().unwrap(), python.to_str().unwrap());
        let args = [
            script,
            "--client",
            "v2",
            "--transport",
            "requests",
            "--url",
            &url,
            "--replay",
        ];
        run_client(&deps, python, &args)
    })
    .await
    .unwrap();
    assert_paid_bound(&r, &hits);
    server.abort();
}
