//! The relayer account: its nonce, its fees, and the one place transactions are signed and
//! sent.
//!
//! Sends are serialised per settler by an async mutex around (nonce, sign, `eth_sendRawTransaction`):
//! concurrent settlements get consecutive nonces and reach the node in nonce order, and a failed
//! send never leaves a gap. The lock covers one RPC round trip, not the receipt wait, so
//! settlements still overlap on-chain. The cached nonce is dropped whenever a send fails in a
//! way that may or may not have consumed it; the next send re-reads the `pending` count.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use alloy_network::eip2718::Encodable2718;
use alloy_network::{Ethereum, EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy_primitives::{Address, B256};
use alloy_provider::{DynProvider, Provider};
use alloy_rpc_types_eth::{BlockNumberOrTag, TransactionRequest};
use tokio::sync::Mutex;

use super::HostileReply;
use super::revert::{self, Failure};
use crate::alert::{Alert, alert};
use crate::verify::BoxError;

/// Blocks of fee history read per settlement (the reward median over them sets the tip).
const FEE_HISTORY_BLOCKS: u64 = 5;
/// Reward percentile of those blocks used as the priority fee.
const REWARD_PERCENTILE: f64 = 20.0;

/// EIP-1559 fees for one transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Fees {
    pub(super) max_fee_per_gas: u128,
    pub(super) max_priority_fee_per_gas: u128,
}

/// Why a fee quote was refused.
#[derive(Debug, thiserror::Error)]
#[error("gas price {needed} wei above the cap of {cap} wei")]
pub(super) struct FeeAboveCap {
    needed: u128,
    cap: u128,
}

/// The median of the blocks' first reward percentile (ignoring zeros), at least 1 wei: alloy's
/// `eip1559_default_estimator` tip, without its overflow on hostile values.
fn median_tip(rewards: &[Vec<u128>]) -> u128 {
    let mut tips: Vec<u128> = rewards
        .iter()
        .filter_map(|r| r.first().copied())
        .filter(|r| *r > 0)
        .collect();
    tips.sort_unstable();
    let n = tips.len();
    let median = if n == 0 {
        0
    } else if n.is_multiple_of(2) {
        // The mean of the middle two, floored, without `a + b`.
        let (a, b) = (tips[n / 2 - 1], tips[n / 2]);
        a / 2 + b / 2 + (a % 2 + b % 2) / 2
    } else {
        tips[n / 2]
    };
    median.max(alloy_provider::utils::EIP1559_MIN_PRIORITY_FEE)
}

/// Fees from the next block's base fee and recent tips: `2 × base + tip`, clamped to `cap`.
/// Refused when even `base + tip` (what inclusion needs now) is above `cap`. Values from the
/// node are hostile: a sum past `u128` wei is refused (and raised), never a panic.
pub(super) fn quote(
    next_base_fee: u128,
    rewards: &[Vec<u128>],
    cap: u128,
) -> Result<Fees, FeeAboveCap> {
    let tip = median_tip(rewards);
    let Some(needed) = next_base_fee.checked_add(tip) else {
        alert!(
            Alert::HostileReply,
            "onchain: fee history with base fee {next_base_fee} and tip {tip} wei overflows; \
             not sending"
        );
        return Err(FeeAboveCap {
            needed: u128::MAX,
            cap,
        });
    };
    if needed > cap {
        return Err(FeeAboveCap { needed, cap });
    }
    let estimate = next_base_fee
        .saturating_mul(alloy_provider::utils::EIP1559_BASE_FEE_MULTIPLIER)
        .saturating_add(tip);
    let max_fee_per_gas = estimate.max(needed).min(cap);
    Ok(Fees {
        max_fee_per_gas,
        max_priority_fee_per_gas: tip.min(max_fee_per_gas),
    })
}

