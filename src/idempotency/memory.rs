//! In-process idempotency store: sharded, expiring, bounded in entries and bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    Begin, ClaimToken, Fingerprint, IdempotencyKey, IdempotencyStore, StoreError, StoredResponse,
};
use crate::clock::{Clock, SystemClock};
use crate::store::sharded::{Shard, Sharded};

const SHARDS: usize = 16;

enum State {
    InProgress(ClaimToken),
    Done(Arc<StoredResponse>),
}

struct Entry {
    fingerprint: Fingerprint,
    expires_at: u64,
    state: State,
}

/// An [`IdempotencyStore`] in process memory: right for one instance, or for tests.
/// Instances behind a load balancer need a shared store
/// ([`RedisIdempotencyStore`][super::RedisIdempotencyStore]).
///
/// Bounded twice: at most `capacity` live ids (a full store answers `begin` with
/// [`StoreError::Full`], so the layer fails closed with 503) and at most `max_bytes` of stored
/// responses (a response beyond the budget is not stored: `complete` fails with
/// [`StoreError::Full`] and the layer forgets the id). Entries expire at the time `begin` asks
/// (from the layer: an hour past the authorization's `validBefore`), at most
/// [`max_ttl`](MemoryIdempotencyStore::with_max_ttl) (default 1 h) after `begin`: size
/// `capacity` for the ids of one `max_ttl`.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use tower_x402::idempotency::{Begin, Fingerprint, IdempotencyKey, IdempotencyStore,
///     MemoryIdempotencyStore, PaymentId};
/// use tower_x402::primitives::{Address, B256};
/// let store = MemoryIdempotencyStore::new();
/// let key = IdempotencyKey {
///     payer: Address::ZERO,
///     id: PaymentId::parse("pay_0123456789abcdef").unwrap(),
/// };
/// let fp = Fingerprint(B256::ZERO);
/// let far = u64::MAX;
/// let Begin::Started(token) = store.begin(&key, fp, far).await.unwrap() else { panic!() };
/// assert_eq!(store.begin(&key, fp, far).await.unwrap(), Begin::InProgress);
/// assert_eq!(store.begin(&key, Fingerprint(B256::repeat_byte(1)), far).await.unwrap(), Begin::Conflict);
/// store.abort(&key, token).await.unwrap();
/// assert!(matches!(store.begin(&key, fp, far).await.unwrap(), Begin::Started(_)));
/// # });
/// ```
///
#[derive(Clone)]
#[cfg_attr(
    not(feature = "redis"),
    doc = "[super::RedisIdempotencyStore]: https://docs.rs/tower-x402/latest/tower_x402/idempotency/struct.RedisIdempotencyStore.html"
)]
pub struct MemoryIdempotencyStore {
    inner: Arc<Inner>,
    max_ttl: u64,
}

struct Inner {
    entries: Sharded<IdempotencyKey, Entry, SHARDS>,
    max_bytes: usize,
    bytes: AtomicUsize,
    clock: Arc<dyn Clock>,
    next_token: AtomicU64,
}

