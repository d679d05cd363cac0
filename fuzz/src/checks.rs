//! The properties the fuzz targets and the property tests check, on arbitrary bytes.
//!
//! One file, used twice: the fuzz crate's library (`fuzz/src/lib.rs`) and the stable property
//! tests (`tests/proptest.rs`, through `#[path]`). Each entry point panics when a property
//! fails; anything else is a pass. Only the crate's public API is used.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use secp256k1::ecdsa::RecoveryId;
use secp256k1::{Message, PublicKey, SECP256K1, SecretKey};
use serde_json::Value;
use serde_json::json;
use tower::{Layer, Service};
use tower_x402::challenge::{Binding, EXTRA_FIELD};
use tower_x402::clock::FixedClock;
use tower_x402::primitives::{Address, B256, U256, address, hex, keccak256};
use tower_x402::proto::exact::{Authorization, ExactEvmPayload};
use tower_x402::proto::header::{
    DEFAULT_MAX_HEADER_BYTES, PAYMENT_SIGNATURE, X_PAYMENT, decode_bytes, encode_json,
};
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::proto::{PaymentPayload, v1, v2};
use tower_x402::verify::exact::{domain_separator, signing_hash};
use tower_x402::{
    Asset, ChallengeKeys, ExactEvmVerifier, MemoryNonceStore, PaymentLayer, PaymentOption,
    PaymentRejection, VerifiedPayment,
};

/// The frozen "now" of every check.
pub const NOW: u64 = 1_750_000_000;
/// Who the layer under test charges for.
pub const PAY_TO: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
/// The URL every layer request goes to.
pub const URL: &str = "http://api.test/paid";
/// The bound layer's challenge key.
pub const KEY: [u8; 32] = [0x5a; 32];

/// The route's requirement: $0.001 Base Sepolia USDC to [`PAY_TO`].
pub fn requirements() -> PaymentRequirements {
    PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.001", PAY_TO)
        .expect("valid option")
        .requirements()
        .clone()
}

/// A verifier on the frozen clock.
pub fn verifier() -> ExactEvmVerifier {
    ExactEvmVerifier::new().with_clock(FixedClock::new(NOW))
}

/// Anvil's well-known account #1 key: public test funds only.
const PAYER_KEY: [u8; 32] =
    hex!("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d");

/// The payer of [`signed`] proofs.
pub fn payer() -> Address {
    let sk = SecretKey::from_byte_array(PAYER_KEY).expect("a valid constant key");
    let pk = PublicKey::from_secret_key_global(&sk).serialize_uncompressed();
    Address::from_slice(&keccak256(&pk[1..])[12..])
}

/// A valid proof paying `req` at [`NOW`] with `nonce`, as the official clients sign it
/// (`validAfter = NOW - 600`, `validBefore = NOW + maxTimeoutSeconds`). Signed with
/// libsecp256k1 directly, so the fuzz crate needs no signer crates (half the build).
pub fn signed(req: &PaymentRequirements, nonce: B256) -> ExactEvmPayload {
    let authorization = Authorization {
        from: payer(),
        to: req.pay_to.evm().unwrap_or_default(),
        value: req.amount,
        valid_after: U256::from(NOW - 600),
        valid_before: U256::from(NOW + req.max_timeout_seconds),
        nonce,
    };
    let separator = domain_separator(
        req.extra_str("name").unwrap_or_default(),
        req.extra_str("version").unwrap_or_default(),
        req.network.chain_id(),
        req.asset.evm().unwrap_or_default(),
    );
    let digest = signing_hash(separator, &authorization);
    let sk = SecretKey::from_byte_array(PAYER_KEY).expect("a valid constant key");
    let (recid, rs) = SECP256K1
        .sign_ecdsa_recoverable(Message::from_digest(digest.0), &sk)
        .serialize_compact();
    let mut signature = rs.to_vec();
    signature.push(if recid == RecoveryId::Zero { 27 } else { 28 });
    ExactEvmPayload {
        signature: signature.into(),
        authorization,
    }
}

/// The v2 `PAYMENT-SIGNATURE` document of `payload` paying `req`.
pub fn v2_doc(req: &PaymentRequirements, payload: &ExactEvmPayload) -> Value {
    json!({ "x402Version": 2, "accepted": req, "payload": payload })
}

/// The v1 `X-PAYMENT` document of `payload` (Base Sepolia).
pub fn v1_doc(payload: &ExactEvmPayload) -> Value {
    json!({ "x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": payload })
}

/// Challenge keys on the frozen clock (v1 refused unless `unbound_v1`).
pub fn keys(unbound_v1: bool) -> ChallengeKeys {
    ChallengeKeys::new(KEY)
        .with_clock(FixedClock::new(NOW))
        .accept_unbound_v1(unbound_v1)
}