/// Fees replacing a pending transaction priced `old`: both fees at least 12.5 % (plus one
/// wei) above the old ones, as nodes require of a replacement (geth and reth: 10 %), or the
/// current `quote` if higher; `None` when the cap does not leave room for that bump.
pub(super) fn bumped(old: Fees, quote: Option<Fees>, cap: u128) -> Option<Fees> {
    let bump = |fee: u128| fee.saturating_add(fee / 8).saturating_add(1);
    let (mut max_fee, mut tip) = (
        bump(old.max_fee_per_gas),
        bump(old.max_priority_fee_per_gas),
    );
    if let Some(q) = quote {
        max_fee = max_fee.max(q.max_fee_per_gas);
        tip = tip.max(q.max_priority_fee_per_gas);
    }
    let max_fee = max_fee.max(tip);
    (max_fee <= cap).then_some(Fees {
        max_fee_per_gas: max_fee,
        max_priority_fee_per_gas: tip,
    })
}

/// The nonce after `nonce`. EIP-2681 caps account nonces below `2^64 - 1`, so a node reporting
/// that one is hostile: refused and raised, never an overflow.
fn following(nonce: u64) -> Result<u64, HostileReply> {
    nonce.checked_add(1).ok_or_else(|| {
        let e = HostileReply("the relayer's pending nonce is at its limit");
        alert!(Alert::HostileReply, cause = &e, "onchain: not sending");
        e
    })
}

/// Called with a transaction's hash after it is signed and before it is broadcast (a journal
/// records it there, so a crash can never leave a sent transaction it does not know about). An
/// error means: do not broadcast.
pub(super) type BeforeSend<'a> = &'a (
        dyn Fn(B256) -> Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>>
            + Send
            + Sync
    );

/// How a send failed.
#[derive(Debug)]
pub(super) enum SendError {
    /// The node refused the transaction: nothing is pending.
    Refused(Failure),
    /// The send's outcome is unknown (transport error or timeout): the transaction with this
    /// hash may be in the node's pool.
    Unknown { hash: B256, source: BoxError },
}

/// The relayer: a wallet and its serialised nonce.
#[derive(Debug)]
pub(super) struct Relayer {
    wallet: EthereumWallet,
    address: Address,
    /// The next nonce to use, or `None` to read it from the node.
    next_nonce: Mutex<Option<u64>>,
}

impl Relayer {
    pub(super) fn new(wallet: EthereumWallet) -> Self {
        let address = alloy_network::NetworkWallet::<Ethereum>::default_signer_address(&wallet);
        Self {
            wallet,
            address,
            next_nonce: Mutex::new(None),
        }
    }

    pub(super) fn address(&self) -> Address {
        self.address
    }

    /// Reads the fee market and quotes fees under `cap`.
    pub(super) async fn fees(
        &self,
        provider: &DynProvider,
        cap: u128,
        rpc_timeout: Duration,
    ) -> Result<Fees, Failure> {
        let history = with_timeout(
            rpc_timeout,
            provider.get_fee_history(
                FEE_HISTORY_BLOCKS,
                BlockNumberOrTag::Latest,
                &[REWARD_PERCENTILE],
            ),
        )
        .await?;
        let base = history
            .next_block_base_fee()
            .or_else(|| history.latest_block_base_fee())
            .unwrap_or(0);
        quote(base, history.reward.as_deref().unwrap_or(&[]), cap).map_err(Failure::rpc)
    }

    /// Forgets the cached nonce: the next send re-reads the node's `pending` count (after a
    /// rollback, the chain's count went back and the cached one would leave a gap).
    pub(super) async fn forget_nonce(&self) {
        *self.next_nonce.lock().await = None;
    }

    /// Signs `tx` (complete but for `from` and `nonce`) with the given `nonce`, already used by
    /// a pending transaction of ours, and sends it: a replacement. The cached nonce is left
    /// alone (the next send still takes the one after). `before` sees the hash before it is
    /// broadcast.
    pub(super) async fn replace(
        &self,
        provider: &DynProvider,
        tx: TransactionRequest,
        nonce: u64,
        rpc_timeout: Duration,
        before: Option<BeforeSend<'_>>,
    ) -> Result<B256, SendError> {
        let (hash, raw) = self.sign(tx, nonce, before).await?;
        match broadcast(provider, hash, &raw, rpc_timeout).await {
            Broadcast::Accepted => Ok(hash),
            Broadcast::NonceTaken(e) | Broadcast::Failed(e) => Err(e),
        }
    }

