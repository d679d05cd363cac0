//! Payment-channel deposits through the relayer: [`OnchainSettler`] is a
//! [`channel::serve::Escrow`](crate::channel::serve::Escrow). A `deposit` payload's EIP-3009
//! authorization goes to the canonical escrow as `deposit(config, amount, ERC3009 collector,
//! abi.encode(validAfter, validBefore, salt, signature))`, a Permit2 one as `deposit(config,
//! amount, Permit2 collector, abi.encode(nonce, deadline, signature, ""))`; the channel's balance and claimed
//! total are read back from `channels(channelId)` after the receipt. The receiver's side:
//! [`OnchainSettler::claim_channels`] claims many channels in one `claimWithSignature`
//! transaction and [`OnchainSettler::settle_channels`] sweeps the claimed funds to the receiver.

use std::future::IntoFuture;

use alloy_network::{ReceiptResponse, TransactionBuilder};
use alloy_primitives::{B256, U256, aliases::U40};
use alloy_provider::Provider;
use alloy_rpc_types_eth::{BlockId, BlockNumberOrTag, TransactionRequest};
use alloy_sol_types::{SolCall, SolValue, sol};
use async_trait::async_trait;

use super::relayer::with_timeout;
use super::{OnchainSettler, Sent, Submit};
use crate::channel::serve::{CooperativeRefund, Escrow, EscrowChannel, EscrowError, Mirror};
use crate::channel::store::ChannelStore;
use crate::channel::verify::BatchError;
use crate::channel::{
    BATCH_SETTLEMENT, ChannelClaim, ERC3009_DEPOSIT_COLLECTOR, PERMIT2_DEPOSIT_COLLECTOR,
    ReceiverAuthorizer,
};
use crate::proto::batch::{ChannelConfig, Deposit};

sol! {
    struct EscrowChannelConfig {
        address payer;
        address payerAuthorizer;
        address receiver;
        address receiverAuthorizer;
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }
    function deposit(EscrowChannelConfig config, uint128 amount, address collector, bytes collectorData) external;
    function channels(bytes32 channelId) external view returns (uint128 balance, uint128 totalClaimed);
    struct EscrowVoucher {
        EscrowChannelConfig channel;
        uint128 maxClaimableAmount;
    }
    struct EscrowVoucherClaim {
        EscrowVoucher voucher;
        bytes signature;
        uint128 totalClaimed;
    }
    function claimWithSignature(EscrowVoucherClaim[] voucherClaims, bytes authorizerSignature) external;
    function settle(address receiver, address token) external;
    function receivers(address receiver, address token) external view returns (uint128 totalClaimed, uint128 totalSettled);
    function refundWithSignature(EscrowChannelConfig config, uint128 amount, uint256 nonce, bytes receiverAuthorizerSignature) external;
    function pendingWithdrawals(bytes32 channelId) external view returns (uint128 amount, uint40 initiatedAt);
    function refundNonce(bytes32 channelId) external view returns (uint256);
}

impl OnchainSettler {
    /// Gas limit of a channel deposit (measured on anvil: ~138k for a new channel), unless
    /// the configured gas limit is higher.
    pub const CHANNEL_DEPOSIT_GAS_LIMIT: u64 = 250_000;
}

fn escrow_error(what: &'static str) -> EscrowError {
    EscrowError(what.into())
}

