//! Shared harness of the integration tests: a layer on a fixed clock, a counting handler,
//! in-process and over-the-wire senders, and decoders for challenges, bodies and receipts.
//!
//! Every test file uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod channel;
#[cfg(feature = "client")]
pub mod paying;
pub mod process;
pub mod siwx;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt};
use tower_x402::clock::FixedClock;
use tower_x402::primitives::{Address, address};
use tower_x402::proto::X402Version;
use tower_x402::proto::v2::{PaymentRequired, PaymentRequirements};
use tower_x402::test_util::{PrivateKeySigner, demo_payer, pay};
use tower_x402::{
    Asset, EvmVerifier, MemoryNonceStore, Network, PaymentLayer, PaymentLayerBuilder,
    PaymentOption, PaymentRejection, VerifiedPayment,
};

/// The frozen "now" of every test (Unix seconds).
pub const NOW: u64 = 1_750_000_000;
/// Anvil account #2: who gets paid.
pub const PAY_TO: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
/// USDC on Base Sepolia.
pub const USDC: Address = address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e");
/// `$0.001` of USDC in atomic units.
pub const AMOUNT: &str = "1000";
/// The price of the default route.
pub const PRICE: &str = "$0.001";
/// Reason of a replayed or in-flight proof.
pub const NONCE_USED: &str = "invalid_exact_evm_nonce_already_used";
/// Base of the in-process request URIs.
pub const BASE: &str = "http://api.test";
/// The request header the test handler reads to choose its status.
pub const STATUS_HEADER: &str = "x-test-status";

// ------------------------------------------------------------------------------------------------
// Configuration

/// A fixed clock at [`NOW`].
pub fn clock() -> FixedClock {
    FixedClock::new(NOW)
}

/// The default option: `$0.001` USDC on Base Sepolia to [`PAY_TO`].
pub fn option() -> PaymentOption {
    PaymentOption::exact(&Asset::usdc_base_sepolia(), PRICE, PAY_TO).expect("valid option")
}

/// The requirements of [`option`]: what a client pays against.
pub fn requirements() -> PaymentRequirements {
    option().requirements().clone()
}

/// A builder charging [`PRICE`] in Base Sepolia USDC, verifying and expiring by `clock`.
pub fn builder(clock: &FixedClock) -> PaymentLayerBuilder {
    unpriced_builder(clock)
        .pay_to(PAY_TO)
        .price(PRICE)
        .network(Network::BASE_SEPOLIA)
}

/// A builder verifying and expiring by `clock`, with nothing to sell yet (for `.pricing`).
///
/// Unbound: the suite signs requirements it builds itself ([`requirements`]), as no client
/// that echoes a 402 would. Binding, on by default, is tested in `tests/challenge.rs` and by the official clients (`tests/interop.rs`).
pub fn unpriced_builder(clock: &FixedClock) -> PaymentLayerBuilder {
    PaymentLayer::builder()
        .no_challenge_binding()
        .verifier(EvmVerifier::new().with_clock(clock.clone()))
        .nonce_store(MemoryNonceStore::with_capacity_and_clock(
            10_000,
            clock.clone(),
        ))
}

/// [`builder`] built.
pub fn layer(clock: &FixedClock) -> PaymentLayer {
    builder(clock).build().expect("valid layer")
}

/// The default payer (Anvil #1).
pub fn payer() -> PrivateKeySigner {
    demo_payer()
}

/// A fresh v2 proof for the default requirements (new nonce each call).
pub fn proof_v2() -> (HeaderName, HeaderValue) {
    pay(&payer(), &requirements(), NOW, X402Version::V2)
}

/// A fresh v1 proof for the default requirements.
pub fn proof_v1() -> (HeaderName, HeaderValue) {
    pay(&payer(), &requirements(), NOW, X402Version::V1)
}

// ------------------------------------------------------------------------------------------------
// The counting handler

/// Counts how often a handler body ran; optionally holds every handler at a gate until the
/// test opens it (to keep a proof reserved while concurrent requests arrive).
#[derive(Clone, Default)]
pub struct Hits {
    count: Arc<AtomicUsize>,
    gate: Option<Arc<Semaphore>>,
}

