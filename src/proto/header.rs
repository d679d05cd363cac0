//! Header names and the codec: base64 (standard alphabet, padded) of UTF-8 JSON.

use base64_simd::AsOut;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use super::{PaymentPayload, VersionProbe, v1, v2};
use crate::kept::Kept;

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
    pub fn reason(&self) -> crate::reason::Reason {
        match self {
            Self::Version { .. } => crate::reason::Reason::InvalidX402Version,
            _ => crate::reason::Reason::InvalidPayload,
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
    let b64 = base64_simd::STANDARD.encode_to_string(json);
    // Standard base64 is always a valid header value.
    HeaderValue::try_from(b64).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Decodes a header value to its JSON bytes (checked to be UTF-8), enforcing `max` bytes on
/// the encoded form.
pub fn decode_bytes(value: &HeaderValue, max: usize) -> Result<Vec<u8>, HeaderError> {
    decode_text(value, max).map(String::into_bytes)
}

/// [`decode_bytes`] as text: parsed with `serde_json::from_str`, whose strings need no
/// second UTF-8 check (`from_slice` validates every string it reads: 2k instructions a proof).
fn decode_text(value: &HeaderValue, max: usize) -> Result<String, HeaderError> {
    text(within(value, max)?)
}

/// The text an encoded value (size already checked) stands for.
fn text(raw: &[u8]) -> Result<String, HeaderError> {
    // The STANDARD engine refuses '-', '_', whitespace, missing or excess padding and
    // non-zero trailing bits, so every proof has exactly one accepted encoding.
    let bytes = base64_decode(raw).ok_or(HeaderError::Base64)?;
    // serde_json skips the strings of unknown fields without checking their UTF-8, so a
    // proof with invalid bytes there would otherwise pass (found by the `layer` fuzz target).
    String::from_utf8(bytes).map_err(|_| HeaderError::Utf8)
}

/// The encoded value, if it is at most `max` bytes long.
fn within(value: &HeaderValue, max: usize) -> Result<&[u8], HeaderError> {
    let raw = value.as_bytes();
    if raw.len() > max {
        return Err(HeaderError::TooLarge {
            len: raw.len(),
            max,
        });
    }
    Ok(raw)
}

/// Standard padded base64, decoded as `STANDARD.decode` does (same bytes, same refusals:
/// `-`, `_`, whitespace, missing or excess padding, non-zero trailing bits).
fn base64_decode(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    base64_append(raw, &mut out).then_some(out)
}

/// [`base64_decode`], appending to `out`; false (and `out` in any state) if refused. The
/// SIMD decoder takes a proof's ~1 kB in a fifth of the instructions of a table loop: this
/// and the receipt's encoding are most of what a paid request spends outside the signature.
fn base64_append(raw: &[u8], out: &mut Vec<u8>) -> bool {
    base64_simd::STANDARD.decode_append(raw, out).is_ok()
}

/// What a server takes in its payment header: the size cap on the encoded value and the
/// protocol versions it has enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest encoded header accepted, in bytes ([`DEFAULT_MAX_HEADER_BYTES`] by default).
    pub max_bytes: usize,
    /// v1 proofs (`X-PAYMENT`) are accepted.
    pub v1: bool,
    /// v2 proofs (`PAYMENT-SIGNATURE`) are accepted.
    pub v2: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_HEADER_BYTES,
            v1: true,
            v2: true,
        }
    }
}

/// Reads the payment proof of a request: `Ok(None)` when it carries none.
///
/// `PAYMENT-SIGNATURE` must hold a v2 proof and `X-PAYMENT` a v1 proof, each only if that
/// version is enabled; sending both, or either twice, is refused. The JSON is parsed once, as
/// the typed payload of the header's version. Only when that fails, or names another version,
/// is the document read again for its `x402Version`, so the refusal says which: a wrong or
/// disabled version is [`HeaderError::Version`] (`invalid_x402_version`) however the rest
/// looks, anything else malformed is [`HeaderError::Json`].
pub fn decode_payload(
    headers: &HeaderMap,
    limits: Limits,
) -> Result<Option<PaymentPayload>, HeaderError> {
    let v2 = single(headers, &PAYMENT_SIGNATURE)?;
    let v1 = single(headers, &X_PAYMENT)?;
    let (value, want, enabled) = match (v2, v1) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err(HeaderError::Conflicting),
        (Some(v), None) => (v, 2, limits.v2),
        (None, Some(v)) => (v, 1, limits.v1),
    };
    if want == 2 && enabled {
        return decode_v2(value, limits.max_bytes).map(Some);
    }
    let json = decode_text(value, limits.max_bytes)?;
    if !enabled {
        return Err(refusal(&json, None));
    }
    let typed = serde_json::from_str::<v1::PaymentPayload>(&json)
        .map(|p| (u64::from(p.x402_version), PaymentPayload::V1(p)));
    typed_or_refusal(&json, 1, typed).map(Some)
}