#[async_trait]
impl Escrow for OnchainSettler {
    async fn deposit(
        &self,
        channel: EscrowChannel<'_>,
        deposit: &Deposit,
    ) -> Result<Mirror, EscrowError> {
        let EscrowChannel {
            config,
            id: channel,
        } = channel;
        let amount = u128::try_from(deposit.amount)
            .map_err(|_| escrow_error("deposit amount beyond uint128"))?;
        let (collector, collector_data) = deposit_collector(deposit)?;
        if collector == PERMIT2_DEPOSIT_COLLECTOR {
            self.check_permit2_allowance(config, deposit.amount).await?;
        }
        let call = depositCall {
            config: escrow_config(config),
            amount,
            collector,
            collectorData: collector_data.into(),
        };
        let chain_id = self
            .chain_id()
            .await
            .map_err(|f| EscrowError(f.into_settle_error().into()))?;
        let tx = TransactionRequest::default()
            .with_to(BATCH_SETTLEMENT)
            .with_input(call.abi_encode())
            .with_chain_id(chain_id);
        let gas = self.config.gas_limit.max(Self::CHANNEL_DEPOSIT_GAS_LIMIT);
        let transaction = match self.submit(tx, 1, gas, None).await {
            Ok(Sent::Mined(receipt)) if receipt.status() => receipt.transaction_hash(),
            Ok(Sent::Mined(_)) => return Err(escrow_error("the deposit transaction reverted")),
            // Not confirmed: the handler must not run; if it lands, the balance is the payer's
            // and the next refresh mirrors it.
            Ok(Sent::Unconfirmed(_)) => return Err(escrow_error("the deposit was not confirmed")),
            // Its block was rolled back: as not confirmed (the next refresh mirrors the truth).
            Ok(Sent::RolledBack(r)) => return Err(EscrowError(Box::new(r))),
            Err(Submit::NotSent(f)) => return Err(EscrowError(f.into_settle_error().into())),
            Err(Submit::Unknown { source, .. }) => return Err(EscrowError(source)),
        };
        let out = self
            .view_at(
                BATCH_SETTLEMENT,
                channelsCall { channelId: channel }.abi_encode(),
            )
            .await?;
        let state = channelsCall::abi_decode_returns(&out)
            .map_err(|_| escrow_error("channels() returned malformed data"))?;
        Ok(Mirror {
            transaction,
            balance: state.balance,
            total_claimed: state.totalClaimed,
        })
    }

    async fn refund(
        &self,
        channel: EscrowChannel<'_>,
        refund: CooperativeRefund,
    ) -> Result<Mirror, EscrowError> {
        if let Some((claim, signature)) = refund.claim {
            self.claim_channels(std::slice::from_ref(&claim), signature)
                .await?;
        }
        let call = refundWithSignatureCall {
            config: escrow_config(channel.config),
            amount: refund.amount,
            nonce: refund.nonce,
            receiverAuthorizerSignature: refund.signature,
        };
        let (transaction, _) = self
            .send_escrow(call.abi_encode(), 1, Self::CHANNEL_CLAIM_GAS_PER_CHANNEL)
            .await?;
        let state = self.read_channel(channel.id).await?;
        Ok(Mirror {
            transaction,
            balance: state.balance,
            total_claimed: state.total_claimed,
        })
    }
}

impl OnchainSettler {
    /// `eth_call` of `input` on `to` at the latest block, within the RPC timeout.
    async fn view_at(
        &self,
        to: alloy_primitives::Address,
        input: Vec<u8>,
    ) -> Result<alloy_primitives::Bytes, EscrowError> {
        self.call_at(to, input)
            .await
            .map_err(|f| EscrowError(f.into_settle_error().into()))
    }

    /// A Permit2 deposit needs the payer's allowance to Permit2 on the token; without it the
    /// deposit would revert, so it is refused (a [`BatchError`] cause: a 402, nothing sent).
    async fn check_permit2_allowance(
        &self,
        config: &ChannelConfig,
        amount: U256,
    ) -> Result<(), EscrowError> {
        let out = self
            .view_at(
                config.token,
                super::upto::allowance_call(config.payer).abi_encode(),
            )
            .await?;
        let allowance = U256::abi_decode(&out)
            .map_err(|_| escrow_error("allowance() returned malformed data"))?;
        if allowance < amount {
            return Err(EscrowError(Box::new(BatchError::Permit2AllowanceRequired)));
        }
        Ok(())
    }
}

/// The collector of `deposit` and its `collectorData`, by the authorization it carries.
fn deposit_collector(
    deposit: &Deposit,
) -> Result<(alloy_primitives::Address, Vec<u8>), EscrowError> {
    let auth = &deposit.authorization;
    if let Some(a) = &auth.erc3009_authorization {
        let data = (
            a.valid_after,
            a.valid_before,
            U256::from_be_bytes(a.salt.0),
            a.signature.clone(),
        )
            .abi_encode_params();
        return Ok((ERC3009_DEPOSIT_COLLECTOR, data));
    }
    if let Some(p) = &auth.permit2_authorization {
        // The last field is an EIP-2612 permit segment: we never send one.
        let data = (
            p.nonce,
            p.deadline,
            p.signature.clone(),
            alloy_primitives::Bytes::new(),
        )
            .abi_encode_params();
        return Ok((PERMIT2_DEPOSIT_COLLECTOR, data));
    }
    Err(escrow_error("the deposit carries no authorization"))
}

