//! The facilitator's JSON: request bodies, replies, and reason codes.
//!
//! Request (both `POST /verify` and `POST /settle`, as the reference `HTTPFacilitatorClient`
//! sends them): `{x402Version, paymentPayload, paymentRequirements}`, with the requirements in
//! the dialect of the payload (v1: `maxAmountRequired`, `resource`, short network names).
//!
//! Replies are parsed as hostile input: the body is size-capped before it gets here, unknown
//! fields are ignored, wrong types or missing required fields are a parse error, and reason
//! strings are never passed through as they are (see [`reason`]).

use serde::{Deserialize, Serialize};

use crate::proto::{PaymentPayload, v1, v2};

/// `{x402Version, paymentPayload, paymentRequirements}` for `payload` checked against the
/// server's `requirements`. `v1_resource` fills the v1 requirements' `resource` (the verifier
/// does not see the request URL; v1 facilitators require a non-empty string there).
pub(crate) fn request_body(
    payload: &PaymentPayload,
    requirements: &v2::PaymentRequirements,
    v1_resource: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a, P, R> {
        x402_version: u8,
        payment_payload: &'a P,
        payment_requirements: &'a R,
    }
    match payload {
        PaymentPayload::V2(p) => serde_json::to_vec(&Body {
            x402_version: 2,
            payment_payload: p,
            payment_requirements: requirements,
        }),
        PaymentPayload::V1(p) => {
            let r = requirements;
            let v1 = v1::PaymentRequirements {
                scheme: r.scheme.clone(),
                network: r.network,
                max_amount_required: r.amount,
                resource: v1_resource.to_owned(),
                description: String::new(),
                mime_type: None,
                output_schema: None,
                pay_to: r.pay_to,
                max_timeout_seconds: r.max_timeout_seconds,
                asset: r.asset,
                extra: r.extra.clone(),
            };
            serde_json::to_vec(&Body {
                x402_version: 1,
                payment_payload: p,
                payment_requirements: &v1,
            })
        }
    }
}

/// `POST /verify` reply.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VerifyReply {
    pub(crate) is_valid: bool,
    #[serde(default)]
    pub(crate) invalid_reason: Option<String>,
    #[serde(default)]
    pub(crate) invalid_message: Option<String>,
    #[serde(default)]
    pub(crate) payer: Option<String>,
}

/// `POST /settle` reply.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SettleReply {
    pub(crate) success: bool,
    #[serde(default)]
    pub(crate) error_reason: Option<String>,
    #[serde(default)]
    pub(crate) error_message: Option<String>,
    #[serde(default)]
    pub(crate) payer: Option<String>,
    #[serde(default)]
    pub(crate) transaction: Option<String>,
    #[serde(default)]
    pub(crate) network: Option<String>,
    #[serde(default)]
    pub(crate) amount: Option<String>,
}

/// `body` (a `/verify` request of this crate) with `paymentRequirements.amount` set to
/// `amount`: an `upto` settlement of the metered amount.
pub(crate) fn with_amount(
    body: &[u8],
    amount: alloy_primitives::U256,
) -> Result<bytes::Bytes, serde_json::Error> {
    let mut doc: serde_json::Value = serde_json::from_slice(body)?;
    if let Some(req) = doc
        .get_mut("paymentRequirements")
        .and_then(|r| r.as_object_mut())
    {
        req.insert(
            "amount".into(),
            serde_json::Value::String(amount.to_string()),
        );
    }
    serde_json::to_vec(&doc).map(Into::into)
}

/// Reason codes: the facilitator's strings mapped onto the crate's static ones.
pub mod reason {
    use crate::reason::Reason;

    /// A facilitator refusal whose reason this crate does not know. The facilitator's own
    /// words stay in the error, for logs; clients see only this code.
    pub const FACILITATOR_REJECTED: Reason = Reason::FacilitatorRejected;
    /// `settlement_pending`: the facilitator broadcast the transaction but has no receipt yet
    /// (the outcome is unknown, never a refusal).
    pub const SETTLEMENT_PENDING: Reason = Reason::SettlementPending;