    /// Signs `tx` from the relayer with `nonce` and shows its hash to `before` (nothing is
    /// broadcast yet, so the nonce is still ours if that fails): the hash and the raw bytes.
    async fn sign(
        &self,
        tx: TransactionRequest,
        nonce: u64,
        before: Option<BeforeSend<'_>>,
    ) -> Result<(B256, Vec<u8>), SendError> {
        let envelope = tx
            .with_from(self.address)
            .with_nonce(nonce)
            .build(&self.wallet)
            .await
            .map_err(|e| SendError::Refused(Failure::rpc(e)))?;
        let hash = *envelope.tx_hash();
        if let Some(before) = before {
            before(hash)
                .await
                .map_err(|e| SendError::Refused(Failure::rpc(e)))?;
        }
        Ok((hash, envelope.encoded_2718()))
    }

    /// Signs `tx` (complete but for `from` and `nonce`) with the next nonce and sends it,
    /// returning its hash and nonce once the node accepted it. `before` sees each signed hash
    /// before it is broadcast.
    pub(super) async fn send(
        &self,
        provider: &DynProvider,
        tx: TransactionRequest,
        rpc_timeout: Duration,
        before: Option<BeforeSend<'_>>,
    ) -> Result<(B256, u64), SendError> {
        let mut next = self.next_nonce.lock().await;
        let mut retried = false;
        loop {
            let nonce = match *next {
                Some(n) => n,
                None => with_timeout(
                    rpc_timeout,
                    provider.get_transaction_count(self.address).pending(),
                )
                .await
                .map_err(SendError::Refused)?,
            };
            let after = following(nonce).map_err(|e| SendError::Refused(Failure::rpc(e)))?;
            let (hash, raw) = self.sign(tx.clone(), nonce, before).await?;
            match broadcast(provider, hash, &raw, rpc_timeout).await {
                Broadcast::Accepted => {
                    *next = Some(after);
                    return Ok((hash, nonce));
                }
                // The nonce is taken (the account was used elsewhere, or a dropped send got
                // through): re-read the pending count once.
                Broadcast::NonceTaken(_) if !retried => {
                    *next = None;
                    retried = true;
                }
                Broadcast::NonceTaken(e) | Broadcast::Failed(e) => {
                    *next = None;
                    return Err(e);
                }
            }
        }
    }
}

/// Broadcasts the signed transaction `raw` (hash `hash`) within `rpc_timeout`.
async fn broadcast(
    provider: &DynProvider,
    hash: B256,
    raw: &[u8],
    rpc_timeout: Duration,
) -> Broadcast {
    match tokio::time::timeout(rpc_timeout, provider.send_raw_transaction(raw)).await {
        Ok(Ok(_)) => Broadcast::Accepted,
        // The same bytes were already received (e.g. by a send that timed out).
        Ok(Err(e)) if revert::is_already_known(&e) => Broadcast::Accepted,
        Ok(Err(e)) => {
            let taken = revert::is_nonce_taken(&e);
            let e = match e {
                e @ alloy_json_rpc::RpcError::ErrorResp(_) => {
                    SendError::Refused(revert::classify(e))
                }
                e => SendError::Unknown {
                    hash,
                    source: Box::new(e),
                },
            };
            if taken {
                Broadcast::NonceTaken(e)
            } else {
                Broadcast::Failed(e)
            }
        }
        Err(elapsed) => Broadcast::Failed(SendError::Unknown {
            hash,
            source: Box::new(elapsed),
        }),
    }
}

/// What the node said to one broadcast.
enum Broadcast {
    /// Accepted, now or before.
    Accepted,
    /// Refused: the nonce is taken.
    NonceTaken(SendError),
    /// Refused otherwise, or no answer in time.
    Failed(SendError),
}

