//! Paying `batch-settlement` offers (x402 `scheme_batch_settlement_evm`) as `@x402/evm` 2.27's
//! `BatchSettlementEvmScheme` does: one deposit into the escrow, then one cumulative voucher per
//! request.
//!
//! The client keeps one [`ChannelRecord`] per (network, receiver, token) in a [`ChannelBook`]
//! (in memory by default; implement the trait to persist it). A paid call on a channel:
//!
//! 1. takes the channel's lock (calls on one channel are serialized: each voucher builds on the
//!    previous receipt);
//! 2. signs the voucher `charged + price` (EIP-712 "x402 Batch Settlement" v1). When the
//!    record's balance does not cover it, the voucher goes with a deposit: an EIP-3009
//!    `ReceiveWithAuthorization` to the ERC-3009 deposit collector of
//!    `max(needed, multiplier × price)`, at most the [`ChannelPolicy`]'s cap and what the
//!    [`Budget`](super::Budget) has left; a deposit the cap cannot cover is refused
//!    ([`ChannelError::DepositCap`]) before anything is signed. The record's `signed_max` is
//!    stored **before** the proof is sent;
//! 3. reads the receipt: `extra.chargedAmount` (at most the price: a server may charge less)
//!    advances the record; a receipt claiming more than the price advances it by the price only
//!    (the most the voucher allows) and is reported as refused. The budget counts the price when
//!    signing and gets back `price − chargedAmount`;
//! 4. a corrective 402 (`invalid_batch_settlement_evm_cumulative_amount_mismatch`) carrying
//!    `extra.channelState` / `extra.voucherState` is adopted once, and the call is paid again,
//!    only if the server's charged amount is backed by a voucher this client signed: with a
//!    record, `record.charged ≤ charged ≤ record.signed_max`; without one (lost state), the
//!    `voucherState` signature must be this signer's over the channel and `charged ≤
//!    signedMaxClaimable`. Anything else is returned to the caller as refused, nothing signed.
//!
//! A cooperative refund of the unspent deposit is [`Paying::refund_channel`](super::Paying):
//! a zero-charge voucher at the record's charged amount; a corrective 402 to it is adopted once
//! under the same record bound.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use alloy_primitives::{Address, B256, Bytes, Signature, U256};
use alloy_signer::Signer;
use http::HeaderMap;
use serde_json::Value;

use super::challenge::{Challenge, MAX_CHALLENGE_BYTES, Offer};
use super::error::{ChannelError, Error};
use super::layer::Shared;
use super::signer::{envelope, random_b256};
use super::{PaymentOutcome, PaymentReport};
use crate::Network;
use crate::channel::{self as ch, MAX_WITHDRAW_DELAY, MIN_WITHDRAW_DELAY, eip712};
use crate::proto::batch::{
    BatchEvmPayload, ChannelConfig, Deposit, DepositAuthorization, Erc3009Authorization, Voucher,
};
use crate::proto::exact::Authorization;
use crate::proto::header::{self, PAYMENT_RESPONSE};
use crate::proto::v2::PaymentRequirements;

/// The reason code of a corrective 402.
const MISMATCH: &str = "invalid_batch_settlement_evm_cumulative_amount_mismatch";
/// The reference's other corrective code (a voucher below the claimed total).
const BELOW_CLAIMED: &str = "invalid_batch_settlement_evm_cumulative_amount_below_claimed";

/// Which channel: one per server receiver, token and network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    /// The network.
    pub network: Network,
    /// The server's `payTo`.
    pub receiver: Address,
    /// The token (`asset`).
    pub token: Address,
}

/// What the client knows of one channel. Amounts are atomic token units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelRecord {
    /// The channel's config (its EIP-712 hash is the channel id).
    pub config: ChannelConfig,
    /// Deposited and not refunded, as far as the client knows.
    pub balance: u128,
    /// The cumulative amount the server's receipts charged.
    pub charged: u128,
    /// The highest voucher ceiling this client signed: the most the receiver can ever claim.
    pub signed_max: u128,
}