    /// The x402 reason codes passed through to clients as they are: the reference
    /// facilitator's (`@x402/evm` 2.27 `exact` EIP-3009 and Permit2, current and pre-2026-03
    /// names) and the spec's generic ones.
    pub const KNOWN: &[&str] = &[
        // exact EVM, EIP-3009 (current names)
        "invalid_exact_evm_scheme",
        "invalid_exact_evm_network_mismatch",
        "invalid_exact_evm_missing_eip712_domain",
        "invalid_exact_evm_signature",
        "invalid_exact_evm_failed_to_parse_signature",
        "invalid_exact_evm_payload_undeployed_smart_wallet",
        "invalid_exact_evm_recipient_mismatch",
        "invalid_exact_evm_payload_authorization_valid_before",
        "invalid_exact_evm_payload_authorization_valid_after",
        "invalid_exact_evm_authorization_value",
        "invalid_exact_evm_payload_authorization_value_mismatch",
        "invalid_exact_evm_eip3009_not_supported",
        "invalid_exact_evm_nonce_already_used",
        "invalid_exact_evm_token_name_mismatch",
        "invalid_exact_evm_token_version_mismatch",
        "invalid_exact_evm_insufficient_balance",
        "invalid_exact_evm_transaction_simulation_failed",
        "invalid_exact_evm_transaction_failed",
        "invalid_exact_evm_transfer_event_mismatch",
        // exact EVM, pre-2026-03 / legacy names
        "invalid_exact_evm_payload_signature",
        "invalid_exact_evm_payload_recipient_mismatch",
        "invalid_exact_evm_payload_authorization_value",
        "missing_eip712_domain",
        "network_mismatch",
        // Permit2 / smart wallets
        "unsupported_payload_type",
        "eip6492_factory_not_allowed",
        "smart_wallet_deployment_failed",
        "asset_not_deployed_contract",
        "invalid_permit2_signature",
        "invalid_permit2_spender",
        "invalid_permit2_recipient_mismatch",
        "permit2_allowance_required",
        "permit2_amount_mismatch",
        "permit2_deadline_expired",
        "permit2_insufficient_balance",
        "permit2_invalid_amount",
        "permit2_invalid_destination",
        "permit2_invalid_nonce",
        "permit2_invalid_owner",
        "permit2_not_yet_valid",
        "permit2_payment_too_early",
        "permit2_proxy_not_deployed",
        "permit2_simulation_failed",
        "permit2_token_mismatch",
        // generic (spec §9)
        "insufficient_funds",
        // exact SVM: a transaction already settled or in settlement
        "duplicate_settlement",
        "invalid_network",
        "invalid_payload",
        "invalid_payment_requirements",
        "invalid_scheme",
        "unsupported_scheme",
        "invalid_x402_version",
        "invalid_transaction_state",
        "unexpected_verify_error",
        "unexpected_settle_error",
    ];

    /// The static code for a facilitator's reason string, or [`FACILITATOR_REJECTED`].
    ///
    /// Facilitators are remote and untrusted: a reason copied into our 402 goes to clients, so
    /// only codes from [`KNOWN`] (and the catalogue's `invalid_exact_svm_*` codes, the
    /// `@x402/svm` facilitator's) pass; anything else (free text, a stack trace, markup, a
    /// megabyte) becomes the generic code.
    pub fn map(raw: Option<&str>) -> Reason {
        // Solana codes: the catalogue's `invalid_exact_svm_*` rows (`from_wire` keeps the rest out).
        raw.filter(|r| KNOWN.contains(r) || r.starts_with("invalid_exact_svm_"))
            .and_then(Reason::from_wire)
            .unwrap_or(FACILITATOR_REJECTED)
    }
}

