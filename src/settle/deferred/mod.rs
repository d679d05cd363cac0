//! Deferred settlement: answer the paid request as soon as the payment is **journaled**, and
//! settle it on-chain later, in batches.
//!
//! [`DeferredSettler`] is an ordinary [`Settler`], so a layer picks it with
//! [`.settler(..)`](crate::PaymentLayerBuilder::settler) in either
//! [`SettlementMode`](super::SettlementMode) (no extra mode is needed: deferring is what the
//! settler does, not when the layer calls it):
//!
//! - [`check`](Settler::check) (before the handler) refuses a proof whose nonce is already in
//!   the journal, then asks the inner [`BatchSettler`] to pre-check it on-chain: nonce unused,
//!   and a balance that covers this payment **plus** what the payer already owes in journaled,
//!   unsettled payments of the same token.
//! - [`settle`](Settler::settle) appends the payment to the journal, waits for the journal's
//!   `fdatasync` (shared by all concurrent appends: group commit, see `journal.rs`), and returns
//!   at once. **Its [`Settlement::transaction`] is `None`**: no transaction exists yet, so the
//!   receipt header carries `success: true` and an empty `transaction` — the same shape as
//!   verify-only receipts. The final outcome (with the hash) goes to the
//!   [outcome hook](DeferredSettlerBuilder::on_outcome).
//! - A background worker (a tokio task) takes journaled payments oldest first and settles up to
//!   [`max_batch`](DeferredSettlerBuilder::max_batch) of them at once through
//!   [`BatchSettler::settle_batch`] (for [`OnchainSettler`][super::onchain::OnchainSettler]:
//!   one Multicall3 `aggregate3` transaction), as soon as the batch is full or its oldest
//!   payment waited [`max_wait`](DeferredSettlerBuilder::max_wait). A failed round (RPC down)
//!   is retried with exponential backoff ([`retry`](DeferredSettlerBuilder::retry)); the
//!   payments stay journaled meanwhile, across restarts too.
//!
//! # Exactly once
//!
//! Each journal record moves `pending → sent(tx) → settled(tx) | failed(reason)`. The `sent`
//! record is written (and synced) **before** its transaction is broadcast. On start the
//! journal is replayed and, before anything is resent, each recovered payment's chain state is
//! read through [`BatchSettler::state`]: a known transaction that carried it (receipt with the
//! token's `AuthorizationUsed` log) or `authorizationState(from, nonce)` used → settled, never
//! sent again; a transaction the node still holds unmined → waited for; otherwise it is sent.
//! The token itself enforces one use per authorization, so even a resend after a lost `sent`
//! record could not move the money twice: at worst it would waste one reverted call.
//!
//! # When the RPC is down
//!
//! - At request time: the pre-check cannot run, so the layer answers **503** with
//!   `Retry-After` and the handler does not run (nothing is journaled).
//! - After journaling: the payment was accepted and stays in the journal; the worker retries
//!   with backoff (from 1 s, doubling, up to 5 min by default) until the RPC answers, then
//!   settles it. Payments whose authorization expires meanwhile (`validBefore`) fail with
//!   the token's reason: that is the risk deferring takes, and why the retry ceiling is short
//!   next to the usual validity window.
//!
//! # When the journal fails
//!
//! Every failure is raised through [`alert`](crate::alert) (counted, logged without any
//! feature, a metric with `metrics`); none stops the settler for good.
//!
//! - A write or `fdatasync` fails on a request's append: that payment is **not accepted**.
//!   The layer answers **503** with `Retry-After` and a failed receipt, withholds the
//!   handler's answer and releases the proof, so the client may send it again unchanged
//!   ([`Alert::JournalWrite`](crate::alert::Alert::JournalWrite)). The journal cuts the failed
//!   bytes back by itself; the next append works if the disk does.
//! - The worker's `sent` record fails: nothing is broadcast; the round is retried with backoff
//!   ([`Alert::SettlementRetry`](crate::alert::Alert::SettlementRetry)), as are failed
//!   rounds, chain reads and final records that could not be journaled (those payments are
//!   read from the chain again before anything is resent).
//! - Compaction fails ([`Alert::JournalCompaction`](crate::alert::Alert::JournalCompaction)):
//!   before its rename, the old file stays; after it (the directory sync), the new file is
//!   used and the next append syncs the directory before it is acknowledged. Appends never go
//!   to a replaced file. The next try is a minute later.
//! - At start, a record that checks out but cannot be read (a downgrade), or damage followed
//!   by valid records, makes [`start`](DeferredSettlerBuilder::start) fail with
//!   [`DeferredError::Journal`] naming the byte offset
//!   ([`Alert::JournalUnreadable`](crate::alert::Alert::JournalUnreadable)); the file is left
//!   as it is. Only a torn tail (a crash mid-write, never acknowledged) is cut.
//!
//! Tests inject each of these with [`JournalFaults`] (the `test-util` feature).
//!
//! # Risks you take by deferring
//!
//! The handler's answer goes out before the money moves. The pre-check makes a refusal
//! unlikely, but a payer can still empty the wallet (or cancel the authorization) before the
//! worker settles, and concurrent first requests of one payer are checked against the same
//! balance. Such payments end `failed` in the outcome hook.
//!
//!
#![cfg_attr(
    not(feature = "test-util"),
    doc = "[`JournalFaults`]: https://docs.rs/tower-x402/latest/tower_x402/settle/deferred/struct.JournalFaults.html"
)]
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[super::onchain::OnchainSettler]: https://docs.rs/tower-x402/latest/tower_x402/settle/onchain/struct.OnchainSettler.html"
)]