impl ChannelRecord {
    /// The deposit the client can still get back (`balance − charged`).
    pub fn refundable(&self) -> u128 {
        self.balance.saturating_sub(self.charged)
    }
}

/// Where the client keeps its channel records. Losing a record is recoverable (the server's
/// corrective 402) but a persisted one saves a round trip; `save(key, None)` deletes.
pub trait ChannelBook: Send + Sync + 'static {
    /// The record of `key`, if any.
    fn load(&self, key: &ChannelKey) -> Option<ChannelRecord>;
    /// Stores (or with `None` deletes) the record of `key`.
    fn save(&self, key: &ChannelKey, record: Option<ChannelRecord>);
}

/// A [`ChannelBook`] in memory, shared by its clones (records are lost with the process).
#[derive(Clone, Debug, Default)]
pub struct MemoryChannelBook(Arc<Mutex<HashMap<ChannelKey, ChannelRecord>>>);

impl MemoryChannelBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }
}

impl ChannelBook for MemoryChannelBook {
    fn load(&self, key: &ChannelKey) -> Option<ChannelRecord> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    fn save(&self, key: &ChannelKey, record: Option<ChannelRecord>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match record {
            Some(r) => map.insert(*key, r),
            None => map.remove(key),
        };
    }
}

/// How the client funds channels: the deposit multiplier and cap, the channel salt and where
/// records are kept. Given to [`PayingLayer::channels`](super::PayingLayer::channels).
#[derive(Clone)]
pub struct ChannelPolicy {
    max_deposit: U256,
    multiplier: u32,
    salt: B256,
    book: Arc<dyn ChannelBook>,
}

impl fmt::Debug for ChannelPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelPolicy")
            .field("max_deposit", &self.max_deposit)
            .field("multiplier", &self.multiplier)
            .field("salt", &self.salt)
            .finish_non_exhaustive()
    }
}

impl ChannelPolicy {
    /// Deposits at most `max_deposit` atomic units at a time (opening or topping up a channel),
    /// 5 × the price by default, records in memory, salt zero (the reference client's default).
    pub fn new(max_deposit: U256) -> Self {
        Self {
            max_deposit,
            multiplier: 5,
            salt: B256::ZERO,
            book: Arc::new(MemoryChannelBook::new()),
        }
    }

    setters! {
        /// Deposits `multiplier × price` (at least what the voucher needs, at most the cap).
        #[must_use]
        pub fn deposit_multiplier(multiplier: u32) => multiplier = multiplier.max(1);

        /// The channel config's salt (another salt, another channel with the same server).
        #[must_use]
        pub fn salt(salt: B256) => salt = salt;

        /// Keeps records in `book` (persist them across restarts with your own implementation).
        #[must_use]
        pub fn book(book: impl ChannelBook) => book = Arc::new(book);
    }

    /// The cap on one deposit.
    pub fn max_deposit(&self) -> U256 {
        self.max_deposit
    }
}

/// The channels side of a layer: its policy and one lock per channel.
pub(crate) struct Channels {
    pub(crate) policy: ChannelPolicy,
    locks: Mutex<HashMap<ChannelKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Channels {
    pub(crate) fn new(policy: ChannelPolicy) -> Self {
        Self {
            policy,
            locks: Mutex::default(),
        }
    }

    async fn lock(&self, key: ChannelKey) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn load(&self, key: &ChannelKey) -> Option<ChannelRecord> {
        self.policy.book.load(key)
    }

    fn save(&self, key: &ChannelKey, record: Option<ChannelRecord>) {
        self.policy.book.save(key, record);
    }
}

/// What a channel payment signed, for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelPayment {
    /// The channel.
    pub channel_id: B256,
    /// The voucher's cumulative ceiling.
    pub ceiling: U256,
    /// The deposit sent with it, if any.
    pub deposit: Option<U256>,
    /// What the server's receipt charged for this call (`None` until a successful receipt).
    pub charged: Option<U256>,
}

