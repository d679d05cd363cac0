//! Idempotent retries with the `payment-identifier` extension, on the in-memory store: the
//! advertised declaration, replay byte for byte, conflicts, the required flag, concurrent
//! duplicates, forgotten ids, unstorable bodies, the unknown outcome and expiry. Handler runs
//! and settler calls are counted, not inferred from statuses. (Redis: tests/redis.rs.)
#![cfg(feature = "test-util")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower::Layer;
use tower_x402::clock::FixedClock;
use tower_x402::idempotency::{IdempotentReplay, MemoryIdempotencyStore};
use tower_x402::primitives::B256;
use tower_x402::proto::header::PAYMENT_SIGNATURE;
use tower_x402::settle::{SettleError, Settlement, Settler};
use tower_x402::test_util::{encode, exact_payload, v2_json};
use tower_x402::{PaymentLayer, PaymentLayerBuilder, VerifiedPayment};

const ID: &str = "pay_7d5d747be160e280504c099d984bcfe0";
const IN_PROGRESS: &str = "payment_in_progress";
const CONFLICT: &str = "payment_identifier_conflict";
const UNKNOWN: &str = "settlement_outcome_unknown";

/// The declaration `declarePaymentIdentifierExtension(required)` of the reference
/// (`@x402/extensions` 2.27.0, `dist/cjs/payment-identifier/index.js`).
fn reference_declaration(required: bool) -> Value {
    json!({
        "info": { "required": required },
        "schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "required": { "type": "boolean" },
                "id": {
                    "type": "string",
                    "minLength": 16,
                    "maxLength": 128,
                    "pattern": "^[a-zA-Z0-9_-]+$"
                }
            },
            "required": ["required"]
        }
    })
}

// ------------------------------------------------------------------------------------------------
// Harness

const OK: u8 = 0;
const UNKNOWN_OUTCOME: u8 = 1;
const REFUSE: u8 = 2;

/// Counts settlements; answers as `mode` says.
#[derive(Clone, Default)]
struct CountingSettler {
    calls: Arc<AtomicUsize>,
    mode: Arc<AtomicU8>,
}

impl CountingSettler {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Settler for CountingSettler {
    async fn settle(&self, _: &VerifiedPayment) -> Result<Settlement, SettleError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        // A distinct transaction per call: a second settlement would show in the receipt.
        let tx = B256::from(tower_x402::primitives::U256::from(n + 1));
        match self.mode.load(Ordering::SeqCst) {
            UNKNOWN_OUTCOME => Err(SettleError::Unknown {
                transaction: Some(tx),
                retry_after: Some(Duration::from_secs(7)),
                source: "receipt timed out".into(),
            }),
            REFUSE => Err(SettleError::Refused {
                reason: tower_x402::rejection::Reason::from_wire(
                    "invalid_exact_evm_insufficient_balance",
                )
                .expect("a catalogued reason"),
                transaction: None,
            }),
            _ => Ok(Settlement {
                transaction: Some(tx),
                amount: None,
                ..Default::default()
            }),
        }
    }
}

struct Setup {
    clock: FixedClock,
    hits: Hits,
    settler: CountingSettler,
    store: MemoryIdempotencyStore,
}

impl Setup {
    fn new(hits: Hits) -> Self {
        let clock = clock();
        Self {
            store: MemoryIdempotencyStore::with_limits_and_clock(10_000, 1 << 20, clock.clone()),
            clock,
            hits,
            settler: CountingSettler::default(),
        }
    }

    fn builder(&self) -> PaymentLayerBuilder {
        builder(&self.clock)
            .settler(self.settler.clone())
            .idempotency(self.store.clone())
    }

    /// The counting app plus `/big` (an exact 100 KiB body) and `/stream` (no size bound).
    fn service(
        &self,
        layer: PaymentLayer,
    ) -> impl tower::Service<
        http::Request<Body>,
        Response = http::Response<tower_x402::body::ResponseBody<Body>>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let (big, stream) = (self.hits.clone(), self.hits.clone());
        let app = app(&self.hits)
            .route(
                "/big",
                get(move |req: axum::extract::Request| async move {
                    big.run(req.headers(), None).await;
                    vec![b'x'; 100 * 1024]
                }),
            )
            .route(
                "/stream",
                get(move |req: axum::extract::Request| async move {
                    stream.run(req.headers(), None).await;
                    Body::new(Chunks(vec!["streamed ", "body"]))
                }),
            );
        layer.layer(Router::new().merge(app))
    }
}

