//! # tower-x402
//!
//! Charge per request with [x402](https://x402.org) — HTTP 402 Payment Required as a
//! machine-to-machine payment handshake — in any [tower] server: axum, tonic, hyper. A client
//! (often an agent) pays each call with a signed EIP-3009 USDC authorization: no account, no
//! API key, no checkout.
//!
//! ## The flow
//!
//! ```text
//!  client                                   PaymentLayer                         handler
//!    │ GET /weather ───────────────────────────▶│
//!    │◀── 402 + challenge (what, to whom, where) │  1. challenge
//!    │ sign EIP-3009 authorization               │  2. pay
//!    │ GET /weather + PAYMENT-SIGNATURE ────────▶│  3. verify (in-process, ~50 µs)
//!    │                                           │  4. claim the nonce (once, atomically)
//!    │                                           │── 5. request + VerifiedPayment ──▶│
//!    │                                           │◀───────────── response ───────────│
//!    │                                           │  6. settle (if the handler said < 400)
//!    │◀── response + PAYMENT-RESPONSE receipt ───│  7. receipt
//! ```
//!
//! 1. **Challenge.** A request without payment gets **402**: what to pay, to whom, on which
//!    chain, in which token. It carries both protocol dialects: the v2 `PAYMENT-REQUIRED`
//!    header and the v1 JSON body, so v1 and v2 clients both pay.
//! 2. **Pay.** The client signs an EIP-3009 `TransferWithAuthorization` (EIP-712) and retries
//!    with `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1).
//! 3. **Verify.** The layer decodes the proof, matches it against the requirements this route
//!    offers **now** (never the client's copy) and verifies it with the [`Verifier`]
//!    (default [`EvmVerifier`]: in-process, one secp256k1 recovery).
//! 4. **Claim.** The proof's nonce is reserved once in the [`NonceStore`]: a replay, or a
//!    concurrent copy, is refused and never reaches the handler.
//! 5. **Handler.** Your handler runs with the [`VerifiedPayment`] in its request extensions
//!    (and, with the `axum` feature, as an extractor).
//! 6. **Settle.** A handler answer below 400 is settled by the [`Settler`](settle::Settler);
//!    400 and above releases the claim (nothing is charged, the proof may be retried).
//!    [`SettlementMode::BeforeHandler`](settle::SettlementMode::BeforeHandler) settles first,
//!    for streaming responses.
//! 7. **Receipt.** The response gets `PAYMENT-RESPONSE` (v1: `X-PAYMENT-RESPONSE`): payer,
//!    network, transaction.
//!
//! ## The three traits, and hooks
//!
//! | trait | default | role | others |
//! |---|---|---|---|
//! | [`Verifier`] | [`EvmVerifier`] (`exact` + `upto`) | does the proof pay what is asked? | `FacilitatorClient` (`facilitator`) |
//! | [`NonceStore`] | [`MemoryNonceStore`] | one proof, one use (atomic reservation) | `RedisNonceStore` (`redis`) for several instances |
//! | [`Settler`](settle::Settler) | [`VerifyOnly`](settle::VerifyOnly) | move the money (verify-only moves none; receipts then carry an empty `transaction`) | `OnchainSettler` (`onchain`), `FacilitatorClient` (`facilitator`) |
//!
//! ## Pricing models
//!
//! | model | how | on-chain transactions | pick it when |
//! |---|---|---|---|
//! | pay per call (`exact`) | [`PaymentLayerBuilder::price`] | one per call (or per batch with `deferred`) | calls are worth well above the gas (≳ $0.01 on Base-like fees) |
//! | metered (`upto`) | [`PaymentOption::upto`], the handler charges a [`upto::Usage`] | one per call, for what was used (none when nothing was) | the cost is known only afterwards (tokens, bytes, rows) |
//! | prepaid bundle | [`PaymentLayerBuilder::prepaid`] ([`prepaid`]) | one per bundle of N calls | many small calls by the same payer: the gas per call is divided by N |
//!
//! The README's "Unit economics" section has the measured gas and latency of each.
//!
//! [`PaymentHooks`](hooks::PaymentHooks) observe or steer each payment: `on_challenge`,
//! `before_verify`, `after_verify` (may refuse, e.g. a per-payer limit), `after_settle`,
//! `on_failure`. Add them with [`PaymentLayerBuilder::hook`]; `PaymentMetrics` (`metrics`)
//! is one.
//!
//! ## Example
//!
//! A paid axum route, an unpaid request (402) and a paid one (200 with a receipt):
//!
//! ```
//! use axum::{Extension, Router, body::Body, routing::get};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_x402::primitives::address;
//! use tower_x402::{Network, PaymentLayer, VerifiedPayment};
//!
//! async fn weather(Extension(payment): Extension<VerifiedPayment>) -> String {
//!     format!("sunny; {} paid {} units", payment.payer, payment.amount)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let paywall = PaymentLayer::builder()
//!     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
//!     .price("$0.001") // exact decimal: 1000 atomic units of USDC
//!     .network(Network::BASE_SEPOLIA) // USDC preset: address, EIP-712 domain, decimals
//!     .build()?;
//! let app = Router::new()
//!     .route("/weather", get(weather))
//!     .route_layer(paywall) // charges matched routes only: a 404 stays a 404
//!     .route("/", get(|| async { "free" }));
//!
//! // 1. No payment: 402 and a challenge.
//! let res = app.clone().oneshot(Request::get("/weather").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
//! let challenge = tower_x402::proto::header::decode_bytes(&res.headers()["payment-required"], 64 * 1024)?;
//! let challenge: tower_x402::proto::v2::PaymentRequired = serde_json::from_slice(&challenge)?;
//!
//! // 2. Pay (here with the public test key of `test_util`; a client signs with any alloy
//! //    `Signer`, see `client::PayingLayer`) and retry.
//! # #[cfg(feature = "test-util")] {
//! use tower_x402::{proto::X402Version, test_util};
//! let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
//! let (name, value) = test_util::pay(&test_util::demo_payer(), &challenge.accepts[0], now, X402Version::V2);
//! let paid = Request::get("/weather").header(name, value).body(Body::empty())?;
//! let res = app.oneshot(paid).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! assert!(res.headers().contains_key("payment-response")); // the receipt
//! # }
//! # Ok(())
//! # }
//! ```
//!
//! ## Failures
//!
//! The layer answers in place of the handler with 402 (pay, or pay again: the challenge says
//! why), 400 (malformed proof), 431 (oversized header), 429 or 503 with `Retry-After` (a
//! dependency rate-limits or is down: retry the **same** proof; the handler never runs on an
//! unverified payment), or a hook's own response. The [`rejection`] module docs list every
//! status, reason code and `Retry-After` in one table, which `tests/catalogue.rs` checks
//! against the code.
//!
//! ## Security model in brief
//!
//! Checked in-process: scheme, network, asset, recipient, exact amount, validity window (with
//! 6 s headroom and an upper bound of `maxTimeoutSeconds`), EIP-712 signature by `from` with
//! low `s` and `v ∈ {27, 28}`, one use per (chain, token, payer, nonce). Not checked without
//! a chain: the payer's balance and on-chain nonce state (a settler's `check` does that);
//! smart-wallet signatures are refused. Hostile headers and backend replies are size-capped
//! and parsed into types, never panicked on. Responses that went through payment get
//! `Cache-Control: no-store`.
//!
//! ## Deployment caveats
//!
//! * Several instances must share a [`NonceStore`]; the in-memory one guards one process.
//! * The default settler is verify-only: it moves no money. Use an on-chain or facilitator
//!   settler to get paid.
//! * `route_layer` in axum charges only matched routes (404s stay 404s); `layer` charges all.
//! * Browser clients need CORS: see [`PaymentLayerBuilder::expose_headers`].
//!
//! ## Features
//!
//! The default build is the layer, the wire format, the in-process verifier and the memory
//! nonce store: no async runtime, no network client.
//!
//! | feature | adds |
//! |---|---|
//! | `axum` | [`VerifiedPayment`] and [`upto::Usage`] extractors |
//! | `client` | [`client::PayingLayer`]: pay 402 challenges from any tower HTTP client with an alloy `Signer` |
//! | `reqwest` | [`client::PayingMiddleware`]: the same paying client as a `reqwest-middleware` middleware (implies `client`) |
//! | `redis` | [`nonce::RedisNonceStore`]: one proof, one use across instances; `RedisIdempotencyStore` and [`prepaid::RedisCreditLedger`] for idempotent retries and prepaid credit across instances |
//! | `postgres` | `nonce::PostgresNonceStore`, `idempotency::PostgresIdempotencyStore` and `prepaid::PostgresCreditLedger`: the same across instances in PostgreSQL (tokio-postgres + deadpool-postgres) |
//! | `tonic` | [`grpc`]: refusals as trailers-only gRPC statuses, for tonic servers ([`PaymentLayer::grpc`]) |
//! | `facilitator` | [`facilitator::FacilitatorClient`]: verify and settle through a remote x402 facilitator (HTTP, rustls) |
//! | `onchain` | [`settle::onchain`]: settle with `transferWithAuthorization` (and `upto` through the x402 Permit2 proxy) with an alloy provider; [`prepaid::wallets::ProviderSignatures`] for smart-wallet sign-ins; smart-wallet `exact` payments checked and settled on the settler's chain ([`verify::EvmVerifier::with_contract_signatures`]) |
//! | `deferred` | [`settle::deferred`]: journal payments durably, answer at once, settle later in batches |
//! | `metrics` | [`metrics::PaymentMetrics`]: counters and latency histograms through the `metrics` facade |
//! | `tracing` | a span per paid request (payer, amount, network, outcome, verify/settle timings) and events for refusals |
//! | `test-util` | [`test_util`]: sign payments with a local key for tests and demos |
//!
//! MSRV: Rust 1.94.1. Examples: `examples/README.md` in the repository.
//!
//! [tower]: https://docs.rs/tower
// Items of a feature that is off link to docs.rs (with it on, the intra-doc links resolve).
#![cfg_attr(
    not(feature = "client"),
    doc = "[`client::PayingLayer`]: https://docs.rs/tower-x402/latest/tower_x402/client/struct.PayingLayer.html"
)]
#![cfg_attr(
    not(feature = "reqwest"),
    doc = "[`client::PayingMiddleware`]: https://docs.rs/tower-x402/latest/tower_x402/client/middleware/struct.PayingMiddleware.html"
)]
#![cfg_attr(
    not(feature = "redis"),
    doc = "[`nonce::RedisNonceStore`]: https://docs.rs/tower-x402/latest/tower_x402/nonce/struct.RedisNonceStore.html"
)]
#![cfg_attr(
    not(feature = "redis"),
    doc = "[`prepaid::RedisCreditLedger`]: https://docs.rs/tower-x402/latest/tower_x402/prepaid/struct.RedisCreditLedger.html"
)]
#![cfg_attr(
    not(feature = "tonic"),
    doc = "[`grpc`]: https://docs.rs/tower-x402/latest/tower_x402/grpc/index.html"
)]
#![cfg_attr(
    not(feature = "tonic"),
    doc = "[`PaymentLayer::grpc`]: https://docs.rs/tower-x402/latest/tower_x402/struct.PaymentLayer.html#method.grpc"
)]
#![cfg_attr(
    not(feature = "facilitator"),
    doc = "[`facilitator::FacilitatorClient`]: https://docs.rs/tower-x402/latest/tower_x402/facilitator/struct.FacilitatorClient.html"
)]
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[`settle::onchain`]: https://docs.rs/tower-x402/latest/tower_x402/settle/onchain/index.html"
)]
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[`prepaid::wallets::ProviderSignatures`]: https://docs.rs/tower-x402/latest/tower_x402/prepaid/wallets/struct.ProviderSignatures.html"
)]
#![cfg_attr(
    not(feature = "deferred"),
    doc = "[`settle::deferred`]: https://docs.rs/tower-x402/latest/tower_x402/settle/deferred/index.html"
)]
#![cfg_attr(
    not(feature = "metrics"),
    doc = "[`metrics::PaymentMetrics`]: https://docs.rs/tower-x402/latest/tower_x402/metrics/struct.PaymentMetrics.html"
)]
#![cfg_attr(
    not(feature = "test-util"),
    doc = "[`test_util`]: https://docs.rs/tower-x402/latest/tower_x402/test_util/index.html"
)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

