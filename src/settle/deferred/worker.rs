//! The background worker: waits for a batch to fill (or its oldest payment to wait
//! `max_wait`), reconciles recovered and in-flight payments with the chain, settles the rest
//! through the [`BatchSettler`](super::BatchSettler), journals the outcomes and reports them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use async_trait::async_trait;

use super::journal::Record;
use super::{ChainState, Outcome, OutcomeStatus, SendLog, Settled, Shared, unix_ms};
use crate::alert::{Alert, alert};
use crate::settle::SettleError;
use crate::verify::{BoxError, VerifiedPayment};

/// After a failed compaction, the next try waits this long (the journal works meanwhile).
const COMPACT_RETRY: Duration = Duration::from_secs(60);

/// The worker task: runs until aborted.
pub(super) async fn run(shared: Arc<Shared>) {
    let mut compact_not_before: Option<Instant> = None;
    loop {
        match due_in(&shared) {
            Some(wait) if wait.is_zero() => {
                if !guarded_round(&shared).await {
                    tokio::time::sleep(shared.config.retry.0).await;
                    continue;
                }
                if compact_not_before.is_none_or(|t| t <= Instant::now())
                    && !compact_if_needed(&shared).await
                {
                    compact_not_before = Instant::now().checked_add(COMPACT_RETRY);
                }
            }
            Some(wait) => {
                tokio::select! {
                    () = shared.wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

/// Aborts the round's task when the worker itself is stopped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one round in its own task, so a panic in it (a bug here or in the batch settler)
/// cannot stop settlement for good. False if it panicked (raised): its payments stay queued,
/// and any that may have been sent carry their `sent` hash, so they are read from the chain
/// before a resend.
async fn guarded_round(shared: &Arc<Shared>) -> bool {
    let worker = shared.clone();
    let mut task = AbortOnDrop(tokio::spawn(async move { round(&worker).await }));
    match (&mut task.0).await {
        Ok(()) => true,
        Err(e) => {
            alert!(
                Alert::SettlementRetry,
                cause = &e,
                "deferred: a settlement round panicked; its payments stay queued and are \
                 retried in {:?}",
                shared.config.retry.0
            );
            false
        }
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
    for item in state.items.values().filter(|i| !i.held) {
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

/// One round: take up to `max_batch` due payments, reconcile, settle, record.
async fn round(shared: &Arc<Shared>) {
    let now = Instant::now();
    let taken: Vec<Taken> = {
        let state = shared.lock();
        state
            .items
            .iter()
            .filter(|(_, i)| !i.held && i.not_before.is_none_or(|t| t <= now))
            .take(shared.config.max_batch)
            .map(|(id, i)| Taken {
                id: *id,
                payment: i.payment.clone(),
                sent: i.sent.clone(),
                recovered: i.recovered,
            })
            .collect()
    };
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