/// A v2 proof: its start from [`PREFIXES`] when a kept one matches (only the rest is decoded
/// and parsed), else the whole, whose start is then kept.
fn decode_v2(value: &HeaderValue, max: usize) -> Result<PaymentPayload, HeaderError> {
    let raw = within(value, max)?;
    if let Some(resumed) = PREFIXES.with_borrow(|prefixes| resume(raw, prefixes.find(raw)?)) {
        return resumed;
    }
    let json = text(raw)?;
    let (typed, mark) = v2::PaymentPayload::from_json_marked(&json);
    if let (Ok(payload), Some(mark)) = (&typed, mark) {
        PREFIXES.with_borrow_mut(|prefixes| prefixes.keep(raw, &json, payload, mark));
    }
    v2_or_refusal(&json, typed)
}

/// A v2 proof that starts with `prefix`'s text: only the rest is decoded and read. The kept
/// text is whole quanta without padding, so `raw` is canonical base64 iff the rest is, and
/// decodes to the kept bytes followed by the rest's; the kept bytes before the `payload`
/// value are UTF-8 and end at a character, so the whole is UTF-8 iff the rest is.
///
/// With a bound challenge ([`IdSlot`]) the quanta holding its id are decoded too: when they
/// hold the kept bytes around an id of plain base64url characters, the document is the kept
/// one with another id (read as the kept head with that id); anything else is `None`, and the
/// whole is decoded as without a kept start.
fn resume(raw: &[u8], prefix: &Prefix) -> Option<Result<PaymentPayload, HeaderError>> {
    let bound;
    let (head, id) = match &prefix.id {
        None => (&prefix.head, None),
        Some(slot) => {
            let id = slot.read(raw, &prefix.before)?;
            bound = prefix.head.with_challenge(id.as_str());
            (&bound, Some((slot, id)))
        }
    };
    let encoded = &raw[prefix.b64.len()..];
    let mut bytes = Vec::with_capacity(prefix.start.len() + encoded.len() / 4 * 3 + 3);
    bytes.extend_from_slice(prefix.start.as_bytes());
    if !base64_append(encoded, &mut bytes) {
        return Some(Err(HeaderError::Base64));
    }
    let Ok(rest) = String::from_utf8(bytes) else {
        return Some(Err(HeaderError::Utf8));
    };
    if let Some(payload) = v2::PaymentPayload::read_after(&rest, head) {
        return Some(v2_or_refusal(&rest, Ok(payload)));
    }
    // Declined by the direct path: serde's answer for the whole, as `from_json` gives it.
    let whole = match id {
        None => [&*prefix.before, &rest].concat(),
        Some((slot, id)) => {
            let (lead, trail) = slot.around(&prefix.before);
            [lead, id.as_str(), trail, &rest].concat()
        }
    };
    Some(v2_or_refusal(&whole, serde_json::from_str(&whole)))
}

fn v2_or_refusal(
    json: &str,
    typed: Result<v2::PaymentPayload, serde_json::Error>,
) -> Result<PaymentPayload, HeaderError> {
    let typed = typed.map(|p| (u64::from(p.x402_version), PaymentPayload::V2(p)));
    typed_or_refusal(json, 2, typed)
}

/// The proof if it names the version `want`, else the refusal that says why not.
fn typed_or_refusal(
    json: &str,
    want: u64,
    typed: Result<(u64, PaymentPayload), serde_json::Error>,
) -> Result<PaymentPayload, HeaderError> {
    match typed {
        Ok((found, payload)) if found == want => Ok(payload),
        Ok((found, _)) => Err(HeaderError::Version { found }),
        Err(e) => Err(refusal(json, Some((want, e)))),
    }
}