/// The channel side of a sent proof: the channel lock is held until the call ends.
#[derive(Clone)]
pub(crate) struct Ticket {
    key: ChannelKey,
    chain_id: u64,
    /// The record the voucher was built on (`charged` is the base of the ceiling).
    base: ChannelRecord,
    price: u128,
    ceiling: u128,
    deposit: Option<u128>,
    _guard: Arc<tokio::sync::OwnedMutexGuard<()>>,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("key", &self.key)
            .field("ceiling", &self.ceiling)
            .field("deposit", &self.deposit)
            .finish_non_exhaustive()
    }
}

fn signing(msg: impl fmt::Display) -> Error {
    Error::Signing(alloy_signer::Error::other(format!(
        "batch-settlement: {msg}"
    )))
}

/// The key of an EVM requirement.
fn key(req: &PaymentRequirements) -> Option<ChannelKey> {
    Some(ChannelKey {
        network: req.network,
        receiver: req.pay_to.evm()?,
        token: req.asset.evm()?,
    })
}

/// `extra.receiverAuthorizer`, a non-zero address.
pub(crate) fn receiver_authorizer(req: &PaymentRequirements) -> Option<Address> {
    req.extra_str(ch::extra::RECEIVER_AUTHORIZER)?
        .parse::<Address>()
        .ok()
        .filter(|a| !a.is_zero())
}

/// `extra.withdrawDelay` (the reference's default: the minimum), within the escrow's range.
pub(crate) fn withdraw_delay(req: &PaymentRequirements) -> Option<u64> {
    let delay = match req
        .extra
        .as_ref()
        .and_then(|e| e.get(ch::extra::WITHDRAW_DELAY))
    {
        None => MIN_WITHDRAW_DELAY,
        Some(v) => v.as_u64()?,
    };
    (MIN_WITHDRAW_DELAY..=MAX_WITHDRAW_DELAY)
        .contains(&delay)
        .then_some(delay)
}

/// The channel config this signer opens with the server of `req`.
fn config(req: &PaymentRequirements, payer: Address, salt: B256) -> Result<ChannelConfig, Error> {
    let (Some(receiver), Some(token)) = (req.pay_to.evm(), req.asset.evm()) else {
        return Err(signing("not an EVM requirement"));
    };
    Ok(ChannelConfig {
        payer,
        payer_authorizer: payer,
        receiver,
        receiver_authorizer: receiver_authorizer(req)
            .ok_or_else(|| signing("no extra.receiverAuthorizer"))?,
        token,
        withdraw_delay: withdraw_delay(req).ok_or_else(|| signing("bad extra.withdrawDelay"))?,
        salt,
    })
}

fn sig_bytes(sig: Signature) -> Bytes {
    // The escrow (like USDC) refuses high-s signatures; remote signers do not all normalize.
    let sig = sig.normalize_s().unwrap_or(sig);
    Bytes::copy_from_slice(&sig.as_bytes())
}

/// Signs the voucher `ceiling` on `channel`.
async fn voucher<Sg: Signer + Send + Sync>(
    signer: &Sg,
    chain_id: u64,
    channel: B256,
    ceiling: u128,
) -> Result<Voucher, Error> {
    let message = eip712::Voucher {
        channelId: channel,
        maxClaimableAmount: ceiling,
    };
    let sig = signer
        .sign_typed_data(&message, &ch::domain(chain_id))
        .await?;
    Ok(Voucher {
        channel_id: channel,
        max_claimable_amount: U256::from(ceiling),
        signature: sig_bytes(sig),
    })
}

/// Signs the deposit of `amount` into `channel`: `ReceiveWithAuthorization` to the ERC-3009
/// collector, nonce bound to the channel, valid from 0 until `maxTimeoutSeconds` from now.
async fn deposit<Sg: Signer + Send + Sync>(
    signer: &Sg,
    req: &PaymentRequirements,
    config: &ChannelConfig,
    channel: B256,
    amount: u128,
    now: u64,
) -> Result<Deposit, Error> {
    let (Some(name), Some(version)) = (req.extra_str("name"), req.extra_str("version")) else {
        return Err(signing("no EIP-712 name/version in extra"));
    };
    let salt = random_b256().ok_or_else(|| signing("no OS randomness for the deposit salt"))?;
    let valid_before = U256::from(now.saturating_add(req.max_timeout_seconds));
    let message = eip712::ReceiveWithAuthorization {
        from: config.payer,
        to: ch::ERC3009_DEPOSIT_COLLECTOR,
        value: U256::from(amount),
        validAfter: U256::ZERO,
        validBefore: valid_before,
        nonce: ch::deposit_nonce(channel, salt),
    };
    let domain = ch::token_domain(req.network.chain_id(), config.token, name, version);
    let sig = signer.sign_typed_data(&message, &domain).await?;
    Ok(Deposit {
        amount: U256::from(amount),
        authorization: DepositAuthorization {
            erc3009_authorization: Some(Erc3009Authorization {
                valid_after: U256::ZERO,
                valid_before,
                salt,
                signature: sig_bytes(sig),
            }),
            permit2_authorization: None,
        },
    })
}

