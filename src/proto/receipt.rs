use alloy_primitives::{B256, U256};
use serde::Serialize;

use super::X402Version;
use super::svm::Signature;
use crate::Network;
use crate::proto::Account;

/// The settlement receipt (`PAYMENT-RESPONSE` in v2, `X-PAYMENT-RESPONSE` in v1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleResponse {
    /// Whether the payment went through.
    pub success: bool,
    /// Reason code when `success` is false.
    pub error_reason: Option<String>,
    /// The payer (on Solana, the transfer's authority).
    pub payer: Option<Account>,
    /// The settlement transaction; `None` (`""` on the wire) when nothing was mined, as in
    /// verify-only mode.
    pub transaction: Option<B256>,
    /// A Solana settlement's transaction id, written in `transaction` (base58) in place of
    /// an EVM hash.
    pub signature: Option<Signature>,
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
            payer: self.payer.map(|a| a.to_string()),
            transaction: match (self.signature, self.transaction) {
                (Some(s), _) => s.to_string(),
                (None, t) => t.map(|t| t.to_string()).unwrap_or_default(),
            },
            network: version.network_name(self.network),
            amount: self.amount,
        };
        match encode(&wire) {
            Ok(json) => json,
            // Plain strings, bools and numbers do not fail to serialize; if it ever does, the
            // client must still learn it paid: a receipt written by hand, and an alert.
            Err(e) => {
                crate::alert::alert!(
                    crate::alert::Alert::ReceiptEncoding,
                    cause = &e,
                    "a receipt could not be encoded; sent a minimal one"
                );
                minimal_json(&wire)
            }
        }
    }
}

fn encode(wire: &Wire<'_>) -> Result<Vec<u8>, serde_json::Error> {
    #[cfg(feature = "test-util")]
    if crate::test_util::faults::take_receipt_encoding_fault() {
        return Err(serde::ser::Error::custom(
            "injected receipt encoding failure",
        ));
    }
    serde_json::to_vec(wire)
}

/// The receipt without serde: every value is ASCII hex, digits or a network name; an
/// `errorReason` that would need escaping is left out.
fn minimal_json(wire: &Wire<'_>) -> Vec<u8> {
    let plain = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    };
    let mut out = format!("{{\"success\":{}", wire.success);
    if let Some(r) = wire.error_reason.filter(|r| plain(r)) {
        out.push_str(&format!(",\"errorReason\":\"{r}\""));
    }
    if let Some(p) = &wire.payer {
        out.push_str(&format!(",\"payer\":\"{p}\""));
    }
    out.push_str(&format!(",\"transaction\":\"{}\"", wire.transaction));
    if plain(&wire.network) {
        out.push_str(&format!(",\"network\":\"{}\"", wire.network));
    }
    if let Some(a) = wire.amount {
        out.push_str(&format!(",\"amount\":\"{a}\""));
    }
    out.push('}');
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimal_receipt_is_the_serde_one() {
        let r = SettleResponse {
            success: true,
            error_reason: None,
            payer: Some(alloy_primitives::Address::repeat_byte(7).into()),
            transaction: Some(B256::repeat_byte(9)),
            signature: None,
            network: Network::BASE_SEPOLIA,
            amount: Some(U256::from(1234)),
        };
        for version in [X402Version::V1, X402Version::V2] {
            let wire = Wire {
                success: r.success,
                error_reason: Some("insufficient_funds"),
                payer: r.payer.map(|a| a.to_string()),
                transaction: r.transaction.map(|t| t.to_string()).unwrap_or_default(),
                network: version.network_name(r.network),
                amount: r.amount,
            };
            let serde: serde_json::Value =
                serde_json::from_slice(&serde_json::to_vec(&wire).unwrap()).unwrap();
            let minimal: serde_json::Value = serde_json::from_slice(&minimal_json(&wire)).unwrap();
            assert_eq!(serde, minimal);
        }
    }
}
