//! Payment channels: the x402 `batch-settlement` scheme on EVM (issue #19, first slices).
//!
//! The client deposits once into the `x402BatchSettlement` escrow, then signs one cumulative
//! [`Voucher`](crate::proto::batch::Voucher) per request; the server checks each voucher with
//! one signature recovery against the channel's `payerAuthorizer` (no RPC) and claims many
//! channels later in one `claimWithSignature` transaction, then `settle`s them to the receiver.
//!
//! This module holds what every part of the scheme shares: the canonical addresses, the
//! EIP-712 domain ("x402 Batch Settlement", version "1") and the hashes of its types
//! ([`channel_id`], [`voucher_digest`], [`refund_digest`], [`claim_batch_digest`]), the deposit
//! authorization's digest ([`deposit_nonce`], [`receive_authorization_digest`]), the in-process
//! voucher check ([`verify`]) and the channel state ([`store`]).
//!
//! [`serve::Channels`] serves one paid request on a channel end to end (lease, checks, deposit
//! through an [`serve::Escrow`] such as `OnchainSettler` or `FacilitatorClient`, handler, commit);
//! `PaymentOption::batch_settlement` builds the challenge, and
//! [`PaymentLayerBuilder::channels`](crate::layer::PaymentLayerBuilder::channels) makes a
//! `PaymentLayer` serve the scheme over HTTP with it (receipts with [`receipt_extra`], the
//! corrective 402 with [`corrective_requirements`], refusals as catalogued `Reason`s).

mod authorizer;
mod dispatch;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
pub mod serve;
pub use authorizer::{AuthorizerKeyError, LocalAuthorizer};
pub(crate) use dispatch::{Handler, Serve};
pub mod store;
pub mod verify;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::PostgresChannelStore;

use alloy_primitives::{Address, B256, U256, address, keccak256};
use alloy_sol_types::{Eip712Domain, SolStruct, SolValue};

use crate::proto::batch::ChannelConfig;

/// The scheme name.
pub const SCHEME: &str = "batch-settlement";

/// The canonical `x402BatchSettlement` escrow (the same address on every chain).
pub const BATCH_SETTLEMENT: Address = address!("0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003");
/// The canonical ERC-3009 deposit collector: the `to` of a deposit's `ReceiveWithAuthorization`.
pub const ERC3009_DEPOSIT_COLLECTOR: Address =
    address!("0x4020806089470a89826cB9fB1f4059150b550004");
/// The canonical Permit2 deposit collector.
pub const PERMIT2_DEPOSIT_COLLECTOR: Address =
    address!("0x4020425FAf3B746C082C2f942b4E5159887B0005");

/// The shortest `withdrawDelay` the escrow accepts (15 minutes).
pub const MIN_WITHDRAW_DELAY: u64 = 900;
/// The longest `withdrawDelay` the escrow accepts (30 days).
pub const MAX_WITHDRAW_DELAY: u64 = 2_592_000;

/// How a deposit moves the tokens (`extra.assetTransferMethod`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AssetTransferMethod {
    /// EIP-3009 `receiveWithAuthorization` (USDC and other FiatToken-style tokens).
    Eip3009,
    /// Permit2, for any ERC-20 (the payer approves Permit2 once): a `PermitWitnessTransferFrom`
    /// to the Permit2 deposit collector, its witness the channel id.
    Permit2,
}

impl AssetTransferMethod {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Eip3009 => "eip3009",
            Self::Permit2 => "permit2",
        }
    }
}

/// The requirement's `extra` keys of the scheme.
pub mod extra {
    /// The address that signs claims and refunds.
    pub const RECEIVER_AUTHORIZER: &str = "receiverAuthorizer";
    /// Seconds a timed withdrawal waits.
    pub const WITHDRAW_DELAY: &str = "withdrawDelay";
    /// `"eip3009"` (default) or `"permit2"`.
    pub const ASSET_TRANSFER_METHOD: &str = "assetTransferMethod";
    /// Corrective 402: the server's channel snapshot.
    pub const CHANNEL_STATE: &str = "channelState";
    /// Corrective 402: the latest signed voucher.
    pub const VOUCHER_STATE: &str = "voucherState";
}