/// The signed proof of a channel payment: the header, the report's terms, the ticket.
pub(crate) struct Signed {
    pub(crate) name: http::HeaderName,
    pub(crate) value: http::HeaderValue,
    pub(crate) payment_id: Option<String>,
    pub(crate) authorization: Authorization,
    pub(crate) ticket: Ticket,
}

/// Signs the payment of `offer` (its price already counted in the budget): a voucher for
/// `charged + price`, with a deposit when the balance does not cover it.
pub(crate) async fn proof<Sg: Signer + Send + Sync>(
    shared: &Shared<Sg>,
    challenge: &Challenge,
    offer: &Offer,
    now: u64,
) -> Result<Signed, Error> {
    let Some(channels) = shared.channels.as_deref() else {
        return Err(signing("channels are not enabled"));
    };
    let req = &offer.requirements;
    let key = key(req).ok_or_else(|| signing("not an EVM requirement"))?;
    let chain_id = req.network.chain_id();
    let price = u128::try_from(req.amount).map_err(|_| signing("price above uint128"))?;
    let guard = channels.lock(key).await;
    let payer = shared.signer.address();
    let wanted = config(req, payer, channels.policy.salt)?;
    let base = match channels.load(&key) {
        // A changed config (new authorizer, delay, salt, signer) is another channel.
        Some(r) if r.config == wanted => r,
        _ => ChannelRecord {
            config: wanted,
            balance: 0,
            charged: 0,
            signed_max: 0,
        },
    };
    let channel = ch::channel_id(chain_id, &base.config);
    let ceiling = base
        .charged
        .checked_add(price)
        .ok_or_else(|| signing("cumulative amount above uint128"))?;
    let top_up = if ceiling > base.balance {
        let needed = ceiling - base.balance;
        let target = price
            .saturating_mul(u128::from(channels.policy.multiplier))
            .max(needed);
        // The cap, and what the budget allows (its remaining plus this call's counted price).
        let mut cap = u128::try_from(channels.policy.max_deposit).unwrap_or(u128::MAX);
        if let Some(budget) = shared.policy.shared_budget() {
            let left = budget.remaining().saturating_add(req.amount);
            cap = cap.min(u128::try_from(left).unwrap_or(u128::MAX));
        }
        if needed > cap {
            return Err(Error::Channel(ChannelError::DepositCap {
                needed: U256::from(needed),
                cap: U256::from(cap),
            }));
        }
        Some(target.min(cap))
    } else {
        None
    };
    let voucher = voucher(&*shared.signer, chain_id, channel, ceiling).await?;
    let payload = match top_up {
        Some(amount) => BatchEvmPayload::Deposit {
            channel_config: base.config.clone(),
            voucher,
            deposit: deposit(&*shared.signer, req, &base.config, channel, amount, now).await?,
        },
        None => BatchEvmPayload::Voucher {
            channel_config: base.config.clone(),
            voucher,
        },
    };
    // What was signed is recorded before it is sent: the receiver may claim it from now on.
    let mut signed = base.clone();
    signed.signed_max = signed.signed_max.max(ceiling);
    channels.save(&key, Some(signed));
    let json = serde_json::to_value(&payload).map_err(signing)?;
    let (name, value, payment_id) = envelope(challenge, offer, json)?;
    let authorization = Authorization {
        from: payer,
        to: base.config.receiver,
        value: req.amount,
        valid_after: U256::ZERO,
        valid_before: U256::from(now.saturating_add(req.max_timeout_seconds)),
        nonce: channel,
    };
    Ok(Signed {
        name,
        value,
        payment_id,
        authorization,
        ticket: Ticket {
            key,
            chain_id,
            base,
            price,
            ceiling,
            deposit: top_up,
            _guard: Arc::new(guard),
        },
    })
}

