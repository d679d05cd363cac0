//! [`JournalQueue`]: the [`SettlementQueue`] of one process, on a local journal file (see
//! `journal.rs` for the file: group commit, torn tail, compaction, faults). The journal is
//! the durable truth; the live payments, their leases and backoff are kept in memory and
//! rebuilt from the file at open.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, U256};
use async_trait::async_trait;

use super::faults::JournalFaults as Faults;
use super::journal::{Journal, Record, StoredPayment};
use super::queue::{Appended, Exposure, Final, LeaseOwner, LeaseRequest, Leased, SettlementQueue};
use super::unix_ms;
use crate::alert::{Alert, alert};
use crate::nonce::NonceKey;
use crate::store::StoreError;
use crate::verify::VerifiedPayment;

/// After a failed compaction, the next try waits this long (the journal works meanwhile).
const COMPACT_RETRY: Duration = Duration::from_secs(60);

/// A payment in the journal, not final yet.
#[derive(Debug)]
struct Item {
    payment: VerifiedPayment,
    accepted_ms: u64,
    sent: Vec<B256>,
    /// Read back at open, or leased before: check the chain before sending.
    recovered: bool,
    attempts: u32,
    /// Backoff: not before this instant.
    not_before: Option<Instant>,
    /// Its journal append is in progress: not leasable yet.
    held: bool,
    /// Who holds it, until when.
    lease: Option<(LeaseOwner, Instant)>,
    /// Times it was leased.
    leases: u32,
}

impl Item {
    fn leasable(&self, now: Instant) -> bool {
        !self.held
            && self.lease.is_none_or(|(_, until)| until <= now)
            && self.not_before.is_none_or(|t| t <= now)
    }

    fn held_by(&self, owner: LeaseOwner, now: Instant) -> bool {
        self.lease
            .is_some_and(|(o, until)| o == owner && until > now)
    }
}

#[derive(Debug, Default)]
struct State {
    items: BTreeMap<u64, Item>,
    /// Nonce keys of `items`, appends in progress included.
    keys: HashSet<NonceKey>,
    /// Unsettled amounts per (token, payer).
    owed: HashMap<(Address, Address), U256>,
    next_id: u64,
}

impl State {
    fn insert(&mut self, id: u64, item: Item) {
        let p = &item.payment;
        self.keys.insert(p.nonce_key());
        let owed = self.owed.entry((p.asset, p.payer)).or_default();
        *owed = owed.saturating_add(p.amount);
        self.items.insert(id, item);
    }

    fn remove(&mut self, id: u64) -> Option<Item> {
        let item = self.items.remove(&id)?;
        let p = &item.payment;
        self.keys.remove(&p.nonce_key());
        if let Some(owed) = self.owed.get_mut(&(p.asset, p.payer)) {
            *owed = owed.saturating_sub(p.amount);
            if owed.is_zero() {
                self.owed.remove(&(p.asset, p.payer));
            }
        }
        Some(item)
    }
}