/// The EIP-712 structs, crate-private: `sol!` makes its items `pub`, and they are not API.
pub(crate) mod eip712 {
    alloy_sol_types::sol! {
        struct ChannelConfig {
            address payer;
            address payerAuthorizer;
            address receiver;
            address receiverAuthorizer;
            address token;
            uint40 withdrawDelay;
            bytes32 salt;
        }
        struct Voucher {
            bytes32 channelId;
            uint128 maxClaimableAmount;
        }
        struct Refund {
            bytes32 channelId;
            uint256 nonce;
            uint128 amount;
        }
        struct ClaimEntry {
            bytes32 channelId;
            uint128 maxClaimableAmount;
            uint128 totalClaimed;
        }
        struct ClaimBatch {
            ClaimEntry[] claims;
        }
        struct ReceiveWithAuthorization {
            address from;
            address to;
            uint256 value;
            uint256 validAfter;
            uint256 validBefore;
            bytes32 nonce;
        }
    }
}

/// The escrow's EIP-712 domain on `chain_id`.
pub fn domain(chain_id: u64) -> Eip712Domain {
    Eip712Domain::new(
        Some("x402 Batch Settlement".into()),
        Some("1".into()),
        Some(U256::from(chain_id)),
        Some(BATCH_SETTLEMENT),
        None,
    )
}

/// The config as the escrow's `ChannelConfig` struct (`withdrawDelay` is a `uint40`: larger
/// values are cut to 40 bits, which gives another id, never a collision with a valid config).
/// The reference [`channel_id`] is checked against (it hashes the same words directly).
#[cfg(test)]
pub(crate) fn sol_config(config: &ChannelConfig) -> eip712::ChannelConfig {
    eip712::ChannelConfig {
        payer: config.payer,
        payerAuthorizer: config.payer_authorizer,
        receiver: config.receiver,
        receiverAuthorizer: config.receiver_authorizer,
        token: config.token,
        withdrawDelay: alloy_primitives::aliases::U40::from(config.withdraw_delay & 0xff_ffff_ffff),
        salt: config.salt,
    }
}

/// The fixed parts of the voucher path's EIP-712 hashes, hashed once: the generic
/// `eip712_signing_hash` rebuilds and hashes the type string and the whole domain (four
/// Keccaks) on every call, five of a digest's seven Keccaks (`tests::fast_hashes_are_alloys`).
struct Fixed {
    config_type: B256,
    voucher_type: B256,
    /// The domain separator of the first chain id asked for (a server has one).
    separator: std::sync::OnceLock<(u64, B256)>,
}

static FIXED: std::sync::LazyLock<Fixed> = std::sync::LazyLock::new(|| Fixed {
    config_type: keccak256(eip712::ChannelConfig::eip712_encode_type().as_bytes()),
    voucher_type: keccak256(eip712::Voucher::eip712_encode_type().as_bytes()),
    separator: std::sync::OnceLock::new(),
});

fn separator(chain_id: u64) -> B256 {
    let (id, sep) = *FIXED
        .separator
        .get_or_init(|| (chain_id, domain(chain_id).hash_struct()));
    if id == chain_id {
        sep
    } else {
        domain(chain_id).hash_struct()
    }
}

/// `keccak256(0x1901 ‖ separator ‖ struct_hash)`.
fn signing_hash(chain_id: u64, struct_hash: B256) -> B256 {
    let mut input = [0u8; 66];
    input[..2].copy_from_slice(&[0x19, 0x01]);
    input[2..34].copy_from_slice(separator(chain_id).as_slice());
    input[34..].copy_from_slice(struct_hash.as_slice());
    keccak256(input)
}

/// An address as an ABI word (left-padded).
fn word(address: Address) -> [u8; 32] {
    let mut w = [0u8; 32];
    w[12..].copy_from_slice(address.as_slice());
    w
}

