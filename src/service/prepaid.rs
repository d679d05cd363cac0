//! Prepaid calls: a `SIGN-IN-WITH-X` proof in place of a payment.

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::flow::Flow;
use crate::body::ResponseBody;
use crate::config::Shared;
use crate::hooks::Stage;
use crate::option::PaymentOption;
use crate::prepaid::SignedIn;
use crate::rejection::{self, Rejection};
use crate::response;

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
    let flow = Flow::of(&shared, &options, &parts);
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
            let (stage, rejection, error) = rejection::of_prepaid(refusal, shared.retry_after);
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