impl Ticket {
    /// The report's view of what was signed.
    pub(crate) fn payment(&self) -> ChannelPayment {
        ChannelPayment {
            channel_id: ch::channel_id(self.chain_id, &self.base.config),
            ceiling: U256::from(self.ceiling),
            deposit: self.deposit.map(U256::from),
            charged: None,
        }
    }
}

/// A decimal string field of a JSON object, as a `u128`.
fn amount(v: Option<&Value>) -> Option<u128> {
    let s = v?.as_str()?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The decoded `PAYMENT-RESPONSE` JSON, if readable.
fn raw_receipt(headers: &HeaderMap) -> Option<Value> {
    let bytes = header::decode_bytes(headers.get(PAYMENT_RESPONSE)?, MAX_CHALLENGE_BYTES).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Advances the channel's record from the final answer of a paid call. The budget counted the
/// price; a successful receipt gives back `price − chargedAmount`.
pub(crate) fn after<Sg>(
    shared: &Shared<Sg>,
    ticket: &Ticket,
    headers: &HeaderMap,
    report: &mut PaymentReport,
) {
    let Some(channels) = shared.channels.as_deref() else {
        return;
    };
    let mut payment = ticket.payment();
    if report.outcome != PaymentOutcome::Settled {
        // Refused or unknown: the record keeps its charged amount and the signed ceiling; the
        // budget keeps the price counted (the voucher may still be claimed).
        report.channel = Some(payment);
        return;
    }
    let receipt = raw_receipt(headers).unwrap_or(Value::Null);
    let extra = &receipt["extra"];
    // No chargedAmount: the full price (the voucher's whole increment).
    let charged = match extra.get("chargedAmount") {
        None => Some(ticket.price),
        Some(v) => amount(Some(v)),
    };
    let mut record = channels
        .load(&ticket.key)
        .filter(|r| r.config == ticket.base.config)
        .unwrap_or_else(|| ticket.base.clone());
    record.signed_max = record.signed_max.max(ticket.ceiling);
    if let Some(d) = ticket.deposit {
        record.balance = record.balance.saturating_add(d);
    }
    match charged.filter(|c| *c <= ticket.price) {
        Some(c) => {
            record.charged = ticket.base.charged + c;
            if let Some(budget) = shared.policy.shared_budget() {
                budget.refund(U256::from(ticket.price - c));
            }
            payment.charged = Some(U256::from(c));
        }
        None => {
            // A receipt charging above the voucher (or unreadable): the server can claim the
            // ceiling and no more; count that, and say the receipt is not accepted.
            record.charged = ticket.ceiling;
            report.outcome = PaymentOutcome::Refused {
                reason: Some("chargedAmount above the voucher's increment".into()),
            };
        }
    }
    channels.save(&ticket.key, Some(record));
    report.channel = Some(payment);
}

/// What a corrective 402 says of a channel.
struct Corrective<'a> {
    /// The server's charged cumulative amount.
    charged: u128,
    /// The channel's balance, as the server mirrors it.
    balance: Option<u128>,
    /// The ceiling of the latest voucher the server holds.
    signed: Option<u128>,
    /// The `voucherState` object (its `signature`).
    vstate: Option<&'a Value>,
}

/// The channel state of a corrective 402 on `channel` (the reference's two codes, the
/// `batch-settlement` offer of the same receiver and token, `channelState.channelId` this
/// channel), or `None`.
fn corrective(challenge: &Challenge, key: ChannelKey, channel: B256) -> Option<Corrective<'_>> {
    if !matches!(challenge.error.as_deref(), Some(MISMATCH | BELOW_CLAIMED)) {
        return None;
    }
    let extra = challenge
        .offers
        .iter()
        .flatten()
        .map(|o| &o.requirements)
        .find(|r| r.scheme == ch::SCHEME && self::key(r) == Some(key))?
        .extra
        .as_ref()?;
    let state = extra.get(ch::extra::CHANNEL_STATE)?;
    let vstate = extra.get(ch::extra::VOUCHER_STATE);
    let id = state.get("channelId")?.as_str()?.parse::<B256>().ok()?;
    (id == channel).then_some(())?;
    Some(Corrective {
        charged: amount(state.get("chargedCumulativeAmount"))?,
        balance: amount(state.get("balance")),
        signed: amount(vstate.and_then(|v| v.get("signedMaxClaimable"))),
        vstate,
    })
}

