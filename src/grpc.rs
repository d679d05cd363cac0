//! x402 over gRPC: the layer's refusals as gRPC statuses, for tonic servers.
//!
//! A gRPC client cannot read an HTTP 402: any HTTP status but 200 becomes an opaque
//! `UNKNOWN` (tonic's HTTP → gRPC table has no 402), and the v1 JSON body is not a gRPC
//! message. [`GrpcPaymentLayer`] wraps [`PaymentLayer`]'s service and rewrites, for requests
//! with `content-type: application/grpc*`, every response the layer wrote itself into a
//! **trailers-only** gRPC response: HTTP 200, `content-type: application/grpc`,
//! `grpc-status`, `grpc-message`, no body. Other requests (REST routes on the same server)
//! keep their HTTP answers, so one layer guards a server that mixes both.
//!
//! Only x402 v2 applies: its three messages already travel in headers, and an HTTP/2 header
//! *is* gRPC metadata, so they keep their names and values.
//!
//! | x402 v2 over HTTP | over gRPC |
//! |---|---|
//! | 402 + `PAYMENT-REQUIRED` header | `FAILED_PRECONDITION` + `payment-required` metadata (the same base64 `PaymentRequired`; its `error` is the reason) |
//! | `PAYMENT-SIGNATURE` request header | `payment-signature` request metadata, read unchanged |
//! | `PAYMENT-RESPONSE` receipt header | `payment-response` response metadata |
//!
//! Every refusal, from the [`PaymentRejection`] the layer puts into the response
//! extensions (the body is never parsed):
//!
//! | HTTP answer of the layer | gRPC status | metadata | `grpc-message` |
//! |---|---|---|---|
//! | 402 (pay, or pay again) | `FAILED_PRECONDITION` (9) | `payment-required` | the reason, or `payment required` |
//! | 400 malformed proof | `INVALID_ARGUMENT` (3) | | `invalid_payload` |
//! | 431 proof too large | `INVALID_ARGUMENT` (3) | | `invalid_payload` |
//! | 409 payment identifier reused with another proof or request | `ALREADY_EXISTS` (6) | | `payment_identifier_conflict` |
//! | 429 + `Retry-After` (a backend rate-limits the layer) | `RESOURCE_EXHAUSTED` (8) | `retry-after` (seconds), `grpc-retry-pushback-ms` | `rate_limited` |
//! | 503 + `Retry-After` (a dependency is down, overloaded, or a settlement's outcome is unknown) | `UNAVAILABLE` (14) | `retry-after` (seconds), `grpc-retry-pushback-ms` | `service_unavailable`, `overloaded`, `settlement_outcome_unknown` |
//! | 402 after a refused settlement | `FAILED_PRECONDITION` (9) | `payment-required`, `payment-response` (`success: false`) | the settle reason |
//! | a hook's refusal | by its status, as [`code`] says (401 `UNAUTHENTICATED`, 403 `PERMISSION_DENIED`, ...) | its headers | `refused_by_hook` |
//!
//! Other statuses follow [`code`]. The refusal's headers stay, as metadata (a receipt,
//! `cache-control: no-store`, the CORS expose list if enabled); its body is dropped, so a hook
//! that refuses gRPC calls puts what the client needs in headers, or answers with its own
//! `grpc-status` header, which is then sent unchanged. The [`PaymentRejection`] stays in the
//! extensions.
//!
//! ## Why `FAILED_PRECONDITION`
//!
//! gRPC's guide to its codes: use `FAILED_PRECONDITION` when "the client should not retry
//! until the system state has been explicitly fixed" — here, until it pays. The others that
//! come to mind say something false:
//!
//! * `UNAUTHENTICATED` means the caller's *identity* is missing or wrong. x402 has no
//!   identity (that is its point), and a paid call still needs the server's own auth; client
//!   stacks react to it by refreshing a token and retrying, which a payment does not fix.
//! * `RESOURCE_EXHAUSTED` means a quota or a server resource ran out: retry later. Retry
//!   policies and gateways treat it as retryable with backoff, so an unpaid call would be
//!   replayed unchanged. It is kept for 429 (a rate limit), which is exactly that.
//! * `PERMISSION_DENIED` says the caller may never do this; a payment changes that.
//!
//! A `FAILED_PRECONDITION` from this layer always carries `payment-required`; that metadata,
//! not the code alone, tells a client to pay. A handler's own `FAILED_PRECONDITION` has none.
//!
//! A malformed or oversized proof is `INVALID_ARGUMENT` (resending the same bytes cannot
//! help), and a dependency that is down is `UNAVAILABLE`, gRPC's code for "retry this call
//! later", the one retry policies are usually set up for; its wait is in `retry-after` (as in
//! HTTP) and `grpc-retry-pushback-ms` (the server pushback that gRPC retry policies obey).
//!
//! ## Handler errors are not charged
//!
//! A tonic handler that returns `Err(Status)` answers with HTTP 200 and the status in the
//! headers (trailers-only). [`PaymentLayer`] settles any answer below 400, so between it and
//! your service [`GrpcPaymentLayer`] puts [`HandlerStatus`], which gives such an answer an
//! HTTP error status for the time it passes the payment layer (then restores 200): the claim
//! is released, no receipt is sent, and the client may retry with the same proof. A status
//! sent in trailers after a streamed body comes too late for that: a streaming call is
//! settled when its response headers are ready, as an HTTP one is.
//!
//! ## Pricing per method
//!
//! A gRPC method is a path, `/package.Service/Method`, so
//! [`PaymentLayerBuilder::pricing`](crate::PaymentLayerBuilder::pricing) prices methods
//! (`None` for a free one) with `parts.uri.path()`.
//!
//! ## Example
//!
//! With tonic: `Server::builder().layer(paywall.grpc()).add_service(..)`; see
//! `examples/grpc.rs` for a server and a paying client. In a plain tower stack:
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_x402::{Network, PaymentLayer};
//! use tower_x402::primitives::{U256, address};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let paywall = PaymentLayer::builder()
//!     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
//!     .price("$0.001")
//!     .network(Network::BASE_SEPOLIA)
//!     .build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(paywall.grpc())
//!     .service(service_fn(|_req: Request<()>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"\0\0\0\0\0"))))
//!     }));
//! let req = Request::post("http://api.test/weather.Weather/Forecast")
//!     .header("content-type", "application/grpc")
//!     .body(())?;
//! let res = svc.oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! let status = tonic::Status::from_header_map(res.headers()).ok_or("no grpc-status")?;
//! assert_eq!(status.code(), tonic::Code::FailedPrecondition);
//! let challenge = tower_x402::grpc::payment_required(&status).ok_or("no challenge")??;
//! assert_eq!(challenge.accepts[0].amount, U256::from(1000));
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tonic::Code;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::future::ResponseFuture as PaymentFuture;
use crate::proto::header::{self, HeaderError, PAYMENT_REQUIRED};
use crate::proto::v2::PaymentRequired;
use crate::{Payment, PaymentLayer, PaymentRejection};

