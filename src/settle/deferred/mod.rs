//! Deferred settlement: answer the paid request as soon as the payment is **durably queued**,
//! and settle it on-chain later, in batches.
//!
//! [`DeferredSettler`] is an ordinary [`Settler`], so a layer picks it with
//! [`.settler(..)`](crate::PaymentLayerBuilder::settler) in either
//! [`SettlementMode`](super::SettlementMode) (no extra mode is needed: deferring is what the
//! settler does, not when the layer calls it):
//!
//! - [`check`](Settler::check) (before the handler) refuses a proof whose nonce is already in
//!   the queue, then asks the inner [`BatchSettler`] to pre-check it on-chain: nonce unused,
//!   and a balance that covers this payment **plus** what the payer already owes in queued,
//!   unsettled payments of the same token (both asked of the queue: with a shared queue, for
//!   every instance).
//! - [`settle`](Settler::settle) appends the payment to the queue and returns once it is
//!   durable (the journal's `fdatasync`, shared by all concurrent appends: group commit, see
//!   `journal.rs`; or PostgreSQL's commit). **Its [`Settlement::transaction`] is `None`**: no transaction exists yet, so the
//!   receipt header carries `success: true` and an empty `transaction` — the same shape as
//!   verify-only receipts. The final outcome (with the hash) goes to the
//!   [outcome hook](DeferredSettlerBuilder::on_outcome).
//! - A background worker (a tokio task) leases queued payments oldest first and settles up to
//!   [`max_batch`](DeferredSettlerBuilder::max_batch) of them at once through
//!   [`BatchSettler::settle_batch`] (for [`OnchainSettler`][super::onchain::OnchainSettler]:
//!   one Multicall3 `aggregate3` transaction), as soon as the batch is full or its oldest
//!   payment waited [`max_wait`](DeferredSettlerBuilder::max_wait). A failed round (RPC down)
//!   is retried with exponential backoff ([`retry`](DeferredSettlerBuilder::retry)); the
//!   payments stay queued meanwhile, across restarts too. Up to
//!   [`in_flight`](DeferredSettlerBuilder::in_flight) rounds run at once, on disjoint
//!   payments.
//!
//! # Queues
//!
//! Where accepted payments wait is a [`SettlementQueue`]:
//!
//! - [`JournalQueue`] ([`journal(path)`](DeferredSettlerBuilder::journal)): an append-only
//!   file, **one process**, on a disk that must outlive the process.
//! - `PostgresSettlementQueue` (feature `postgres`, [`queue(q)`](DeferredSettlerBuilder::queue)):
//!   **shared** by every instance on the database. Any instance's worker settles what any
//!   instance accepted; a dead instance's leased payments are taken over once its lease
//!   expires ([`lease_ttl`](DeferredSettlerBuilder::lease_ttl)).
//!
//! # Exactly once
//!
//! Each queued payment moves `pending → sent(tx) → settled(tx) | failed(reason)`. The `sent`
//! record is durable **before** its transaction is broadcast, and is refused to a worker that
//! no longer holds the payment's lease (so a round whose lease was taken over never
//! broadcasts). Whatever is leased again (recovered after a restart, retried, or taken over
//! by another instance after an expired lease) has its chain state read through
//! [`BatchSettler::state`] before anything is resent: a known transaction that carried it
//! (receipt with the token's `AuthorizationUsed` log) or `authorizationState(from, nonce)`
//! used → settled, never sent again; a transaction the node still holds unmined → waited
//! for; otherwise it is sent. A final outcome is recorded once, and reported by the worker
//! that recorded it. The token itself enforces one use per authorization, so even a resend
//! after a lost `sent` record could not move the money twice: at worst it would waste one
//! reverted call. These rules hold across instances sharing a queue.
//!
//! # When the RPC is down
//!
//! - At request time: the pre-check cannot run, so the layer answers **503** with
//!   `Retry-After` and the handler does not run (nothing is queued).
//! - After journaling: the payment was accepted and stays in the journal; the worker retries
//!   with backoff (from 1 s, doubling, up to 5 min by default) until the RPC answers, then
//!   settles it. Payments whose authorization expires meanwhile (`validBefore`) fail with
//!   the token's reason: that is the risk deferring takes, and why the retry ceiling is short
//!   next to the usual validity window.
//!
//! # When the queue fails
//!
//! A shared queue that cannot be reached answers like the journal below: at request time
//! (the pre-check's questions, or the append) the payment is **not accepted** (503 with
//! `Retry-After`, the proof released); the worker's steps are retried with backoff.
//!
//! ## The journal
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
mod journal_queue;
#[cfg(feature = "postgres")]
mod postgres;
mod queue;
mod worker;

