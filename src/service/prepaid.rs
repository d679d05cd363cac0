//! Prepaid calls: a `SIGN-IN-WITH-X` proof in place of a payment.

use super::*;

/// A prepaid call: a `SIGN-IN-WITH-X` proof in place of a payment (see [`crate::prepaid`]).
pub(super) async fn signed_in<S, ReqB, ResB>(
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
pub(super) fn prepaid_rejection(
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
        Refusal::Chain(e) => (
            Stage::Verify,
            Rejection::Unavailable {
                retry_after: shared.retry_after,
                reason: reason::SERVICE_UNAVAILABLE,
            },
            Some(Box::new(e)),
        ),
    }
}
