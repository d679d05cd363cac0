//! In-process checks of `batch-settlement` payloads: no RPC, one signature recovery per
//! voucher (two for a deposit).
//!
//! The order follows the reference facilitator and server: scheme and network, the payload's
//! shape, the channel config against the server's terms (channel id = the config's EIP-712
//! hash, receiver = `payTo`, receiver authorizer, token = `asset`, withdraw delay, its range),
//! the voucher's signature (ECDSA against `payerAuthorizer`), the deposit's authorization by
//! the requirement's `assetTransferMethod` (EIP-3009: time window, signature of the payer;
//! Permit2: spender = the Permit2 deposit collector, token, amount, witness = this channel,
//! deadline, signature of the payer), then the amounts against the server's
//! [`ChannelState`]: the voucher's ceiling must be exactly `charged + price` (a `refund`:
//! exactly `charged`), above the claimed total, and within the balance (plus the deposit).
//!
//! Vouchers of channels whose `payerAuthorizer` is zero are signed by the payer's contract
//! wallet (EIP-1271): [`authenticate_with_contracts`] asks the chain through a
//! [`ContractSignatures`] after every in-process check ([`authenticate`] alone refuses them).
//! Not checked here: deposits signed by a contract payer (refused); the payer's Permit2
//! allowance (read by `OnchainSettler` before it sends the deposit) and nonce (the deposit
//! reverts; the handler does not run). Each refusal has the
//! reference's wire code ([`BatchError::code`]), catalogued as a typed `Reason`
//! ([`BatchError::reason`]) with its row in [`crate::rejection`].

use alloy_primitives::{Address, B256, U256};
use serde_json::Value;

use super::store::ChannelState;
use super::{
    AssetTransferMethod, MAX_WITHDRAW_DELAY, MIN_WITHDRAW_DELAY, PERMIT2_DEPOSIT_COLLECTOR, SCHEME,
    deposit_nonce, extra, receive_authorization_digest, token_domain, voucher_digest,
};
use crate::proto::batch::{
    BatchEvmPayload, ChannelConfig, Deposit, Permit2DepositAuthorization, Voucher,
};
use crate::proto::{PaymentPayload, v2::PaymentRequirements};
use crate::verify::exact::recover_signer_kept;
use crate::verify::wallet::{ContractSignatureError, ContractSignatures};

/// Seconds a deposit authorization must still be valid for: the reference's margin for the
/// deposit transaction to be mined.
pub const VALID_BEFORE_MARGIN: u64 = 6;

/// Why a `batch-settlement` payload was refused; [`BatchError::code`] is the reference's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The scheme is not `batch-settlement`.
    #[error("scheme is not batch-settlement")]
    Scheme,
    /// Payload and requirement name different networks.
    #[error("payload and requirement name different networks")]
    NetworkMismatch,
    /// The payload's `type` is not deposit, voucher or refund.
    #[error("unknown payload type")]
    PayloadType,
    /// A malformed voucher payload (or an amount beyond `uint128`).
    #[error("malformed voucher payload")]
    VoucherPayload,
    /// A malformed deposit payload.
    #[error("malformed deposit payload")]
    DepositPayload,
    /// A malformed refund payload.
    #[error("malformed refund payload")]
    RefundPayload,
    /// The requirement lacks the token's EIP-712 `name` / `version`.
    #[error("the requirement lacks the token's EIP-712 domain")]
    MissingEip712Domain,
    /// The config does not hash to the voucher's channel id.
    #[error("the channel config does not hash to the channel id")]
    ChannelIdMismatch,
    /// The channel's receiver is not `payTo`.
    #[error("the channel's receiver is not payTo")]
    ReceiverMismatch,
    /// The channel's receiver authorizer is not the server's.
    #[error("the channel's receiver authorizer is not the server's")]
    ReceiverAuthorizerMismatch,
    /// The channel's token is not the requirement's asset.
    #[error("the channel's token is not the asset")]
    TokenMismatch,
    /// The channel's withdraw delay is not the server's.
    #[error("the channel's withdraw delay is not the server's")]
    WithdrawDelayMismatch,
    /// The withdraw delay is outside 15 minutes to 30 days.
    #[error("the withdraw delay is outside 15 minutes to 30 days")]
    WithdrawDelayOutOfRange,
    /// The voucher is not signed by the payer authorizer (or, the authorizer zero, the
    /// payer's contract refused it, or no contract-signature checker is configured).
    #[error("the voucher is not signed by the payer authorizer")]
    VoucherSignature,
    /// The deposit has no EIP-3009 authorization.
    #[error("the deposit has no EIP-3009 authorization")]
    Erc3009AuthorizationRequired,
    /// The deposit authorization expires too soon.
    #[error("the deposit authorization expired")]
    ValidBefore,
    /// The deposit authorization is not valid yet.
    #[error("the deposit authorization is not valid yet")]
    ValidAfter,
    /// The deposit authorization is not signed by the payer.
    #[error("the deposit authorization is not signed by the payer")]
    ReceiveAuthorizationSignature,
    /// The voucher's ceiling is not `charged + price` (a refund's: not `charged`): the client
    /// gets a corrective 402 with the server's channel state.
    #[error("the voucher's ceiling does not match the charged cumulative amount")]
    CumulativeAmountMismatch,
    /// The ceiling is not above what was already claimed on chain.
    #[error("the voucher's ceiling is below the claimed total")]
    CumulativeBelowClaimed,
    /// The ceiling is above the channel's balance.
    #[error("the voucher's ceiling exceeds the channel's balance")]
    CumulativeExceedsBalance,
    /// The server has no state for this channel (a voucher or refund before any deposit).
    #[error("no channel session for this channel id")]
    MissingChannel,
    /// The channel has no balance.
    #[error("the channel has no balance")]
    ChannelNotFound,
    /// A refund of zero, or more than is refundable.
    #[error("invalid refund amount")]
    RefundAmountInvalid,
    /// Nothing left to refund.
    #[error("nothing left to refund")]
    RefundNoBalance,
    /// The handler charged more than the voucher allows.
    #[error("the charge exceeds the signed cumulative amount")]
    ChargeExceedsSignedCumulative,
    /// Another request holds the channel.
    #[error("another request holds the channel")]
    ChannelBusy,
    /// The Permit2 deposit's spender is not the Permit2 deposit collector.
    #[error("the permit's spender is not the Permit2 deposit collector")]
    Permit2InvalidSpender,
    /// The permit's amount is not the deposit's.
    #[error("the permit's amount is not the deposit amount")]
    Permit2AmountMismatch,
    /// The permit's deadline has passed (or is too close).
    #[error("the permit's deadline has passed")]
    Permit2DeadlineExpired,
    /// The permit is not signed by the payer (or names another owner).
    #[error("the permit is not signed by the payer")]
    Permit2InvalidSignature,
    /// The payer has not approved Permit2 for the deposit amount (the escrow's pre-check).
    #[error("the payer's Permit2 allowance is below the deposit")]
    Permit2AllowanceRequired,
}

