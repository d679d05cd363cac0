//! The background worker: waits for a batch to fill (or its oldest payment to wait
//! `max_wait`), reconciles recovered and in-flight payments with the chain, settles the rest
//! through the [`BatchSettler`](super::BatchSettler), journals the outcomes and reports them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use async_trait::async_trait;
use tokio::task::JoinSet;

use super::journal::Record;
use super::{ChainState, Outcome, OutcomeStatus, SendLog, Settled, Shared, unix_ms};
use crate::alert::{Alert, alert};
use crate::settle::SettleError;
use crate::verify::{BoxError, VerifiedPayment};

/// After a failed compaction, the next try waits this long (the journal works meanwhile).
const COMPACT_RETRY: Duration = Duration::from_secs(60);

/// The worker task: runs until aborted. Up to `in_flight` rounds run at once, each on
/// payments no other round holds (an item is `in_round` from when a round takes it until
/// that round ends, panics included).
pub(super) async fn run(shared: Arc<Shared>) {
    let mut compact_not_before: Option<Instant> = None;
    // Dropped with the worker: aborts the rounds in flight (like a crash, see `StopOnDrop`).
    let mut rounds: JoinSet<()> = JoinSet::new();
    loop {
        // Reap finished rounds first: their payments are free again.
        while let Some(done) = rounds.try_join_next() {
            reaped(&shared, done, &mut compact_not_before).await;
        }
        let room = rounds.len() < shared.config.in_flight.max(1);
        match due_in(&shared) {
            Some(wait) if wait.is_zero() && room => {
                let taken = take(&shared);
                if taken.is_empty() {
                    // Everything due is in a round already: wait for one to end (cannot
                    // happen with none running, but never spin).
                    match rounds.join_next().await {
                        Some(done) => reaped(&shared, done, &mut compact_not_before).await,
                        None => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                    continue;
                }
                let worker = shared.clone();
                rounds.spawn(async move {
                    let _free = Free {
                        shared: worker.clone(),
                        ids: taken.iter().map(|t| t.id).collect(),
                    };
                    round(&worker, taken).await;
                });
            }
            wait => {
                // No room for another round (wait for one to end), or nothing due yet.
                let wait = if room { wait } else { None };
                tokio::select! {
                    () = shared.wake.notified() => {}
                    () = sleep_or_forever(wait) => {}
                    Some(done) = rounds.join_next(), if !rounds.is_empty() => {
                        reaped(&shared, done, &mut compact_not_before).await;
                    }
                }
            }
        }
    }
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(w) => tokio::time::sleep(w).await,
        None => std::future::pending().await,
    }
}

/// A round ended: raise a panic (a bug here or in the batch settler: its payments stay
/// queued and are retried after `retry.0`; any that may have been sent carry their `sent`
/// hash, so they are read from the chain first), else compact the journal if it is due.
async fn reaped(
    shared: &Arc<Shared>,
    done: Result<(), tokio::task::JoinError>,
    compact_not_before: &mut Option<Instant>,
) {
    if let Err(e) = done {
        alert!(
            Alert::SettlementRetry,
            cause = &e,
            "deferred: a settlement round panicked; its payments stay queued and are \
             retried in {:?}",
            shared.config.retry.0
        );
        return;
    }
    if compact_not_before.is_none_or(|t| t <= Instant::now()) && !compact_if_needed(shared).await {
        *compact_not_before = Instant::now().checked_add(COMPACT_RETRY);
    }
}

/// Frees a round's payments when it ends, however it ends (a panic or an abort included); a
/// panicked round's payments wait `retry.0` before the next try.
struct Free {
    shared: Arc<Shared>,
    ids: Vec<u64>,
}

impl Drop for Free {
    fn drop(&mut self) {
        let panicked = std::thread::panicking();
        let mut state = self.shared.lock();
        for id in &self.ids {
            if let Some(item) = state.items.get_mut(id) {
                item.in_round = false;
                if panicked {
                    item.not_before = Some(Instant::now() + self.shared.config.retry.0);
                }
            }
        }
        drop(state);
        self.shared.wake.notify_one();
    }
}