/// Polls a future that never waits on I/O (memory store, in-process verifier) to completion.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..10_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future did not complete, but nothing in this stack waits on I/O");
}

// ------------------------------------------------------------------------------------------------
// Header decoder

/// Header decoding: never panics; a decoded header has exactly one accepted encoding (the
/// input); the size cap holds; what decodes goes on to [`payload`].
pub fn header(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    match decode_bytes(&value, DEFAULT_MAX_HEADER_BYTES) {
        Ok(json) => {
            assert!(data.len() <= DEFAULT_MAX_HEADER_BYTES, "size cap");
            assert_eq!(
                encode_json(&json).as_bytes(),
                data,
                "a decoded header must be the one canonical encoding of its bytes"
            );
            payload(&json);
        }
        Err(e) => {
            assert_eq!(e.is_too_large(), data.len() > DEFAULT_MAX_HEADER_BYTES);
            assert!(matches!(
                e.reason().as_str(),
                "invalid_payload" | "invalid_x402_version"
            ));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Payload parser

/// `ser(parse(ser(x))) == ser(x)`, and the re-parse succeeds.
fn reserializes<T: serde::Serialize + serde::de::DeserializeOwned>(x: &T, what: &str) -> T {
    let once = serde_json::to_vec(x).expect("serializes");
    let back: T = serde_json::from_slice(&once)
        .unwrap_or_else(|e| panic!("{what}: our own output does not parse: {e}"));
    let twice = serde_json::to_vec(&back).expect("serializes");
    assert_eq!(once, twice, "{what}: serialization is not stable");
    back
}

/// JSON payload parsing (v1, v2, exact, the challenge): never panics, parsed messages
/// re-serialize stably, and whatever parses is verified without panicking; anything that
/// verifies pays exactly the route's requirement, signed by `from`.
pub fn payload(json: &[u8]) {
    if let Ok(p) = serde_json::from_slice::<v2::PaymentPayload>(json) {
        let back = reserializes(&p, "v2 payload");
        assert_eq!(back.accepted, p.accepted);
        verify(&PaymentPayload::V2(p));
    }
    if let Ok(p) = serde_json::from_slice::<v1::PaymentPayload>(json) {
        let back = reserializes(&p, "v1 payload");
        assert_eq!((back.network, &back.scheme), (p.network, &p.scheme));
        verify(&PaymentPayload::V1(p));
    }
    if let Ok(p) = serde_json::from_slice::<ExactEvmPayload>(json) {
        assert_eq!(reserializes(&p, "exact payload"), p);
    }
    if let Ok(p) = serde_json::from_slice::<v2::PaymentRequired>(json) {
        assert_eq!(reserializes(&p, "v2 challenge"), p);
    }
    if let Ok(p) = serde_json::from_slice::<v1::PaymentRequired>(json) {
        assert_eq!(reserializes(&p, "v1 challenge"), p);
    }
}

fn verify(p: &PaymentPayload) {
    let req = requirements();
    if let Ok(v) = verifier().verify_sync(p, &req) {
        assert_eq!(
            (v.amount, v.pay_to.into(), v.asset.into(), v.network),
            (req.amount, req.pay_to, req.asset, req.network),
            "verified payment must pay the server's requirement"
        );
        assert_eq!(Some(v.payer), v.eip3009().map(|(a, _)| a.from));
    }
}

// ------------------------------------------------------------------------------------------------
// The whole layer

/// Counts handler runs and records what the layer handed it.
#[derive(Clone, Default)]
struct Handler {
    runs: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Option<VerifiedPayment>>>>,
}

impl Service<Request<()>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let payment = req.extensions().get::<VerifiedPayment>().cloned();
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(payment);
        }
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"paid")))))
    }
}

/// Valid signed documents (JSON text) the template modes start from: v2, v1, v2 with a
/// bound challenge id. Signed once per process.
fn templates() -> &'static [Vec<u8>; 3] {
    static T: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    T.get_or_init(|| {
        let req = requirements();
        let v2 = v2_doc(&req, &signed(&req, B256::repeat_byte(1)));
        let v1 = v1_doc(&signed(&req, B256::repeat_byte(2)));
        let mut bound_req = req.clone();
        let id = keys(false).issue(&Binding {
            url: URL,
            method: "GET",
            requirements: &req,
        });
        bound_req
            .extra
            .get_or_insert_with(Default::default)
            .insert(EXTRA_FIELD.into(), Value::String(id));
        let bound = v2_doc(&bound_req, &signed(&bound_req, B256::repeat_byte(3)));
        [v2, v1, bound].map(|v| serde_json::to_vec(&v).expect("serializes"))
    })
}