impl BatchError {
    /// The code as a catalogued [`Reason`](crate::rejection::Reason).
    pub fn reason(self) -> crate::rejection::Reason {
        use crate::rejection::Reason;
        match self {
            Self::Scheme => Reason::BatchSettlementScheme,
            Self::NetworkMismatch => Reason::BatchSettlementNetworkMismatch,
            Self::PayloadType => Reason::BatchSettlementPayloadType,
            Self::VoucherPayload => Reason::BatchSettlementVoucherPayload,
            Self::DepositPayload => Reason::BatchSettlementDepositPayload,
            Self::RefundPayload => Reason::BatchSettlementRefundPayload,
            Self::MissingEip712Domain => Reason::BatchSettlementMissingEip712Domain,
            Self::ChannelIdMismatch => Reason::BatchSettlementChannelIdMismatch,
            Self::ReceiverMismatch => Reason::BatchSettlementReceiverMismatch,
            Self::ReceiverAuthorizerMismatch => Reason::BatchSettlementReceiverAuthorizerMismatch,
            Self::TokenMismatch => Reason::BatchSettlementTokenMismatch,
            Self::WithdrawDelayMismatch => Reason::BatchSettlementWithdrawDelayMismatch,
            Self::WithdrawDelayOutOfRange => Reason::BatchSettlementWithdrawDelayOutOfRange,
            Self::VoucherSignature => Reason::BatchSettlementVoucherSignature,
            Self::Erc3009AuthorizationRequired => {
                Reason::BatchSettlementErc3009AuthorizationRequired
            }
            Self::ValidBefore => Reason::BatchSettlementValidBefore,
            Self::ValidAfter => Reason::BatchSettlementValidAfter,
            Self::ReceiveAuthorizationSignature => {
                Reason::BatchSettlementReceiveAuthorizationSignature
            }
            Self::CumulativeAmountMismatch => Reason::BatchSettlementCumulativeAmountMismatch,
            Self::CumulativeBelowClaimed => Reason::BatchSettlementCumulativeBelowClaimed,
            Self::CumulativeExceedsBalance => Reason::BatchSettlementCumulativeExceedsBalance,
            Self::MissingChannel => Reason::BatchSettlementMissingChannel,
            Self::ChannelNotFound => Reason::BatchSettlementChannelNotFound,
            Self::RefundAmountInvalid => Reason::BatchSettlementRefundAmountInvalid,
            Self::RefundNoBalance => Reason::BatchSettlementRefundNoBalance,
            Self::ChargeExceedsSignedCumulative => {
                Reason::BatchSettlementChargeExceedsSignedCumulative
            }
            Self::ChannelBusy => Reason::BatchSettlementChannelBusy,
            Self::Permit2InvalidSpender => Reason::BatchSettlementPermit2InvalidSpender,
            Self::Permit2AmountMismatch => Reason::BatchSettlementPermit2AmountMismatch,
            Self::Permit2DeadlineExpired => Reason::BatchSettlementPermit2DeadlineExpired,
            Self::Permit2InvalidSignature => Reason::BatchSettlementPermit2InvalidSignature,
            Self::Permit2AllowanceRequired => Reason::BatchSettlementPermit2AllowanceRequired,
        }
    }

