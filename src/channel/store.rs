//! Channel state: what the server must remember per channel (the spec's "Per-Channel State"),
//! behind a small atomic trait so that several instances can share it.
//!
//! Two operations make it safe: a per-channel **lease** ([`ChannelStore::lock`]), so one
//! request at a time runs on a channel across every instance sharing the store (64 copies of
//! one voucher → one handler run, the others `channel_busy`), and a **compare-and-set commit**
//! ([`ChannelStore::commit`]) on the charged cumulative amount, so that even a request whose
//! lease expired mid-handler can never write over a newer charge. State is written only after
//! the handler succeeded: a failed handler leaves it unchanged and the same voucher can be
//! retried.
//!
//! Losing the latest voucher loses money (the server can only claim what it can show), so a
//! store must be durable to be used in production: [`MemoryChannelStore`] is not (a restart
//! forgets every unclaimed voucher); Redis with AOF `fsync always` or PostgreSQL are (issue #19
//! lists them; not here yet).

use std::borrow::Cow;
use std::sync::Mutex;

use alloy_primitives::map::B256Map;
use alloy_primitives::{B256, Bytes, U256};
use async_trait::async_trait;

use crate::proto::batch::ChannelConfig;
use crate::store::{ClaimToken, StoreError};

/// The server's record of one channel.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelState {
    /// The channel's immutable config.
    pub config: ChannelConfig,
    /// What the server actually charged so far (cumulative).
    pub charged_cumulative: u128,
    /// The ceiling of the latest voucher the client signed.
    pub signed_max_claimable: u128,
    /// That voucher's signature: what a claim needs.
    pub signature: Bytes,
    /// Mirrored from the chain: deposited minus withdrawn and refunded.
    pub balance: u128,
    /// Mirrored from the chain: claimed by the receiver so far.
    pub total_claimed: u128,
    /// Mirrored from the chain: when a timed withdrawal started (0: none).
    pub withdraw_requested_at: u64,
    /// Mirrored from the chain: the next `refundWithSignature` nonce.
    pub refund_nonce: U256,
    /// When the mirrored fields were read (Unix seconds).
    pub onchain_synced_at: u64,
    /// When the last paid request committed (Unix seconds).
    pub last_request_at: u64,
}

impl ChannelState {
    /// Unclaimed vouchers: charged but not yet claimed on chain.
    pub fn unclaimed(&self) -> u128 {
        self.charged_cumulative.saturating_sub(self.total_claimed)
    }
}

/// A held per-channel lease; give it back with [`ChannelStore::unlock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The channel.
    pub channel: B256,
    /// Proves who holds it.
    pub token: ClaimToken,
}

/// Per-channel state shared by the instances of a server. Every method is one atomic step
/// of the backend; there is no default built from a read and a write.
#[async_trait]
pub trait ChannelStore: Send + Sync + 'static {
    /// The channel's record, if any.
    async fn load(&self, channel: B256) -> Result<Option<ChannelState>, StoreError>;

    /// Takes the channel's lease for `seconds` by the store's own clock (a crashed holder
    /// blocks the channel no longer; the caller's clock never decides it). `None`: another
    /// holder has it.
    async fn lock(&self, channel: B256, seconds: u64) -> Result<Option<Lease>, StoreError>;

    /// Gives the lease back (a no-op if it expired and someone else took it).
    async fn unlock(&self, lease: Lease) -> Result<(), StoreError>;

    /// Writes `next` iff the stored charged cumulative amount is still `expected` (`None`:
    /// iff there is no record). `false`: someone else committed first, nothing written.
    async fn commit(
        &self,
        channel: B256,
        expected: Option<u128>,
        next: ChannelState,
    ) -> Result<bool, StoreError>;

    /// Deletes the record iff its charged cumulative amount is still `expected` (after a
    /// full refund). `false`: it changed or is gone.
    async fn remove(&self, channel: B256, expected: u128) -> Result<bool, StoreError>;

    /// Every channel with a record (for the claim manager).
    async fn list(&self) -> Result<Vec<B256>, StoreError>;

    /// True if other processes share this store. Default `false`.
    fn is_shared(&self) -> bool {
        false
    }

    /// [`Self::load`]'s answer at once, when this store needs no I/O for it (the memory
    /// store); `None`, the default, says to await `load`. The engine asks this first: an
    /// answer here saves `load`'s boxed future. Must agree with `load`.
    fn load_now(&self, channel: B256) -> Option<Result<Option<ChannelState>, StoreError>> {
        let _ = channel;
        None
    }

    /// [`Self::lock`] at once, as [`Self::load_now`]; `None` (the default): await `lock`,
    /// which then has not run.
    fn lock_now(&self, channel: B256, seconds: u64) -> Option<Result<Option<Lease>, StoreError>> {
        let _ = (channel, seconds);
        None
    }

    /// [`Self::unlock`] at once, as [`Self::load_now`]; `None` (the default): await
    /// `unlock`, which then has not run.
    fn unlock_now(&self, lease: Lease) -> Option<Result<(), StoreError>> {
        let _ = lease;
        None
    }

    /// [`Self::commit`] at once (of a copy of `next`), as [`Self::load_now`]; `None` (the
    /// default): await `commit`, which then has not run.
    fn commit_now(
        &self,
        channel: B256,
        expected: Option<u128>,
        next: &ChannelState,
    ) -> Option<Result<bool, StoreError>> {
        let _ = (channel, expected, next);
        None
    }
}

