//! The channel manager (issue #19 item 5); see [`ChannelManager`].

use std::sync::Arc;
#[cfg(feature = "channel-manager")]
use std::time::Duration;

use alloy_primitives::{Address, B256, U256};

use super::OnchainSettler;
use super::channel::TxState;
use crate::alert::{Alert, alert};
use crate::channel::serve::{CooperativeRefund, Escrow, EscrowChannel, EscrowError};
use crate::channel::store::{ChannelState, ChannelStore};
use crate::channel::{ChannelClaim, ReceiverAuthorizer, claim_digest, refund_digest};
use crate::clock::Clock;

const DEFAULT_MAX_PER_TRANSACTION: usize = 32;

/// What the manager does each round (see [`ChannelManagerBuilder`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) threshold: u128,
    pub(crate) claim_before_withdrawal: u64,
    pub(crate) max_per_transaction: usize,
    pub(crate) idle_refund_after: Option<u64>,
    pub(crate) settle: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            threshold: u128::MAX,
            claim_before_withdrawal: u64::MAX,
            max_per_transaction: DEFAULT_MAX_PER_TRANSACTION,
            idle_refund_after: None,
            settle: true,
        }
    }
}

/// A send of ours whose outcome was unknown, and what it holds until it is reconciled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PendingSend {
    hash: B256,
    channels: Vec<B256>,
    sweep: Option<(Address, Address)>,
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoundReport {
    /// Channels whose mirrored state was refreshed.
    pub refreshed: usize,
    /// Channels with a timed withdrawal pending.
    pub withdrawing: usize,
    /// Channels claimed.
    pub claimed: usize,
    /// Atomic units claimed (new claimed totals minus the previous ones).
    pub claimed_amount: u128,
    /// The claim transactions and the gas each used.
    pub claim_transactions: Vec<(B256, u64)>,
    /// Atomic units swept to receivers by `settle`.
    pub settled_amount: u128,
    /// The settle transactions and the gas each used.
    pub settle_transactions: Vec<(B256, u64)>,
    /// Idle channels refunded.
    pub refunded: usize,
    /// Atomic units refunded to payers.
    pub refunded_amount: u128,
    /// The refund transactions.
    pub refund_transactions: Vec<B256>,
    /// Earlier sends with an unknown outcome, now settled by the chain (mined, or dropped).
    pub reconciled: usize,
    /// Earlier sends still in the node's pool: their channels waited.
    pub in_flight: usize,
    /// Sends of this round whose outcome is unknown (reconciled next round).
    pub unknown: usize,
    /// Failed steps (reads, signatures, sends, store writes); each raised an alert.
    pub failures: usize,
    /// Gas used by this round's mined transactions (refunds excluded: their receipt is not
    /// kept by the escrow call).
    pub gas_used: u64,
}

impl RoundReport {
    /// Counts a failed step and raises it.
    fn failed(&mut self, kind: Alert, cause: &dyn std::error::Error, what: &str) {
        self.failures += 1;
        alert!(kind, cause = cause, "channel manager: {what}");
    }
}

/// The channel manager (issue #19 item 5): the receiver's side of `batch-settlement` channels,
/// run in rounds. A round
///
/// 1. reconciles its earlier sends whose outcome was unknown (the RPC was lost after the
///    send): a transaction still in the node's pool holds its channels for this round, one
///    mined or unknown to the node is done with, and the chain's `totalClaimed` (read next)
///    says what landed; nothing is sent again blindly;
/// 2. refreshes every stored channel's mirrored state from the chain (`channels`,
///    `pendingWithdrawals`, `refundNonce`), compare-and-set against the charged amount;
/// 3. claims, `max_per_transaction` channels per `claimWithSignature` transaction, every
///    channel with unclaimed vouchers that has a timed withdrawal finalizing within
///    `claim_before_withdrawal` (by chain time), at least `threshold` unclaimed, or is idle;
/// 4. refunds idle channels (no paid request for `idle_refund_after`) with
///    `refundWithSignature`, under the channel's lease, and deletes their record when nothing
///    is left in them;
/// 5. sweeps what was claimed to each receiver with `settle`.
///
/// Claims are cumulative (a repeated claim moves nothing) and a refund is bound to its
/// `refundNonce` (a repeated one reverts), so even a send repeated after a lost RPC cannot
/// move money twice; the manager still never repeats one while the first may be mined.
///
/// [`run_once`](Self::run_once) runs one round (a cron-style command,
/// `examples/channel_manager.rs`); with the `channel-manager` feature `spawn` runs rounds on an
/// interval in a tokio task until `ChannelManagerHandle::shutdown`, which waits for the round
/// in flight.
///
/// Every round is a `tracing` span `x402.channel_round` (feature `tracing`); with `metrics`
/// its counts go to the `x402_channel_*` counters (`tower_x402::metrics`); failures raise
/// [`Alert::SettlementRetry`] (retried next round) or [`Alert::ChannelState`].
pub struct ChannelManager<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for ChannelManager<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S> std::fmt::Debug for ChannelManager<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelManager")
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