thread_local! {
    /// The starts of recent v2 proofs on this thread.
    static PREFIXES: std::cell::RefCell<Prefixes> = const {
        std::cell::RefCell::new(Prefixes { slots: Kept::new() })
    };
}

/// The starts of recent v2 proofs: the base64 text up to a proof's `payload` value (whole
/// quanta), its bytes and what the direct parser read from them ([`v2::Head`]). Every proof
/// paying one option of one route starts with the same text (`x402Version`, the `resource`
/// and `accepted` echoes, in the client's key order) whoever pays: only the rest, the
/// payer's own, is decoded and parsed. A bound challenge's id is new with every challenge:
/// the quanta that hold it are decoded per proof ([`IdSlot`]), the text around them is kept.
struct Prefixes {
    slots: Kept<Prefix, { Prefixes::SLOTS }>,
}

struct Prefix {
    /// Whole quanta of base64, the last one holding the first byte of the `payload` value.
    b64: Box<[u8]>,
    /// Their bytes before the `payload` value (what `head` was read from).
    before: Box<str>,
    /// Their bytes from the `payload` value on (one or two).
    start: Box<str>,
    head: v2::Head,
    /// Where a bound challenge's id sits in them: its quanta differ from proof to proof.
    id: Option<IdSlot>,
}

impl Prefix {
    /// Whether `raw` starts with this start (the id's quanta aside), followed by at least
    /// one quantum.
    fn matches(&self, raw: &[u8]) -> bool {
        let n = self.b64.len();
        if raw.len() < n + 4 {
            return false;
        }
        match &self.id {
            None => raw.starts_with(&self.b64),
            Some(slot) => {
                let (from, to) = (slot.first * 4, slot.end * 4);
                raw[..from] == self.b64[..from] && raw[to..n] == self.b64[to..]
            }
        }
    }
}

/// A bound challenge's id in a kept start: the id's text is new with every challenge, the
/// text around it the same. Quanta `first..end` hold it (with kept bytes before and after it
/// in the first and the last); the id starts at byte `at` and is `len` long.
struct IdSlot {
    first: usize,
    end: usize,
    at: usize,
    len: usize,
}

/// The characters of a challenge id (base64url): plain JSON string content, no escape.
fn id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

impl IdSlot {
    /// Longest id kept: its quanta are decoded on the stack.
    const MAX_LEN: usize = 90;

    /// Where `id`, the challenge the direct parser read before the `payload` value, sits in
    /// `before` (the text it read it from): its one `"challenge":"id"` (keys and strings
    /// the direct path takes hold no quote or escape, so that text is the `extra` entry).
    fn new(before: &str, id: &str) -> Option<Self> {
        let ok = !id.is_empty() && id.len() <= Self::MAX_LEN && id.bytes().all(id_char);
        let entry = format!("\"{}\":\"{id}\"", v2::CHALLENGE);
        let mut found = before.match_indices(&entry);
        let (Some((i, _)), None, true) = (found.next(), found.next(), ok) else {
            return None;
        };
        let at = i + entry.len() - id.len() - 1;
        let end = (at + id.len()).div_ceil(3);
        (end * 3 <= before.len()).then_some(Self {
            first: at / 3,
            end,
            at,
            len: id.len(),
        })
    }

    /// The kept text before the `payload` value, before and after the id.
    fn around<'b>(&self, before: &'b str) -> (&'b str, &'b str) {
        (&before[..self.at], &before[self.at + self.len..])
    }

    /// The id `raw` carries where the kept start has one: its quanta, decoded, must be the
    /// kept bytes around `len` id characters. `None` otherwise (bad base64 included).
    fn read(&self, raw: &[u8], before: &str) -> Option<IdText> {
        let mut bytes = [0u8; Self::MAX_LEN + 6];
        let quanta = raw.get(self.first * 4..self.end * 4)?;
        let whole = quanta.len() / 4 * 3;
        let dst = bytes.get_mut(..whole)?;
        let dst = base64_simd::STANDARD.decode(quanta, dst.as_out()).ok()?;
        // Padding (an end of text) mid-proof decodes shorter: not the kept start.
        if dst.len() != whole {
            return None;
        }
        let lead = self.at - self.first * 3;
        let kept = before.as_bytes();
        let ok = dst[..lead] == kept[self.first * 3..self.at]
            && dst[lead + self.len..] == kept[self.at + self.len..self.end * 3]
            && dst[lead..lead + self.len].iter().all(|&b| id_char(b));
        if !ok {
            return None;
        }
        let mut id = IdText {
            bytes: [0; Self::MAX_LEN],
            len: self.len,
        };
        id.bytes[..self.len].copy_from_slice(&dst[lead..lead + self.len]);
        Some(id)
    }
}

