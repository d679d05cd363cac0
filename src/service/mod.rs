//! [`Payment`]: the middleware service. The request is read here (price, payment header,
//! sign-in); the paid flow's stages are in `flow` (up to verification and idempotency) and
//! `settle` (from the claim on), the proof's fate in `claim`, the header and option choice in
//! `decode`, idempotent retries in `idempotent`, prepaid calls in `prepaid`, payment channels
//! (`batch-settlement`) in `channel`, spans in `trace`.

mod channel;
mod claim;
mod decode;
mod flow;
mod idempotent;
mod prepaid;
mod settle;
mod trace;

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use self::decode::decode;
use self::flow::{Flow, paid};
use self::prepaid::signed_in;
use crate::body::ResponseBody;
use crate::config::{Pricing, Shared};
use crate::future::ResponseFuture;
use crate::hooks::Stage;
use crate::option::PaymentOption;
use crate::prepaid::siwx::SIGN_IN_WITH_X;
use crate::rejection::Rejection;
use crate::response;

/// The service made by [`PaymentLayer`](crate::PaymentLayer). See the [crate docs](crate).
#[derive(Clone)]
pub struct Payment<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Payment<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payment").finish_non_exhaustive()
    }
}

impl<S> Payment<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Payment<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let options = match &self.shared.pricing {
            Pricing::Static(options) => options.clone(),
            Pricing::Dynamic(price) => {
                let (parts, body) = req.into_parts();
                match price(&parts) {
                    Some(options) => return self.charge(Request::from_parts(parts, body), options),
                    None => {
                        return ResponseFuture::free(
                            self.inner.call(Request::from_parts(parts, body)),
                        );
                    }
                }
            }
        };
        self.charge(req, options)
    }
}

impl<S> Payment<S> {
    fn charge<ReqB, ResB>(
        &mut self,
        req: Request<ReqB>,
        options: Arc<[PaymentOption]>,
    ) -> ResponseFuture<S::Future, ResB, S::Error>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqB: Send + 'static,
        ResB: Body<Data = Bytes> + Send + 'static,
    {
        let shared = self.shared.clone();
        let (parts, body) = req.into_parts();
        let rejection = match decode(&shared, &parts.headers) {
            Ok(Some(payload)) if payload.scheme() == crate::channel::SCHEME => {
                // A channel: its engine in place of verify → claim → settle.
                let flow =
                    channel::channel(shared, self.take_ready(), parts, body, options, payload);
                return ResponseFuture::paid(trace::boxed(Box::pin(flow)));
            }
            Ok(Some(payload)) => {
                // Boxed before the span wraps it: the flow is ~6 KiB, and each move by value
                // is a memcpy (five of them cost 16k instructions per request).
                let flow = Box::pin(paid(
                    shared,
                    self.take_ready(),
                    parts,
                    body,
                    options,
                    payload,
                ));
                return ResponseFuture::paid(trace::boxed(flow));
            }
            Ok(None) if shared.prepaid.is_some() && parts.headers.contains_key(SIGN_IN_WITH_X) => {
                let flow = signed_in(shared, self.take_ready(), parts, body, options);
                return ResponseFuture::paid(Box::pin(trace::instrument(flow)));
            }
            Ok(None) => None,
            Err(rejection) => Some(rejection),
        };
        refuse(shared, parts, &options, rejection)
    }

    /// The readied instance goes into the future; the clone waits for the next `poll_ready`.
    fn take_ready(&mut self) -> S
    where
        S: Clone,
    {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

/// No payment to run on: the 402 challenge (or, to a browser, the paywall page), or the header
/// decode's refusal, with the hooks told.
fn refuse<F, ResB, E>(
    shared: Arc<Shared>,
    parts: http::request::Parts,
    options: &Arc<[PaymentOption]>,
    rejection: Option<Rejection>,
) -> ResponseFuture<F, ResB, E>
where
    ResB: Body<Data = Bytes> + Send + 'static,
    E: Send + 'static,
{
    let resource = response::Resource::of(&parts);
    let challenge = rejection.is_none();
    let rejection = rejection.unwrap_or(Rejection::Pay { reason: None });
    let res = response::reject(&shared, options, &resource, rejection);
    #[cfg(feature = "paywall")]
    let res = match &shared.paywall {
        Some(page) if challenge && crate::paywall::is_browser(&parts.headers) => {
            response::paywall(&shared, page, options, &resource, res)
        }
        _ => res,
    };
    if shared.hooks.is_empty() {
        return ResponseFuture::ready(res);
    }
    // Hooks are async: only layers that have some pay for boxing the refusal.
    let options = options.clone();
    ResponseFuture::paid(Box::pin(async move {
        let flow = Flow::new(&shared, &options, resource, parts.method);
        if challenge {
            for hook in shared.hooks.iter() {
                hook.on_challenge(&flow.method, flow.resource.uri()).await;
            }
        } else {
            flow.failed(Stage::Decode, &res, None, None).await;
        }
        Ok(res)
    }))
}
