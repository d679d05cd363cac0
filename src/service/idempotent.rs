//! Idempotent retries: the payment identifier a request claims, stored or forgotten.

use super::*;

/// `Retry-After` of 503 `payment_in_progress`: the first request is usually done by then.
pub(super) const IN_PROGRESS_RETRY: Duration = Duration::from_secs(1);

/// The payment identifier of a v2 payload, when the layer does idempotency.
pub(super) fn requested_id(
    shared: &Shared,
    payload: &PaymentPayload,
) -> Result<Option<PaymentId>, Rejection> {
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
pub(super) struct Claim {
    pub(super) key: IdempotencyKey,
    pub(super) token: ClaimToken,
}

impl Claim {
    /// The next request with this id runs afresh. A failed abort leaves the id in progress
    /// until it expires: retries get 503, never a second run.
    pub(super) async fn forget(self, idem: &Idempotency) {
        let _ = idem.store.abort(&self.key, self.token).await;
    }
}

/// Stores `res` for replay when its body is known to fit, and returns it (the same status,
/// headers and bytes). Otherwise the id is forgotten and `res` passes through untouched.
pub(super) async fn remember<B>(
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
pub(super) fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
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

/// Why the idempotency stage answered before the claim: a stored answer, or a refusal.
pub(super) enum Early<B> {
    /// The same id and proof finished before: its response, replayed.
    Replay(Response<ResponseBody<B>>),
    /// In progress, conflicting, or the store is down.
    Refused(Rejection, Option<idempotency::StoreError>),
}

/// A payment identifier this request holds, with where it is stored.
pub(super) struct IdemClaim<'a> {
    idem: &'a Idempotency,
    claim: Claim,
}

impl<'a> IdemClaim<'a> {
    /// Claims `id` for this payer and proof.
    pub(super) async fn begin<B>(
        idem: &'a Idempotency,
        retry_after: Duration,
        id: PaymentId,
        verified: &VerifiedPayment,
        parts: &Parts,
    ) -> Result<Self, Early<B>> {
        let key = IdempotencyKey {
            payer: verified.payer,
            id,
        };
        let fingerprint = Fingerprint::of(verified, &parts.method, &parts.uri);
        match idem
            .store
            .begin(&key, fingerprint, verified.valid_before)
            .await
        {
            Ok(Begin::Started(token)) => Ok(Self {
                idem,
                claim: Claim { key, token },
            }),
            Ok(Begin::Done(stored)) => Err(Early::Replay(replay(*stored))),
            Ok(Begin::InProgress) => Err(Early::Refused(
                Rejection::Unavailable {
                    retry_after: IN_PROGRESS_RETRY,
                    reason: reason::PAYMENT_IN_PROGRESS,
                },
                None,
            )),
            Ok(Begin::Conflict) => Err(Early::Refused(
                Rejection::Conflict {
                    reason: reason::PAYMENT_IDENTIFIER_CONFLICT,
                },
                None,
            )),
            Err(e) => Err(Early::Refused(
                Rejection::Unavailable {
                    retry_after: e.retry_after().unwrap_or(retry_after),
                    reason: reason::SERVICE_UNAVAILABLE,
                },
                Some(e),
            )),
        }
    }

    /// Stores the answer of a spent proof for replay; otherwise the id goes back.
    pub(super) async fn end<B>(
        self,
        flow: &Flow<'_>,
        (res, spent): (Response<ResponseBody<B>>, bool),
    ) -> Response<ResponseBody<B>>
    where
        B: Body<Data = Bytes> + Send,
    {
        if spent {
            remember(flow.shared, self.idem, self.claim, res).await
        } else {
            self.claim.forget(self.idem).await;
            res
        }
    }
}
