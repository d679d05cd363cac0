//! The paid flow: verify, hooks, claim the nonce, run the handler, settle, receipt.

use super::*;
use crate::alert::{Alert, alert};
use crate::nonce::{ClaimToken, NonceKey};

/// What the paid flow needs to answer a refusal and tell the hooks.
pub(super) struct Flow<'a> {
    pub(super) shared: &'a Shared,
    pub(super) options: &'a [PaymentOption],
    pub(super) resource: response::Resource,
    pub(super) method: Method,
}

impl<'a> Flow<'a> {
    pub(super) fn new(
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
    pub(super) async fn reject<B: Send>(
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

    pub(super) async fn tell(
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
    pub(super) async fn hook_refused<B: Send>(
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
pub(super) async fn paid<S, ReqB, ResB>(
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

/// Claims the nonce, runs the handler and settles. The flag says whether the proof is spent
/// (settled, refused after the handler, or outcome unknown): then a retry must see this very
/// response; otherwise the claim went back and a retry may run afresh.
pub(super) async fn serve<S, ReqB, ResB>(
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
        release(shared, &key, token).await;
        let rejection = settle_rejection(shared, &e);
        return Ok((
            flow.reject(Stage::Check, rejection, Some(verified), Some(&e))
                .await,
            false,
        ));
    }
    parts.extensions.insert(verified.clone());
    // upto: the handler meters the call; the amount to settle is known only afterwards.
    let meter = verified.is_upto().then(|| Usage::new(verified.amount));
    if let Some(meter) = &meter {
        parts.extensions.insert(meter.clone());
    }
    if shared.mode == SettlementMode::BeforeHandler && meter.is_none() {
        // The money moves first; the handler's answer, whatever it is, was paid for.
        let started = Instant::now();
        let result = shared.settler.settle(verified).await;
        let settle_time = started.elapsed();
        let settlement = match result {
            Ok(s) => s,
            Err(e) => {
                // Nothing was served: unless the money may have moved, the claim goes back.
                if !e.is_unknown() {
                    release(shared, &key, token).await;
                }
                return Ok((settle_failed(flow, verified, &e).await, e.is_unknown()));
            }
        };
        consume(shared, &key, token).await;
        after_settle(shared, verified, &settlement, settle_time).await;
        let res = inner.call(Request::from_parts(parts, body)).await?;
        return Ok((settled(shared, res, verified, settlement), true));
    }
    let res = match inner.call(Request::from_parts(parts, body)).await {
        Ok(res) => res,
        Err(e) => {
            // No money moved: the client may use the proof again. A failed release leaves
            // the key blocked until it expires, which is safe (never charged twice).
            release(shared, &key, token).await;
            return Err(e);
        }
    };
    if res.status().is_client_error() || res.status().is_server_error() {
        release(shared, &key, token).await;
        let mut res = res.map(ResponseBody::inner);
        response::mark(shared, res.headers_mut());
        return Ok((res, false));
    }
    let metered;
    let to_settle = match meter.map(|m| m.settle_amount()) {
        None => verified,
        Some(Err(_overrun)) => {
            // The handler ran past what the payer signed for: nothing is settled above the
            // maximum, and nothing below it either (the body is withheld, unpaid). Spent:
            // the same proof would buy the same run again.
            consume(shared, &key, token).await;
            let refused = SettleError::Refused {
                reason: crate::upto::SETTLEMENT_EXCEEDS_AMOUNT,
                transaction: None,
            };
            return Ok((settle_failed(flow, verified, &refused).await, true));
        }
        Some(Ok(total)) if total.is_zero() => {
            // Nothing used, nothing to move: no transaction at all.
            consume(shared, &key, token).await;
            let settlement = Settlement {
                transaction: None,
                amount: Some(total),
            };
            after_settle(shared, verified, &settlement, Duration::ZERO).await;
            return Ok((settled(shared, res, verified, settlement), true));
        }
        Some(Ok(total)) => {
            metered = VerifiedPayment {
                amount: total,
                ..verified.clone()
            };
            &metered
        }
    };
    let started = Instant::now();
    let result = shared.settler.settle(to_settle).await.map(|mut s| {
        if to_settle.is_upto() {
            s.amount = Some(to_settle.amount);
        }
        s
    });
    let settle_time = started.elapsed();
    match &result {
        // Refused after the handler ran, the proof is spent: releasing it would let it buy
        // the handler again.
        Ok(_) | Err(SettleError::Refused { .. }) => {
            consume(shared, &key, token).await;
        }
        // Nothing was sent and the handler's answer is withheld: the same proof may come
        // back and be served then.
        Err(e) if !e.is_unknown() => {
            release(shared, &key, token).await;
        }
        // The money may have moved: the claim stays until the proof expires, so it can
        // never buy a second settlement.
        Err(_) => {}
    }
    match result {
        Ok(settlement) => {
            after_settle(shared, to_settle, &settlement, settle_time).await;
            Ok((settled(shared, res, to_settle, settlement), true))
        }
        // The handler's body is withheld: it was not paid for.
        Err(e) => {
            let spent = e.is_refused() || e.is_unknown();
            Ok((settle_failed(flow, to_settle, &e).await, spent))
        }
    }
}

pub(super) async fn after_settle(
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
pub(super) fn settled<B>(
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
pub(super) async fn settle_failed<B: Send>(
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
pub(super) fn verify_rejection(shared: &Shared, e: &VerifyError) -> Rejection {
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
pub(super) fn settle_rejection(shared: &Shared, e: &SettleError) -> Rejection {
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

/// Marks a settled (or spent) proof used. A failure leaves it reserved until it expires:
/// still never accepted twice, so it is only raised.
pub(super) async fn consume(shared: &Shared, key: &NonceKey, token: ClaimToken) {
    if let Err(e) = shared.store.consume(key, token).await {
        alert!(
            Alert::NonceConsume,
            cause = &e,
            "nonce store could not mark a spent proof used (it stays reserved until it expires)"
        );
    }
}

/// Gives a proof back. A failure leaves it blocked until it expires (safe: the client signs a
/// new one), so it is only raised.
pub(super) async fn release(shared: &Shared, key: &NonceKey, token: ClaimToken) {
    if let Err(e) = shared.store.release(key, token).await {
        alert!(
            Alert::NonceRelease,
            cause = &e,
            "nonce store could not give a proof back (blocked until it expires)"
        );
    }
}
