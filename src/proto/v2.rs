//! x402 v2 messages: the challenge travels in `PAYMENT-REQUIRED`, the proof in
//! `PAYMENT-SIGNATURE`, the receipt in `PAYMENT-RESPONSE`.

use std::sync::Arc;

use alloy_primitives::U256;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::Network;
use crate::proto::Account;

/// The resource a challenge is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    /// The URL of the paid resource.
    pub url: String,
    /// What the payment buys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// MIME type of the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// Name of the service hosting the resource (bazaar service metadata). Read leniently
    /// (a value of the wrong type is dropped, as facilitators drop it): a client echoes it,
    /// and a payload must not be refused over catalogue metadata.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub service_name: Option<String>,
    /// Topical tags of the service (bazaar service metadata); read leniently.
    #[serde(
        default,
        deserialize_with = "lenient_strings",
        skip_serializing_if = "Option::is_none"
    )]
    pub tags: Option<Vec<String>>,
    /// Absolute http(s) URL of the service's icon (bazaar service metadata); read leniently.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub icon_url: Option<String>,
}

/// A string, or `None` for anything else (catalogue metadata never fails a parse).
fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        _ => None,
    })
}

/// An array's string entries, or `None` for anything but an array.
fn lenient_strings<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Array(items) => Some(
            items
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    })
}

/// One way to pay: an entry of `accepts`, and the `accepted` echo in a payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirements {
    /// Payment scheme; this crate verifies `exact`.
    pub scheme: String,
    /// The chain, CAIP-2 on the wire.
    pub network: Network,
    /// Exact amount in atomic token units.
    #[serde(with = "super::decimal")]
    pub amount: U256,
    /// Token: the EVM contract (EIP-712 `verifyingContract`) or the Solana mint.
    pub asset: Account,
    /// Recipient of the funds (on Solana, the owner of the receiving token account).
    pub pay_to: Account,
    /// Longest time the server allows between challenge and settlement.
    pub max_timeout_seconds: u64,
    /// Scheme data; for EIP-3009 `name` and `version` of the EIP-712 domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Map<String, Value>>,
}

impl PaymentRequirements {
    /// A string field of `extra`, e.g. `name` or `version`.
    pub fn extra_str(&self, key: &str) -> Option<&str> {
        self.extra.as_ref()?.get(key)?.as_str()
    }
}

/// The challenge (`PAYMENT-REQUIRED`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequired {
    /// Always 2.
    pub x402_version: u8,
    /// Why the previous attempt was refused, if any (a reason code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What is being sold.
    pub resource: ResourceInfo,
    /// Ways to pay, at least one.
    pub accepts: Vec<PaymentRequirements>,
    /// Protocol extensions offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

/// The proof (`PAYMENT-SIGNATURE`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayload {
    /// Always 2.
    pub x402_version: u8,
    /// Echo of the challenge's resource. Shared: every proof for a route echoes the same one,
    /// and the header decoder reads it once (see [`super::header::decode_payload`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shared_option"
    )]
    pub resource: Option<Arc<ResourceInfo>>,
    /// The client's copy of the requirements it chose. Never trusted: the server matches it
    /// against what it offers now and verifies against its own copy. Shared, as `resource`.
    #[serde(with = "shared")]
    pub accepted: Arc<PaymentRequirements>,
    /// Scheme-specific proof ([`super::exact::ExactEvmPayload`] for `exact`).
    pub payload: super::SchemePayload,
    /// Extensions echoed or added by the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

/// Serde for an `Arc` field as the value it holds (serde's `rc` feature, for one field).
mod shared {
    use super::{Arc, Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<T: Serialize, S: Serializer>(
        v: &Arc<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        T::serialize(v, s)
    }

    pub(super) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Arc<T>, D::Error> {
        T::deserialize(d).map(Arc::new)
    }
}

/// [`shared`] for an optional field.
mod shared_option {
    use super::{Arc, Deserialize, Deserializer, Serialize, Serializer};

    #[allow(clippy::ref_option)] // serde's `with` passes `&Option<T>`
    pub(super) fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Arc<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.as_deref().serialize(s)
    }

    pub(super) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Arc<T>>, D::Error> {
        Option::<T>::deserialize(d).map(|v| v.map(Arc::new))
    }
}

