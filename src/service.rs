//! [`Payment`]: the middleware service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::request::Parts;
use http::{HeaderMap, Request, Response};
use tower_service::Service;

use crate::body::ResponseBody;
use crate::challenge::Binding;
use crate::future::ResponseFuture;
use crate::layer::{PaymentOption, Pricing, Shared};
use crate::nonce::Reservation;
use crate::proto::exact::ExactEvmPayload;
use crate::proto::header::{self, HeaderError, PAYMENT_SIGNATURE, X_PAYMENT};
use crate::proto::{PaymentPayload, SettleResponse, VersionProbe, v1, v2};
use crate::rejection::{Rejection, reason};
use crate::response;
use crate::settle::{SettleError, Settlement, SettlementMode};
use crate::verify::VerifiedPayment;

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
    ResB: Send + 'static,
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
        ResB: Send + 'static,
    {
        let shared = self.shared.clone();
        let (parts, body) = req.into_parts();
        let rejection = match decode(&shared, &parts.headers) {
            Ok(Some(payload)) => {
                // The readied instance goes into the future; the clone waits for the next
                // poll_ready.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                return ResponseFuture::paid(Box::pin(paid(
                    shared, inner, parts, body, options, payload,
                )));
            }
            Ok(None) => Rejection::Pay { reason: None },
            Err(rejection) => rejection,
        };
        let resource = response::Resource::of(&parts);
        ResponseFuture::ready(response::reject(&shared, &options, &resource, rejection))
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

/// The paid flow: verify, claim the nonce, run the handler, settle, attach the receipt.
async fn paid<S, ReqB, ResB>(
    shared: Arc<Shared>,
    mut inner: S,
    mut parts: Parts,
    body: ReqB,
    options: Arc<[PaymentOption]>,
    payload: PaymentPayload,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    let resource = response::Resource::of(&parts);
    let reject = |rejection| Ok(response::reject(&shared, &options, &resource, rejection));
    let candidates = match select(&shared, &options, &payload, &resource) {
        Ok(c) => c,
        Err(r) => return reject(r),
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
    let Some(outcome) = outcome else {
        return reject(Rejection::Pay {
            reason: Some(reason::INVALID_PAYMENT_REQUIREMENTS),
        });
    };
    let verified = match outcome {
        Ok(v) => v,
        Err(e) if e.is_retryable() => {
            return reject(Rejection::Unavailable {
                retry_after: e.retry_after().unwrap_or(shared.retry_after),
            });
        }
        Err(e) if e.is_malformed() => {
            return reject(Rejection::BadRequest {
                reason: e.reason(),
                message: e.to_string(),
            });
        }
        Err(e) => {
            return reject(Rejection::Pay {
                reason: Some(e.reason()),
            });
        }
    };
    let key = verified.nonce_key();
    let token = match shared.store.reserve(&key, verified.valid_before).await {
        Ok(Reservation::Reserved(token)) => token,
        Ok(Reservation::InUse | Reservation::Used) => {
            return reject(Rejection::Pay {
                reason: Some(reason::NONCE_ALREADY_USED),
            });
        }
        Err(e) => {
            return reject(Rejection::Unavailable {
                retry_after: e.retry_after().unwrap_or(shared.retry_after),
            });
        }
    };
    if let Err(e) = shared.settler.check(&verified).await {
        // Nothing moved and the handler did not run: the proof may be retried (e.g. after
        // topping up the balance).
        let _ = shared.store.release(&key, token).await;
        return reject(settle_rejection(&shared, &e));
    }
    parts.extensions.insert(verified.clone());
    if shared.mode == SettlementMode::BeforeHandler {
        // The money moves first; the handler's answer, whatever it is, was paid for.
        let settlement = match shared.settler.settle(&verified).await {
            Ok(s) => s,
            Err(e) => {
                // Refused: nothing moved and nothing was served, so the claim goes back. An
                // unknown outcome (backend down) stays reserved: never charged twice.
                if !e.is_retryable() {
                    let _ = shared.store.release(&key, token).await;
                }
                return Ok(settle_failed(&shared, &options, &resource, &verified, &e));
            }
        };
        let _ = shared.store.consume(&key, token).await;
        let res = inner.call(Request::from_parts(parts, body)).await?;
        return Ok(settled(&shared, res, &verified, settlement));
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
        response::mark(&shared, res.headers_mut());
        return Ok(res);
    }
    let result = shared.settler.settle(&verified).await;
    // Settled or refused after the handler ran, the proof is spent either way: releasing a
    // refused one would let it buy the handler again. An unknown outcome stays reserved.
    if !matches!(&result, Err(e) if e.is_retryable()) {
        let _ = shared.store.consume(&key, token).await;
    }
    match result {
        Ok(settlement) => Ok(settled(&shared, res, &verified, settlement)),
        // The handler's body is withheld: it was not paid for.
        Err(e) => Ok(settle_failed(&shared, &options, &resource, &verified, &e)),
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

/// 402 (or 503) with a `success: false` receipt.
fn settle_failed<B>(
    shared: &Shared,
    options: &[PaymentOption],
    resource: &response::Resource,
    verified: &VerifiedPayment,
    e: &SettleError,
) -> Response<ResponseBody<B>> {
    let mut out = response::reject(shared, options, resource, settle_rejection(shared, e));
    let receipt = SettleResponse {
        success: false,
        error_reason: Some(e.reason().to_owned()),
        payer: Some(verified.payer),
        transaction: match e {
            SettleError::Refused { transaction, .. } => *transaction,
            _ => None,
        },
        network: verified.network,
        amount: None,
    };
    response::attach_receipt(out.headers_mut(), verified.version, &receipt);
    out
}

/// 503 for a settler that is down, 402 with its reason for a refusal.
fn settle_rejection(shared: &Shared, e: &SettleError) -> Rejection {
    if e.is_retryable() {
        Rejection::Unavailable {
            retry_after: e.retry_after().unwrap_or(shared.retry_after),
        }
    } else {
        Rejection::Pay {
            reason: Some(e.reason()),
        }
    }
}