#[async_trait]
impl<T: ChannelStore + ?Sized> ChannelStore for std::sync::Arc<T> {
    async fn load(&self, channel: B256) -> Result<Option<ChannelState>, StoreError> {
        (**self).load(channel).await
    }
    async fn lock(&self, channel: B256, seconds: u64) -> Result<Option<Lease>, StoreError> {
        (**self).lock(channel, seconds).await
    }
    async fn unlock(&self, lease: Lease) -> Result<(), StoreError> {
        (**self).unlock(lease).await
    }
    async fn commit(
        &self,
        channel: B256,
        expected: Option<u128>,
        next: ChannelState,
    ) -> Result<bool, StoreError> {
        (**self).commit(channel, expected, next).await
    }
    async fn remove(&self, channel: B256, expected: u128) -> Result<bool, StoreError> {
        (**self).remove(channel, expected).await
    }
    async fn list(&self) -> Result<Vec<B256>, StoreError> {
        (**self).list().await
    }
    fn is_shared(&self) -> bool {
        (**self).is_shared()
    }
    fn load_now(&self, channel: B256) -> Option<Result<Option<ChannelState>, StoreError>> {
        (**self).load_now(channel)
    }
    fn lock_now(&self, channel: B256, seconds: u64) -> Option<Result<Option<Lease>, StoreError>> {
        (**self).lock_now(channel, seconds)
    }
    fn unlock_now(&self, lease: Lease) -> Option<Result<(), StoreError>> {
        (**self).unlock_now(lease)
    }
    fn commit_now(
        &self,
        channel: B256,
        expected: Option<u128>,
        next: &ChannelState,
    ) -> Option<Result<bool, StoreError>> {
        (**self).commit_now(channel, expected, next)
    }
}

/// In-process channel state: for tests and single-instance servers that accept losing
/// unclaimed vouchers on a restart (see the [module docs](self)).
#[derive(Default)]
pub struct MemoryChannelStore {
    inner: Mutex<Inner>,
    /// The clock the leases expire on (tests move it).
    clock: Option<std::sync::Arc<dyn crate::clock::Clock>>,
}

impl std::fmt::Debug for MemoryChannelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryChannelStore")
            .field("channels", &self.inner().states.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    // Keyed by channel id (a hash already): a fixed-bytes hasher, not SipHash.
    states: B256Map<ChannelState>,
    leases: B256Map<(ClaimToken, u64)>,
    /// The last lease token handed out.
    next_token: u128,
}

