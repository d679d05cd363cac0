//! Lifecycle hooks: accounting, logging and custom policy around each payment.
//!
//! Add any number of [`PaymentHooks`] with
//! [`PaymentLayerBuilder::hook`](crate::layer::PaymentLayerBuilder::hook); they run in the
//! order added. Every method has a default that does nothing, so a hook implements only what
//! it needs:
//!
//! | method | when | may refuse |
//! |---|---|---|
//! | [`on_challenge`](PaymentHooks::on_challenge) | a 402 challenge is sent to a request without payment | no |
//! | [`before_verify`](PaymentHooks::before_verify) | a payment header was decoded, before its signature is checked | yes |
//! | [`after_verify`](PaymentHooks::after_verify) | the proof verified, before its nonce is claimed | yes |
//! | [`after_settle`](PaymentHooks::after_settle) | the money moved (or was accepted for settlement) | no |
//! | [`on_failure`](PaymentHooks::on_failure) | the layer answered in place of the handler (400/402/429/431/503, a hook's refusal) | no |
//!
//! A refusal is a whole response (`http::Response<Bytes>`), sent as is with
//! `Cache-Control: no-store`; the handler does not run and nothing is claimed or settled.
//! Hooks run inside the request: keep them quick, and spawn slow work (writing to a remote
//! ledger) rather than awaiting it when the answer does not depend on it.
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::Duration;
//! use bytes::Bytes;
//! use tower_x402::hooks::{PaymentHooks, PaymentRequest};
//! use tower_x402::primitives::Address;
//! use tower_x402::VerifiedPayment;
//!
//! /// At most `limit` paid calls per payer (a per-payer policy).
//! struct PerPayerLimit {
//!     limit: u32,
//!     calls: Mutex<HashMap<Address, u32>>,
//! }
//!
//! #[async_trait::async_trait]
//! impl PaymentHooks for PerPayerLimit {
//!     async fn after_verify(
//!         &self,
//!         payment: &VerifiedPayment,
//!         _elapsed: Duration,
//!     ) -> Result<(), http::Response<Bytes>> {
//!         let mut calls = self.calls.lock().unwrap();
//!         let n = calls.entry(payment.payer).or_default();
//!         if *n >= self.limit {
//!             return Err(http::Response::builder()
//!                 .status(429)
//!                 .header("retry-after", "60")
//!                 .body(Bytes::from_static(b"{\"error\":\"payer_limit\"}"))
//!                 .unwrap());
//!         }
//!         *n += 1;
//!         Ok(())
//!     }
//! }
//! ```

use std::error::Error as StdError;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, Method, Response, Uri};

use crate::proto::PaymentPayload;
use crate::rejection::PaymentRejection;
use crate::settle::Settlement;
use crate::verify::VerifiedPayment;

/// A hook's refusal: the response sent in place of the handler's.
pub type HookResponse = Response<Bytes>;

/// A request that carries a payment, as [`PaymentHooks::before_verify`] sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct PaymentRequest<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The request URI.
    pub uri: &'a Uri,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The decoded (not yet verified) payment: nothing in it is proven yet.
    pub payload: &'a PaymentPayload,
}

/// Where in the flow a payment failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// The payment header could not be read (400/431), or there was none and a challenge with
    /// a reason was sent.
    Decode,
    /// The route does not offer what the payload pays for.
    Select,
    /// Verification refused the proof or its backend failed.
    Verify,
    /// A hook refused the request.
    Hook,
    /// The nonce store refused the proof (replay) or failed.
    Reserve,
    /// The settler's pre-check (balance, nonce unused on-chain) refused or failed.
    Check,
    /// Settlement refused, failed or has an unknown outcome.
    Settle,
    /// Too many verifications in flight.
    Overload,
}

/// A payment the layer refused or could not complete, as [`PaymentHooks::on_failure`] sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct PaymentFailure<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The request URI.
    pub uri: &'a Uri,
    /// Where it failed.
    pub stage: Stage,
    /// What was sent: status, reason, `Retry-After`.
    pub rejection: &'a PaymentRejection,
    /// The verified payment, when the failure came after verification.
    pub payment: Option<&'a VerifiedPayment>,
    /// The underlying error, when there is one (for logs; never sent to clients).
    pub error: Option<&'a (dyn StdError + Send + Sync)>,
}

/// Callbacks around each payment. See the [module docs](self).
#[async_trait]
pub trait PaymentHooks: Send + Sync + 'static {
    /// A 402 challenge was sent to a request that carried no payment.
    async fn on_challenge(&self, _method: &Method, _uri: &Uri) {}

    /// A payment header was decoded; its signature is not checked yet. `Err` answers with
    /// that response and stops the flow.
    async fn before_verify(&self, _request: &PaymentRequest<'_>) -> Result<(), HookResponse> {
        Ok(())
    }

    /// The proof verified in `elapsed`; its nonce is not claimed yet. `Err` answers with that
    /// response and stops the flow (e.g. a per-payer limit).
    async fn after_verify(
        &self,
        _payment: &VerifiedPayment,
        _elapsed: Duration,
    ) -> Result<(), HookResponse> {
        Ok(())
    }

    /// The payment was settled in `elapsed` (or accepted for later settlement: see the
    /// settler in use). Called once per paid request that was served.
    async fn after_settle(
        &self,
        _payment: &VerifiedPayment,
        _settlement: &Settlement,
        _elapsed: Duration,
    ) {
    }

    /// The layer answered in place of the handler.
    async fn on_failure(&self, _failure: &PaymentFailure<'_>) {}
}
