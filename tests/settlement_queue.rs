//! The deferred settler's worker with several rounds in flight
//! ([`DeferredSettlerBuilder::in_flight`]), over a [`BatchSettler`] that holds each batch
//! until the test releases it: how many batches are outstanding at once, that no payment is
//! in two of them, and that every payment settles exactly once.
#![cfg(feature = "deferred")]

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use alloy_primitives::{Address, B256, Bytes, U256};
use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc};
use tower_x402::Network;
use tower_x402::proto::X402Version;
use tower_x402::proto::exact::Authorization;
use tower_x402::settle::deferred::{
    BatchSettler, ChainState, DeferredSettler, Outcome, SendLog, Settled,
};
use tower_x402::settle::{SettleError, Settler};
use tower_x402::verify::VerifiedPayment;

const WAIT: Duration = Duration::from_secs(20);

/// Holds every batch until a permit is released for it; records what each batch carried.
struct Holding {
    release: Semaphore,
    /// Batches that entered `settle_batch` and have not returned yet.
    outstanding: AtomicUsize,
    /// The most outstanding at once.
    peak: AtomicUsize,
    /// Every batch's nonces, in the order they entered.
    batches: Mutex<Vec<Vec<B256>>>,
    /// Times each nonce was settled.
    settled: Mutex<HashMap<B256, usize>>,
}

impl Default for Holding {
    fn default() -> Self {
        Self {
            release: Semaphore::new(0),
            outstanding: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            batches: Mutex::default(),
            settled: Mutex::default(),
        }
    }
}

#[async_trait]
impl BatchSettler for Holding {
    async fn check(&self, _: &VerifiedPayment, _: U256) -> Result<(), SettleError> {
        Ok(())
    }

    async fn settle_batch(
        &self,
        payments: &[VerifiedPayment],
        log: &dyn SendLog,
    ) -> Vec<Result<Settled, SettleError>> {
        let nonces: Vec<B256> = payments.iter().map(VerifiedPayment::nonce).collect();
        self.batches.lock().unwrap().push(nonces.clone());
        let now = self.outstanding.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let tx = B256::from(alloy_primitives::keccak256(nonces[0]));
        let all: Vec<usize> = (0..payments.len()).collect();
        log.sending(tx, &all).await.expect("sent record");
        self.release
            .acquire()
            .await
            .expect("semaphore open")
            .forget();
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
        let mut settled = self.settled.lock().unwrap();
        for n in &nonces {
            *settled.entry(*n).or_default() += 1;
        }
        payments
            .iter()
            .map(|_| Ok(Settled::new(Some(tx), Some(40_000))))
            .collect()
    }

    async fn state(&self, _: &VerifiedPayment, _: &[B256]) -> Result<ChainState, SettleError> {
        Ok(ChainState::Unused)
    }
}

fn payment(i: u8) -> VerifiedPayment {
    VerifiedPayment::exact(
        X402Version::V2,
        Network::BASE_SEPOLIA,
        Address::repeat_byte(1),
        Authorization {
            from: Address::repeat_byte(2),
            to: Address::repeat_byte(3),
            value: U256::from(1000),
            valid_after: U256::ZERO,
            valid_before: U256::from(u64::MAX),
            nonce: B256::repeat_byte(i),
        },
        Bytes::from(vec![1; 65]),
    )
}

fn journal(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tower-x402-sq-{test}-{}", std::process::id()));
    // A leftover of an earlier run, if any; absent is fine.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("x402.journal")
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_batches_in_flight_on_disjoint_payments_each_settled_once() {
    let batch = std::sync::Arc::new(Holding::default());
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let settler = DeferredSettler::builder(batch.clone())
        .journal(journal("in-flight"))
        .max_batch(4)
        .max_wait(Duration::ZERO)
        .in_flight(4)
        .on_outcome(move |o| {
            let _ = tx.send(o.clone());
        })
        .start()
        .expect("deferred settler");
    // 24 payments: enough for 6 batches of 4, of which at most 4 may be out at once.
    for i in 1..=24u8 {
        settler.settle(&payment(i)).await.expect("accepted");
    }
    until("4 batches outstanding", || {
        batch.outstanding.load(Ordering::SeqCst) == 4
    })
    .await;
    // Give the worker every chance to overshoot before looking.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(batch.outstanding.load(Ordering::SeqCst), 4);
    assert_eq!(
        batch.peak.load(Ordering::SeqCst),
        4,
        "never more than in_flight"
    );
    {
        let batches = batch.batches.lock().unwrap();
        assert_eq!(batches.len(), 4, "a fifth waits for a round to end");
        let mut seen = std::collections::HashSet::new();
        for b in batches.iter() {
            for n in b {
                assert!(seen.insert(*n), "payment {n} is in two batches in flight");
            }
        }
    }
    batch.release.add_permits(1_000);
    tokio::time::timeout(WAIT, settler.idle())
        .await
        .expect("everything settled");
    let mut outcomes = Vec::new();
    while let Ok(o) = rx.try_recv() {
        outcomes.push(o);
    }
    assert_eq!(outcomes.len(), 24, "one outcome per payment");
    assert!(outcomes.iter().all(Outcome::is_settled));
    let settled = batch.settled.lock().unwrap();
    assert_eq!(settled.len(), 24);
    assert!(
        settled.values().all(|n| *n == 1),
        "each payment settled exactly once: {settled:?}"
    );
    assert!(batch.peak.load(Ordering::SeqCst) <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_in_flight_is_the_default_and_sends_one_batch_at_a_time() {
    let batch = std::sync::Arc::new(Holding::default());
    let settler = DeferredSettler::builder(batch.clone())
        .journal(journal("one"))
        .max_batch(4)
        .max_wait(Duration::ZERO)
        .start()
        .expect("deferred settler");
    for i in 1..=12u8 {
        settler.settle(&payment(i)).await.expect("accepted");
    }
    until("a batch outstanding", || {
        batch.outstanding.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(batch.batches.lock().unwrap().len(), 1, "one at a time");
    batch.release.add_permits(1_000);
    tokio::time::timeout(WAIT, settler.idle())
        .await
        .expect("everything settled");
    assert_eq!(batch.peak.load(Ordering::SeqCst), 1);
    let settled = batch.settled.lock().unwrap();
    assert_eq!(settled.len(), 12);
    assert!(settled.values().all(|n| *n == 1));
}
