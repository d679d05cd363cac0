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
