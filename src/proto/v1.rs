//! x402 v1 messages: the challenge is the 402 JSON body, the proof travels in `X-PAYMENT`, the
//! receipt in `X-PAYMENT-RESPONSE`; networks use short names (`base-sepolia`).

use alloy_primitives::U256;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Network;
use crate::network::v1_name;
use crate::proto::Account;

/// One way to pay (v1 shape: resource info is repeated in each entry).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirements {
    /// Payment scheme (`exact`).
    pub scheme: String,
    /// The chain, as a v1 short name.
    #[serde(with = "v1_name")]
    pub network: Network,
    /// The amount; `exact` requires exactly this much, despite the name.
    #[serde(with = "super::decimal")]
    pub max_amount_required: U256,
    /// The URL of the paid resource.
    pub resource: String,
    /// What the payment buys (required by v1, may be empty).
    pub description: String,
    /// MIME type of the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// JSON schema of the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    /// Recipient of the funds.
    pub pay_to: Account,
    /// Longest time between challenge and settlement.
    pub max_timeout_seconds: u64,
    /// Token contract (or Solana mint).
    pub asset: Account,
    /// EIP-712 domain `name` and `version` for EIP-3009 tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Map<String, Value>>,
}

/// The v1 challenge: the 402 response body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequired {
    /// Always 1.
    pub x402_version: u8,
    /// Why the previous attempt was refused, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Ways to pay.
    pub accepts: Vec<PaymentRequirements>,
}

/// The v1 proof (`X-PAYMENT`): scheme and network name the chosen requirement.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayload {
    /// Always 1.
    pub x402_version: u8,
    /// The scheme paid with.
    pub scheme: String,
    /// The network paid on (short name).
    #[serde(with = "v1_name")]
    pub network: Network,
    /// Scheme-specific proof.
    pub payload: super::SchemePayload,
}
