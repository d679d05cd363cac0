//! The paid flow, one named stage at a time:
//!
//! ```text
//! decode (mod.rs) → before_verify → select → payment id → verify → after_verify
//!   → idempotency begin → claim → check → settle-first | run → settle-after | metered
//!   → idempotency end
//! ```
//!
//! Each stage returns `Result<T, Answer>`: the `Err` is the response the layer sends in place
//! of the handler (a refusal, or an idempotent replay), and the pipeline stops there. The
//! stages from the claim on are in `settle.rs`; the proof's fate is decided in `claim.rs`.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Response};
use http_body::Body;
use tower_service::Service;

use super::decode::select;
use super::idempotent::{self, IdemClaim};
use super::settle::serve;
use super::trace;
use crate::body::ResponseBody;
use crate::config::Shared;
use crate::hooks::{HookResponse, PaymentFailure, PaymentRequest, Stage};
use crate::option::PaymentOption;
use crate::proto::PaymentPayload;
use crate::rejection::{self, PaymentRejection, Rejection, reason};
use crate::response::{self, Resource};
use crate::verify::VerifiedPayment;

/// What the layer sends in place of (or around) the handler's answer.
pub(super) type Answer<B> = Response<ResponseBody<B>>;

/// The value of an `Ok`, or the stage's answer returned at once.
macro_rules! stage {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(answer) => return Ok(answer),
        }
    };
}
pub(super) use stage;

/// What the paid flow needs to answer a refusal and tell the hooks.
pub(super) struct Flow<'a> {
    pub(super) shared: &'a Shared,
    pub(super) options: &'a [PaymentOption],
    pub(super) resource: Resource,
    pub(super) method: Method,
}

/// The paid flow of a request that carries a payment header.
pub(super) async fn paid<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    parts: Parts,
    body: ReqB,
    options: Arc<[PaymentOption]>,
    payload: PaymentPayload,
) -> Result<Answer<ResB>, S::Error>
where
    S: Service<http::Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send,
{
    let flow = Flow::new(
        &shared,
        &options,
        Resource::of(&parts),
        parts.method.clone(),
    );
    stage!(flow.before_verify(&parts, &payload).await);
    let candidates = stage!(flow.select(&payload).await);
    let requested = stage!(flow.payment_id(&payload).await);
    let verified = stage!(flow.verify(&payload, candidates).await);
    let idem = stage!(flow.begin_idempotent(requested, &verified, &parts).await);
    let out = serve(&flow, inner, parts, body, &verified).await;
    match (idem, out) {
        (Some(claim), Ok(out)) => Ok(claim.end(&flow, out).await),
        (Some(claim), Err((e, spent))) => {
            claim.failed(spent).await;
            Err(e)
        }
        (None, out) => out.map(|(res, _)| res).map_err(|(e, _)| e),
    }
}

impl<'a> Flow<'a> {
    pub(super) fn new(
        shared: &'a Shared,
        options: &'a [PaymentOption],
        resource: Resource,
        method: Method,
    ) -> Self {
        Self {
            shared,
            options,
            resource,
            method,
        }
    }

    /// Hooks that may refuse a decoded payment before its signature is checked.
    pub(super) async fn before_verify<B: Send>(
        &self,
        parts: &Parts,
        payload: &PaymentPayload,
    ) -> Result<(), Answer<B>> {
        for hook in self.shared.hooks.iter() {
            let request = PaymentRequest {
                method: &parts.method,
                uri: &parts.uri,
                headers: &parts.headers,
                payload,
            };
            if let Err(res) = hook.before_verify(&request).await {
                return Err(self.hook_refused(res, None).await);
            }
        }
        Ok(())
    }

