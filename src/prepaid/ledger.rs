//! [`CreditLedger`]: what each payer has left of the bundles they bought.

use std::collections::HashMap;
use std::sync::Mutex;

use alloy_primitives::Address;
use async_trait::async_trait;

use crate::nonce::StoreError;

/// What one paid bundle adds to a payer's credit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Calls added (`None`: unlimited calls until `expires_at`).
    pub calls: Option<u64>,
    /// Unix seconds after which the credit is void (`None`: no time limit).
    pub expires_at: Option<u64>,
}

/// The answer to [`CreditLedger::debit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Debit {
    /// One call was taken; `remaining` calls are left (`None`: a time window, unlimited).
    Debited {
        /// Calls left after this one.
        remaining: Option<u64>,
    },
    /// The payer never bought credit here, or used it all.
    Exhausted,
    /// The payer's credit expired.
    Expired,
}

/// Prepaid credit per payer. Every method is one atomic step across the instances sharing the
/// ledger: concurrent debits never take more calls than were granted (no read-then-write).
///
/// One ledger sells one bundle: give each prepaid route its own ledger (or its own Redis
/// prefix), or credit bought on one route is spent on another.
#[async_trait]
pub trait CreditLedger: Send + Sync + 'static {
    /// Adds `grant` to `payer`'s credit at time `now`: calls add up, the expiry moves to the
    /// later of the two. Credit that had expired is replaced, not topped up.
    async fn grant(&self, payer: Address, grant: Grant, now: u64) -> Result<(), StoreError>;

    /// Takes one call from `payer` at time `now`.
    async fn debit(&self, payer: Address, now: u64) -> Result<Debit, StoreError>;

    /// Gives back one call taken by [`Self::debit`] (the handler failed, nothing was served).
    /// Does nothing for a time window or credit that is gone.
    async fn refund(&self, payer: Address) -> Result<(), StoreError>;

    /// True if other processes share this store (Redis, a database): the layer then
    /// requires a challenge key configured the same on every instance. Default `false`.
    fn is_shared(&self) -> bool {
        false
    }
}

#[async_trait]
impl<T: CreditLedger + ?Sized> CreditLedger for std::sync::Arc<T> {
    async fn grant(&self, payer: Address, grant: Grant, now: u64) -> Result<(), StoreError> {
        (**self).grant(payer, grant, now).await
    }
    async fn debit(&self, payer: Address, now: u64) -> Result<Debit, StoreError> {
        (**self).debit(payer, now).await
    }
    async fn refund(&self, payer: Address) -> Result<(), StoreError> {
        (**self).refund(payer).await
    }

    fn is_shared(&self) -> bool {
        (**self).is_shared()
    }
}

/// The largest call count a shared ledger stores, the same in Redis and PostgreSQL so both
/// answer alike: exact in a Lua number (a double; the Redis scripts saturate at it too), and
/// a sum of two fits a `BIGINT`.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) const MAX_CALLS: u64 = (1 << 53) - 1;
/// The largest Unix second a shared ledger stores (its milliseconds fit as [`MAX_CALLS`] does).
#[cfg(any(feature = "redis", feature = "postgres"))]
const MAX_SECS: u64 = MAX_CALLS / 1000;

#[cfg(any(feature = "redis", feature = "postgres"))]
impl Grant {
    /// This grant within the shared ledgers' caps.
    pub(crate) fn capped(self) -> Self {
        Self {
            calls: self.calls.map(|n| n.min(MAX_CALLS)),
            expires_at: self.expires_at.map(secs),
        }
    }
}

/// A Unix second within the shared ledgers' caps.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn secs(t: u64) -> u64 {
    t.min(MAX_SECS)
}

/// A payer's credit, as both ledgers keep it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Credit {
    calls: Option<u64>,
    expires_at: Option<u64>,
}

impl Credit {
    fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }

    /// `self` topped up with `grant`.
    fn add(self, grant: Grant, now: u64) -> Self {
        if self.expired(now) {
            return Self::from(grant);
        }
        Self {
            // A window (None) absorbs counted calls: unlimited stays unlimited.
            calls: match (self.calls, grant.calls) {
                (Some(a), Some(b)) => Some(a.saturating_add(b)),
                _ => None,
            },
            expires_at: match (self.expires_at, grant.expires_at) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            },
        }
    }
}