    /// The wire code (the reference's).
    pub fn code(self) -> &'static str {
        match self {
            Self::Scheme => "invalid_batch_settlement_evm_scheme",
            Self::NetworkMismatch => "invalid_batch_settlement_evm_network_mismatch",
            Self::PayloadType => "invalid_batch_settlement_evm_payload_type",
            Self::VoucherPayload => "invalid_batch_settlement_evm_voucher_payload",
            Self::DepositPayload => "invalid_batch_settlement_evm_deposit_payload",
            Self::RefundPayload => "invalid_batch_settlement_evm_refund_payload",
            Self::MissingEip712Domain => "invalid_batch_settlement_evm_missing_eip712_domain",
            Self::ChannelIdMismatch => "invalid_batch_settlement_evm_channel_id_mismatch",
            Self::ReceiverMismatch => "invalid_batch_settlement_evm_receiver_mismatch",
            Self::ReceiverAuthorizerMismatch => {
                "invalid_batch_settlement_evm_receiver_authorizer_mismatch"
            }
            Self::TokenMismatch => "invalid_batch_settlement_evm_token_mismatch",
            Self::WithdrawDelayMismatch => "invalid_batch_settlement_evm_withdraw_delay_mismatch",
            Self::WithdrawDelayOutOfRange => {
                "invalid_batch_settlement_evm_withdraw_delay_out_of_range"
            }
            Self::VoucherSignature => "invalid_batch_settlement_evm_voucher_signature",
            Self::Erc3009AuthorizationRequired => {
                "invalid_batch_settlement_evm_erc3009_authorization_required"
            }
            Self::ValidBefore => "invalid_batch_settlement_evm_payload_authorization_valid_before",
            Self::ValidAfter => "invalid_batch_settlement_evm_payload_authorization_valid_after",
            Self::ReceiveAuthorizationSignature => {
                "invalid_batch_settlement_evm_receive_authorization_signature"
            }
            Self::CumulativeAmountMismatch => {
                "invalid_batch_settlement_evm_cumulative_amount_mismatch"
            }
            Self::CumulativeBelowClaimed => "invalid_batch_settlement_evm_cumulative_below_claimed",
            Self::CumulativeExceedsBalance => {
                "invalid_batch_settlement_evm_cumulative_exceeds_balance"
            }
            Self::MissingChannel => "invalid_batch_settlement_evm_missing_channel",
            Self::ChannelNotFound => "invalid_batch_settlement_evm_channel_not_found",
            Self::RefundAmountInvalid => "invalid_batch_settlement_evm_refund_amount_invalid",
            Self::RefundNoBalance => "invalid_batch_settlement_evm_refund_no_balance",
            Self::ChargeExceedsSignedCumulative => {
                "invalid_batch_settlement_evm_charge_exceeds_signed_cumulative"
            }
            Self::ChannelBusy => "invalid_batch_settlement_evm_channel_busy",
            Self::Permit2InvalidSpender => "invalid_batch_settlement_evm_permit2_invalid_spender",
            Self::Permit2AmountMismatch => "invalid_batch_settlement_evm_permit2_amount_mismatch",
            Self::Permit2DeadlineExpired => "invalid_batch_settlement_evm_permit2_deadline_expired",
            Self::Permit2InvalidSignature => {
                "invalid_batch_settlement_evm_permit2_invalid_signature"
            }
            Self::Permit2AllowanceRequired => {
                "invalid_batch_settlement_evm_permit2_allowance_required"
            }
        }
    }
}

/// The server's side of a channel, from its `batch-settlement` requirement: what every
/// channel paying it must commit to, and the per-request maximum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelTerms {
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// `payTo`.
    pub receiver: Address,
    /// `extra.receiverAuthorizer` (never zero).
    pub receiver_authorizer: Address,
    /// `asset`.
    pub token: Address,
    /// `extra.withdrawDelay`.
    pub withdraw_delay: u64,
    /// The token's EIP-712 name (`extra.name`).
    pub token_name: String,
    /// The token's EIP-712 version (`extra.version`).
    pub token_version: String,
    /// The per-request maximum (`amount`).
    pub price: u128,
    /// How deposits move the tokens (`extra.assetTransferMethod`, default EIP-3009).
    pub asset_transfer_method: AssetTransferMethod,
}