struct Inner<S> {
    settler: OnchainSettler,
    store: S,
    authorizer: Arc<dyn ReceiverAuthorizer>,
    policy: Policy,
    clock: Arc<dyn Clock>,
    lease_seconds: u64,
    #[cfg(feature = "channel-manager")]
    interval: Duration,
    #[cfg(feature = "metrics")]
    labels: Vec<::metrics::Label>,
    /// Unknown sends carried between rounds; the lock also runs one round at a time.
    pending: tokio::sync::Mutex<Vec<PendingSend>>,
}

/// Builds a [`ChannelManager`].
pub struct ChannelManagerBuilder<S> {
    inner: Inner<S>,
}

impl<S> std::fmt::Debug for ChannelManagerBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelManagerBuilder")
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl<S: ChannelStore> ChannelManager<S> {
    /// A manager of the channels in `store`, sending through `settler` (its relayer pays the
    /// gas) and signing claims and refunds with the channels' receiver `authorizer` (a key in
    /// process: [`LocalAuthorizer`](crate::channel::LocalAuthorizer)). Defaults: claim at
    /// once when a withdrawal starts, no threshold otherwise, 32 channels per claim
    /// transaction, no idle refunds, settle every round, a round a minute.
    pub fn builder(
        settler: OnchainSettler,
        store: S,
        authorizer: impl ReceiverAuthorizer + 'static,
    ) -> ChannelManagerBuilder<S> {
        ChannelManagerBuilder {
            inner: Inner {
                settler,
                store,
                authorizer: Arc::new(authorizer),
                policy: Policy::default(),
                clock: Arc::new(crate::clock::SystemClock),
                lease_seconds: 60,
                #[cfg(feature = "channel-manager")]
                interval: Duration::from_secs(60),
                #[cfg(feature = "metrics")]
                labels: Vec::new(),
                pending: tokio::sync::Mutex::new(Vec::new()),
            },
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// Runs one round now (after the round in flight, if any); see the [type docs](ChannelManager).
    /// An error only when the store cannot list its channels; every other failure is
    /// counted in the report, alerted, and retried next round.
    pub async fn run_once(&self) -> Result<RoundReport, EscrowError> {
        let inner = &*self.inner;
        let mut pending = inner.pending.lock().await;
        let now = inner.clock.now();
        let round = round(
            &inner.settler,
            &inner.store,
            inner.authorizer.as_ref(),
            now,
            &inner.policy,
            &mut pending,
            inner.lease_seconds,
        );
        #[cfg(feature = "tracing")]
        let round =
            tracing::Instrument::instrument(round, tracing::info_span!("x402.channel_round", now));
        let report = round.await;
        #[cfg(feature = "metrics")]
        record(&inner.labels, &report);
        #[cfg(feature = "tracing")]
        if let Ok(r) = &report {
            tracing::info!(
                refreshed = r.refreshed,
                claimed = r.claimed,
                claimed_amount = %r.claimed_amount,
                refunded = r.refunded,
                settled_amount = %r.settled_amount,
                failures = r.failures,
                unknown = r.unknown,
                "channel round done"
            );
        }
        report
    }
}

impl<S: ChannelStore> ChannelManagerBuilder<S> {
    /// The default number of channels per claim transaction.
    pub const DEFAULT_MAX_PER_TRANSACTION: usize = DEFAULT_MAX_PER_TRANSACTION;

    setters! {
        /// Claims a channel once this much is unclaimed on it (default: only for withdrawals and
        /// idle refunds).
        pub fn claim_threshold(atomic_units: u128) => inner.policy.threshold = atomic_units.max(1);

        /// Claims a withdrawing channel once its withdrawal finalizes within `seconds` (chain
        /// time); default: at once. Keep it well above the round interval.
        pub fn claim_before_withdrawal(seconds: u64)
            => inner.policy.claim_before_withdrawal = seconds;

        /// At most this many channels per `claimWithSignature` transaction (default 32, at
        /// least 1): more go in further transactions of the same round.
        pub fn max_per_transaction(channels: usize)
            => inner.policy.max_per_transaction = channels.max(1);

        /// Claims and refunds channels without a paid request for `seconds` (by the store's
        /// `last_request_at`); default: never.
        pub fn refund_idle_after(seconds: Option<u64>) => inner.policy.idle_refund_after = seconds;

        /// Whether rounds sweep claimed funds to the receivers with `settle` (default true).
        pub fn settle(on: bool) => inner.policy.settle = on;

        /// How long a refund holds its channel's lease (default 60 seconds).
        pub fn lease_seconds(seconds: u64) => inner.lease_seconds = seconds.max(1);

        /// The clock idle time is measured on (default the system's).
        pub fn clock(clock: impl Clock + 'static) => inner.clock = Arc::new(clock);

        /// The pause between rounds of [`ChannelManager::spawn`] (default 60 s); keep it well
        /// below the shortest `withdrawDelay` minus `claim_before_withdrawal`.
        #[cfg(feature = "channel-manager")]
        #[cfg_attr(docsrs, doc(cfg(feature = "channel-manager")))]
        pub fn interval(every: Duration) => inner.interval = every;
    }

    /// Adds a constant label to the manager's metrics.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics_label(
        mut self,
        key: impl Into<::metrics::SharedString>,
        value: impl Into<::metrics::SharedString>,
    ) -> Self {
        self.inner.labels.push(::metrics::Label::new(key, value));
        self
    }

    /// The manager.
    pub fn build(self) -> ChannelManager<S> {
        ChannelManager {
            inner: Arc::new(self.inner),
        }
    }
}

#[cfg(feature = "channel-manager")]
#[cfg_attr(docsrs, doc(cfg(feature = "channel-manager")))]
impl<S: ChannelStore> ChannelManager<S> {
    /// Runs a round now and then one per interval, in a task on the current tokio runtime,
    /// until [`ChannelManagerHandle::shutdown`]. Panics outside a tokio runtime.
    pub fn spawn(&self) -> ChannelManagerHandle {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let manager = self.clone();
        let task = tokio::spawn(async move {
            let mut rounds = 0u64;
            loop {
                if let Err(e) = manager.run_once().await {
                    alert!(
                        Alert::SettlementRetry,
                        cause = &e,
                        "channel manager: a round could not list the channels; retried next \
                         interval"
                    );
                }
                rounds += 1;
                if *stopped.borrow() {
                    return rounds;
                }
                tokio::select! {
                    _ = stopped.changed() => return rounds,
                    () = tokio::time::sleep(manager.inner.interval) => {}
                }
            }
        });
        ChannelManagerHandle { stop, task }
    }
}

/// Stops a [spawned](ChannelManager::spawn) manager.
#[cfg(feature = "channel-manager")]
#[cfg_attr(docsrs, doc(cfg(feature = "channel-manager")))]
#[derive(Debug)]
pub struct ChannelManagerHandle {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<u64>,
}

#[cfg(feature = "channel-manager")]
impl ChannelManagerHandle {
    /// Stops the task after the round in flight (never cut mid-send) and waits for it: the
    /// number of rounds it ran. An error if a round panicked.
    pub async fn shutdown(self) -> Result<u64, tokio::task::JoinError> {
        let _ = self.stop.send(true);
        self.task.await
    }
}

/// One round; see [`ChannelManager`]. `now` stamps refreshed records and measures idleness.
pub(crate) async fn round<S: ChannelStore>(
    settler: &OnchainSettler,
    store: &S,
    authorizer: &dyn ReceiverAuthorizer,
    now: u64,
    policy: &Policy,
    pending: &mut Vec<PendingSend>,
    lease_seconds: u64,
) -> Result<RoundReport, EscrowError> {
    let store_error = |e: crate::store::StoreError| EscrowError(Box::new(e));
    let mut report = RoundReport::default();

    // 1. Earlier unknown sends: never send again while one may still be mined.
    let mut held: Vec<B256> = Vec::new();
    let mut held_sweeps: Vec<(Address, Address)> = Vec::new();
    let mut still = Vec::new();
    for p in pending.drain(..) {
        match settler.escrow_transaction(p.hash).await {
            Ok(TxState::Mined { gas_used, .. }) => {
                report.reconciled += 1;
                report.gas_used = report.gas_used.saturating_add(gas_used);
            }
            // Not in the pool: it will not be mined; the chain's totals say what to send.
            Ok(TxState::Unknown) => report.reconciled += 1,
            Ok(TxState::Pending) => {
                report.in_flight += 1;
                held.extend(&p.channels);
                held_sweeps.extend(p.sweep);
                still.push(p);
            }
            Err(e) => {
                report.failed(
                    Alert::SettlementRetry,
                    &e,
                    "could not read where an earlier send stands; its channels wait",
                );
                held.extend(&p.channels);
                held_sweeps.extend(p.sweep);
                still.push(p);
            }
        }
    }
    *pending = still;

    // 2. Refresh, and pick the channels to claim.
    let chain_now = if policy.claim_before_withdrawal == u64::MAX {
        None
    } else {
        match settler.chain_time().await {
            Ok(t) => Some(t),
            Err(e) => {
                // Without chain time every withdrawal counts as pressing: claim early.
                report.failed(
                    Alert::SettlementRetry,
                    &e,
                    "could not read the chain's time; claiming every withdrawing channel now",
                );
                None
            }
        }
    };
    let mut due: Vec<(B256, ChannelClaim, u128)> = Vec::new();
    let mut idle: Vec<B256> = Vec::new();
    let mut sweeps: Vec<(Address, Address)> = Vec::new();
    for id in store.list().await.map_err(store_error)? {
        let Some(mut state) = load(store, id, &mut report).await else {
            continue;
        };
        let chain = match settler.read_channel(id).await {
            Ok(c) => c,
            Err(e) => {
                report.failed(
                    Alert::SettlementRetry,
                    &e,
                    "could not read a channel's escrow state; retried next round",
                );
                continue;
            }
        };
        let expected = state.charged_cumulative;
        state.balance = chain.balance;
        state.total_claimed = chain.total_claimed;
        state.withdraw_requested_at = chain.withdraw_requested_at;
        state.refund_nonce = chain.refund_nonce;
        state.onchain_synced_at = now;
        match store.commit(id, Some(expected), state.clone()).await {
            Ok(true) => {}
            // A request committed meanwhile: next round.
            Ok(false) => continue,
            Err(e) => {
                report.failed(
                    Alert::ChannelState,
                    &e,
                    "a channel's mirrored state was not stored",
                );
                continue;
            }
        }
        report.refreshed += 1;
        let pair = (state.config.receiver, state.config.token);
        if !sweeps.contains(&pair) {
            sweeps.push(pair);
        }
        let withdrawing = state.withdraw_requested_at != 0;
        if withdrawing {
            report.withdrawing += 1;
        }
        let finalizes_soon = withdrawing
            && chain_now.is_none_or(|t| {
                t.saturating_add(policy.claim_before_withdrawal)
                    >= state
                        .withdraw_requested_at
                        .saturating_add(state.config.withdraw_delay)
            });
        let is_idle = !withdrawing
            && policy
                .idle_refund_after
                .is_some_and(|after| now.saturating_sub(state.last_request_at) >= after)
            && refundable(&state) > 0;
        if held.contains(&id) {
            continue;
        }
        if is_idle {
            idle.push(id);
        }
        let pressing = finalizes_soon || is_idle || state.unclaimed() >= policy.threshold;
        if let Some(claim) = ChannelClaim::of(&state).filter(|_| pressing) {
            due.push((id, claim, state.total_claimed));
        }
    }

    // 3. Claims, `max_per_transaction` channels per transaction.
    let mut chain_id = None;
    let mut failed_claims: Vec<B256> = Vec::new();
    for chunk in due.chunks(policy.max_per_transaction.max(1)) {
        let claims: Vec<ChannelClaim> = chunk.iter().map(|(_, c, _)| c.clone()).collect();
        let ids: Vec<B256> = chunk.iter().map(|(id, _, _)| *id).collect();
        let signed = match chain_id {
            Some(id) => Ok(id),
            None => settler
                .chain_id()
                .await
                .map_err(|f| EscrowError(f.into_settle_error().into())),
        }
        .inspect(|id| chain_id = Some(*id))
        .and_then(|id| {
            authorizer
                .sign_digest(claim_digest(id, &claims))
                .map_err(EscrowError)
        });
        let sent = match signed {
            Ok(signature) => settler
                .claim_channels_tracked(&claims, signature)
                .await
                .map_err(|e| (e.sent, e.error)),
            Err(e) => Err((None, e)),
        };
        match sent {
            Ok((hash, gas)) => {
                report.claim_transactions.push((hash, gas));
                report.gas_used = report.gas_used.saturating_add(gas);
                report.claimed += chunk.len();
                for (id, claim, before) in chunk {
                    report.claimed_amount = report
                        .claimed_amount
                        .saturating_add(claim.total_claimed.saturating_sub(*before));
                    mirror_claim(store, *id, claim.total_claimed, &mut report).await;
                }
            }
            Err((sent, e)) => {
                report.failures += 1;
                failed_claims.extend(&ids);
                if let Some(hash) = sent {
                    report.unknown += 1;
                    pending.push(PendingSend {
                        hash,
                        channels: ids,
                        sweep: None,
                    });
                    alert!(
                        Alert::SettlementRetry,
                        cause = &e,
                        "channel manager: a claim of {} channels was sent but its outcome is \
                         unknown ({hash}); the next round reads it from the chain before \
                         sending anything again",
                        chunk.len()
                    );
                } else {
                    alert!(
                        Alert::SettlementRetry,
                        cause = &e,
                        "channel manager: a claim of {} channels failed; retried next round",
                        chunk.len()
                    );
                }
            }
        }
    }

    // 4. Idle refunds (their claims landed, or they had nothing to claim).
    let refunds = Refunds {
        settler,
        store,
        authorizer,
        now,
        policy,
        lease_seconds,
    };
    for id in idle.into_iter().filter(|id| !failed_claims.contains(id)) {
        refund_idle(&refunds, id, &mut report).await;
    }

    // 5. Sweep to the receivers.
    if policy.settle {
        for (receiver, token) in sweeps
            .into_iter()
            .filter(|pair| !held_sweeps.contains(pair))
        {
            match settler.settle_channels_tracked(receiver, token).await {
                Ok(None) => {}
                Ok(Some((hash, gas, owed))) => {
                    report.settle_transactions.push((hash, gas));
                    report.gas_used = report.gas_used.saturating_add(gas);
                    report.settled_amount = report.settled_amount.saturating_add(owed);
                }
                Err(e) => {
                    report.failures += 1;
                    if let Some(hash) = e.sent {
                        report.unknown += 1;
                        pending.push(PendingSend {
                            hash,
                            channels: Vec::new(),
                            sweep: Some((receiver, token)),
                        });
                    }
                    alert!(
                        Alert::SettlementRetry,
                        cause = &e.error,
                        "channel manager: settling claimed channel funds to {receiver} failed \
                         or is unknown; the next round reads the chain and retries"
                    );
                }
            }
        }
    }
    Ok(report)
}

/// The channel's record, counting and alerting a store failure.
async fn load<S: ChannelStore>(
    store: &S,
    id: B256,
    report: &mut RoundReport,
) -> Option<ChannelState> {
    match store.load(id).await {
        Ok(state) => state,
        Err(e) => {
            report.failed(
                Alert::ChannelState,
                &e,
                "could not load a channel's record; retried next round",
            );
            None
        }
    }
}

/// What a refund may return to the payer: the balance beyond what was charged or claimed.
fn refundable(state: &ChannelState) -> u128 {
    state
        .balance
        .saturating_sub(state.charged_cumulative.max(state.total_claimed))
}

/// Mirrors a landed claim's total (a record that moved is refreshed next round).
async fn mirror_claim<S: ChannelStore>(store: &S, id: B256, total: u128, report: &mut RoundReport) {
    let Some(mut state) = load(store, id, report).await else {
        return;
    };
    let expected = state.charged_cumulative;
    state.total_claimed = state.total_claimed.max(total);
    if let Err(e) = store.commit(id, Some(expected), state).await {
        report.failed(
            Alert::ChannelState,
            &e,
            "a claimed total was not mirrored: the next round reads it from the chain",
        );
    }
}

/// What a round's refunds need.
struct Refunds<'a, S> {
    settler: &'a OnchainSettler,
    store: &'a S,
    authorizer: &'a dyn ReceiverAuthorizer,
    now: u64,
    policy: &'a Policy,
    lease_seconds: u64,
}

/// Refunds an idle channel under its lease (a request on it meanwhile: not idle, skipped).
async fn refund_idle<S: ChannelStore>(r: &Refunds<'_, S>, id: B256, report: &mut RoundReport) {
    let Refunds {
        store,
        lease_seconds,
        ..
    } = *r;
    let lease = match store.lock(id, lease_seconds).await {
        Ok(Some(lease)) => lease,
        Ok(None) => return, // a request holds it: not idle
        Err(e) => {
            report.failed(
                Alert::ChannelState,
                &e,
                "could not take an idle channel's lease",
            );
            return;
        }
    };
    refund_held(r, id, report).await;
    if let Err(e) = store.unlock(lease).await {
        alert!(
            Alert::ChannelState,
            cause = &e,
            "channel lease not released: the channel waits for its expiry"
        );
    }
}

async fn refund_held<S: ChannelStore>(r: &Refunds<'_, S>, id: B256, report: &mut RoundReport) {
    let Refunds {
        settler,
        store,
        authorizer,
        now,
        policy,
        ..
    } = *r;
    let Some(mut state) = load(store, id, report).await else {
        return;
    };
    let still_idle = policy
        .idle_refund_after
        .is_some_and(|after| now.saturating_sub(state.last_request_at) >= after);
    let amount = refundable(&state);
    if !still_idle || amount == 0 || state.unclaimed() > 0 {
        return;
    }
    let signed = settler
        .chain_id()
        .await
        .map_err(|f| EscrowError(f.into_settle_error().into()))
        .and_then(|chain_id| {
            authorizer
                .sign_digest(refund_digest(chain_id, id, state.refund_nonce, amount))
                .map_err(EscrowError)
        });
    // Bound to `refundNonce`: a repeat after an unknown outcome reverts, never pays twice;
    // the next round reads the nonce and balance from the chain.
    let refunded = match signed {
        Ok(signature) => {
            let channel = EscrowChannel {
                config: &state.config,
                id,
            };
            let refund = CooperativeRefund {
                claim: None,
                amount,
                nonce: state.refund_nonce,
                signature,
            };
            settler.refund(channel, refund).await
        }
        Err(e) => Err(e),
    };
    let mirror = match refunded {
        Ok(m) => m,
        Err(e) => {
            report.failed(
                Alert::SettlementRetry,
                &e,
                "refunding an idle channel failed; the next round reads the chain and retries",
            );
            return;
        }
    };
    report.refunded += 1;
    report.refunded_amount = report.refunded_amount.saturating_add(amount);
    report.refund_transactions.push(mirror.transaction);
    let expected = state.charged_cumulative;
    state.balance = mirror.balance;
    state.total_claimed = mirror.total_claimed;
    state.refund_nonce += U256::from(1);
    let stored = if state.balance <= state.total_claimed {
        store.remove(id, expected).await
    } else {
        store.commit(id, Some(expected), state).await
    };
    if let Err(e) = stored {
        report.failed(
            Alert::ChannelState,
            &e,
            "a refund's channel state was not stored: the next round reads it from the chain",
        );
    }
}

/// Adds a round's counts to the `x402_channel_*` counters.
#[cfg(feature = "metrics")]
fn record(labels: &[::metrics::Label], report: &Result<RoundReport, EscrowError>) {
    use crate::metrics::name;
    use ::metrics::counter;
    let with = |op: &'static str| {
        let mut l = labels.to_vec();
        l.push(::metrics::Label::new("op", op));
        l
    };
    let units = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
    let Ok(r) = report else {
        counter!(name::CHANNEL_FAILURES, with("list")).increment(1);
        return;
    };
    counter!(name::CHANNEL_ROUNDS, labels.to_vec()).increment(1);
    counter!(name::CHANNELS_CLAIMED, labels.to_vec()).increment(r.claimed as u64);
    counter!(name::CHANNEL_AMOUNT, with("claim")).increment(units(r.claimed_amount));
    counter!(name::CHANNEL_AMOUNT, with("settle")).increment(units(r.settled_amount));
    counter!(name::CHANNEL_AMOUNT, with("refund")).increment(units(r.refunded_amount));
    counter!(name::CHANNEL_TRANSACTIONS, with("claim"))
        .increment(r.claim_transactions.len() as u64);
    counter!(name::CHANNEL_TRANSACTIONS, with("settle"))
        .increment(r.settle_transactions.len() as u64);
    counter!(name::CHANNEL_TRANSACTIONS, with("refund"))
        .increment(r.refund_transactions.len() as u64);
    counter!(name::CHANNELS_REFUNDED, labels.to_vec()).increment(r.refunded as u64);
    counter!(name::CHANNEL_FAILURES, with("round")).increment(r.failures as u64);
    counter!(name::CHANNEL_UNKNOWN, labels.to_vec()).increment(r.unknown as u64);
    counter!(name::CHANNEL_GAS_USED, labels.to_vec()).increment(r.gas_used);
}