#[macro_use]
mod macros;

pub mod alert;
pub mod body;
pub mod challenge;
// Payment channels (`batch-settlement`, issue #19): its own block, kept small for merges.
pub mod channel;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
pub mod clock;
mod config;
pub mod discovery;
pub mod error;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod extract;
#[cfg(feature = "facilitator")]
#[cfg_attr(docsrs, doc(cfg(feature = "facilitator")))]
pub mod facilitator;
mod future;
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub mod grpc;
pub mod hooks;
pub mod idempotency;
mod kept;
mod layer;
#[cfg(feature = "mcp")]
#[cfg_attr(docsrs, doc(cfg(feature = "mcp")))]
pub mod mcp;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod network;
pub mod nonce;
mod option;
#[cfg(feature = "paywall")]
#[cfg_attr(docsrs, doc(cfg(feature = "paywall")))]
pub mod paywall;
pub mod prepaid;
pub mod price;
pub mod proto;
pub mod reason;
pub mod rejection;
mod response;
#[cfg(any(feature = "client", feature = "facilitator"))]
mod retry_after;
mod service;
pub mod settle;
pub mod store;
#[cfg(feature = "svm")]
#[cfg_attr(docsrs, doc(cfg(feature = "svm")))]
pub mod svm;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod test_util;
pub mod upto;
pub mod verify;

pub use alloy_primitives as primitives;
/// Re-exported for implementing [`Verifier`], [`NonceStore`], [`settle::Settler`] and the
/// other async traits: `#[tower_x402::async_trait]`.
pub use async_trait::async_trait;
pub use challenge::ChallengeKeys;
pub use future::ResponseFuture;
pub use layer::{PaymentLayer, PaymentLayerBuilder, PaymentOption, PricingFn, ResourceCheck};
pub use network::{Asset, Network};
pub use nonce::{MemoryNonceStore, NonceStore};
pub use rejection::PaymentRejection;
pub use service::Payment;
pub use verify::{EvmVerifier, ExactEvmVerifier, Proof, VerifiedPayment, Verifier};

// The README's gRPC section needs tonic's server (`dev-heavy`; scripts/test runs with all features).
#[cfg(all(doctest, feature = "dev-heavy"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

// docs/DEPLOYING.md's example compiles too (docs/ is not packaged; doctests only).
#[cfg(all(doctest, feature = "redis"))]
#[doc = include_str!("../docs/DEPLOYING.md")]
struct DeployingDoctests;
