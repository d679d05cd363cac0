//! Idempotent retries with the x402 `payment-identifier` extension (v2 only).
//!
//! A client that lost the answer to a paid request (timeout, dropped connection) wants to
//! send the same request again without paying twice and without running the handler twice.
//! With [`PaymentLayerBuilder::idempotency`](crate::PaymentLayerBuilder::idempotency) the
//! layer advertises the extension in its v2 challenge:
//!
//! ```json
//! "extensions": { "payment-identifier": { "info": { "required": false }, "schema": { … } } }
//! ```
//!
//! and a client echoes it in its v2 payload with an id of 16–128 characters from
//! `[A-Za-z0-9_-]` (e.g. `pay_` and a UUID): `extensions["payment-identifier"].info.id`.
//!
//! # What the layer does with an id
//!
//! After the proof is verified (so junk cannot fill the store) and before its nonce is
//! claimed, the layer calls [`IdempotencyStore::begin`] with the [`IdempotencyKey`] (payer
//! and id) and a [`Fingerprint`] of the proof and the request target:
//!
//! | store answer | response |
//! |---|---|
//! | [`Begin::Started`] | the request runs as usual |
//! | [`Begin::Done`] (same id, same proof) | the stored response (status, headers, body), as is: the handler does **not** run again and nothing is settled again |
//! | [`Begin::InProgress`] (same id, same proof, first request not finished) | 503 `payment_in_progress`, `Retry-After: 1` |
//! | [`Begin::Conflict`] (same id, another proof or another request target) | 409 `payment_identifier_conflict` |
//! | store error | 503 `service_unavailable` (fail closed, the handler does not run) |
//!
//! Without an id the request runs as usual, unless the layer was built with
//! [`idempotency_required`](crate::PaymentLayerBuilder::idempotency_required): then 400
//! `payment_identifier_required`. A malformed id gets 400 `invalid_payment_identifier`.
//!
//! **When a response is stored.** When the proof was consumed: settled (the handler's
//! response with its receipt), refused by the settler after the handler ran (the 402 with
//! its failed receipt), or `settlement_outcome_unknown` (the 503 with the pending
//! transaction: a retry is told the honest "unknown" again, not a misleading 402
//! `invalid_exact_evm_nonce_already_used`). In
//! [`BeforeHandler`](crate::settle::SettlementMode::BeforeHandler) mode the handler's answer
//! is stored whatever its status: it was paid for.
//!
//! **When the id is forgotten** ([`IdempotencyStore::abort`]): when the claim on the proof
//! was given back, so a retry runs afresh: the handler answered 400 or more (nothing
//! charged), the settler's pre-check refused, settlement failed with nothing sent, the
//! nonce store refused or failed, or the handler returned an error.
//!
//! # Bodies that are not stored
//!
//! Only a body whose [`size_hint`](http_body::Body::size_hint) has an upper bound at most the
//! limit (default 64 KiB,
//! [`idempotency_max_body`](crate::PaymentLayerBuilder::idempotency_max_body)) is buffered and
//! stored: buffering it changes nothing for the client. A streaming body (no upper bound), a
//! larger one or one with trailers passes through unbuffered and is **not replayable**: the
//! id is forgotten, so a retry with the same proof meets the replay guard and gets 402
//! `invalid_exact_evm_nonce_already_used` (never a second handler run, never a second
//! charge).
//!
//! # Failures after the payment settled
//!
//! * **The store cannot keep the response** ([`IdempotencyStore::complete`] fails twice): the
//!   client still gets the response, and the id stays in progress until it expires, so a
//!   retry gets 503 `payment_in_progress`, never a second run and never the misleading 402
//!   `nonce_already_used` that would invite it to pay again. Raised as
//!   [`Alert::IdempotencyStore`](crate::alert::Alert::IdempotencyStore), as is a failed
//!   [`abort`](IdempotencyStore::abort) (the id then stays in progress the same way).
//! * **The handler's buffered body fails while being read**: the client gets 500
//!   `{"error": "response_body_failed"}` **with the success receipt** (the money moved), and
//!   that answer is stored under the id, so a retry gets it again. Raised as
//!   [`Alert::ResponseBody`](crate::alert::Alert::ResponseBody): the payer paid for content
//!   they did not get, and the seller must refund or serve it by hand.
//! * **Settling first, the service returns an error** (not a response): nothing can be
//!   replayed, so the id stays in progress until it expires (retries get 503
//!   `payment_in_progress`, never a second charge). Raised as
//!   [`Alert::ResponseBody`](crate::alert::Alert::ResponseBody).
//! * **A streamed (unbuffered) body fails**: its status and receipt already went out with the
//!   headers; the server cuts the connection mid-body. The id was forgotten (the body is not
//!   replayable), so a retry gets 402 `nonce_already_used`; the receipt the client holds
//!   shows the payment.
//!
//! # Scope and lifetime
//!
//! * Ids are scoped per payer: two payers may pick the same id without meeting.
//! * The fingerprint covers chain, token, payer, nonce, signature, method and path with
//!   query; not the request body.
//! * An entry lives for the store's maximum TTL from `begin` (1 h by default, as the
//!   reference caches answers): the layer asks for an hour past the authorization's
//!   `validBefore`, and stores cap that. Not `validBefore` itself: a client retries a lost
//!   answer with a *fresh* proof once the first expired, and a slow handler may still be
//!   running then; an id freed at `validBefore` would let that retry run and pay again. Size a
//!   [`MemoryIdempotencyStore`]'s capacity for an hour of ids (or lower its maximum TTL).
//! * A request dropped mid-flight (the client hung up while the handler ran) leaves its id
//!   in progress until it expires: retries with it get 503 `payment_in_progress` (same
//!   proof) or 409 (a fresh proof) until then; a client that gave up on it uses a new id.
//! * A retry is verified again and passes the `before_verify`/`after_verify`
//!   [hooks](crate::hooks) like any request; a replay then tells no other hook.
//! * v1 payloads have no extensions: v1 payments run without idempotency, and
//!   `idempotency_required` does not apply to them.
//! * Stored responses are replayed without the handler's response extensions; one the layer
//!   wrote itself gets its [`PaymentRejection`] back, and every
//!   replay carries an [`IdempotentReplay`] marker.

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;

