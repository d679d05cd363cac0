//! Batched settlement through Multicall3, and reading where a payment stands: what makes an
//! [`OnchainSettler`] the back end of a [`DeferredSettler`](crate::settle::deferred::DeferredSettler).
//!
//! A batch of two or more payments is one transaction from the relayer to Multicall3's
//! `aggregate3`, one `transferWithAuthorization` call per payment with `allowFailure = true`,
//! so one bad authorization does not sink the others. (The token does not care who calls
//! `transferWithAuthorization`: the signature authorizes the transfer, not the caller.)
//!
//! 1. The whole batch is simulated with `eth_call`; calls that fail are refused with their own
//!    revert reason and left out, so no gas is spent on them.
//! 2. One payment left: it goes alone, as a plain `transferWithAuthorization` (Multicall3 costs
//!    ~10k gas more). Two or more: one `aggregate3` transaction, its gas limit the estimate
//!    plus an eighth plus one transfer's limit, at most the per-transfer limit times the calls.
//! 3. From the mined receipt, each payment is settled when the token logged
//!    `AuthorizationUsed(from, nonce)` in it, and refused with
//!    [`TRANSACTION_FAILED`](super::reason::TRANSACTION_FAILED) and the hash otherwise (its
//!    state changed between simulation and inclusion). Each settled payment's gas is the
//!    receipt's gas divided by the payments it settled.
//! 4. No receipt in time: `authorizationState` decides per payment, as for one transfer.
//! 5. Reconciliation ([`BatchSettler::state`]) of a payment sent before: a known transaction
//!    mined with its `AuthorizationUsed` log settles it once it has the wanted
//!    [confirmations](OnchainSettler::with_confirmations); before that it is in flight (a
//!    reorg could still drop it), and so is `authorizationState`'s "used", which reads the
//!    same block.

use std::time::Instant;

use alloy_network::{ReceiptResponse, TransactionBuilder};
use alloy_primitives::{Address, B256, Bytes};
use alloy_provider::Provider;
use alloy_rpc_types_eth::TransactionRequest;
use alloy_sol_types::{SolCall, SolEvent, decode_revert_reason, sol};
use async_trait::async_trait;

use super::relayer::with_timeout;
use super::revert::{Failure, revert_reason};
use super::{
    OnchainSettler, Sent, Submit, UnconfirmedTransaction, payment_calldata, reason, stats,
};
use crate::settle::SettleError;
use crate::settle::deferred::{BatchSettler, ChainState, SendLog, Settled};
use crate::verify::VerifiedPayment;

sol! {
    /// Multicall3's batching entry point.
    interface IMulticall3 {
        struct Call3 { address target; bool allowFailure; bytes callData; }
        struct Result3 { bool success; bytes returnData; }
        function aggregate3(Call3[] calldata calls) external payable returns (Result3[] memory returnData);
    }

    /// Emitted by FiatToken for each authorization used.
    event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
}

type Outcome = Result<Settled, SettleError>;

/// The same failure for every payment of a batch (an RPC error has one source; each payment
/// gets its text).
fn each(failure: &Failure) -> SettleError {
    match failure {
        Failure::Revert(reason) => SettleError::Refused {
            reason: reason.clone(),
            transaction: None,
        },
        Failure::Rpc {
            retry_after,
            source,
        } => SettleError::Unavailable {
            retry_after: *retry_after,
            source: source.to_string().into(),
        },
    }
}