/// The mode byte's meaning (bits 2..): how the rest of the input becomes headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Up to 4 headers, `\0`-separated; each: a name selector byte, then the raw value.
    Raw,
    /// As `Raw`, but each value is JSON, base64-encoded by the harness.
    Json,
    /// A valid v2 proof with edits: 3-byte chunks (position u16 BE, byte) on its JSON text.
    TemplateV2,
    /// A valid v1 proof with edits.
    TemplateV1,
    /// A valid v2 proof carrying a bound challenge id, with edits.
    TemplateBound,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::Raw,
        Mode::Json,
        Mode::TemplateV2,
        Mode::TemplateV1,
        Mode::TemplateBound,
    ];

    /// The flags byte selecting this mode (other flags off).
    pub fn flag(self) -> u8 {
        let i = Self::ALL.iter().position(|m| *m == self).unwrap_or(0) as u8;
        i << 2
    }
}

/// Flag bits of the first input byte.
pub mod flag {
    /// The layer binds challenges.
    pub const BOUND: u8 = 1;
    /// With [`BOUND`]: v1 proofs are let through unbound.
    pub const UNBOUND_V1: u8 = 2;
    /// Send the request a second time (replay).
    pub const TWICE: u8 = 0x80;
}

/// The headers an input describes (after the flags byte).
fn headers(mode: Mode, rest: &[u8]) -> Vec<(HeaderName, HeaderValue)> {
    let name = |sel: u8| {
        if sel.is_multiple_of(2) {
            PAYMENT_SIGNATURE
        } else {
            X_PAYMENT
        }
    };
    let template = |i: usize, name: HeaderName| {
        let mut doc = templates()[i].clone();
        for edit in rest.chunks_exact(3).take(16) {
            let len = doc.len();
            if len == 0 {
                break;
            }
            let pos = usize::from(u16::from_be_bytes([edit[0], edit[1]]));
            if pos < len {
                doc[pos] = edit[2];
            } else if edit[2] == 0 {
                // Past the end: truncate there instead (pos mod len).
                doc.truncate(pos % len);
            }
        }
        vec![(name, encode_json(&doc))]
    };
    match mode {
        Mode::Raw | Mode::Json => rest
            .split(|b| *b == 0)
            .take(4)
            .filter_map(|part| {
                let (sel, value) = part.split_first()?;
                let value = if mode == Mode::Json {
                    encode_json(value)
                } else {
                    HeaderValue::from_bytes(value).ok()?
                };
                Some((name(*sel), value))
            })
            .collect(),
        Mode::TemplateV2 => template(0, PAYMENT_SIGNATURE),
        Mode::TemplateV1 => template(1, X_PAYMENT),
        Mode::TemplateBound => template(2, PAYMENT_SIGNATURE),
    }
}

/// What independent decoding says about the request's payment: the one proof it carries,
/// if it verifies against the route's requirement (and, when bound, carries a valid id).
fn independently_valid(
    headers: &[(HeaderName, HeaderValue)],
    bound: bool,
    unbound_v1: bool,
) -> Option<(Address, B256)> {
    let [(name, value)] = headers else {
        return None;
    };
    let json = decode_bytes(value, DEFAULT_MAX_HEADER_BYTES).ok()?;
    let probe: Value = serde_json::from_slice(&json).ok()?;
    let version = probe.get("x402Version")?.as_u64()?;
    let req = requirements();
    let payload = match (name == PAYMENT_SIGNATURE, version) {
        (true, 2) => {
            let p: v2::PaymentPayload = serde_json::from_slice(&json).ok()?;
            let a = &p.accepted;
            if (a.asset, a.pay_to, a.amount) != (req.asset, req.pay_to, req.amount) {
                return None;
            }
            if bound {
                let id = a.extra_str(EXTRA_FIELD)?;
                let binding = Binding {
                    url: URL,
                    method: "GET",
                    requirements: &req,
                };
                keys(unbound_v1).check(id, &binding).ok()?;
            }
            PaymentPayload::V2(p)
        }
        (false, 1) if !bound || unbound_v1 => {
            PaymentPayload::V1(serde_json::from_slice(&json).ok()?)
        }
        _ => return None,
    };
    let v = verifier().verify_sync(&payload, &req).ok()?;
    Some((v.payer, v.nonce()))
}

