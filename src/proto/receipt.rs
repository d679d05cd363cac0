use alloy_primitives::{Address, B256, U256};
use serde::Serialize;

use super::X402Version;
use crate::Network;

/// The settlement receipt (`PAYMENT-RESPONSE` in v2, `X-PAYMENT-RESPONSE` in v1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleResponse {
    /// Whether the payment went through.
    pub success: bool,
    /// Reason code when `success` is false.
    pub error_reason: Option<String>,
    /// The payer.
    pub payer: Option<Address>,
    /// The settlement transaction; `None` (`""` on the wire) when nothing was mined, as in
    /// verify-only mode.
    pub transaction: Option<B256>,
    /// Where it settled.
    pub network: Network,
    /// Amount actually settled.
    pub amount: Option<U256>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Wire<'a> {
    success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payer: Option<String>,
    transaction: String,
    network: String,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_decimal")]
    amount: Option<U256>,
}

mod opt_decimal {
    use alloy_primitives::U256;
    use serde::Serializer;
    #[allow(clippy::ref_option)] // serde's `with` passes `&Option<T>`
    pub(super) fn serialize<S: Serializer>(v: &Option<U256>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }
}

impl SettleResponse {
    /// The JSON of the receipt as `version` writes it (network name form differs).
    pub fn to_json(&self, version: X402Version) -> Vec<u8> {
        let wire = Wire {
            success: self.success,
            error_reason: self.error_reason.as_deref(),
            payer: self.payer.map(|a| a.to_checksum(None)),
            transaction: self.transaction.map(|t| t.to_string()).unwrap_or_default(),
            network: version.network_name(self.network),
            amount: self.amount,
        };
        // Serializing plain strings, bools and numbers cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }
}