impl MemoryChannelStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose leases expire on `clock`.
    pub fn with_clock(clock: impl crate::clock::Clock + 'static) -> Self {
        Self {
            inner: Mutex::default(),
            clock: Some(std::sync::Arc::new(clock)),
        }
    }

    fn now(&self) -> u64 {
        match &self.clock {
            Some(c) => c.now(),
            None => crate::clock::Clock::now(&crate::clock::SystemClock),
        }
    }

    // A poisoned lock means a panic mid-update of plain maps: the data is still whole.
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MemoryChannelStore {
    fn load_held(&self, channel: B256) -> Option<ChannelState> {
        self.inner().states.get(&channel).cloned()
    }

    fn lock_held(&self, channel: B256, seconds: u64) -> Option<Lease> {
        let now = self.now();
        let expires_at = now.saturating_add(seconds.max(1));
        let mut inner = self.inner();
        if let Some((_, until)) = inner.leases.get(&channel)
            && *until > now
        {
            return None;
        }
        // Unique within this store is enough (no other process shares it), and a counter
        // costs no `getrandom` system call per request.
        inner.next_token = inner.next_token.wrapping_add(1);
        let token = ClaimToken(inner.next_token);
        inner.leases.insert(channel, (token, expires_at));
        Some(Lease { channel, token })
    }

    fn unlock_held(&self, lease: Lease) {
        let mut inner = self.inner();
        if inner
            .leases
            .get(&lease.channel)
            .is_some_and(|(t, _)| *t == lease.token)
        {
            inner.leases.remove(&lease.channel);
        }
    }

    /// `next` (copied only when it is written) iff the charged amount is still `expected`.
    fn commit_held(
        &self,
        channel: B256,
        expected: Option<u128>,
        next: Cow<'_, ChannelState>,
    ) -> bool {
        let mut inner = self.inner();
        if inner.states.get(&channel).map(|s| s.charged_cumulative) != expected {
            return false;
        }
        inner.states.insert(channel, next.into_owned());
        true
    }
}

#[async_trait]
impl ChannelStore for MemoryChannelStore {
    async fn load(&self, channel: B256) -> Result<Option<ChannelState>, StoreError> {
        Ok(self.load_held(channel))
    }

    async fn lock(&self, channel: B256, seconds: u64) -> Result<Option<Lease>, StoreError> {
        Ok(self.lock_held(channel, seconds))
    }

    async fn unlock(&self, lease: Lease) -> Result<(), StoreError> {
        self.unlock_held(lease);
        Ok(())
    }

    async fn commit(
        &self,
        channel: B256,
        expected: Option<u128>,
        next: ChannelState,
    ) -> Result<bool, StoreError> {
        Ok(self.commit_held(channel, expected, Cow::Owned(next)))
    }

    async fn remove(&self, channel: B256, expected: u128) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        if inner.states.get(&channel).map(|s| s.charged_cumulative) != Some(expected) {
            return Ok(false);
        }
        inner.states.remove(&channel);
        Ok(true)
    }

    async fn list(&self) -> Result<Vec<B256>, StoreError> {
        Ok(self.inner().states.keys().copied().collect())
    }

    fn load_now(&self, channel: B256) -> Option<Result<Option<ChannelState>, StoreError>> {
        Some(Ok(self.load_held(channel)))
    }

    fn lock_now(&self, channel: B256, seconds: u64) -> Option<Result<Option<Lease>, StoreError>> {
        Some(Ok(self.lock_held(channel, seconds)))
    }

    fn unlock_now(&self, lease: Lease) -> Option<Result<(), StoreError>> {
        self.unlock_held(lease);
        Some(Ok(()))
    }

    fn commit_now(
        &self,
        channel: B256,
        expected: Option<u128>,
        next: &ChannelState,
    ) -> Option<Result<bool, StoreError>> {
        Some(Ok(self.commit_held(channel, expected, Cow::Borrowed(next))))
    }
}

/// A whole record charged `charged`, stamped `now`: what the contract checks write and read.
#[cfg(any(test, feature = "test-util"))]
fn sample_state(charged: u128, now: u64) -> ChannelState {
    ChannelState {
        config: ChannelConfig {
            payer: alloy_primitives::Address::repeat_byte(1),
            payer_authorizer: alloy_primitives::Address::repeat_byte(1),
            receiver: alloy_primitives::Address::repeat_byte(2),
            receiver_authorizer: alloy_primitives::Address::repeat_byte(3),
            token: alloy_primitives::Address::repeat_byte(4),
            withdraw_delay: 900,
            salt: B256::ZERO,
        },
        charged_cumulative: charged,
        signed_max_claimable: charged,
        signature: Bytes::from(vec![7u8; 65]),
        balance: 1_000_000,
        total_claimed: 0,
        withdraw_requested_at: 0,
        refund_nonce: U256::ZERO,
        onchain_synced_at: now,
        last_request_at: now,
    }
}