/// A corrective 402 to a channel payment: adopts the server's charged amount when a voucher
/// this client signed backs it, and says whether to pay again.
pub(crate) fn recover<Sg: Signer>(
    shared: &Shared<Sg>,
    ticket: &Ticket,
    challenge: &Challenge,
) -> bool {
    let Some(channels) = shared.channels.as_deref() else {
        return false;
    };
    let channel = ch::channel_id(ticket.chain_id, &ticket.base.config);
    let Some(Corrective {
        charged,
        balance,
        signed,
        vstate,
    }) = corrective(challenge, ticket.key, channel)
    else {
        return false;
    };
    let base = &ticket.base;
    let backed = if base.signed_max > 0 {
        // The server may only say it charged what an earlier voucher of this client covers
        // (the one just refused was not charged).
        base.charged <= charged && charged <= base.signed_max
    } else {
        // Lost state: the server shows the voucher it holds; it must be ours, over this
        // channel, and cover the charge.
        let sig = vstate
            .and_then(|v| v.get("signature"))
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Bytes>().ok())
            .and_then(|b| Signature::try_from(b.as_ref()).ok());
        match (signed, sig) {
            (Some(signed), Some(sig)) if charged <= signed => {
                ch::voucher_digest(ticket.chain_id, channel, U256::from(signed))
                    .and_then(|d| sig.recover_address_from_prehash(&d).ok())
                    == Some(base.config.payer_authorizer)
            }
            _ => false,
        }
    };
    if !backed {
        return false;
    }
    let mut next = base.clone();
    next.signed_max = next
        .signed_max
        .max(ticket.ceiling)
        .max(if base.signed_max == 0 {
            signed.unwrap_or(0)
        } else {
            0
        });
    next.charged = charged;
    // The balance the server mirrors (a smaller one only makes the client deposit again, within
    // its cap; a larger one only gets a voucher refused).
    if let Some(b) = balance {
        next.balance = b;
    }
    channels.save(&ticket.key, Some(next));
    // The refused voucher is superseded by the next one (same base or higher): its price is
    // counted again when the next one is signed.
    if charged >= ticket.base.charged
        && let Some(budget) = shared.policy.shared_budget()
    {
        budget.refund(U256::from(ticket.price));
    }
    true
}

/// What a cooperative refund did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelRefund {
    /// The channel.
    pub channel_id: B256,
    /// The amount the server says it refunded.
    pub amount: U256,
    /// The refund transaction, when the receipt names one.
    pub transaction: Option<B256>,
    /// The client's record after it (`None`: fully refunded, deleted).
    pub record: Option<ChannelRecord>,
}

