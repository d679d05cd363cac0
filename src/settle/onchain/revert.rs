//! What a chain error means for a payment: the token refused it (a reason code for the client)
//! or the RPC failed (retry later).

use std::time::Duration;

use alloy_json_rpc::RpcError;
use alloy_provider::transport::TransportError;
use alloy_sol_types::decode_revert_reason;

use super::reason;
use crate::settle::SettleError;
use crate::verify::BoxError;

/// A classified chain error.
#[derive(Debug)]
pub(super) enum Failure {
    /// The token reverted (simulation or send): the payment cannot settle as signed.
    Revert(crate::reason::Reason),
    /// The RPC failed or refused for a reason of ours (relayer funds, fees): retry later.
    Rpc {
        retry_after: Option<Duration>,
        source: BoxError,
    },
}

impl Failure {
    pub(super) fn rpc(source: impl Into<BoxError>) -> Self {
        Self::Rpc {
            retry_after: None,
            source: source.into(),
        }
    }

    /// The error the layer sees: refused payments answer 402, the rest 503.
    pub(super) fn into_settle_error(self) -> SettleError {
        match self {
            Self::Revert(reason) => SettleError::Refused {
                reason,
                transaction: None,
            },
            Self::Rpc {
                retry_after,
                source,
            } => SettleError::Unavailable {
                retry_after,
                source,
            },
        }
    }
}

/// Sorts an RPC error into a revert (with its reason) or an RPC failure. Only an error
/// response that says it reverted is the payer's problem; anything else (transport errors,
/// the relayer lacking gas money, fee too low) is ours.
pub(super) fn classify(e: TransportError) -> Failure {
    if let RpcError::ErrorResp(payload) = &e {
        // Code 3 is the standard "execution reverted"; some nodes only say it in the message.
        if payload.code == 3 || payload.message.to_ascii_lowercase().contains("revert") {
            let data = payload.as_revert_data();
            if let Some(reason) = data.as_ref().and_then(|d| super::upto::custom_error(d)) {
                return Failure::Revert(reason);
            }
            let decoded = data.and_then(|data| decode_revert_reason(&data));
            let text = decoded.as_deref().unwrap_or(&payload.message);
            return Failure::Revert(revert_reason(text));
        }
    }
    let retry_after = match &e {
        RpcError::Transport(kind) => kind.retry_after(),
        _ => None,
    };
    Failure::Rpc {
        retry_after,
        source: Box::new(e),
    }
}

/// The x402 reason for a token's revert text, matched like the reference facilitator does
/// (FiatToken v2.2 strings; anything unknown is a failed transaction).
pub(super) fn revert_reason(text: &str) -> crate::reason::Reason {
    let text = text.to_ascii_lowercase();
    let has = |needle: &str| text.contains(needle);
    if has("used or cancel") {
        reason::NONCE_ALREADY_USED
    } else if has("authorization is expired") {
        reason::VALID_BEFORE
    } else if has("not yet valid") {
        reason::VALID_AFTER
    } else if has("exceeds balance") {
        reason::INSUFFICIENT_BALANCE
    } else if has("invalid signature") {
        reason::SIGNATURE
    } else {
        reason::TRANSACTION_FAILED
    }
}

/// True when a node refused a raw transaction because its nonce was already taken: mined
/// ("nonce too low", e.g. the relayer account was used by another program) or pending
/// ("replacement transaction underpriced", e.g. a send whose future was dropped mid-flight).
pub(super) fn is_nonce_taken(e: &TransportError) -> bool {
    error_message(e).is_some_and(|m| {
        m.contains("nonce too low")
            || m.contains("nonce is too low")
            || m.contains("replacement transaction underpriced")
    })
}

/// True when the node already has this exact transaction (a resend of a send that timed out).
pub(super) fn is_already_known(e: &TransportError) -> bool {
    error_message(e).is_some_and(|m| m.contains("already known") || m.contains("known transaction"))
}

fn error_message(e: &TransportError) -> Option<String> {
    match e {
        RpcError::ErrorResp(payload) => Some(payload.message.to_ascii_lowercase()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use alloy_json_rpc::ErrorPayload;
    use alloy_primitives::hex;
    use alloy_provider::transport::TransportErrorKind;
    use alloy_sol_types::SolError;

    use super::*;

    #[test]
    fn fiat_token_strings_map_to_reference_reasons() {
        let cases = [
            (
                "FiatTokenV2: authorization is used or canceled",
                reason::NONCE_ALREADY_USED,
            ),
            (
                "FiatTokenV2: authorization is expired",
                reason::VALID_BEFORE,
            ),
            (
                "FiatTokenV2: authorization is not yet valid",
                reason::VALID_AFTER,
            ),
            (
                "ERC20: transfer amount exceeds balance",
                reason::INSUFFICIENT_BALANCE,
            ),
            ("FiatTokenV2: invalid signature", reason::SIGNATURE),
            ("ECRecover: invalid signature 's' value", reason::SIGNATURE),
            ("ECRecover: invalid signature 'v' value", reason::SIGNATURE),
            (
                "Blacklistable: account is blacklisted",
                reason::TRANSACTION_FAILED,
            ),
            ("", reason::TRANSACTION_FAILED),
        ];
        for (text, want) in cases {
            assert_eq!(revert_reason(text), want, "{text}");
        }
    }

    fn error_resp(code: i64, message: &str, data: Option<&str>) -> TransportError {
        RpcError::ErrorResp(ErrorPayload {
            code,
            message: message.to_owned().into(),
            data: data.map(|d| {
                serde_json::value::RawValue::from_string(d.to_owned()).expect("valid json")
            }),
        })
    }

    #[test]
    fn revert_data_is_decoded_before_the_message() {
        // Error(string) "ERC20: transfer amount exceeds balance", as anvil returns it.
        let revert = alloy_sol_types::Revert::from("ERC20: transfer amount exceeds balance");
        let data = format!("\"{}\"", hex::encode_prefixed(revert.abi_encode()));
        let e = error_resp(3, "execution reverted", Some(&data));
        assert!(matches!(classify(e), Failure::Revert(r) if r == reason::INSUFFICIENT_BALANCE));
        let e = error_resp(
            -32000,
            "execution reverted: FiatTokenV2: authorization is expired",
            None,
        );
        assert!(matches!(classify(e), Failure::Revert(r) if r == reason::VALID_BEFORE));
    }

    #[test]
    fn non_revert_errors_are_ours() {
        let e = error_resp(-32000, "insufficient funds for gas * price + value", None);
        assert!(matches!(classify(e), Failure::Rpc { .. }));
        let e = TransportErrorKind::backend_gone();
        assert!(matches!(classify(e), Failure::Rpc { .. }));
        assert!(is_nonce_taken(&error_resp(-32003, "nonce too low", None)));
        assert!(is_nonce_taken(&error_resp(
            -32000,
            "replacement transaction underpriced",
            None
        )));
        assert!(is_already_known(&error_resp(-32000, "already known", None)));
        assert!(!is_nonce_taken(&TransportErrorKind::backend_gone()));
    }
}