impl PaymentPayload {
    /// Parses a proof's JSON as `serde_json::from_str` does, with the same result for every
    /// input. The compact form clients send (no whitespace, no escapes, each field once, no
    /// `extensions`) takes a direct path; anything else, errors included, goes through serde.
    #[cfg(test)]
    pub(crate) fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        super::compact::or_serde(json, compact::payload)
    }

    /// [`Self::from_json`], and where its `payload` value starts when the direct path read
    /// the document (to keep its [`Head`]).
    pub(crate) fn from_json_marked(json: &str) -> (Result<Self, serde_json::Error>, Option<Mark>) {
        match compact::read(json, None) {
            Some((payload, mark)) => (Ok(payload), mark),
            None => (serde_json::from_str(json), None),
        }
    }

    /// The direct path's reading of a proof from its `payload` value on: `rest` is the
    /// document from [`Mark::at`] on, and `head` holds what the bytes before it say (the
    /// direct path reads nothing past its cursor, so it is the state it would reach reading
    /// them). `None` where the direct path declines the document: serde then reads the
    /// whole, as [`Self::from_json`] would.
    pub(crate) fn read_after(rest: &str, head: &Head) -> Option<Self> {
        compact::read(rest, Some(head)).map(|(payload, _)| payload)
    }
}

/// Where the direct path met a proof's `payload` value, and which fields it had read before
/// it (the rest of a [`Head`], taken from the parsed proof only when one is kept).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mark {
    at: usize,
    version: bool,
    resource: bool,
    accepted: bool,
}

impl Mark {
    /// The offset of the `payload` value.
    pub(crate) fn at(self) -> usize {
        self.at
    }
}

/// The key of `extra` carrying a bound challenge id (`challenge::EXTRA_FIELD`, named here so
/// that `proto` does not import `challenge`, which imports it).
pub(crate) const CHALLENGE: &str = "challenge";

/// What the direct path read of a proof before its `payload` value: the text every proof
/// paying one option of a route starts with (the `accepted` echo, `resource`). The header
/// decoder keeps a few, to read only the rest of a proof that starts the same.
#[derive(Clone, Debug)]
pub(crate) struct Head {
    version: Option<u8>,
    resource: Option<Arc<ResourceInfo>>,
    accepted: Option<Arc<PaymentRequirements>>,
}

impl Head {
    /// The head of `payload`, which the direct path read and marked with `mark`.
    pub(crate) fn new(payload: &PaymentPayload, mark: Mark) -> Self {
        Self {
            version: mark.version.then_some(payload.x402_version),
            resource: mark.resource.then(|| payload.resource.clone()).flatten(),
            accepted: mark.accepted.then(|| payload.accepted.clone()),
        }
    }

    /// The bound challenge id of the `accepted` echo read in this head, if any.
    pub(crate) fn challenge(&self) -> Option<&str> {
        self.accepted.as_ref()?.extra_str(CHALLENGE)
    }

    /// This head with `id` as the challenge of its `accepted` echo (which has one): what the
    /// direct path reads from the same text with another id of plain characters.
    pub(crate) fn with_challenge(&self, id: &str) -> Self {
        let accepted = self.accepted.as_ref().map(|a| {
            let extra = a.extra.as_ref().map(|extra| {
                extra
                    .iter()
                    .map(|(k, v)| match k.as_str() {
                        CHALLENGE => (k.clone(), Value::String(id.to_owned())),
                        _ => (k.clone(), v.clone()),
                    })
                    .collect()
            });
            Arc::new(PaymentRequirements {
                scheme: a.scheme.clone(),
                network: a.network,
                amount: a.amount,
                asset: a.asset,
                pay_to: a.pay_to,
                max_timeout_seconds: a.max_timeout_seconds,
                extra,
            })
        });
        Self {
            version: self.version,
            resource: self.resource.clone(),
            accepted,
        }
    }
}

/// The direct path of [`PaymentPayload::from_json`]. Typed values are read by their own
/// `Deserialize` from the borrowed string (as serde_json hands it to them), amounts by
/// [`super::decimal::parse`], `payload` by serde_json as a `RawValue`; anything it
/// does not expect (other keys, `null`, in `extra` anything but strings and unsigned
/// integers, a repeated key) is `None`, left
/// to serde (`tests::compact_path_agrees_with_serde`).
mod compact {
    use std::sync::Arc;

    use serde_json::{Map, Value};

