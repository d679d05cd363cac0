//! The x402 wire format: typed messages for protocol v1 and v2, the exact-EVM payload, the
//! settlement receipt and the base64 header codec.
//!
//! Everything is parsed once, here, into typed values (`U256` amounts, `Address`es, `B256`
//! nonces, [`Network`]); nothing past this module handles protocol strings. Parsing is strict:
//! integers must be canonical decimal strings (`^(0|[1-9][0-9]*)$`, at most 2^256-1), JSON
//! numbers, hex or signs in their place are refused, and duplicate keys are an error.

pub mod batch;
pub mod exact;
pub mod header;
pub mod svm;
pub mod upto;
pub mod v1;
pub mod v2;

mod compact;
mod receipt;
pub use receipt::SettleResponse;

use serde::Deserialize;

use crate::Network;

/// The protocol version of a message (`x402Version`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum X402Version {
    /// v1: JSON body challenge, `X-PAYMENT`, v1 network names.
    V1,
    /// v2: `PAYMENT-REQUIRED` / `PAYMENT-SIGNATURE` / `PAYMENT-RESPONSE`, CAIP-2 networks.
    V2,
}

impl X402Version {
    /// The number on the wire.
    pub const fn number(self) -> u8 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }

    /// `network` as this version writes it.
    pub fn network_name(self, network: Network) -> String {
        match (self, network.v1_name()) {
            (Self::V1, Some(name)) => name.to_owned(),
            _ => network.caip2(),
        }
    }
}

/// A decoded payment proof of either protocol version.
// Not boxed: one lives per paid request and is never moved around in bulk.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum PaymentPayload {
    /// From an `X-PAYMENT` header.
    V1(v1::PaymentPayload),
    /// From a `PAYMENT-SIGNATURE` header.
    V2(v2::PaymentPayload),
}

impl PaymentPayload {
    /// The protocol version.
    pub fn version(&self) -> X402Version {
        match self {
            Self::V1(_) => X402Version::V1,
            Self::V2(_) => X402Version::V2,
        }
    }

    /// The scheme the client paid with (`exact`).
    pub fn scheme(&self) -> &str {
        match self {
            Self::V1(p) => &p.scheme,
            Self::V2(p) => &p.accepted.scheme,
        }
    }

    /// The network the client paid on.
    pub fn network(&self) -> Network {
        match self {
            Self::V1(p) => p.network,
            Self::V2(p) => p.accepted.network,
        }
    }

    /// The scheme-specific `payload` object, still as JSON text.
    pub fn raw_payload(&self) -> &SchemePayload {
        match self {
            Self::V1(p) => &p.payload,
            Self::V2(p) => &p.payload,
        }
    }
}

/// The scheme-specific `payload` object of a proof: its JSON text, as sent ([`Self::get`]),
/// and, when the header decoder read it on its way as a payload it knows (an `exact` EVM
/// payload, a `batch-settlement` voucher), that typed payload too, so the verifier does not
/// parse the text a second time.
///
/// Serialized as the JSON it holds and deserialized from any JSON value, as a
/// `Box<RawValue>` is (the type this replaces). Equality, `Debug` and `Display` are the
/// text's.
#[derive(Clone)]
pub struct SchemePayload {
    json: Box<str>,
    typed: Option<Typed>,
}

/// A payload the header decoder read on its way (the batch one boxed: it is twice the size
/// of an `exact` one, and every proof carries this field).
#[derive(Clone)]
enum Typed {
    Exact(exact::ExactEvmPayload),
    Batch(Box<batch::BatchEvmPayload>),
}

impl SchemePayload {
    /// A JSON value's text (checked to be one JSON value, as `RawValue::from_string` does).
    pub fn new(json: impl Into<String>) -> Result<Self, serde_json::Error> {
        serde_json::value::RawValue::from_string(json.into()).map(Self::from)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        &self.json
    }

    /// The text read by the header decoder's direct path as an `exact` EVM payload: valid
    /// JSON by construction (only hex and decimal strings under known keys pass that path).
    pub(crate) fn read_exact(json: &str, exact: exact::ExactEvmPayload) -> Self {
        Self {
            json: json.into(),
            typed: Some(Typed::Exact(exact)),
        }
    }