const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// gRPC's server pushback (gRFC A6): how long a retry policy waits before the next attempt.
const RETRY_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");
/// Cap on a challenge a client decodes: many `accepts` entries still fit in a few KiB.
const MAX_CHALLENGE_BYTES: usize = 64 * 1024;

impl PaymentLayer {
    /// The same layer, answering gRPC requests with gRPC statuses: see [`grpc`](crate::grpc).
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
    pub fn grpc(self) -> GrpcPaymentLayer {
        GrpcPaymentLayer::new(self)
    }
}

/// [`PaymentLayer`] for gRPC servers: refusals become trailers-only gRPC statuses. See the
/// [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct GrpcPaymentLayer {
    payment: PaymentLayer,
}

impl GrpcPaymentLayer {
    /// Wraps `payment`; same as [`PaymentLayer::grpc`].
    pub fn new(payment: PaymentLayer) -> Self {
        Self { payment }
    }
}

impl<S> Layer<S> for GrpcPaymentLayer {
    type Service = GrpcPayment<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcPayment {
            inner: self.payment.layer(HandlerStatus { inner }),
        }
    }
}

/// The service made by [`GrpcPaymentLayer`]: [`Payment`] around [`HandlerStatus`] around
/// your service. See the [module docs](self).
#[derive(Clone)]
pub struct GrpcPayment<S> {
    inner: Payment<HandlerStatus<S>>,
}

impl<S> std::fmt::Debug for GrpcPayment<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcPayment").finish_non_exhaustive()
    }
}

impl<S> GrpcPayment<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner.get_ref().inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner.get_mut().inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner().inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for GrpcPayment<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<PaymentFuture<HandlerStatusFuture<S::Future>, ResB, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let grpc = is_grpc(req.headers());
        ResponseFuture {
            inner: self.inner.call(req),
            grpc,
        }
    }
}

