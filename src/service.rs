//! [`Payment`]: the middleware service.

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
use crate::proto::header::{self, HeaderError, PAYMENT_SIGNATURE, X_PAYMENT};
use crate::proto::{PaymentPayload, SettleResponse, VersionProbe, v1, v2};
use crate::rejection::{PaymentRejection, Rejection, reason};
use crate::response;
use crate::settle::{SettleError, Settlement, SettlementMode};
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
                let flow = paid(shared, inner, parts, body, options, payload);
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
    let v2 = header::single(headers, &PAYMENT_SIGNATURE)?;
    let v1 = header::single(headers, &X_PAYMENT)?;
    let (value, want) = match (v2, v1) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err(HeaderError::Conflicting.into()),
        (Some(v), None) => (v, 2),
        (None, Some(v)) => (v, 1),
    };
    let json = header::decode_bytes(value, shared.max_header_bytes)?;
    let probe: VersionProbe = serde_json::from_slice(&json).map_err(HeaderError::Json)?;
    let enabled = if want == 2 {
        shared.accept_v2
    } else {
        shared.accept_v1
    };
    if probe.x402_version != want || !enabled {
        return Err(HeaderError::Version {
            found: probe.x402_version,
        }
        .into());
    }
    let payload = if want == 2 {
        PaymentPayload::V2(
            serde_json::from_slice::<v2::PaymentPayload>(&json).map_err(HeaderError::Json)?,
        )
    } else {
        PaymentPayload::V1(
            serde_json::from_slice::<v1::PaymentPayload>(&json).map_err(HeaderError::Json)?,
        )
    };
    Ok(Some(payload))
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

/// What the paid flow needs to answer a refusal and tell the hooks.
struct Flow<'a> {
    shared: &'a Shared,
    options: &'a [PaymentOption],
    resource: response::Resource,
    method: Method,
}

impl<'a> Flow<'a> {
    fn new(
        shared: &'a Shared,
        options: &'a [PaymentOption],
        resource: response::Resource,
        method: Method,
    ) -> Self {
        Self {
            shared,
            options,
            resource,
            method,
        }
    }

    /// The refusal's response, after telling the hooks.
    async fn reject<B: Send>(
        &self,
        stage: Stage,
        rejection: Rejection,
        payment: Option<&VerifiedPayment>,
        error: Option<&(dyn StdError + Send + Sync)>,
    ) -> Response<ResponseBody<B>> {
        let res = response::reject(self.shared, self.options, &self.resource, rejection);
        self.failed(stage, &res, payment, error).await;
        res
    }

