//! [`PayingMiddleware`]: the paying client as a `reqwest-middleware` middleware.
//!
//! The middleware runs the very flow of [`PayingLayer`]: the same [`Policy`], [`Budget`],
//! [`RetryPolicy`](super::RetryPolicy), failure table and
//! [`PaymentReport`](super::PaymentReport). It adapts the rest of the middleware chain into a
//! tower service and hands it to that flow, so the two clients cannot drift apart.
//!
//! ```no_run
//! use reqwest_middleware::ClientBuilder;
//! use tower_x402::client::{Budget, PayingLayer, PayingMiddleware, PaymentReport, Policy, RetryPolicy};
//! use tower_x402::primitives::U256;
//! use tower_x402::Asset;
//!
//! # async fn agent() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let signer: alloy_signer_local::PrivateKeySigner = std::env::var("PAYER_KEY")?.parse()?;
//! let policy = Policy::new(U256::from(10_000))           // ≤ $0.01 per request
//!     .allow_asset(&Asset::usdc_base())
//!     .budget(Budget::new(U256::from(1_000_000)));        // ≤ $1 in total
//! // `PayingMiddleware::new(signer, policy)` for the defaults; a layer for the other settings.
//! let paying = PayingMiddleware::from(PayingLayer::new(signer, policy).retry(RetryPolicy::new()));
//! let client = ClientBuilder::new(reqwest::Client::new()).with(paying).build();
//! let res = client.get("https://api.example/weather").send().await?;
//! if let Some(paid) = res.extensions().get::<PaymentReport>() {
//!     println!("paid {} to {}: {:?}", paid.amount(), paid.requirements.pay_to, paid.outcome);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! ## Errors
//!
//! An error of the chain below the middleware (the reqwest transport, an inner middleware)
//! comes back unchanged when no proof was sent. Every other [`Error`] (policy refusal,
//! budget, signing, [`Error::OutcomeUnknown`] with its report) is a
//! [`reqwest_middleware::Error::Middleware`] that downcasts to [`Error`].
//!
//! ## Bodies
//!
//! A paid call sends the request again, so its body must be replayable: bytes, a string, JSON
//! or a form are. A streaming body (`reqwest::Body::wrap_stream`) cannot be sent twice: such
//! a request goes through unchanged and a 402 comes back to the caller unpaid.
//!
//! Each attempt gets a copy of the request's [`Extensions`], so values inner middlewares add
//! to them are not seen by the caller.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use alloy_signer::Signer;
use bytes::Bytes;
use http::Extensions;
use reqwest::{ResponseBuilderExt, Url};
use reqwest_middleware::{Middleware, Next};
use tower_service::Service;

use super::error::Error;
use super::flow;
use super::layer::{PayingLayer, Shared};
use super::policy::{Budget, Policy};

/// A `reqwest-middleware` middleware that pays x402 challenges. See the
/// [module docs](self) and, for what it does, the [client docs](super).
pub struct PayingMiddleware<Sg> {
    shared: Arc<Shared<Sg>>,
}

impl<Sg> Clone for PayingMiddleware<Sg> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<Sg> fmt::Debug for PayingMiddleware<Sg> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayingMiddleware")
            .field("policy", &self.shared.policy)
            .field("retry", &self.shared.retry)
            .finish_non_exhaustive()
    }
}

impl<Sg: Signer + Send + Sync + 'static> PayingMiddleware<Sg> {
    /// Pays with `signer` within `policy`, with the defaults of [`PayingLayer::new`]. For
    /// other retry rules, a clock, a balance check or one x402 version, configure a
    /// [`PayingLayer`] and convert it (`PayingMiddleware::from(layer)`).
    pub fn new(signer: Sg, policy: Policy) -> Self {
        PayingLayer::new(signer, policy).into()
    }

    /// The shared budget, to read what was spent.
    pub fn budget(&self) -> Option<&Budget> {
        self.shared.policy.shared_budget()
    }
}

