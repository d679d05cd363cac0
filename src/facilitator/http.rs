//! One HTTP exchange with the facilitator: auth headers, a total deadline, a size-capped
//! body, and the one fact retries depend on: could the request have reached it?

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, StatusCode, Uri};

use super::auth::{AuthHeaders, AuthRequest, Endpoint};
use super::error::FacilitatorError;

/// An answer with its status (any status: the caller decides what it means).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// A failed exchange, split by whether the facilitator may have seen the request.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Surely not sent (connect failed, auth provider failed): safe to repeat.
    NotSent(FacilitatorError),
    /// May have reached the facilitator (timeout, reset, truncated or oversized reply).
    MaybeSent(FacilitatorError),
}

impl Failure {
    pub(crate) fn into_error(self) -> FacilitatorError {
        match self {
            Self::NotSent(e) | Self::MaybeSent(e) => e,
        }
    }
}

/// The endpoints of one facilitator and how to reach them.
pub(crate) struct Transport {
    pub(crate) client: reqwest::Client,
    pub(crate) auth: Arc<dyn AuthHeaders>,
    pub(crate) verify: Target,
    pub(crate) settle: Target,
    pub(crate) supported: Target,
    pub(crate) max_body: usize,
}

/// One endpoint's URL, parsed once at build time in both forms.
pub(crate) struct Target {
    pub(crate) url: reqwest::Url,
    pub(crate) uri: Uri,
}

const JSON: HeaderValue = HeaderValue::from_static("application/json");

impl Transport {
    fn target(&self, endpoint: Endpoint) -> &Target {
        match endpoint {
            Endpoint::Verify => &self.verify,
            Endpoint::Settle => &self.settle,
            Endpoint::Supported => &self.supported,
        }
    }

    /// One request to `endpoint`, finished (headers and the whole capped body) within
    /// `timeout`.
    pub(crate) async fn call(
        &self,
        endpoint: Endpoint,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Reply, Failure> {
        let target = self.target(endpoint);
        let auth = AuthRequest {
            endpoint,
            method: endpoint.method(),
            uri: target.uri.clone(),
        };
        // A provider minting tokens remotely is bounded by the same deadline; nothing is sent
        // before it returns.
        let mut headers = match tokio::time::timeout(timeout, self.auth.headers(&auth)).await {
            Ok(Ok(headers)) => headers,
            Ok(Err(e)) => return Err(Failure::NotSent(FacilitatorError::Auth(e))),
            Err(_) => {
                let e = format!("auth header provider did not answer within {timeout:?}");
                return Err(Failure::NotSent(FacilitatorError::Auth(e.into())));
            }
        };
        headers.insert(http::header::ACCEPT, JSON);
        let mut req = self
            .client
            .request(endpoint.method(), target.url.clone())
            .headers(headers);
        if let Some(body) = body {
            req = req.header(CONTENT_TYPE, JSON).body(body);
        }
        match tokio::time::timeout(timeout, self.exchange(req)).await {
            Ok(result) => result,
            // The deadline covers connect too, but the connect timeout is shorter (enforced at
            // build time), so a deadline that fires is past connecting: maybe sent.
            Err(_) => Err(Failure::MaybeSent(FacilitatorError::Timeout(timeout))),
        }
    }

    async fn exchange(&self, req: reqwest::RequestBuilder) -> Result<Reply, Failure> {
        let mut res = req.send().await.map_err(|e| {
            // hyper reports a connect-phase failure (refused, DNS, TLS, connect timeout) as
            // such; everything else happened on an established connection.
            if e.is_connect() {
                Failure::NotSent(FacilitatorError::Connect(e.into()))
            } else {
                Failure::MaybeSent(FacilitatorError::Transport(e.into()))
            }
        })?;
        let too_large = || {
            Failure::MaybeSent(FacilitatorError::TooLarge {
                limit: self.max_body,
            })
        };
        if res
            .content_length()
            .is_some_and(|n| n > self.max_body as u64)
        {
            return Err(too_large());
        }
        let status = res.status();
        let headers = std::mem::take(res.headers_mut());
        let mut body = BytesMut::new();
        while let Some(chunk) = res
            .chunk()
            .await
            .map_err(|e| Failure::MaybeSent(FacilitatorError::Transport(e.into())))?
        {
            if body.len() + chunk.len() > self.max_body {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status,
            headers,
            body: body.freeze(),
        })
    }
}

/// `Retry-After` as a wait: delay-seconds or an HTTP date, at most `cap`. A date in the past
/// is no wait; garbage is ignored.
pub(crate) fn retry_after(headers: &HeaderMap, cap: Duration) -> Option<Duration> {
    crate::retry_after::parse(headers, SystemTime::now()).map(|wait| wait.min(cap))
}

/// Exponential backoff with jitter before retry `attempt` (1-based): a random wait in
/// `[d, 1.5 d]` with `d = base * 2^(attempt-1)` at most `cap`. The jitter spreads the retries
/// of many requests that failed together, and only ever lengthens the wait: never shorter
/// than the backoff asked for.
pub(crate) fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(cap);
    // Randomness failing is no reason to fail a call: a quarter more is a fine wait.
    let r = getrandom::u32().unwrap_or(u32::MAX / 2);
    exp + (exp / 2).mul_f64(f64::from(r) / f64::from(u32::MAX))
}

#[cfg(test)]
mod tests {
    use http::header::RETRY_AFTER;

    use super::*;

    #[test]
    fn retry_after_seconds_date_and_cap() {
        let cap = Duration::from_secs(60);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, cap), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h, cap), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("99999999999999999999999"),
        );
        assert_eq!(retry_after(&h, cap), Some(cap));
        h.insert(RETRY_AFTER, HeaderValue::from_static("-1"));
        assert_eq!(retry_after(&h, cap), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, cap), None);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h, cap), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        h.insert(RETRY_AFTER, HeaderValue::try_from(later).unwrap());
        let got = retry_after(&h, cap).unwrap();
        assert!(
            got > Duration::from_secs(27) && got <= Duration::from_secs(30),
            "{got:?}"
        );
        let far = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        h.insert(RETRY_AFTER, HeaderValue::try_from(far).unwrap());
        assert_eq!(retry_after(&h, cap), Some(cap));
    }

    #[test]
    fn backoff_grows_jitters_and_caps() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        // Many draws per attempt: never below the exponential wait, at most 1.5 × it, and
        // spread (without jitter every draw would equal the wait).
        for (attempt, wait) in [(1, base), (3, base * 4), (40, cap)] {
            let draws: Vec<Duration> = (0..500).map(|_| backoff(attempt, base, cap)).collect();
            let min = *draws.iter().min().unwrap();
            let max = *draws.iter().max().unwrap();
            assert!(min >= wait, "attempt {attempt}: {min:?} < {wait:?}");
            assert!(max <= wait.mul_f64(1.5), "attempt {attempt}: {max:?}");
            let above = draws.iter().filter(|d| **d > wait).count();
            assert!(
                above > 450,
                "attempt {attempt}: only {above}/500 lengthened"
            );
            assert!(max - min > wait / 4, "attempt {attempt}: {min:?}..{max:?}");
        }
    }
}