pin_project! {
    /// Response future of [`GrpcPayment`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        grpc: bool,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody<B>>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if res.extensions_mut().remove::<Rewritten>().is_some() {
            *res.status_mut() = StatusCode::OK;
        }
        // A hook's refusal that already speaks gRPC is sent as the hook wrote it.
        if *this.grpc
            && res.body().is_from_layer()
            && !res.headers().contains_key(GRPC_STATUS)
            && let Some(rejection) = res.extensions().get::<PaymentRejection>().cloned()
        {
            res = trailers_only(res, &rejection);
        }
        Poll::Ready(Ok(res))
    }
}

/// Sits between [`Payment`] and your gRPC service: a trailers-only error answer (HTTP 200
/// with a non-zero `grpc-status` header, what tonic sends for `Err(Status)`) passes the
/// payment layer with an HTTP error status, so it is not settled; [`GrpcPayment`] restores
/// the 200. Made by [`GrpcPaymentLayer`].
#[derive(Clone, Debug)]
pub struct HandlerStatus<S> {
    inner: S,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for HandlerStatus<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = HandlerStatusFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        HandlerStatusFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`HandlerStatus`].
    pub struct HandlerStatusFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for HandlerStatusFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut res = ready!(self.project().inner.poll(cx))?;
        if res.status() == StatusCode::OK
            && let Some(code) = error_code(res.headers())
        {
            *res.status_mut() = http_status(code);
            res.extensions_mut().insert(Rewritten);
        }
        Poll::Ready(Ok(res))
    }
}

/// Marks a response whose HTTP status [`HandlerStatus`] changed from 200.
#[derive(Clone, Copy, Debug)]
struct Rewritten;

/// The gRPC code for a refusal of the layer (see the table in the [module docs](self)).
pub fn code(rejection: &PaymentRejection) -> Code {
    match rejection.status {
        StatusCode::PAYMENT_REQUIRED => Code::FailedPrecondition,
        StatusCode::BAD_REQUEST | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            Code::InvalidArgument
        }
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        // The payment identifier was used with another proof or request.
        StatusCode::CONFLICT => Code::AlreadyExists,
        StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        s if s.is_server_error() && rejection.retry_after.is_some() => Code::Unavailable,
        s if s.is_server_error() => Code::Internal,
        _ => Code::Unknown,
    }
}

