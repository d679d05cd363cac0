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

/// The extractors of a value the layer puts in a paid request's extensions: the value itself
/// (500 [`MissingPayment`] without it) and `Option` of it (`None` without it). The docs before
/// the type go on its own impl, those before `Option` on the `Option` one.
macro_rules! from_extensions {
    ($(#[$doc:meta])* $ty:ty; $(#[$optional_doc:meta])* Option) => {
        $(#[$doc])*
        impl<S: Send + Sync> FromRequestParts<S> for $ty {
            type Rejection = MissingPayment;

            async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
                parts.extensions.get::<$ty>().cloned().ok_or(MissingPayment)
            }
        }

        $(#[$optional_doc])*
        impl<S: Send + Sync> OptionalFromRequestParts<S> for $ty {
            type Rejection = Infallible;

            async fn from_request_parts(
                parts: &mut Parts,
                _: &S,
            ) -> Result<Option<Self>, Self::Rejection> {
                Ok(parts.extensions.get::<$ty>().cloned())
            }
        }
    };
}

from_extensions! {
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
    VerifiedPayment;
    /// `Option<VerifiedPayment>`: `None` on free requests (e.g. a pricing function said free).
    Option
}

from_extensions! {
    /// The [`Usage`] meter of an `upto` payment; 500 ([`MissingPayment`]) when the request was not
    /// paid with `upto` (a route without an `upto` option, or an `exact` payment: use
    /// `Option<Usage>` on routes that accept both).
    Usage;
    /// `Option<Usage>`: `None` unless the request was paid with `upto`.
    Option
}