impl Hits {
    /// A counter without a gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// A counter whose handlers wait until [`Hits::open`].
    pub fn gated() -> Self {
        Self {
            count: Arc::default(),
            gate: Some(Arc::new(Semaphore::new(0))),
        }
    }

    /// Handler bodies run so far.
    pub fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Lets every waiting and future handler through.
    pub fn open(&self) {
        if let Some(gate) = &self.gate {
            gate.add_permits(Semaphore::MAX_PERMITS / 2);
        }
    }

    /// The handler body: counts, waits at the gate, answers with the status asked for in
    /// [`STATUS_HEADER`] (default 200) and a JSON body naming the verified payment, if any.
    pub async fn run(
        &self,
        headers: &HeaderMap,
        payment: Option<VerifiedPayment>,
    ) -> (StatusCode, Value) {
        self.count.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            let _permit = gate.acquire().await.expect("gate is never closed");
        }
        let status = headers
            .get(STATUS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK);
        let body = json!({
            "handler": "ran",
            "payer": payment.as_ref().map(|p| p.payer.to_checksum(None)),
            "amount": payment.as_ref().map(|p| p.amount.to_string()),
            "version": payment.as_ref().map(|p| p.version.number()),
        });
        (status, body)
    }
}

/// An axum handler running [`Hits::run`] (reads the payment from the request extensions).
pub fn handler(hits: Hits) -> axum::routing::MethodRouter {
    get(move |req: axum::extract::Request| {
        let hits = hits.clone();
        async move {
            let payment = req.extensions().get::<VerifiedPayment>().cloned();
            let (status, body) = hits.run(req.headers(), payment).await;
            (status, axum::Json(body))
        }
    })
}

/// An axum app with the counting handler on `/paid`, `/premium` and `/free`; no payment layer.
pub fn app(hits: &Hits) -> Router {
    Router::new()
        .route("/paid", handler(hits.clone()))
        .route("/premium", handler(hits.clone()))
        .route("/free", handler(hits.clone()))
}

/// A plain tower service (no axum) running [`Hits::run`].
pub fn plain_service<B: Send + 'static>(
    hits: Hits,
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<B>| {
        let hits = hits.clone();
        async move {
            let payment = req.extensions().get::<VerifiedPayment>().cloned();
            let (status, body) = hits.run(req.headers(), payment).await;
            let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
            *res.status_mut() = status;
            Ok::<_, Infallible>(res)
        }
    })
}

// ------------------------------------------------------------------------------------------------
// Requests and replies

/// `GET {BASE}{path}` with `headers`.
pub fn request(
    path: &str,
    headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
) -> Request<Body> {
    let mut req = Request::get(format!("{BASE}{path}"))
        .body(Body::empty())
        .expect("valid request");
    for (name, value) in headers {
        req.headers_mut().append(name, value);
    }
    req
}

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// What the layer says it refused (in-process only).
    pub rejection: Option<PaymentRejection>,
}