/// Builds the refund proof for the channel the batch-settlement offer of `challenge` names.
pub(crate) async fn refund_proof<Sg: Signer + Send + Sync>(
    shared: &Shared<Sg>,
    challenge: &Challenge,
    amount: Option<U256>,
) -> Result<(http::HeaderName, http::HeaderValue, RefundTicket), Error> {
    let Some(channels) = shared.channels.as_deref() else {
        return Err(Error::Channel(ChannelError::NotEnabled));
    };
    let Some(offer) = challenge
        .offers
        .iter()
        .flatten()
        .find(|o| o.requirements.scheme == ch::SCHEME && key(&o.requirements).is_some())
    else {
        return Err(Error::Channel(ChannelError::NoOffer));
    };
    let req = &offer.requirements;
    let Some(key) = key(req) else {
        return Err(Error::Channel(ChannelError::NoOffer));
    };
    let guard = channels.lock(key).await;
    let wanted = config(req, shared.signer.address(), channels.policy.salt)?;
    let record = channels
        .load(&key)
        .filter(|r| r.config == wanted)
        .ok_or(Error::Channel(ChannelError::NoChannel))?;
    let refundable = record.refundable();
    if refundable == 0 {
        return Err(Error::Channel(ChannelError::NothingToRefund));
    }
    let amount = match amount {
        None => None,
        Some(a) if a.is_zero() || a > U256::from(refundable) => {
            return Err(Error::Channel(ChannelError::NothingToRefund));
        }
        Some(a) => Some(u128::try_from(a).unwrap_or(refundable)),
    };
    let chain_id = req.network.chain_id();
    let channel = ch::channel_id(chain_id, &record.config);
    // A zero-charge voucher: its ceiling is what was charged (never above what was signed).
    let v = voucher(&*shared.signer, chain_id, channel, record.charged).await?;
    let payload = BatchEvmPayload::Refund {
        channel_config: record.config.clone(),
        voucher: v,
        amount: amount.map(U256::from),
    };
    let json = serde_json::to_value(&payload).map_err(signing)?;
    let (name, value, _) = envelope(challenge, offer, json)?;
    Ok((
        name,
        value,
        RefundTicket {
            key,
            channel,
            record,
            amount,
            _guard: guard,
        },
    ))
}

/// A sent refund, its channel locked until the answer is read.
pub(crate) struct RefundTicket {
    key: ChannelKey,
    channel: B256,
    record: ChannelRecord,
    amount: Option<u128>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// A corrective 402 to a refund (the client's record is behind, e.g. a lost receipt): adopts
/// the server's charged amount when an earlier voucher of this client covers it
/// (`record.charged ≤ charged ≤ record.signed_max`), and says whether to ask again.
pub(crate) fn refund_recover<Sg>(
    shared: &Shared<Sg>,
    ticket: &RefundTicket,
    challenge: &Challenge,
) -> bool {
    let Some(channels) = shared.channels.as_deref() else {
        return false;
    };
    let Some(c) = corrective(challenge, ticket.key, ticket.channel) else {
        return false;
    };
    let r = &ticket.record;
    if c.charged < r.charged || c.charged > r.signed_max {
        return false;
    }
    let mut next = r.clone();
    next.charged = c.charged;
    if let Some(b) = c.balance {
        next.balance = b;
    }
    channels.save(&ticket.key, Some(next));
    true
}

/// Reads the refund's answer and updates the record.
pub(crate) fn refunded<Sg>(
    shared: &Shared<Sg>,
    ticket: RefundTicket,
    status: http::StatusCode,
    headers: &HeaderMap,
) -> Result<ChannelRefund, Error> {
    let receipt = raw_receipt(headers);
    let ok = status.is_success() && receipt.as_ref().is_some_and(|r| r["success"] == true);
    let Some(receipt) = receipt.filter(|_| ok) else {
        let reason = Challenge::from_headers(headers)
            .ok()
            .flatten()
            .and_then(|c| c.error)
            .or_else(|| {
                raw_receipt(headers).and_then(|r| r["errorReason"].as_str().map(str::to_owned))
            });
        return Err(Error::Channel(ChannelError::RefundRefused {
            status: status.as_u16(),
            reason,
        }));
    };
    let refundable = ticket.record.refundable();
    // The server says what it gave back; the record never goes below what was charged.
    let refunded = amount(receipt.get("amount"))
        .or(ticket.amount)
        .unwrap_or(refundable)
        .min(refundable);
    let record = (refunded < refundable).then(|| {
        let mut r = ticket.record.clone();
        r.balance -= refunded;
        r
    });
    if let Some(channels) = shared.channels.as_deref() {
        channels.save(&ticket.key, record.clone());
    }
    Ok(ChannelRefund {
        channel_id: ticket.channel,
        amount: U256::from(refunded),
        transaction: receipt["transaction"]
            .as_str()
            .and_then(|s| s.parse::<B256>().ok()),
        record,
    })
}