impl OnchainSettler {
    /// Settles `payments` (see the module docs); one result per payment, in order.
    async fn batch(&self, payments: &[VerifiedPayment], log: &dyn SendLog) -> Vec<Outcome> {
        let mut out: Vec<Option<Outcome>> = payments.iter().map(|_| None).collect();
        let chain_id = match self.chain_id().await {
            Ok(id) => id,
            Err(f) => return payments.iter().map(|_| Err(each(&f))).collect(),
        };
        let mut live: Vec<usize> = Vec::new();
        for (i, p) in payments.iter().enumerate() {
            if p.network.chain_id() == chain_id {
                live.push(i);
            } else {
                out[i] = Some(Err(self.not_sent(Failure::Revert(reason::INVALID_NETWORK))));
            }
        }
        if live.len() >= 2 {
            match self.simulate(payments, &live).await {
                Ok(refused) => {
                    for (i, reason) in refused {
                        out[i] = Some(Err(self.not_sent(Failure::Revert(reason))));
                        live.retain(|j| *j != i);
                    }
                }
                Err(f) => {
                    for i in live.drain(..) {
                        out[i] = Some(Err(each(&f)));
                    }
                    self.shared.stats.update(|s| s.unavailable += 1);
                }
            }
        }
        match live.as_slice() {
            [] => {}
            [one] => {
                let one = *one;
                let hook = |hash| log.sending(hash, std::slice::from_ref(&one));
                out[one] = Some(
                    self.settle_one(&payments[one], Some(&hook))
                        .await
                        .map(|(s, gas)| Settled::new(s.transaction, gas)),
                );
            }
            many => {
                let results = self.send_batch(payments, many, chain_id, log).await;
                for (i, r) in many.iter().zip(results) {
                    out[*i] = Some(r);
                }
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(SettleError::Unavailable {
                        retry_after: None,
                        source: "payment left out of the batch".into(),
                    })
                })
            })
            .collect()
    }

    /// `aggregate3` carrying the transfers of `payments[live]`.
    fn aggregate(&self, payments: &[VerifiedPayment], live: &[usize]) -> TransactionRequest {
        let calls = live
            .iter()
            .map(|i| {
                let p = &payments[*i];
                IMulticall3::Call3 {
                    target: p.asset,
                    allowFailure: true,
                    // Not EIP-3009 (deferred batches refuse other proofs before this): an
                    // empty call that fails alone, never a transfer.
                    callData: payment_calldata(p).unwrap_or_default(),
                }
            })
            .collect();
        TransactionRequest::default()
            .with_from(self.relayer())
            .with_to(self.config.multicall)
            .with_input(Bytes::from(
                IMulticall3::aggregate3Call { calls }.abi_encode(),
            ))
    }

    /// Simulates the batch: the payments whose call would fail, with their reasons.
    async fn simulate(
        &self,
        payments: &[VerifiedPayment],
        live: &[usize],
    ) -> Result<Vec<(usize, crate::reason::Reason)>, Failure> {
        // The node's default block, like the single-transfer simulation (see `read_state`).
        let out = with_timeout(
            self.config.rpc_timeout,
            self.provider.call(self.aggregate(payments, live)),
        )
        .await?;
        let results = IMulticall3::aggregate3Call::abi_decode_returns(&out).map_err(|e| {
            Failure::rpc(format!("no Multicall3 at {}: {e}", self.config.multicall))
        })?;
        if results.len() != live.len() {
            return Err(Failure::rpc(
                "Multicall3 returned the wrong number of results",
            ));
        }
        Ok(live
            .iter()
            .zip(results)
            .filter(|(_, r)| !r.success)
            .map(|(i, r)| {
                let text = decode_revert_reason(&r.returnData).unwrap_or_default();
                (*i, revert_reason(&text))
            })
            .collect())
    }

    /// Sends one `aggregate3` transaction for `payments[live]` and maps its receipt back.
    async fn send_batch(
        &self,
        payments: &[VerifiedPayment],
        live: &[usize],
        chain_id: u64,
        log: &dyn SendLog,
    ) -> Vec<Outcome> {
        let started = Instant::now();
        let tx = self.aggregate(payments, live).with_chain_id(chain_id);
        let hook = |hash| log.sending(hash, live);
        // Every call may use the most any of them may (a contract wallet's check costs more).
        let per_call = live
            .iter()
            .map(|i| self.gas_limit_of(&payments[*i]))
            .max()
            .unwrap_or(self.config.gas_limit);
        match self
            .submit(tx, live.len() as u64, per_call, Some(&hook))
            .await
        {
            Err(Submit::NotSent(f)) => {
                self.shared.stats.update(|s| match f {
                    Failure::Revert(_) => s.refused += live.len() as u64,
                    Failure::Rpc { .. } => s.unavailable += 1,
                });
                live.iter().map(|_| Err(each(&f))).collect()
            }
            Err(Submit::Unknown { hash, source }) => {
                // The batch may still land: every payment in it is in doubt, never "not sent".
                self.shared.stats.update(|s| s.unknown += 1);
                let text = source.to_string();
                live.iter()
                    .map(|_| {
                        Err(SettleError::Unknown {
                            transaction: Some(hash),
                            retry_after: None,
                            source: text.clone().into(),
                        })
                    })
                    .collect()
            }
            Ok(Sent::Mined(receipt)) => {
                let hash = receipt.transaction_hash;
                let used = used_in(&receipt, live.len(), |p| {
                    live.iter().position(|i| {
                        let p2 = &payments[*i];
                        p2.asset == p.0 && p2.payer == p.1 && p2.nonce() == p.2
                    })
                });
                let settled = used.iter().filter(|u| **u).count() as u64;
                let latency = started.elapsed();
                let Some(fee) = stats::fee(receipt.gas_used, receipt.effective_gas_price) else {
                    // Not trusted: every payment in it is in doubt, read from the chain again.
                    let e = self.hostile_receipt(hash);
                    return live
                        .iter()
                        .map(|_| {
                            Err(SettleError::Unknown {
                                transaction: Some(hash),
                                retry_after: None,
                                source: Box::new(e),
                            })
                        })
                        .collect();
                };
                self.shared.stats.update(|s| {
                    s.add_mined(receipt.gas_used, fee);
                    s.add_settled(settled, latency);
                    s.refused = s
                        .refused
                        .saturating_add((live.len() as u64).saturating_sub(settled));
                });
                let gas = receipt.gas_used.checked_div(settled);
                used.into_iter()
                    .map(|ok| {
                        if ok && receipt.status() {
                            Ok(Settled::new(Some(hash), gas))
                        } else {
                            Err(SettleError::Refused {
                                reason: reason::TRANSACTION_FAILED,
                                transaction: Some(hash),
                            })
                        }
                    })
                    .collect()
            }
            Ok(Sent::RolledBack(r)) => {
                // Every payment in it is in doubt: the worker reads each from the chain (the
                // transaction may be mined again, or dropped) before anything is resent.
                self.shared
                    .stats
                    .update(|s| s.unknown = s.unknown.saturating_add(live.len() as u64));
                live.iter()
                    .map(|_| {
                        Err(SettleError::Unknown {
                            transaction: Some(r.transaction),
                            retry_after: None,
                            source: Box::new(r),
                        })
                    })
                    .collect()
            }
            Ok(Sent::Unconfirmed(hash)) => {
                let mut out = Vec::with_capacity(live.len());
                for i in live {
                    let p = &payments[*i];
                    out.push(
                        match self.authorization_state(p.asset, p.payer, p.nonce()).await {
                            Ok(true) => {
                                self.shared.stats.update(|s| s.settled += 1);
                                Ok(Settled::new(Some(hash), None))
                            }
                            _ => {
                                self.shared.stats.update(|s| s.unknown += 1);
                                Err(SettleError::Unavailable {
                                    retry_after: None,
                                    source: Box::new(UnconfirmedTransaction {
                                        transaction: hash,
                                        waited: self.config.receipt_timeout,
                                    }),
                                })
                            }
                        },
                    );
                }
                out
            }
        }
    }

    /// Where `payment` stands: settled by one of `sent` (receipt with its
    /// `AuthorizationUsed` log) or by anyone (`authorizationState`), in flight, or unused.
    async fn chain_state(
        &self,
        payment: &VerifiedPayment,
        sent: &[B256],
    ) -> Result<ChainState, SettleError> {
        let limit = self.config.rpc_timeout;
        let (p_from, p_nonce) = (payment.payer, payment.nonce());
        let mut in_flight = None;
        // Mined by one of ours but not yet buried: settled only once it has the confirmations.
        let mut shallow = None;
        for hash in sent {
            let receipt = with_timeout(limit, self.provider.get_transaction_receipt(*hash))
                .await
                .map_err(Failure::into_settle_error)?;
            match receipt {
                Some(r) if r.block_number().is_some() => {
                    if !self.deep_enough(&r).await {
                        // Mined, not yet buried: it could still be rolled back. Wait.
                        shallow = Some(*hash);
                        continue;
                    }
                    let used = used_in(&r, 1, |(asset, from, nonce)| {
                        (asset == payment.asset && from == p_from && nonce == p_nonce).then_some(0)
                    });
                    if r.status() && used.first() == Some(&true) {
                        let count = count_used(&r);
                        return Ok(ChainState::Settled(Settled::new(
                            Some(*hash),
                            r.gas_used.checked_div(count),
                        )));
                    }
                }
                _ => {
                    let known = with_timeout(limit, self.provider.get_transaction_by_hash(*hash))
                        .await
                        .map_err(Failure::into_settle_error)?;
                    if known.is_some() {
                        in_flight = Some(*hash);
                    }
                }
            }
        }
        if let Some(hash) = shallow {
            // Not "settled" from `authorizationState` either: that reads the same shallow block.
            return Ok(ChainState::InFlight(hash));
        }
        if self
            .authorization_state(payment.asset, p_from, p_nonce)
            .await
            .map_err(Failure::into_settle_error)?
        {
            // Used, by a transaction we do not know (or lost): the money moved all the same.
            return Ok(ChainState::Settled(Settled::new(None, None)));
        }
        Ok(match in_flight {
            Some(hash) => ChainState::InFlight(hash),
            None => ChainState::Unused,
        })
    }
}