fn escrow_config(config: &ChannelConfig) -> EscrowChannelConfig {
    EscrowChannelConfig {
        payer: config.payer,
        payerAuthorizer: config.payer_authorizer,
        receiver: config.receiver,
        receiverAuthorizer: config.receiver_authorizer,
        token: config.token,
        withdrawDelay: U40::from(config.withdraw_delay & 0xff_ffff_ffff),
        salt: config.salt,
    }
}

impl OnchainSettler {
    /// Gas allowed per channel of a claim batch (measured on anvil: ~78k for one channel,
    /// less per channel in larger batches).
    pub const CHANNEL_CLAIM_GAS_PER_CHANNEL: u64 = 120_000;

    /// Claims the latest vouchers of many channels in one `claimWithSignature` transaction,
    /// relayed by the relayer and authorized by `authorizer_signature` (the channels' common
    /// receiver authorizer's signature of [`claim_digest`](crate::channel::claim_digest)). Claims are cumulative, so sending
    /// one again after an unknown outcome is harmless: rows already claimed are no-ops.
    /// Returns the transaction and the gas it used.
    pub async fn claim_channels(
        &self,
        claims: &[ChannelClaim],
        authorizer_signature: alloy_primitives::Bytes,
    ) -> Result<(B256, u64), EscrowError> {
        self.claim_channels_tracked(claims, authorizer_signature)
            .await
            .map_err(|e| e.error)
    }

    /// [`claim_channels`](Self::claim_channels), telling a send whose outcome is unknown
    /// (its hash) from one that surely did not go out.
    pub(crate) async fn claim_channels_tracked(
        &self,
        claims: &[ChannelClaim],
        authorizer_signature: alloy_primitives::Bytes,
    ) -> Result<(B256, u64), EscrowSendError> {
        let call = claimWithSignatureCall {
            voucherClaims: claims
                .iter()
                .map(|c| EscrowVoucherClaim {
                    voucher: EscrowVoucher {
                        channel: escrow_config(&c.config),
                        maxClaimableAmount: c.max_claimable,
                    },
                    signature: c.signature.clone(),
                    totalClaimed: c.total_claimed,
                })
                .collect(),
            authorizerSignature: authorizer_signature,
        };
        let calls = u64::try_from(claims.len()).unwrap_or(u64::MAX);
        self.send_escrow_tracked(
            call.abi_encode(),
            calls,
            Self::CHANNEL_CLAIM_GAS_PER_CHANNEL,
        )
        .await
    }

    /// Sweeps everything claimed and not yet settled for (`receiver`, `token`) to the receiver
    /// in one `settle` transaction. `None` when there is nothing to settle (nothing sent).
    pub async fn settle_channels(
        &self,
        receiver: alloy_primitives::Address,
        token: alloy_primitives::Address,
    ) -> Result<Option<(B256, u64, u128)>, EscrowError> {
        self.settle_channels_tracked(receiver, token)
            .await
            .map_err(|e| e.error)
    }

    /// [`settle_channels`](Self::settle_channels), with the hash of a send whose outcome is
    /// unknown.
    pub(crate) async fn settle_channels_tracked(
        &self,
        receiver: alloy_primitives::Address,
        token: alloy_primitives::Address,
    ) -> Result<Option<(B256, u64, u128)>, EscrowSendError> {
        let out = self
            .escrow_view(receiversCall { receiver, token }.abi_encode())
            .await
            .map_err(|f| EscrowSendError::not_sent(EscrowError(f.into_settle_error().into())))?;
        let totals = receiversCall::abi_decode_returns(&out).map_err(|_| {
            EscrowSendError::not_sent(escrow_error("receivers() returned malformed data"))
        })?;
        let owed = totals.totalClaimed.saturating_sub(totals.totalSettled);
        if owed == 0 {
            return Ok(None);
        }
        let (hash, gas) = self
            .send_escrow_tracked(settleCall { receiver, token }.abi_encode(), 1, 120_000)
            .await?;
        Ok(Some((hash, gas, owed)))
    }

    async fn send_escrow(
        &self,
        input: Vec<u8>,
        calls: u64,
        per_call: u64,
    ) -> Result<(B256, u64), EscrowError> {
        self.send_escrow_tracked(input, calls, per_call)
            .await
            .map_err(|e| e.error)
    }

