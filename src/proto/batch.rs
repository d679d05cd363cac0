//! The `batch-settlement` EVM payloads (x402 `scheme_batch_settlement_evm`; what `@x402/evm`
//! 2.27's `BatchSettlementEvmScheme` sends): a `deposit` (token authorization + first voucher),
//! a `voucher` (the next cumulative ceiling) or a `refund` (a zero-charge voucher asking for
//! the unclaimed escrow back), each with the channel's full config.

use alloy_primitives::{Address, B256, Bytes, U256};
use serde::{Deserialize, Serialize};

/// The channel's immutable config; its EIP-712 hash is the channel id
/// ([`crate::channel::channel_id`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChannelConfig {
    /// The client's wallet, whose tokens fund the channel.
    #[serde(serialize_with = "super::checksummed")]
    pub payer: Address,
    /// The EOA that signs vouchers, or zero: the payer signs them (EIP-1271 for a contract).
    #[serde(serialize_with = "super::checksummed")]
    pub payer_authorizer: Address,
    /// Where claimed funds go: the requirement's `payTo`.
    #[serde(serialize_with = "super::checksummed")]
    pub receiver: Address,
    /// Signs claims and refunds: the requirement's `extra.receiverAuthorizer`.
    #[serde(serialize_with = "super::checksummed")]
    pub receiver_authorizer: Address,
    /// The ERC-20 token: the requirement's `asset`.
    #[serde(serialize_with = "super::checksummed")]
    pub token: Address,
    /// Seconds a timed withdrawal waits (`uint40` on chain; 15 min to 30 days).
    pub withdraw_delay: u64,
    /// Tells apart channels that share every other field.
    pub salt: B256,
}

/// A signed cumulative ceiling: the receiver may claim up to `max_claimable_amount` in total
/// from the channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Voucher {
    /// The channel the voucher is for (must be the config's hash).
    pub channel_id: B256,
    /// Cumulative ceiling, in atomic units (`uint128` on chain).
    #[serde(with = "super::decimal")]
    pub max_claimable_amount: U256,
    /// EIP-712 `Voucher` signature of the payer authorizer (or the payer).
    pub signature: Bytes,
}

/// The EIP-3009 `receiveWithAuthorization` of a deposit; the signed `to` is the ERC-3009
/// deposit collector and the nonce is `keccak256(abi.encode(channelId, salt))`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Erc3009Authorization {
    /// Unix seconds after which it is valid.
    #[serde(with = "super::decimal")]
    pub valid_after: U256,
    /// Unix seconds before which it must be used.
    #[serde(with = "super::decimal")]
    pub valid_before: U256,
    /// The client's random salt (a 32-byte hex string, read as a `uint256`).
    pub salt: B256,
    /// EIP-712 signature of the payer.
    pub signature: Bytes,
}

/// How the deposit is authorized: exactly one method.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DepositAuthorization {
    /// EIP-3009 (`assetTransferMethod: "eip3009"`, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erc3009_authorization: Option<Erc3009Authorization>,
    /// Permit2 (`assetTransferMethod: "permit2"`); boxed, as it is the larger and rarer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permit2_authorization: Option<Box<Permit2DepositAuthorization>>,
}

/// The witness of a Permit2 deposit: the channel the permit may fund.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DepositWitness {
    /// The channel id (the config's EIP-712 hash).
    pub channel_id: B256,
}

/// The Permit2 `PermitWitnessTransferFrom` of a deposit (`permit2Authorization`): spender = the
/// Permit2 deposit collector, the deposit amount, the witness `DepositWitness(channelId)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Permit2DepositAuthorization {
    /// The payer, and the expected signer (not part of the signed message).
    #[serde(serialize_with = "super::checksummed")]
    pub from: Address,
    /// Token and amount: the channel's token, the deposit amount.
    pub permitted: super::upto::TokenPermissions,
    /// Who may pull the tokens: the Permit2 deposit collector.
    #[serde(serialize_with = "super::checksummed")]
    pub spender: Address,
    /// Permit2 unordered nonce.
    #[serde(with = "super::decimal")]
    pub nonce: U256,
    /// Unix seconds after which the permit is void.
    #[serde(with = "super::decimal")]
    pub deadline: U256,
    /// The channel the permit funds.
    pub witness: DepositWitness,
    /// EIP-712 signature of the payer over Permit2's domain.
    pub signature: Bytes,
}

/// The deposit part of a `deposit` payload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Deposit {
    /// Atomic units moved into the escrow.
    #[serde(with = "super::decimal")]
    pub amount: U256,
    /// The token authorization.
    pub authorization: DepositAuthorization,
}

/// `payload` of a `batch-settlement` EVM payment, by its `type`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum BatchEvmPayload {
    /// Opens or tops up the channel and pays this request with `voucher`.
    #[serde(rename_all = "camelCase")]
    Deposit {
        /// The channel.
        channel_config: ChannelConfig,
        /// The voucher for this request.
        voucher: Voucher,
        /// The token authorization.
        deposit: Deposit,
    },
    /// Pays this request from the channel's balance.
    #[serde(rename_all = "camelCase")]
    Voucher {
        /// The channel.
        channel_config: ChannelConfig,
        /// The voucher for this request.
        voucher: Voucher,
    },
    /// Asks for the unclaimed escrow back (all of it without `amount`); the handler is not
    /// run.
    #[serde(rename_all = "camelCase")]
    Refund {
        /// The channel.
        channel_config: ChannelConfig,
        /// A zero-charge voucher: its ceiling is the charged cumulative amount.
        voucher: Voucher,
        /// A partial refund, in atomic units.
        #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_decimal")]
        amount: Option<U256>,
    },
}

impl BatchEvmPayload {
    /// The channel config every payload carries.
    pub fn channel_config(&self) -> &ChannelConfig {
        match self {
            Self::Deposit { channel_config, .. }
            | Self::Voucher { channel_config, .. }
            | Self::Refund { channel_config, .. } => channel_config,
        }
    }

    /// The voucher every payload carries.
    pub fn voucher(&self) -> &Voucher {
        match self {
            Self::Deposit { voucher, .. }
            | Self::Voucher { voucher, .. }
            | Self::Refund { voucher, .. } => voucher,
        }
    }
}

mod opt_decimal {
    use alloy_primitives::U256;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<U256>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::super::decimal::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<U256>, D::Error> {
        super::super::decimal::deserialize(d).map(Some)
    }
}
