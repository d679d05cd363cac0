//! Why a facilitator call failed: the `source` of the `Unavailable` / `Unknown` errors the
//! client returns, and the error of its builder.

use std::time::Duration;

use http::StatusCode;

use crate::verify::BoxError;

/// What went wrong talking to a facilitator. It travels as the `source` of
/// [`VerifyError::Unavailable`](crate::verify::VerifyError::Unavailable),
/// [`SettleError::Unavailable`](crate::settle::SettleError::Unavailable) and
/// [`SettleError::Unknown`](crate::settle::SettleError::Unknown), for logs: none of it is sent
/// to clients.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FacilitatorError {
    /// No connection could be made (refused, DNS, TLS, connect timeout): the request surely
    /// did not reach the facilitator.
    #[error("cannot connect to the facilitator")]
    Connect(#[source] BoxError),
    /// No complete answer within the call's timeout; the request may have been processed.
    #[error("no complete facilitator answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed after the request was (maybe) sent: reset, closed mid-body.
    #[error("facilitator connection failed after sending")]
    Transport(#[source] BoxError),
    /// The facilitator answered an HTTP status the call does not accept.
    #[error("facilitator answered HTTP {status}: {excerpt}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The start of its body, sanitized (for logs).
        excerpt: String,
    },
    /// The reply body is larger than the configured cap.
    #[error("facilitator reply exceeds {limit} bytes")]
    TooLarge {
        /// The cap.
        limit: usize,
    },
    /// The reply is not the JSON document the endpoint defines (bad JSON, wrong types,
    /// missing fields).
    #[error("facilitator reply is malformed: {excerpt}")]
    Malformed {
        /// The parse error.
        #[source]
        source: serde_json::Error,
        /// The start of the body, sanitized (for logs).
        excerpt: String,
    },
    /// The reply parses but contradicts the request (another payer, network, no transaction).
    #[error("facilitator reply is inconsistent: {0}")]
    Inconsistent(&'static str),
    /// The facilitator reports the settlement pending (`settlement_pending`): broadcast, no
    /// receipt yet.
    #[error("facilitator reports the settlement pending: {detail}")]
    Pending {
        /// Its reason and message, sanitized (for logs).
        detail: String,
    },
    /// The facilitator refused a channel operation with a reason this crate has no code for
    /// (e.g. the payer's balance); nothing happened on chain.
    #[error("facilitator refused: {detail}")]
    Refused {
        /// Its reason and message, sanitized (for logs).
        detail: String,
    },
    /// The auth header provider failed; nothing was sent.
    #[error("facilitator auth headers could not be made")]
    Auth(#[source] BoxError),
    /// The payment was not verified by a `FacilitatorClient`, so there is no facilitator
    /// request to settle with; nothing was sent.
    #[error("payment was not verified by a FacilitatorClient: nothing to send to /settle")]
    NotVerifiedByFacilitator,
}

impl FacilitatorError {
    /// True when the request surely did not reach the facilitator.
    pub fn is_not_sent(&self) -> bool {
        matches!(
            self,
            Self::Connect(_) | Self::Auth(_) | Self::NotVerifiedByFacilitator
        )
    }

    /// True for a call that ran out of time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }

    /// The HTTP status the facilitator answered, if that is the failure.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Why a [`FacilitatorClient`](super::FacilitatorClient) could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The base URL is not an absolute `http` or `https` URL.
    #[error("facilitator URL {0:?} is not an absolute http(s) URL")]
    Url(String),
    /// A setting is out of range.
    #[error("invalid facilitator setting: {0}")]
    Setting(&'static str),
    /// The HTTP client could not be built (TLS roots).
    #[error("cannot build the HTTP client")]
    Http(#[source] BoxError),
}

/// At most `max` characters of `s`, control characters replaced: safe to log.
pub(crate) fn excerpt(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::excerpt;

    #[test]
    fn excerpt_is_bounded_and_printable() {
        assert_eq!(excerpt("abc", 5), "abc");
        assert_eq!(excerpt("abcdef", 3), "abc…");
        assert_eq!(excerpt("a\nb\u{1b}[31m", 10), "a b [31m");
    }
}