    /// Tells the hooks that the layer answered `res` in place of the handler.
    fn failed<'f, B>(
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
    ) -> Response<ResponseBody<B>> {
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

/// The paid flow: verify, claim the payment id (idempotency), then [`serve`].
async fn paid<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    parts: Parts,
    body: ReqB,
    options: Arc<[PaymentOption]>,
    payload: PaymentPayload,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send,
{
    let flow = Flow::new(
        &shared,
        &options,
        response::Resource::of(&parts),
        parts.method.clone(),
    );
    for hook in shared.hooks.iter() {
        let request = PaymentRequest {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            payload: &payload,
        };
        if let Err(res) = hook.before_verify(&request).await {
            return Ok(flow.hook_refused(res, None).await);
        }
    }
    let candidates = match select(&shared, &options, &payload, &flow.resource) {
        Ok(c) => c,
        Err(r) => return Ok(flow.reject(Stage::Select, r, None, None).await),
    };
    let requested = match requested_id(&shared, &payload) {
        Ok(id) => id,
        Err(r) => return Ok(flow.reject(Stage::Decode, r, None, None).await),
    };
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
                return Ok(flow.reject(Stage::Overload, overloaded, None, None).await);
            }
        },
        None => None,
    };
    let mut outcome = None;
    for option in candidates {
        let result = shared
            .verifier
            .verify(&payload, option.requirements())
            .await;
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
            let rejection = verify_rejection(&shared, &e);
            return Ok(flow.reject(Stage::Verify, rejection, None, Some(&e)).await);
        }
        None => {
            let rejection = Rejection::Pay {
                reason: Some(reason::INVALID_PAYMENT_REQUIREMENTS),
            };
            return Ok(flow.reject(Stage::Select, rejection, None, None).await);
        }
    };
    let verify_time = started.elapsed();
    trace::verified(&verified, verify_time);
    for hook in shared.hooks.iter() {
        if let Err(res) = hook.after_verify(&verified, verify_time).await {
            return Ok(flow.hook_refused(res, Some(&verified)).await);
        }
    }
    // After verification (junk cannot fill the store), before the nonce is claimed (a
    // retry of a served request must not meet its own spent nonce).
    let mut claim = None;
    if let (Some(id), Some(idem)) = (requested, &shared.idempotency) {
        let key = IdempotencyKey {
            payer: verified.payer,
            id,
        };
        let fingerprint = Fingerprint::of(&verified, &parts.method, &parts.uri);
        let refusal = match idem
            .store
            .begin(&key, fingerprint, verified.valid_before)
            .await
        {
            Ok(Begin::Started(token)) => {
                claim = Some(Claim { key, token });
                None
            }
            Ok(Begin::Done(stored)) => return Ok(replay(*stored)),
            Ok(Begin::InProgress) => Some((
                Rejection::Unavailable {
                    retry_after: IN_PROGRESS_RETRY,
                    reason: reason::PAYMENT_IN_PROGRESS,
                },
                None,
            )),
            Ok(Begin::Conflict) => Some((
                Rejection::Conflict {
                    reason: reason::PAYMENT_IDENTIFIER_CONFLICT,
                },
                None,
            )),
            Err(e) => Some((
                Rejection::Unavailable {
                    retry_after: e.retry_after().unwrap_or(shared.retry_after),
                    reason: reason::SERVICE_UNAVAILABLE,
                },
                Some(e),
            )),
        };
        if let Some((rejection, e)) = refusal {
            let e = e.as_ref().map(|e| e as &(dyn StdError + Send + Sync));
            return Ok(flow
                .reject(Stage::Reserve, rejection, Some(&verified), e)
                .await);
        }
    }
    let out = serve(&shared, &flow, inner, parts, body, &verified).await;
    let (Some(claim), Some(idem)) = (claim, &shared.idempotency) else {
        return out.map(|(res, _)| res);
    };
    match out {
        Ok((res, true)) => Ok(remember(&shared, idem, claim, res).await),
        Ok((res, false)) => {
            claim.forget(idem).await;
            Ok(res)
        }
        Err(e) => {
            claim.forget(idem).await;
            Err(e)
        }
    }
}