/// How long until the next round is due; `None`: nothing to do until woken.
fn due_in(shared: &Shared) -> Option<Duration> {
    let state = shared.lock();
    let now = Instant::now();
    let config = &shared.config;
    let mut eligible = 0;
    let mut oldest: Option<Instant> = None;
    let mut backoff: Option<Instant> = None;
    for item in state.items.values().filter(|i| !i.held && !i.in_round) {
        match item.not_before {
            Some(t) if t > now => backoff = Some(backoff.map_or(t, |b| b.min(t))),
            _ => {
                eligible += 1;
                oldest = Some(oldest.map_or(item.queued, |o| o.min(item.queued)));
            }
        }
    }
    let full = eligible >= config.max_batch;
    let ready = oldest.map(|o| (o + config.max_wait).saturating_duration_since(now));
    match (full, ready, backoff) {
        (true, _, _) => Some(Duration::ZERO),
        (false, Some(r), Some(b)) => Some(r.min(b.saturating_duration_since(now))),
        (false, Some(r), None) => Some(r),
        (false, None, Some(b)) => Some(b.saturating_duration_since(now)),
        (false, None, None) => None,
    }
}

/// A final outcome: settled, or failed with a reason and maybe a transaction.
type Final = (u64, Result<Settled, (String, Option<B256>)>);

/// A payment taken for this round.
struct Taken {
    id: u64,
    payment: VerifiedPayment,
    sent: Vec<B256>,
    recovered: bool,
}

/// Takes up to `max_batch` due payments no round holds, oldest first, and marks them
/// `in_round`.
fn take(shared: &Shared) -> Vec<Taken> {
    let now = Instant::now();
    let mut state = shared.lock();
    state
        .items
        .iter_mut()
        .filter(|(_, i)| !i.held && !i.in_round && i.not_before.is_none_or(|t| t <= now))
        .take(shared.config.max_batch)
        .map(|(id, i)| {
            i.in_round = true;
            Taken {
                id: *id,
                payment: i.payment.clone(),
                sent: i.sent.clone(),
                recovered: i.recovered,
            }
        })
        .collect()
}

/// One round on the payments `take` gave it: reconcile, settle, record.
async fn round(shared: &Arc<Shared>, taken: Vec<Taken>) {
    let mut finals: Vec<Final> = Vec::new();
    let mut to_send = Vec::new();
    for t in taken {
        if !t.recovered && t.sent.is_empty() {
            to_send.push(t);
            continue;
        }
        // Never resend before the chain says the payment is not there yet.
        match shared.batch.state(&t.payment, &t.sent).await {
            Ok(ChainState::Settled(s)) => finals.push((t.id, Ok(s))),
            Ok(ChainState::InFlight(_)) => wait(shared, t.id, shared.config.retry.0),
            Ok(ChainState::Unused) => {
                if let Some(item) = shared.lock().items.get_mut(&t.id) {
                    item.recovered = false;
                }
                to_send.push(t);
            }
            Err(e) => {
                alert!(
                    Alert::SettlementRetry,
                    cause = &e,
                    "deferred: could not read where payment {} stands on-chain; retrying \
                     with backoff",
                    t.id
                );
                back_off(shared, t.id);
            }
        }
    }
    if !to_send.is_empty() {
        let payments: Vec<VerifiedPayment> = to_send.iter().map(|t| t.payment.clone()).collect();
        let ids: Vec<u64> = to_send.iter().map(|t| t.id).collect();
        let log = JournalLog { shared, ids: &ids };
        let results = shared.batch.settle_batch(&payments, &log).await;
        let mut results = results.into_iter();
        let (mut retried, mut first) = (0usize, None);
        for id in ids.iter().copied() {
            match results.next() {
                Some(Ok(s)) => finals.push((id, Ok(s))),
                Some(Err(SettleError::Refused {
                    reason,
                    transaction,
                })) => finals.push((id, Err((reason.to_string(), transaction)))),
                Some(Err(e)) => {
                    retried += 1;
                    first.get_or_insert(e);
                    back_off(shared, id);
                }
                // A batch settler that answered for fewer payments than it was given.
                None => {
                    retried += 1;
                    back_off(shared, id);
                }
            }
        }
        if retried > 0 {
            let detail = format_args!(
                "deferred: {retried} of {} payments did not settle this round; retrying with \
                 backoff (read from the chain first if they may have been sent)",
                ids.len()
            );
            match &first {
                Some(e) => alert!(Alert::SettlementRetry, cause = e, "{detail}"),
                None => alert!(Alert::SettlementRetry, "{detail}"),
            }
        }
    }
    finish(shared, finals).await;
}

