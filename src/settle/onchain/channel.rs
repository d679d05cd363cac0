//! Payment-channel deposits through the relayer: [`OnchainSettler`] is a
//! [`channel::serve::Escrow`](crate::channel::serve::Escrow). A `deposit` payload's EIP-3009
//! authorization goes to the canonical escrow as `deposit(config, amount, ERC3009 collector,
//! abi.encode(validAfter, validBefore, salt, signature))`; the channel's balance and claimed
//! total are read back from `channels(channelId)` after the receipt.

use std::future::IntoFuture;

use alloy_network::{ReceiptResponse, TransactionBuilder};
use alloy_primitives::{B256, U256, aliases::U40};
use alloy_provider::Provider;
use alloy_rpc_types_eth::{BlockId, TransactionRequest};
use alloy_sol_types::{SolCall, SolValue, sol};
use async_trait::async_trait;

use super::relayer::with_timeout;
use super::{OnchainSettler, Sent, Submit};
use crate::channel::serve::{Escrow, EscrowError, Mirror};
use crate::channel::{BATCH_SETTLEMENT, ERC3009_DEPOSIT_COLLECTOR};
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
        config: &ChannelConfig,
        channel: B256,
        deposit: &Deposit,
    ) -> Result<Mirror, EscrowError> {
        let auth = deposit
            .authorization
            .erc3009_authorization
            .as_ref()
            .ok_or_else(|| escrow_error("only EIP-3009 deposits are supported"))?;
        let amount = u128::try_from(deposit.amount)
            .map_err(|_| escrow_error("deposit amount beyond uint128"))?;
        let collector_data = (
            auth.valid_after,
            auth.valid_before,
            U256::from_be_bytes(auth.salt.0),
            auth.signature.clone(),
        )
            .abi_encode_params();
        let call = depositCall {
            config: EscrowChannelConfig {
                payer: config.payer,
                payerAuthorizer: config.payer_authorizer,
                receiver: config.receiver,
                receiverAuthorizer: config.receiver_authorizer,
                token: config.token,
                withdrawDelay: U40::from(config.withdraw_delay & 0xff_ffff_ffff),
                salt: config.salt,
            },
            amount,
            collector: ERC3009_DEPOSIT_COLLECTOR,
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
            Err(Submit::NotSent(f)) => return Err(EscrowError(f.into_settle_error().into())),
            Err(Submit::Unknown { source, .. }) => return Err(EscrowError(source)),
        };
        let read = TransactionRequest::default()
            .with_to(BATCH_SETTLEMENT)
            .with_input(channelsCall { channelId: channel }.abi_encode());
        let out = with_timeout(
            self.config.rpc_timeout,
            self.provider
                .call(read)
                .block(BlockId::latest())
                .into_future(),
        )
        .await
        .map_err(|f| EscrowError(f.into_settle_error().into()))?;
        let state = channelsCall::abi_decode_returns(&out)
            .map_err(|_| escrow_error("channels() returned malformed data"))?;
        Ok(Mirror {
            transaction,
            balance: state.balance,
            total_claimed: state.totalClaimed,
        })
    }
}
