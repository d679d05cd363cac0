//! Payment channels (`batch-settlement`) through a facilitator: [`FacilitatorClient`] is a
//! channel [`Escrow`], so a server without a relayer of its own opens channels, refunds them,
//! claims and settles their vouchers through the facilitator's `batch-settlement` scheme, the
//! way the reference server (`@x402/evm` `BatchSettlementEvmScheme` server and channel
//! manager) does. Vouchers are still verified in-process (one signature recovery, no call):
//! only deposits, refunds, claims and settles go to the facilitator.
//!
//! ```no_run
//! use tower_x402::channel::LocalAuthorizer;
//! use tower_x402::channel::serve::Channels;
//! use tower_x402::channel::store::MemoryChannelStore;
//! use tower_x402::facilitator::FacilitatorClient;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let facilitator = FacilitatorClient::new("https://facilitator.example")?;
//! // Deposits and cooperative refunds go through the facilitator; the server keeps its own
//! // receiver-authorizer key (it signs the claims and refunds the facilitator submits), here
//! // from `X402_RECEIVER_AUTHORIZER_KEY` (a key in a KMS: implement `ReceiverAuthorizer`).
//! let channels = Channels::new(MemoryChannelStore::new(), facilitator.clone())
//!     .with_authorizer(LocalAuthorizer::from_env()?);
//! // then `PaymentLayer::builder().accept(batch_option).channels(channels)`, and from a
//! // manager task: `facilitator.claim_channels(..)`, `facilitator.settle_channels(..)`.
//! # let _ = channels; Ok(()) }
//! ```
//!
//! | operation | calls | body `payload` |
//! |---|---|---|
//! | deposit ([`Escrow::deposit_payment`]) | `POST /verify`, then `POST /settle` | the client's `deposit` payload as it came |
//! | cooperative refund ([`Escrow::refund_payment`]) | `POST /settle` | `refund` with `amount`, `refundNonce`, `claims`, both authorizer signatures |
//! | [`FacilitatorClient::claim_channels`] | `POST /settle` | `claim` with `claims` and `claimAuthorizerSignature` |
//! | [`FacilitatorClient::settle_channels`] | `POST /settle` | `settle` with `receiver` and `token` |
//!
//! Replies are hostile input, as for `exact`: capped, parsed strictly (a balance is a decimal
//! `uint128` string, the channel id must be the payment's), and a failure before the handler
//! is a 503 (the layer's `Retry-After`), nothing charged. A refusal carrying one of the
//! scheme's codes is a 402 with that code; one this crate has no code for is a 503 with the
//! facilitator's words kept for logs ([`FacilitatorError::Refused`]).
//!
//! **A deposit whose outcome is unknown is never sent again blindly.** When `/settle` may have
//! broadcast it (timeout, reset, 5xx, `settlement_pending`, a reply that does not parse), the
//! request gets a 503 and the client retries the same payload; the retry first asks the
//! facilitator for the channel's balance (`/verify` of the payload's voucher, which reads the
//! chain): if the deposit landed, it is taken as done (its transaction is reported when the
//! facilitator had named it, else the zero hash) and nothing is sent; only if it did not is it
//! verified and sent again, and then the authorization's EIP-3009 nonce still makes a second
//! transfer impossible on chain. The record of doubtful deposits lives in this client (shared
//! by its clones; a record goes once its authorization expired), so a retry reaching another server instance is reconciled by the chain
//! alone (the reference facilitator also keeps its own record of pending deposits).

use std::collections::HashMap;
use std::sync::Mutex;

use alloy_primitives::{Address, B256, Bytes, keccak256};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{Failure, Reply};
use super::{Endpoint, FacilitatorClient, FacilitatorError, parse, status_error, tx_hash};
use crate::Network;
use crate::alert::{Alert, alert};
use crate::channel::serve::{
    CooperativeRefund, Escrow, EscrowChannel, EscrowError, EscrowPayment, Mirror,
};
use crate::channel::verify::{BatchError, ChannelTerms};
use crate::channel::{ChannelClaim, SCHEME};
use crate::proto::batch::{BatchEvmPayload, ChannelConfig, Deposit};