/// Awaits an RPC call for at most `limit`; a timeout is an RPC failure.
pub(super) async fn with_timeout<T>(
    limit: Duration,
    call: impl std::future::IntoFuture<Output = alloy_provider::transport::TransportResult<T>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, call.into_future()).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(revert::classify(e)),
        Err(elapsed) => Err(Failure::rpc(elapsed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GWEI: u128 = 1_000_000_000;

    #[test]
    fn fees_are_twice_the_base_plus_tip_under_the_cap() {
        let rewards = vec![vec![2 * GWEI]; 3];
        let fees = quote(10 * GWEI, &rewards, 100 * GWEI).expect("under the cap");
        assert_eq!(fees.max_priority_fee_per_gas, 2 * GWEI);
        assert_eq!(fees.max_fee_per_gas, 22 * GWEI);
        // Clamped to the cap while inclusion is still affordable.
        let fees = quote(10 * GWEI, &rewards, 15 * GWEI).expect("base + tip under the cap");
        assert_eq!(fees.max_fee_per_gas, 15 * GWEI);
        assert_eq!(fees.max_priority_fee_per_gas, 2 * GWEI);
        // Refused when base + tip is above the cap.
        assert!(quote(10 * GWEI, &rewards, 11 * GWEI).is_err());
    }

    #[test]
    fn the_tip_is_alloys_on_sane_values() {
        for rewards in [
            vec![],
            vec![vec![0]],
            vec![vec![3 * GWEI]],
            vec![vec![3], vec![4]],
            vec![
                vec![5 * GWEI],
                vec![0],
                vec![2 * GWEI],
                vec![7],
                vec![9 * GWEI],
            ],
            vec![vec![GWEI + 1], vec![3 * GWEI + 1]],
        ] {
            let alloy = alloy_provider::utils::eip1559_default_estimator(10 * GWEI, &rewards);
            assert_eq!(
                median_tip(&rewards),
                alloy.max_priority_fee_per_gas,
                "{rewards:?}"
            );
            let ours = quote(10 * GWEI, &rewards, u128::MAX).expect("no cap");
            assert_eq!(ours.max_fee_per_gas, alloy.max_fee_per_gas, "{rewards:?}");
        }
    }

    #[test]
    fn hostile_fee_history_is_refused_not_overflowed() {
        let before = crate::alert::count(Alert::HostileReply);
        let max = vec![vec![u128::MAX]; 4];
        // The tip alone: the middle two summed would overflow.
        assert_eq!(median_tip(&max), u128::MAX);
        // base + tip past u128: refused and raised, even without a cap.
        assert!(quote(u128::MAX, &max, u128::MAX).is_err());
        assert!(quote(1, &max, u128::MAX).is_err());
        assert!(crate::alert::count(Alert::HostileReply) >= before + 2);
        // 2 × base past u128 with base + tip still in range: clamped, not wrapped.
        let fees = quote(u128::MAX / 2 + 1, &[vec![1]], u128::MAX).expect("in range");
        assert_eq!(fees.max_fee_per_gas, u128::MAX);
        assert_eq!(fees.max_priority_fee_per_gas, 1);
    }

    #[test]
    fn a_nonce_at_its_limit_is_hostile() {
        let before = crate::alert::count(Alert::HostileReply);
        assert_eq!(following(7).expect("fine"), 8);
        assert!(following(u64::MAX).is_err());
        assert!(crate::alert::count(Alert::HostileReply) > before);
    }

    #[test]
    fn a_replacement_bumps_both_fees_by_an_eighth_under_the_cap() {
        let old = Fees {
            max_fee_per_gas: 8 * GWEI,
            max_priority_fee_per_gas: GWEI,
        };
        let new = bumped(old, None, 100 * GWEI).expect("room under the cap");
        assert_eq!(new.max_fee_per_gas, 9 * GWEI + 1);
        assert_eq!(new.max_priority_fee_per_gas, GWEI + GWEI / 8 + 1);
        // A higher market quote wins.
        let quote = Fees {
            max_fee_per_gas: 20 * GWEI,
            max_priority_fee_per_gas: 2 * GWEI,
        };
        assert_eq!(bumped(old, Some(quote), 100 * GWEI), Some(quote));
        // No room under the cap: no replacement (an underpriced one would be refused).
        assert_eq!(bumped(old, None, 9 * GWEI), None);
        // Hostile values saturate, never overflow.
        let max = Fees {
            max_fee_per_gas: u128::MAX,
            max_priority_fee_per_gas: u128::MAX,
        };
        assert_eq!(bumped(max, None, u128::MAX), Some(max));
    }

    #[test]
    fn empty_history_uses_the_minimum_tip() {
        let fees = quote(0, &[], GWEI).expect("under the cap");
        assert!(fees.max_priority_fee_per_gas >= 1);
        assert!(fees.max_fee_per_gas >= fees.max_priority_fee_per_gas);
    }
}