impl ChannelTerms {
    /// The terms of `req` (a `batch-settlement` requirement).
    pub fn from_requirements(req: &PaymentRequirements) -> Result<Self, BatchError> {
        if req.scheme != SCHEME {
            return Err(BatchError::Scheme);
        }
        let (Some(name), Some(version)) = (req.extra_str("name"), req.extra_str("version")) else {
            return Err(BatchError::MissingEip712Domain);
        };
        let receiver_authorizer = req
            .extra_str(extra::RECEIVER_AUTHORIZER)
            .and_then(|a| a.parse::<Address>().ok())
            .filter(|a| !a.is_zero())
            .ok_or(BatchError::ReceiverAuthorizerMismatch)?;
        let withdraw_delay = req
            .extra
            .as_ref()
            .and_then(|e| e.get(extra::WITHDRAW_DELAY))
            .and_then(Value::as_u64)
            .filter(|d| (MIN_WITHDRAW_DELAY..=MAX_WITHDRAW_DELAY).contains(d))
            .ok_or(BatchError::WithdrawDelayOutOfRange)?;
        let asset_transfer_method = match req.extra_str(extra::ASSET_TRANSFER_METHOD) {
            None | Some("eip3009") => AssetTransferMethod::Eip3009,
            Some("permit2") => AssetTransferMethod::Permit2,
            Some(_) => return Err(BatchError::PayloadType),
        };
        Ok(Self {
            chain_id: req.network.chain_id(),
            receiver: req.pay_to.evm().ok_or(BatchError::ReceiverMismatch)?,
            receiver_authorizer,
            token: req.asset.evm().ok_or(BatchError::TokenMismatch)?,
            withdraw_delay,
            token_name: name.to_owned(),
            token_version: version.to_owned(),
            price: u128::try_from(req.amount).map_err(|_| BatchError::VoucherPayload)?,
            asset_transfer_method,
        })
    }
}

/// The `batch-settlement` payload of `payload`, if it names `req`'s scheme and network.
pub fn parse(
    payload: &PaymentPayload,
    req: &PaymentRequirements,
) -> Result<BatchEvmPayload, BatchError> {
    if payload.scheme() != SCHEME || req.scheme != SCHEME {
        return Err(BatchError::Scheme);
    }
    if payload.network() != req.network {
        return Err(BatchError::NetworkMismatch);
    }
    // The header decoder's reading, when it read the payload on its way.
    match payload.raw_payload().batch() {
        Some(batch) => Ok(batch.clone()),
        None => parse_raw(payload.raw_payload().get()),
    }
}

/// Parses a raw `payload` object, naming the malformed part by the payload's `type`.
pub fn parse_raw(raw: &str) -> Result<BatchEvmPayload, BatchError> {
    // A compact voucher takes a direct path; the result is serde's for every input.
    match BatchEvmPayload::from_json(raw) {
        Ok(p) => Ok(p),
        Err(_) => {
            #[derive(serde::Deserialize)]
            struct Tag<'a> {
                #[serde(borrow, rename = "type")]
                kind: Option<std::borrow::Cow<'a, str>>,
            }
            let kind = serde_json::from_str::<Tag<'_>>(raw)
                .ok()
                .and_then(|t| t.kind);
            Err(match kind.as_deref() {
                Some("deposit") => BatchError::DepositPayload,
                Some("voucher") => BatchError::VoucherPayload,
                Some("refund") => BatchError::RefundPayload,
                _ => BatchError::PayloadType,
            })
        }
    }
}

/// The config against the server's terms, in the reference's order.
pub fn check_config(
    terms: &ChannelTerms,
    config: &ChannelConfig,
    claimed: B256,
) -> Result<(), BatchError> {
    if !super::is_channel_id(terms.chain_id, config, claimed) {
        return Err(BatchError::ChannelIdMismatch);
    }
    if config.receiver != terms.receiver {
        return Err(BatchError::ReceiverMismatch);
    }
    if config.receiver_authorizer != terms.receiver_authorizer {
        return Err(BatchError::ReceiverAuthorizerMismatch);
    }
    if config.token != terms.token {
        return Err(BatchError::TokenMismatch);
    }
    if config.withdraw_delay != terms.withdraw_delay {
        return Err(BatchError::WithdrawDelayMismatch);
    }
    if !(MIN_WITHDRAW_DELAY..=MAX_WITHDRAW_DELAY).contains(&config.withdraw_delay) {
        return Err(BatchError::WithdrawDelayOutOfRange);
    }
    Ok(())
}

/// The voucher's ceiling as the escrow's `uint128`.
fn ceiling(voucher: &Voucher) -> Result<u128, BatchError> {
    u128::try_from(voucher.max_claimable_amount).map_err(|_| BatchError::VoucherPayload)
}