/// Journals final outcomes (one sync for all), forgets them and reports them.
async fn finish(shared: &Shared, finals: Vec<Final>) {
    if finals.is_empty() {
        return;
    }
    let records: Vec<Record> = finals
        .iter()
        .map(|(id, r)| match r {
            Ok(s) => Record::Settled {
                id: *id,
                tx: s.transaction,
                gas_used: s.gas_used,
            },
            Err((reason, tx)) => Record::Failed {
                id: *id,
                reason: reason.clone(),
                tx: *tx,
            },
        })
        .collect();
    if let Err(e) = shared.journal.append(&records).await {
        // Not durable: keep them, and read the chain again before anything else happens.
        alert!(
            Alert::SettlementRetry,
            cause = &e,
            "deferred: {} final outcomes could not be journaled; they are read from the chain \
             again next round",
            finals.len()
        );
        let mut state = shared.lock();
        for (id, _) in &finals {
            if let Some(item) = state.items.get_mut(id) {
                item.recovered = true;
            }
        }
        drop(state);
        for (id, _) in &finals {
            back_off(shared, *id);
        }
        return;
    }
    let now_ms = unix_ms();
    let mut outcomes = Vec::with_capacity(finals.len());
    let pending = {
        let mut state = shared.lock();
        for (id, result) in finals {
            let Some(item) = state.remove(id) else {
                continue;
            };
            let p = &item.payment;
            let (transaction, gas_used, status) = match result {
                Ok(s) => (s.transaction, s.gas_used, OutcomeStatus::Settled),
                Err((reason, tx)) => (tx, None, OutcomeStatus::Failed(reason)),
            };
            outcomes.push(Outcome {
                id,
                payer: p.payer,
                asset: p.asset,
                pay_to: p.pay_to,
                amount: p.amount,
                nonce: p.nonce(),
                transaction,
                gas_used,
                status,
                latency: Duration::from_millis(now_ms.saturating_sub(item.accepted_ms)),
            });
        }
        state.items.len()
    };
    shared.pending.send_replace(pending);
    if let Some(hook) = &shared.hook {
        for o in &outcomes {
            hook(o);
        }
    }
}

/// Retry later, with exponential backoff.
fn back_off(shared: &Shared, id: u64) {
    let (first, max) = shared.config.retry;
    let mut state = shared.lock();
    if let Some(item) = state.items.get_mut(&id) {
        item.attempts = item.attempts.saturating_add(1);
        let factor = 1u32 << item.attempts.saturating_sub(1).min(20);
        item.not_before = Some(Instant::now() + first.saturating_mul(factor).min(max));
    }
}

/// Look again after `delay`, without counting a failure.
fn wait(shared: &Shared, id: u64, delay: Duration) {
    if let Some(item) = shared.lock().items.get_mut(&id) {
        item.not_before = Some(Instant::now() + delay);
    }
}