    async fn send_escrow_tracked(
        &self,
        input: Vec<u8>,
        calls: u64,
        per_call: u64,
    ) -> Result<(B256, u64), EscrowSendError> {
        let chain_id = self
            .chain_id()
            .await
            .map_err(|f| EscrowSendError::not_sent(EscrowError(f.into_settle_error().into())))?;
        let tx = TransactionRequest::default()
            .with_to(BATCH_SETTLEMENT)
            .with_input(input)
            .with_chain_id(chain_id);
        // `submit` uses the per-call limit as is for one call: give a lone claim its own.
        let sent = |hash, error| EscrowSendError {
            sent: Some(hash),
            error,
        };
        match self.submit(tx, calls.max(2), per_call, None).await {
            Ok(Sent::Mined(receipt)) if receipt.status() => {
                Ok((receipt.transaction_hash(), receipt.gas_used()))
            }
            // Mined and reverted: final, nothing to reconcile.
            Ok(Sent::Mined(_)) => Err(EscrowSendError::not_sent(escrow_error(
                "the escrow transaction reverted",
            ))),
            Ok(Sent::Unconfirmed(hash)) => Err(sent(
                hash,
                escrow_error("the escrow transaction was not confirmed"),
            )),
            // Claims are cumulative: a rolled-back claim is sent again by the next round.
            Ok(Sent::RolledBack(r)) => Err(sent(r.transaction, EscrowError(Box::new(r)))),
            Err(Submit::NotSent(f)) => Err(EscrowSendError::not_sent(EscrowError(
                f.into_settle_error().into(),
            ))),
            Err(Submit::Unknown { hash, source }) => Err(sent(hash, EscrowError(source))),
        }
    }

    /// Where an escrow transaction of ours stands: mined (and whether it succeeded, its gas),
    /// waiting in the node's pool, or unknown to the node.
    pub(crate) async fn escrow_transaction(&self, hash: B256) -> Result<TxState, EscrowError> {
        let limit = self.config.rpc_timeout;
        let rpc = |f: super::Failure| EscrowError(f.into_settle_error().into());
        let receipt = with_timeout(limit, self.provider.get_transaction_receipt(hash))
            .await
            .map_err(rpc)?;
        if let Some(r) = receipt.filter(|r| r.block_number().is_some()) {
            return Ok(TxState::Mined {
                success: r.status(),
                gas_used: r.gas_used(),
            });
        }
        let known = with_timeout(limit, self.provider.get_transaction_by_hash(hash))
            .await
            .map_err(rpc)?;
        Ok(if known.is_some() {
            TxState::Pending
        } else {
            TxState::Unknown
        })
    }
}

/// An escrow transaction that did not end mined and successful.
#[derive(Debug)]
pub(crate) struct EscrowSendError {
    /// The hash of a transaction that may have gone out (`None`: surely nothing is pending).
    pub(crate) sent: Option<B256>,
    /// Why.
    pub(crate) error: EscrowError,
}

impl EscrowSendError {
    fn not_sent(error: EscrowError) -> Self {
        Self { sent: None, error }
    }
}

/// Where a transaction stands ([`OnchainSettler::escrow_transaction`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxState {
    /// In a block.
    Mined {
        /// Its status.
        success: bool,
        /// Gas it used.
        gas_used: u64,
    },
    /// In the node's pool: it may still be mined.
    Pending,
    /// The node does not know it: it will not be mined (unless rebroadcast by someone).
    Unknown,
}

/// A channel's escrow state, as the chain has it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnchainChannel {
    /// Deposited minus withdrawn and refunded.
    pub balance: u128,
    /// Claimed by the receiver.
    pub total_claimed: u128,
    /// When a timed withdrawal started (0: none).
    pub withdraw_requested_at: u64,
    /// The next refund nonce.
    pub refund_nonce: U256,
}

/// What one [`OnchainSettler::watch_channels`] round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchReport {
    /// Channels whose mirrored state was refreshed.
    pub refreshed: usize,
    /// Channels with a timed withdrawal pending.
    pub withdrawing: usize,
    /// Channels claimed this round.
    pub claimed: usize,
    /// The claim transaction and its gas, if one was sent.
    pub transaction: Option<(B256, u64)>,
}

