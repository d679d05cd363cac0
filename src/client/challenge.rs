//! Reading what a server sends: the 402 challenge (v2 header or v1 body) and the receipt.
//!
//! Offers are parsed one by one, so a challenge that also lists networks this crate cannot
//! pay on (Solana, say) still yields its EVM offers. The chosen v2 entry is echoed verbatim
//! (its raw JSON) as `accepted`: the reference server compares it by deep equality.

use alloy_primitives::{Address, B256};
use http::HeaderMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::ChallengeError;
use super::policy::Refusal;
use crate::Network;
use crate::proto::Account;
use crate::proto::header::{self, PAYMENT_REQUIRED, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE};
use crate::proto::{SettleResponse, X402Version, v1, v2};

/// Cap on a challenge (header or body) and on a receipt header.
pub(crate) const MAX_CHALLENGE_BYTES: usize = 64 * 1024;

/// One way to pay, as offered.
#[derive(Debug)]
pub(crate) struct Offer {
    /// Normalized to the v2 shape (v1 `maxAmountRequired` becomes `amount`).
    pub(crate) requirements: v2::PaymentRequirements,
    /// The v2 entry exactly as the server wrote it (unused for v1).
    pub(crate) raw: Option<Box<RawValue>>,
}

/// A decoded 402 challenge.
#[derive(Debug)]
pub(crate) struct Challenge {
    pub(crate) version: X402Version,
    /// The reason the server gave, if any.
    pub(crate) error: Option<String>,
    /// v2 `resource`, echoed in the payload.
    pub(crate) resource: Option<Box<RawValue>>,
    /// v2 `extensions`, echoed in the payload.
    pub(crate) extensions: Option<Map<String, Value>>,
    /// Parsed offers, and entries that could not be parsed.
    pub(crate) offers: Vec<Result<Offer, Refusal>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawChallenge {
    x402_version: u64,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    resource: Option<Box<RawValue>>,
    #[serde(default)]
    accepts: Vec<Box<RawValue>>,
    #[serde(default)]
    extensions: Option<Map<String, Value>>,
}

impl Challenge {
    /// The v2 challenge in `PAYMENT-REQUIRED`, if the header is there.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, ChallengeError> {
        let Some(value) = headers.get(PAYMENT_REQUIRED) else {
            return Ok(None);
        };
        let json =
            header::decode_bytes(value, MAX_CHALLENGE_BYTES).map_err(ChallengeError::Header)?;
        Self::from_json(&json).map(Some)
    }

    /// A challenge from JSON (the v2 header's content, or a v1 402 body).
    pub(crate) fn from_json(json: &[u8]) -> Result<Self, ChallengeError> {
        let raw: RawChallenge = serde_json::from_slice(json).map_err(ChallengeError::Json)?;
        let version = match raw.x402_version {
            1 => X402Version::V1,
            2 => X402Version::V2,
            found => return Err(ChallengeError::Version(found)),
        };
        let offers: Vec<_> = raw
            .accepts
            .into_iter()
            .map(|entry| parse_offer(version, entry))
            .collect();
        if offers.is_empty() {
            return Err(ChallengeError::NoOffers);
        }
        Ok(Self {
            version,
            error: raw.error.filter(|e| !e.is_empty()),
            resource: raw.resource,
            extensions: raw.extensions.filter(|_| version == X402Version::V2),
            offers,
        })
    }
}

fn parse_offer(version: X402Version, entry: Box<RawValue>) -> Result<Offer, Refusal> {
    match version {
        X402Version::V2 => {
            let requirements = serde_json::from_str(entry.get()).map_err(|_| Refusal::Malformed)?;
            Ok(Offer {
                requirements,
                raw: Some(entry),
            })
        }
        X402Version::V1 => {
            let r: v1::PaymentRequirements =
                serde_json::from_str(entry.get()).map_err(|_| Refusal::Malformed)?;
            Ok(Offer {
                requirements: v2::PaymentRequirements {
                    scheme: r.scheme,
                    network: r.network,
                    amount: r.max_amount_required,
                    asset: r.asset,
                    pay_to: r.pay_to,
                    max_timeout_seconds: r.max_timeout_seconds,
                    extra: r.extra,
                },
                raw: None,
            })
        }
    }
}

/// The `error` (or `reason`) of a JSON error body such as `{"error": "settlement_outcome_unknown"}`.
pub(crate) fn body_reason(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Reason {
        #[serde(default)]
        error: Option<Value>,
        #[serde(default)]
        reason: Option<Value>,
    }
    let r: Reason = serde_json::from_slice(body).ok()?;
    [r.error, r.reason]
        .into_iter()
        .flatten()
        .find_map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
}

/// The receipt wire form, read leniently: any party may write it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireReceipt {
    success: bool,
    #[serde(default)]
    error_reason: Option<String>,
    #[serde(default)]
    payer: Option<String>,
    #[serde(default)]
    transaction: Option<String>,
    network: String,
    #[serde(default)]
    amount: Option<String>,
}