/// The contract every [`ChannelStore`] must meet, as one async check: run it against a fresh
/// store (the memory store's unit test does; a Redis or PostgreSQL store's test should).
/// Leases are taken for `seconds`; `now` stamps the records; `advance(seconds)` moves the clock the
/// store's leases expire on (a Redis store: waits).
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub async fn conformance<S, F, Fut>(store: &S, now: u64, seconds: u64, advance: F)
where
    S: ChannelStore,
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let id = B256::repeat_byte(0xc1);
    let other = B256::repeat_byte(0xc2);
    let state = |charged: u128| sample_state(charged, now);
    assert_eq!(store.load(id).await.expect("load"), None, "fresh store");

    // Commit is a compare-and-set on the charged amount.
    assert!(store.commit(id, None, state(1000)).await.expect("commit"));
    assert!(
        !store.commit(id, None, state(5)).await.expect("commit"),
        "a second first commit must lose"
    );
    assert!(
        !store
            .commit(id, Some(999), state(2000))
            .await
            .expect("commit"),
        "a stale expected amount must lose"
    );
    assert!(
        store
            .commit(id, Some(1000), state(2000))
            .await
            .expect("commit")
    );
    assert_eq!(store.load(id).await.expect("load"), Some(state(2000)));
    assert_eq!(
        store.list().await.expect("list"),
        [id],
        "listed once committed"
    );
    assert_eq!(
        store.load(other).await.expect("load"),
        None,
        "keys are apart"
    );

    // One lease per channel, until it is given back or expires.
    let lease = store.lock(id, seconds).await.expect("lock").expect("free");
    assert!(
        store.lock(id, seconds).await.expect("lock").is_none(),
        "held"
    );
    let other_lease = store.lock(other, seconds).await.expect("lock");
    assert!(other_lease.is_some(), "another channel is not held");
    store.unlock(lease).await.expect("unlock");
    let again = store
        .lock(id, seconds)
        .await
        .expect("lock")
        .expect("free again");
    // A stale holder's unlock does not free the new holder's lease.
    store.unlock(lease).await.expect("unlock");
    assert!(
        store.lock(id, seconds).await.expect("lock").is_none(),
        "still held"
    );
    advance(seconds + 1).await;
    let taken_over = store.lock(id, 3 * seconds).await.expect("lock");
    assert!(taken_over.is_some(), "an expired lease can be taken over");
    store.unlock(again).await.expect("unlock");
    assert!(
        store.lock(id, 3 * seconds).await.expect("lock").is_none(),
        "the expired holder cannot free the new lease"
    );

    // Remove is a compare-and-delete.
    assert!(!store.remove(id, 1000).await.expect("remove"));
    assert!(store.remove(id, 2000).await.expect("remove"));
    assert_eq!(store.load(id).await.expect("load"), None);
    assert!(
        store.list().await.expect("list").is_empty(),
        "unlisted once removed"
    );
    assert!(
        !store.remove(id, 2000).await.expect("remove"),
        "already gone"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;

    #[tokio::test]
    async fn memory_store_meets_the_contract() {
        let clock = FixedClock::new(1_700_000_000);
        let store = MemoryChannelStore::with_clock(clock.clone());
        conformance(&store, 1_700_000_000, 30, |s| {
            clock.advance(s);
            std::future::ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn memory_store_answers_now_as_it_answers_later() {
        let store = MemoryChannelStore::with_clock(FixedClock::new(1_700_000_000));
        let id = B256::repeat_byte(0xc1);
        let mut state = sample_state(10, 0);
        let now = |r: Option<Result<bool, StoreError>>| r.expect("sync").expect("commit");
        assert_eq!(store.load_now(id).expect("sync").expect("load"), None);
        let lease = store
            .lock_now(id, 30)
            .expect("sync")
            .expect("lock")
            .expect("free");
        assert_eq!(
            store.lock(id, 30).await.expect("lock"),
            None,
            "held, seen later"
        );
        assert!(now(store.commit_now(id, None, &state)));
        let again = store.commit(id, None, state.clone()).await.expect("commit");
        assert!(!again, "a second first commit");
        assert_eq!(store.load(id).await.expect("load").as_ref(), Some(&state));
        state.charged_cumulative = 20;
        assert!(!now(store.commit_now(id, Some(5), &state)));
        assert!(now(store.commit_now(id, Some(10), &state)));
        assert_eq!(
            store.load_now(id).expect("sync").expect("load"),
            Some(state)
        );
        store.unlock_now(lease).expect("sync").expect("unlock");
        assert!(
            store.lock(id, 30).await.expect("lock").is_some(),
            "free, seen later"
        );
        assert!(
            store
                .lock_now(id, 30)
                .expect("sync")
                .expect("lock")
                .is_none(),
            "held, seen now"
        );
    }
}