/// The channel id: the EIP-712 hash of `config` under the escrow's domain on `chain_id`.
pub fn channel_id(chain_id: u64, config: &ChannelConfig) -> B256 {
    let mut data = [0u8; 32 * 8];
    data[..32].copy_from_slice(FIXED.config_type.as_slice());
    for (i, a) in [
        config.payer,
        config.payer_authorizer,
        config.receiver,
        config.receiver_authorizer,
        config.token,
    ]
    .into_iter()
    .enumerate()
    {
        data[32 * (i + 1)..32 * (i + 2)].copy_from_slice(&word(a));
    }
    // `uint40`: larger values cut to 40 bits, as `sol_config` does.
    let delay = config.withdraw_delay & 0xff_ffff_ffff;
    data[32 * 7 - 8..32 * 7].copy_from_slice(&delay.to_be_bytes());
    data[32 * 7..].copy_from_slice(config.salt.as_slice());
    signing_hash(chain_id, keccak256(data))
}

/// Channels whose id was computed lately, by id: a channel pays many vouchers with the same
/// config, and hashing it (three Keccak permutations) cost each voucher ~15k instructions.
/// Only ids that [`channel_id`] computed are kept, so a hit (same id, chain and config) is the
/// hash's own answer. Bounded: emptied when full.
/// (A fixed-bytes hasher: the ids are hashes already, SipHash cost each lookup ~300 instructions.)
static KNOWN: std::sync::LazyLock<
    std::sync::Mutex<alloy_primitives::map::B256Map<(u64, ChannelConfig)>>,
> = std::sync::LazyLock::new(Default::default);

/// How many channel ids [`is_channel_id`] remembers.
const KNOWN_MAX: usize = 4096;

/// Whether `config` hashes to `claimed` on `chain_id` (as `channel_id(chain_id, config) ==
/// claimed`), remembering the channels met lately.
pub(crate) fn is_channel_id(chain_id: u64, config: &ChannelConfig, claimed: B256) -> bool {
    // A poisoned lock: a panic mid-insert of a plain map; the entries are still whole.
    let known = || {
        KNOWN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if known()
        .get(&claimed)
        .is_some_and(|(chain, c)| *chain == chain_id && c == config)
    {
        return true;
    }
    if channel_id(chain_id, config) != claimed {
        return false;
    }
    let mut known = known();
    if known.len() >= KNOWN_MAX {
        known.clear();
    }
    known.insert(claimed, (chain_id, config.clone()));
    true
}

/// Amounts are `uint128` on chain: `None` above.
fn u128_of(v: U256) -> Option<u128> {
    u128::try_from(v).ok()
}

/// The digest a payer (authorizer) signs for a voucher of `max_claimable` on `channel`, or
/// `None` when the amount does not fit the escrow's `uint128`.
pub fn voucher_digest(chain_id: u64, channel: B256, max_claimable: U256) -> Option<B256> {
    let amount = u128_of(max_claimable)?;
    let mut data = [0u8; 32 * 3];
    data[..32].copy_from_slice(FIXED.voucher_type.as_slice());
    data[32..64].copy_from_slice(channel.as_slice());
    data[80..].copy_from_slice(&amount.to_be_bytes());
    Some(signing_hash(chain_id, keccak256(data)))
}

/// The digest the receiver authorizer signs for `refundWithSignature`.
pub fn refund_digest(chain_id: u64, channel: B256, nonce: U256, amount: u128) -> B256 {
    eip712::Refund {
        channelId: channel,
        nonce,
        amount,
    }
    .eip712_signing_hash(&domain(chain_id))
}

/// One row of a claim batch: (channel id, voucher ceiling, new cumulative total claimed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimEntry {
    /// The channel.
    pub channel_id: B256,
    /// The voucher's signed ceiling.
    pub max_claimable_amount: u128,
    /// The cumulative total claimed after this claim (at most the ceiling).
    pub total_claimed: u128,
}

/// The digest the receiver authorizer signs for `claimWithSignature` over `claims`.
pub fn claim_batch_digest(chain_id: u64, claims: &[ClaimEntry]) -> B256 {
    eip712::ClaimBatch {
        claims: claims
            .iter()
            .map(|c| eip712::ClaimEntry {
                channelId: c.channel_id,
                maxClaimableAmount: c.max_claimable_amount,
                totalClaimed: c.total_claimed,
            })
            .collect(),
    }
    .eip712_signing_hash(&domain(chain_id))
}

