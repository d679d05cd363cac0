//! The background worker: leases due payments from the queue (a full batch at once, else
//! those that waited `max_wait`), reconciles recovered and possibly sent ones with the chain,
//! settles the rest through the [`BatchSettler`](super::BatchSettler), records the outcomes
//! and reports them. Up to `in_flight` rounds run at once; the queue's leases keep their
//! payments disjoint.

use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::B256;
use async_trait::async_trait;
use tokio::task::JoinSet;

use super::queue::{Final, LeaseRequest, Leased};
use super::{ChainState, Outcome, OutcomeStatus, SendLog, Shared, unix_ms};
use crate::alert::{Alert, alert};
use crate::settle::SettleError;
use crate::verify::{BoxError, VerifiedPayment};

/// The worker task: runs until aborted (its rounds with it).
pub(super) async fn run(shared: Arc<Shared>) {
    let mut rounds: JoinSet<()> = JoinSet::new();
    // Consecutive failed leases (the queue is down): backs off like a failed round.
    let mut failures = 0u32;
    refresh_pending(&shared).await;
    loop {
        while let Some(done) = rounds.try_join_next() {
            reaped(&shared, done);
        }
        if rounds.len() < shared.config.in_flight.max(1) {
            let ripe = unix_ms()
                .saturating_sub(shared.config.max_wait.as_millis() as u64)
                .max(shared.flush_ms.load(std::sync::atomic::Ordering::SeqCst));
            let req = LeaseRequest::new(
                shared.owner,
                shared.config.max_batch,
                shared.config.lease_ttl,
                ripe,
            );
            match shared.queue.lease(req).await {
                Ok(leased) if !leased.is_empty() => {
                    failures = 0;
                    let worker = shared.clone();
                    rounds.spawn(async move {
                        let _guard = OnPanic {
                            shared: worker.clone(),
                            ids: leased.iter().map(|l| l.id).collect(),
                        };
                        round(&worker, leased).await;
                    });
                    // Maybe more is due: look again before sleeping.
                    continue;
                }
                Ok(_) => {
                    failures = 0;
                    if rounds.is_empty() {
                        refresh_pending(&shared).await;
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    alert!(
                        Alert::SettlementRetry,
                        cause = &e,
                        "deferred: could not lease due payments from the queue; they stay \
                         queued and the worker retries with backoff"
                    );
                }
            }
        }
        let wait = if failures > 0 {
            backoff(&shared, failures)
        } else {
            shared.config.poll
        };
        tokio::select! {
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
            Some(done) = rounds.join_next(), if !rounds.is_empty() => reaped(&shared, done),
        }
    }
}

/// Asks the queue how many payments are not final (for `pending` and `idle`).
async fn refresh_pending(shared: &Shared) {
    use std::sync::atomic::Ordering::SeqCst;
    if shared.changing.load(SeqCst) != 0 {
        // A change in progress may or may not be in the answer: look again later.
        return;
    }
    let before = shared.changes.load(SeqCst);
    let Ok(n) = shared.queue.pending().await else {
        return;
    };
    shared.pending.send_if_modified(|v| {
        // A change started meanwhile may be missing from the answer.
        if shared.changes.load(SeqCst) != before || *v == Some(n) {
            return false;
        }
        *v = Some(n);
        true
    });
}

/// A round ended: raise a panic (a bug here or in the batch settler: its payments stay
/// queued and are retried after `retry.0`; any that may have been sent carry their `sent`
/// hash, so they are read from the chain first).
fn reaped(shared: &Shared, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        alert!(
            Alert::SettlementRetry,
            cause = &e,
            "deferred: a settlement round panicked; its payments stay queued and are \
             retried in {:?}",
            shared.config.retry.0
        );
    }
}

/// Gives a panicking round's leases back (in a task: `Drop` cannot wait), so its payments are
/// retried after `retry.0` rather than after the lease TTL.
struct OnPanic {
    shared: Arc<Shared>,
    ids: Vec<u64>,
}

