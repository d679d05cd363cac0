//! Solana wire types: [`Pubkey`] (base58 on the wire) and the `exact` SVM payload, a
//! partially signed transaction. The transaction itself is decoded and checked by the `svm`
//! feature's verifier; here it is only the bytes.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A Solana account address: 32 bytes, base58 on the wire (32 to 44 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Pubkey(pub [u8; 32]);

/// Why a base58 string is not a [`Pubkey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a base58 Solana address of 32 bytes")]
pub struct PubkeyParseError;

impl Pubkey {
    /// The key from its 32 bytes.
    pub const fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses a base58 address at compile time or start-up; panics on a malformed constant
    /// (for presets and tests only, never for input).
    pub fn from_static(s: &'static str) -> Self {
        match s.parse() {
            Ok(k) => k,
            Err(_) => panic!("malformed Solana address constant {s:?}"),
        }
    }

    /// The 32 bytes.
    pub const fn to_bytes(self) -> [u8; 32] {
        self.0
    }

    /// The 32 bytes, borrowed.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Pubkey {
    type Err = PubkeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // 32 bytes are at most 44 base58 characters; refuse longer text before decoding it.
        if s.is_empty() || s.len() > 44 {
            return Err(PubkeyParseError);
        }
        let mut out = [0u8; 32];
        match bs58::decode(s).onto(&mut out) {
            Ok(32) => Ok(Self(out)),
            _ => Err(PubkeyParseError),
        }
    }
}

impl fmt::Display for Pubkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 44];
        let n = bs58::encode(&self.0)
            .onto(&mut buf[..])
            .map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Pubkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Pubkey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Pubkey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Base58;
        impl serde::de::Visitor<'_> for Base58 {
            type Value = Pubkey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a base58 Solana address")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Pubkey, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Base58)
    }
}

/// A Solana transaction signature; the first one (the fee payer's) is the transaction's id.
/// Base58 on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 88];
        let n = bs58::encode(&self.0[..])
            .onto(&mut buf[..])
            .map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Signature {
    type Err = PubkeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 88 {
            return Err(PubkeyParseError);
        }
        let mut out = [0u8; 64];
        match bs58::decode(s).onto(&mut out) {
            Ok(64) => Ok(Self(out)),
            _ => Err(PubkeyParseError),
        }
    }
}

/// `payload` of an `exact` SVM payment: the client's partially signed transaction (the
/// fee payer's signature slot still empty), base64 on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactSvmPayload {
    /// The serialized transaction.
    #[serde(with = "b64")]
    pub transaction: Vec<u8>,
}

/// Largest serialized Solana transaction (the packet size): anything longer cannot land.
pub const MAX_TRANSACTION_BYTES: usize = 1232;

mod b64 {
    use base64::Engine;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct B64;
        impl serde::de::Visitor<'_> for B64 {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a base64 transaction")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<u8>, E> {
                // Checked before decoding: a long string is refused without allocating for it.
                if s.len() > super::MAX_TRANSACTION_BYTES.div_ceil(3) * 4 {
                    return Err(E::custom("transaction longer than a Solana packet"));
                }
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|_| E::custom("transaction is not base64"))
            }
        }
        d.deserialize_str(B64)
    }
}

impl ExactSvmPayload {
    /// The payload's JSON, as a client sends it.
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"transaction":"{}"}}"#,
            base64::engine::general_purpose::STANDARD.encode(&self.transaction)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubkey_base58_round_trip_and_refusals() {
        let usdc = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v";
        let k: Pubkey = usdc.parse().unwrap();
        assert_eq!(k.to_string(), usdc);
        assert_eq!(
            Pubkey::default().to_string(),
            "11111111111111111111111111111111"
        );
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<Pubkey>(&json).unwrap(), k);
        for bad in [
            "",
            "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGG", // 25 bytes
            "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1vv",
            "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1O",
            &"1".repeat(45),
        ] {
            assert!(bad.parse::<Pubkey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn payload_is_strict() {
        let p: ExactSvmPayload = serde_json::from_str(r#"{"transaction":"AQID"}"#).unwrap();
        assert_eq!(p.transaction, vec![1, 2, 3]);
        assert_eq!(p.to_json(), r#"{"transaction":"AQID"}"#);
        for bad in [
            r#"{"transaction":"AQI"}"#,
            r#"{"transaction":1}"#,
            r#"{"transaction":"AQID","x":1}"#,
            r#"{}"#,
        ] {
            assert!(
                serde_json::from_str::<ExactSvmPayload>(bad).is_err(),
                "{bad}"
            );
        }
        let long = format!(r#"{{"transaction":"{}"}}"#, "A".repeat(2000));
        assert!(serde_json::from_str::<ExactSvmPayload>(&long).is_err());
    }
}