/// A body in two chunks with no size bound, like a stream.
struct Chunks(Vec<&'static str>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = (!self.0.is_empty()).then(|| self.0.remove(0));
        std::task::Poll::Ready(
            next.map(|s| Ok(http_body::Frame::data(Bytes::from_static(s.as_bytes())))),
        )
    }
}

/// A fresh v2 proof carrying `id` (if any) in `extensions["payment-identifier"].info.id`,
/// as `appendPaymentIdentifierToExtensions` writes it.
fn proof_with(id: Option<&str>, required: bool) -> (HeaderName, HeaderValue) {
    let payload = exact_payload(&payer(), &requirements(), NOW);
    let mut json = v2_json(&requirements(), &payload, None);
    if let Some(id) = id {
        let mut ext = reference_declaration(required);
        ext["info"]["id"] = json!(id);
        json["extensions"] = json!({ "payment-identifier": ext });
    }
    (PAYMENT_SIGNATURE, encode(&json))
}

fn proof(id: &str) -> (HeaderName, HeaderValue) {
    proof_with(Some(id), false)
}

/// The same reply, byte for byte: status, every header, body.
fn assert_same(a: &Reply, b: &Reply) {
    assert_eq!(a.status, b.status);
    assert_eq!(a.headers, b.headers);
    assert_eq!(a.body, b.body);
}

// ------------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn the_v2_challenge_advertises_the_extension_as_the_reference_does() {
    for required in [false, true] {
        let s = Setup::new(Hits::new());
        let svc = s.service(s.builder().idempotency_required(required).build().unwrap());
        let r = get_with(&svc, "/paid", []).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        let ext = r.challenge().extensions.expect("extensions");
        assert_eq!(
            ext.get("payment-identifier"),
            Some(&reference_declaration(required))
        );
    }
    // Without idempotency no extension is offered.
    let r = get_with(&layer(&clock()).layer(app(&Hits::new())), "/paid", []).await;
    assert!(r.challenge().extensions.is_none());
}

#[tokio::test]
async fn a_retry_with_the_same_id_and_proof_replays_the_response_byte_for_byte() {
    let s = Setup::new(Hits::new());
    let svc = s.service(s.builder().build().unwrap());
    let p = proof(ID);
    let first = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["handler"], "ran");
    let receipt = first.receipt();
    assert_eq!(receipt["success"], json!(true));

    for _ in 0..3 {
        let res = svc.clone().oneshot_paid("/paid", p.clone()).await;
        assert!(res.extensions().get::<IdempotentReplay>().is_some());
        let again = Reply::read(res).await;
        assert_same(&first, &again);
        assert_eq!(
            again.receipt(),
            receipt,
            "the same transaction, not a new one"
        );
    }
    assert_eq!(s.hits.get(), 1, "the handler ran once");
    assert_eq!(s.settler.calls(), 1, "settled once");

    // Without the id the same proof is a plain replay: refused by the nonce guard.
    let mut bare: Value = decode_header(&p.1);
    bare.as_object_mut().unwrap().remove("extensions");
    let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&bare))]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    assert_eq!(s.hits.get(), 1);
}

#[tokio::test]
async fn the_same_id_with_another_proof_or_request_is_a_conflict() {
    let s = Setup::new(Hits::new());
    let svc = s.service(s.builder().build().unwrap());
    let p = proof(ID);
    assert_eq!(
        get_with(&svc, "/paid", [p.clone()]).await.status,
        StatusCode::OK
    );

    let other = get_with(&svc, "/paid", [proof(ID)]).await;
    assert_eq!(
        other.outcome(),
        (StatusCode::CONFLICT, Some(CONFLICT.into()))
    );
    let elsewhere = get_with(&svc, "/premium", [p.clone()]).await;
    assert_eq!(
        elsewhere.outcome(),
        (StatusCode::CONFLICT, Some(CONFLICT.into()))
    );
    assert_eq!(
        elsewhere.rejection.map(|r| r.status),
        Some(StatusCode::CONFLICT)
    );
    assert_eq!((s.hits.get(), s.settler.calls()), (1, 1));

    // While the first is in flight, a different proof with its id is a conflict too.
    let s = Setup::new(Hits::gated());
    let svc = s.service(s.builder().build().unwrap());
    let first = tokio::spawn({
        let svc = svc.clone();
        let p = proof(ID);
        async move { get_with(&svc, "/paid", [p]).await }
    });
    wait_for(|| s.hits.get() == 1).await;
    let other = get_with(&svc, "/paid", [proof(ID)]).await;
    assert_eq!(
        other.outcome(),
        (StatusCode::CONFLICT, Some(CONFLICT.into()))
    );
    s.hits.open();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
}

