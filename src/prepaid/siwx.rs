//! Sign-in-with-x (CAIP-122 / EIP-4361) as the x402 `sign-in-with-x` extension: the challenge
//! the server declares, the `SIGN-IN-WITH-X` proof it checks, and the server-issued nonces.
//!
//! The message is rebuilt exactly as `@x402/extensions` 2.27.0 has the client build it
//! (`formatSIWEMessage`, through `@signinwithethereum/siwe` 4.2.1 `toMessage`), then its
//! EIP-191 hash is checked:
//!
//! 1. A 65-byte signature is recovered in-process (EIP-191 `personal_sign`, no I/O). If it
//!    recovers to `address`, the sign-in is an EOA's and the chain is never asked.
//! 2. Otherwise, when [`Prepaid::contract_signatures`](super::Prepaid::contract_signatures) is
//!    set, the signature (any length up to [`MAX_SIGNATURE_BYTES`] decoded) goes to the chain:
//!    ERC-1271 `isValidSignature` of a deployed smart wallet, or ERC-6492 (a signature
//!    ending in [`ERC6492_SUFFIX`], wrapping the factory call that would deploy the wallet)
//!    for one not deployed yet. The chain's answer decides: a long signature from an address
//!    with code is never accepted on its own. The sign-in nonce is reserved before the call
//!    (a replayed message never reaches the chain), kept only when the chain says valid, and
//!    released when it says invalid or cannot answer (503): the same message may be retried.
//! 3. Without a checker, only EOA signatures verify, as before: other lengths are malformed
//!    (400) and a 65-byte signature of another key is refused (401).
//!
//! Smart wallets sign the same EIP-191 message, so `supportedChains` stays `type: "eip191"`.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use alloy_primitives::{Address, B256, Bytes, eip191_hash_message, hex};
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::Network;
use crate::prepaid::wallets::{ERC6492_SUFFIX, Erc6492, MAX_SIGNATURE_BYTES};
use crate::proto::header::{self, HeaderError};
use crate::verify::exact::recover_signer;

/// The extension's key in `extensions` and the request header carrying the proof.
pub const EXTENSION: &str = "sign-in-with-x";
/// The request header carrying the signed message (base64 JSON).
pub const SIGN_IN_WITH_X: HeaderName = HeaderName::from_static("sign-in-with-x");

/// Why a `SIGN-IN-WITH-X` proof was refused. [`Self::reason`] is what the client sees.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SiwxError {
    /// The header is not base64 JSON of a sign-in message (or too large, or repeated).
    #[error("SIGN-IN-WITH-X header: {0}")]
    Header(#[from] HeaderError),
    /// A field is missing, has the wrong type, or holds a line break (which would let one
    /// signed text be read as another message).
    #[error("malformed sign-in message: {0}")]
    Malformed(&'static str),
    /// The signature is not `0x` hex of 65 bytes (or, with a contract-signature checker, of
    /// 1 to [`MAX_SIGNATURE_BYTES`] bytes, a well-formed ERC-6492 wrapping if it ends in the
    /// suffix).
    #[error("malformed signature")]
    MalformedSignature,
    /// `domain` is not this server's.
    #[error("domain {0:?} is not this server's")]
    Domain(String),
    /// `uri` is not on this server's origin.
    #[error("uri {0:?} is not on this server's origin")]
    Uri(String),
    /// Not version 1, not `eip191`, or a chain the route does not offer.
    #[error("unsupported chain or signature type")]
    UnsupportedChain,
    /// The nonce was not issued by this server (or `issuedAt`/`expirationTime` were changed).
    #[error("nonce not issued by this server")]
    Nonce,
    /// The message expired.
    #[error("sign-in message expired at {expired_at}")]
    Expired {
        /// Unix seconds.
        expired_at: u64,
    },
    /// A `notBefore` the server did not issue: refused rather than guessed.
    #[error("notBefore is not supported")]
    NotBefore,
    /// The signature does not recover to `address` (or is not an EOA signature).
    #[error("signature recovers to {recovered:?}, not {claimed}")]
    Signature {
        /// The address claimed.
        claimed: Address,
        /// What the signature recovers to, if anything.
        recovered: Option<Address>,
    },
    /// The chain says the signature is not `address`'s (ERC-1271 / ERC-6492), or no RPC is
    /// configured for the message's chain.
    #[error("the chain does not accept this signature for {claimed}")]
    ContractSignature {
        /// The address claimed.
        claimed: Address,
    },
}

impl SiwxError {
    /// The reason code sent to the client (the `@x402/extensions` codes where they exist).
    pub fn reason(&self) -> crate::reason::Reason {
        match self {
            Self::Header(_) | Self::Malformed(_) => reason::INVALID_SIWX_PAYLOAD,
            Self::MalformedSignature => reason::MALFORMED_SIGNATURE,
            Self::Domain(_) => reason::DOMAIN_MISMATCH,
            Self::Uri(_) => reason::URI_MISMATCH,
            Self::UnsupportedChain => reason::UNSUPPORTED_CHAIN,
            Self::Nonce => reason::INVALID_NONCE,
            Self::Expired { .. } => reason::EXPIRED,
            Self::NotBefore => reason::NOT_BEFORE,
            Self::Signature { .. } | Self::ContractSignature { .. } => reason::INVALID_SIGNATURE,
        }
    }

    /// True when the header itself is unreadable (answered 400, or 431 when too large);
    /// every other refusal is 401.
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            Self::Header(_) | Self::Malformed(_) | Self::MalformedSignature
        )
    }
}