impl<Sg> From<PayingLayer<Sg>> for PayingMiddleware<Sg> {
    fn from(layer: PayingLayer<Sg>) -> Self {
        Self {
            shared: Arc::new(layer.shared()),
        }
    }
}

#[async_trait::async_trait]
impl<Sg: Signer + Send + Sync + 'static> Middleware for PayingMiddleware<Sg> {
    async fn handle(
        &self,
        mut req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let Some(replay) = replayable(&mut req) else {
            // A streaming body cannot be sent twice: no payment, the answer as it comes.
            return next.run(req, extensions).await;
        };
        let svc = Chain {
            next,
            extensions: extensions.clone(),
        };
        match flow::run(self.shared.clone(), svc, replay).await {
            Ok(res) => {
                let (mut parts, body) = res.into_parts();
                // Keep the final URL (after redirects) that `reqwest::Response::url` reports.
                if let Some(FinalUrl(url)) = parts.extensions.remove::<FinalUrl>() {
                    let (with_url, ()) = http::Response::builder()
                        .url(url)
                        .body(())
                        .unwrap_or_default()
                        .into_parts();
                    parts.extensions.extend(with_url.extensions);
                }
                let body = reqwest::Body::wrap(body);
                Ok(http::Response::from_parts(parts, body).into())
            }
            Err(Error::Transport(e)) => Err(match e.downcast::<reqwest_middleware::Error>() {
                // The chain's own error, untouched: nothing was paid.
                Ok(inner) => *inner,
                Err(e) => reqwest_middleware::Error::middleware(Error::Transport(e)),
            }),
            Err(e) => Err(reqwest_middleware::Error::middleware(e)),
        }
    }
}

/// What a reqwest request keeps between attempts besides method, headers and version (in the
/// `http::Request` the flow clones): its URL, timeout and buffered body.
#[derive(Clone)]
struct Replay {
    url: Url,
    timeout: Option<Duration>,
    body: Option<Bytes>,
}

/// The request as the flow takes it (its headers moved out of `req`); `None`, `req`
/// untouched, when its body is a stream.
fn replayable(req: &mut reqwest::Request) -> Option<http::Request<Replay>> {
    let body = match req.body() {
        None => None,
        Some(b) => Some(Bytes::copy_from_slice(b.as_bytes()?)),
    };
    let replay = Replay {
        url: req.url().clone(),
        timeout: req.timeout().copied(),
        body,
    };
    let mut out = http::Request::new(replay);
    *out.method_mut() = req.method().clone();
    *out.version_mut() = req.version();
    *out.headers_mut() = std::mem::take(req.headers_mut());
    Some(out)
}

/// The final URL of an attempt's response, carried through the flow.
#[derive(Clone)]
struct FinalUrl(Url);

/// The rest of the middleware chain as a tower service, for the shared flow.
struct Chain<'a> {
    next: Next<'a>,
    extensions: Extensions,
}

type ChainFuture<'a> = Pin<
    Box<dyn Future<Output = reqwest_middleware::Result<http::Response<reqwest::Body>>> + Send + 'a>,
>;

impl<'a> Service<http::Request<Replay>> for Chain<'a> {
    type Response = http::Response<reqwest::Body>;
    type Error = reqwest_middleware::Error;
    type Future = ChainFuture<'a>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Replay>) -> Self::Future {
        let next = self.next.clone();
        let mut extensions = self.extensions.clone();
        let (parts, replay) = req.into_parts();
        let mut out = reqwest::Request::new(parts.method, replay.url);
        *out.headers_mut() = parts.headers;
        *out.version_mut() = parts.version;
        *out.timeout_mut() = replay.timeout;
        *out.body_mut() = replay.body.map(reqwest::Body::from);
        Box::pin(async move {
            let res = next.run(out, &mut extensions).await?;
            let url = FinalUrl(res.url().clone());
            let mut res = http::Response::from(res);
            res.extensions_mut().insert(url);
            Ok(res)
        })
    }
}