/// A prepaid call: a `SIGN-IN-WITH-X` proof in place of a payment (see [`crate::prepaid`]).
async fn signed_in<S, ReqB, ResB>(
    shared: Arc<Shared>,
    mut inner: S,
    mut parts: Parts,
    body: ReqB,
    options: Arc<[PaymentOption]>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send,
{
    let flow = Flow::new(
        &shared,
        &options,
        response::Resource::of(&parts),
        parts.method.clone(),
    );
    let Some(prepaid) = &shared.prepaid else {
        let pay = Rejection::Pay { reason: None };
        return Ok(flow.reject(Stage::Decode, pay, None, None).await);
    };
    let signed: SignedIn = match prepaid
        .sign_in(
            &*shared.store,
            &parts.headers,
            &options,
            shared.max_header_bytes,
        )
        .await
    {
        Ok(s) => s,
        Err(refusal) => {
            let (stage, rejection, error) = prepaid_rejection(&shared, refusal);
            let error = error.as_deref();
            return Ok(flow.reject(stage, rejection, None, error).await);
        }
    };
    parts.extensions.insert(signed);
    let res = match inner.call(Request::from_parts(parts, body)).await {
        Ok(res) => res,
        Err(e) => {
            prepaid.refund(signed.payer).await;
            return Err(e);
        }
    };
    if res.status().is_client_error() || res.status().is_server_error() {
        prepaid.refund(signed.payer).await;
    }
    let mut res = res.map(ResponseBody::inner);
    response::mark(&shared, res.headers_mut());
    Ok(res)
}

/// Status and reason of a refused sign-in; the error, if any, goes to hooks and traces.
fn prepaid_rejection(
    shared: &Shared,
    refusal: Refusal,
) -> (Stage, Rejection, Option<Box<dyn StdError + Send + Sync>>) {
    use crate::prepaid::{reason as prepaid, siwx};
    match refusal {
        Refusal::Siwx(siwx::SiwxError::Header(e)) if e.is_too_large() => {
            (Stage::Decode, e.into(), None)
        }
        Refusal::Siwx(e) if e.is_malformed() => (
            Stage::Decode,
            Rejection::BadRequest {
                reason: e.reason(),
                message: e.to_string(),
            },
            None,
        ),
        Refusal::Siwx(e) => (
            Stage::Verify,
            Rejection::Unauthorized {
                reason: e.reason(),
                message: e.to_string(),
            },
            Some(Box::new(e)),
        ),
        Refusal::Replayed => (
            Stage::Reserve,
            Rejection::Unauthorized {
                reason: siwx::reason::NONCE_REUSED,
                message: "this sign-in message was already used: sign a fresh challenge".into(),
            },
            None,
        ),
        Refusal::Exhausted => (
            Stage::Check,
            Rejection::Pay {
                reason: Some(prepaid::CREDIT_EXHAUSTED),
            },
            None,
        ),
        Refusal::Expired => (
            Stage::Check,
            Rejection::Pay {
                reason: Some(prepaid::CREDIT_EXPIRED),
            },
            None,
        ),
        Refusal::Unavailable(e) => (
            Stage::Reserve,
            Rejection::Unavailable {
                retry_after: e.retry_after().unwrap_or(shared.retry_after),
                reason: reason::SERVICE_UNAVAILABLE,
            },
            Some(Box::new(e)),
        ),
    }
}

/// Claims the nonce, runs the handler and settles. The flag says whether the proof is spent
/// (settled, refused after the handler, or outcome unknown): then a retry must see this very
/// response; otherwise the claim went back and a retry may run afresh.
async fn serve<S, ReqB, ResB>(
    shared: &Shared,
    flow: &Flow<'_>,
    mut inner: S,
    mut parts: Parts,
    body: ReqB,
    verified: &VerifiedPayment,
) -> Result<(Response<ResponseBody<ResB>>, bool), S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Send,
{
    let key = verified.nonce_key();
    let token = match shared.store.reserve(&key, verified.valid_before).await {
        Ok(Reservation::Reserved(token)) => token,
        Ok(Reservation::InUse | Reservation::Used) => {
            let replay = Rejection::Pay {
                reason: Some(reason::NONCE_ALREADY_USED),
            };
            return Ok((
                flow.reject(Stage::Reserve, replay, Some(verified), None)
                    .await,
                false,
            ));
        }
        Err(e) => {
            let down = Rejection::Unavailable {
                retry_after: e.retry_after().unwrap_or(shared.retry_after),
                reason: reason::SERVICE_UNAVAILABLE,
            };
            return Ok((
                flow.reject(Stage::Reserve, down, Some(verified), Some(&e))
                    .await,
                false,
            ));
        }
    };
    if let Err(e) = shared.settler.check(verified).await {
        // Nothing moved and the handler did not run: the proof may be retried (e.g. after
        // topping up the balance).
        let _ = shared.store.release(&key, token).await;
        let rejection = settle_rejection(shared, &e);
        return Ok((
            flow.reject(Stage::Check, rejection, Some(verified), Some(&e))
                .await,
            false,
        ));
    }
    parts.extensions.insert(verified.clone());
    if shared.mode == SettlementMode::BeforeHandler {
        // The money moves first; the handler's answer, whatever it is, was paid for.
        let started = Instant::now();
        let result = shared.settler.settle(verified).await;
        let settle_time = started.elapsed();
        let settlement = match result {
            Ok(s) => s,
            Err(e) => {
                // Nothing was served: unless the money may have moved, the claim goes back.
                if !e.is_unknown() {
                    let _ = shared.store.release(&key, token).await;
                }
                return Ok((settle_failed(flow, verified, &e).await, e.is_unknown()));
            }
        };
        let _ = shared.store.consume(&key, token).await;
        after_settle(shared, verified, &settlement, settle_time).await;
        let res = inner.call(Request::from_parts(parts, body)).await?;
        return Ok((settled(shared, res, verified, settlement), true));
    }
    let res = match inner.call(Request::from_parts(parts, body)).await {
        Ok(res) => res,
        Err(e) => {
            // No money moved: the client may use the proof again. A failed release leaves
            // the key blocked until it expires, which is safe (never charged twice).
            let _ = shared.store.release(&key, token).await;
            return Err(e);
        }
    };
    if res.status().is_client_error() || res.status().is_server_error() {
        let _ = shared.store.release(&key, token).await;
        let mut res = res.map(ResponseBody::inner);
        response::mark(shared, res.headers_mut());
        return Ok((res, false));
    }
    let started = Instant::now();
    let result = shared.settler.settle(verified).await;
    let settle_time = started.elapsed();
    match &result {
        // Refused after the handler ran, the proof is spent: releasing it would let it buy
        // the handler again.
        Ok(_) | Err(SettleError::Refused { .. }) => {
            let _ = shared.store.consume(&key, token).await;
        }
        // Nothing was sent and the handler's answer is withheld: the same proof may come
        // back and be served then.
        Err(e) if !e.is_unknown() => {
            let _ = shared.store.release(&key, token).await;
        }
        // The money may have moved: the claim stays until the proof expires, so it can
        // never buy a second settlement.
        Err(_) => {}
    }
    match result {
        Ok(settlement) => {
            after_settle(shared, verified, &settlement, settle_time).await;
            Ok((settled(shared, res, verified, settlement), true))
        }
        // The handler's body is withheld: it was not paid for.
        Err(e) => {
            let spent = e.is_refused() || e.is_unknown();
            Ok((settle_failed(flow, verified, &e).await, spent))
        }
    }
}

/// `Retry-After` of 503 `payment_in_progress`: the first request is usually done by then.
const IN_PROGRESS_RETRY: Duration = Duration::from_secs(1);

/// The payment identifier of a v2 payload, when the layer does idempotency.
fn requested_id(shared: &Shared, payload: &PaymentPayload) -> Result<Option<PaymentId>, Rejection> {
    let Some(idem) = &shared.idempotency else {
        return Ok(None);
    };
    match idempotency::requested(payload) {
        Ok(None) if idem.required && matches!(payload, PaymentPayload::V2(_)) => {
            Err(Rejection::BadRequest {
                reason: reason::PAYMENT_IDENTIFIER_REQUIRED,
                message: "this route requires extensions[\"payment-identifier\"].info.id".into(),
            })
        }
        Ok(id) => Ok(id),
        Err(e) => Err(Rejection::BadRequest {
            reason: reason::INVALID_PAYMENT_IDENTIFIER,
            message: e.to_string(),
        }),
    }
}

/// A payment identifier this request holds: it ends stored or forgotten.
struct Claim {
    key: IdempotencyKey,
    token: ClaimToken,
}

impl Claim {
    /// The next request with this id runs afresh. A failed abort leaves the id in progress
    /// until it expires: retries get 503, never a second run.
    async fn forget(self, idem: &Idempotency) {
        let _ = idem.store.abort(&self.key, self.token).await;
    }
}

/// Stores `res` for replay when its body is known to fit, and returns it (the same status,
/// headers and bytes). Otherwise the id is forgotten and `res` passes through untouched.
async fn remember<B>(
    shared: &Shared,
    idem: &Idempotency,
    claim: Claim,
    res: Response<ResponseBody<B>>,
) -> Response<ResponseBody<B>>
where
    B: Body<Data = Bytes> + Send,
{
    // Only a body bounded by its size hint is buffered: streams keep streaming.
    let fits = res
        .body()
        .size_hint()
        .upper()
        .is_some_and(|n| n <= idem.max_body as u64);
    if !fits {
        claim.forget(idem).await;
        return res;
    }
    let from_layer = res.body().is_from_layer();
    let (parts, body) = res.into_parts();
    // `.ok()` at once: the body's error type need not be `Send`.
    let Some(collected) = body.collect().await.ok() else {
        claim.forget(idem).await;
        let mut res = Response::new(ResponseBody::full(Bytes::new()));
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        response::mark(shared, res.headers_mut());
        return res;
    };
    let trailers = collected.trailers().cloned();
    let bytes = collected.to_bytes();
    let rejection = parts.extensions.get::<PaymentRejection>().cloned();
    let status = parts.status;
    let headers = idempotency::storable_headers(&parts.headers);
    let rebuilt = |bytes: Bytes, trailers| {
        let body = if from_layer {
            ResponseBody::full(bytes)
        } else {
            ResponseBody::buffered(bytes, trailers)
        };
        Response::from_parts(parts, body)
    };
    if trailers.is_some() {
        // Trailers (gRPC) are not stored: not replayable.
        claim.forget(idem).await;
        return rebuilt(bytes, trailers);
    }
    let stored = StoredResponse {
        status,
        headers,
        body: bytes.clone(),
        rejection,
    };
    if idem
        .store
        .complete(&claim.key, claim.token, &stored)
        .await
        .is_err()
    {
        claim.forget(idem).await;
    }
    rebuilt(bytes, None)
}

/// A stored response, as it was sent.
fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
    let body = if stored.rejection.is_some() {
        ResponseBody::full(stored.body)
    } else {
        ResponseBody::buffered(stored.body, None)
    };
    let mut res = Response::new(body);
    *res.status_mut() = stored.status;
    *res.headers_mut() = stored.headers;
    if let Some(rejection) = stored.rejection {
        res.extensions_mut().insert(rejection);
    }
    res.extensions_mut().insert(IdempotentReplay);
    res
}
async fn after_settle(
    shared: &Shared,
    verified: &VerifiedPayment,
    settlement: &Settlement,
    elapsed: Duration,
) {
    trace::settled(settlement, elapsed);
    if let Some(prepaid) = &shared.prepaid {
        prepaid.granted(verified.payer).await;
    }
    for hook in shared.hooks.iter() {
        hook.after_settle(verified, settlement, elapsed).await;
    }
}