/// The voucher is signed by the channel's payer authorizer (ECDSA: 65 bytes, low `s`).
pub fn check_voucher_signature(
    chain_id: u64,
    config: &ChannelConfig,
    voucher: &Voucher,
) -> Result<(), BatchError> {
    // A zero authorizer means "ask the payer's contract" (EIP-1271): not in-process.
    if config.payer_authorizer.is_zero() {
        return Err(BatchError::VoucherSignature);
    }
    let digest = voucher_digest(chain_id, voucher.channel_id, voucher.max_claimable_amount)
        .ok_or(BatchError::VoucherPayload)?;
    match recover_signer_kept(digest, &voucher.signature) {
        Ok(signer) if signer == config.payer_authorizer => Ok(()),
        _ => Err(BatchError::VoucherSignature),
    }
}

/// The deposit's authorization, by the terms' [`AssetTransferMethod`]: EIP-3009 (to the
/// collector, for this channel, valid now and for [`VALID_BEFORE_MARGIN`] more seconds, signed
/// by the payer) or Permit2 ([`check_permit2_deposit`]). Returns the amount.
pub fn check_deposit(
    terms: &ChannelTerms,
    config: &ChannelConfig,
    channel: B256,
    deposit: &Deposit,
    now: u64,
) -> Result<u128, BatchError> {
    let amount = u128::try_from(deposit.amount)
        .ok()
        .filter(|a| *a > 0)
        .ok_or(BatchError::DepositPayload)?;
    // Exactly one method: the escrow submits the one the payload carries, so a second,
    // unverified one must not ride along.
    let auth = &deposit.authorization;
    if auth.erc3009_authorization.is_some() && auth.permit2_authorization.is_some() {
        return Err(BatchError::DepositPayload);
    }
    if terms.asset_transfer_method == AssetTransferMethod::Permit2 {
        // As the reference: a permit2 requirement with another authorization is the wrong type.
        let permit = deposit
            .authorization
            .permit2_authorization
            .as_ref()
            .ok_or(BatchError::PayloadType)?;
        return check_permit2_deposit(terms, config, channel, deposit.amount, permit, now)
            .map(|()| amount);
    }
    let auth = deposit
        .authorization
        .erc3009_authorization
        .as_ref()
        .ok_or(BatchError::Erc3009AuthorizationRequired)?;
    if auth.valid_before < U256::from(now.saturating_add(VALID_BEFORE_MARGIN)) {
        return Err(BatchError::ValidBefore);
    }
    if auth.valid_after > U256::from(now) {
        return Err(BatchError::ValidAfter);
    }
    let domain = token_domain(
        terms.chain_id,
        terms.token,
        &terms.token_name,
        &terms.token_version,
    );
    let digest = receive_authorization_digest(
        &domain,
        config.payer,
        deposit.amount,
        auth.valid_after,
        auth.valid_before,
        deposit_nonce(channel, auth.salt),
    );
    match recover_signer_kept(digest, &auth.signature) {
        Ok(signer) if signer == config.payer => Ok(amount),
        _ => Err(BatchError::ReceiveAuthorizationSignature),
    }
}

/// What a verified payload asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// A deposit of `amount` into the escrow, then a paid request.
    Deposit {
        /// Atomic units the authorization moves.
        amount: u128,
    },
    /// A paid request from the channel's balance.
    Voucher,
    /// A cooperative refund (all that is refundable when the payload names no amount); no
    /// handler.
    Refund {
        /// The amount that will be refunded.
        amount: u128,
    },
}

/// A payload that passed every in-process check against the server's channel state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The channel.
    pub channel_id: B256,
    /// The channel's config.
    pub config: ChannelConfig,
    /// What the payload asks for.
    pub request: Request,
    /// The voucher's signed ceiling.
    pub max_claimable: u128,
    /// The voucher's signature.
    pub signature: alloy_primitives::Bytes,
    /// The charged cumulative amount the voucher was checked against.
    pub charged_before: u128,
}

impl Accepted {
    /// The most the handler may charge: the ceiling's headroom over what was charged (the
    /// requirement's price for a paid request, zero for a refund).
    pub fn max_charge(&self) -> u128 {
        self.max_claimable - self.charged_before
    }
}

/// What [`authenticate`] proved of a payload, before any state is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authentic {
    /// The voucher's ceiling.
    pub max_claimable: u128,
    /// The deposit's amount (a `deposit` payload).
    pub deposit: Option<u128>,
}