/// Longest facilitator reason or message kept in an error for logs.
pub(crate) const MAX_DETAIL_CHARS: usize = 256;

/// "reason: message", sanitized and bounded, for the error's `detail`.
pub(crate) fn detail(reason: Option<&str>, message: Option<&str>) -> String {
    let reason = reason.unwrap_or("(no reason)");
    let text = match message {
        Some(m) if !m.is_empty() => format!("{reason}: {m}"),
        _ => reason.to_owned(),
    };
    super::error::excerpt(&text, MAX_DETAIL_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upto_settle_requests_carry_the_metered_amount() {
        let body = br#"{"x402Version":2,"paymentPayload":{"x":1},"paymentRequirements":{"scheme":"upto","amount":"50000","payTo":"0x1"}}"#;
        let out = with_amount(body, alloy_primitives::U256::from(1234)).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["paymentRequirements"]["amount"], "1234");
        assert_eq!(doc["paymentRequirements"]["scheme"], "upto");
        assert_eq!(doc["paymentPayload"]["x"], 1, "the payload is untouched");
        assert!(with_amount(b"not json", alloy_primitives::U256::ZERO).is_err());
    }

    #[test]
    fn known_reasons_pass_unknown_become_generic() {
        assert_eq!(
            reason::map(Some("invalid_exact_evm_insufficient_balance")),
            "invalid_exact_evm_insufficient_balance"
        );
        assert_eq!(
            reason::map(Some("unsupported_scheme")),
            "unsupported_scheme"
        );
        for hostile in [
            "<script>alert(1)</script>",
            "Error: connect ECONNREFUSED 10.0.0.3:5432",
            "",
            "INVALID_EXACT_EVM_SIGNATURE",
        ] {
            assert_eq!(reason::map(Some(hostile)), reason::FACILITATOR_REJECTED);
        }
        assert_eq!(reason::map(None), reason::FACILITATOR_REJECTED);
        // Solana: the catalogue's `invalid_exact_svm_*` codes pass, an unknown one does not.
        assert_eq!(
            reason::map(Some("invalid_exact_svm_payload_amount_mismatch")),
            "invalid_exact_svm_payload_amount_mismatch"
        );
        assert_eq!(
            reason::map(Some("invalid_exact_svm_made_up")),
            reason::FACILITATOR_REJECTED
        );
        // Codes are plain snake_case ASCII: safe in a header and a JSON body.
        // Every code passed through is in the one catalogue.
        for k in reason::KNOWN {
            assert!(crate::reason::Reason::from_wire(k).is_some(), "{k}");
        }
        assert!(reason::KNOWN.iter().all(|k| {
            k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        }));
    }

    #[test]
    fn detail_is_bounded() {
        let long = "x".repeat(10_000);
        let d = detail(Some(&long), Some("m"));
        assert!(d.chars().count() <= MAX_DETAIL_CHARS + 1, "{}", d.len());
        assert_eq!(detail(Some("r"), Some("line\nbreak")), "r: line break");
        assert_eq!(detail(None, None), "(no reason)");
    }

    #[test]
    fn replies_parse_leniently_but_typed() {
        let ok: VerifyReply =
            serde_json::from_str(r#"{"isValid":true,"payer":"0xab","invalidReason":null,"x":1}"#)
                .unwrap();
        assert!(ok.is_valid && ok.invalid_reason.is_none());
        assert!(serde_json::from_str::<VerifyReply>(r#"{"isValid":"true"}"#).is_err());
        assert!(serde_json::from_str::<VerifyReply>(r#"{"payer":"0xab"}"#).is_err());
        assert!(serde_json::from_str::<SettleReply>(r#"{"success":1}"#).is_err());
        let s: SettleReply =
            serde_json::from_str(r#"{"success":false,"errorReason":"x","transaction":""}"#)
                .unwrap();
        assert!(!s.success && s.transaction.as_deref() == Some(""));
    }
}
