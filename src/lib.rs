//! # tower-x402
//!
//! Charge per request with [x402](https://x402.org) — HTTP 402 Payment Required as a
//! machine-to-machine payment handshake — in any [tower] server: axum, tonic, hyper.
//!
//! ## The flow
//!
//! 1. A request without payment gets **402** with a challenge: what to pay, to whom, on which
//!    chain, in which token. It carries both protocol dialects at once: the v2
//!    `PAYMENT-REQUIRED` header and the v1 JSON body, so v1 and v2 clients both pay.
//! 2. The client signs an EIP-3009 `TransferWithAuthorization` (EIP-712) and retries with
//!    `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1).
//! 3. The layer decodes it, matches it against the requirements this route offers **now**
//!    (never the client's copy), verifies it in-process ([`ExactEvmVerifier`]: one secp256k1
//!    recovery, tens of microseconds), and claims its nonce once in a [`NonceStore`].
//! 4. The handler runs with the [`VerifiedPayment`] in its request extensions (and, with the
//!    `axum` feature, as an extractor).
//! 5. A handler answer below 400 is settled by the [`Settler`](settle::Settler) and gets the
//!    `PAYMENT-RESPONSE` (v1: `X-PAYMENT-RESPONSE`) receipt; 400 and above releases the claim
//!    (nothing is charged, the proof may be retried) and gets no receipt.
//!
//! ## The three traits
//!
//! | trait | default | role |
//! |---|---|---|
//! | [`Verifier`] | [`ExactEvmVerifier`] | does the proof pay what is asked? |
//! | [`NonceStore`] | [`MemoryNonceStore`] | one proof, one use (atomic reservation) |
//! | [`Settler`](settle::Settler) | [`VerifyOnly`](settle::VerifyOnly) | move the money (verify-only moves none; receipts then carry an empty `transaction`) |
//!
//! ## Example
//!
//! ```
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower_x402::{Network, PaymentLayer};
//! use tower_x402::primitives::address;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let layer = PaymentLayer::builder()
//!     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
//!     .price("$0.001")
//!     .network(Network::BASE_SEPOLIA)
//!     .build()?;
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(|_req: Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("paid content"))))
//! }));
//! let res = svc.oneshot(Request::get("http://api.test/data").body(()).unwrap()).await?;
//! assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
//! assert!(res.headers().contains_key("payment-required"));
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Failure table
//!
//! See [`rejection`] for every status and reason the layer emits: 402 (pay, or pay again with
//! a reason), 400 (malformed proof), 431 (oversized header), 503 + `Retry-After` (a
//! dependency is down; the handler never runs on an unverified payment).
//!
//! ## Security model in brief
//!
//! Checked in-process: scheme, network, asset, recipient, exact amount, validity window (with
//! 6 s headroom and an upper bound of `maxTimeoutSeconds`), EIP-712 signature by `from` with
//! low `s` and `v ∈ {27, 28}`, one use per (chain, token, payer, nonce). Not checked without
//! a chain: the payer's balance and on-chain nonce state (a settler does that); smart-wallet
//! signatures are refused. Responses that went through payment get `Cache-Control: no-store`.
//!
//! ## Deployment caveats
//!
//! * Several instances must share a [`NonceStore`]; the in-memory one guards one process.
//! * `route_layer` in axum charges only matched routes (404s stay 404s); `layer` charges all.
//! * Browser clients need CORS: see [`PaymentLayerBuilder::expose_headers`].
//!
//! ## Features
//!
//! | feature | adds |
//! |---|---|
//! | `axum` | [`VerifiedPayment`] extractor |
//! | `client` | [`client::PayingLayer`]: pay 402 challenges from any tower HTTP client with an alloy `Signer` |
//! | `redis` | [`nonce::RedisNonceStore`]: one proof, one use across instances |
//! | `tonic` | [`grpc`]: refusals as trailers-only gRPC statuses, for tonic servers ([`PaymentLayer::grpc`]) |
//! | `facilitator` | [`facilitator::FacilitatorClient`]: verify and settle through a remote x402 facilitator (HTTP, rustls) |
//! | `onchain` | [`settle::onchain`]: settle with `transferWithAuthorization` through an alloy provider |
//! | `tracing` | a span per paid request (payer, amount, network, outcome, verify/settle timings) and events for refusals |
//! | `test-util` | [`test_util`]: sign payments with a local key for tests and demos |
//!
//! [tower]: https://docs.rs/tower
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod body;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
pub mod clock;
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
mod layer;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod network;
pub mod nonce;
pub mod price;
pub mod proto;
pub mod rejection;
mod response;
mod service;
pub mod settle;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod test_util;
pub mod verify;

pub use alloy_primitives as primitives;
pub use future::ResponseFuture;
pub use layer::{PaymentLayer, PaymentLayerBuilder, PaymentOption, PricingFn};
pub use network::{Asset, Network};
pub use nonce::{MemoryNonceStore, NonceStore};
pub use rejection::PaymentRejection;
pub use service::Payment;
pub use verify::{ExactEvmVerifier, VerifiedPayment, Verifier};

// The README's gRPC section needs the `tonic` feature (scripts/test runs with all features).
#[cfg(all(doctest, feature = "tonic"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