/// The checks that need no channel state: config against the terms, the voucher's signature
/// and a deposit's authorization. Cheap enough to run before taking the channel's lease, so
/// that an unsigned payload cannot hold a channel.
pub fn authenticate(
    terms: &ChannelTerms,
    payload: &BatchEvmPayload,
    now: u64,
) -> Result<Authentic, BatchError> {
    let config = payload.channel_config();
    let voucher = payload.voucher();
    check_config(terms, config, voucher.channel_id)?;
    let max_claimable = ceiling(voucher)?;
    check_voucher_signature(terms.chain_id, config, voucher)?;
    let deposit = match payload {
        BatchEvmPayload::Deposit { deposit, .. } => Some(check_deposit(
            terms,
            config,
            voucher.channel_id,
            deposit,
            now,
        )?),
        _ => None,
    };
    Ok(Authentic {
        max_claimable,
        deposit,
    })
}

/// Every in-process check of `payload` against `terms` and the server's `state` of its
/// channel (`None`: no record), at Unix time `now`; see the [module docs](self).
pub fn verify(
    terms: &ChannelTerms,
    payload: &BatchEvmPayload,
    state: Option<&ChannelState>,
    now: u64,
) -> Result<Accepted, BatchError> {
    let authentic = authenticate(terms, payload, now)?;
    against_state(terms, payload, authentic, state)
}

/// The amount checks of an [`authenticate`]d payload against the channel's `state`.
pub fn against_state(
    terms: &ChannelTerms,
    payload: &BatchEvmPayload,
    authentic: Authentic,
    state: Option<&ChannelState>,
) -> Result<Accepted, BatchError> {
    let (config, voucher) = (payload.channel_config(), payload.voucher());
    let (max, deposit) = (authentic.max_claimable, authentic.deposit);
    // Without a record only a deposit may start a channel (from zero).
    let (charged, balance, claimed) = match (state, deposit) {
        (Some(s), _) => (s.charged_cumulative, s.balance, s.total_claimed),
        (None, Some(_)) => (0, 0, 0),
        (None, None) => return Err(BatchError::MissingChannel),
    };
    let request = match payload {
        BatchEvmPayload::Refund { amount, .. } => {
            if max != charged {
                return Err(BatchError::CumulativeAmountMismatch);
            }
            if max < claimed {
                return Err(BatchError::CumulativeBelowClaimed);
            }
            let refundable = balance.saturating_sub(charged.max(claimed));
            if refundable == 0 {
                return Err(BatchError::RefundNoBalance);
            }
            let amount = match amount {
                None => refundable,
                Some(a) => u128::try_from(*a)
                    .ok()
                    .filter(|a| *a > 0 && *a <= refundable)
                    .ok_or(BatchError::RefundAmountInvalid)?,
            };
            Request::Refund { amount }
        }
        _ => {
            if Some(max) != charged.checked_add(terms.price) {
                return Err(BatchError::CumulativeAmountMismatch);
            }
            let effective = balance.saturating_add(deposit.unwrap_or(0));
            if effective == 0 {
                return Err(BatchError::ChannelNotFound);
            }
            if max <= claimed {
                return Err(BatchError::CumulativeBelowClaimed);
            }
            if max > effective {
                return Err(BatchError::CumulativeExceedsBalance);
            }
            match deposit {
                Some(amount) => Request::Deposit { amount },
                None => Request::Voucher,
            }
        }
    };
    Ok(Accepted {
        channel_id: voucher.channel_id,
        config: config.clone(),
        request,
        max_claimable: max,
        signature: voucher.signature.clone(),
        charged_before: charged,
    })
}

/// The EIP-712 structs of a Permit2 deposit, crate-private: `sol!` makes its items `pub`.
mod permit2_eip712 {
    alloy_sol_types::sol! {
        struct TokenPermissions {
            address token;
            uint256 amount;
        }
        struct DepositWitness {
            bytes32 channelId;
        }
        /// With `DepositWitness` its type hash is the one Permit2 builds from the collector's
        /// witness type string.
        struct PermitWitnessTransferFrom {
            TokenPermissions permitted;
            address spender;
            uint256 nonce;
            uint256 deadline;
            DepositWitness witness;
        }
    }
}

/// The digest the payer signs for a Permit2 deposit: Permit2's domain (`name: "Permit2"`, no
/// version) on `chain_id`, the permit and its `DepositWitness(channelId)`.
pub fn permit2_deposit_digest(chain_id: u64, permit: &Permit2DepositAuthorization) -> B256 {
    use alloy_sol_types::{Eip712Domain, SolStruct};
    let domain = Eip712Domain::new(
        Some("Permit2".into()),
        None,
        Some(U256::from(chain_id)),
        Some(crate::verify::upto::PERMIT2),
        None,
    );
    permit2_eip712::PermitWitnessTransferFrom {
        permitted: permit2_eip712::TokenPermissions {
            token: permit.permitted.token,
            amount: permit.permitted.amount,
        },
        spender: permit.spender,
        nonce: permit.nonce,
        deadline: permit.deadline,
        witness: permit2_eip712::DepositWitness {
            channelId: permit.witness.channel_id,
        },
    }
    .eip712_signing_hash(&domain)
}