/// Compacts the journal if it is due; false if that failed (raised).
async fn compact_if_needed(shared: &Arc<Shared>) -> bool {
    let (records, live) = shared.journal.sizes();
    if records <= shared.config.compact_after || records <= (live as u64).saturating_mul(2) {
        return true;
    }
    let worker = shared.clone();
    // Blocking file I/O and syncs: off the runtime's threads.
    let compacted = tokio::task::spawn_blocking(move || worker.journal.compact())
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    if let Err(e) = &compacted {
        alert!(
            Alert::JournalCompaction,
            cause = e,
            "deferred: journal compaction failed ({records} records, {live} live); appends \
             go on safely, the next try is in {}s",
            COMPACT_RETRY.as_secs()
        );
    }
    compacted.is_ok()
}

/// Journals `sent(tx)` for the round's payments before the batch settler broadcasts.
struct JournalLog<'a> {
    shared: &'a Shared,
    ids: &'a [u64],
}

#[async_trait]
impl SendLog for JournalLog<'_> {
    async fn sending(&self, transaction: B256, payments: &[usize]) -> Result<(), BoxError> {
        let ids: Vec<u64> = payments
            .iter()
            .filter_map(|i| self.ids.get(*i).copied())
            .collect();
        self.shared
            .journal
            .append(&[Record::Sent {
                ids: ids.clone(),
                tx: transaction,
            }])
            .await?;
        let mut state = self.shared.lock();
        for id in ids {
            if let Some(item) = state.items.get_mut(&id)
                && !item.sent.contains(&transaction)
            {
                item.sent.push(transaction);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use alloy_primitives::{Address, Bytes, U256};

    use super::super::{BatchSettler, DeferredSettler};
    use super::*;
    use crate::Network;
    use crate::proto::X402Version;
    use crate::proto::exact::Authorization;
    use crate::settle::Settler;

    /// Panics in its first `settle_batch`, settles everything after.
    #[derive(Default)]
    struct PanicsOnce {
        batches: AtomicUsize,
    }

    #[async_trait]
    impl BatchSettler for PanicsOnce {
        async fn check(&self, _: &VerifiedPayment, _: U256) -> Result<(), SettleError> {
            Ok(())
        }

        async fn settle_batch(
            &self,
            payments: &[VerifiedPayment],
            _: &dyn SendLog,
        ) -> Vec<Result<Settled, SettleError>> {
            if self.batches.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("injected panic in a batch settler");
            }
            payments.iter().map(|_| Ok(Settled::default())).collect()
        }

        async fn state(&self, _: &VerifiedPayment, _: &[B256]) -> Result<ChainState, SettleError> {
            Ok(ChainState::Unused)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_panicking_round_does_not_stop_the_worker() {
        let dir = std::env::temp_dir().join(format!("tower-x402-worker-{}", std::process::id()));
        // A leftover of an earlier run, if any; absent is fine.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let batch = Arc::new(PanicsOnce::default());
        let settler = DeferredSettler::builder(batch.clone())
            .journal(dir.join("j.log"))
            .max_wait(Duration::ZERO)
            .retry(Duration::from_millis(10), Duration::from_millis(20))
            .start()
            .unwrap();
        let retries = crate::alert::count(Alert::SettlementRetry);
        let payment = VerifiedPayment::exact(
            X402Version::V2,
            Network::BASE_SEPOLIA,
            Address::repeat_byte(1),
            Authorization {
                from: Address::repeat_byte(2),
                to: Address::repeat_byte(3),
                value: U256::from(1000),
                valid_after: U256::ZERO,
                valid_before: U256::from(u64::MAX),
                nonce: B256::repeat_byte(7),
            },
            Bytes::from(vec![1; 65]),
        );
        settler.settle(&payment).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), settler.idle())
            .await
            .expect("settled after the panicking round");
        assert_eq!(batch.batches.load(Ordering::SeqCst), 2);
        assert!(
            crate::alert::count(Alert::SettlementRetry) > retries,
            "raised"
        );
    }
}