/// The handler's response with the success receipt.
fn settled<B>(
    shared: &Shared,
    res: Response<B>,
    verified: &VerifiedPayment,
    settlement: Settlement,
) -> Response<ResponseBody<B>> {
    let receipt = SettleResponse {
        success: true,
        error_reason: None,
        payer: Some(verified.payer),
        transaction: settlement.transaction,
        network: verified.network,
        amount: settlement.amount,
    };
    let mut res = res.map(ResponseBody::inner);
    response::attach_receipt(res.headers_mut(), verified.version, &receipt);
    response::mark(shared, res.headers_mut());
    res
}

/// 402, 429 or 503 with a `success: false` receipt.
async fn settle_failed<B: Send>(
    flow: &Flow<'_>,
    verified: &VerifiedPayment,
    e: &SettleError,
) -> Response<ResponseBody<B>> {
    let rejection = settle_rejection(flow.shared, e);
    let mut out = response::reject(flow.shared, flow.options, &flow.resource, rejection);
    let receipt = SettleResponse {
        success: false,
        error_reason: Some(e.reason().to_owned()),
        payer: Some(verified.payer),
        transaction: e.transaction(),
        network: verified.network,
        amount: None,
    };
    response::attach_receipt(out.headers_mut(), verified.version, &receipt);
    flow.failed(Stage::Settle, &out, Some(verified), Some(e))
        .await;
    out
}