    /// The text read by the header decoder's direct path as a `batch-settlement` payload
    /// (valid JSON by construction, as for [`Self::read_exact`]).
    pub(crate) fn read_batch(json: &str, batch: batch::BatchEvmPayload) -> Self {
        Self {
            json: json.into(),
            typed: Some(Typed::Batch(Box::new(batch))),
        }
    }

    /// The `exact` EVM payload this text holds, when the header decoder already read it;
    /// `None` says nothing (parse [`Self::get`]).
    pub(crate) fn exact(&self) -> Option<&exact::ExactEvmPayload> {
        match &self.typed {
            Some(Typed::Exact(exact)) => Some(exact),
            _ => None,
        }
    }

    /// The `batch-settlement` payload this text holds, when the header decoder already read
    /// it; `None` says nothing (parse [`Self::get`]).
    pub(crate) fn batch(&self) -> Option<&batch::BatchEvmPayload> {
        match &self.typed {
            Some(Typed::Batch(batch)) => Some(batch),
            _ => None,
        }
    }
}

impl From<Box<serde_json::value::RawValue>> for SchemePayload {
    fn from(raw: Box<serde_json::value::RawValue>) -> Self {
        Self {
            json: raw.into(),
            typed: None,
        }
    }
}

impl PartialEq for SchemePayload {
    fn eq(&self, other: &Self) -> bool {
        self.json == other.json
    }
}
impl Eq for SchemePayload {}

impl std::fmt::Debug for SchemePayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SchemePayload")
            .field(&format_args!("{}", self.json))
            .finish()
    }
}

impl std::fmt::Display for SchemePayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.json)
    }
}

impl serde::Serialize for SchemePayload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Borrowed: the text is one JSON value, so this only re-checks it.
        let raw: &serde_json::value::RawValue =
            serde_json::from_str(&self.json).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SchemePayload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(d).map(Self::from)
    }
}

/// The `x402Version` of a JSON document, read to explain why a proof did not decode.
#[derive(Deserialize)]
pub(crate) struct VersionProbe {
    #[serde(rename = "x402Version")]
    pub(crate) x402_version: u64,
}

/// An account on the wire (`asset`, `payTo`): an EVM address (`0x`-hex, written EIP-55
/// checksummed) or a Solana public key (base58). The two forms cannot be confused: base58 has
/// no `0`, and text that reads as an EVM address is one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Account {
    /// An EVM address.
    Evm(alloy_primitives::Address),
    /// A Solana public key.
    Svm(svm::Pubkey),
}

impl Account {
    /// The EVM address, if this is one.
    pub fn evm(self) -> Option<alloy_primitives::Address> {
        match self {
            Self::Evm(a) => Some(a),
            Self::Svm(_) => None,
        }
    }

    /// The Solana key, if this is one.
    pub fn svm(self) -> Option<svm::Pubkey> {
        match self {
            Self::Svm(k) => Some(k),
            Self::Evm(_) => None,
        }
    }

    /// The raw bytes (20 for EVM, 32 for Solana).
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Self::Evm(a) => a.as_slice(),
            Self::Svm(k) => k.as_bytes(),
        }
    }

    /// True for the EVM zero address or the all-zero Solana key.
    pub fn is_zero(&self) -> bool {
        self.as_slice().iter().all(|b| *b == 0)
    }
}

impl From<alloy_primitives::Address> for Account {
    fn from(a: alloy_primitives::Address) -> Self {
        Self::Evm(a)
    }
}

impl From<svm::Pubkey> for Account {
    fn from(k: svm::Pubkey) -> Self {
        Self::Svm(k)
    }
}

impl PartialEq<alloy_primitives::Address> for Account {
    fn eq(&self, other: &alloy_primitives::Address) -> bool {
        *self == Self::Evm(*other)
    }
}

impl PartialEq<Account> for alloy_primitives::Address {
    fn eq(&self, other: &Account) -> bool {
        Account::Evm(*self) == *other
    }
}

impl std::fmt::Display for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Evm(a) => f.write_str(&a.to_checksum(None)),
            Self::Svm(k) => std::fmt::Display::fmt(k, f),
        }
    }
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Account {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Account {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Text {
            expecting: "an EVM address or a base58 Solana address",
            refusal: "expected an EVM address or a base58 Solana address",
            // Hex first, as alloy's `Address` reads it (with or without `0x`): every EVM
            // address reads as before (unprefixed hex can also be base58).
            parse: |s| match s.parse::<alloy_primitives::Address>() {
                Ok(a) => Some(Account::Evm(a)),
                Err(_) => s.parse().ok().map(Account::Svm),
            },
        })
    }
}

