//! When to try again: 429 and 5xx backoff, bounded.

use std::time::Duration;

use http::{HeaderMap, StatusCode};

/// Retries of a call on 429 (rate limited) and 500/502/503/504 or a transport error after a
/// proof was sent (outcome unknown). A 402 is never retried with a new signature, and 401 and
/// other statuses are never retried.
///
/// The wait before retry `n` (from 0) is `Retry-After` when the server sends one (seconds or
/// an HTTP date), else `base × 2ⁿ`, capped at [`RetryPolicy::max_delay`]. Jitter (on by
/// default) only ever lengthens a wait, never shortens it below what the server or the
/// x402 error table asks ("500: retry after 5 seconds with backoff"): the exponential wait
/// `w` becomes a uniform draw from `[w, 1.5 w]`, and a `Retry-After` wait is lengthened by up
/// to 10 % (at most 1 s), so clients told the same thing do not return in lockstep. A
/// `Retry-After` above `max_delay` ends the retries: the response goes back to the caller.
///
/// Retries re-send the request, so it must be safe to repeat: an x402 server runs the handler
/// at most once per settled proof, but a handler that failed with a 5xx may run again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    rate_limit_retries: u32,
    rate_limit_base: Duration,
    server_error_retries: u32,
    server_error_base: Duration,
    max_delay: Duration,
    jitter: bool,
}

impl Default for RetryPolicy {
    /// 429: 3 retries from 1 s; 5xx and unknown outcomes: 2 retries from 5 s; waits capped at
    /// 60 s; jitter on.
    fn default() -> Self {
        Self {
            rate_limit_retries: 3,
            rate_limit_base: Duration::from_secs(1),
            server_error_retries: 2,
            server_error_base: Duration::from_secs(5),
            max_delay: Duration::from_secs(60),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The defaults (see [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// No retries at all (the one paid retry after a 402 still happens).
    pub fn none() -> Self {
        Self {
            rate_limit_retries: 0,
            server_error_retries: 0,
            ..Self::default()
        }
    }

    /// Retries after a 429, and the first wait when the server gives no `Retry-After`.
    /// Default: 3 from 1 s.
    #[must_use]
    pub fn rate_limited(mut self, retries: u32, base: Duration) -> Self {
        self.rate_limit_retries = retries;
        self.rate_limit_base = base;
        self
    }

    /// Retries after 500/502/503/504 or a transport error once a proof was sent, and the first
    /// wait without `Retry-After`. Default: 2 from 5 s.
    #[must_use]
    pub fn server_errors(mut self, retries: u32, base: Duration) -> Self {
        self.server_error_retries = retries;
        self.server_error_base = base;
        self
    }

    setters! {
        /// Longest wait. Default: 60 s.
        #[must_use]
        pub fn max_delay(max: Duration) => max_delay = max;

        /// Randomizes the waits (see the type docs). Default: on.
        #[must_use]
        pub fn jitter(on: bool) => jitter = on;
    }

    /// The wait before rate-limit retry `n`, `None` when there is no retry left.
    pub(crate) fn rate_limit_delay(&self, n: u32, headers: &HeaderMap) -> Option<Duration> {
        (n < self.rate_limit_retries)
            .then(|| self.delay(self.rate_limit_base, n, retry_after(headers)))
            .flatten()
    }

    /// The wait before server-error retry `n`, `None` when there is no retry left.
    pub(crate) fn server_error_delay(
        &self,
        n: u32,
        headers: Option<&HeaderMap>,
    ) -> Option<Duration> {
        (n < self.server_error_retries)
            .then(|| self.delay(self.server_error_base, n, headers.and_then(retry_after)))
            .flatten()
    }

    fn delay(&self, base: Duration, n: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if let Some(wait) = retry_after {
            if wait > self.max_delay {
                return None;
            }
            let extra = if self.jitter {
                fraction(wait.min(Duration::from_secs(10)) / 10)
            } else {
                Duration::ZERO
            };
            return Some(wait + extra);
        }
        let wait = base
            .saturating_mul(2u32.saturating_pow(n))
            .min(self.max_delay);
        Some(if self.jitter {
            wait + fraction(wait / 2)
        } else {
            wait
        })
    }
}

/// A uniformly random duration in `[0, max]`; `0` without OS randomness.
fn fraction(max: Duration) -> Duration {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return Duration::ZERO;
    }
    let r = u64::from_le_bytes(b) as f64 / u64::MAX as f64;
    max.mul_f64(r)
}

/// `Retry-After`: delta-seconds or an HTTP date (a date in the past is no wait).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    crate::retry_after::parse(headers, std::time::SystemTime::now())
}

/// Statuses retried as server errors.
pub(crate) fn is_retryable_server_error(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

#[cfg(test)]
mod tests {
    use http::header::RETRY_AFTER;

    use super::*;
    use http::HeaderValue;

    #[test]
    fn exponential_without_jitter_and_retry_after_wins() {
        let p = RetryPolicy::new().jitter(false);
        let none = HeaderMap::new();
        assert_eq!(p.rate_limit_delay(0, &none), Some(Duration::from_secs(1)));
        assert_eq!(p.rate_limit_delay(2, &none), Some(Duration::from_secs(4)));
        assert_eq!(p.rate_limit_delay(3, &none), None);
        assert_eq!(p.server_error_delay(1, None), Some(Duration::from_secs(10)));
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(p.rate_limit_delay(2, &h), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("3600"));
        assert_eq!(p.rate_limit_delay(0, &h), None);
    }

    /// Many draws: never below the base wait, never above 1.5 × it, and spread (without
    /// jitter every draw would be the base).
    fn spread(draw: impl Fn() -> Duration, base: Duration) {
        let draws: Vec<Duration> = (0..500).map(|_| draw()).collect();
        let (min, max) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
        assert!(*min >= base, "{min:?} < {base:?}");
        assert!(*max <= base.mul_f64(1.5), "{max:?}");
        let above = draws.iter().filter(|d| **d > base).count();
        assert!(
            above > 450,
            "jitter lengthens almost every wait: {above}/500"
        );
        // Spread over the range, not piled up at one point.
        assert!(*max - *min > base / 4, "{min:?}..{max:?}");
    }

    #[test]
    fn jitter_lengthens_the_wait_never_shortens_it() {
        let p = RetryPolicy::new();
        spread(
            || p.server_error_delay(0, None).unwrap(),
            Duration::from_secs(5),
        );
        spread(
            || p.server_error_delay(1, None).unwrap(),
            Duration::from_secs(10),
        );
        spread(
            || p.rate_limit_delay(0, &HeaderMap::new()).unwrap(),
            Duration::from_secs(1),
        );
        // A Retry-After is lengthened by at most 10 % (1 s at most).
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("4"));
        let draws: Vec<Duration> = (0..500)
            .map(|_| p.rate_limit_delay(0, &h).unwrap())
            .collect();
        assert!(draws.iter().all(|d| *d >= Duration::from_secs(4)));
        assert!(draws.iter().all(|d| *d <= Duration::from_millis(4400)));
        assert!(
            draws
                .iter()
                .filter(|d| **d > Duration::from_secs(4))
                .count()
                > 450
        );
        // Without jitter: exactly the base.
        let off = RetryPolicy::new().jitter(false);
        assert_eq!(
            off.server_error_delay(0, None),
            Some(Duration::from_secs(5))
        );
    }
}
