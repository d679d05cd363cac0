//! Smart-wallet payments on the settler's chain: the settler as a [`ContractSignatures`]
//! checker for the verifier, the pre-check's simulation of an ERC-6492 payment (deploy, then
//! transfer, in one `eth_call`), and the deployment through an allowlisted factory before the
//! transfer, as the reference facilitator does.

use alloy_network::TransactionBuilder;
use alloy_primitives::{Address, B256, Bytes};
use alloy_provider::Provider;
use alloy_rpc_types_eth::TransactionRequest;
use alloy_sol_types::{SolCall, sol};
use async_trait::async_trait;

use super::relayer::with_timeout;
use super::revert::Failure;
use super::{OnchainSettler, Sent, Submit, reason, stats};
use crate::settle::SettleError;
use crate::verify::VerifiedPayment;
use crate::verify::wallet::{ContractSignatureError, ContractSignatures, Erc6492};

sol! {
    /// Multicall3's `aggregate3`, to simulate a deployment and the transfer that needs it in
    /// one call.
    interface IAggregate3 {
        struct Call3 { address target; bool allowFailure; bytes callData; }
        struct Result3 { bool success; bytes returnData; }
        function aggregate3(Call3[] calldata calls) external payable returns (Result3[] memory returnData);
    }
}

/// The ERC-6492 wrapping of an `exact` payment's signature, if it has one: `None` for a plain
/// signature, `Some(Err)` for a signature with the suffix that does not decode.
pub(super) fn erc6492(payment: &VerifiedPayment) -> Option<Result<Erc6492, Failure>> {
    let (_, signature) = payment.eip3009()?;
    Erc6492::decode(signature).map(|w| w.map_err(|_| Failure::Revert(reason::SIGNATURE)))
}

#[async_trait]
impl ContractSignatures for OnchainSettler {
    /// One deployless `eth_call` of the ERC-6492 validator through the settler's RPC, within
    /// its [RPC timeout](OnchainSettler::with_rpc_timeout). Another chain than the RPC's is
    /// [`ContractSignatureError::UnsupportedChain`].
    async fn is_valid(
        &self,
        chain_id: u64,
        signer: Address,
        hash: B256,
        signature: &Bytes,
    ) -> Result<bool, ContractSignatureError> {
        let ours = self.chain_id().await.map_err(|f| match f {
            Failure::Rpc { source, .. } => ContractSignatureError::Rpc(source),
            Failure::Revert(reason) => ContractSignatureError::rpc(reason.to_string()),
        })?;
        if ours != chain_id {
            return Err(ContractSignatureError::UnsupportedChain(chain_id));
        }
        crate::verify::wallet::validate(
            &self.provider,
            self.config.rpc_timeout,
            signer,
            hash,
            signature,
        )
        .await
    }

    /// The factories this settler may call ([`OnchainSettler::with_eip6492_factories`]).
    fn eip6492_factories(&self) -> &[Address] {
        &self.factories
    }
}

impl OnchainSettler {
    /// Refuses a wrapped signature whose factory this settler may not call.
    pub(super) fn allowed(&self, wrapped: &Erc6492) -> Result<(), Failure> {
        if self.factories.contains(&wrapped.factory) {
            Ok(())
        } else {
            Err(Failure::Revert(reason::FACTORY_NOT_ALLOWED))
        }
    }

    /// The pre-check's simulation of an ERC-6492 payment: through Multicall3, the factory
    /// call (allowed to fail: the wallet may be deployed already) then the transfer with the
    /// inner signature (a failure reverts the whole call, with the transfer's reason).
    pub(super) fn simulate_deployed(
        &self,
        payment: &VerifiedPayment,
        wrapped: &Erc6492,
    ) -> TransactionRequest {
        let calls = vec![
            IAggregate3::Call3 {
                target: wrapped.factory,
                allowFailure: true,
                callData: wrapped.factory_calldata.clone(),
            },
            IAggregate3::Call3 {
                target: payment.asset,
                allowFailure: false,
                callData: super::payment_calldata(payment).unwrap_or_default(),
            },
        ];
        TransactionRequest::default()
            .with_from(self.relayer())
            .with_to(self.config.multicall)
            .with_input(Bytes::from(
                IAggregate3::aggregate3Call { calls }.abi_encode(),
            ))
    }

    /// Deploys the payer's wallet through its allowlisted factory when it has no code yet
    /// (one transaction from the relayer, waited for). Nothing that fails here moved money:
    /// a deployment whose outcome is unknown answers unavailable, so the proof is released
    /// and the retry finds the wallet deployed or deploys it.
    pub(super) async fn deploy_wallet(
        &self,
        payment: &VerifiedPayment,
        wrapped: &Erc6492,
        chain_id: u64,
    ) -> Result<(), SettleError> {
        let limit = self.config.rpc_timeout;
        let code = with_timeout(limit, self.provider.get_code_at(payment.payer))
            .await
            .map_err(|f| self.not_sent(f))?;
        if !code.is_empty() {
            return Ok(());
        }
        self.allowed(wrapped).map_err(|f| self.not_sent(f))?;
        let tx = TransactionRequest::default()
            .with_from(self.relayer())
            .with_to(wrapped.factory)
            .with_input(wrapped.factory_calldata.clone())
            .with_chain_id(chain_id);
        let gas = self.config.gas_limit.max(Self::DEPLOY_GAS_LIMIT);
        let unknown = |hash: B256, source| SettleError::Unavailable {
            retry_after: None,
            source: format!("wallet deployment {hash} not confirmed: {source}").into(),
        };
        match self.submit(tx, 1, gas, None).await {
            Err(Submit::NotSent(Failure::Revert(_))) => {
                // Some factories revert for a wallet that exists: deployed meanwhile (by
                // anyone) is as good as deployed by us.
                match with_timeout(limit, self.provider.get_code_at(payment.payer)).await {
                    Ok(code) if !code.is_empty() => Ok(()),
                    _ => Err(self.not_sent(Failure::Revert(reason::DEPLOYMENT_FAILED))),
                }
            }
            Err(Submit::NotSent(failure)) => Err(self.not_sent(failure)),
            Err(Submit::Unknown { hash, source }) => {
                self.shared.stats.update(|s| s.unavailable += 1);
                Err(unknown(hash, source.to_string()))
            }
            Ok(Sent::Unconfirmed(hash)) => {
                self.shared.stats.update(|s| s.unavailable += 1);
                Err(unknown(hash, "no receipt in time".into()))
            }
            Ok(Sent::RolledBack(r)) => {
                // Money did not move: the retry finds the wallet deployed, or deploys it.
                self.shared.stats.update(|s| s.unavailable += 1);
                Err(unknown(r.transaction, r.to_string()))
            }
            Ok(Sent::Mined(receipt)) => {
                let fee =
                    stats::fee(receipt.gas_used, receipt.effective_gas_price).ok_or_else(|| {
                        SettleError::Unknown {
                            transaction: Some(receipt.transaction_hash),
                            retry_after: None,
                            source: Box::new(self.hostile_receipt(receipt.transaction_hash)),
                        }
                    })?;
                self.shared.stats.update(|s| {
                    s.add_mined(receipt.gas_used, fee);
                    if !receipt.status() {
                        s.refused = s.refused.saturating_add(1);
                    }
                });
                if receipt.status() {
                    Ok(())
                } else {
                    Err(SettleError::Refused {
                        reason: reason::DEPLOYMENT_FAILED,
                        transaction: Some(receipt.transaction_hash),
                    })
                }
            }
        }
    }
}