/// Reason codes of sign-in refusals.
pub mod reason {
    use crate::reason::Reason;

    /// The header is not base64 JSON of a sign-in message.
    pub const INVALID_SIWX_PAYLOAD: Reason = Reason::InvalidSiwxPayload;
    /// The signature is not 65 bytes of hex (or too long, or a broken ERC-6492 wrapping).
    pub const MALFORMED_SIGNATURE: Reason = Reason::InvalidSiwxMalformedSignature;
    /// `domain` is not this server's.
    pub const DOMAIN_MISMATCH: Reason = Reason::InvalidSiwxDomainMismatch;
    /// `uri` is not on this server's origin.
    pub const URI_MISMATCH: Reason = Reason::InvalidSiwxUriMismatch;
    /// Version, signature type or chain not offered.
    pub const UNSUPPORTED_CHAIN: Reason = Reason::InvalidSiwxUnsupportedChain;
    /// The nonce was not issued by this server.
    pub const INVALID_NONCE: Reason = Reason::InvalidSiwxNonce;
    /// The nonce was already used: a replayed message.
    pub const NONCE_REUSED: Reason = Reason::InvalidSiwxNonceReused;
    /// The message expired.
    pub const EXPIRED: Reason = Reason::InvalidSiwxExpired;
    /// `notBefore` is not supported.
    pub const NOT_BEFORE: Reason = Reason::InvalidSiwxNotBefore;
    /// The signature does not recover to `address`, and the chain (if asked) refused it.
    pub const INVALID_SIGNATURE: Reason = Reason::InvalidSiwxSignature;
}

/// The `SIGN-IN-WITH-X` payload (field names of `@x402/extensions`' `SIWxPayloadSchema`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Payload {
    domain: String,
    address: String,
    statement: Option<String>,
    uri: String,
    version: String,
    chain_id: String,
    #[serde(rename = "type")]
    kind: String,
    nonce: String,
    issued_at: String,
    expiration_time: Option<String>,
    not_before: Option<String>,
    request_id: Option<String>,
    resources: Option<Vec<String>>,
    signature_scheme: Option<String>,
    signature: String,
}

/// Reads the header: `Ok(None)` when absent.
pub(crate) fn decode(headers: &HeaderMap, max_bytes: usize) -> Result<Option<Payload>, SiwxError> {
    let Some(value) = header::single(headers, &SIGN_IN_WITH_X)? else {
        return Ok(None);
    };
    let json = header::decode_bytes(value, max_bytes)?;
    let payload: Payload = serde_json::from_slice(&json).map_err(HeaderError::Json)?;
    let texts = [
        &payload.domain,
        &payload.address,
        &payload.uri,
        &payload.version,
        &payload.chain_id,
        &payload.nonce,
        &payload.issued_at,
    ];
    let optional = [
        &payload.statement,
        &payload.expiration_time,
        &payload.not_before,
        &payload.request_id,
    ];
    let lines = texts
        .into_iter()
        .chain(optional.into_iter().flatten())
        .chain(payload.resources.iter().flatten());
    if lines.into_iter().any(|s| s.contains(['\n', '\r'])) {
        return Err(SiwxError::Malformed("a field holds a line break"));
    }
    Ok(Some(payload))
}

