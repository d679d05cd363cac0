//! axum extractor for the verified payment.

use std::convert::Infallible;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::upto::Usage;
use crate::verify::VerifiedPayment;

/// `VerifiedPayment` was extracted on a route that no [`PaymentLayer`](crate::PaymentLayer)
/// covers: a server bug, answered with 500 (it never means "unpaid": the layer answers
/// unpaid requests itself with 402 before the handler runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no verified payment: is PaymentLayer applied to this route?")]
pub struct MissingPayment;

impl IntoResponse for MissingPayment {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

/// Extracts the payment the layer verified for this request.
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_x402::VerifiedPayment;
/// async fn handler(payment: VerifiedPayment) -> String {
///     format!("thanks, {}", payment.payer)
/// }
/// let app: Router = Router::new().route("/paid", get(handler));
/// ```
impl<S: Send + Sync> FromRequestParts<S> for VerifiedPayment {
    type Rejection = MissingPayment;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<VerifiedPayment>()
            .cloned()
            .ok_or(MissingPayment)
    }
}

/// `Option<VerifiedPayment>`: `None` on free requests (e.g. a pricing function said free).
impl<S: Send + Sync> OptionalFromRequestParts<S> for VerifiedPayment {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<VerifiedPayment>().cloned())
    }
}

/// The [`Usage`] meter of an `upto` payment; 500 ([`MissingPayment`]) when the request was not
/// paid with `upto` (a route without an `upto` option, or an `exact` payment: use
/// `Option<Usage>` on routes that accept both).
impl<S: Send + Sync> FromRequestParts<S> for Usage {
    type Rejection = MissingPayment;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Usage>()
            .cloned()
            .ok_or(MissingPayment)
    }
}

/// `Option<Usage>`: `None` unless the request was paid with `upto`.
impl<S: Send + Sync> OptionalFromRequestParts<S> for Usage {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Usage>().cloned())
    }
}
