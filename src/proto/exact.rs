//! The `exact` EVM payload: an EIP-3009 `TransferWithAuthorization` and its signature.

use alloy_primitives::{Address, B256, Bytes, U256};
use serde::{Deserialize, Serialize};

/// The signed EIP-3009 authorization (the EIP-712 message).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    /// Payer, and the expected signer.
    #[serde(serialize_with = "super::checksummed")]
    pub from: Address,
    /// Recipient; must equal `payTo`.
    #[serde(serialize_with = "super::checksummed")]
    pub to: Address,
    /// Amount in atomic units; must equal the required amount.
    #[serde(with = "super::decimal")]
    pub value: U256,
    /// Unix seconds after which the authorization is valid.
    #[serde(with = "super::decimal")]
    pub valid_after: U256,
    /// Unix seconds before which it must be used.
    #[serde(with = "super::decimal")]
    pub valid_before: U256,
    /// 32 random bytes chosen by the payer; one use per (token, payer).
    pub nonce: B256,
}

/// `payload` of an `exact` EVM payment using EIP-3009.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExactEvmPayload {
    /// 65-byte `r ‖ s ‖ v` for EOAs; longer for smart wallets (not verifiable in-process).
    pub signature: Bytes,
    /// The signed message.
    pub authorization: Authorization,
}

impl ExactEvmPayload {
    /// Parses the payload's JSON as `serde_json::from_str` does, with the same result for
    /// every input. The compact form clients send (no whitespace, no escapes, each field
    /// once) takes a direct path, a fifth of serde's cost on the paid path; anything else,
    /// errors included, goes through serde.
    pub(crate) fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        super::compact::or_serde(json, compact::payload)
    }
}

/// The compact `exact` EVM payload at `c` (see [`compact`]), for a document that embeds one.
pub(super) fn read_compact(c: &mut super::compact::Cursor<'_>) -> Option<ExactEvmPayload> {
    compact::object(c)
}

/// The direct path of [`ExactEvmPayload::from_json`]. Values are read by the very functions
/// serde's visitors call (`hex::decode`, `FromHex`, [`super::decimal::parse`]), and anything
/// it does not expect (whitespace, escapes, control characters, other keys, a repeated or
/// missing field, trailing text) is `None`, left to serde, so it accepts only documents serde
/// accepts, with the same value (`tests::compact_path_agrees_with_serde`).
mod compact {
    use alloy_primitives::hex::{self, FromHex};

    use super::super::compact::{Cursor, once};
    use super::{Authorization, ExactEvmPayload};

    pub(super) fn payload(text: &str) -> Option<ExactEvmPayload> {
        let mut c = Cursor::new(text);
        let exact = object(&mut c)?;
        c.done().then_some(exact)
    }

    /// The object at the cursor, which is left after it.
    pub(in crate::proto) fn object(c: &mut Cursor<'_>) -> Option<ExactEvmPayload> {
        let (mut signature, mut authorization) = (None, None);
        c.object(|c, key| match key {
            "signature" => once(
                &mut signature,
                // 65 bytes: an EOA's signature.
                hex::decode(c.string(132)?).ok().map(Into::into),
            ),
            "authorization" => once(&mut authorization, auth(c)),
            _ => None,
        })?;
        Some(ExactEvmPayload {
            signature: signature?,
            authorization: authorization?,
        })
    }

    fn auth(c: &mut Cursor<'_>) -> Option<Authorization> {
        let (mut from, mut to, mut value) = (None, None, None);
        let (mut valid_after, mut valid_before, mut nonce) = (None, None, None);
        let decimal = |c: &mut Cursor<'_>| super::super::decimal::parse(c.string(0)?);
        c.object(|c, key| match key {
            "from" => once(&mut from, FromHex::from_hex(c.string(42)?).ok()),
            "to" => once(&mut to, FromHex::from_hex(c.string(42)?).ok()),
            "value" => once(&mut value, decimal(c)),
            "validAfter" => once(&mut valid_after, decimal(c)),
            "validBefore" => once(&mut valid_before, decimal(c)),
            "nonce" => once(&mut nonce, FromHex::from_hex(c.string(66)?).ok()),
            _ => None,
        })?;
        Some(Authorization {
            from: from?,
            to: to?,
            value: value?,
            valid_after: valid_after?,
            valid_before: valid_before?,
            nonce: nonce?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::compact::SIG;

    fn auth(order: [usize; 6]) -> String {
        let fields = [
            r#""from":"0x857b06519E91e3A54538791bDbb0E22373e36b66""#,
            r#""to":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C""#,
            r#""value":"10000""#,
            r#""validAfter":"1740672089""#,
            r#""validBefore":"1740672154""#,
            r#""nonce":"0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480""#,
        ];
        super::super::compact::object_of(&fields, &order)
    }

    #[test]
    fn compact_path_agrees_with_serde() {
        let docs = vec![
            format!(
                r#"{{"signature":"{SIG}","authorization":{}}}"#,
                auth([0, 1, 2, 3, 4, 5])
            ),
            format!(
                r#"{{"authorization":{},"signature":"{SIG}"}}"#,
                auth([5, 4, 3, 2, 1, 0])
            ),
            format!(
                r#"{{"signature":"{}","authorization":{}}}"#,
                &SIG[2..],
                auth([2, 0, 1, 5, 3, 4])
            ),
        ];
        // Both field orders take the direct path; a signature without `0x` is not where a
        // signature's end usually is, so serde reads it.
        assert!(docs[..2].iter().all(|d| compact::payload(d).is_some()));
        // Every byte of each document replaced, dropped or doubled: the direct path never
        // accepts what serde refuses, nor reads another value.
        let replacements: &[&str] = &[
            "", " ", "\"", "\\", "\\u0030", "0", "9", "a", "A", "x", "g", ",", ":", "{", "}", "[",
            "\n", "\u{1}", "é", "1e3", "-",
        ];
        let seeds = docs;
        let mut docs = super::super::compact::mutations(&seeds, replacements);
        // A repeated, unknown or missing field.
        docs.push(format!(
            r#"{{"signature":"{SIG}","signature":"{SIG}","authorization":{}}}"#,
            auth([0, 1, 2, 3, 4, 5])
        ));
        docs.push(format!(
            r#"{{"signature":"{SIG}","authorization":{},"x":1}}"#,
            auth([0, 1, 2, 3, 4, 5])
        ));
        docs.push(format!(r#"{{"signature":"{SIG}"}}"#));
        docs.push(format!(r#"{{"signature":"{SIG}","authorization":{{"from":"0x857b06519E91e3A54538791bDbb0E22373e36b66"}}}}"#));
        let direct = super::super::compact::agrees_with_serde(&docs, compact::payload);
        // Some mutations keep a valid compact document (another digit, hex case): the direct
        // path takes them too.
        assert!(direct > seeds.len(), "{direct}");
    }
}
