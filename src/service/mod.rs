//! [`Payment`]: the middleware service. The request is read here (price, payment header,
//! sign-in); the paid flow is in `flow`, its idempotent retries in `idempotent`, prepaid calls
//! in `prepaid`, and spans in `trace`.

mod flow;
mod idempotent;
mod prepaid;
mod trace;

use flow::*;
use idempotent::*;
use prepaid::*;

use std::error::Error as StdError;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::challenge::Binding;
use crate::future::ResponseFuture;
use crate::hooks::{HookResponse, PaymentFailure, PaymentRequest, Stage};
use crate::idempotency::{
    self, Begin, ClaimToken, Fingerprint, IdempotencyKey, IdempotentReplay, PaymentId,
    StoredResponse,
};
use crate::layer::{Idempotency, PaymentOption, Pricing, Shared};
use crate::nonce::Reservation;
use crate::prepaid::siwx::SIGN_IN_WITH_X;
use crate::prepaid::{Refusal, SignedIn};
use crate::proto::exact::ExactEvmPayload;
use crate::proto::header;
use crate::proto::{PaymentPayload, SettleResponse};
use crate::rejection::{PaymentRejection, Rejection, reason};
use crate::response;
use crate::settle::{SettleError, Settlement, SettlementMode};
use crate::upto::Usage;
use crate::verify::{VerifiedPayment, VerifyError};

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
            Ok(Some(payload)) => {
                // The readied instance goes into the future; the clone waits for the next
                // poll_ready.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                // Boxed before the span wraps it: the flow is ~6 KiB, and each move by value
                // is a memcpy (five of them cost 16k instructions per request).
                let flow = Box::pin(paid(shared, inner, parts, body, options, payload));
                return ResponseFuture::paid(Box::pin(trace::instrument(flow)));
            }
            Ok(None) if shared.prepaid.is_some() && parts.headers.contains_key(SIGN_IN_WITH_X) => {
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                let flow = signed_in(shared, inner, parts, body, options);
                return ResponseFuture::paid(Box::pin(trace::instrument(flow)));
            }
            Ok(None) => None,
            Err(rejection) => Some(rejection),
        };
        let resource = response::Resource::of(&parts);
        let challenge = rejection.is_none();
        let rejection = rejection.unwrap_or(Rejection::Pay { reason: None });
        let res = response::reject(&shared, &options, &resource, rejection);
        if shared.hooks.is_empty() {
            return ResponseFuture::ready(res);
        }
        // Hooks are async: only layers that have some pay for boxing the refusal.
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
}

/// Reads the payment header: `Ok(None)` when there is none.
fn decode(shared: &Shared, headers: &HeaderMap) -> Result<Option<PaymentPayload>, Rejection> {
    let limits = header::Limits {
        max_bytes: shared.max_header_bytes,
        v1: shared.accept_v1,
        v2: shared.accept_v2,
    };
    Ok(header::decode_payload(headers, limits)?)
}

/// The server's own options the payload may pay for, best first. The client's `accepted`
/// copy only picks them: verification runs against the server's requirements. With bound
/// challenges, a v2 `accepted` must also carry a valid challenge id for this request.
fn select<'a>(
    shared: &Shared,
    options: &'a [PaymentOption],
    payload: &PaymentPayload,
    resource: &response::Resource,
) -> Result<Vec<&'a PaymentOption>, Rejection> {
    let pay = |reason| Rejection::Pay {
        reason: Some(reason),
    };
    let same_scheme = |o: &&PaymentOption| o.requirements().scheme == payload.scheme();
    if !options.iter().any(|o| same_scheme(&o)) {
        return Err(pay(reason::UNSUPPORTED_SCHEME));
    }
    let on_network =
        |o: &&PaymentOption| same_scheme(o) && o.requirements().network == payload.network();
    let mut candidates: Vec<_> = options.iter().filter(on_network).collect();
    if candidates.is_empty() {
        return Err(pay(reason::INVALID_NETWORK));
    }
    match payload {
        PaymentPayload::V2(p) => {
            let a = &p.accepted;
            candidates.retain(|o| {
                let r = o.requirements();
                r.asset == a.asset && r.pay_to == a.pay_to && r.amount == a.amount
            });
            if candidates.is_empty() {
                return Err(pay(reason::INVALID_PAYMENT_REQUIREMENTS));
            }
            if let (Some(keys), Some(first)) = (&shared.challenges, candidates.first()) {
                // The candidates agree on everything the id binds (scheme, network, asset,
                // payTo, amount): one check covers them all.
                let binding = Binding {
                    url: &resource.url(shared),
                    method: resource.method.as_str(),
                    requirements: first.requirements(),
                };
                keys.check_echo(a, &binding).map_err(|e| pay(e.reason()))?;
            }
        }
        // v1 echoes only scheme and network: narrow by what the authorization pays. Options
        // that differ only by token are told apart by the signature's domain (verify each).
        // If none matches, the first one's verification gives the precise reason.
        PaymentPayload::V1(p) => {
            if let Ok(exact) = serde_json::from_str::<ExactEvmPayload>(p.payload.get()) {
                let a = &exact.authorization;
                let paying: Vec<_> = candidates
                    .iter()
                    .copied()
                    .filter(|o| {
                        o.requirements().pay_to == a.to && o.requirements().amount == a.value
                    })
                    .collect();
                if !paying.is_empty() {
                    candidates = paying;
                }
            }
            candidates.truncate(MAX_V1_CANDIDATES);
        }
    }
    Ok(candidates)
}

/// Bound on signature checks one v1 proof can cost.
const MAX_V1_CANDIDATES: usize = 4;