/// A visitor of a string value, read by `parse` from the borrowed text (no `String` per
/// value); `refusal` is the error when `parse` says `None`.
struct Text<T> {
    expecting: &'static str,
    refusal: &'static str,
    parse: fn(&str) -> Option<T>,
}

impl<T> serde::de::Visitor<'_> for Text<T> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
        (self.parse)(s).ok_or_else(|| E::custom(self.refusal))
    }
}

/// Serializes an address in EIP-55 checksummed form, as the reference clients write it.
pub(crate) fn checksummed<S: serde::Serializer>(
    a: &alloy_primitives::Address,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(&a.to_checksum(None))
}

/// Serde for uint256 values as canonical decimal strings (`"10000"`).
pub mod decimal {
    use alloy_primitives::U256;
    use serde::{Deserializer, Serializer};

    /// Writes `"<decimal>"`.
    pub fn serialize<S: Serializer>(v: &U256, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads a canonical decimal string; see [`parse`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<U256, D::Error> {
        // A visitor on the borrowed text: `Cow<str>` would allocate a `String` per amount.
        d.deserialize_str(super::Text {
            expecting: "a string",
            refusal: "expected a canonical decimal uint256 string",
            parse,
        })
    }

    /// `^(0|[1-9][0-9]*)$` and at most 2^256-1, else `None`. No sign, hex, space or exponent.
    pub fn parse(s: &str) -> Option<U256> {
        let canonical = !s.is_empty()
            && s.len() <= 78
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        if !canonical {
            return None;
        }
        // Amounts and timestamps fit in 19 digits: a u64 loop, not ruint's general parser.
        if s.len() <= 19 {
            let n = s.bytes().fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
            return Some(U256::from(n));
        }
        U256::from_str_radix(s, 10).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::decimal::parse;
    use alloy_primitives::U256;

    #[test]
    fn decimal_is_strict() {
        assert_eq!(parse("0"), Some(U256::ZERO));
        assert_eq!(parse("10000"), Some(U256::from(10_000)));
        assert_eq!(parse(&U256::MAX.to_string()), Some(U256::MAX));
        for bad in [
            "",
            "-1",
            "+1",
            "01",
            "0x10",
            " 1",
            "1 ",
            "1e3",
            "1.0",
            "１",
            "115792089237316195423570985008687907853269984665640564039457584007913129639936",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decimal_fast_path_agrees_with_ruint() {
        // Every length on both sides of the u64 path's 19-digit bound, and its extremes.
        let mut cases: Vec<String> = (1..=25).map(|n| "9".repeat(n)).collect();
        cases.extend((1..=25).map(|n| format!("1{}", "0".repeat(n - 1))));
        cases.extend(
            [
                "18446744073709551615",
                "18446744073709551616",
                "9223372036854775807",
            ]
            .map(String::from),
        );
        cases.push(U256::MAX.to_string());
        for s in &cases {
            assert_eq!(parse(s), U256::from_str_radix(s, 10).ok(), "{s}");
        }
    }

    #[test]
    fn decimal_serde_refusals() {
        #[derive(serde::Deserialize, Debug)]
        struct Amount {
            #[serde(with = "super::decimal")]
            v: U256,
        }
        let ok: Amount = serde_json::from_str(r#"{"v":"1000"}"#).unwrap();
        assert_eq!(ok.v, U256::from(1000));
        // An escaped digit is still the digit (serde_json unescapes before the visitor).
        let escaped: Amount = serde_json::from_str(r#"{"v":"1\u0030"}"#).unwrap();
        assert_eq!(escaped.v, U256::from(10));
        for bad in [
            r#"{"v":1000}"#,
            r#"{"v":"01"}"#,
            r#"{"v":null}"#,
            r#"{"v":["1"]}"#,
            r#"{"v":"0x1"}"#,
        ] {
            assert!(serde_json::from_str::<Amount>(bad).is_err(), "{bad}");
        }
    }
}
