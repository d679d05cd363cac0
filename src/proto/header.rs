//! Header names and the codec: base64 (standard alphabet, padded) of UTF-8 JSON.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

/// v2 challenge header (server → client).
pub const PAYMENT_REQUIRED: HeaderName = HeaderName::from_static("payment-required");
/// v2 proof header (client → server).
pub const PAYMENT_SIGNATURE: HeaderName = HeaderName::from_static("payment-signature");
/// v2 receipt header (server → client).
pub const PAYMENT_RESPONSE: HeaderName = HeaderName::from_static("payment-response");
/// v1 proof header.
pub const X_PAYMENT: HeaderName = HeaderName::from_static("x-payment");
/// v1 receipt header.
pub const X_PAYMENT_RESPONSE: HeaderName = HeaderName::from_static("x-payment-response");

/// Default cap on an incoming payment header: an `exact` proof is ~1.5 KiB; proxies often
/// stop at 8 KiB anyway.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8 * 1024;

/// Why a payment header could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Longer than the configured limit.
    #[error("payment header is {len} bytes, the limit is {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Sent more than once (ambiguous: which one would be paid?).
    #[error("payment header repeated")]
    Repeated,
    /// Both `PAYMENT-SIGNATURE` and `X-PAYMENT` were sent.
    #[error("both PAYMENT-SIGNATURE and X-PAYMENT present")]
    Conflicting,
    /// Not padded standard base64 (URL-safe alphabets, missing padding and stray bytes included).
    #[error("payment header is not canonical standard base64")]
    Base64,
    /// Decoded bytes are not UTF-8 (JSON is).
    #[error("payment header does not decode to UTF-8")]
    Utf8,
    /// Decoded bytes are not the JSON message expected.
    #[error("payment header is not valid x402 JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The `x402Version` does not belong in this header.
    #[error("x402Version {found} is not accepted in this header")]
    Version {
        /// What the payload claimed.
        found: u64,
    },
}

impl HeaderError {
    /// The x402 reason code sent to the client.
    pub fn reason(&self) -> crate::rejection::Reason {
        match self {
            Self::Version { .. } => crate::rejection::Reason::InvalidX402Version,
            _ => crate::rejection::Reason::InvalidPayload,
        }
    }

    /// True for [`HeaderError::TooLarge`] (answered with 431).
    pub fn is_too_large(&self) -> bool {
        matches!(self, Self::TooLarge { .. })
    }
}

/// Encodes a message as a header value.
pub fn encode<T: Serialize>(msg: &T) -> HeaderValue {
    encode_json(&serde_json::to_vec(msg).unwrap_or_default())
}

/// Encodes JSON bytes as a header value.
pub fn encode_json(json: &[u8]) -> HeaderValue {
    let b64 = STANDARD.encode(json);
    // Standard base64 is always a valid header value.
    HeaderValue::try_from(b64).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Decodes a header value to its JSON bytes (checked to be UTF-8), enforcing `max` bytes on
/// the encoded form.
pub fn decode_bytes(value: &HeaderValue, max: usize) -> Result<Vec<u8>, HeaderError> {
    let raw = value.as_bytes();
    if raw.len() > max {
        return Err(HeaderError::TooLarge {
            len: raw.len(),
            max,
        });
    }
    // The STANDARD engine refuses '-', '_', whitespace, missing or excess padding and
    // non-zero trailing bits, so every proof has exactly one accepted encoding.
    let bytes = STANDARD.decode(raw).map_err(|_| HeaderError::Base64)?;
    // serde_json skips the strings of unknown fields without checking their UTF-8, so a
    // proof with invalid bytes there would otherwise pass (found by the `layer` fuzz target).
    if std::str::from_utf8(&bytes).is_err() {
        return Err(HeaderError::Utf8);
    }
    Ok(bytes)
}

/// The single value of `name`, `Ok(None)` if absent, an error if repeated.
pub fn single<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a HeaderValue>, HeaderError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(HeaderError::Repeated);
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_example_from_the_digest() {
        let json = br#"{"success":false,"errorReason":"invalid_exact_evm_nonce_already_used","transaction":"","network":"eip155:8453"}"#;
        assert_eq!(
            encode_json(json),
            "eyJzdWNjZXNzIjpmYWxzZSwiZXJyb3JSZWFzb24iOiJpbnZhbGlkX2V4YWN0X2V2bV9ub25jZV9hbHJlYWR5X3VzZWQiLCJ0cmFuc2FjdGlvbiI6IiIsIm5ldHdvcmsiOiJlaXAxNTU6ODQ1MyJ9"
        );
        assert_eq!(decode_bytes(&encode_json(json), 1024).unwrap(), json);
    }

    #[test]
    fn refuses_non_canonical_base64() {
        // This UTF-8 text encodes to a string with both `+` and `/`.
        let ok = STANDARD.encode(" \u{fe}\u{ff}\u{e9}");
        assert!(ok.contains('+') && ok.contains('/') && ok.ends_with('='));
        assert!(decode_bytes(&HeaderValue::try_from(ok.clone()).unwrap(), 100).is_ok());
        let url_safe = ok.replace('+', "-").replace('/', "_");
        let unpadded = STANDARD.encode(b"{}").trim_end_matches('=').to_owned();
        for bad in [url_safe, unpadded, format!(" {ok}"), format!("{ok}=")] {
            let v = HeaderValue::try_from(bad.clone()).unwrap();
            assert!(
                matches!(decode_bytes(&v, 100), Err(HeaderError::Base64)),
                "{bad}"
            );
        }
        // Valid base64 of bytes that are not UTF-8 (inside an otherwise ignorable JSON string).
        let not_utf8 = STANDARD.encode(b"{\"x402Version\":2,\"x\":\"\xe3\"}");
        let v = HeaderValue::try_from(not_utf8).unwrap();
        assert!(matches!(decode_bytes(&v, 100), Err(HeaderError::Utf8)));
        let long = HeaderValue::try_from("A".repeat(101)).unwrap();
        assert!(decode_bytes(&long, 100).unwrap_err().is_too_large());
    }
}