mod faults;
mod journal;
mod worker;

#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub use self::faults::JournalFaults;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256, U256};
use async_trait::async_trait;
use tokio::sync::{Notify, watch};

use self::faults::JournalFaults as Faults;
use self::journal::{Journal, Record, StoredPayment};
use super::{SettleError, Settlement, Settler};
use crate::nonce::NonceKey;
use crate::reason;
use crate::verify::{BoxError, VerifiedPayment};

/// A settler that settles many payments at once and reads where one stands on-chain: the
/// back end of a [`DeferredSettler`]. [`OnchainSettler`][super::onchain::OnchainSettler]
/// implements it (with the `onchain` feature) through Multicall3.
///
#[cfg_attr(
    not(feature = "onchain"),
    doc = "[super::onchain::OnchainSettler]: https://docs.rs/tower-x402/latest/tower_x402/settle/onchain/struct.OnchainSettler.html"
)]
#[async_trait]
pub trait BatchSettler: Send + Sync + 'static {
    /// Checks before the handler that `payment` can settle, given that its payer already owes
    /// `owed` of the same token in journaled payments not settled yet.
    async fn check(&self, payment: &VerifiedPayment, owed: U256) -> Result<(), SettleError>;

    /// Settles `payments` in as few transactions as it can and returns one result per payment,
    /// in order. Before broadcasting a transaction it must call [`SendLog::sending`] with the
    /// transaction's hash and the indices (into `payments`) it carries, and not broadcast if
    /// that fails. A payment that was not sent is [`SettleError::Unavailable`], one whose
    /// outcome is unknown [`SettleError::Unknown`]; either is [reconciled](Self::state) before
    /// any resend.
    async fn settle_batch(
        &self,
        payments: &[VerifiedPayment],
        log: &dyn SendLog,
    ) -> Vec<Result<Settled, SettleError>>;

    /// Where `payment` stands on-chain; `sent` are the transactions that may carry it.
    async fn state(
        &self,
        payment: &VerifiedPayment,
        sent: &[B256],
    ) -> Result<ChainState, SettleError>;
}

#[async_trait]
impl<T: BatchSettler + ?Sized> BatchSettler for Arc<T> {
    async fn check(&self, payment: &VerifiedPayment, owed: U256) -> Result<(), SettleError> {
        (**self).check(payment, owed).await
    }
    async fn settle_batch(
        &self,
        payments: &[VerifiedPayment],
        log: &dyn SendLog,
    ) -> Vec<Result<Settled, SettleError>> {
        (**self).settle_batch(payments, log).await
    }
    async fn state(
        &self,
        payment: &VerifiedPayment,
        sent: &[B256],
    ) -> Result<ChainState, SettleError> {
        (**self).state(payment, sent).await
    }
}

/// Where a [`BatchSettler`] records a transaction before broadcasting it.
#[async_trait]
pub trait SendLog: Send + Sync {
    /// `transaction` is about to be broadcast carrying `payments` (indices into the batch).
    /// Returns once that is durable; an error means: do not broadcast.
    async fn sending(&self, transaction: B256, payments: &[usize]) -> Result<(), BoxError>;
}