impl Drop for OnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let shared = self.shared.clone();
        let ids = std::mem::take(&mut self.ids);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let retry = shared.config.retry.0;
                // Failing, the leases expire by themselves.
                let _ = shared.queue.release(shared.owner, &ids, retry, true).await;
                shared.wake.notify_one();
            });
        }
    }
}

/// The wait before the `attempt`-th retry: `retry.0` doubling, at most `retry.1`.
fn backoff(shared: &Shared, attempt: u32) -> Duration {
    let (first, max) = shared.config.retry;
    let factor = 1u32 << attempt.saturating_sub(1).min(20);
    first.saturating_mul(factor).min(max)
}

/// Gives `ids` back to the queue, due again after `wait`.
async fn release(shared: &Shared, ids: &[u64], wait: Duration, failed: bool) {
    if ids.is_empty() {
        return;
    }
    if let Err(e) = shared.queue.release(shared.owner, ids, wait, failed).await {
        alert!(
            Alert::SettlementRetry,
            cause = &e,
            "deferred: could not give {} leased payments back to the queue; they are \
             retried when the lease expires",
            ids.len()
        );
    }
}

/// Renews a round's leases every third of the TTL until dropped.
struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn renew(shared: &Arc<Shared>, ids: Vec<u64>) -> Renewal {
    let shared = shared.clone();
    Renewal(tokio::spawn(async move {
        let ttl = shared.config.lease_ttl;
        loop {
            tokio::time::sleep(ttl / 3).await;
            if let Err(e) = shared.queue.renew(shared.owner, &ids, ttl).await {
                // Lost or unreachable: `sent` is refused without the lease, so nothing more
                // is broadcast; whoever takes them over reads the chain first.
                alert!(
                    Alert::SettlementRetry,
                    cause = &e,
                    "deferred: could not renew the lease of a round's {} payments",
                    ids.len()
                );
            }
        }
    }))
}

/// One round on the payments leased for it: reconcile, settle, record.
async fn round(shared: &Arc<Shared>, leased: Vec<Leased>) {
    let _renewal = renew(shared, leased.iter().map(|l| l.id).collect());
    let mut finals: Vec<(Leased, Final)> = Vec::new();
    let mut to_send: Vec<Leased> = Vec::new();
    for l in leased {
        if !l.recovered && l.sent.is_empty() {
            to_send.push(l);
            continue;
        }
        // Never resend before the chain says the payment is not there yet.
        match shared.batch.state(&l.payment, &l.sent).await {
            Ok(ChainState::Settled(s)) => {
                finals.push((
                    l,
                    Final::Settled {
                        tx: s.transaction,
                        gas_used: s.gas_used,
                    },
                ));
            }
            Ok(ChainState::InFlight(_)) => {
                release(shared, &[l.id], shared.config.retry.0, false).await;
            }
            Ok(ChainState::Unused) => to_send.push(l),
            Err(e) => {
                alert!(
                    Alert::SettlementRetry,
                    cause = &e,
                    "deferred: could not read where payment {} stands on-chain; retrying \
                     with backoff",
                    l.id
                );
                let wait = backoff(shared, l.attempts.saturating_add(1));
                release(shared, &[l.id], wait, true).await;
            }
        }
    }
    if !to_send.is_empty() {
        let payments: Vec<VerifiedPayment> = to_send.iter().map(|l| l.payment.clone()).collect();
        let ids: Vec<u64> = to_send.iter().map(|l| l.id).collect();
        let log = QueueLog { shared, ids: &ids };
        let results = shared.batch.settle_batch(&payments, &log).await;
        let mut results = results.into_iter();
        let (mut retried, mut first) = (Vec::new(), None);
        for l in to_send {
            match results.next() {
                Some(Ok(s)) => finals.push((
                    l,
                    Final::Settled {
                        tx: s.transaction,
                        gas_used: s.gas_used,
                    },
                )),
                Some(Err(SettleError::Refused {
                    reason,
                    transaction,
                })) => finals.push((
                    l,
                    Final::Failed {
                        reason: reason.to_string(),
                        tx: transaction,
                    },
                )),
                Some(Err(e)) => {
                    first.get_or_insert(e);
                    retried.push(l);
                }
                // A batch settler that answered for fewer payments than it was given.
                None => retried.push(l),
            }
        }
        if !retried.is_empty() {
            {
                let detail = format_args!(
                    "deferred: {} of {} payments did not settle this round; retrying with \
                     backoff (read from the chain first if they may have been sent)",
                    retried.len(),
                    ids.len()
                );
                match &first {
                    Some(e) => alert!(Alert::SettlementRetry, cause = e, "{detail}"),
                    None => alert!(Alert::SettlementRetry, "{detail}"),
                }
            }
            for l in &retried {
                let wait = backoff(shared, l.attempts.saturating_add(1));
                release(shared, &[l.id], wait, true).await;
            }
        }
    }
    finish(shared, finals).await;
}