pub use memory::MemoryIdempotencyStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::PostgresIdempotencyStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisIdempotencyStore;

use std::time::Duration;

use alloy_primitives::{Address, B256, keccak256};
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde_json::{Value, json};

pub use crate::config::Idempotency;
pub use crate::nonce::{ClaimToken, StoreError};
use crate::proto::PaymentPayload;
use crate::rejection::PaymentRejection;
use crate::verify::VerifiedPayment;

/// The extension's key in `extensions`.
pub const EXTENSION: &str = "payment-identifier";
/// Shortest id accepted.
pub const MIN_ID_LEN: usize = 16;
/// Longest id accepted.
pub const MAX_ID_LEN: usize = 128;
/// `error` of the 500 sent (and stored for replay) when a paid response's body failed after
/// the payment settled; the response carries the success receipt.
pub const RESPONSE_BODY_FAILED: crate::reason::Reason = crate::reason::Reason::ResponseBodyFailed;
/// Default limit of a stored body (64 KiB).
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// A client's payment identifier: 16–128 characters from `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PaymentId(String);

/// An id that is not 16–128 characters from `[A-Za-z0-9_-]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("payment identifier must be 16-128 characters from A-Z, a-z, 0-9, '-' and '_'")]
pub struct InvalidPaymentId;

impl PaymentId {
    /// Checks and wraps `id`.
    ///
    /// ```
    /// use tower_x402::idempotency::PaymentId;
    /// assert!(PaymentId::parse("pay_7d5d747be160e280504c099d984bcfe0").is_ok());
    /// assert!(PaymentId::parse("too-short").is_err());
    /// assert!(PaymentId::parse("pay_7d5d747be160e2!").is_err());
    /// ```
    ///
    /// # Errors
    /// [`InvalidPaymentId`]: wrong length or a character outside the set.
    pub fn parse(id: &str) -> Result<Self, InvalidPaymentId> {
        let ok = (MIN_ID_LEN..=MAX_ID_LEN).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(id.to_owned()))
        } else {
            Err(InvalidPaymentId)
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PaymentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a store entry is keyed by: ids are scoped per payer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    /// The payer proven by the signature.
    pub payer: Address,
    /// The client's id.
    pub id: PaymentId,
}

/// Binds an id to one proof and one request target: a retry must match it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub B256);

impl Fingerprint {
    /// `keccak256` of chain id, token, payer, nonce, signature, method and path with query
    /// (each variable-length field preceded by its length).
    pub fn of(payment: &VerifiedPayment, method: &Method, uri: &Uri) -> Self {
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut buf = Vec::with_capacity(
            80 + 12 + payment.signature().len() + method.as_str().len() + target.len(),
        );
        buf.extend_from_slice(&payment.network.chain_id().to_be_bytes());
        buf.extend_from_slice(payment.asset.as_slice());
        buf.extend_from_slice(payment.payer.as_slice());
        buf.extend_from_slice(payment.nonce().as_slice());
        for part in [
            &payment.signature()[..],
            method.as_str().as_bytes(),
            target.as_bytes(),
        ] {
            buf.extend_from_slice(&(part.len() as u32).to_be_bytes());
            buf.extend_from_slice(part);
        }
        Self(keccak256(buf))
    }
}