/// A settled payment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settled {
    /// The transaction that moved the money, when known.
    pub transaction: Option<B256>,
    /// This payment's share of that transaction's gas (the gas used divided by the payments
    /// it settled), when known.
    pub gas_used: Option<u64>,
}

impl Settled {
    /// A settled payment.
    pub fn new(transaction: Option<B256>, gas_used: Option<u64>) -> Self {
        Self {
            transaction,
            gas_used,
        }
    }
}

/// A payment's on-chain state, as [`BatchSettler::state`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainState {
    /// The authorization is used: the money moved.
    Settled(Settled),
    /// A transaction that carries it is known to the node and not mined yet: wait.
    InFlight(B256),
    /// Unused and nothing in flight: safe to send.
    Unused,
}

/// A payment's final outcome, reported to the [outcome hook](DeferredSettlerBuilder::on_outcome).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcome {
    /// The journal id.
    pub id: u64,
    /// Who paid.
    pub payer: Address,
    /// The token.
    pub asset: Address,
    /// Who was paid.
    pub pay_to: Address,
    /// Atomic units.
    pub amount: U256,
    /// The authorization nonce.
    pub nonce: B256,
    /// The transaction that settled it, or the one that failed to.
    pub transaction: Option<B256>,
    /// Its share of the transaction's gas, when known.
    pub gas_used: Option<u64>,
    /// Settled, or failed with a reason.
    pub status: OutcomeStatus,
    /// From journaling to this outcome (across restarts: wall-clock time).
    pub latency: Duration,
}

/// Whether a deferred payment settled.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutcomeStatus {
    /// The money moved.
    Settled,
    /// It never will; the x402 reason code.
    Failed(String),
}

impl Outcome {
    /// True when the money moved.
    pub fn is_settled(&self) -> bool {
        self.status == OutcomeStatus::Settled
    }
}

/// Why a [`DeferredSettler`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeferredError {
    /// The journal could not be opened or read.
    #[error("journal {path}: {source}")]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No journal path was given.
    #[error("no journal path: call .journal(path)")]
    NoJournal,
    /// Not called inside a tokio runtime (the worker is a tokio task).
    #[error("DeferredSettler must start inside a tokio runtime")]
    NoRuntime,
}

type Hook = Arc<dyn Fn(&Outcome) + Send + Sync>;

/// Builds a [`DeferredSettler`]. See the [module docs](self).
#[must_use]
pub struct DeferredSettlerBuilder {
    batch: Arc<dyn BatchSettler>,
    journal: Option<PathBuf>,
    max_batch: usize,
    max_wait: Duration,
    retry: (Duration, Duration),
    compact_after: u64,
    precheck: bool,
    max_pending: Option<usize>,
    in_flight: usize,
    hook: Option<Hook>,
    faults: Faults,
}

