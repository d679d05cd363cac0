//! Shared pieces of the channel tests (`batch-settlement`): an escrow that records deposits
//! and refunds (and can be told to fail), and the receiver authorizer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use tower_x402::channel::LocalAuthorizer;
use tower_x402::channel::serve::{CooperativeRefund, Escrow, EscrowChannel, EscrowError, Mirror};
use tower_x402::primitives::B256;
use tower_x402::proto::batch::Deposit;

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

/// The receiver authorizer of the channel tests: the crate's `LocalAuthorizer` with anvil #5's
/// key, signing claims and refunds.
pub fn authorizer() -> LocalAuthorizer {
    LocalAuthorizer::from_hex("0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba")
        .expect("anvil #5")
}