/// A final response kept for replay.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers, hop-by-hop ones removed.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Set when the layer wrote the response itself (a refusal), to be put back into the
    /// replay's extensions.
    pub rejection: Option<PaymentRejection>,
}

/// A stored entry that does not decode (written by another version, or corrupted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stored response does not decode")]
pub struct CorruptResponse;

/// Marks a response replayed from the [`IdempotencyStore`] (in its extensions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdempotentReplay;

const FORMAT: u8 = 1;

impl StoredResponse {
    /// Bytes this response takes once encoded: what stores count against their budget.
    pub fn encoded_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum();
        let reason = self
            .rejection
            .as_ref()
            .and_then(|r| r.reason.as_ref())
            .map_or(0, |r| r.as_str().len());
        1 + 2 + 2 + headers + 1 + 2 + reason + 8 + 4 + self.body.len()
    }

    /// A self-delimiting binary form, for stores that keep bytes:
    /// `1 ‖ status u16 ‖ n u16 ‖ n × (name len u16 ‖ name ‖ value len u32 ‖ value) ‖
    /// rejection flag u8 [‖ reason len u16 ‖ reason ‖ retry-after ms u64] ‖ body len u32 ‖
    /// body`, big-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(FORMAT);
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        let n = self.headers.len().min(usize::from(u16::MAX));
        out.extend_from_slice(&(n as u16).to_be_bytes());
        for (name, value) in self.headers.iter().take(n) {
            out.extend_from_slice(&(name.as_str().len() as u16).to_be_bytes());
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        match &self.rejection {
            None => out.push(0),
            Some(r) => {
                out.push(1);
                let reason = r.reason.as_ref().map_or("", |r| r.as_str());
                out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
                let ms = r.retry_after.map_or(u64::MAX, |d| d.as_millis() as u64);
                out.extend_from_slice(&ms.to_be_bytes());
            }
        }
        out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Reads [`StoredResponse::to_bytes`]'s form back.
    ///
    /// # Errors
    /// [`CorruptResponse`]: anything but exactly that form.
    pub fn from_bytes(raw: &[u8]) -> Result<Self, CorruptResponse> {
        let mut r = Reader(raw);
        if r.take(1)? != [FORMAT] {
            return Err(CorruptResponse);
        }
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| CorruptResponse)?;
        let n = r.u16()?;
        let mut headers = HeaderMap::with_capacity(usize::from(n));
        for _ in 0..n {
            let len = usize::from(r.u16()?);
            let name = HeaderName::from_bytes(r.take(len)?).map_err(|_| CorruptResponse)?;
            let len = r.u32()? as usize;
            let value = HeaderValue::from_bytes(r.take(len)?).map_err(|_| CorruptResponse)?;
            headers.append(name, value);
        }
        let rejection = match r.take(1)? {
            [0] => None,
            [1] => {
                let len = usize::from(r.u16()?);
                let reason = std::str::from_utf8(r.take(len)?).map_err(|_| CorruptResponse)?;
                let ms = r.u64()?;
                Some(PaymentRejection {
                    status,
                    // A code outside the catalogue is a server-chosen (policy) one.
                    reason: (!reason.is_empty()).then(|| {
                        crate::reason::Reason::from_wire(reason)
                            .unwrap_or_else(|| crate::reason::Reason::custom(reason.to_owned()))
                    }),
                    retry_after: (ms != u64::MAX).then(|| Duration::from_millis(ms)),
                })
            }
            _ => return Err(CorruptResponse),
        };
        let len = r.u32()? as usize;
        let body = Bytes::copy_from_slice(r.take(len)?);
        if !r.0.is_empty() {
            return Err(CorruptResponse);
        }
        Ok(Self {
            status,
            headers,
            body,
            rejection,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CorruptResponse> {
        if self.0.len() < n {
            return Err(CorruptResponse);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CorruptResponse> {
        self.take(N)?.try_into().map_err(|_| CorruptResponse)
    }
    fn u16(&mut self) -> Result<u16, CorruptResponse> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, CorruptResponse> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, CorruptResponse> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

/// The answer to [`IdempotencyStore::begin`].
#[derive(Clone, Debug, PartialEq)]
pub enum Begin {
    /// This caller holds the id now; it must [`complete`](IdempotencyStore::complete) or
    /// [`abort`](IdempotencyStore::abort) with the token.
    Started(ClaimToken),
    /// The same id and fingerprint are being served by another request.
    InProgress,
    /// The same id and fingerprint were served: here is the response.
    Done(Box<StoredResponse>),
    /// The id is held (in progress or done) for another fingerprint.
    Conflict,
}

/// Where ids of idempotent payments live: small atomic operations, like
/// [`NonceStore`](crate::NonceStore)'s.
///
/// `begin` MUST be one atomic insert-if-absent across every instance sharing the store, and
/// `complete`/`abort` MUST act only for the holder of the token (compare-and-set).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for `fingerprint` until `expires_at` (Unix seconds; the layer asks for an
    /// hour past the authorization's `validBefore`; a store may cap it), or reports what
    /// holds it.
    async fn begin(
        &self,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        expires_at: u64,
    ) -> Result<Begin, StoreError>;

    /// Stores the final response of the holder; the entry keeps its expiry. Completing
    /// again with the same token and response is a no-op.
    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: ClaimToken,
        response: &StoredResponse,
    ) -> Result<(), StoreError>;

    /// Forgets the id (the holder's claim only): the next request with it runs afresh.
    async fn abort(&self, key: &IdempotencyKey, token: ClaimToken) -> Result<(), StoreError>;

    /// True if other processes share this store (Redis, a database): the layer then
    /// requires a challenge key configured the same on every instance. Default `false`.
    fn is_shared(&self) -> bool {
        false
    }
}

/// The JSON schema of the extension's `info`, as the reference (`@x402/extensions`) sends it.
pub fn schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "required": { "type": "boolean" },
            "id": {
                "type": "string",
                "minLength": MIN_ID_LEN,
                "maxLength": MAX_ID_LEN,
                "pattern": "^[a-zA-Z0-9_-]+$"
            }
        },
        "required": ["required"]
    })
}