/// The public origin the messages are bound to.
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    /// `scheme://authority`.
    pub(crate) origin: String,
    /// `authority` (host and port), the EIP-4361 `domain`.
    pub(crate) domain: String,
}

impl Origin {
    /// From the layer's `resource_base` (`https://api.example.com[/prefix]`).
    pub(crate) fn parse(base: &str) -> Option<Self> {
        let uri = http::Uri::from_str(base).ok()?;
        let scheme = uri.scheme_str()?;
        if scheme != "http" && scheme != "https" {
            return None;
        }
        let authority = uri.authority()?.as_str();
        // Credentials in the origin would end up in every message.
        if authority.contains('@') {
            return None;
        }
        Some(Self {
            origin: format!("{scheme}://{authority}"),
            domain: authority.to_owned(),
        })
    }
}

/// Issues and checks nonces: `issued (8 bytes) | random (8) | HMAC (16)`, 64 hex characters.
/// Stateless: any instance holding the key checks them, and junk never reaches a store.
pub(crate) struct Nonces {
    key: [u8; 32],
    /// Seconds a challenge stays valid.
    pub(crate) ttl: u64,
}

type HmacSha256 = Hmac<Sha256>;

impl Nonces {
    pub(crate) fn new(key: [u8; 32], ttl: u64) -> Self {
        Self { key, ttl }
    }

    fn mac(&self, head: &[u8; 16], domain: &str) -> [u8; 16] {
        let mut out = [0u8; 16];
        // HMAC takes keys of any length: `new_from_slice` cannot fail here.
        if let Ok(mut mac) = HmacSha256::new_from_slice(&self.key) {
            mac.update(b"tower-x402 siwx nonce\0");
            mac.update(head);
            mac.update(domain.as_bytes());
            out.copy_from_slice(&mac.finalize().into_bytes()[..16]);
        }
        out
    }

    /// A fresh nonce issued at `now` for `domain`.
    pub(crate) fn issue(&self, now: u64, domain: &str) -> B256 {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&now.to_be_bytes());
        // The MAC, not these bytes, makes the nonce unforgeable; they only make it unique. So
        // if the OS generator fails, a process counter stands in rather than failing the 402
        // (a repeat across instances in one second is refused by the one-use store: 401).
        if getrandom::fill(&mut bytes[8..16]).is_err() {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            bytes[8..16].copy_from_slice(&n.to_be_bytes());
        }
        let mut head = [0u8; 16];
        head.copy_from_slice(&bytes[..16]);
        bytes[16..].copy_from_slice(&self.mac(&head, domain));
        B256::from(bytes)
    }

    /// The nonce's bytes and issue time, if this server issued it for `domain`.
    fn check(&self, nonce: &str, domain: &str) -> Option<(B256, u64)> {
        if nonce.len() != 64 {
            return None;
        }
        let bytes: [u8; 32] = hex::decode(nonce).ok()?.try_into().ok()?;
        let mut head = [0u8; 16];
        head.copy_from_slice(&bytes[..16]);
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        mac.update(b"tower-x402 siwx nonce\0");
        mac.update(&head);
        mac.update(domain.as_bytes());
        // Constant time, over the truncated tag.
        mac.verify_truncated_left(&bytes[16..]).ok()?;
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&bytes[..8]);
        Some((B256::from(bytes), u64::from_be_bytes(issued)))
    }
}

/// The `extensions["sign-in-with-x"]` declaration of one challenge, with a fresh nonce.
pub(crate) fn declaration(
    nonces: &Nonces,
    origin: &Origin,
    statement: Option<&str>,
    url: &str,
    chains: impl Iterator<Item = Network>,
    now: u64,
    schema: &Value,
) -> Value {
    let nonce = nonces.issue(now, &origin.domain);
    let mut info = Map::new();
    info.insert("domain".into(), Value::String(origin.domain.clone()));
    info.insert("uri".into(), Value::String(url.to_owned()));
    info.insert("version".into(), Value::String("1".into()));
    info.insert("nonce".into(), Value::String(hex::encode(nonce)));
    info.insert("issuedAt".into(), Value::String(iso8601(now)));
    info.insert(
        "expirationTime".into(),
        Value::String(iso8601(now.saturating_add(nonces.ttl))),
    );
    if let Some(s) = statement {
        info.insert("statement".into(), Value::String(s.to_owned()));
    }
    info.insert("resources".into(), json!([url]));
    let mut seen = Vec::new();
    let chains: Vec<Value> = chains
        .filter(|n| {
            let new = !seen.contains(n);
            seen.push(*n);
            new
        })
        .map(|n| json!({"chainId": n.caip2(), "type": "eip191"}))
        .collect();
    json!({"info": info, "supportedChains": chains, "schema": schema})
}