    use super::super::compact::{Cursor, once, plain};
    use super::super::{SchemePayload, decimal};
    use super::{Head, Mark, PaymentPayload, PaymentRequirements, ResourceInfo};

    #[cfg(test)]
    pub(super) fn payload(text: &str) -> Option<PaymentPayload> {
        read(text, None).map(|(payload, _)| payload)
    }

    /// The proof in `text`, read from the start or, with a head, from its `payload` value on
    /// (`text` then starts there); from the start, also where `payload` was met.
    pub(super) fn read(text: &str, head: Option<&Head>) -> Option<(PaymentPayload, Option<Mark>)> {
        let mut c = Cursor::new(text);
        let mut f = Fields::default();
        let mut mark = None;
        match head {
            Some(head) => {
                f.version = head.version;
                f.resource.clone_from(&head.resource);
                f.accepted.clone_from(&head.accepted);
                f.payload = Some(scheme_payload(&mut c)?);
                c.more_members(|c, key| f.field(c, key))?;
            }
            None => c.object(|c, key| {
                if key == "payload" {
                    mark = Some(Mark {
                        at: c.at(),
                        version: f.version.is_some(),
                        resource: f.resource.is_some(),
                        accepted: f.accepted.is_some(),
                    });
                }
                f.field(c, key)
            })?,
        }
        c.done().then_some(())?;
        let payload = PaymentPayload {
            x402_version: f.version?,
            resource: f.resource,
            accepted: f.accepted?,
            payload: f.payload?,
            extensions: None,
        };
        Some((payload, mark))
    }

    /// The top-level fields read so far.
    #[derive(Default)]
    struct Fields {
        version: Option<u8>,
        resource: Option<Arc<ResourceInfo>>,
        accepted: Option<Arc<PaymentRequirements>>,
        payload: Option<SchemePayload>,
    }

    impl Fields {
        fn field(&mut self, c: &mut Cursor<'_>, key: &str) -> Option<()> {
            match key {
                "x402Version" => once(
                    &mut self.version,
                    c.uint().and_then(|n| u8::try_from(n).ok()),
                ),
                "resource" => once(&mut self.resource, resource_info(c).map(Arc::new)),
                "accepted" => once(&mut self.accepted, requirements(c).map(Arc::new)),
                "payload" => once(&mut self.payload, scheme_payload(c)),
                _ => None,
            }
        }
    }

    /// `payload`: read as an `exact` EVM payload or a `batch-settlement` voucher when it is
    /// one (the verifier or the channel engine then does not parse it again), else delimited
    /// by serde as a `RawValue`.
    fn scheme_payload(c: &mut Cursor<'_>) -> Option<SchemePayload> {
        let start = c.at();
        if let Some(exact) = super::super::exact::read_compact(c) {
            return Some(SchemePayload::read_exact(c.since(start)?, exact));
        }
        c.back_to(start);
        if let Some(batch) = super::super::batch::read_compact(c) {
            return Some(SchemePayload::read_batch(c.since(start)?, batch));
        }
        c.back_to(start);
        c.raw_object().map(SchemePayload::from)
    }

    fn requirements(c: &mut Cursor<'_>) -> Option<PaymentRequirements> {
        let (mut scheme, mut network, mut amount, mut asset) = (None, None, None, None);
        let (mut pay_to, mut max_timeout_seconds, mut extra) = (None, None, None);
        c.object(|c, key| match key {
            "scheme" => once(&mut scheme, c.text().map(str::to_owned)),
            "network" => once(&mut network, c.parsed()),
            "amount" => once(&mut amount, decimal::parse(c.text()?)),
            "asset" => once(&mut asset, c.parsed()),
            "payTo" => once(&mut pay_to, c.parsed()),
            "maxTimeoutSeconds" => once(&mut max_timeout_seconds, c.uint()),
            "extra" => once(&mut extra, strings(c)),
            _ => None,
        })?;
        Some(PaymentRequirements {
            scheme: scheme?,
            network: network?,
            amount: amount?,
            asset: asset?,
            pay_to: pay_to?,
            max_timeout_seconds: max_timeout_seconds?,
            extra,
        })
    }

