//! x402 v2 messages: the challenge travels in `PAYMENT-REQUIRED`, the proof in
//! `PAYMENT-SIGNATURE`, the receipt in `PAYMENT-RESPONSE`.

use alloy_primitives::U256;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
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
    /// Echo of the challenge's resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceInfo>,
    /// The client's copy of the requirements it chose. Never trusted: the server matches it
    /// against what it offers now and verifies against its own copy.
    pub accepted: PaymentRequirements,
    /// Scheme-specific proof ([`super::exact::ExactEvmPayload`] for `exact`).
    pub payload: Box<RawValue>,
    /// Extensions echoed or added by the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}