/// 503 for a verifier that is down, 429 when it rate-limits us, 400 for a malformed proof,
/// 402 with its reason for a refusal.
fn verify_rejection(shared: &Shared, e: &VerifyError) -> Rejection {
    let retry_after = e.retry_after().unwrap_or(shared.retry_after);
    if e.is_rate_limited() {
        Rejection::RateLimited { retry_after }
    } else if e.is_retryable() {
        Rejection::Unavailable {
            retry_after,
            reason: reason::SERVICE_UNAVAILABLE,
        }
    } else if e.is_malformed() {
        Rejection::BadRequest {
            reason: e.reason(),
            message: e.to_string(),
        }
    } else {
        Rejection::Pay {
            reason: Some(e.reason()),
        }
    }
}

/// 402 with the reason for a refusal, 429 when rate-limited, 503 for a settler that is down
/// or whose outcome is unknown.
fn settle_rejection(shared: &Shared, e: &SettleError) -> Rejection {
    let retry_after = e.retry_after().unwrap_or(shared.retry_after);
    match e {
        SettleError::Refused { reason, .. } => Rejection::Pay {
            reason: Some(reason),
        },
        SettleError::RateLimited { .. } => Rejection::RateLimited { retry_after },
        SettleError::Unknown { .. } => Rejection::Unavailable {
            retry_after,
            reason: reason::SETTLEMENT_OUTCOME_UNKNOWN,
        },
        SettleError::Unavailable { .. } => Rejection::Unavailable {
            retry_after,
            reason: reason::SERVICE_UNAVAILABLE,
        },
    }
}