#[tokio::test]
async fn required_ids_and_malformed_ids_get_400() {
    let s = Setup::new(Hits::new());
    let svc = s.service(s.builder().idempotency_required(true).build().unwrap());
    let r = get_with(&svc, "/paid", [proof_with(None, true)]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::BAD_REQUEST,
            Some("payment_identifier_required".into())
        )
    );
    for bad in ["short", "pay_has spaces_0123456", &"x".repeat(129)] {
        let r = get_with(&svc, "/paid", [proof(bad)]).await;
        assert_eq!(
            r.outcome(),
            (
                StatusCode::BAD_REQUEST,
                Some("invalid_payment_identifier".into())
            ),
            "{bad}"
        );
    }
    assert_eq!(s.hits.get(), 0);
    // v1 has no extensions: served without idempotency even when required.
    let r = get_with(&svc, "/paid", [proof_v1()]).await;
    assert_eq!(r.status, StatusCode::OK);
    // With an id, required is satisfied.
    assert_eq!(
        get_with(&svc, "/paid", [proof(ID)]).await.status,
        StatusCode::OK
    );
    assert_eq!(s.hits.get(), 2);

    // Not required: a v2 payment without an id runs as usual.
    let s = Setup::new(Hits::new());
    let svc = s.service(s.builder().build().unwrap());
    assert_eq!(
        get_with(&svc, "/paid", [proof_with(None, false)])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_the_handler_once() {
    let s = Setup::new(Hits::gated());
    let svc = s.service(s.builder().build().unwrap());
    let p = proof(ID);
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (svc, p, barrier) = (svc.clone(), p.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                get_with(&svc, "/paid", [p]).await
            })
        })
        .collect();
    // Hold the winner in its handler until every duplicate has been answered or is waiting.
    wait_for(|| s.hits.get() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.hits.open();
    let mut ok = Vec::new();
    let mut in_progress = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.outcome() {
            (StatusCode::OK, _) => ok.push(r),
            (StatusCode::SERVICE_UNAVAILABLE, Some(reason)) if reason == IN_PROGRESS => {
                assert_eq!(r.header("retry-after"), Some("1"));
                in_progress += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(ok.len() + in_progress, 64);
    assert!(in_progress >= 1, "duplicates met the request in flight");
    eprintln!(
        "64 duplicates: {} x 200, {in_progress} x 503 payment_in_progress",
        ok.len()
    );
    assert_eq!(s.hits.get(), 1, "exactly one handler run");
    assert_eq!(s.settler.calls(), 1, "exactly one settlement");
    for r in &ok[1..] {
        assert_same(&ok[0], r);
    }
    // The ones told to wait get the stored answer on retry.
    let retry = get_with(&svc, "/paid", [p]).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.receipt(), ok[0].receipt());
    assert_eq!(s.hits.get(), 1);
}

#[tokio::test]
async fn a_refused_handler_forgets_the_id_and_the_retry_runs() {
    let s = Setup::new(Hits::new());
    let svc = s.service(s.builder().build().unwrap());
    let p = proof(ID);
    let fail = (
        HeaderName::from_static(STATUS_HEADER),
        HeaderValue::from_static("503"),
    );
    let r = get_with(&svc, "/paid", [p.clone(), fail]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.has_no_receipt());
    assert_eq!((s.hits.get(), s.settler.calls()), (1, 0));

    let r = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(r.status, StatusCode::OK, "the retry ran afresh");
    assert_eq!((s.hits.get(), s.settler.calls()), (2, 1));
    let again = get_with(&svc, "/paid", [p]).await;
    assert_same(&r, &again);
    assert_eq!(s.hits.get(), 2);
}

#[tokio::test]
async fn oversized_and_streaming_bodies_are_not_stored() {
    let s = Setup::new(Hits::new());
    let svc = s.service(s.builder().build().unwrap());
    for (path, len) in [("/big", 100 * 1024), ("/stream", "streamed body".len())] {
        let id = format!("pay_{}_0123456789abcdef", &path[1..]);
        let p = proof(&id);
        let first = get_with(&svc, path, [p.clone()]).await;
        assert_eq!(first.status, StatusCode::OK, "{path}");
        assert_eq!(
            first.body.len(),
            len,
            "{path}: the body passes through whole"
        );
        assert_eq!(first.receipt()["success"], json!(true));
        // Not replayable: the id was forgotten, the nonce guard answers the retry.
        let retry = get_with(&svc, path, [p]).await;
        assert_eq!(
            retry.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into())),
            "{path}"
        );
    }
    assert_eq!((s.hits.get(), s.settler.calls()), (2, 2));
    assert_eq!(s.store.bytes(), 0, "nothing stored");

    // A limit below the handler's JSON: not stored either.
    let s = Setup::new(Hits::new());
    let svc = s.service(s.builder().idempotency_max_body(10).build().unwrap());
    let p = proof(ID);
    assert_eq!(
        get_with(&svc, "/paid", [p.clone()]).await.status,
        StatusCode::OK
    );
    let retry = get_with(&svc, "/paid", [p]).await;
    assert_eq!(
        retry.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    assert_eq!(s.hits.get(), 1);
}