/// A Permit2 deposit, in the reference facilitator's order: owner = the payer, spender = the
/// Permit2 deposit collector, token = the channel's, amount = the deposit's, witness = this
/// channel, deadline at least [`VALID_BEFORE_MARGIN`] seconds ahead, and the payer's ECDSA
/// signature (a contract payer's EIP-1271 signature needs the chain: refused).
pub fn check_permit2_deposit(
    terms: &ChannelTerms,
    config: &ChannelConfig,
    channel: B256,
    amount: U256,
    permit: &Permit2DepositAuthorization,
    now: u64,
) -> Result<(), BatchError> {
    if permit.from != config.payer {
        return Err(BatchError::Permit2InvalidSignature);
    }
    if permit.spender != PERMIT2_DEPOSIT_COLLECTOR {
        return Err(BatchError::Permit2InvalidSpender);
    }
    if permit.permitted.token != terms.token {
        return Err(BatchError::TokenMismatch);
    }
    if permit.permitted.amount != amount {
        return Err(BatchError::Permit2AmountMismatch);
    }
    if permit.witness.channel_id != channel {
        return Err(BatchError::ChannelIdMismatch);
    }
    if permit.deadline < U256::from(now.saturating_add(VALID_BEFORE_MARGIN)) {
        return Err(BatchError::Permit2DeadlineExpired);
    }
    match recover_signer_kept(
        permit2_deposit_digest(terms.chain_id, permit),
        &permit.signature,
    ) {
        Ok(signer) if signer == config.payer => Ok(()),
        _ => Err(BatchError::Permit2InvalidSignature),
    }
}

// EIP-1271 vouchers (issue #19 item 2): the payer's contract judges the voucher, through the
// chain. Kept apart from the in-process checks above.

/// Why [`authenticate_with_contracts`] refused a payload.
#[derive(Debug, thiserror::Error)]
pub enum ContractAuthError {
    /// A check failed (the chain's "invalid" is [`BatchError::VoucherSignature`]).
    #[error(transparent)]
    Refused(BatchError),
    /// The chain could not judge the voucher (timeout, RPC failure): retry later, nothing
    /// was charged.
    #[error("the chain could not check the voucher's contract signature")]
    Unavailable(#[source] ContractSignatureError),
}

/// [`authenticate`], with vouchers of channels whose `payerAuthorizer` is zero checked by the
/// payer's contract (`isValidSignature`, ERC-1271; or ERC-6492 for a wallet yet to be
/// deployed) through `contracts`, only after every in-process check passed (so a malformed or
/// mismatched payload costs no RPC). Without `contracts` such vouchers are refused as by
/// [`authenticate`]. A checker that has no RPC for the chain refuses too.
pub async fn authenticate_with_contracts(
    terms: &ChannelTerms,
    payload: &BatchEvmPayload,
    now: u64,
    contracts: Option<&dyn ContractSignatures>,
) -> Result<Authentic, ContractAuthError> {
    let config = payload.channel_config();
    let voucher = payload.voucher();
    let Some(contracts) = contracts.filter(|_| config.payer_authorizer.is_zero()) else {
        return authenticate(terms, payload, now).map_err(ContractAuthError::Refused);
    };
    let refused = ContractAuthError::Refused;
    check_config(terms, config, voucher.channel_id).map_err(refused)?;
    let max_claimable = ceiling(voucher).map_err(refused)?;
    let digest = voucher_digest(
        terms.chain_id,
        voucher.channel_id,
        voucher.max_claimable_amount,
    )
    .ok_or(refused(BatchError::VoucherPayload))?;
    if voucher.signature.is_empty()
        || voucher.signature.len() > crate::verify::wallet::MAX_SIGNATURE_BYTES
    {
        return Err(refused(BatchError::VoucherSignature));
    }
    let deposit = match payload {
        BatchEvmPayload::Deposit { deposit, .. } => {
            Some(check_deposit(terms, config, voucher.channel_id, deposit, now).map_err(refused)?)
        }
        _ => None,
    };
    match contracts
        .is_valid(terms.chain_id, config.payer, digest, &voucher.signature)
        .await
    {
        Ok(true) => Ok(Authentic {
            max_claimable,
            deposit,
        }),
        Ok(false) => Err(refused(BatchError::VoucherSignature)),
        Err(e) if e.is_unsupported_chain() => Err(refused(BatchError::VoucherSignature)),
        Err(e) => Err(ContractAuthError::Unavailable(e)),
    }
}

#[cfg(test)]
mod contract_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use alloy_primitives::Bytes;
    use async_trait::async_trait;

    use super::*;
    use crate::channel::channel_id;

    /// A checker that answers `reply` and counts its calls (with the digest it was asked).
    struct Fake {
        calls: AtomicUsize,
        reply: fn() -> Result<bool, ContractSignatureError>,
        asked: std::sync::Mutex<Option<(Address, B256)>>,
    }