/// Spans and events with the `tracing` feature; nothing without it.
#[cfg(feature = "tracing")]
mod trace {
    use std::error::Error as StdError;
    use std::future::Future;
    use std::time::Duration;

    use http::Response;
    use tracing::field::Empty;
    use tracing::{Instrument, Span};

    use crate::hooks::Stage;
    use crate::rejection::PaymentRejection;
    use crate::settle::Settlement;
    use crate::verify::VerifiedPayment;

    /// Runs the paid flow in an `x402.payment` span that ends with its outcome.
    pub(super) fn instrument<B, E>(
        flow: impl Future<Output = Result<Response<B>, E>> + Send,
    ) -> impl Future<Output = Result<Response<B>, E>> + Send {
        let span = tracing::info_span!(
            "x402.payment",
            payer = Empty,
            amount = Empty,
            network = Empty,
            verify_us = Empty,
            settle_us = Empty,
            transaction = Empty,
            status = Empty,
            outcome = Empty,
        );
        async move {
            let out = flow.await;
            let span = Span::current();
            match &out {
                Ok(res) => {
                    span.record("status", res.status().as_u16());
                    let outcome = res
                        .extensions()
                        .get::<PaymentRejection>()
                        .map_or("paid", |r| r.reason.unwrap_or("challenge"));
                    span.record("outcome", outcome);
                }
                Err(_) => {
                    span.record("outcome", "handler_error");
                }
            }
            out
        }
        .instrument(span)
    }

    pub(super) fn verified(payment: &VerifiedPayment, elapsed: Duration) {
        let span = Span::current();
        span.record("payer", tracing::field::display(payment.payer));
        span.record("amount", tracing::field::display(payment.amount));
        span.record("network", tracing::field::display(payment.network));
        span.record("verify_us", elapsed.as_micros() as u64);
    }

    pub(super) fn settled(settlement: &Settlement, elapsed: Duration) {
        let span = Span::current();
        span.record("settle_us", elapsed.as_micros() as u64);
        if let Some(tx) = settlement.transaction {
            span.record("transaction", tracing::field::display(tx));
        }
    }

    pub(super) fn failed(
        stage: Stage,
        info: &PaymentRejection,
        error: Option<&(dyn StdError + Send + Sync)>,
    ) {
        let reason = info.reason.unwrap_or("challenge");
        match error {
            Some(e) if info.status.is_server_error() => {
                tracing::warn!(?stage, reason, status = info.status.as_u16(), error = %e, "x402 payment not served")
            }
            _ => tracing::debug!(
                ?stage,
                reason,
                status = info.status.as_u16(),
                "x402 payment refused"
            ),
        }
    }
}

#[cfg(not(feature = "tracing"))]
mod trace {
    use std::error::Error as StdError;
    use std::time::Duration;

    use crate::hooks::Stage;
    use crate::rejection::PaymentRejection;
    use crate::settle::Settlement;
    use crate::verify::VerifiedPayment;

    pub(super) fn instrument<F>(flow: F) -> F {
        flow
    }
    pub(super) fn verified(_: &VerifiedPayment, _: Duration) {}
    pub(super) fn settled(_: &Settlement, _: Duration) {}
    pub(super) fn failed(_: Stage, _: &PaymentRejection, _: Option<&(dyn StdError + Send + Sync)>) {
    }
}