/// Records final outcomes (one write for all), reports those recorded now.
async fn finish(shared: &Shared, finals: Vec<(Leased, Final)>) {
    if finals.is_empty() {
        return;
    }
    let records: Vec<(u64, Final)> = finals.iter().map(|(l, f)| (l.id, f.clone())).collect();
    // Until reported, `idle` must not see these gone.
    let changing = super::Changing::start(shared);
    let recorded = match shared.queue.finish(&records).await {
        Ok(r) => r,
        Err(e) => {
            // Not durable: they stay queued; those that may have been sent carry their
            // `sent` hash and are read from the chain before anything is resent.
            alert!(
                Alert::SettlementRetry,
                cause = &e,
                "deferred: {} final outcomes could not be recorded; they are read from the \
                 chain again on retry",
                finals.len()
            );
            for (l, _) in &finals {
                let wait = backoff(shared, l.attempts.saturating_add(1));
                release(shared, &[l.id], wait, true).await;
            }
            return;
        }
    };
    let now_ms = unix_ms();
    let outcomes: Vec<Outcome> = finals
        .into_iter()
        .zip(recorded)
        // Already final (another instance got there first): reported there.
        .filter(|(_, now)| *now)
        .map(|((l, f), _)| {
            let p = &l.payment;
            let (transaction, gas_used, status) = match f {
                Final::Settled { tx, gas_used } => (tx, gas_used, OutcomeStatus::Settled),
                Final::Failed { reason, tx } => (tx, None, OutcomeStatus::Failed(reason)),
            };
            Outcome {
                id: l.id,
                payer: p.payer,
                asset: p.asset,
                pay_to: p.pay_to,
                amount: p.amount,
                nonce: p.nonce(),
                transaction,
                gas_used,
                status,
                latency: Duration::from_millis(now_ms.saturating_sub(l.accepted_ms)),
            }
        })
        .collect();
    if let Some(hook) = &shared.hook {
        for o in &outcomes {
            hook(o);
        }
    }
    drop(changing);
    refresh_pending(shared).await;
}

/// Records `sent(tx)` for the round's payments before the batch settler broadcasts.
struct QueueLog<'a> {
    shared: &'a Shared,
    ids: &'a [u64],
}

#[async_trait]
impl SendLog for QueueLog<'_> {
    async fn sending(&self, transaction: B256, payments: &[usize]) -> Result<(), BoxError> {
        let ids: Vec<u64> = payments
            .iter()
            .filter_map(|i| self.ids.get(*i).copied())
            .collect();
        self.shared
            .queue
            .sent(self.shared.owner, &ids, transaction)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use alloy_primitives::{Address, Bytes, U256};

    use super::super::{BatchSettler, ChainState, DeferredSettler, SendLog, Settled};
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
