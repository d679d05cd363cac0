//! Auth headers for facilitator calls, made per call.
//!
//! The x402 spec defines no auth. Public facilitators take none ([`NoAuth`]); some take a static
//! API key ([`BearerToken`]); hosted ones such as Coinbase CDP want a short-lived JWT bound to
//! the method, host and path of each call, minted per request ([`auth_fn`]).

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use http::header::{AUTHORIZATION, InvalidHeaderValue};
use http::{HeaderMap, HeaderValue, Method, Uri};

use crate::verify::BoxError;

/// The facilitator endpoint being called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// `POST /verify`.
    Verify,
    /// `POST /settle`.
    Settle,
    /// `GET /supported`.
    Supported,
}

impl Endpoint {
    /// The path under the facilitator's base URL (`/verify`, …).
    pub fn path(self) -> &'static str {
        match self {
            Self::Verify => "/verify",
            Self::Settle => "/settle",
            Self::Supported => "/supported",
        }
    }

    /// The HTTP method.
    pub fn method(self) -> Method {
        match self {
            Self::Verify | Self::Settle => Method::POST,
            Self::Supported => Method::GET,
        }
    }
}

/// One facilitator call, as an [`AuthHeaders`] provider sees it.
#[derive(Clone, Debug)]
pub struct AuthRequest {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// Its method.
    pub method: Method,
    /// Its full URL (a JWT binds host and path).
    pub uri: Uri,
}

/// Makes the headers that authenticate one facilitator call. Called once per HTTP request,
/// retries included, so a provider can mint a fresh short-lived token each time.
///
/// An error fails the call before anything is sent (a 503 for the paying client).
#[async_trait]
pub trait AuthHeaders: Send + Sync + 'static {
    /// The headers to add to `request`.
    async fn headers(&self, request: &AuthRequest) -> Result<HeaderMap, BoxError>;
}

#[async_trait]
impl<T: AuthHeaders + ?Sized> AuthHeaders for Arc<T> {
    async fn headers(&self, request: &AuthRequest) -> Result<HeaderMap, BoxError> {
        (**self).headers(request).await
    }
}

/// No auth headers (the public x402.org facilitator).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoAuth;

#[async_trait]
impl AuthHeaders for NoAuth {
    async fn headers(&self, _request: &AuthRequest) -> Result<HeaderMap, BoxError> {
        Ok(HeaderMap::new())
    }
}

/// A static `Authorization: Bearer <token>` on every call. The value is marked sensitive
/// (hidden from `Debug` and from HTTP/2 header compression).
#[derive(Clone)]
pub struct BearerToken(HeaderValue);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    /// `Authorization: Bearer <token>`.
    ///
    /// # Errors
    /// The token contains characters not allowed in a header value.
    pub fn new(token: impl AsRef<str>) -> Result<Self, InvalidHeaderValue> {
        let mut value = HeaderValue::try_from(format!("Bearer {}", token.as_ref()))?;
        value.set_sensitive(true);
        Ok(Self(value))
    }
}

#[async_trait]
impl AuthHeaders for BearerToken {
    async fn headers(&self, _request: &AuthRequest) -> Result<HeaderMap, BoxError> {
        let mut headers = HeaderMap::with_capacity(1);
        headers.insert(AUTHORIZATION, self.0.clone());
        Ok(headers)
    }
}

/// Headers from an async closure, called per request: the way to mint a JWT per call.
///
/// ```
/// use tower_x402::facilitator::{auth_fn, AuthRequest};
/// use http::{HeaderMap, HeaderValue};
///
/// let auth = auth_fn(|req: AuthRequest| async move {
///     // e.g. sign a JWT over (req.method, req.uri.host(), req.uri.path()) with your API key
///     let jwt = format!("jwt-for-{}", req.uri.path());
///     let mut headers = HeaderMap::new();
///     headers.insert("authorization", HeaderValue::try_from(format!("Bearer {jwt}"))?);
///     Ok(headers)
/// });
/// # let _ = auth;
/// ```
pub fn auth_fn<F, Fut>(f: F) -> AuthFn<F>
where
    F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<HeaderMap, BoxError>> + Send + 'static,
{
    AuthFn(f)
}

/// See [`auth_fn`].
#[derive(Clone)]
pub struct AuthFn<F>(F);

impl<F> std::fmt::Debug for AuthFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthFn(..)")
    }
}

#[async_trait]
impl<F, Fut> AuthHeaders for AuthFn<F>
where
    F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<HeaderMap, BoxError>> + Send + 'static,
{
    async fn headers(&self, request: &AuthRequest) -> Result<HeaderMap, BoxError> {
        (self.0)(request.clone()).await
    }
}
