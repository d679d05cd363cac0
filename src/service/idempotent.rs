//! Idempotent retries: the payment identifier a request claims, stored or forgotten.

use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;

use super::flow::Flow;
use crate::body::ResponseBody;
use crate::config::{Idempotency, Shared};
use crate::idempotency::{
    self, Begin, ClaimToken, Fingerprint, IdempotencyKey, IdempotentReplay, PaymentId,
    StoredResponse,
};
use crate::proto::PaymentPayload;
use crate::rejection::{self, PaymentRejection, Rejection, reason};
use crate::response;
use crate::verify::VerifiedPayment;

use crate::alert::{Alert, alert};
use crate::nonce::StoreError;
use crate::proto::header::{PAYMENT_RESPONSE, X_PAYMENT_RESPONSE};
use http::HeaderMap;

/// `Retry-After` of 503 `payment_in_progress`: the first request is usually done by then.
pub(super) const IN_PROGRESS_RETRY: Duration = Duration::from_secs(1);

/// How long past the proof's `validBefore` an id is asked to be held (stores cap it at their
/// maximum TTL, 1 h by default: the reference's cache time). Not `validBefore` itself: a
/// client retries a lost answer with a *fresh* proof once the first expired, and a handler
/// may still be running then; an id freed at `validBefore` would let that retry run and pay
/// a second time.
pub(crate) const HOLD_PAST_VALID_BEFORE: Duration = Duration::from_secs(3600);

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
    /// until it expires: retries get 503, never a second run (raised, not lost).
    pub(super) async fn forget(self, idem: &Idempotency) {
        if let Err(e) = idem.store.abort(&self.key, self.token).await {
            alert!(
                Alert::IdempotencyStore,
                cause = &e,
                "idempotency store could not forget a payment id: retries with it get 503 \
                 payment_in_progress until it expires"
            );
        }
    }

    /// Stores the final response for replay (a second try absorbs a blip; completing twice is
    /// a no-op). If the store still fails, the id is left in progress, not forgotten: a retry
    /// with it gets 503 `payment_in_progress` until it expires, never the misleading 402
    /// `nonce_already_used` that would invite the client to pay again.
    async fn keep(self, idem: &Idempotency, stored: &StoredResponse) {
        let mut result = idem.store.complete(&self.key, self.token, stored).await;
        if result.as_ref().is_err_and(StoreError::is_retryable) {
            result = idem.store.complete(&self.key, self.token, stored).await;
        }
        if let Err(e) = result {
            alert!(
                Alert::IdempotencyStore,
                cause = &e,
                "idempotency store could not keep a paid response (status {}): retries with \
                 its payment id get 503 payment_in_progress until it expires",
                stored.status
            );
        }
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
    // A failure while buffering is reported once, by `body_failed`, with what the client got.
    let body = body.unmarked();
    // `.ok()` at once: the body's error type need not be `Send` (so it cannot live across an
    // await) nor `Error`; the failure itself is raised in `body_failed`.
    let Some(collected) = body.collect().await.ok() else {
        return body_failed(shared, idem, claim, &parts.headers).await;
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
    claim.keep(idem, &stored).await;
    rebuilt(bytes, None)
}

/// The body of a response whose proof is spent failed while being read (only bodies of the
/// handler can fail, and they reach here only once the money moved). The client gets a 500
/// that carries the receipt: the payment happened and its transaction is the client's claim
/// for a refund. The same answer is stored under the payment id, so a retry gets it again
/// instead of a second run or `nonce_already_used`.
async fn body_failed<B>(
    shared: &Shared,
    idem: &Idempotency,
    claim: Claim,
    handler_headers: &HeaderMap,
) -> Response<ResponseBody<B>> {
    alert!(
        Alert::ResponseBody,
        "a paid response's body failed after settlement: the client got 500 with the receipt \
         (the money moved, the content did not); refund or serve it by hand"
    );
    let mut headers = HeaderMap::new();
    for name in [PAYMENT_RESPONSE, X_PAYMENT_RESPONSE] {
        if let Some(value) = handler_headers.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response::mark(shared, &mut headers);
    let body = Bytes::from(
        serde_json::json!({
            "error": idempotency::RESPONSE_BODY_FAILED.as_str(),
            "message": "the response failed after the payment settled; the receipt shows the payment",
        })
        .to_string(),
    );
    let stored = StoredResponse {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        headers,
        body,
        rejection: None,
    };
    claim.keep(idem, &stored).await;
    replay_body(stored)
}

/// A stored response, as it was sent.
pub(super) fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
    let mut res = replay_body(stored);
    res.extensions_mut().insert(IdempotentReplay);
    res
}

/// `stored` as a response (status, headers, body, the layer's refusal info).
fn replay_body<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
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
            .begin(
                &key,
                fingerprint,
                verified
                    .valid_before
                    .saturating_add(HOLD_PAST_VALID_BEFORE.as_secs()),
            )
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
                rejection::of_store(&e, retry_after),
                Some(e),
            )),
        }
    }

    /// The service failed: the id goes back with the proof. A spent proof's id stays in
    /// progress until it expires (there is no answer to replay, and a retry must not pay
    /// again).
    pub(super) async fn failed(self, spent: bool) {
        if !spent {
            self.claim.forget(self.idem).await;
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