impl OnchainSettler {
    /// Whether a mined receipt has the wanted confirmations (an RPC failure: not yet).
    async fn deep_enough(&self, receipt: &alloy_rpc_types_eth::TransactionReceipt) -> bool {
        let Some(mined) = receipt.block_number() else {
            return false;
        };
        if self.config.confirmations <= 1 {
            return true;
        }
        with_timeout(self.config.rpc_timeout, self.provider.get_block_number())
            .await
            .is_ok_and(|head| {
                head.saturating_sub(mined).saturating_add(1) >= self.config.confirmations
            })
    }
}

/// `AuthorizationUsed` logs of a receipt, as (token, authorizer, nonce).
fn used_logs(receipt: &alloy_rpc_types_eth::TransactionReceipt) -> Vec<(Address, Address, B256)> {
    receipt
        .inner
        .logs()
        .iter()
        .filter_map(|log| {
            let event = AuthorizationUsed::decode_log(&log.inner).ok()?;
            Some((log.address(), event.authorizer, event.nonce))
        })
        .collect()
}

fn count_used(receipt: &alloy_rpc_types_eth::TransactionReceipt) -> u64 {
    (used_logs(receipt).len() as u64).max(1)
}

/// For each of `n` slots (`find` maps a log to its slot), whether the receipt logged it.
fn used_in(
    receipt: &alloy_rpc_types_eth::TransactionReceipt,
    n: usize,
    find: impl Fn((Address, Address, B256)) -> Option<usize>,
) -> Vec<bool> {
    let mut used = vec![false; n];
    for l in used_logs(receipt) {
        if let Some(slot) = find(l).and_then(|i| used.get_mut(i)) {
            *slot = true;
        }
    }
    used
}

#[async_trait]
impl BatchSettler for OnchainSettler {
    async fn check(
        &self,
        payment: &VerifiedPayment,
        owed: alloy_primitives::U256,
    ) -> Result<(), SettleError> {
        if super::wallet::erc6492(payment).is_some() {
            // A batch does not deploy wallets (see `settle_one`).
            return Err(SettleError::Refused {
                reason: reason::UNDEPLOYED_SMART_WALLET,
                transaction: None,
            });
        }
        self.check_owed(payment, owed).await
    }

    async fn settle_batch(&self, payments: &[VerifiedPayment], log: &dyn SendLog) -> Vec<Outcome> {
        self.batch(payments, log).await
    }

    async fn state(
        &self,
        payment: &VerifiedPayment,
        sent: &[B256],
    ) -> Result<ChainState, SettleError> {
        self.chain_state(payment, sent).await
    }
}