#[tokio::test]
async fn an_unknown_outcome_is_replayed_not_turned_into_nonce_used() {
    let s = Setup::new(Hits::new());
    s.settler.mode.store(UNKNOWN_OUTCOME, Ordering::SeqCst);
    let svc = s.service(s.builder().build().unwrap());
    let p = proof(ID);
    let first = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(
        first.outcome(),
        (StatusCode::SERVICE_UNAVAILABLE, Some(UNKNOWN.into()))
    );
    assert_eq!(first.header("retry-after"), Some("7"));
    assert_eq!(first.receipt()["success"], json!(false));

    // The settler would now succeed: the retry must still not settle again.
    s.settler.mode.store(OK, Ordering::SeqCst);
    let again = get_with(&svc, "/paid", [p]).await;
    assert_same(&first, &again);
    assert_eq!(
        again.rejection, first.rejection,
        "the refusal info is restored"
    );
    assert_eq!((s.hits.get(), s.settler.calls()), (1, 1));

    // A settlement refused after the handler ran is stored too (the proof is spent).
    s.settler.mode.store(REFUSE, Ordering::SeqCst);
    let p = proof("pay_refused_0123456789");
    let first = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(first.status, StatusCode::PAYMENT_REQUIRED);
    assert_same(&first, &get_with(&svc, "/paid", [p]).await);
    assert_eq!((s.hits.get(), s.settler.calls()), (2, 2));
}

#[tokio::test]
async fn ids_expire() {
    let s = Setup::new(Hits::new());
    let store = s.store.clone().with_max_ttl(Duration::from_secs(10));
    let svc = s.service(
        builder(&s.clock)
            .settler(s.settler.clone())
            .idempotency(store.clone())
            .build()
            .unwrap(),
    );
    let p = proof(ID);
    let first = get_with(&svc, "/paid", [p.clone()]).await;
    assert_eq!(first.status, StatusCode::OK);
    s.clock.advance(9);
    assert_same(&first, &get_with(&svc, "/paid", [p.clone()]).await);
    // Past the store's TTL (the proof itself is still valid): the id is gone, and the nonce
    // guard refuses the spent proof.
    s.clock.advance(1);
    let r = get_with(&svc, "/paid", [p]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    assert_eq!((s.hits.get(), s.settler.calls()), (1, 1));
    s.clock.advance(3600);
    store.sweep();
    assert!(store.is_empty());
}

// ------------------------------------------------------------------------------------------------
// Helpers

async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 5 s");
}

fn decode_header(v: &HeaderValue) -> Value {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.as_bytes())
        .unwrap();
    serde_json::from_slice(&raw).unwrap()
}

trait OneshotPaid {
    async fn oneshot_paid(
        self,
        path: &str,
        p: (HeaderName, HeaderValue),
    ) -> http::Response<tower_x402::body::ResponseBody<Body>>;
}

impl<S> OneshotPaid for S
where
    S: tower::Service<
            http::Request<Body>,
            Response = http::Response<tower_x402::body::ResponseBody<Body>>,
            Error = std::convert::Infallible,
        >,
{
    async fn oneshot_paid(
        self,
        path: &str,
        p: (HeaderName, HeaderValue),
    ) -> http::Response<tower_x402::body::ResponseBody<Body>> {
        use tower::ServiceExt;
        let Ok(res) = self.oneshot(request(path, [p])).await;
        res
    }
}