/// A challenge id read by [`IdSlot::read`]: id characters only.
struct IdText {
    bytes: [u8; IdSlot::MAX_LEN],
    len: usize,
}

impl IdText {
    fn as_str(&self) -> &str {
        // ASCII by construction: never the empty fallback.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl Prefixes {
    /// Starts kept per thread: a server has a few routes and options, a client one key order.
    const SLOTS: usize = 8;

    /// The kept start `raw` begins with, followed by at least one quantum.
    fn find(&self, raw: &[u8]) -> Option<&Prefix> {
        self.slots.iter().find(|p| p.matches(raw))
    }

    /// Keeps the start of `raw` (decoded to `json`, parsed to `payload`, its `payload` value
    /// at `mark`): the whole quanta that cover the text before that value, when at least
    /// one quantum follows them.
    fn keep(&mut self, raw: &[u8], json: &str, payload: &v2::PaymentPayload, mark: v2::Mark) {
        let quanta = mark.at().div_ceil(3);
        let (Some(b64), Some(before), Some(start)) = (
            raw.get(..quanta * 4)
                .filter(|_| quanta * 4 + 4 <= raw.len()),
            json.get(..mark.at()),
            json.get(mark.at()..quanta * 3),
        ) else {
            return;
        };
        let head = v2::Head::new(payload, mark);
        let id = match head.challenge() {
            Some(id) => match IdSlot::new(before, id) {
                Some(slot) => Some(slot),
                None => return,
            },
            None => None,
        };
        let prefix = Prefix {
            b64: b64.into(),
            before: before.into(),
            start: start.into(),
            head,
            id,
        };
        self.slots.keep(prefix);
    }
}

/// The refusal of a proof that did not decode as wanted: its `x402Version` if it is valid
/// JSON with one (and, when `typed` says which version was wanted, not that one); otherwise
/// the JSON error, the typed decoder's when the version was right.
#[cold]
fn refusal(json: &str, typed: Option<(u64, serde_json::Error)>) -> HeaderError {
    match serde_json::from_str::<VersionProbe>(json) {
        Err(e) => HeaderError::Json(e),
        Ok(probe) => match typed {
            Some((want, e)) if probe.x402_version == want => HeaderError::Json(e),
            _ => HeaderError::Version {
                found: probe.x402_version,
            },
        },
    }
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
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

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

    #[test]
    fn base64_decode_is_the_engines() {
        // Every length up to 40 from an alphabet with '=', the URL-safe pair, a space, a
        // non-ASCII byte: a deterministic pseudo-random walk, plus padded encodings.
        let chars = b"AQgw+/=-_ zZ09\xff";
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for len in 0..=40 {
            for _ in 0..400 {
                let s = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        chars[(state % chars.len() as u64) as usize]
                    })
                    .collect();
                inputs.push(s);
            }
        }
        for len in 0..64 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let good = STANDARD.encode(&data).into_bytes();
            // Each byte of a valid encoding replaced by every byte value.
            for at in 0..good.len() {
                for b in 0..=255u8 {
                    let mut bad = good.clone();
                    bad[at] = b;
                    inputs.push(bad);
                }
            }
            inputs.push(good);
        }
        // Proof-sized encodings, past the SIMD decoder's block sizes: a bad byte anywhere.
        for len in (64..1200).step_by(97) {
            let data: Vec<u8> = (0..len).map(|i| (i * 53 + 7) as u8).collect();
            let good = STANDARD.encode(&data).into_bytes();
            for at in (0..good.len()).step_by(13).chain([good.len() - 1]) {
                for b in [b'=', b'-', b'_', b' ', b'\n', 0, 0x80, 0xff, b'A', b'/'] {
                    let mut bad = good.clone();
                    bad[at] = b;
                    inputs.push(bad);
                }
            }
            inputs.push(good);
        }
        let mut decoded = 0;
        for input in &inputs {
            let engine = STANDARD.decode(input).ok();
            decoded += usize::from(engine.is_some());
            assert_eq!(
                base64_decode(input),
                engine,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert!(decoded > 1000, "{decoded}");
    }

    /// The decoder before the single pass (a version probe, then the typed parse), kept as
    /// the reference every refusal of [`decode_payload`] is compared with.
    fn two_pass(
        headers: &HeaderMap,
        limits: Limits,
    ) -> Result<Option<PaymentPayload>, HeaderError> {
        let v2 = single(headers, &PAYMENT_SIGNATURE)?;
        let v1 = single(headers, &X_PAYMENT)?;
        let (value, want) = match (v2, v1) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => return Err(HeaderError::Conflicting),
            (Some(v), None) => (v, 2),
            (None, Some(v)) => (v, 1),
        };
        let json = decode_bytes(value, limits.max_bytes)?;
        let probe: VersionProbe = serde_json::from_slice(&json).map_err(HeaderError::Json)?;
        let enabled = if want == 2 { limits.v2 } else { limits.v1 };
        if probe.x402_version != want || !enabled {
            return Err(HeaderError::Version {
                found: probe.x402_version,
            });
        }
        Ok(Some(if want == 2 {
            PaymentPayload::V2(serde_json::from_slice(&json).map_err(HeaderError::Json)?)
        } else {
            PaymentPayload::V1(serde_json::from_slice(&json).map_err(HeaderError::Json)?)
        }))
    }

    /// What a caller can tell apart: the variant, its reason, the version found, the JSON
    /// error's text, the payload's version.
    fn outcome(r: &Result<Option<PaymentPayload>, HeaderError>) -> String {
        match r {
            Ok(None) => "none".to_owned(),
            Ok(Some(p)) => format!("payload v{}", p.version().number()),
            Err(e) => format!("{} / {e}", e.reason()),
        }
    }

    const AUTH: &str = r#"{"signature":"0x00","authorization":{}}"#;

    fn v2_doc(version: &str, extra: &str) -> String {
        format!(
            r#"{{"x402Version":{version},"accepted":{{"scheme":"exact","network":"eip155:84532","amount":"1000","asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","payTo":"0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC","maxTimeoutSeconds":60,"extra":{{"name":"USDC","version":"2"}}}},"payload":{AUTH}{extra}}}"#
        )
    }

    fn v1_doc(version: &str, extra: &str) -> String {
        format!(
            r#"{{"x402Version":{version},"scheme":"exact","network":"base-sepolia","payload":{AUTH}{extra}}}"#
        )
    }

    fn header(json: &[u8]) -> HeaderValue {
        HeaderValue::try_from(STANDARD.encode(json)).unwrap()
    }

    /// A v2 proof without the cache: the whole decoded and parsed.
    fn whole(value: &HeaderValue) -> Result<PaymentPayload, HeaderError> {
        let json = decode_text(value, usize::MAX)?;
        v2_or_refusal(&json, v2::PaymentPayload::from_json(&json))
    }

    fn described(r: Result<PaymentPayload, HeaderError>) -> String {
        match r {
            Ok(p) => format!("{p:?}"),
            Err(e) => format!("{} / {e}", e.reason()),
        }
    }

    /// Each seed decoded once (its start kept), then every byte near each of its seams
    /// (`seams` gives their offsets) replaced, dropped or doubled, and some documents cut,
    /// padded or broken as base64: the same payload or the same refusal as without the kept
    /// start. Returns how many went through a kept start.
    fn kept_starts_agree(seeds: &[String], seams: impl Fn(&str) -> Vec<usize>) -> usize {
        let mut hits = 0;
        for seed in seeds {
            PREFIXES.with_borrow_mut(|p| p.slots.clear());
            assert!(decode_v2(&header(seed.as_bytes()), usize::MAX).is_ok());
            assert_eq!(PREFIXES.with_borrow(|p| p.slots.len()), 1, "{seed}");
            let at = seed.find(r#""payload":"#).unwrap() + 10;
            let near = seams(seed);
            let mut docs = Vec::new();
            for (i, ch) in seed.char_indices() {
                let close = near.iter().any(|&s| i + 8 >= s && i <= s + 8);
                if !close && (i + 8 < at || i > at + 40) && i + 24 < seed.len() {
                    continue;
                }
                let end = i + ch.len_utf8();
                for r in [
                    "", " ", "\"", "\\", "0", "}", ",", "é", "\u{1}", "null", "-", "+",
                ] {
                    docs.push(format!("{}{r}{}", &seed[..i], &seed[end..]).into_bytes());
                }
                docs.push(format!("{}{ch}{}", &seed[..end], &seed[end..]).into_bytes());
            }
            docs.push([&seed.as_bytes()[..at], b"{\"x\":\"\xe3\"}}"].concat());
            docs.push(
                seed.replacen(r#""x402Version":2"#, r#""x402Version":1"#, 1)
                    .into_bytes(),
            );
            for (n, doc) in docs.iter().enumerate() {
                let good = STANDARD.encode(doc);
                let mut texts = vec![good.clone()];
                // Cut, padded or with a bad character, for some.
                if n % 8 == 0 {
                    texts.push(format!("{good}="));
                    texts.push(good[..good.len() - 1].to_owned());
                    let (a, b) = good.split_at(good.len() - 8);
                    texts.push(format!("{a}-{}", &b[1..]));
                }
                for text in texts {
                    let value = HeaderValue::try_from(text).unwrap();
                    hits +=
                        usize::from(PREFIXES.with_borrow(|p| p.find(value.as_bytes()).is_some()));
                    assert_eq!(
                        described(decode_v2(&value, usize::MAX)),
                        described(whole(&value)),
                        "{}",
                        String::from_utf8_lossy(doc)
                    );
                }
            }
        }
        hits
    }

    const ACCEPTED: &str = r#"{"amount":"10000","asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","extra":{"name":"USDC","version":"2"},"maxTimeoutSeconds":60,"network":"eip155:84532","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","scheme":"exact"}"#;

    /// A proof in the harness's key order (sorted) and in the official clients' order
    /// (`resource` echoed), `accepted` as given.
    fn seeds(accepted: &str) -> [String; 2] {
        use super::super::compact::SIG;
        let payload = format!(
            r#"{{"signature":"{SIG}","authorization":{{"from":"0x857b06519E91e3A54538791bDbb0E22373e36b66","to":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","value":"10000","validAfter":"1740672089","validBefore":"1740672154","nonce":"0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"}}}}"#
        );
        let resource = r#"{"url":"https://api.example.com/weather","description":"Wéather"}"#;
        [
            // Keys sorted (`test_util::v2_json`): `x402Version` after `payload`.
            format!(r#"{{"accepted":{accepted},"payload":{payload},"x402Version":2}}"#),
            format!(
                r#"{{"x402Version":2,"resource":{resource},"accepted":{accepted},"payload":{payload}}}"#
            ),
        ]
    }

    #[test]
    fn a_kept_start_decodes_as_the_whole() {
        let hits = kept_starts_agree(&seeds(ACCEPTED), |_| Vec::new());
        assert!(hits > 500, "{hits}");
    }

    /// A bound challenge's start is kept around its id: proofs with other ids (each offset of
    /// the id modulo a quantum) read the kept text and decode as the whole does, and every
    /// byte near the id's ends altered, dropped or doubled gives the uncached answer.
    #[test]
    fn a_kept_bound_start_decodes_as_the_whole() {
        let id = "AQAAAAAAAGlw4y5UPEjx-zrnMfVd_0zzpTj4SbZzn2TGkF3dFjsY9Jq0Ua6R";
        assert_eq!(id.len(), 60);
        let mut hits = 0;
        // Three places of the id in its quanta (the lead before it: 0, 1 or 2 bytes).
        for pad in ["", "x", "xy"] {
            let entry = format!(r#""a":"{pad}","challenge":"{id}","name":"USDC""#);
            let accepted = ACCEPTED.replacen(r#""name":"USDC""#, &entry, 1);
            let seeds = seeds(&accepted);
            hits += kept_starts_agree(&seeds, |seed| {
                let at = seed.find(id).unwrap();
                vec![at, at + id.len()]
            });
            for seed in &seeds {
                PREFIXES.with_borrow_mut(|p| p.slots.clear());
                assert!(decode_v2(&header(seed.as_bytes()), usize::MAX).is_ok());
                // Other ids: fresh ones hit and read their own id; others (another length,
                // a character outside base64url, an escape) decode as the whole does.
                let others = [
                    "B".repeat(60),
                    "-_09azAZ".repeat(8)[..60].to_owned(),
                    id[..59].to_owned(),
                    format!("{id}A"),
                    format!("{}+", &id[..59]),
                    format!("{}=", &id[..59]),
                    format!("{}\\u0041", &id[..54]),
                    format!("{}\"", &id[..59]),
                    format!("é{}", &id[..58]),
                ];
                for (n, other) in others.iter().enumerate() {
                    let doc = seed.replacen(id, other, 1);
                    let value = header(doc.as_bytes());
                    let hit = PREFIXES.with_borrow(|p| {
                        p.find(value.as_bytes())
                            .and_then(|k| resume(value.as_bytes(), k))
                    });
                    assert_eq!(hit.is_some(), n < 2, "{doc}");
                    let got = decode_v2(&value, usize::MAX);
                    assert_eq!(described(got), described(whole(&value)), "{doc}");
                    if n < 2 {
                        let Ok(PaymentPayload::V2(p)) = decode_v2(&value, usize::MAX) else {
                            panic!("{doc}")
                        };
                        assert_eq!(p.accepted.extra_str("challenge"), Some(other.as_str()));
                        hits += 1;
                    }
                }
            }
        }
        assert!(hits > 500, "{hits}");
    }

    #[test]
    fn single_pass_keeps_every_refusal() {
        let v2_ok = v2_doc("2", "");
        let v1_ok = v1_doc("1", "");
        let docs: Vec<Vec<u8>> = vec![
            v2_ok.clone().into_bytes(),
            v1_ok.clone().into_bytes(),
            // The other version's document, or a version number that is neither.
            v2_doc("1", "").into_bytes(),
            v1_doc("2", "").into_bytes(),
            v2_doc("3", "").into_bytes(),
            v1_doc("0", "").into_bytes(),
            v2_doc("300", "").into_bytes(),
            v2_doc("18446744073709551615", "").into_bytes(),
            // Not a version: wrong types, missing, repeated.
            v2_doc("\"2\"", "").into_bytes(),
            v2_doc("2.0", "").into_bytes(),
            v2_doc("-2", "").into_bytes(),
            v2_doc("null", "").into_bytes(),
            v2_ok.replacen(r#""x402Version":2,"#, "", 1).into_bytes(),
            v2_doc("2", r#","x402Version":2"#).into_bytes(),
            v1_doc("1", r#","x402Version":1"#).into_bytes(),
            v2_doc("1", r#","x402Version":2"#).into_bytes(),
            // Right version, wrong shape: a repeated or missing field, a bad value.
            v2_doc("2", r#","payload":{}"#).into_bytes(),
            v2_ok
                .replace(r#""amount":"1000""#, r#""amount":1000"#)
                .into_bytes(),
            v2_ok.replace("eip155:84532", "base-sepolia").into_bytes(),
            v1_ok.replace("base-sepolia", "eip155:84532").into_bytes(),
            v1_ok.replace(r#""scheme":"exact","#, "").into_bytes(),
            // Wrong version and wrong shape: the version is the reason.
            v1_doc("3", r#","scheme":"x""#).into_bytes(),
            br#"{"x402Version":1}"#.to_vec(),
            br#"{"x402Version":2}"#.to_vec(),
            // Not JSON, or more than one document.
            b"".to_vec(),
            b"null".to_vec(),
            b"[2]".to_vec(),
            b"{\"x402Version\":2".to_vec(),
            format!("{v2_ok} {{}}").into_bytes(),
            format!("{v2_ok}x").into_bytes(),
            format!(" {v2_ok}\n").into_bytes(),
            // Unknown fields are ignored, whatever their place.
            v2_doc("2", r#","extensions":{},"future":[1,{"a":null}]"#).into_bytes(),
            format!(r#"{{"z":1,{}"#, &v1_ok[1..]).into_bytes(),
        ];
        let all = [(true, true), (true, false), (false, true)];
        let mut checked = 0;
        for json in &docs {
            for name in [PAYMENT_SIGNATURE, X_PAYMENT] {
                for (v1, v2) in all {
                    let limits = Limits {
                        v1,
                        v2,
                        ..Limits::default()
                    };
                    let mut headers = HeaderMap::new();
                    headers.insert(name.clone(), header(json));
                    let (new, old) = (decode_payload(&headers, limits), two_pass(&headers, limits));
                    assert_eq!(
                        outcome(&new),
                        outcome(&old),
                        "{} in {name} with v1 {v1} v2 {v2}",
                        String::from_utf8_lossy(json)
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, docs.len() * 6);
        // The documents above reach every outcome: both payloads and both refusal reasons.
        let limits = Limits::default();
        let reach = |name: HeaderName, json: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, header(json.as_bytes()));
            outcome(&decode_payload(&headers, limits))
        };
        assert_eq!(reach(PAYMENT_SIGNATURE, &v2_ok), "payload v2");
        assert_eq!(reach(X_PAYMENT, &v1_ok), "payload v1");
        assert!(
            reach(PAYMENT_SIGNATURE, &v1_ok).starts_with("invalid_x402_version / x402Version 1 ")
        );
        assert!(reach(X_PAYMENT, &v2_ok).starts_with("invalid_x402_version / x402Version 2 "));
        assert!(
            reach(PAYMENT_SIGNATURE, &v2_doc("2", r#","payload":{}"#))
                .contains("duplicate field `payload`")
        );
        assert!(reach(PAYMENT_SIGNATURE, "{").starts_with("invalid_payload / "));
    }

    #[test]
    fn single_pass_keeps_the_header_refusals() {
        let json = v2_doc("2", "");
        let value = header(json.as_bytes());
        let limits = Limits::default();
        type Sent = Vec<(HeaderName, HeaderValue)>;
        let cases: Vec<(Sent, Limits, &str)> = vec![
            (vec![], limits, "none"),
            (
                vec![
                    (PAYMENT_SIGNATURE, value.clone()),
                    (X_PAYMENT, value.clone()),
                ],
                limits,
                "invalid_payload / both PAYMENT-SIGNATURE and X-PAYMENT present",
            ),
            (
                vec![
                    (PAYMENT_SIGNATURE, value.clone()),
                    (PAYMENT_SIGNATURE, value.clone()),
                ],
                limits,
                "invalid_payload / payment header repeated",
            ),
            (
                vec![(X_PAYMENT, value.clone()), (X_PAYMENT, value.clone())],
                limits,
                "invalid_payload / payment header repeated",
            ),
            (
                vec![(PAYMENT_SIGNATURE, value.clone())],
                Limits {
                    max_bytes: value.len() - 1,
                    ..limits
                },
                "invalid_payload / payment header is",
            ),
            (
                vec![(PAYMENT_SIGNATURE, value.clone())],
                Limits {
                    max_bytes: value.len(),
                    ..limits
                },
                "payload v2",
            ),
            (
                vec![(PAYMENT_SIGNATURE, HeaderValue::from_static("e30"))],
                limits,
                "invalid_payload / payment header is not canonical standard base64",
            ),
            (
                vec![(
                    PAYMENT_SIGNATURE,
                    header(b"{\"x402Version\":2,\"x\":\"\xe3\"}"),
                )],
                limits,
                "invalid_payload / payment header does not decode to UTF-8",
            ),
            // A disabled version, and a header too large for a disabled version.
            (
                vec![(PAYMENT_SIGNATURE, value.clone())],
                Limits {
                    v2: false,
                    ..limits
                },
                "invalid_x402_version / x402Version 2 ",
            ),
            (
                vec![(PAYMENT_SIGNATURE, value.clone())],
                Limits {
                    v2: false,
                    max_bytes: 10,
                    ..limits
                },
                "invalid_payload / payment header is",
            ),
        ];
        for (list, limits, want) in cases {
            let mut headers = HeaderMap::new();
            for (name, value) in &list {
                headers.append(name.clone(), value.clone());
            }
            let (new, old) = (decode_payload(&headers, limits), two_pass(&headers, limits));
            assert!(
                outcome(&new).starts_with(want),
                "{list:?}: {}",
                outcome(&new)
            );
            assert_eq!(outcome(&new), outcome(&old), "{list:?}");
            if want.ends_with("payment header is") {
                assert!(new.unwrap_err().is_too_large());
            }
        }
    }
}