    /// The route's options this payload may pay, best first.
    pub(super) async fn select<B: Send>(
        &self,
        payload: &PaymentPayload,
    ) -> Result<Vec<&'a PaymentOption>, Answer<B>> {
        match select(self.shared, self.options, payload, &self.resource) {
            Ok(candidates) => Ok(candidates),
            Err(r) => Err(self.reject(Stage::Select, r, None, None).await),
        }
    }

    /// The `payment-identifier` the payload claims, when the layer does idempotency.
    async fn payment_id<B: Send>(
        &self,
        payload: &PaymentPayload,
    ) -> Result<Option<crate::idempotency::PaymentId>, Answer<B>> {
        match idempotent::requested_id(self.shared, payload) {
            Ok(id) => Ok(id),
            Err(r) => Err(self.reject(Stage::Decode, r, None, None).await),
        }
    }

    /// Verifies the payload against the candidates (under the concurrency cap), then asks the
    /// `after_verify` hooks.
    async fn verify<B: Send>(
        &self,
        payload: &PaymentPayload,
        candidates: Vec<&PaymentOption>,
    ) -> Result<VerifiedPayment, Answer<B>> {
        let shared = self.shared;
        let started = Instant::now();
        // Held while verifying: a cap on the CPU (or facilitator calls) one burst can take.
        let permit = match &shared.inflight {
            Some(inflight) => match inflight.try_acquire() {
                Some(permit) => Some(permit),
                None => {
                    let overloaded = Rejection::Unavailable {
                        retry_after: shared.retry_after,
                        reason: reason::OVERLOADED,
                    };
                    return Err(self.reject(Stage::Overload, overloaded, None, None).await);
                }
            },
            None => None,
        };
        let mut outcome = None;
        for option in candidates {
            let req = option.requirements();
            let result = now_or!(
                shared.verifier.verify_now(payload, req),
                shared.verifier.verify(payload, req)
            );
            let done = !matches!(&result, Err(e) if !e.is_retryable());
            // Keep the first refusal: it is about the best-matching option.
            if done || outcome.is_none() {
                outcome = Some(result);
            }
            if done {
                break;
            }
        }
        drop(permit);
        let verified = match outcome {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                let rejection = rejection::of_verify(&e, shared.retry_after);
                return Err(self.reject(Stage::Verify, rejection, None, Some(&e)).await);
            }
            None => {
                let rejection = Rejection::Pay {
                    reason: Some(reason::INVALID_PAYMENT_REQUIREMENTS),
                };
                return Err(self.reject(Stage::Select, rejection, None, None).await);
            }
        };
        let elapsed = started.elapsed();
        trace::verified(&verified, elapsed);
        for hook in shared.hooks.iter() {
            if let Err(res) = hook.after_verify(&verified, elapsed).await {
                return Err(self.hook_refused(res, Some(&verified)).await);
            }
        }
        Ok(verified)
    }

    /// Claims the payment identifier, if one was sent. After verification (junk cannot fill
    /// the store), before the nonce is claimed (a retry of a served request must not meet its
    /// own spent nonce). A finished request with the same id answers here: its stored
    /// response, replayed.
    async fn begin_idempotent<B: Send>(
        &self,
        requested: Option<crate::idempotency::PaymentId>,
        verified: &VerifiedPayment,
        parts: &Parts,
    ) -> Result<Option<IdemClaim<'a>>, Answer<B>> {
        let (Some(id), Some(idem)) = (requested, &self.shared.idempotency) else {
            return Ok(None);
        };
        match IdemClaim::begin(idem, self.shared.retry_after, id, verified, parts).await {
            Ok(claim) => Ok(Some(claim)),
            Err(idempotent::Early::Replay(res)) => Err(res),
            Err(idempotent::Early::Refused(rejection, e)) => {
                let e = e.as_ref().map(|e| e as &(dyn StdError + Send + Sync));
                Err(self
                    .reject(Stage::Reserve, rejection, Some(verified), e)
                    .await)
            }
        }
    }

    /// The refusal's response, after telling the hooks.
    pub(super) async fn reject<B: Send>(
        &self,
        stage: Stage,
        rejection: Rejection,
        payment: Option<&VerifiedPayment>,
        error: Option<&(dyn StdError + Send + Sync)>,
    ) -> Answer<B> {
        let res = response::reject(self.shared, self.options, &self.resource, rejection);
        self.failed(stage, &res, payment, error).await;
        res
    }

    /// Tells the hooks that the layer answered `res` in place of the handler.
    pub(super) fn failed<'f, B>(
        &'f self,
        stage: Stage,
        res: &Response<B>,
        payment: Option<&'f VerifiedPayment>,
        error: Option<&'f (dyn StdError + Send + Sync)>,
    ) -> impl Future<Output = ()> + Send + 'f {
        // Copied out before any await: a response body need not be `Sync`, so no borrow of
        // the response may live inside the future.
        let info = res.extensions().get::<PaymentRejection>().cloned();
        async move {
            if let Some(info) = info {
                self.tell(stage, info, payment, error).await;
            }
        }
    }

    async fn tell(
        &self,
        stage: Stage,
        info: PaymentRejection,
        payment: Option<&VerifiedPayment>,
        error: Option<&(dyn StdError + Send + Sync)>,
    ) {
        trace::failed(stage, &info, error);
        if self.shared.hooks.is_empty() {
            return;
        }
        let failure = PaymentFailure {
            method: &self.method,
            uri: self.resource.uri(),
            stage,
            rejection: &info,
            payment,
            error,
        };
        for hook in self.shared.hooks.iter() {
            hook.on_failure(&failure).await;
        }
    }

    /// A hook's refusal, sent as is.
    async fn hook_refused<B: Send>(
        &self,
        res: HookResponse,
        payment: Option<&VerifiedPayment>,
    ) -> Answer<B> {
        let info = PaymentRejection {
            status: res.status(),
            reason: Some(reason::REFUSED_BY_HOOK),
            retry_after: res
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map(Duration::from_secs),
        };
        let mut res = res.map(ResponseBody::full);
        response::mark(self.shared, res.headers_mut());
        res.extensions_mut().insert(info);
        self.failed(Stage::Hook, &res, payment, None).await;
        res
    }
}