/// Deposits sent to `/settle` whose outcome is unknown, by the hash of their authorization.
#[derive(Default)]
pub(crate) struct InDoubt(Mutex<HashMap<B256, Doubt>>);

/// What is known of a deposit in doubt.
#[derive(Clone, Copy, Debug)]
struct Doubt {
    /// The channel's balance before it (the facilitator's `/verify`).
    before: u128,
    /// Its amount.
    amount: u128,
    /// Its transaction, if the facilitator named one.
    transaction: Option<B256>,
    /// The authorization's `validBefore`: after it the deposit cannot land any more, and the
    /// layer refuses the payload, so the record is dropped.
    valid_before: u64,
}

impl InDoubt {
    fn get(&self, key: &B256) -> Option<Doubt> {
        self.0.lock().ok()?.get(key).copied()
    }
    /// Records `doubt`, dropping the records that expired by `now` (so the map is bounded by
    /// the deposits in doubt within one authorization lifetime).
    fn put(&self, key: B256, doubt: Doubt, now: u64) {
        if let Ok(mut map) = self.0.lock() {
            map.retain(|_, d| d.valid_before > now);
            map.insert(key, doubt);
        }
    }
    fn forget(&self, key: &B256) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(key);
        }
    }
}

/// `extra` of a `/verify` answer, and `extra.channelState` of a `/settle` answer: the
/// channel's on-chain state.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChainState {
    channel_id: B256,
    balance: String,
    total_claimed: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerifyReply {
    is_valid: bool,
    #[serde(default)]
    invalid_reason: Option<String>,
    #[serde(default)]
    invalid_message: Option<String>,
    #[serde(default)]
    payer: Option<String>,
    #[serde(default)]
    extra: Option<ChainState>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SettleExtra {
    channel_state: ChainState,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SettleReply {
    success: bool,
    #[serde(default)]
    error_reason: Option<String>,
    #[serde(default)]
    error_message: Option<String>,
    #[serde(default)]
    transaction: Option<String>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    payer: Option<String>,
    #[serde(default)]
    amount: Option<String>,
    #[serde(default)]
    extra: Option<Value>,
}

/// What a `/settle` call came to.
enum Settled {
    /// `success: true` with a transaction on our network.
    Done(B256, SettleReply),
    /// A typed refusal: nothing was done.
    Refused(Option<String>, String),
    /// Surely not processed (never reached it, 429, or it declined the call).
    NotSent(FacilitatorError),
    /// It may have broadcast: the outcome is unknown.
    Unknown(FacilitatorError, Option<B256>),
}

/// The scheme's codes a facilitator refusal may carry, as ours.
const REFUSALS: &[BatchError] = &[
    BatchError::ChannelIdMismatch,
    BatchError::ReceiverMismatch,
    BatchError::ReceiverAuthorizerMismatch,
    BatchError::TokenMismatch,
    BatchError::WithdrawDelayMismatch,
    BatchError::WithdrawDelayOutOfRange,
    BatchError::MissingEip712Domain,
    BatchError::VoucherSignature,
    BatchError::Erc3009AuthorizationRequired,
    BatchError::ValidBefore,
    BatchError::ValidAfter,
    BatchError::ReceiveAuthorizationSignature,
    BatchError::CumulativeBelowClaimed,
    BatchError::CumulativeExceedsBalance,
    BatchError::ChannelNotFound,
    BatchError::RefundNoBalance,
];

/// A refusal as an escrow error: one of the scheme's codes (the layer answers 402 with it),
/// else the facilitator's words (503).
fn refusal(reason: Option<&str>, detail: String) -> EscrowError {
    #[cfg(feature = "tracing")]
    tracing::info!(detail, "x402 facilitator refused a channel operation");
    match REFUSALS.iter().find(|e| Some(e.code()) == reason) {
        Some(e) => EscrowError(Box::new(*e)),
        None => EscrowError(Box::new(FacilitatorError::Refused { detail })),
    }
}

fn escrow(e: FacilitatorError) -> EscrowError {
    EscrowError(Box::new(e))
}

/// A decimal `uint128` string.
fn amount(s: &str) -> Result<u128, FacilitatorError> {
    crate::proto::decimal::parse(s)
        .and_then(|v| u128::try_from(v).ok())
        .ok_or(FacilitatorError::Inconsistent("an amount is not a uint128"))
}

impl ChainState {
    /// Balance and claimed total of `channel`.
    fn of(&self, channel: B256) -> Result<(u128, u128), FacilitatorError> {
        if self.channel_id != channel {
            return Err(FacilitatorError::Inconsistent("state of another channel"));
        }
        let (balance, claimed) = (amount(&self.balance)?, amount(&self.total_claimed)?);
        if claimed > balance {
            return Err(FacilitatorError::Inconsistent(
                "claimed more than the balance",
            ));
        }
        Ok((balance, claimed))
    }
}

/// The server's requirement the facilitator checks a channel payment against, rebuilt from
/// `terms` (the values the layer's own checks used).
fn requirements(terms: &ChannelTerms) -> Value {
    json!({
        "scheme": SCHEME,
        "network": Network::eip155(terms.chain_id).caip2(),
        "amount": terms.price.to_string(),
        "asset": terms.token.to_checksum(None),
        "payTo": terms.receiver.to_checksum(None),
        "maxTimeoutSeconds": 300,
        "extra": {
            "name": terms.token_name,
            "version": terms.token_version,
            "receiverAuthorizer": terms.receiver_authorizer.to_checksum(None),
            "withdrawDelay": terms.withdraw_delay,
        },
    })
}

/// The requirement of a manager operation (claim, settle), as the reference channel manager
/// builds it.
fn manager_requirements(network: Network, receiver: Address, token: Address) -> Value {
    json!({
        "scheme": SCHEME,
        "network": network.caip2(),
        "amount": "0",
        "asset": token.to_checksum(None),
        "payTo": receiver.to_checksum(None),
        "maxTimeoutSeconds": 0,
        "extra": {},
    })
}

/// `{x402Version, paymentPayload, paymentRequirements}` with `payload` accepted on `req`.
fn body(req: &Value, payload: Value) -> bytes::Bytes {
    let doc = json!({
        "x402Version": 2,
        "paymentPayload": {"x402Version": 2, "accepted": req, "payload": payload},
        "paymentRequirements": req,
    });
    // A `Value` always serializes.
    serde_json::to_vec(&doc).unwrap_or_default().into()
}

fn claim_json(claim: &ChannelClaim) -> Value {
    json!({
        "voucher": {
            "channel": claim.config,
            "maxClaimableAmount": claim.max_claimable.to_string(),
        },
        "signature": claim.signature,
        "totalClaimed": claim.total_claimed.to_string(),
    })
}

impl FacilitatorClient {
    /// `/verify`, retried like any verification; the channel state of a valid answer, or why
    /// not.
    async fn channel_verify(
        &self,
        body: bytes::Bytes,
        config: &ChannelConfig,
        channel: B256,
    ) -> Result<Result<(u128, u128), (Option<String>, String)>, FacilitatorError> {
        let i = &self.inner;
        let reply = self
            .idempotent(Endpoint::Verify, Some(body), i.settings.verify_timeout)
            .await
            .map_err(|(e, _)| e)?;
        let answer = match parse::<VerifyReply>(&reply.body) {
            Ok(a) if reply.status.is_success() || !a.is_valid => a,
            Ok(_) => return Err(status_error(&reply)),
            Err(e) if reply.status.is_success() => return Err(e),
            Err(_) => return Err(status_error(&reply)),
        };
        if !answer.is_valid {
            let detail = super::wire::detail(
                answer.invalid_reason.as_deref(),
                answer.invalid_message.as_deref(),
            );
            return Ok(Err((answer.invalid_reason, detail)));
        }
        if let Some(payer) = &answer.payer
            && payer.parse::<Address>() != Ok(config.payer)
        {
            return Err(FacilitatorError::Inconsistent("vouches for another payer"));
        }
        let state = answer.extra.ok_or(FacilitatorError::Inconsistent(
            "valid without the channel state",
        ))?;
        state.of(channel).map(Ok)
    }

    /// One `/settle` ([`FacilitatorClient::settle_call`]) and what it came to.
    async fn channel_settle(&self, body: bytes::Bytes, network: Network) -> Settled {
        let reply = match self.settle_call(body).await {
            Ok(reply) => reply,
            Err(Failure::NotSent(e)) => return Settled::NotSent(e),
            Err(Failure::MaybeSent(e)) => return Settled::Unknown(e, None),
        };
        settled(&reply, network)
    }

    /// Claims the latest vouchers of many channels in one `claimWithSignature` transaction
    /// submitted by the facilitator, authorized by `authorizer_signature` (the receiver
    /// authorizer's signature of [`claim_digest`](crate::channel::claim_digest)). Claims are
    /// cumulative, so sending one again after an unknown outcome is harmless. Returns the
    /// transaction.
    ///
    /// # Errors
    /// The facilitator refused ([`FacilitatorError::Refused`]), failed, or its answer says
    /// nothing sure (then the claim may have landed: send it again, or read the chain).
    pub async fn claim_channels(
        &self,
        network: Network,
        claims: &[ChannelClaim],
        authorizer_signature: Bytes,
    ) -> Result<B256, FacilitatorError> {
        let Some(first) = claims.first() else {
            return Err(FacilitatorError::Inconsistent("no claims"));
        };
        let req = manager_requirements(network, first.config.receiver, first.config.token);
        let payload = json!({
            "type": "claim",
            "claims": claims.iter().map(claim_json).collect::<Vec<_>>(),
            "claimAuthorizerSignature": authorizer_signature,
        });
        match self.channel_settle(body(&req, payload), network).await {
            Settled::Done(tx, _) => Ok(tx),
            Settled::Refused(_, detail) => Err(FacilitatorError::Refused { detail }),
            Settled::NotSent(e) | Settled::Unknown(e, _) => Err(e),
        }
    }

    /// Sweeps everything claimed and not yet settled for (`receiver`, `token`) to the
    /// receiver in one `settle` transaction submitted by the facilitator: its transaction
    /// and the amount it reports, or `None` when there was nothing to settle.
    ///
    /// # Errors
    /// As [`FacilitatorClient::claim_channels`]; a second `settle` moves only what is left.
    pub async fn settle_channels(
        &self,
        network: Network,
        receiver: Address,
        token: Address,
    ) -> Result<Option<(B256, u128)>, FacilitatorError> {
        let req = manager_requirements(network, receiver, token);
        let payload = json!({
            "type": "settle",
            "receiver": receiver.to_checksum(None),
            "token": token.to_checksum(None),
        });
        match self.channel_settle(body(&req, payload), network).await {
            Settled::Done(tx, answer) => {
                let moved = answer.amount.as_deref().map(amount).transpose()?;
                Ok(Some((tx, moved.unwrap_or_default())))
            }
            Settled::Refused(Some(r), _) if r == NOTHING_TO_SETTLE => Ok(None),
            Settled::Refused(_, detail) => Err(FacilitatorError::Refused { detail }),
            Settled::NotSent(e) | Settled::Unknown(e, _) => Err(e),
        }
    }

    /// A deposit in doubt, reconciled from the chain (through `/verify` of its voucher): the
    /// channel's state if it landed, `None` if it did not.
    async fn reconcile(
        &self,
        req: &Value,
        config: &ChannelConfig,
        payload: &BatchEvmPayload,
        doubt: Doubt,
    ) -> Result<Option<Mirror>, EscrowError> {
        let voucher = payload.voucher();
        let probe = json!({
            "type": "voucher",
            "channelConfig": config,
            "voucher": voucher,
        });
        let state = self
            .channel_verify(body(req, probe), config, voucher.channel_id)
            .await
            .map_err(escrow)?;
        match state {
            Ok((balance, total_claimed))
                if balance >= doubt.before.saturating_add(doubt.amount) =>
            {
                Ok(Some(Mirror {
                    transaction: doubt.transaction.unwrap_or_default(),
                    balance,
                    total_claimed,
                }))
            }
            Ok(_) => Ok(None),
            // What the facilitator says of a channel the deposit has not reached.
            Err((Some(r), _))
                if r == BatchError::ChannelNotFound.code()
                    || r == BatchError::CumulativeExceedsBalance.code() =>
            {
                Ok(None)
            }
            Err((_, detail)) => Err(escrow(FacilitatorError::Refused { detail })),
        }
    }
}

const NOTHING_TO_SETTLE: &str = "invalid_batch_settlement_evm_nothing_to_settle";
const SETTLEMENT_PENDING: &str = "settlement_pending";

/// What a `/settle` reply means.
fn settled(reply: &Reply, network: Network) -> Settled {
    // Rate limited: not processed (the layer answers 503 with its own `Retry-After`).
    if reply.status == http::StatusCode::TOO_MANY_REQUESTS {
        return Settled::NotSent(status_error(reply));
    }
    // It may have broadcast before failing.
    if reply.status.is_server_error() {
        return Settled::Unknown(status_error(reply), None);
    }
    let answer = match parse::<SettleReply>(&reply.body) {
        Ok(a) if reply.status.is_success() || !a.success => a,
        Err(e) if reply.status.is_success() => return Settled::Unknown(e, None),
        // A 3xx/4xx without a typed refusal: it declined to process the call.
        _ => return Settled::NotSent(status_error(reply)),
    };
    let transaction = tx_hash(answer.transaction.as_deref());
    if !answer.success {
        let detail = super::wire::detail(
            answer.error_reason.as_deref(),
            answer.error_message.as_deref(),
        );
        if answer.error_reason.as_deref() == Some(SETTLEMENT_PENDING) {
            return Settled::Unknown(FacilitatorError::Pending { detail }, transaction);
        }
        return Settled::Refused(answer.error_reason, detail);
    }
    let Some(transaction) = transaction else {
        return Settled::Unknown(
            FacilitatorError::Inconsistent("success without a transaction hash"),
            None,
        );
    };
    if let Some(n) = &answer.network
        && n.parse::<Network>() != Ok(network)
    {
        return Settled::Unknown(
            FacilitatorError::Inconsistent("settled on another network"),
            Some(transaction),
        );
    }
    Settled::Done(transaction, answer)
}

/// The channel's state in a successful `/settle` answer (`extra.channelState`).
fn settled_state(answer: &SettleReply, channel: B256) -> Result<(u128, u128), FacilitatorError> {
    let extra = answer
        .extra
        .clone()
        .ok_or(FacilitatorError::Inconsistent("no channel state"))?;
    let extra: SettleExtra = serde_json::from_value(extra)
        .map_err(|_| FacilitatorError::Inconsistent("malformed channel state"))?;
    extra.channel_state.of(channel)
}

#[async_trait]
impl Escrow for FacilitatorClient {
    /// Not used: a facilitator needs the whole payment, [`Escrow::deposit_payment`].
    async fn deposit(&self, _: EscrowChannel<'_>, _: &Deposit) -> Result<Mirror, EscrowError> {
        Err(escrow(FacilitatorError::Inconsistent(
            "a facilitator deposit needs the payment (Escrow::deposit_payment)",
        )))
    }

    /// Not used: a facilitator needs the chain and the voucher, [`Escrow::refund_payment`].
    async fn refund(
        &self,
        _: EscrowChannel<'_>,
        _: CooperativeRefund,
    ) -> Result<Mirror, EscrowError> {
        Err(escrow(FacilitatorError::Inconsistent(
            "a facilitator refund needs the payment (Escrow::refund_payment)",
        )))
    }

    async fn deposit_payment(&self, payment: EscrowPayment<'_>) -> Result<Mirror, EscrowError> {
        let EscrowPayment { terms, payload } = payment;
        let BatchEvmPayload::Deposit {
            channel_config,
            voucher,
            deposit,
        } = payload
        else {
            return Err(refusal(
                Some(BatchError::DepositPayload.code()),
                String::new(),
            ));
        };
        let channel = voucher.channel_id;
        let network = Network::eip155(terms.chain_id);
        let deposited = u128::try_from(deposit.amount)
            .map_err(|_| refusal(Some(BatchError::DepositPayload.code()), String::new()))?;
        let key = keccak256(serde_json::to_vec(&deposit.authorization).unwrap_or_default());
        let req = requirements(terms);
        if let Some(doubt) = self.inner.deposits.get(&key) {
            let landed = self.reconcile(&req, channel_config, payload, doubt).await?;
            self.inner.deposits.forget(&key);
            if let Some(mirror) = landed {
                return Ok(mirror);
            }
        }
        let body = body(&req, serde_json::to_value(payload).unwrap_or_default());
        let (before, _) = self
            .channel_verify(body.clone(), channel_config, channel)
            .await
            .map_err(escrow)?
            .map_err(|(r, d)| refusal(r.as_deref(), d))?;
        let valid_before = deposit
            .authorization
            .erc3009_authorization
            .as_ref()
            .map_or(u64::MAX, |a| {
                u64::try_from(a.valid_before).unwrap_or(u64::MAX)
            });
        let doubt = |transaction| Doubt {
            before,
            amount: deposited,
            transaction,
            valid_before,
        };
        let unknown = |e: FacilitatorError, transaction| {
            self.inner
                .deposits
                .put(key, doubt(transaction), self.inner.clock.now());
            alert!(
                Alert::SettlementUnknown,
                cause = &e,
                "a channel deposit sent to the facilitator has an unknown outcome: the client's \
                 retry reconciles it from the chain before anything is sent again"
            );
            escrow(e)
        };
        match self.channel_settle(body, network).await {
            Settled::Done(transaction, answer) => {
                if let Some(payer) = &answer.payer
                    && payer.parse::<Address>() != Ok(channel_config.payer)
                {
                    let e = FacilitatorError::Inconsistent("deposited for another payer");
                    return Err(unknown(e, Some(transaction)));
                }
                match settled_state(&answer, channel) {
                    Ok((balance, total_claimed)) if balance >= deposited => Ok(Mirror {
                        transaction,
                        balance,
                        total_claimed,
                    }),
                    Ok(_) => Err(unknown(
                        FacilitatorError::Inconsistent("balance below the deposit"),
                        Some(transaction),
                    )),
                    Err(e) => Err(unknown(e, Some(transaction))),
                }
            }
            Settled::Refused(r, detail) => Err(refusal(r.as_deref(), detail)),
            Settled::NotSent(e) => Err(escrow(e)),
            Settled::Unknown(e, transaction) => Err(unknown(e, transaction)),
        }
    }

    async fn refund_payment(
        &self,
        payment: EscrowPayment<'_>,
        refund: CooperativeRefund,
    ) -> Result<Mirror, EscrowError> {
        let EscrowPayment { terms, payload } = payment;
        let CooperativeRefund {
            claim,
            amount,
            nonce,
            signature: refund_signature,
        } = refund;
        let channel = payload.voucher().channel_id;
        let network = Network::eip155(terms.chain_id);
        let req = requirements(terms);
        let (claims, claim_signature) = match &claim {
            Some((c, s)) => (vec![claim_json(c)], Some(s)),
            None => (Vec::new(), None),
        };
        let mut refund = json!({
            "type": "refund",
            "channelConfig": payload.channel_config(),
            "voucher": payload.voucher(),
            "amount": amount.to_string(),
            "refundNonce": nonce.to_string(),
            "claims": claims,
            "refundAuthorizerSignature": refund_signature,
        });
        if let (Some(s), Some(obj)) = (claim_signature, refund.as_object_mut()) {
            obj.insert("claimAuthorizerSignature".into(), json!(s));
        }
        match self.channel_settle(body(&req, refund), network).await {
            Settled::Done(transaction, answer) => {
                let (balance, total_claimed) = settled_state(&answer, channel).map_err(escrow)?;
                Ok(Mirror {
                    transaction,
                    balance,
                    total_claimed,
                })
            }
            Settled::Refused(r, detail) => Err(refusal(r.as_deref(), detail)),
            Settled::NotSent(e) => Err(escrow(e)),
            // The refund nonce is single-use and claims are cumulative: a retry cannot refund
            // twice.
            Settled::Unknown(e, _) => {
                alert!(
                    Alert::SettlementUnknown,
                    cause = &e,
                    "a channel refund sent to the facilitator has an unknown outcome: the next \
                     refresh mirrors the chain"
                );
                Err(escrow(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use alloy_primitives::U256;

    use super::*;

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status: http::StatusCode::from_u16(status).unwrap(),
            headers: Default::default(),
            body: bytes::Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn settle_replies_are_classified_strictly() {
        let n = Network::BASE_SEPOLIA;
        let tx = format!("0x{}", "ab".repeat(32));
        let ok = format!(r#"{{"success":true,"transaction":"{tx}","network":"eip155:84532"}}"#);
        assert!(matches!(settled(&reply(200, &ok), n), Settled::Done(..)));
        let other = ok.replace("84532", "8453");
        assert!(matches!(
            settled(&reply(200, &other), n),
            Settled::Unknown(..)
        ));
        assert!(matches!(settled(&reply(500, &ok), n), Settled::Unknown(..)));
        assert!(matches!(
            settled(&reply(200, "[true]"), n),
            Settled::Unknown(..)
        ));
        assert!(matches!(
            settled(&reply(200, r#"{"success":true}"#), n),
            Settled::Unknown(..)
        ));
        assert!(matches!(settled(&reply(429, ""), n), Settled::NotSent(..)));
        assert!(matches!(
            settled(&reply(404, "nope"), n),
            Settled::NotSent(..)
        ));
        let pending = format!(
            r#"{{"success":false,"errorReason":"settlement_pending","transaction":"{tx}"}}"#
        );
        assert!(matches!(
            settled(&reply(200, &pending), n),
            Settled::Unknown(FacilitatorError::Pending { .. }, Some(_))
        ));
        let no =
            r#"{"success":false,"errorReason":"invalid_batch_settlement_evm_nothing_to_settle"}"#;
        assert!(matches!(
            settled(&reply(200, no), n),
            Settled::Refused(Some(_), _)
        ));
    }

    #[test]
    fn channel_states_are_checked() {
        let id = B256::repeat_byte(1);
        let s = |b: &str, c: &str| ChainState {
            channel_id: id,
            balance: b.into(),
            total_claimed: c.into(),
        };
        assert_eq!(s("100", "40").of(id).unwrap(), (100, 40));
        assert!(s("100", "40").of(B256::ZERO).is_err());
        assert!(s("40", "100").of(id).is_err());
        assert!(s("-1", "0").of(id).is_err());
        assert!(s(&U256::MAX.to_string(), "0").of(id).is_err());
        assert!(s("1e3", "0").of(id).is_err());
    }

    #[test]
    fn expired_doubts_are_dropped() {
        let doubts = InDoubt::default();
        let d = |valid_before| Doubt {
            before: 0,
            amount: 1,
            transaction: None,
            valid_before,
        };
        doubts.put(B256::repeat_byte(1), d(100), 50);
        doubts.put(B256::repeat_byte(2), d(1_000), 50);
        assert!(doubts.get(&B256::repeat_byte(1)).is_some());
        doubts.put(B256::repeat_byte(3), d(1_000), 100);
        assert!(doubts.get(&B256::repeat_byte(1)).is_none(), "expired");
        assert!(doubts.get(&B256::repeat_byte(2)).is_some());
        doubts.forget(&B256::repeat_byte(2));
        assert!(doubts.get(&B256::repeat_byte(2)).is_none());
    }

    #[test]
    fn refusals_keep_the_scheme_codes_only() {
        let e = refusal(Some(BatchError::VoucherSignature.code()), String::new());
        assert_eq!(
            e.0.downcast_ref::<BatchError>(),
            Some(&BatchError::VoucherSignature)
        );
        let e = refusal(Some("<script>"), "x".into());
        assert!(e.0.downcast_ref::<FacilitatorError>().is_some());
    }
}
