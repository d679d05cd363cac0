//! `Retry-After` (RFC 9110 §10.2.3) as a wait: delay-seconds or an HTTP date.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::RETRY_AFTER;

/// The header's wait from `now`: delay-seconds (more digits than a `u64` holds is "very
/// long", `u64::MAX` seconds) or an HTTP date (a date in the past is no wait). Garbage, an
/// empty or a non-ASCII value is `None`.
pub(crate) fn parse(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn of(v: &str) -> Option<Duration> {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        parse(
            &h,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000),
        )
    }

    #[test]
    fn seconds_and_dates() {
        assert_eq!(of("7"), Some(Duration::from_secs(7)));
        assert_eq!(of(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            of("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        // 2025-06-15T15:07:10Z is 30 s after the fixed now.
        assert_eq!(
            of("Sun, 15 Jun 2025 15:07:10 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            of("Sun, 15 Jun 2025 15:00:00 GMT"),
            Some(Duration::ZERO),
            "past: no wait"
        );
        assert_eq!(of("-1"), None);
        assert_eq!(of("soon"), None);
        assert_eq!(of(""), None);
        assert_eq!(parse(&HeaderMap::new(), SystemTime::now()), None);
    }
}