impl std::fmt::Debug for MemoryIdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryIdempotencyStore")
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryIdempotencyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryIdempotencyStore {
    /// Default capacity: 100,000 live ids.
    pub const DEFAULT_CAPACITY: usize = 100_000;
    /// Default budget of stored responses: 64 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
    /// Default longest life of an entry.
    pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

    /// A store with the defaults, on the system clock.
    pub fn new() -> Self {
        Self::with_limits_and_clock(Self::DEFAULT_CAPACITY, Self::DEFAULT_MAX_BYTES, SystemClock)
    }

    /// A store holding at most about `capacity` ids and `max_bytes` of stored responses
    /// (as counted by [`StoredResponse::encoded_len`]), expiring them by `clock`.
    pub fn with_limits_and_clock(capacity: usize, max_bytes: usize, clock: impl Clock) -> Self {
        Self {
            inner: Arc::new(Inner {
                entries: Sharded::new(capacity, 256),
                max_bytes,
                bytes: AtomicUsize::new(0),
                clock: Arc::new(clock),
                next_token: AtomicU64::new(1),
            }),
            max_ttl: Self::DEFAULT_MAX_TTL.as_secs(),
        }
    }

    /// Sets the longest life of an entry (default 1 h; whole seconds, at least 1).
    pub fn with_max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = ttl.as_secs().max(1);
        self
    }

    /// Ids held now, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    /// True when no id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of stored responses held now.
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// Removes every expired entry now (also done as shards grow).
    pub fn sweep(&self) {
        let now = self.inner.clock.now();
        self.inner.entries.for_each(|s| self.sweep_shard(s, now));
    }

    fn sweep_shard(&self, shard: &mut Shard<IdempotencyKey, Entry>, now: u64) {
        let mut freed = 0;
        shard.sweep(self.inner.entries.min_sweep(), |_, e| {
            let keep = e.expires_at > now;
            if !keep && let State::Done(r) = &e.state {
                freed += r.encoded_len();
            }
            keep
        });
        self.inner.bytes.fetch_sub(freed, Ordering::Relaxed);
    }

    fn free(&self, entry: &Entry) {
        if let State::Done(r) = &entry.state {
            self.inner
                .bytes
                .fetch_sub(r.encoded_len(), Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn begin(
        &self,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        expires_at: u64,
    ) -> Result<Begin, StoreError> {
        let now = self.inner.clock.now();
        let cap = self.inner.entries.capacity_per_shard();
        let mut shard = self.inner.entries.shard(key);
        if let Some(e) = shard.map.get(key) {
            if e.expires_at > now {
                return Ok(if e.fingerprint != fingerprint {
                    Begin::Conflict
                } else {
                    match &e.state {
                        State::InProgress(_) => Begin::InProgress,
                        State::Done(r) => Begin::Done(Box::new((**r).clone())),
                    }
                });
            }
            if let Some(old) = shard.map.remove(key) {
                self.free(&old);
            }
        }
        if shard.sweep_due(cap) {
            self.sweep_shard(&mut shard, now);
        }
        if shard.map.len() >= cap {
            return Err(StoreError::Full {
                capacity: self.inner.entries.capacity(),
            });
        }
        let token = ClaimToken(u128::from(
            self.inner.next_token.fetch_add(1, Ordering::Relaxed),
        ));
        let ceiling = now.saturating_add(self.max_ttl);
        // An expiry already past still holds the id for a second: never a free-for-all.
        let expires_at = expires_at.min(ceiling).max(now.saturating_add(1));
        shard.map.insert(
            key.clone(),
            Entry {
                fingerprint,
                expires_at,
                state: State::InProgress(token),
            },
        );
        Ok(Begin::Started(token))
    }

    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: ClaimToken,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let mut shard = self.inner.entries.shard(key);
        let Some(e) = shard.map.get_mut(key) else {
            return Err(StoreError::NotHeld);
        };
        match &e.state {
            State::InProgress(t) if *t == token => {}
            // Completing again with the same response is a no-op (the trait's contract).
            State::Done(r) if **r == *response => return Ok(()),
            _ => return Err(StoreError::NotHeld),
        }
        let size = response.encoded_len();
        let reserved = self
            .inner
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(size).filter(|n| *n <= self.inner.max_bytes)
            })
            .is_ok();
        if !reserved {
            return Err(StoreError::Full {
                capacity: self.inner.max_bytes,
            });
        }
        e.state = State::Done(Arc::new(response.clone()));
        Ok(())
    }

    async fn abort(&self, key: &IdempotencyKey, token: ClaimToken) -> Result<(), StoreError> {
        let mut shard = self.inner.entries.shard(key);
        match shard.map.get(key) {
            Some(Entry {
                state: State::InProgress(t),
                ..
            }) if *t == token => {
                shard.map.remove(key);
                Ok(())
            }
            _ => Err(StoreError::NotHeld),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;
    use crate::idempotency::PaymentId;
    use alloy_primitives::{Address, B256};
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn key(i: u64) -> IdempotencyKey {
        IdempotencyKey {
            payer: Address::repeat_byte(1),
            id: PaymentId::parse(&format!("pay_{i:016}")).unwrap(),
        }
    }

    fn response(body: &'static [u8]) -> StoredResponse {
        StoredResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body),
            rejection: None,
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn lifecycle_expiry_and_budgets() {
        block_on(async {
            let clock = FixedClock::new(1000);
            let s = MemoryIdempotencyStore::with_limits_and_clock(1000, 100, clock.clone())
                .with_max_ttl(Duration::from_secs(60));
            let fp = Fingerprint(B256::repeat_byte(7));
            let other = Fingerprint(B256::repeat_byte(8));
            let Begin::Started(t) = s.begin(&key(1), fp, 5000).await.unwrap() else {
                panic!("first begin wins")
            };
            assert_eq!(s.begin(&key(1), fp, 5000).await.unwrap(), Begin::InProgress);
            assert_eq!(
                s.begin(&key(1), other, 5000).await.unwrap(),
                Begin::Conflict
            );
            let stranger = ClaimToken(t.0 + 1);
            assert!(
                s.complete(&key(1), stranger, &response(b"x"))
                    .await
                    .is_err()
            );
            assert!(s.abort(&key(1), stranger).await.is_err());
            s.complete(&key(1), t, &response(b"hello")).await.unwrap();
            assert_eq!(
                s.begin(&key(1), fp, 5000).await.unwrap(),
                Begin::Done(Box::new(response(b"hello")))
            );
            assert_eq!(
                s.begin(&key(1), other, 5000).await.unwrap(),
                Begin::Conflict
            );
            assert!(s.abort(&key(1), t).await.is_err(), "done is not aborted");
            // The byte budget: a second response that does not fit is refused.
            let Begin::Started(t2) = s.begin(&key(2), fp, 5000).await.unwrap() else {
                panic!()
            };
            let big = response(&[0u8; 90]);
            assert!(matches!(
                s.complete(&key(2), t2, &big).await,
                Err(StoreError::Full { .. })
            ));
            s.abort(&key(2), t2).await.unwrap();
            // Capped at max_ttl (60 s), not validBefore (5000).
            clock.set(1060);
            assert!(matches!(
                s.begin(&key(1), other, 5000).await.unwrap(),
                Begin::Started(_)
            ));
            assert_eq!(s.bytes(), 0, "the expired response was freed");
            clock.set(2000);
            s.sweep();
            assert!(s.is_empty());
        });
    }

    #[test]
    fn bounded_in_entries() {
        block_on(async {
            let s = MemoryIdempotencyStore::with_limits_and_clock(
                SHARDS * 2,
                1 << 20,
                FixedClock::new(0),
            );
            let fp = Fingerprint(B256::ZERO);
            let mut full = 0;
            for i in 0..1000 {
                match s.begin(&key(i), fp, 10).await {
                    Ok(Begin::Started(_)) => {}
                    Err(StoreError::Full { .. }) => full += 1,
                    other => panic!("{other:?}"),
                }
            }
            assert!(full > 0 && s.len() <= SHARDS * 2);
        });
    }
}