/// The server's declaration: `{"info": {"required": ..}, "schema": ..}`.
pub fn declaration(required: bool) -> Value {
    json!({ "info": { "required": required }, "schema": schema() })
}

/// The id a payload carries: `Ok(None)` for v1, no extension or no `info.id`.
pub(crate) fn requested(payload: &PaymentPayload) -> Result<Option<PaymentId>, InvalidPaymentId> {
    let PaymentPayload::V2(p) = payload else {
        return Ok(None);
    };
    let Some(ext) = p.extensions.as_ref().and_then(|e| e.get(EXTENSION)) else {
        return Ok(None);
    };
    match ext.get("info").and_then(|i| i.get("id")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => PaymentId::parse(id).map(Some),
        Some(_) => Err(InvalidPaymentId),
    }
}

/// Headers that describe one connection, not the response: never stored.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authenticate",
];

/// `headers` without the hop-by-hop ones (and those `Connection` names).
pub(crate) fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = headers.clone();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        out.remove(name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(PaymentId::parse(&"a".repeat(16)).is_ok());
        assert!(PaymentId::parse(&"a".repeat(128)).is_ok());
        assert!(PaymentId::parse(&"a".repeat(15)).is_err());
        assert!(PaymentId::parse(&"a".repeat(129)).is_err());
        assert!(PaymentId::parse("pay_0123456789abcdé").is_err());
        assert!(PaymentId::parse("pay_0123456789 abc").is_err());
    }

    #[test]
    fn encoding_round_trips_and_rejects_junk() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let r = StoredResponse {
            status: StatusCode::SERVICE_UNAVAILABLE,
            headers,
            body: Bytes::from_static(b"{\"error\":\"settlement_outcome_unknown\"}"),
            rejection: Some(PaymentRejection {
                status: StatusCode::SERVICE_UNAVAILABLE,
                reason: Some(crate::reason::SETTLEMENT_OUTCOME_UNKNOWN),
                retry_after: Some(Duration::from_secs(5)),
            }),
        };
        let raw = r.to_bytes();
        assert_eq!(raw.len(), r.encoded_len());
        assert_eq!(StoredResponse::from_bytes(&raw), Ok(r.clone()));
        for cut in 0..raw.len() {
            assert_eq!(
                StoredResponse::from_bytes(&raw[..cut]),
                Err(CorruptResponse)
            );
        }
        let mut long = raw.clone();
        long.push(0);
        assert_eq!(StoredResponse::from_bytes(&long), Err(CorruptResponse));
        let plain = StoredResponse {
            rejection: None,
            status: StatusCode::OK,
            ..r
        };
        assert_eq!(StoredResponse::from_bytes(&plain.to_bytes()), Ok(plain));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("3"));
        let out = storable_headers(&h);
        assert_eq!(out.len(), 1);
        assert!(out.contains_key("content-length"));
    }
}