/// The EIP-3009 nonce of a deposit into `channel` with the client's `salt`:
/// `keccak256(abi.encode(channelId, uint256(salt)))`, so an authorization funds one channel only.
pub fn deposit_nonce(channel: B256, salt: B256) -> B256 {
    keccak256((channel, U256::from_be_bytes(salt.0)).abi_encode())
}

/// The token's EIP-3009 domain (`name`, `version` from the requirement's `extra`).
pub fn token_domain(chain_id: u64, token: Address, name: &str, version: &str) -> Eip712Domain {
    Eip712Domain::new(
        Some(name.to_owned().into()),
        Some(version.to_owned().into()),
        Some(U256::from(chain_id)),
        Some(token),
        None,
    )
}

/// The digest the payer signs for a deposit: `ReceiveWithAuthorization(from = payer, to = the
/// ERC-3009 collector, value, validAfter, validBefore, nonce = deposit_nonce(..))`.
pub fn receive_authorization_digest(
    token: &Eip712Domain,
    payer: Address,
    value: U256,
    valid_after: U256,
    valid_before: U256,
    nonce: B256,
) -> B256 {
    eip712::ReceiveWithAuthorization {
        from: payer,
        to: ERC3009_DEPOSIT_COLLECTOR,
        value,
        validAfter: valid_after,
        validBefore: valid_before,
        nonce,
    }
    .eip712_signing_hash(token)
}

/// One channel's row in a claim: its latest voucher and the total to claim (what was charged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelClaim {
    /// The channel.
    pub config: ChannelConfig,
    /// The voucher's signed ceiling.
    pub max_claimable: u128,
    /// The voucher's signature.
    pub signature: alloy_primitives::Bytes,
    /// The cumulative total to claim (at most the ceiling).
    pub total_claimed: u128,
}

impl ChannelClaim {
    /// The claim of everything charged on a channel, if anything is still unclaimed.
    pub fn of(state: &store::ChannelState) -> Option<Self> {
        (state.charged_cumulative > state.total_claimed).then(|| Self {
            config: state.config.clone(),
            max_claimable: state.signed_max_claimable,
            signature: state.signature.clone(),
            total_claimed: state.charged_cumulative,
        })
    }
}

/// The EIP-712 `ClaimBatch` digest of `claims` on `chain_id`: what the receiver authorizer
/// signs for `OnchainSettler::claim_channels`.
pub fn claim_digest(chain_id: u64, claims: &[ChannelClaim]) -> B256 {
    let entries: Vec<ClaimEntry> = claims
        .iter()
        .map(|c| ClaimEntry {
            channel_id: channel_id(chain_id, &c.config),
            max_claimable_amount: c.max_claimable,
            total_claimed: c.total_claimed,
        })
        .collect();
    claim_batch_digest(chain_id, &entries)
}

/// Signs the `ClaimBatch` digests of the server's receiver authorizer (a local key, a KMS).
pub trait ReceiverAuthorizer: Send + Sync {
    /// The 65-byte `r ‖ s ‖ v` signature of `digest`.
    fn sign_digest(&self, digest: B256) -> Result<alloy_primitives::Bytes, crate::store::BoxError>;
}

/// The spec's `channelState` object of `state` (in a corrective 402's `extra` and a
/// receipt's `extra`): amounts as decimal strings, `withdrawRequestedAt` a number.
pub fn channel_state_json(channel: B256, state: &store::ChannelState) -> serde_json::Value {
    serde_json::json!({
        "channelId": channel,
        "balance": state.balance.to_string(),
        "totalClaimed": state.total_claimed.to_string(),
        "withdrawRequestedAt": state.withdraw_requested_at,
        "refundNonce": state.refund_nonce.to_string(),
        "chargedCumulativeAmount": state.charged_cumulative.to_string(),
    })
}