    #[async_trait]
    impl ContractSignatures for Fake {
        async fn is_valid(
            &self,
            _chain_id: u64,
            signer: Address,
            hash: B256,
            _signature: &Bytes,
        ) -> Result<bool, ContractSignatureError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            *self.asked.lock().expect("lock") = Some((signer, hash));
            (self.reply)()
        }
    }

    fn fake(reply: fn() -> Result<bool, ContractSignatureError>) -> Fake {
        Fake {
            calls: AtomicUsize::new(0),
            reply,
            asked: std::sync::Mutex::new(None),
        }
    }

    fn terms() -> ChannelTerms {
        ChannelTerms {
            chain_id: 84532,
            receiver: Address::repeat_byte(2),
            receiver_authorizer: Address::repeat_byte(3),
            token: Address::repeat_byte(4),
            withdraw_delay: 900,
            token_name: "USDC".into(),
            token_version: "2".into(),
            price: 1_000,
            asset_transfer_method: AssetTransferMethod::Eip3009,
        }
    }

    /// A voucher of a contract payer (zero `payerAuthorizer`) for `ceiling`.
    fn voucher(t: &ChannelTerms, ceiling: u64) -> BatchEvmPayload {
        let config = ChannelConfig {
            payer: Address::repeat_byte(0x77),
            payer_authorizer: Address::ZERO,
            receiver: t.receiver,
            receiver_authorizer: t.receiver_authorizer,
            token: t.token,
            withdraw_delay: t.withdraw_delay,
            salt: B256::ZERO,
        };
        BatchEvmPayload::Voucher {
            voucher: Voucher {
                channel_id: channel_id(t.chain_id, &config),
                max_claimable_amount: U256::from(ceiling),
                signature: Bytes::from(vec![1u8; 65]),
            },
            channel_config: config,
        }
    }

    async fn check(
        checker: Option<&Fake>,
        payload: &BatchEvmPayload,
    ) -> Result<Authentic, ContractAuthError> {
        let checker = checker.map(|c| c as &dyn ContractSignatures);
        authenticate_with_contracts(&terms(), payload, 0, checker).await
    }

    #[tokio::test]
    async fn the_payers_contract_judges_a_zero_authorizer_voucher_after_the_in_process_checks() {
        let t = terms();
        let good = voucher(&t, 1_000);
        let yes = fake(|| Ok(true));
        let authentic = check(Some(&yes), &good).await.expect("valid");
        assert_eq!(authentic.max_claimable, 1_000);
        let (signer, hash) = yes.asked.lock().expect("lock").expect("asked");
        assert_eq!(signer, good.channel_config().payer, "the payer's contract");
        let digest = voucher_digest(t.chain_id, good.voucher().channel_id, U256::from(1_000));
        assert_eq!(Some(hash), digest, "over the voucher's EIP-712 digest");

        // Without a checker: refused, as by `authenticate`.
        let e = check(None, &good).await.expect_err("no checker");
        assert!(matches!(
            e,
            ContractAuthError::Refused(BatchError::VoucherSignature)
        ));

        // A failed in-process check never reaches the chain.
        let mut bad = good.clone();
        if let BatchEvmPayload::Voucher { voucher, .. } = &mut bad {
            voucher.channel_id = B256::repeat_byte(9);
        }
        let counted = fake(|| Ok(true));
        let e = check(Some(&counted), &bad).await.expect_err("wrong id");
        assert!(matches!(
            e,
            ContractAuthError::Refused(BatchError::ChannelIdMismatch)
        ));
        let mut empty = good.clone();
        if let BatchEvmPayload::Voucher { voucher, .. } = &mut empty {
            voucher.signature = Bytes::new();
        }
        let e = check(Some(&counted), &empty)
            .await
            .expect_err("no signature");
        assert!(matches!(
            e,
            ContractAuthError::Refused(BatchError::VoucherSignature)
        ));
        assert_eq!(counted.calls.load(Ordering::SeqCst), 0, "no chain call");

        // The contract says no; no RPC for the chain: refused. The RPC fails: unavailable.
        let no = fake(|| Ok(false));
        let e = check(Some(&no), &good).await.expect_err("invalid");
        assert!(matches!(
            e,
            ContractAuthError::Refused(BatchError::VoucherSignature)
        ));
        let other_chain = fake(|| Err(ContractSignatureError::UnsupportedChain(1)));
        let e = check(Some(&other_chain), &good).await.expect_err("no rpc");
        assert!(matches!(
            e,
            ContractAuthError::Refused(BatchError::VoucherSignature)
        ));
        let down = fake(|| Err(ContractSignatureError::rpc("connection refused")));
        let e = check(Some(&down), &good).await.expect_err("down");
        assert!(matches!(e, ContractAuthError::Unavailable(_)), "{e:?}");
    }
}