/// The JSON schema the official server sends along (`buildSIWxSchema`).
pub(crate) fn schema() -> Value {
    let s = json!({"type": "string"});
    let dt = json!({"type": "string", "format": "date-time"});
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "domain": s, "address": s, "statement": s,
            "uri": {"type": "string", "format": "uri"},
            "version": s, "chainId": s, "type": s, "nonce": s,
            "issuedAt": dt, "expirationTime": dt, "notBefore": dt, "requestId": s,
            "resources": {"type": "array", "items": {"type": "string", "format": "uri"}},
            "signature": s
        },
        "required": ["domain", "address", "uri", "version", "chainId", "type", "nonce",
            "issuedAt", "signature"]
    })
}

/// A checked sign-in: who signed and the nonce to spend (once).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SignIn {
    pub(crate) address: Address,
    pub(crate) chain_id: u64,
    pub(crate) nonce: B256,
    /// Unix seconds after which the message is void (the nonce may be forgotten then).
    pub(crate) expires_at: u64,
}

/// What [`check`] concluded.
#[derive(Debug)]
pub(crate) enum Checked {
    /// An EOA signature, recovered in-process.
    Signed(SignIn),
    /// Everything holds but the signature, which only the chain can judge.
    Contract {
        sign_in: SignIn,
        /// The EIP-191 hash of the message.
        hash: B256,
        signature: Bytes,
    },
}

/// A decoded signature: 65 bytes on the stack (the EOA fast path), or a longer one.
enum Signature {
    Eoa([u8; 65]),
    Long(Bytes),
}

/// Decodes `0x`-hex: 65 bytes always; other lengths (1 to [`MAX_SIGNATURE_BYTES`], a
/// well-formed ERC-6492 wrapping when it has the suffix) only when `long` is allowed.
fn signature(text: &str, long: bool) -> Result<Signature, SiwxError> {
    let digits = text
        .strip_prefix("0x")
        .ok_or(SiwxError::MalformedSignature)?;
    if digits.len() == 130 {
        let mut sig = [0u8; 65];
        return hex::decode_to_slice(digits, &mut sig)
            .map(|()| Signature::Eoa(sig))
            .map_err(|_| SiwxError::MalformedSignature);
    }
    // Bounded before decoding, and long before any chain call.
    if !long || digits.is_empty() || digits.len() > 2 * MAX_SIGNATURE_BYTES {
        return Err(SiwxError::MalformedSignature);
    }
    let bytes = hex::decode(digits).map_err(|_| SiwxError::MalformedSignature)?;
    if bytes.ends_with(ERC6492_SUFFIX.as_slice())
        && Erc6492::decode(&bytes).is_some_and(|w| w.is_err())
    {
        return Err(SiwxError::MalformedSignature);
    }
    Ok(Signature::Long(bytes.into()))
}