/// The challenge in a refused call's `payment-required` metadata: `None` when there is none
/// (the refusal was not "pay"), an error when it does not decode.
///
/// # Errors
/// The metadata is not canonical base64 ([`HeaderError::Base64`]), longer than 64 KiB
/// ([`HeaderError::TooLarge`]) or not a v2 `PaymentRequired` ([`HeaderError::Json`]).
pub fn payment_required(status: &tonic::Status) -> Option<Result<PaymentRequired, HeaderError>> {
    let value = status.metadata().as_ref().get(PAYMENT_REQUIRED)?;
    Some(
        header::decode_bytes(value, MAX_CHALLENGE_BYTES).and_then(|json| {
            serde_json::from_slice::<PaymentRequired>(&json).map_err(HeaderError::Json)
        }),
    )
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The code of a trailers-only error response (`None` for OK or no `grpc-status`).
fn error_code(headers: &HeaderMap) -> Option<Code> {
    let code = Code::from_bytes(headers.get(GRPC_STATUS)?.as_bytes());
    (code != Code::Ok).then_some(code)
}

/// The HTTP status a gRPC error stands for (google.rpc.Code's table); only its "≥ 400" is
/// relied on.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The layer's HTTP refusal as a trailers-only gRPC response: its headers (challenge,
/// receipt, `Retry-After`, `Cache-Control`) become metadata; its body is dropped.
fn trailers_only<B>(
    res: Response<ResponseBody<B>>,
    rejection: &PaymentRejection,
) -> Response<ResponseBody<B>> {
    let (mut parts, _http_body) = res.into_parts();
    parts.status = StatusCode::OK;
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
    let code = code(rejection);
    let message = match (&rejection.reason, code) {
        (Some(reason), _) => reason.as_str(),
        (None, Code::FailedPrecondition) => "payment required",
        (None, _) => rejection.status.canonical_reason().unwrap_or("refused"),
    };
    // tonic percent-encodes the message, which then is always a valid header value.
    if tonic::Status::new(code, message)
        .add_header(&mut parts.headers)
        .is_err()
    {
        parts
            .headers
            .insert(GRPC_STATUS, HeaderValue::from(code as i32));
    }
    if let Some(wait) = rejection.retry_after {
        if !parts.headers.contains_key(RETRY_AFTER) {
            // Round up, as the HTTP answer does: `0` would invite a hot retry loop.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            parts
                .headers
                .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        parts
            .headers
            .insert(RETRY_PUSHBACK, HeaderValue::from(millis.max(1)));
    }
    Response::from_parts(parts, ResponseBody::full(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rejection(status: StatusCode, retry_after: Option<Duration>) -> PaymentRejection {
        PaymentRejection {
            status,
            reason: None,
            retry_after,
        }
    }

    #[test]
    fn codes_of_every_refusal() {
        let cases = [
            (StatusCode::PAYMENT_REQUIRED, None, Code::FailedPrecondition),
            (StatusCode::BAD_REQUEST, None, Code::InvalidArgument),
            (StatusCode::CONFLICT, None, Code::AlreadyExists),
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                None,
                Code::InvalidArgument,
            ),
            (
                StatusCode::TOO_MANY_REQUESTS,
                Some(Duration::from_secs(1)),
                Code::ResourceExhausted,
            ),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(5)),
                Code::Unavailable,
            ),
            (
                StatusCode::BAD_GATEWAY,
                Some(Duration::from_secs(5)),
                Code::Unavailable,
            ),
            (StatusCode::INTERNAL_SERVER_ERROR, None, Code::Internal),
            (StatusCode::UNAUTHORIZED, None, Code::Unauthenticated),
            (StatusCode::IM_A_TEAPOT, None, Code::Unknown),
        ];
        for (status, retry, want) in cases {
            assert_eq!(code(&rejection(status, retry)), want, "{status}");
        }
    }

    #[test]
    fn trailers_only_keeps_metadata_and_drops_the_body() {
        let mut res = Response::new(ResponseBody::<http_body_util::Empty<Bytes>>::full(
            &b"{\"x402Version\":1}"[..],
        ));
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        res.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("17"));
        res.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let info = PaymentRejection {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: Some(crate::reason::Reason::ServiceUnavailable),
            retry_after: Some(Duration::from_millis(2500)),
        };
        let res = trailers_only(res, &info);
        assert_eq!(res.status(), StatusCode::OK);
        let h = res.headers();
        assert_eq!(h[CONTENT_TYPE], "application/grpc");
        assert!(!h.contains_key(CONTENT_LENGTH));
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["grpc-message"], "service_unavailable");
        assert_eq!(h[RETRY_AFTER], "3", "the layer's own value is kept");
        assert_eq!(h["grpc-retry-pushback-ms"], "2500");
        assert!(http_body::Body::is_end_stream(res.body()));
    }

    #[test]
    fn retry_after_is_added_when_missing_and_rounded_up() {
        let res = Response::new(ResponseBody::<http_body_util::Empty<Bytes>>::full(
            Bytes::new(),
        ));
        let info = PaymentRejection {
            status: StatusCode::TOO_MANY_REQUESTS,
            reason: None,
            retry_after: Some(Duration::from_millis(1200)),
        };
        let res = trailers_only(res, &info);
        assert_eq!(res.headers()["grpc-status"], "8");
        assert_eq!(res.headers()["grpc-message"], "Too%20Many%20Requests");
        assert_eq!(res.headers()[RETRY_AFTER], "2");
        assert_eq!(res.headers()["grpc-retry-pushback-ms"], "1200");
    }

    #[test]
    fn handler_error_detection() {
        let mut h = HeaderMap::new();
        assert_eq!(error_code(&h), None);
        h.insert(GRPC_STATUS, HeaderValue::from_static("0"));
        assert_eq!(error_code(&h), None);
        h.insert(GRPC_STATUS, HeaderValue::from_static("5"));
        assert_eq!(error_code(&h), Some(Code::NotFound));
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        h.insert(GRPC_STATUS, HeaderValue::from_static("garbage"));
        assert_eq!(
            error_code(&h),
            Some(Code::Unknown),
            "not OK: must not be charged"
        );
        for code in [
            Code::Cancelled,
            Code::Unknown,
            Code::Internal,
            Code::DataLoss,
        ] {
            assert!(http_status(code).is_server_error());
        }
    }
}