impl std::fmt::Debug for DeferredSettlerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredSettlerBuilder")
            .field("journal", &self.journal)
            .field("max_batch", &self.max_batch)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl DeferredSettlerBuilder {
    /// The journal file (created if missing; required). One process per file.
    pub fn journal(mut self, path: impl AsRef<Path>) -> Self {
        self.journal = Some(path.as_ref().to_owned());
        self
    }

    /// Most payments per settlement transaction (default 32; at least 1). 1 settles each
    /// payment with its own `transferWithAuthorization`.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// Longest a payment waits for its batch to fill before it is sent anyway (default 2 s).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// First and longest wait between retries of a failed round (default 1 s and 5 min; the
    /// wait doubles per failure).
    pub fn retry(mut self, first: Duration, max: Duration) -> Self {
        self.retry = (first, max.max(first));
        self
    }

    /// Compact the journal once it holds more than this many records and more than twice the
    /// live ones (default 10 000).
    pub fn compact_after(mut self, records: u64) -> Self {
        self.compact_after = records;
        self
    }

    /// Whether [`check`](Settler::check) asks the chain before the handler runs (default on).
    /// Off, a paid request costs no RPC round trip at all (verification and the journal's
    /// sync only), and a proof is refused before the handler only when its nonce is already
    /// journaled: a payer without the funds, or whose authorization is already used on-chain,
    /// is served and the payment fails later in the worker. For sellers who price that risk
    /// in (tiny prices, known payers).
    pub fn precheck(mut self, on: bool) -> Self {
        self.precheck = on;
        self
    }

    /// Refuses new payments while this many are journaled and not final yet (default: no
    /// limit): [`check`](Settler::check) answers unavailable, the layer 503 with
    /// `Retry-After: 1`, the handler does not run and the client keeps its proof.
    ///
    /// Backpressure for when requests arrive faster than the chain settles them: a payment
    /// must settle before its `validBefore` (`maxTimeoutSeconds`, 300 s by default, after the
    /// client signed it), or the seller served it for nothing. Size it below what the worker
    /// settles in that time: on a local anvil the load harness measured about 220 settled
    /// payments per second in batches of 32 while accepting 7,600 per second, a backlog that
    /// `max_pending(50_000)` would have held to what drains in under four minutes.
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = Some(n);
        self
    }

    /// Most settlement rounds (batch transactions) in flight at once (default 1; at least 1).
    ///
    /// With one, the worker sends a batch and waits for its receipt before it sends the next:
    /// it uses at most one transaction per block, so it settles at most `max_batch` payments
    /// per block (batches of 32 and 2 s blocks: ~16 payments/s), whatever the chain could
    /// take. With `n`, up to `n` rounds run at once on disjoint payments (no payment is ever
    /// in two rounds), so up to `n` batches can land in one block. An
    /// [`OnchainSettler`][super::onchain::OnchainSettler] hands concurrent sends consecutive
    /// relayer nonces; a [`BatchSettler`] of your own must be safe to call concurrently.
    /// Each round still waits `max_wait` for a full batch, and the backlog bound
    /// ([`max_pending`](Self::max_pending)) is unchanged.
    pub fn in_flight(mut self, n: usize) -> Self {
        self.in_flight = n.max(1);
        self
    }

    /// Called with each payment's final outcome, from the worker task (keep it quick: send it
    /// to a channel for anything slow).
    pub fn on_outcome(mut self, hook: impl Fn(&Outcome) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Makes the journal's writes, syncs, compaction rename and directory syncs fail on
    /// command (test builds only: the `test-util` feature). See [`JournalFaults`].
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn journal_faults(mut self, faults: JournalFaults) -> Self {
        self.faults = faults;
        self
    }

    /// Opens the journal, recovers what it holds, and starts the worker.
    ///
    /// # Errors
    /// See [`DeferredError`].
    pub fn start(self) -> Result<DeferredSettler, DeferredError> {
        let path = self.journal.ok_or(DeferredError::NoJournal)?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| DeferredError::NoRuntime)?;
        let (journal, live, next_id) =
            Journal::open(&path, self.faults).map_err(|source| DeferredError::Journal {
                path: path.clone(),
                source,
            })?;
        let mut state = State {
            next_id,
            ..State::default()
        };
        // Recovered payments have waited long enough: due at once.
        let due = Instant::now()
            .checked_sub(self.max_wait)
            .unwrap_or_else(Instant::now);
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
                    queued: due,
                    held: false,
                    in_round: false,
                },
            );
        }
        let (pending, _) = watch::channel(state.items.len());
        let shared = Arc::new(Shared {
            batch: self.batch,
            journal,
            state: Mutex::new(state),
            wake: Notify::new(),
            pending,
            config: Config {
                max_batch: self.max_batch,
                max_wait: self.max_wait,
                retry: self.retry,
                compact_after: self.compact_after,
                precheck: self.precheck,
                max_pending: self.max_pending,
                in_flight: self.in_flight,
            },
            hook: self.hook,
        });
        let worker = runtime.spawn(worker::run(shared.clone()));
        Ok(DeferredSettler {
            shared: shared.clone(),
            _stop: Arc::new(StopOnDrop { shared, worker }),
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Config {
    max_batch: usize,
    max_wait: Duration,
    retry: (Duration, Duration),
    compact_after: u64,
    precheck: bool,
    max_pending: Option<usize>,
    in_flight: usize,
}

/// A payment in the journal, not final yet.
#[derive(Debug)]
struct Item {
    payment: VerifiedPayment,
    accepted_ms: u64,
    sent: Vec<B256>,
    /// Read back from the journal at start: check the chain before sending.
    recovered: bool,
    attempts: u32,
    /// Backoff: not before this instant.
    not_before: Option<Instant>,
    /// When it entered this process's queue (for `max_wait`).
    queued: Instant,
    /// Its journal append is in progress: not the worker's yet.
    held: bool,
    /// A round holds it: no other round may take it.
    in_round: bool,
}

/// What the request path and the worker share.
#[derive(Debug, Default)]
struct State {
    items: BTreeMap<u64, Item>,
    /// Nonce keys of `items`, and of appends in progress.
    keys: HashSet<NonceKey>,
    /// Journaled, unsettled amounts per (token, payer).
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

struct Shared {
    batch: Arc<dyn BatchSettler>,
    journal: Journal,
    state: Mutex<State>,
    /// New work, or a flush request.
    wake: Notify,
    /// Payments not final yet.
    pending: watch::Sender<usize>,
    config: Config,
    hook: Option<Hook>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single insert/remove: consistent even after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops the worker when the last handle goes.
struct StopOnDrop {
    shared: Arc<Shared>,
    worker: tokio::task::JoinHandle<()>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        // Like a crash, which the journal is built for: whatever is pending waits for the
        // next start, and a round cut short is reconciled then.
        self.worker.abort();
        // Nothing to flush: every acknowledged payment is already in the journal.
        let _ = &self.shared;
    }
}

/// Accepts verified payments into a durable journal and settles them later, in batches. Cheap
/// to clone; the worker stops when the last clone is dropped (journaled payments wait for the
/// next start). See the [module docs](self).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use alloy_signer_local::PrivateKeySigner;
/// use tower_x402::settle::deferred::DeferredSettler;
/// use tower_x402::settle::onchain::OnchainSettler;
/// use tower_x402::{Network, PaymentLayer};
/// # let pay_to = tower_x402::primitives::Address::repeat_byte(1);
/// let relayer: PrivateKeySigner = std::env::var("RELAYER_KEY")?.parse()?;
/// let chain = OnchainSettler::connect("https://sepolia.base.org", relayer).await?;
/// let settler = DeferredSettler::builder(chain)
///     .journal("/var/lib/my-api/x402.journal")
///     .max_batch(50)
///     .max_wait(Duration::from_secs(5))
///     .on_outcome(|o| eprintln!("{} paid {}: {:?} in {:?}", o.payer, o.amount, o.status, o.transaction))
///     .start()?;
/// let layer = PaymentLayer::builder()
///     .pay_to(pay_to)
///     .price("$0.001")
///     .network(Network::BASE_SEPOLIA)
///     .settler(settler)
///     .build()?;
/// # let _ = layer; Ok(()) }
/// ```
#[derive(Clone)]
pub struct DeferredSettler {
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

impl std::fmt::Debug for DeferredSettler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredSettler")
            .field("pending", &self.pending())
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl DeferredSettler {
    /// A builder settling through `batch`. Defaults: batches of up to 32, 2 s max wait,
    /// retries from 1 s to 5 min, compaction after 10 000 records.
    pub fn builder(batch: impl BatchSettler) -> DeferredSettlerBuilder {
        DeferredSettlerBuilder {
            batch: Arc::new(batch),
            journal: None,
            max_batch: 32,
            max_wait: Duration::from_secs(2),
            retry: (Duration::from_secs(1), Duration::from_secs(300)),
            compact_after: 10_000,
            precheck: true,
            max_pending: None,
            in_flight: 1,
            hook: None,
            faults: Faults::default(),
        }
    }

    /// Payments journaled and not final yet.
    pub fn pending(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// Asks the worker to send what is due now, without waiting for a full batch.
    pub fn flush(&self) {
        let mut state = self.shared.lock();
        let due = Instant::now()
            .checked_sub(self.shared.config.max_wait)
            .unwrap_or_else(Instant::now);
        for item in state.items.values_mut() {
            item.queued = item.queued.min(due);
        }
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Resolves once no payment is pending (immediately if none is).
    pub async fn idle(&self) {
        let mut rx = self.shared.pending.subscribe();
        // Errs only when the sender is gone, which `self` prevents: nothing to report.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// Why [`DeferredSettler::check`] refused with a full backlog ([`DeferredSettlerBuilder::max_pending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{pending} payments wait for settlement: the backlog is full")]
pub struct Backlog {
    /// Payments journaled and not final.
    pub pending: usize,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[async_trait]
impl Settler for DeferredSettler {
    async fn check(&self, payment: &VerifiedPayment) -> Result<(), SettleError> {
        if payment.is_upto() {
            // Batches are Multicall3 calls, and the upto proxy takes only the signed
            // facilitator as sender: settle `upto` with an `OnchainSettler`.
            return Err(SettleError::Refused {
                reason: crate::reason::UNSUPPORTED_SCHEME,
                transaction: None,
            });
        }
        if let Some((_, signature)) = payment.eip3009()
            && signature.ends_with(crate::verify::wallet::ERC6492_SUFFIX.as_slice())
        {
            // A wallet to be deployed first: a batch cannot deploy it (settle it with an
            // `OnchainSettler`); refused before the handler, precheck or not.
            return Err(SettleError::Refused {
                reason: crate::reason::Reason::InvalidExactEvmPayloadUndeployedSmartWallet,
                transaction: None,
            });
        }
        let owed = {
            let state = self.shared.lock();
            if let Some(max) = self.shared.config.max_pending
                && state.items.len() >= max
            {
                return Err(SettleError::Unavailable {
                    retry_after: Some(Duration::from_secs(1)),
                    source: Box::new(Backlog {
                        pending: state.items.len(),
                    }),
                });
            }
            if state.keys.contains(&payment.nonce_key()) {
                return Err(SettleError::Refused {
                    reason: reason::NONCE_ALREADY_USED,
                    transaction: None,
                });
            }
            state
                .owed
                .get(&(payment.asset, payment.payer))
                .copied()
                .unwrap_or_default()
        };
        if !self.shared.config.precheck {
            return Ok(());
        }
        self.shared.batch.check(payment, owed).await
    }

    async fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        // Only EIP-3009 authorizations batch (see `check`).
        let stored = StoredPayment::of(payment).ok_or(SettleError::Refused {
            reason: crate::reason::UNSUPPORTED_SCHEME,
            transaction: None,
        })?;
        let key = payment.nonce_key();
        let accepted_ms = unix_ms();
        let id = {
            let mut state = self.shared.lock();
            // One journal entry per authorization, even if a nonce store forgot it (restart).
            if state.keys.contains(&key) {
                return Err(SettleError::Refused {
                    reason: reason::NONCE_ALREADY_USED,
                    transaction: None,
                });
            }
            // Ids come from the journal file: saturate rather than panic on a crafted one.
            let id = state.next_id;
            state.next_id = id.saturating_add(1);
            // Queued at once (its amount counts as owed), held from the worker until durable.
            state.insert(
                id,
                Item {
                    payment: payment.clone(),
                    accepted_ms,
                    sent: Vec::new(),
                    recovered: false,
                    attempts: 0,
                    not_before: None,
                    queued: Instant::now(),
                    held: true,
                    in_round: false,
                },
            );
            id
        };
        let mut hold = Hold {
            shared: &self.shared,
            id,
            armed: true,
        };
        let record = Record::Pending {
            id,
            payment: Box::new(stored),
            accepted_ms,
        };
        let appended = self.shared.journal.append(&[record]).await;
        hold.armed = false;
        let pending = {
            let mut state = self.shared.lock();
            if let Err(e) = appended {
                // Not accepted (raised by the journal as `journal_write`): the layer answers
                // 503 and releases the proof. The journal cuts the failed write back, so a
                // retry a moment later can land.
                state.remove(id);
                return Err(SettleError::Unavailable {
                    retry_after: Some(Duration::from_secs(1)),
                    source: Box::new(e),
                });
            }
            if let Some(item) = state.items.get_mut(&id) {
                item.held = false;
            }
            state.items.len()
        };
        self.shared.pending.send_replace(pending);
        self.shared.wake.notify_one();
        // Accepted, not settled: no transaction yet (see the module docs).
        Ok(Settlement::default())
    }
}

/// Releases a held payment to the worker when `settle` is dropped mid-append (client gone):
/// the append goes on without it, and a payment in the journal must be in the queue too.
/// (Should the append then fail, the worker still settles it, as for a handler that ran.)
struct Hold<'a> {
    shared: &'a Shared,
    id: u64,
    armed: bool,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(item) = self.shared.lock().items.get_mut(&self.id) {
            item.held = false;
            // Durable or not is unknown: read the chain before sending, like a recovered one.
            item.recovered = true;
        }
        self.shared.wake.notify_one();
    }
}