struct Inner {
    journal: Journal,
    state: Mutex<State>,
    path: PathBuf,
    compact_after: u64,
    /// Unix ms before which no compaction is tried (after a failed one).
    compact_not_before: AtomicU64,
    compacting: AtomicBool,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single insert/remove/field write: consistent after a panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The file journal as a [`SettlementQueue`]: **one process per file, on a local disk**.
/// What [`DeferredSettlerBuilder::journal`](super::DeferredSettlerBuilder::journal) opens.
///
/// An append is durable once the journal's `fdatasync` returns (shared by concurrent appends:
/// group commit); leases, backoff and the backlog count live in memory, so a lease never
/// outlives the process. A payment read back at open is leased with
/// [`Leased::recovered`] set, so its chain state is read before anything is resent.
/// A process lost with its disk loses the payments it accepted and had not settled: for
/// several instances, or disks that go with the instance, use a shared queue
/// (`PostgresSettlementQueue`).
#[derive(Clone)]
pub struct JournalQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JournalQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalQueue")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl JournalQueue {
    /// Opens (or creates) the journal at `path` and reads back what it holds; compacts it
    /// once it holds more than 10 000 records and more than twice the live ones.
    ///
    /// # Errors
    /// The file cannot be opened or read, or holds a record it cannot read (left as it is;
    /// see the [module docs](super)).
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        Self::open_with(path.as_ref(), 10_000, Faults::default())
    }

    pub(super) fn open_with(
        path: &Path,
        compact_after: u64,
        faults: Faults,
    ) -> std::io::Result<Self> {
        let (journal, live, next_id) = Journal::open(path, faults)?;
        let mut state = State {
            next_id,
            ..State::default()
        };
        for (id, entry) in live {
            state.insert(
                id,
                Item {
                    payment: entry.payment.to_payment(),
                    accepted_ms: entry.accepted_ms,
                    sent: entry.sent,
                    recovered: true,
                    attempts: 0,
                    not_before: None,
                    held: false,
                    lease: None,
                    leases: 0,
                },
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                journal,
                state: Mutex::new(state),
                path: path.to_owned(),
                compact_after,
                compact_not_before: AtomicU64::new(0),
                compacting: AtomicBool::new(false),
            }),
        })
    }

    /// Payments not final (appends in progress included).
    pub(super) fn len(&self) -> usize {
        self.inner.lock().items.len()
    }

    /// Compacts the journal in the background if it is due (raised on failure).
    fn compact_if_needed(&self) {
        let inner = &self.inner;
        let (records, live) = inner.journal.sizes();
        if records <= inner.compact_after
            || records <= (live as u64).saturating_mul(2)
            || unix_ms() < inner.compact_not_before.load(Ordering::Relaxed)
            || inner.compacting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let worker = inner.clone();
        // Blocking file I/O and syncs: off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = worker.journal.compact() {
                alert!(
                    Alert::JournalCompaction,
                    cause = &e,
                    "deferred: journal compaction failed ({records} records, {live} live); \
                     appends go on safely, the next try is in {}s",
                    COMPACT_RETRY.as_secs()
                );
                worker.compact_not_before.store(
                    unix_ms().saturating_add(COMPACT_RETRY.as_millis() as u64),
                    Ordering::Relaxed,
                );
            }
            worker.compacting.store(false, Ordering::Release);
        });
    }
}

fn unavailable(e: std::io::Error) -> StoreError {
    StoreError::Unavailable {
        retry_after: Some(Duration::from_secs(1)),
        source: Box::new(e),
    }
}

/// Releases a held payment to the worker when `append` is dropped mid-write (client gone):
/// the write goes on without it, and a payment in the journal must be leasable too. (Should
/// the write then fail, the worker still settles it, as for a handler that ran.)
struct Hold<'a> {
    inner: &'a Inner,
    id: u64,
    armed: bool,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(item) = self.inner.lock().items.get_mut(&self.id) {
            item.held = false;
            // Durable or not is unknown: read the chain before sending, like a recovered one.
            item.recovered = true;
        }
    }
}

#[async_trait]
impl SettlementQueue for JournalQueue {
    async fn append(
        &self,
        payment: &VerifiedPayment,
        accepted_ms: u64,
    ) -> Result<Appended, StoreError> {
        let inner = &self.inner;
        // Only EIP-3009 authorizations batch (the settler refuses others before this).
        let Some(stored) = StoredPayment::of(payment) else {
            return Err(StoreError::Unavailable {
                retry_after: None,
                source: "not an EIP-3009 payment: a deferred settler settles `exact` only".into(),
            });
        };
        let id = {
            let mut state = inner.lock();
            // One entry per authorization, even if a nonce store forgot it (restart).
            if state.keys.contains(&payment.nonce_key()) {
                return Ok(Appended::Duplicate);
            }
            // Ids come from the journal file: saturate rather than panic on a crafted one.
            let id = state.next_id;
            state.next_id = id.saturating_add(1);
            // Counted at once (its amount is owed), held from the worker until durable.
            state.insert(
                id,
                Item {
                    payment: payment.clone(),
                    accepted_ms,
                    sent: Vec::new(),
                    recovered: false,
                    attempts: 0,
                    not_before: None,
                    held: true,
                    lease: None,
                    leases: 0,
                },
            );
            id
        };
        let mut hold = Hold {
            inner,
            id,
            armed: true,
        };
        let record = Record::Pending {
            id,
            payment: Box::new(stored),
            accepted_ms,
        };
        let appended = inner.journal.append(&[record]).await;
        hold.armed = false;
        let mut state = inner.lock();
        if let Err(e) = appended {
            // Not accepted (raised by the journal as `journal_write`). The journal cuts the
            // failed write back, so a retry a moment later can land.
            state.remove(id);
            return Err(unavailable(e));
        }
        if let Some(item) = state.items.get_mut(&id) {
            item.held = false;
        }
        Ok(Appended::Accepted(id))
    }

