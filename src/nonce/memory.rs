//! In-process nonce store: sharded, expiring, bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::{ClaimToken, NonceKey, NonceStore, Reservation, StoreError};
use crate::clock::{Clock, SystemClock};
use crate::store::sharded::{Shard, Sharded};

const SHARDS: usize = 64;

/// One entry: expiry and the holder's token, with "used" in the top bit of `token`.
///
/// Both fields are 32 bits so a slot is 88 bytes (80-byte key) plus one control byte; a hash
/// table is between 7/16 and 7/8 full, so an entry costs about 100 to 200 bytes (187 at one
/// million entries; `benches/store.rs` measures it).
#[derive(Clone, Copy)]
struct Entry {
    /// Seconds after the store's epoch (a day before its construction): 136 years of range.
    expires_at: u32,
    /// A 31-bit token: it only tells this holder from a later holder of the same key.
    token_and_used: u32,
}

const USED: u32 = 1 << 31;

/// A [`NonceStore`] in process memory: right for one instance, or for tests. Instances behind
/// a load balancer need a shared store (Redis).
///
/// Keys are spread over 64 mutex-guarded shards, so concurrent requests rarely contend.
/// Expired entries are swept as shards grow; `capacity` bounds the total, and a full store
/// refuses new payments with 503 rather than growing without limit.
///
/// ```
/// # tokio_test_block_on(async {
/// use tower_x402::nonce::{MemoryNonceStore, NonceKey, NonceStore, Reservation};
/// use tower_x402::primitives::{Address, B256};
/// let store = MemoryNonceStore::new();
/// let key = NonceKey { chain_id: 8453, asset: Address::ZERO, from: Address::ZERO, nonce: B256::ZERO };
/// let far = u64::MAX;
/// let Reservation::Reserved(token) = store.reserve(&key, far).await.unwrap() else { panic!() };
/// assert_eq!(store.reserve(&key, far).await.unwrap(), Reservation::InUse);
/// store.consume(&key, token).await.unwrap();
/// assert_eq!(store.reserve(&key, far).await.unwrap(), Reservation::Used);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryNonceStore {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Sharded<NonceKey, Entry, SHARDS>,
    clock: Arc<dyn Clock>,
    /// Expiries are stored as 32-bit offsets from this Unix time.
    epoch: u64,
    next_token: AtomicU64,
}

impl std::fmt::Debug for MemoryNonceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNonceStore")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl Default for MemoryNonceStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryNonceStore {
    /// Default capacity: one million live proofs (~190 MB when full).
    pub const DEFAULT_CAPACITY: usize = 1_000_000;

    /// A store with the default capacity on the system clock.
    pub fn new() -> Self {
        Self::with_capacity_and_clock(Self::DEFAULT_CAPACITY, SystemClock)
    }

    /// A store holding at most about `capacity` live entries, expiring them by `clock`.
    pub fn with_capacity_and_clock(capacity: usize, clock: impl Clock) -> Self {
        // A day back: a clock stepped backwards still finds its recent entries alive.
        let epoch = clock.now().saturating_sub(86_400);
        Self {
            inner: Arc::new(Inner {
                entries: Sharded::new(capacity, 1024),
                clock: Arc::new(clock),
                epoch,
                next_token: AtomicU64::new(1),
            }),
        }
    }

    /// The capacity (rounded up to a multiple of the shard count).
    pub fn capacity(&self) -> usize {
        self.inner.entries.capacity()
    }

    /// Entries held now, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every expired entry now (also done automatically as shards grow).
    pub fn sweep(&self) {
        let now = self.inner.offset(self.inner.clock.now());
        let min = self.inner.entries.min_sweep();
        self.inner.entries.for_each(|s| sweep(s, now, min));
    }

    fn update(&self, key: &NonceKey, token: ClaimToken, consume: bool) -> Result<(), StoreError> {
        let mut shard = self.inner.entries.shard(key);
        match shard.map.get_mut(key) {
            Some(e)
                if e.token_and_used & !USED == token_bits(token)
                    && e.token_and_used & USED == 0 =>
            {
                if consume {
                    e.token_and_used |= USED;
                } else {
                    shard.map.remove(key);
                }
                Ok(())
            }
            _ => Err(StoreError::NotHeld),
        }
    }
}

impl Inner {
    /// `at` as an offset from the epoch: earlier times are 0 (expired), later ones saturate
    /// (kept until the store's 136th year).
    fn offset(&self, at: u64) -> u32 {
        u32::try_from(at.saturating_sub(self.epoch)).unwrap_or(u32::MAX)
    }
}

fn token_bits(t: ClaimToken) -> u32 {
    (t.0 as u32) & !USED
}

fn sweep(shard: &mut Shard<NonceKey, Entry>, now: u32, min: usize) {
    shard.sweep(min, |_, e| e.expires_at > now);
}

