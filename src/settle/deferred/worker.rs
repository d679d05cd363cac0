//! The background worker: waits for a batch to fill (or its oldest payment to wait
//! `max_wait`), reconciles recovered and in-flight payments with the chain, settles the rest
//! through the [`BatchSettler`](super::BatchSettler), journals the outcomes and reports them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use async_trait::async_trait;

use super::journal::Record;
use super::{ChainState, Outcome, OutcomeStatus, SendLog, Settled, Shared, unix_ms};
use crate::settle::SettleError;
use crate::verify::{BoxError, VerifiedPayment};

/// The worker task: runs until aborted.
pub(super) async fn run(shared: Arc<Shared>) {
    loop {
        match due_in(&shared) {
            Some(wait) if wait.is_zero() => {
                round(&shared).await;
                compact_if_needed(&shared).await;
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
            Err(_) => back_off(shared, t.id),
        }
    }
    if !to_send.is_empty() {
        let payments: Vec<VerifiedPayment> = to_send.iter().map(|t| t.payment.clone()).collect();
        let ids: Vec<u64> = to_send.iter().map(|t| t.id).collect();
        let log = JournalLog { shared, ids: &ids };
        let results = shared.batch.settle_batch(&payments, &log).await;
        let mut results = results.into_iter();
        for id in ids.iter().copied() {
            match results.next() {
                Some(Ok(s)) => finals.push((id, Ok(s))),
                Some(Err(SettleError::Refused {
                    reason,
                    transaction,
                })) => finals.push((id, Err((reason.to_string(), transaction)))),
                Some(Err(_)) | None => back_off(shared, id),
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
    if shared.journal.append(&records).await.is_err() {
        // Not durable: keep them, and read the chain again before anything else happens.
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

async fn compact_if_needed(shared: &Arc<Shared>) {
    let (records, live) = shared.journal.sizes();
    if records <= shared.config.compact_after || records <= 2 * live as u64 {
        return;
    }
    let shared = shared.clone();
    // Blocking file I/O and syncs: off the runtime's threads. A failure leaves the old file.
    let _ = tokio::task::spawn_blocking(move || shared.journal.compact()).await;
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