    async fn exposure(&self, payment: &VerifiedPayment) -> Result<Exposure, StoreError> {
        let state = self.inner.lock();
        Ok(Exposure::new(
            state.items.len(),
            state
                .owed
                .get(&(payment.asset, payment.payer))
                .copied()
                .unwrap_or_default(),
            state.keys.contains(&payment.nonce_key()),
        ))
    }

    async fn lease(&self, req: LeaseRequest) -> Result<Vec<Leased>, StoreError> {
        let now = Instant::now();
        let until = now + req.ttl;
        let mut state = self.inner.lock();
        let due: Vec<u64> = state
            .items
            .iter()
            .filter(|(_, i)| i.leasable(now))
            .take(req.max)
            .map(|(id, _)| *id)
            .collect();
        let full = due.len() >= req.max;
        let mut out = Vec::with_capacity(due.len());
        for id in due {
            let Some(item) = state.items.get_mut(&id) else {
                continue;
            };
            // Leased before (a retry) or recovered: it has waited long enough.
            let recovered = item.recovered || item.leases > 0;
            if !full && !recovered && item.accepted_ms > req.ripe_ms {
                continue;
            }
            item.lease = Some((req.owner, until));
            item.leases = item.leases.saturating_add(1);
            out.push(Leased::new(
                id,
                item.payment.clone(),
                item.accepted_ms,
                item.sent.clone(),
                item.attempts,
                recovered,
            ));
        }
        Ok(out)
    }

    async fn sent(&self, owner: LeaseOwner, ids: &[u64], tx: B256) -> Result<(), StoreError> {
        {
            let state = self.inner.lock();
            let now = Instant::now();
            if !ids
                .iter()
                .all(|id| state.items.get(id).is_some_and(|i| i.held_by(owner, now)))
            {
                return Err(StoreError::NotHeld);
            }
        }
        self.inner
            .journal
            .append(&[Record::Sent {
                ids: ids.to_vec(),
                tx,
            }])
            .await
            .map_err(unavailable)?;
        let mut state = self.inner.lock();
        for id in ids {
            if let Some(item) = state.items.get_mut(id)
                && !item.sent.contains(&tx)
            {
                item.sent.push(tx);
            }
        }
        Ok(())
    }

    async fn finish(&self, outcomes: &[(u64, Final)]) -> Result<Vec<bool>, StoreError> {
        let records: Vec<Record> = {
            let state = self.inner.lock();
            outcomes
                .iter()
                .filter(|(id, _)| state.items.contains_key(id))
                .map(|(id, f)| match f {
                    Final::Settled { tx, gas_used } => Record::Settled {
                        id: *id,
                        tx: *tx,
                        gas_used: *gas_used,
                    },
                    Final::Failed { reason, tx } => Record::Failed {
                        id: *id,
                        reason: reason.clone(),
                        tx: *tx,
                    },
                })
                .collect()
        };
        if !records.is_empty() {
            self.inner
                .journal
                .append(&records)
                .await
                .map_err(unavailable)?;
        }
        let done = {
            let mut state = self.inner.lock();
            outcomes
                .iter()
                .map(|(id, _)| state.remove(*id).is_some())
                .collect()
        };
        self.compact_if_needed();
        Ok(done)
    }

    async fn renew(&self, owner: LeaseOwner, ids: &[u64], ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut state = self.inner.lock();
        let mut lost = false;
        for id in ids {
            match state.items.get_mut(id) {
                Some(item) if item.held_by(owner, now) => item.lease = Some((owner, now + ttl)),
                Some(_) => lost = true,
                // Final already: nothing to hold.
                None => {}
            }
        }
        if lost {
            return Err(StoreError::NotHeld);
        }
        Ok(())
    }

    async fn release(
        &self,
        owner: LeaseOwner,
        ids: &[u64],
        retry_in: Duration,
        failed: bool,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut state = self.inner.lock();
        for id in ids {
            if let Some(item) = state.items.get_mut(id)
                && item.lease.is_some_and(|(o, _)| o == owner)
            {
                item.lease = None;
                item.not_before = Some(now + retry_in);
                if failed {
                    item.attempts = item.attempts.saturating_add(1);
                }
            }
        }
        Ok(())
    }

    async fn pending(&self) -> Result<usize, StoreError> {
        Ok(self.inner.lock().items.len())
    }
}