/// The decoded `PAYMENT-RESPONSE` (or v1 `X-PAYMENT-RESPONSE`), `None` when absent.
pub(crate) fn receipt(headers: &HeaderMap) -> Option<Result<SettleResponse, ChallengeError>> {
    let value = headers
        .get(PAYMENT_RESPONSE)
        .or_else(|| headers.get(X_PAYMENT_RESPONSE))?;
    Some(decode_receipt(value))
}

fn decode_receipt(value: &http::HeaderValue) -> Result<SettleResponse, ChallengeError> {
    let json = header::decode_bytes(value, MAX_CHALLENGE_BYTES).map_err(ChallengeError::Header)?;
    let w: WireReceipt = serde_json::from_slice(&json).map_err(ChallengeError::Json)?;
    let network: Network = w
        .network
        .parse()
        .map_err(|_| ChallengeError::Receipt("network"))?;
    // On Solana the transaction is a base58 signature and the payer a base58 key.
    let solana = network.is_solana();
    let (transaction, signature) = match w.transaction.as_deref() {
        None | Some("") => (None, None),
        Some(t) if solana => (
            None,
            Some(
                t.parse::<crate::proto::svm::Signature>()
                    .map_err(|_| ChallengeError::Receipt("transaction"))?,
            ),
        ),
        Some(t) => (
            Some(
                t.parse::<B256>()
                    .map_err(|_| ChallengeError::Receipt("transaction"))?,
            ),
            None,
        ),
    };
    let payer = match w.payer.as_deref() {
        None | Some("") => None,
        Some(p) if solana => Some(
            p.parse::<crate::proto::svm::Pubkey>()
                .map(Account::Svm)
                .map_err(|_| ChallengeError::Receipt("payer"))?,
        ),
        Some(p) => Some(
            p.parse::<Address>()
                .map(Into::into)
                .map_err(|_| ChallengeError::Receipt("payer"))?,
        ),
    };
    let amount = match w.amount.as_deref() {
        None | Some("") => None,
        Some(a) => Some(crate::proto::decimal::parse(a).ok_or(ChallengeError::Receipt("amount"))?),
    };
    Ok(SettleResponse {
        success: w.success,
        error_reason: w.error_reason.filter(|r| !r.is_empty()),
        payer,
        transaction,
        signature,
        network,
        amount,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::U256;

    #[test]
    fn skips_offers_it_cannot_read() {
        let json = br#"{"x402Version":2,"resource":{"url":"http://x/y"},"accepts":[
            {"scheme":"exact","network":"solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp","amount":"1","asset":"So1","payTo":"x","maxTimeoutSeconds":60},
            {"scheme":"exact","network":"eip155:84532","amount":"1000","asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","payTo":"0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC","maxTimeoutSeconds":60,"extra":{"name":"USDC","version":"2"}}
        ],"extensions":{"payment-identifier":{"info":{"required":false}}}}"#;
        let c = Challenge::from_json(json).unwrap();
        assert_eq!(c.version, X402Version::V2);
        assert!(matches!(c.offers[0], Err(Refusal::Malformed)));
        let ok = c.offers[1].as_ref().unwrap();
        assert_eq!(ok.requirements.amount, U256::from(1000));
        assert!(ok.raw.as_ref().unwrap().get().contains("\"payTo\""));
        assert!(c.extensions.unwrap().contains_key("payment-identifier"));
    }

    #[test]
    fn v1_body_and_bad_versions() {
        let json = br#"{"x402Version":1,"error":"X-PAYMENT header is required","accepts":[
            {"scheme":"exact","network":"base-sepolia","maxAmountRequired":"10000","resource":"http://x/y","description":"","payTo":"0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC","maxTimeoutSeconds":60,"asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","extra":{"name":"USDC","version":"2"}}]}"#;
        let c = Challenge::from_json(json).unwrap();
        assert_eq!(c.version, X402Version::V1);
        let ok = c.offers[0].as_ref().unwrap();
        assert_eq!(ok.requirements.network, Network::BASE_SEPOLIA);
        assert_eq!(ok.requirements.amount, U256::from(10_000));
        assert!(matches!(
            Challenge::from_json(br#"{"x402Version":3,"accepts":[{}]}"#),
            Err(ChallengeError::Version(3))
        ));
        assert!(matches!(
            Challenge::from_json(br#"{"x402Version":2,"accepts":[]}"#),
            Err(ChallengeError::NoOffers)
        ));
        assert!(Challenge::from_json(b"not json").is_err());
    }

    #[test]
    fn reads_receipts_of_both_versions() {
        let mut h = HeaderMap::new();
        h.insert(
            X_PAYMENT_RESPONSE,
            header::encode_json(br#"{"success":true,"transaction":"","network":"base-sepolia","payer":"0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"}"#),
        );
        let r = receipt(&h).unwrap().unwrap();
        assert!(r.success && r.transaction.is_none());
        assert_eq!(r.network, Network::BASE_SEPOLIA);
        assert_eq!(
            body_reason(br#"{"error":"settlement_outcome_unknown"}"#).as_deref(),
            Some("settlement_outcome_unknown")
        );
        assert_eq!(body_reason(b"<html>"), None);
    }
}