/// Checks everything but the nonce's single use, cheapest first: fields, origin, chain, the
/// nonce's MAC and age, then the signature in-process. With `contracts` (a
/// contract-signature checker is configured), a signature that is not the EOA's of `address`
/// is handed back for the chain to judge.
pub(crate) fn check(
    payload: &Payload,
    nonces: &Nonces,
    origin: &Origin,
    chains: &[Network],
    now: u64,
    contracts: bool,
) -> Result<Checked, SiwxError> {
    let address = Address::from_str(&payload.address)
        .map_err(|_| SiwxError::Malformed("address is not a 20-byte hex address"))?;
    let signature = signature(&payload.signature, contracts)?;
    if payload.domain != origin.domain {
        return Err(SiwxError::Domain(payload.domain.clone()));
    }
    let on_origin = payload
        .uri
        .strip_prefix(&origin.origin)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#']));
    if !on_origin {
        return Err(SiwxError::Uri(payload.uri.clone()));
    }
    let chain = payload
        .chain_id
        .strip_prefix("eip155:")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|_| payload.version == "1" && payload.kind == "eip191")
        .filter(|_| {
            payload
                .signature_scheme
                .as_deref()
                .is_none_or(|s| s == "eip191")
        })
        .filter(|id| chains.iter().any(|n| n.chain_id() == *id))
        .ok_or(SiwxError::UnsupportedChain)?;
    let (nonce, issued) = nonces
        .check(&payload.nonce, &origin.domain)
        .ok_or(SiwxError::Nonce)?;
    let expires_at = issued.saturating_add(nonces.ttl);
    // The times are the server's own, bound by the nonce: any other value was altered.
    if payload.issued_at != iso8601(issued)
        || payload.expiration_time.as_deref() != Some(iso8601(expires_at).as_str())
    {
        return Err(SiwxError::Nonce);
    }
    if now >= expires_at {
        return Err(SiwxError::Expired {
            expired_at: expires_at,
        });
    }
    if payload.not_before.is_some() {
        return Err(SiwxError::NotBefore);
    }
    let hash = eip191_hash_message(message(payload, address, chain).as_bytes());
    let sign_in = SignIn {
        address,
        chain_id: chain,
        nonce,
        expires_at,
    };
    let signature = match signature {
        Signature::Eoa(sig) => {
            let recovered = recover_signer(hash, &sig).ok();
            if recovered == Some(address) {
                return Ok(Checked::Signed(sign_in));
            }
            if !contracts {
                return Err(SiwxError::Signature {
                    claimed: address,
                    recovered,
                });
            }
            // An owner's key signing for its wallet, say: the wallet decides.
            Bytes::copy_from_slice(&sig)
        }
        Signature::Long(sig) => sig,
    };
    Ok(Checked::Contract {
        sign_in,
        hash,
        signature,
    })
}

/// The EIP-4361 text, byte for byte as `@signinwithethereum/siwe` 4.2.1 `toMessage` writes it
/// (the address EIP-55 checksummed, as that library normalizes it).
pub(crate) fn message(p: &Payload, address: Address, chain_id: u64) -> String {
    let mut head = format!(
        "{} wants you to sign in with your Ethereum account:\n{}",
        p.domain,
        address.to_checksum(None)
    );
    match &p.statement {
        Some(s) => {
            head.push_str("\n\n");
            head.push_str(s);
            head.push('\n');
        }
        None => head.push_str("\n\n"),
    }
    let mut lines = vec![
        format!("URI: {}", p.uri),
        format!("Version: {}", p.version),
        format!("Chain ID: {chain_id}"),
        format!("Nonce: {}", p.nonce),
        format!("Issued At: {}", p.issued_at),
    ];
    if let Some(t) = &p.expiration_time {
        lines.push(format!("Expiration Time: {t}"));
    }
    if let Some(t) = &p.not_before {
        lines.push(format!("Not Before: {t}"));
    }
    if let Some(r) = &p.request_id {
        lines.push(format!("Request ID: {r}"));
    }
    if let Some(resources) = &p.resources {
        let mut block = String::from("Resources:");
        for r in resources {
            block.push_str("\n- ");
            block.push_str(r);
        }
        lines.push(block);
    }
    format!("{head}\n{}", lines.join("\n"))
}

/// `YYYY-MM-DDTHH:MM:SS.000Z` (JavaScript's `toISOString`) of Unix seconds.
pub(crate) fn iso8601(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.000Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_matches_javascript() {
        // new Date(s * 1000).toISOString()
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_700_000_000), "2023-11-14T22:13:20.000Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601(4_102_444_799), "2099-12-31T23:59:59.000Z");
    }

    #[test]
    fn nonces_are_bound_to_key_and_domain() {
        let n = Nonces::new([7; 32], 300);
        let nonce = hex::encode(n.issue(1_700_000_000, "api.example"));
        assert_eq!(nonce.len(), 64);
        assert_eq!(
            n.check(&nonce, "api.example").map(|(_, t)| t),
            Some(1_700_000_000)
        );
        assert!(n.check(&nonce, "evil.example").is_none());
        assert!(
            Nonces::new([8; 32], 300)
                .check(&nonce, "api.example")
                .is_none()
        );
        let mut flipped = nonce.into_bytes();
        flipped[3] = if flipped[3] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(n.check(&flipped, "api.example").is_none());
    }

    #[test]
    fn origin_from_resource_base() {
        let o = Origin::parse("https://api.example.com:8443/v1").unwrap();
        assert_eq!(o.origin, "https://api.example.com:8443");
        assert_eq!(o.domain, "api.example.com:8443");
        assert!(Origin::parse("api.example.com").is_none());
        assert!(Origin::parse("ftp://api.example.com").is_none());
        assert!(Origin::parse("https://u:p@api.example.com").is_none());
    }
}