pub use self::journal_queue::JournalQueue;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::PostgresSettlementQueue;
pub use self::queue::{
    Appended, Exposure, Final, LeaseOwner, LeaseRequest, Leased, SettlementQueue,
};

#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub use self::faults::JournalFaults;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256, U256};
use async_trait::async_trait;
use tokio::sync::{Notify, watch};

use self::faults::JournalFaults as Faults;
use super::{SettleError, Settlement, Settler};
use crate::reason;
use crate::store::StoreError;
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
    /// The queue's id.
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
    /// Neither a journal path nor a queue was given.
    #[error("no journal path or queue: call .journal(path) or .queue(q)")]
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
    queue: Option<Arc<dyn SettlementQueue>>,
    lease_ttl: Duration,
    poll: Option<Duration>,
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
    setters! {
        /// The journal file (created if missing): a [`JournalQueue`], one process per file on a
        /// local disk. This or [`queue`](Self::queue) is required.
        pub fn journal(path: impl AsRef<Path>) => journal = Some(path.as_ref().to_owned());

        /// Keeps accepted payments in `queue` instead of a journal file: e.g. a
        /// `PostgresSettlementQueue` (feature `postgres`) that several instances share, each
        /// instance's worker settling what any of them accepted. Overrides
        /// [`journal`](Self::journal).
        pub fn queue(queue: impl SettlementQueue) => queue = Some(Arc::new(queue));

        /// How long a worker's lease on a batch holds unless renewed (default 60 s; renewed every
        /// third of it while the round runs). When an instance dies, another instance's worker
        /// takes its leased payments over after this long, reading each one's chain state before
        /// anything is resent. Keep it well above a round's longest RPC call.
        pub fn lease_ttl(ttl: Duration) => lease_ttl = ttl.max(Duration::from_millis(100));

        /// How often an idle worker asks the queue for due payments (default: the shorter of
        /// `max_wait` and the first retry wait, between 10 ms and 1 s). New payments of this
        /// instance wake it at once; the poll finds ripe batches, retries and, on a shared queue,
        /// other instances' payments and expired leases.
        pub fn poll_interval(every: Duration) => poll = Some(every.max(Duration::from_millis(1)));

        /// Most payments per settlement transaction (default 32; at least 1). 1 settles each
        /// payment with its own `transferWithAuthorization`.
        pub fn max_batch(n: usize) => max_batch = n.max(1);

        /// Longest a payment waits for its batch to fill before it is sent anyway (default 2 s).
        pub fn max_wait(wait: Duration) => max_wait = wait;
    }

    /// First and longest wait between retries of a failed round (default 1 s and 5 min; the
    /// wait doubles per failure).
    pub fn retry(mut self, first: Duration, max: Duration) -> Self {
        self.retry = (first, max.max(first));
        self
    }

    setters! {
        /// Compact the journal once it holds more than this many records and more than twice the
        /// live ones (default 10 000). For [`journal`](Self::journal) only: a queue given with
        /// [`queue`](Self::queue) keeps its own storage.
        pub fn compact_after(records: u64) => compact_after = records;

        /// Whether [`check`](Settler::check) asks the chain before the handler runs (default on).
        /// Off, a paid request costs no RPC round trip at all (verification and the journal's
        /// sync only), and a proof is refused before the handler only when its nonce is already
        /// journaled: a payer without the funds, or whose authorization is already used on-chain,
        /// is served and the payment fails later in the worker. For sellers who price that risk
        /// in (tiny prices, known payers).
        pub fn precheck(on: bool) => precheck = on;

        /// Refuses new payments while this many are queued and not final yet (default: no
        /// limit; with a shared queue, counted over every instance): [`check`](Settler::check) answers unavailable, the layer 503 with
        /// `Retry-After: 1`, the handler does not run and the client keeps its proof.
        ///
        /// Backpressure for when requests arrive faster than the chain settles them: a payment
        /// must settle before its `validBefore` (`maxTimeoutSeconds`, 300 s by default, after the
        /// client signed it), or the seller served it for nothing. Size it below what the worker
        /// settles in that time: on a local anvil the load harness measured about 220 settled
        /// payments per second in batches of 32 while accepting 7,600 per second, a backlog that
        /// `max_pending(50_000)` would have held to what drains in under four minutes.
        pub fn max_pending(n: usize) => max_pending = Some(n);

        /// Most settlement rounds (batch transactions) in flight at once (default 1; at least 1).
        ///
        /// With one, the worker sends a batch and waits for its receipt before it sends the next:
        /// it uses at most one transaction per block, so it settles at most `max_batch` payments
        /// per block (batches of 32 and 2 s blocks: ~16 payments/s), whatever the chain could
        /// take. With `n`, up to `n` rounds run at once on disjoint payments (no payment is ever
        /// in two rounds), so up to `n` batches can land in one block. An
        /// `OnchainSettler` hands concurrent sends consecutive
        /// relayer nonces; a [`BatchSettler`] of your own must be safe to call concurrently.
        /// Each round still waits `max_wait` for a full batch, and the backlog bound
        /// ([`max_pending`](Self::max_pending)) is unchanged.
        pub fn in_flight(n: usize) => in_flight = n.max(1);

        /// Called with each payment's final outcome, from the worker task (keep it quick: send it
        /// to a channel for anything slow).
        pub fn on_outcome(hook: impl Fn(&Outcome) + Send + Sync + 'static)
            => hook = Some(Arc::new(hook));

        /// Makes the journal's writes, syncs, compaction rename and directory syncs fail on
        /// command (test builds only: the `test-util` feature; for [`journal`](Self::journal)
        /// only). See [`JournalFaults`].
        #[cfg(any(test, feature = "test-util"))]
        #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
        pub fn journal_faults(faults: JournalFaults) => faults = faults;
    }

    /// Opens the journal (or takes the queue), and starts the worker.
    ///
    /// # Errors
    /// See [`DeferredError`].
    pub fn start(self) -> Result<DeferredSettler, DeferredError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| DeferredError::NoRuntime)?;
        let (queue, known): (Arc<dyn SettlementQueue>, Option<usize>) = match self.queue {
            Some(q) => (q, None),
            None => {
                let path = self.journal.ok_or(DeferredError::NoJournal)?;
                let q = JournalQueue::open_with(&path, self.compact_after, self.faults).map_err(
                    |source| DeferredError::Journal {
                        path: path.clone(),
                        source,
                    },
                )?;
                let n = q.len();
                (Arc::new(q), Some(n))
            }
        };
        let (pending, _) = watch::channel(known);
        let poll = self.poll.unwrap_or_else(|| {
            self.max_wait
                .min(self.retry.0)
                .clamp(Duration::from_millis(10), Duration::from_secs(1))
        });
        let shared = Arc::new(Shared {
            batch: self.batch,
            queue,
            owner: LeaseOwner::random(),
            wake: Notify::new(),
            pending,
            flush_ms: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            changing: AtomicU64::new(0),
            config: Config {
                max_batch: self.max_batch,
                max_wait: self.max_wait,
                retry: self.retry,
                precheck: self.precheck,
                max_pending: self.max_pending,
                in_flight: self.in_flight,
                lease_ttl: self.lease_ttl,
                poll,
            },
            hook: self.hook,
        });
        let worker = runtime.spawn(worker::run(shared.clone()));
        Ok(DeferredSettler {
            shared: shared.clone(),
            _stop: Arc::new(StopOnDrop { worker }),
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Config {
    max_batch: usize,
    max_wait: Duration,
    retry: (Duration, Duration),
    precheck: bool,
    max_pending: Option<usize>,
    in_flight: usize,
    lease_ttl: Duration,
    poll: Duration,
}

/// What the request path and the worker share.
struct Shared {
    batch: Arc<dyn BatchSettler>,
    queue: Arc<dyn SettlementQueue>,
    /// This settler's leases.
    owner: LeaseOwner,
    /// New work, or a flush request.
    wake: Notify,
    /// Payments not final yet, as last known (`None` until the worker first asks a queue
    /// given with `.queue(..)`).
    pending: watch::Sender<Option<usize>>,
    /// Unix ms: payments accepted before it are ripe now ([`DeferredSettler::flush`]).
    flush_ms: AtomicU64,
    /// Changes to the count started (appends, and final outcomes being recorded and
    /// reported), and those in progress: a count the worker reads from the queue replaces
    /// `pending` only if none was in progress when it asked and none started before the
    /// answer came. Else it may miss an append that `settle` counts itself, or let `idle`
    /// resolve before an outcome is reported.
    changes: AtomicU64,
    changing: AtomicU64,
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

/// Stops the worker when the last handle goes.
struct StopOnDrop {
    worker: tokio::task::JoinHandle<()>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        // Like a crash, which the queue is built for: whatever is pending waits for the next
        // start (or, on a shared queue, another instance once the leases expire), and a round
        // cut short is reconciled then. Every acknowledged payment is already durable.
        self.worker.abort();
    }
}

/// Accepts verified payments into a durable queue and settles them later, in batches. Cheap
/// to clone; the worker stops when the last clone is dropped (queued payments wait for the
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
    /// retries from 1 s to 5 min, compaction after 10 000 records, one round in flight,
    /// leases of 60 s.
    pub fn builder(batch: impl BatchSettler) -> DeferredSettlerBuilder {
        DeferredSettlerBuilder {
            batch: Arc::new(batch),
            journal: None,
            queue: None,
            lease_ttl: Duration::from_secs(60),
            poll: None,
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

    /// Payments queued and not final yet, as last known: exact for a journal; for a shared
    /// queue, as of the worker's last look (it counts every instance's payments).
    pub fn pending(&self) -> usize {
        self.shared.pending.borrow().unwrap_or(0)
    }

    /// True when its queue is shared by several instances (a `PostgresSettlementQueue`):
    /// those instances must also share the nonce store and the challenge key (see
    /// DEPLOYING.md).
    pub fn is_shared(&self) -> bool {
        self.shared.queue.is_shared()
    }

    /// Asks the worker to send what is due now, without waiting for a full batch.
    pub fn flush(&self) {
        self.shared.flush_ms.fetch_max(unix_ms(), Ordering::SeqCst);
        self.shared.wake.notify_one();
    }

    /// Resolves once no payment is pending (immediately if none is known to be).
    pub async fn idle(&self) {
        let mut rx = self.shared.pending.subscribe();
        // Errs only when the sender is gone, which `self` prevents: nothing to report.
        let _ = rx.wait_for(|n| *n == Some(0)).await;
    }
}

/// Why [`DeferredSettler::check`] refused with a full backlog ([`DeferredSettlerBuilder::max_pending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{pending} payments wait for settlement: the backlog is full")]
pub struct Backlog {
    /// Payments queued and not final.
    pub pending: usize,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A queue failure on the request path: 503 with its `Retry-After` (1 s unless it says).
fn unavailable(e: StoreError) -> SettleError {
    SettleError::Unavailable {
        retry_after: Some(e.retry_after().unwrap_or(Duration::from_secs(1))),
        source: Box::new(e),
    }
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
        let exposure = self
            .shared
            .queue
            .exposure(payment)
            .await
            .map_err(unavailable)?;
        if let Some(max) = self.shared.config.max_pending
            && exposure.pending >= max
        {
            return Err(SettleError::Unavailable {
                retry_after: Some(Duration::from_secs(1)),
                source: Box::new(Backlog {
                    pending: exposure.pending,
                }),
            });
        }
        if exposure.queued {
            return Err(SettleError::Refused {
                reason: reason::NONCE_ALREADY_USED,
                transaction: None,
            });
        }
        if !self.shared.config.precheck {
            return Ok(());
        }
        self.shared.batch.check(payment, exposure.owed).await
    }

    async fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        // Only EIP-3009 authorizations batch (see `check`).
        if payment.eip3009().is_none() {
            return Err(SettleError::Refused {
                reason: crate::reason::UNSUPPORTED_SCHEME,
                transaction: None,
            });
        }
        let _changing = Changing::start(&self.shared);
        match self.shared.queue.append(payment, unix_ms()).await {
            Ok(Appended::Accepted(_)) => {}
            // One entry per authorization, even if a nonce store forgot it (restart).
            Ok(Appended::Duplicate) => {
                return Err(SettleError::Refused {
                    reason: reason::NONCE_ALREADY_USED,
                    transaction: None,
                });
            }
            // Not accepted (raised by the queue): the layer answers 503 and releases the
            // proof, so a retry a moment later can land.
            Err(e) => return Err(unavailable(e)),
        }
        self.shared
            .pending
            .send_modify(|n| *n = Some(n.unwrap_or(0).saturating_add(1)));
        self.shared.wake.notify_one();
        // Accepted, not settled: no transaction yet (see the module docs).
        Ok(Settlement::default())
    }

    fn is_shared(&self) -> bool {
        DeferredSettler::is_shared(self)
    }
}

/// A change to the pending count in progress (see `Shared::changes`); over however it ends
/// (a dropped request included).
struct Changing<'a>(&'a Shared);

impl<'a> Changing<'a> {
    fn start(shared: &'a Shared) -> Self {
        shared.changes.fetch_add(1, Ordering::SeqCst);
        shared.changing.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.0.changing.fetch_sub(1, Ordering::SeqCst);
    }
}