impl MemoryNonceStore {
    fn reserve_sync(&self, key: &NonceKey, expires_at: u64) -> Result<Reservation, StoreError> {
        use alloy_primitives::map::hash_map::Entry as Slot;
        let now = self.inner.offset(self.inner.clock.now());
        let cap = self.inner.entries.capacity_per_shard();
        let mut shard = self.inner.entries.shard(key);
        if shard.sweep_due(cap) {
            sweep(&mut shard, now, self.inner.entries.min_sweep());
        }
        let full = shard.map.len() >= cap;
        let t = (self.inner.next_token.fetch_add(1, Ordering::Relaxed) as u32) & !USED;
        let entry = Entry {
            expires_at: self.inner.offset(expires_at),
            token_and_used: t,
        };
        // One hash lookup: either the live holder answers, or the slot is (re)claimed.
        match shard.map.entry(*key) {
            Slot::Occupied(mut e) if e.get().expires_at > now => {
                return Ok(if e.get_mut().token_and_used & USED != 0 {
                    Reservation::Used
                } else {
                    Reservation::InUse
                });
            }
            Slot::Occupied(mut e) => {
                e.insert(entry);
            }
            Slot::Vacant(_) if full => {
                return Err(StoreError::Full {
                    capacity: cap * SHARDS,
                });
            }
            Slot::Vacant(v) => {
                v.insert(entry);
            }
        }
        Ok(Reservation::Reserved(ClaimToken(u128::from(t))))
    }
}

/// Every answer is at hand: the `*_now` methods give it without a boxed future.
#[async_trait]
impl NonceStore for MemoryNonceStore {
    async fn reserve(&self, key: &NonceKey, expires_at: u64) -> Result<Reservation, StoreError> {
        self.reserve_sync(key, expires_at)
    }

    async fn consume(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError> {
        self.update(key, token, true)
    }

    async fn release(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError> {
        self.update(key, token, false)
    }

    fn reserve_now(
        &self,
        key: &NonceKey,
        expires_at: u64,
    ) -> Option<Result<Reservation, StoreError>> {
        Some(self.reserve_sync(key, expires_at))
    }

    fn consume_now(&self, key: &NonceKey, token: ClaimToken) -> Option<Result<(), StoreError>> {
        Some(self.update(key, token, true))
    }

    fn release_now(&self, key: &NonceKey, token: ClaimToken) -> Option<Result<(), StoreError>> {
        Some(self.update(key, token, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;
    use alloy_primitives::{Address, B256};

    fn key(i: u64) -> NonceKey {
        NonceKey {
            chain_id: 84532,
            asset: Address::ZERO,
            from: Address::repeat_byte(1),
            nonce: B256::from(alloy_primitives::U256::from(i)),
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn lifecycle() {
        block_on(async {
            let clock = FixedClock::new(1000);
            let s = MemoryNonceStore::with_capacity_and_clock(1000, clock.clone());
            let Reservation::Reserved(t) = s.reserve(&key(1), 1100).await.unwrap() else {
                panic!("first reserve must win")
            };
            assert_eq!(s.reserve(&key(1), 1100).await.unwrap(), Reservation::InUse);
            // A stranger's token changes nothing.
            assert!(matches!(
                s.release(&key(1), ClaimToken(t.0 + 1)).await,
                Err(StoreError::NotHeld)
            ));
            s.release(&key(1), t).await.unwrap();
            let Reservation::Reserved(t2) = s.reserve(&key(1), 1100).await.unwrap() else {
                panic!("released key is free again")
            };
            s.consume(&key(1), t2).await.unwrap();
            assert_eq!(s.reserve(&key(1), 1100).await.unwrap(), Reservation::Used);
            assert!(
                s.release(&key(1), t2).await.is_err(),
                "a used key cannot be released"
            );
            clock.set(1100);
            assert!(matches!(
                s.reserve(&key(1), 1200).await.unwrap(),
                Reservation::Reserved(_)
            ));
        });
    }

    #[test]
    fn bounded_and_evicting() {
        block_on(async {
            let clock = FixedClock::new(0);
            let s = MemoryNonceStore::with_capacity_and_clock(64 * 4, clock.clone());
            let mut full = 0;
            for i in 0..10_000 {
                match s.reserve(&key(i), 10).await {
                    Ok(Reservation::Reserved(_)) => {}
                    Err(StoreError::Full { .. }) => full += 1,
                    other => panic!("{other:?}"),
                }
            }
            assert!(full > 0 && s.len() <= s.capacity());
            clock.set(10);
            for i in 10_000..20_000 {
                // Filling the store: past its capacity a reserve may be refused, by design.
                let _ = s.reserve(&key(i), 20).await;
            }
            assert!(s.len() <= s.capacity(), "expired entries were evicted");
            s.sweep();
            clock.set(20);
            s.sweep();
            assert!(s.is_empty());
        });
    }
}
