//! The `upto` EVM payload: a Permit2 `PermitWitnessTransferFrom` authorising up to a maximum,
//! and its signature (x402 `scheme_upto_evm`; what `@x402/evm`'s `UptoEvmScheme` sends).

use alloy_primitives::{Address, Bytes, U256};
use serde::{Deserialize, Serialize};

/// The token and the most the spender may take.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenPermissions {
    /// The token; must equal the requirement's `asset`.
    #[serde(serialize_with = "super::checksummed")]
    pub token: Address,
    /// The maximum, in atomic units; must equal the requirement's `amount`.
    #[serde(with = "super::decimal")]
    pub amount: U256,
}

/// The witness the payer signs with the permit: where the money goes, who may settle it, and
/// from when.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UptoWitness {
    /// Recipient; must equal `payTo`.
    #[serde(serialize_with = "super::checksummed")]
    pub to: Address,
    /// The only account the x402 upto proxy lets settle (the requirement's
    /// `extra.facilitatorAddress`).
    #[serde(serialize_with = "super::checksummed")]
    pub facilitator: Address,
    /// Unix seconds before which it cannot settle.
    #[serde(with = "super::decimal")]
    pub valid_after: U256,
}

/// The signed Permit2 message (`permit2Authorization`), plus its signer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Permit2Authorization {
    /// Payer, and the expected signer (not part of the signed message).
    #[serde(serialize_with = "super::checksummed")]
    pub from: Address,
    /// Token and maximum.
    pub permitted: TokenPermissions,
    /// Who may pull the tokens: the x402 upto Permit2 proxy.
    #[serde(serialize_with = "super::checksummed")]
    pub spender: Address,
    /// Permit2 unordered nonce: one use per owner, across all tokens.
    #[serde(with = "super::decimal")]
    pub nonce: U256,
    /// Unix seconds after which the permit is void.
    #[serde(with = "super::decimal")]
    pub deadline: U256,
    /// Recipient, facilitator, validAfter.
    pub witness: UptoWitness,
}

/// `payload` of an `upto` EVM payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UptoEvmPayload {
    /// 65-byte `r ‖ s ‖ v` of the EIP-712 digest.
    pub signature: Bytes,
    /// The signed message.
    pub permit2_authorization: Permit2Authorization,
}