impl From<Grant> for Credit {
    fn from(g: Grant) -> Self {
        Self {
            calls: g.calls,
            expires_at: g.expires_at,
        }
    }
}

/// A [`CreditLedger`] in this process's memory (one instance; lost on restart).
///
/// One mutex guards the map: a debit is a lookup and a decrement, far cheaper than the
/// signature check before it, so the lock is never the bottleneck.
#[derive(Debug, Default)]
pub struct MemoryCreditLedger {
    credits: Mutex<HashMap<Address, Credit>>,
}

impl MemoryCreditLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Address, Credit>> {
        // A panic while holding the lock cannot leave a half-written entry (each write is one
        // assignment): the data is still consistent.
        self.credits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl CreditLedger for MemoryCreditLedger {
    async fn grant(&self, payer: Address, grant: Grant, now: u64) -> Result<(), StoreError> {
        let mut map = self.lock();
        // Bounded by paid grants, but keep it from holding dead entries forever.
        if map.len() >= SWEEP_AT {
            map.retain(|_, c| !c.expired(now) && c.calls != Some(0));
        }
        let credit = match map.get(&payer) {
            Some(c) => c.add(grant, now),
            None => Credit::from(grant),
        };
        map.insert(payer, credit);
        Ok(())
    }

    async fn debit(&self, payer: Address, now: u64) -> Result<Debit, StoreError> {
        let mut map = self.lock();
        let Some(credit) = map.get_mut(&payer) else {
            return Ok(Debit::Exhausted);
        };
        if credit.expired(now) {
            return Ok(Debit::Expired);
        }
        match credit.calls {
            None => Ok(Debit::Debited { remaining: None }),
            Some(0) => Ok(Debit::Exhausted),
            Some(n) => {
                credit.calls = Some(n - 1);
                Ok(Debit::Debited {
                    remaining: Some(n - 1),
                })
            }
        }
    }

    async fn refund(&self, payer: Address) -> Result<(), StoreError> {
        if let Some(Credit {
            calls: Some(n),
            expires_at: _,
        }) = self.lock().get_mut(&payer)
        {
            *n = n.saturating_add(1);
        }
        Ok(())
    }
}

/// Entries at which a grant first drops spent and expired credit.
const SWEEP_AT: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::address;

    const A: Address = address!("0x00000000000000000000000000000000000000aa");

    fn grant(calls: Option<u64>, expires_at: Option<u64>) -> Grant {
        Grant { calls, expires_at }
    }

    #[tokio::test]
    async fn calls_count_down_to_exhausted() {
        let l = MemoryCreditLedger::new();
        assert_eq!(l.debit(A, 0).await.unwrap(), Debit::Exhausted);
        l.grant(A, grant(Some(2), None), 0).await.unwrap();
        assert_eq!(
            l.debit(A, 0).await.unwrap(),
            Debit::Debited { remaining: Some(1) }
        );
        l.refund(A).await.unwrap();
        assert_eq!(
            l.debit(A, 0).await.unwrap(),
            Debit::Debited { remaining: Some(1) }
        );
        assert_eq!(
            l.debit(A, 0).await.unwrap(),
            Debit::Debited { remaining: Some(0) }
        );
        assert_eq!(l.debit(A, 0).await.unwrap(), Debit::Exhausted);
    }

    #[tokio::test]
    async fn windows_expire_and_top_ups_add() {
        let l = MemoryCreditLedger::new();
        l.grant(A, grant(None, Some(100)), 0).await.unwrap();
        assert_eq!(
            l.debit(A, 99).await.unwrap(),
            Debit::Debited { remaining: None }
        );
        assert_eq!(l.debit(A, 100).await.unwrap(), Debit::Expired);
        // Expired credit is replaced; live credit adds up and keeps the later expiry.
        l.grant(A, grant(Some(1), Some(300)), 200).await.unwrap();
        l.grant(A, grant(Some(2), Some(250)), 200).await.unwrap();
        assert_eq!(
            l.debit(A, 260).await.unwrap(),
            Debit::Debited { remaining: Some(2) }
        );
    }
}