    /// An object of strings and unsigned integers (`name`, `version`, `challenge`; a
    /// channel's `withdrawDelay`). Anything else (a float, a sign, an object) is serde's.
    fn strings(c: &mut Cursor<'_>) -> Option<Map<String, Value>> {
        let mut map = Map::new();
        c.object(|c, key| {
            plain(key).then_some(())?;
            let start = c.at();
            let value = match c.text() {
                Some(text) => Value::String(text.to_owned()),
                // Not a plain string: from the value's first byte again, as an integer.
                None => {
                    c.back_to(start);
                    Value::from(c.uint()?)
                }
            };
            // serde_json keeps the last of a repeated key: rare, left to it.
            map.insert(key.to_owned(), value).is_none().then_some(())
        })?;
        Some(map)
    }

    fn resource_info(c: &mut Cursor<'_>) -> Option<ResourceInfo> {
        let (mut url, mut description, mut mime_type) = (None, None, None);
        c.object(|c, key| match key {
            "url" => once(&mut url, c.text().map(str::to_owned)),
            "description" => once(&mut description, c.text().map(str::to_owned)),
            "mimeType" => once(&mut mime_type, c.text().map(str::to_owned)),
            _ => None,
        })?;
        Some(ResourceInfo {
            url: url?,
            description,
            mime_type,
            service_name: None,
            tags: None,
            icon_url: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAYLOAD: &str = r#"{"authorization":{"from":"0x857b06519E91e3A54538791bDbb0E22373e36b66","nonce":"0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480","to":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","validAfter":"1740672089","validBefore":"1740672154","value":"10000"},"signature":"0x2d6a75","x":[1,{"y":null}]}"#;

    const EXACT: &str = r#"{"signature":"0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c","authorization":{"from":"0x857b06519E91e3A54538791bDbb0E22373e36b66","to":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","value":"10000","validAfter":"1740672089","validBefore":"1740672154","nonce":"0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"}}"#;

    /// A `batch-settlement` voucher payload as the official client writes it.
    const VOUCHER: &str = r#"{"type":"voucher","channelConfig":{"payer":"0x857b06519E91e3A54538791bDbb0E22373e36b66","payerAuthorizer":"0x857b06519E91e3A54538791bDbb0E22373e36b66","receiver":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","receiverAuthorizer":"0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc","token":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","withdrawDelay":900,"salt":"0x0000000000000000000000000000000000000000000000000000000000000007"},"voucher":{"channelId":"0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480","maxClaimableAmount":"25000","signature":"0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c"}}"#;

    #[test]
    fn compact_path_agrees_with_serde() {
        let accepted = r#"{"amount":"10000","asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","extra":{"name":"USDC","version":"2"},"maxTimeoutSeconds":60,"network":"eip155:84532","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","scheme":"exact"}"#;
        let svm = r#"{"scheme":"exact","network":"solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1","amount":"1","asset":"EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v","payTo":"9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin","maxTimeoutSeconds":0}"#;
        let channel = r#"{"scheme":"batch-settlement","network":"eip155:84532","amount":"1000","asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","maxTimeoutSeconds":60,"extra":{"receiverAuthorizer":"0x857b06519E91e3A54538791bDbb0E22373e36b66","withdrawDelay":900,"name":"USDC","version":"2"}}"#;
        let resource = r#"{"url":"https://api.example.com/weather?city=x","description":"Weather","mimeType":"application/json"}"#;
        let docs = vec![
            // As `test_util::v2_json` writes it (keys sorted).
            format!(r#"{{"accepted":{accepted},"payload":{PAYLOAD},"x402Version":2}}"#),
            // As official clients write it, `resource` echoed.
            format!(
                r#"{{"x402Version":2,"resource":{resource},"accepted":{accepted},"payload":{PAYLOAD}}}"#
            ),
            format!(r#"{{"x402Version":2,"accepted":{svm},"payload":{{"transaction":"AQ=="}}}}"#),
            // An `exact` EVM payload as clients send it.
            format!(r#"{{"x402Version":2,"accepted":{accepted},"payload":{EXACT}}}"#),
            // A channel's option: a number in `extra`.
            format!(r#"{{"x402Version":2,"accepted":{channel},"payload":{PAYLOAD}}}"#),
            // A channel's voucher, as the official client sends it.
            format!(r#"{{"x402Version":2,"accepted":{channel},"payload":{VOUCHER}}}"#),
        ];
        assert!(docs.iter().all(|d| compact::payload(d).is_some()));
        // An `exact` EVM payload is read on the way (the verifier then does not parse it).
        assert!(compact::payload(&docs[3]).is_some_and(|p| p.payload.exact().is_some()));
        assert!(compact::payload(&docs[0]).is_some_and(|p| p.payload.exact().is_none()));
        // So is a channel's voucher (the channel engine then does not parse it).
        assert!(compact::payload(&docs[5]).is_some_and(|p| p.payload.batch().is_some()));
        assert!(compact::payload(&docs[3]).is_some_and(|p| p.payload.batch().is_none()));
        // Every byte of each document replaced, dropped or doubled: the direct path never
        // accepts what serde refuses, nor reads another value.
        let replacements: &[&str] = &[
            "", " ", "\"", "\\", "\\u0030", "\\\"", "0", "9", "a", "A", "x", "g", ",", ":", "{",
            "}", "[", "]", "\n", "\u{1}", "é", "1e3", ".5", "-", "null", "256",
        ];
        let seeds = docs;
        let mut docs = super::super::compact::mutations(&seeds, replacements);
        // A repeated key, an unknown one, `extensions`, `null`s, `{}`, a non-string `extra`.
        docs.extend(super::super::compact::edited(
            &seeds,
            &[
                (r#""x402Version":2"#, r#""x402Version":2,"x402Version":2"#),
                (
                    r#""scheme":"exact""#,
                    r#""scheme":"exact","scheme":"exact""#,
                ),
                (r#""name":"USDC""#, r#""name":"USDC","name":"USDC""#),
                (r#""name":"USDC""#, r#""name":"USDC","challenge":"abc""#),
                (r#""name":"USDC""#, r#""name":1"#),
                (r#""name":"USDC""#, r#""name":1.5"#),
                (r#""name":"USDC""#, r#""name":-1"#),
                (r#""name":"USDC""#, r#""name":18446744073709551616"#),
                (r#""name":"USDC""#, r#""name":{}"#),
                (r#""withdrawDelay":900"#, r#""withdrawDelay":0900"#),
                (r#""url":"#, r#""url":"x","url":"#),
                (r#""url":"#, r#""tags":["a",1],"url":"#),
                (r#""x402Version":2"#, r#""x402Version":2,"extensions":{}"#),
                (r#""x402Version":2"#, r#""x402Version":2,"resource":null"#),
                (r#""x402Version":2"#, r#""x402Version":2,"other":1"#),
                (r#","payload""#, r#","extra":null,"payload""#),
                (r#"{"name":"USDC","version":"2"}"#, "{}"),
                (
                    r#""maxTimeoutSeconds":60"#,
                    r#""maxTimeoutSeconds":18446744073709551616"#,
                ),
                (
                    r#""maxTimeoutSeconds":60"#,
                    r#""maxTimeoutSeconds":18446744073709551615"#,
                ),
                (r#""x402Version":2"#, r#""x402Version":255"#),
                // Another payload type, or a voucher field repeated: serde's.
                (r#""type":"voucher""#, r#""type":"refund""#),
                (
                    r#""maxClaimableAmount":"#,
                    r#""maxClaimableAmount":"1","maxClaimableAmount":"#,
                ),
            ],
        ));
        let mut direct = 0;
        for doc in &docs {
            if let Some(p) = compact::payload(doc) {
                direct += 1;
                let serde: PaymentPayload = serde_json::from_str(doc).unwrap_or_else(|e| {
                    panic!("serde refuses what the direct path took: {doc}: {e}")
                });
                assert_eq!(format!("{p:?}"), format!("{serde:?}"), "{doc}");
                // The `exact` payload read on the way is the one its text holds.
                if let Some(exact) = p.payload.exact() {
                    let text: super::super::exact::ExactEvmPayload =
                        serde_json::from_str(p.payload.get()).expect("the text is the payload");
                    assert_eq!(exact, &text, "{doc}");
                }
                // So is the voucher.
                if let Some(batch) = p.payload.batch() {
                    let text: super::super::batch::BatchEvmPayload =
                        serde_json::from_str(p.payload.get()).expect("the text is the payload");
                    assert_eq!(batch, &text, "{doc}");
                }
            }
            assert_eq!(
                super::super::compact::outcome(PaymentPayload::from_json(doc)),
                super::super::compact::outcome(serde_json::from_str::<PaymentPayload>(doc)),
                "{doc}"
            );
        }
        // Some mutations keep a valid compact document (another digit, case): the direct
        // path takes them too.
        assert!(direct > seeds.len() * 20, "{direct}");
    }
}