impl Reply {
    /// Reads `res` to the end.
    pub async fn read<B>(res: Response<B>) -> Self
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let rejection = res.extensions().get::<PaymentRejection>().cloned();
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("body reads").to_bytes();
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
            rejection,
        }
    }

    /// A header as a string, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    /// The decoded `PAYMENT-REQUIRED` challenge (panics if absent or malformed).
    pub fn challenge(&self) -> PaymentRequired {
        let raw = self
            .headers
            .get("payment-required")
            .expect("PAYMENT-REQUIRED header");
        let json = STANDARD
            .decode(raw.as_bytes())
            .expect("PAYMENT-REQUIRED is standard base64");
        serde_json::from_slice(&json).expect("PAYMENT-REQUIRED is a v2 PaymentRequired")
    }

    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The v1 challenge (the 402 body) as typed by the crate.
    pub fn v1_challenge(&self) -> tower_x402::proto::v1::PaymentRequired {
        serde_json::from_slice(&self.body).expect("402 body is a v1 PaymentRequired")
    }

    /// The refusal reason: the challenge's `error` on 402 (the v1 body's when a v1-only route
    /// sends no header), the JSON body's `error` otherwise.
    pub fn reason(&self) -> Option<String> {
        if self.status == StatusCode::PAYMENT_REQUIRED
            && self.headers.contains_key("payment-required")
        {
            self.challenge().error
        } else if self.status == StatusCode::PAYMENT_REQUIRED {
            self.v1_challenge().error
        } else {
            self.json()
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
        }
    }

    /// The decoded receipt in `name` (`payment-response` or `x-payment-response`), if present.
    pub fn receipt_in(&self, name: &str) -> Option<Value> {
        let raw = self.headers.get(name)?;
        let json = STANDARD
            .decode(raw.as_bytes())
            .expect("receipt is standard base64");
        Some(serde_json::from_slice(&json).expect("receipt is JSON"))
    }

    /// The v2 receipt (`PAYMENT-RESPONSE`), panicking if absent.
    pub fn receipt(&self) -> Value {
        self.receipt_in("payment-response")
            .expect("PAYMENT-RESPONSE header")
    }

    /// The v1 receipt (`X-PAYMENT-RESPONSE`), panicking if absent.
    pub fn v1_receipt(&self) -> Value {
        self.receipt_in("x-payment-response")
            .expect("X-PAYMENT-RESPONSE header")
    }

    /// True when neither receipt header is present.
    pub fn has_no_receipt(&self) -> bool {
        !self.headers.contains_key("payment-response")
            && !self.headers.contains_key("x-payment-response")
    }

    /// Status and reason, for compact assertions.
    pub fn outcome(&self) -> (StatusCode, Option<String>) {
        (self.status, self.reason())
    }
}

/// Sends `req` through a clone of `svc` in-process (`ready().call()` via `oneshot`).
pub async fn send<S, B>(svc: &S, req: Request<Body>) -> Reply
where
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let res = svc
        .clone()
        .oneshot(req)
        .await
        .expect("service does not fail");
    Reply::read(res).await
}

/// `GET path` with `headers` through `svc`.
pub async fn get_with<S, B>(
    svc: &S,
    path: &str,
    headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
) -> Reply
where
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    send(svc, request(path, headers)).await
}

/// Checks the shape of a successful receipt: paid by the demo payer on Base Sepolia,
/// verify-only (empty transaction).
pub fn assert_success_receipt(receipt: &Value, network: &str) {
    assert_eq!(receipt["success"], json!(true), "{receipt}");
    assert_eq!(receipt["transaction"], json!(""), "{receipt}");
    assert_eq!(receipt["network"], json!(network), "{receipt}");
    assert_eq!(
        receipt["payer"],
        json!(payer().address().to_checksum(None)),
        "{receipt}"
    );
    assert!(receipt.get("errorReason").is_none(), "{receipt}");
}

// ------------------------------------------------------------------------------------------------
// Over the wire

/// Serves `app` on 127.0.0.1:0; the server stops when the returned handle is aborted or the
/// test's runtime ends.
pub async fn serve(app: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("server runs");
    });
    (addr, task)
}

/// A hyper client for loopback tests.
pub type WireClient = Client<HttpConnector, Full<Bytes>>;

/// A hyper (hyper-util legacy) HTTP/1 client.
pub fn client() -> WireClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http()
}

/// `GET http://{addr}{path}` with `headers`, over TCP.
pub async fn wire(
    client: &WireClient,
    addr: SocketAddr,
    path: &str,
    headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
) -> Reply {
    let mut req = Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    for (name, value) in headers {
        req.headers_mut().append(name, value);
    }
    let res = client.request(req).await.expect("request over loopback");
    Reply::read(res).await
}

// ------------------------------------------------------------------------------------------------
// Examples

/// Runs the `{name}` example binary with no arguments (its self-contained demo) and returns its
/// stdout; fails on a non-zero exit or after 60 s. The binary is built by `cargo build
/// --all-targets` (scripts/test does), next to this test's `deps/` dir.
pub fn run_example(name: &str) -> String {
    run_example_with(name, &[])
}

/// [`run_example`] with command-line arguments.
pub fn run_example_with(name: &str, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(process::example_bin(name));
    cmd.args(args);
    let out = process::run(&mut cmd, Duration::from_secs(60), String::new);
    assert!(
        out.status.success(),
        "{name} example: {}\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}
