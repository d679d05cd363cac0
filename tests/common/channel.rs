//! Shared pieces of the channel tests (`batch-settlement`): an escrow that records deposits
//! and refunds (and can be told to fail), and a receiver authorizer from a local key.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use alloy_signer::SignerSync;
use async_trait::async_trait;
use tower_x402::channel::serve::{CooperativeRefund, Escrow, EscrowChannel, EscrowError, Mirror};
use tower_x402::channel::{self};
use tower_x402::primitives::{B256, Bytes};
use tower_x402::proto::batch::Deposit;
use tower_x402::test_util::PrivateKeySigner;

/// The deposit transaction the recording escrow reports.
pub const DEPOSIT_TX: B256 = B256::repeat_byte(0xde);
/// The refund transaction the recording escrow reports.
pub const REFUND_TX: B256 = B256::repeat_byte(0xef);

/// An escrow that records deposits and refunds and reports each channel's balance; can be
/// told to fail.
#[derive(Default)]
pub struct RecordingEscrow {
    pub deposits: AtomicUsize,
    pub balances: std::sync::Mutex<std::collections::HashMap<B256, u128>>,
    pub fail: AtomicBool,
    pub refunds: AtomicUsize,
}

#[async_trait]
impl Escrow for RecordingEscrow {
    async fn deposit(
        &self,
        channel: EscrowChannel<'_>,
        deposit: &Deposit,
    ) -> Result<Mirror, EscrowError> {
        let channel = channel.id;
        if self.fail.load(Ordering::SeqCst) {
            return Err(EscrowError("injected: the deposit reverted".into()));
        }
        self.deposits.fetch_add(1, Ordering::SeqCst);
        let mut balances = self.balances.lock().expect("lock");
        let balance = balances.entry(channel).or_default();
        *balance += u128::try_from(deposit.amount).expect("u128");
        Ok(Mirror {
            transaction: DEPOSIT_TX,
            balance: *balance,
            total_claimed: 0,
        })
    }

    async fn refund(
        &self,
        channel: EscrowChannel<'_>,
        refund: CooperativeRefund,
    ) -> Result<Mirror, EscrowError> {
        let (channel, claim, amount) = (channel.id, refund.claim, refund.amount);
        if self.fail.load(Ordering::SeqCst) {
            return Err(EscrowError("injected: the refund reverted".into()));
        }
        self.refunds.fetch_add(1, Ordering::SeqCst);
        let claimed = claim.map_or(0, |(c, _)| c.total_claimed);
        let mut balances = self.balances.lock().expect("lock");
        let balance = balances.entry(channel).or_default();
        *balance = balance
            .checked_sub(amount)
            .expect("the engine refunds what the channel holds");
        Ok(Mirror {
            transaction: REFUND_TX,
            balance: *balance,
            total_claimed: claimed,
        })
    }
}

/// The receiver authorizer's key (anvil #5), signing claims and refunds.
pub struct KeyAuthorizer(pub PrivateKeySigner);

impl channel::ReceiverAuthorizer for KeyAuthorizer {
    fn sign_digest(&self, digest: B256) -> Result<Bytes, tower_x402::store::BoxError> {
        Ok(Bytes::from(
            self.0.sign_hash_sync(&digest)?.as_bytes().to_vec(),
        ))
    }
}