/// The requirement of a corrective 402 (`invalid_batch_settlement_evm_cumulative_amount_mismatch`):
/// `req` with `extra.channelState` and `extra.voucherState` (the latest signed voucher, which
/// the client checks against its own key before adopting the server's charged amount).
pub fn corrective_requirements(
    req: &crate::proto::v2::PaymentRequirements,
    channel: B256,
    state: &store::ChannelState,
) -> crate::proto::v2::PaymentRequirements {
    let mut req = req.clone();
    let extra_map = req.extra.get_or_insert_with(Default::default);
    extra_map.insert(
        extra::CHANNEL_STATE.into(),
        channel_state_json(channel, state),
    );
    extra_map.insert(
        extra::VOUCHER_STATE.into(),
        serde_json::json!({
            "signedMaxClaimable": state.signed_max_claimable.to_string(),
            "signature": state.signature,
        }),
    );
    req
}

/// The `extra` of a paid response's receipt: `chargedAmount` (omitted for a refund) and
/// `channelState` (the spec's payment-response contract).
pub fn receipt_extra(
    charged: Option<u128>,
    channel: B256,
    state: &store::ChannelState,
) -> serde_json::Map<String, serde_json::Value> {
    let mut extra = serde_json::Map::new();
    if let Some(charged) = charged {
        extra.insert("chargedAmount".into(), charged.to_string().into());
    }
    extra.insert("channelState".into(), channel_state_json(channel, state));
    extra
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached-hash paths give alloy's generic EIP-712 hashes, on the first chain id and
    /// on others, for withdraw delays in and beyond 40 bits.
    #[test]
    fn fast_hashes_are_alloys() {
        for (n, chain_id) in [84532u64, 8453, 1, 84532].into_iter().enumerate() {
            let byte = u8::try_from(n).unwrap_or(0) + 1;
            for delay in [900u64, 2_592_000, 1 << 40, u64::MAX] {
                let config = ChannelConfig {
                    payer: Address::repeat_byte(byte),
                    payer_authorizer: Address::repeat_byte(byte + 1),
                    receiver: Address::repeat_byte(byte + 2),
                    receiver_authorizer: Address::repeat_byte(byte + 3),
                    token: Address::repeat_byte(byte + 4),
                    withdraw_delay: delay,
                    salt: B256::repeat_byte(byte + 5),
                };
                let id = channel_id(chain_id, &config);
                assert_eq!(
                    id,
                    sol_config(&config).eip712_signing_hash(&domain(chain_id))
                );
                for amount in [0u128, 1, 1_000, u128::MAX] {
                    let alloy = eip712::Voucher {
                        channelId: id,
                        maxClaimableAmount: amount,
                    }
                    .eip712_signing_hash(&domain(chain_id));
                    assert_eq!(
                        voucher_digest(chain_id, id, U256::from(amount)),
                        Some(alloy)
                    );
                }
            }
        }
        assert_eq!(voucher_digest(1, B256::ZERO, U256::MAX), None);
    }

    /// The remembered ids answer as the hash does: a hit needs the same id, chain and config.
    #[test]
    fn known_channel_ids_answer_as_the_hash() {
        let config = ChannelConfig {
            payer: Address::repeat_byte(0x61),
            payer_authorizer: Address::repeat_byte(0x62),
            receiver: Address::repeat_byte(0x63),
            receiver_authorizer: Address::repeat_byte(0x64),
            token: Address::repeat_byte(0x65),
            withdraw_delay: 900,
            salt: B256::repeat_byte(0x66),
        };
        let id = channel_id(84532, &config);
        let mut other = config.clone();
        other.salt = B256::repeat_byte(0x67);
        for _ in 0..2 {
            // First computed, then remembered: the same answers.
            assert!(is_channel_id(84532, &config, id));
            assert!(!is_channel_id(8453, &config, id), "another chain");
            assert!(!is_channel_id(84532, &other, id), "another config");
            assert!(!is_channel_id(84532, &config, B256::repeat_byte(1)));
            assert!(is_channel_id(84532, &other, channel_id(84532, &other)));
        }
    }
}