/// The layer of [`layer`]: $0.001 to [`PAY_TO`], frozen clock, fresh memory store; bound with
/// [`keys`] when `bound`. Returns the service and its handler.
fn service(
    bound: bool,
    unbound_v1: bool,
) -> (
    impl Service<
        Request<()>,
        Response = Response<tower_x402::body::ResponseBody<Full<Bytes>>>,
        Error = Infallible,
        Future: Send,
    >,
    Handler,
) {
    let clock = FixedClock::new(NOW);
    let mut builder = PaymentLayer::builder()
        .accept(PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.001", PAY_TO).expect("ok"))
        .verifier(verifier())
        .nonce_store(MemoryNonceStore::with_capacity_and_clock(64, clock));
    builder = if bound {
        builder.bind_challenges(keys(unbound_v1))
    } else {
        builder.no_challenge_binding()
    };
    let handler = Handler::default();
    let svc = builder.build().expect("valid layer").layer(handler.clone());
    (svc, handler)
}

/// Sends one `GET` [`URL`] carrying `headers` through a fresh layer ([`service`]): the status
/// and whether the handler ran.
pub fn send_once(headers: &[(HeaderName, HeaderValue)], bound: bool) -> (StatusCode, bool) {
    let (mut svc, handler) = service(bound, false);
    let mut req = Request::get(URL).body(()).expect("valid request");
    for (name, value) in headers {
        req.headers_mut().append(name.clone(), value.clone());
    }
    let res = block_on(svc.call(req)).unwrap_or_else(|e: Infallible| match e {});
    (res.status(), handler.runs.load(Ordering::SeqCst) > 0)
}

/// The valid signed documents the template modes start from: v2, v1, v2 bound.
pub fn template_docs() -> [Value; 3] {
    templates()
        .each_ref()
        .map(|t| serde_json::from_slice(t).expect("JSON"))
}

/// The whole layer on arbitrary request headers. Input: a flags byte ([`flag`] bits and the
/// [`Mode`] in bits 2..=4), then the headers in that mode.
///
/// Properties: no panic; never a 5xx but 503; every refusal is 400, 402 or 431 with a
/// [`PaymentRejection`] (and a decodable challenge on 402); the handler runs only for a proof
/// that independently decodes and verifies (bound: with a valid challenge id), answers 200
/// then, and never twice for one (payer, nonce).
pub fn layer(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let bound = flags & flag::BOUND != 0;
    let unbound_v1 = flags & flag::UNBOUND_V1 != 0;
    let mode = Mode::ALL[usize::from((flags >> 2) & 0x1f) % Mode::ALL.len()];
    let headers = headers(mode, rest);

    let (mut svc, handler) = service(bound, unbound_v1);
    let valid = independently_valid(&headers, bound, unbound_v1);
    let mut paid: HashSet<(Address, B256)> = HashSet::new();
    let sends = if flags & flag::TWICE != 0 { 2 } else { 1 };
    for _ in 0..sends {
        let before = handler.runs.load(Ordering::SeqCst);
        let mut req = Request::get(URL).body(()).expect("valid request");
        for (name, value) in &headers {
            req.headers_mut().append(name.clone(), value.clone());
        }
        let res = block_on(svc.call(req)).unwrap_or_else(|e: Infallible| match e {});
        let ran = handler.runs.load(Ordering::SeqCst) - before;
        let status = res.status();
        assert!(
            !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
            "5xx {status} for {headers:?}"
        );
        assert!(ran <= 1);
        if ran == 1 {
            assert_eq!(status, StatusCode::OK, "handler ran: its answer goes out");
            let key = valid.unwrap_or_else(|| {
                panic!("handler ran without an independently valid proof: {headers:?}")
            });
            assert!(paid.insert(key), "one proof bought the handler twice");
            let seen = handler.seen.lock().expect("lock");
            let got = seen
                .last()
                .and_then(Option::as_ref)
                .expect("VerifiedPayment");
            assert_eq!((got.payer, got.nonce()), key);
            continue;
        }
        assert!(
            matches!(status.as_u16(), 400 | 402 | 431 | 503),
            "refusal status {status}"
        );
        assert!(
            res.extensions().get::<PaymentRejection>().is_some(),
            "refusal without a PaymentRejection"
        );
        if status == StatusCode::PAYMENT_REQUIRED {
            let raw = res
                .headers()
                .get("payment-required")
                .expect("402 carries PAYMENT-REQUIRED");
            let json = STANDARD.decode(raw.as_bytes()).expect("standard base64");
            let challenge: v2::PaymentRequired =
                serde_json::from_slice(&json).expect("a v2 challenge");
            assert_eq!(challenge.accepts.len(), 1);
            assert_eq!(
                challenge.accepts[0].extra_str(EXTRA_FIELD).is_some(),
                bound,
                "challenge id iff bound"
            );
            let body = block_on(res.into_body().collect())
                .expect("body")
                .to_bytes();
            if !bound || unbound_v1 {
                serde_json::from_slice::<v1::PaymentRequired>(&body).expect("v1 body");
            } else {
                // v1 refused (bound): only the v2 form is offered, the body included.
                serde_json::from_slice::<v2::PaymentRequired>(&body).expect("v2 body");
            }
        }
    }
}