impl OnchainSettler {
    /// An `eth_call` of the escrow at the latest block, within the RPC timeout.
    async fn escrow_view(&self, input: Vec<u8>) -> Result<alloy_primitives::Bytes, super::Failure> {
        self.call_at(BATCH_SETTLEMENT, input).await
    }

    /// An `eth_call` to `to` at the latest block, within the RPC timeout.
    async fn call_at(
        &self,
        to: alloy_primitives::Address,
        input: Vec<u8>,
    ) -> Result<alloy_primitives::Bytes, super::Failure> {
        let read = TransactionRequest::default().with_to(to).with_input(input);
        with_timeout(
            self.config.rpc_timeout,
            self.provider
                .call(read)
                .block(BlockId::latest())
                .into_future(),
        )
        .await
    }

    /// The latest block's timestamp: the time `finalizeWithdraw` is judged by.
    pub(crate) async fn chain_time(&self) -> Result<u64, EscrowError> {
        let block = with_timeout(
            self.config.rpc_timeout,
            self.provider
                .get_block_by_number(BlockNumberOrTag::Latest)
                .into_future(),
        )
        .await
        .map_err(|f| EscrowError(f.into_settle_error().into()))?;
        block
            .map(|b| b.header.timestamp)
            .ok_or_else(|| escrow_error("the node has no latest block"))
    }

    /// Reads a channel's escrow state (`channels`, `pendingWithdrawals`, `refundNonce`).
    pub async fn read_channel(&self, channel: B256) -> Result<OnchainChannel, EscrowError> {
        let view = |input: Vec<u8>| self.escrow_view(input);
        let (c, w, n) = tokio::join!(
            view(channelsCall { channelId: channel }.abi_encode()),
            view(pendingWithdrawalsCall { channelId: channel }.abi_encode()),
            view(refundNonceCall { channelId: channel }.abi_encode()),
        );
        let rpc = |f: super::Failure| EscrowError(f.into_settle_error().into());
        let malformed = |_| escrow_error("the escrow returned malformed data");
        let c = channelsCall::abi_decode_returns(&c.map_err(rpc)?).map_err(malformed)?;
        let w = pendingWithdrawalsCall::abi_decode_returns(&w.map_err(rpc)?).map_err(malformed)?;
        let n = refundNonceCall::abi_decode_returns(&n.map_err(rpc)?).map_err(malformed)?;
        Ok(OnchainChannel {
            balance: c.balance,
            total_claimed: c.totalClaimed,
            withdraw_requested_at: w.initiatedAt.to::<u64>(),
            refund_nonce: n,
        })
    }

    /// One round of the channel manager: refreshes every stored channel's mirrored state
    /// from the chain, then claims, in one `claimWithSignature` transaction, every channel
    /// with unclaimed vouchers that has a timed withdrawal pending (the payer must not walk
    /// away with charges the server has not claimed: `finalizeWithdraw` only returns what is
    /// unclaimed then) or at least `threshold` unclaimed. Call it from a timer well within the
    /// shortest `withdrawDelay`, or once from a cron-style command. A channel whose record
    /// changes meanwhile is left for the next round (compare-and-set); claims are cumulative,
    /// so a round repeated after an unknown outcome claims nothing twice.
    /// [`ChannelManager`](super::ChannelManager) runs such rounds on an interval, with
    /// refunds, settles, metrics and reconciliation of unknown outcomes across rounds.
    pub async fn watch_channels<S: ChannelStore>(
        &self,
        store: &S,
        authorizer: &dyn ReceiverAuthorizer,
        now: u64,
        threshold: u128,
    ) -> Result<WatchReport, EscrowError> {
        let policy = super::channel_manager::Policy {
            threshold: threshold.max(1),
            settle: false,
            max_per_transaction: usize::MAX,
            ..Default::default()
        };
        let mut pending = Vec::new();
        let r =
            super::channel_manager::round(self, store, authorizer, now, &policy, &mut pending, 60)
                .await?;
        // One call, nothing carried to a next round: a failed step fails the call (the
        // alert names it).
        if r.failures > 0 {
            return Err(escrow_error(
                "a step of the channel round failed (see the alerts)",
            ));
        }
        Ok(WatchReport {
            refreshed: r.refreshed,
            withdrawing: r.withdrawing,
            claimed: r.claimed,
            transaction: r.claim_transactions.first().copied(),
        })
    }
}
