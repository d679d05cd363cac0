//! Failures of the deferred settler's journal after a payment reached it, injected with
//! [`JournalFaults`] behind a real `PaymentLayer`, settling on a local anvil chain (see
//! `tests/chain/mod.rs`; no chain mocks).
//!
//! Each test asserts what the client gets (status, `Retry-After`, receipt), how often the
//! handler ran, and that nothing accepted is lost: after a restart on the same journal every
//! accepted payment settles exactly once (payee balance, `authorizationState`, relayer
//! transactions). Without anvil the tests print SKIPPED (and fail under `CI=true`).
#![cfg(all(
    feature = "onchain",
    feature = "deferred",
    feature = "axum",
    feature = "test-util"
))]

mod chain;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256, U256};
use alloy_provider::Provider;
use axum::Router;
use axum::body::Body;
use axum::routing::get;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_x402::alert::{self, Alert};
use tower_x402::proto::X402Version;
use tower_x402::settle::deferred::{DeferredSettler, JournalFaults, Outcome};
use tower_x402::settle::onchain::OnchainSettler;
use tower_x402::test_util::{PrivateKeySigner, demo_payer, pay};
use tower_x402::{Asset, ExactEvmVerifier, PaymentLayer, PaymentOption};

use chain::{Chain, PAY_TO, PAYER3_KEY, PAYER4_KEY, RELAYER, RELAYER_KEY};

/// `$0.01` in 6-decimal USDC units.
const PRICE_UNITS: u64 = 10_000;
const WAIT: Duration = Duration::from_secs(30);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn option() -> PaymentOption {
    PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.01", PAY_TO).expect("valid option")
}

fn payers() -> [PrivateKeySigner; 3] {
    let key = |hex: &str| hex.parse().expect("anvil key");
    [demo_payer(), key(PAYER3_KEY), key(PAYER4_KEY)]
}

fn journal(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tower-x402-faults-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("x402.journal")
}

/// A deferred settler on `path` that sends only when flushed (or when `compact_after` is
/// reached by a flushed round), with its outcomes on the returned channel.
async fn settler(
    chain: &Chain,
    path: &Path,
    faults: &JournalFaults,
    compact_after: u64,
) -> (DeferredSettler, mpsc::UnboundedReceiver<Outcome>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let onchain = OnchainSettler::connect(
        chain.url(),
        RELAYER_KEY.parse::<PrivateKeySigner>().expect("key"),
    )
    .await
    .expect("settler");
    let settler = DeferredSettler::builder(onchain)
        .journal(path)
        .max_batch(8)
        .max_wait(Duration::from_secs(600))
        .retry(Duration::from_millis(100), Duration::from_millis(400))
        .compact_after(compact_after)
        .journal_faults(faults.clone())
        .on_outcome(move |o| {
            let _ = tx.send(o.clone());
        })
        .start()
        .expect("deferred settler");
    (settler, rx)
}

/// A paid `$0.01` route counting its runs.
struct App {
    router: Router,
    runs: Arc<AtomicUsize>,
}

fn app(settler: &DeferredSettler) -> App {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let layer = PaymentLayer::builder()
        .no_challenge_binding()
        .accept(option())
        .verifier(ExactEvmVerifier::new())
        .settler(settler.clone())
        .build()
        .expect("layer");
    let router = Router::new()
        .route(
            "/paid",
            get(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { "paid content" }
            }),
        )
        .route_layer(layer);
    App { router, runs }
}

impl App {
    async fn get(&self, header: &(HeaderName, HeaderValue)) -> (StatusCode, HeaderMap) {
        let req = Request::get("/paid")
            .header(header.0.clone(), header.1.clone())
            .body(Body::empty())
            .expect("request");
        let res = self.router.clone().oneshot(req).await.expect("infallible");
        let (parts, body) = res.into_parts();
        let _ = body.collect().await.expect("body");
        (parts.status, parts.headers)
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

fn proof(payer: &PrivateKeySigner) -> (HeaderName, HeaderValue) {
    pay(payer, option().requirements(), now(), X402Version::V2)
}

/// The receipt's `success`, or `None` without a receipt.
fn receipt(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get("payment-response")?;
    let json = base64::engine::general_purpose::STANDARD
        .decode(value.as_bytes())
        .expect("base64");
    let v: Value = serde_json::from_slice(&json).expect("json");
    v["success"].as_bool()
}

/// 200 with a successful receipt.
fn assert_served(status: StatusCode, headers: &HeaderMap) {
    assert_eq!(status, StatusCode::OK, "{headers:?}");
    assert_eq!(receipt(headers), Some(true), "{headers:?}");
}

/// 503 with `Retry-After` and at most a failed receipt: nothing was accepted.
fn assert_unavailable(status: StatusCode, headers: &HeaderMap) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{headers:?}");
    assert!(
        headers.contains_key(http::header::RETRY_AFTER),
        "{headers:?}"
    );
    assert_ne!(
        receipt(headers),
        Some(true),
        "no success for a payment not accepted"
    );
}

fn nonce_of(header: &HeaderValue) -> (Address, B256) {
    let json = base64::engine::general_purpose::STANDARD
        .decode(header.as_bytes())
        .expect("base64");
    let v: Value = serde_json::from_slice(&json).expect("json");
    let a = &v["payload"]["authorization"];
    (
        a["from"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("from"),
        a["nonce"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("nonce"),
    )
}

async fn relayer_txs(chain: &Chain) -> u64 {
    chain
        .provider()
        .get_transaction_count(RELAYER)
        .latest()
        .await
        .expect("nonce")
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what} after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Restarts on `path` (the old settler and app are dropped first, like a crash), settles
/// what the journal holds and checks that exactly `accepted` settled, once each: one
/// settled outcome per proof, each authorization used, the payee paid `accepted` times since
/// `before`, and nothing left pending.
async fn restart_and_settle(
    chain: &Chain,
    path: &Path,
    accepted: &[&(HeaderName, HeaderValue)],
    already_settled: usize,
    before: U256,
) {
    let (settler, mut rx) = settler(chain, path, &JournalFaults::new(), 10_000).await;
    assert_eq!(
        settler.pending(),
        accepted.len() - already_settled,
        "the journal holds every accepted payment not settled yet"
    );
    settler.flush();
    let mut settled = Vec::new();
    while settled.len() < accepted.len() - already_settled {
        let o = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("outcomes")
            .expect("worker alive");
        assert!(o.is_settled(), "{o:?}");
        settled.push((o.payer, o.nonce));
    }
    tokio::time::timeout(WAIT, settler.idle())
        .await
        .expect("idle");
    for header in accepted {
        let (from, nonce) = nonce_of(&header.1);
        assert!(
            chain.authorization_used(from, nonce).await,
            "{nonce} settled"
        );
    }
    settled.sort();
    settled.dedup();
    assert_eq!(
        settled.len(),
        accepted.len() - already_settled,
        "one outcome each"
    );
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(PRICE_UNITS * accepted.len() as u64),
        "each accepted payment moved once"
    );
    // A second restart finds nothing to do.
    drop(settler);
    let (again, _rx) = self::settler(chain, path, &JournalFaults::new(), 10_000).await;
    assert_eq!(again.pending(), 0);
}

/// A failed journal append (`fail` arms it) after the handler ran: 503 + `Retry-After`, no
/// receipt, the proof released; the same proof sent again is served and settles once.
async fn failed_append(test: &str, fail: impl Fn(&JournalFaults)) {
    let Some(chain) = Chain::start(test).await else {
        return;
    };
    let path = journal(test);
    let faults = JournalFaults::new();
    let (deferred, _rx) = settler(&chain, &path, &faults, 10_000).await;
    let app = app(&deferred);
    let before = chain.balance(PAY_TO).await;
    let alerts = alert::count(Alert::JournalWrite);

    let header = proof(&demo_payer());
    fail(&faults);
    let (status, res) = app.get(&header).await;
    assert_unavailable(status, &res);
    assert_eq!(app.runs(), 1, "the handler ran; its answer was withheld");
    assert_eq!(deferred.pending(), 0, "nothing accepted");
    assert_eq!(faults.armed(), 0, "the fault was hit");
    assert!(alert::count(Alert::JournalWrite) > alerts, "raised");

    // The journal recovered by itself: the released proof, unchanged, buys the call now.
    let (status, res) = app.get(&header).await;
    assert_served(status, &res);
    assert_eq!(app.runs(), 2);
    assert_eq!(deferred.pending(), 1);
    // A replay of the accepted proof is refused before the handler.
    let (status, _) = app.get(&header).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(app.runs(), 2);

    drop((app, deferred));
    restart_and_settle(&chain, &path, &[&header], 0, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_journal_write_answers_503_and_the_proof_is_served_and_settled_once() {
    failed_append("faults_write", |f| f.fail_writes(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_journal_sync_answers_503_and_the_proof_is_served_and_settled_once() {
    failed_append("faults_sync", |f| f.fail_syncs(1)).await;
}

/// The worker's `sent` record cannot be synced: nothing is broadcast, the worker retries
/// (raised) and, the journal having recovered, settles the payment with one transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_sent_record_blocks_the_broadcast_and_the_worker_settles_on_retry() {
    let Some(chain) = Chain::start("faults_sent").await else {
        return;
    };
    let path = journal("faults_sent");
    let faults = JournalFaults::new();
    let (deferred, mut rx) = settler(&chain, &path, &faults, 10_000).await;
    let app = app(&deferred);
    let before = chain.balance(PAY_TO).await;
    let header = proof(&demo_payer());
    let (status, res) = app.get(&header).await;
    assert_served(status, &res);
    let txs = relayer_txs(&chain).await;
    let retries = alert::count(Alert::SettlementRetry);

    faults.fail_syncs(1);
    deferred.flush();
    let o = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("outcome")
        .expect("worker alive");
    assert!(o.is_settled(), "{o:?}");
    assert_eq!(faults.armed(), 0, "the `sent` append failed once");
    assert!(
        alert::count(Alert::SettlementRetry) > retries,
        "the retry was raised"
    );
    assert_eq!(
        relayer_txs(&chain).await,
        txs + 1,
        "one broadcast, after the retry"
    );
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(PRICE_UNITS)
    );
    assert_eq!(app.runs(), 1);
    drop((app, deferred));
    restart_and_settle(&chain, &path, &[&header], 1, before).await;
}

/// Serves one paid request per payer (3), settles them in one round, which makes the journal
/// due for compaction (`compact_after(4)`), and waits until the armed faults were hit.
async fn served_settled_and_compacted(
    chain: &Chain,
    app: &App,
    deferred: &DeferredSettler,
    faults: &JournalFaults,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::new();
    for payer in &payers() {
        let header = proof(payer);
        let (status, res) = app.get(&header).await;
        assert_served(status, &res);
        headers.push(header);
    }
    let txs = relayer_txs(chain).await;
    deferred.flush();
    tokio::time::timeout(WAIT, deferred.idle())
        .await
        .expect("settled");
    assert_eq!(relayer_txs(chain).await, txs + 1, "one batch");
    until("the compaction fault", || faults.armed() == 0).await;
    headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_compaction_rename_keeps_appending_to_the_journal_and_loses_nothing() {
    let Some(chain) = Chain::start("faults_rename").await else {
        return;
    };
    let path = journal("faults_rename");
    let faults = JournalFaults::new();
    let (deferred, _rx) = settler(&chain, &path, &faults, 4).await;
    let app = app(&deferred);
    let before = chain.balance(PAY_TO).await;
    let alerts = alert::count(Alert::JournalCompaction);
    faults.fail_renames(1);
    let mut headers = served_settled_and_compacted(&chain, &app, &deferred, &faults).await;
    until("the compaction alert", || {
        alert::count(Alert::JournalCompaction) > alerts
    })
    .await;

    // Accepted after the failed compaction: it must be in the file the path names.
    let header = proof(&demo_payer());
    let (status, res) = app.get(&header).await;
    assert_served(status, &res);
    assert_eq!(app.runs(), 4);
    headers.push(header);
    drop((app, deferred));
    let accepted: Vec<_> = headers.iter().collect();
    restart_and_settle(&chain, &path, &accepted, 3, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_directory_sync_after_compaction_refuses_one_append_and_loses_nothing() {
    let Some(chain) = Chain::start("faults_dirsync").await else {
        return;
    };
    let path = journal("faults_dirsync");
    let faults = JournalFaults::new();
    let (deferred, _rx) = settler(&chain, &path, &faults, 4).await;
    let app = app(&deferred);
    let before = chain.balance(PAY_TO).await;
    let size_before = std::fs::metadata(&path).expect("journal").len();
    // The compaction's directory sync fails after its rename, and so does the retry before
    // the next append is acknowledged.
    faults.fail_dir_syncs(2);
    let alerts = alert::count(Alert::JournalCompaction);
    let mut headers = Vec::new();
    for payer in &payers() {
        let header = proof(payer);
        let (status, res) = app.get(&header).await;
        assert_served(status, &res);
        headers.push(header);
    }
    assert!(std::fs::metadata(&path).expect("journal").len() > size_before);
    deferred.flush();
    tokio::time::timeout(WAIT, deferred.idle())
        .await
        .expect("settled");
    until("the compaction's directory sync fault", || {
        faults.armed() == 1
    })
    .await;
    until("the compaction alert", || {
        alert::count(Alert::JournalCompaction) > alerts
    })
    .await;

    let header = proof(&demo_payer());
    let (status, res) = app.get(&header).await;
    assert_unavailable(status, &res);
    assert_eq!(app.runs(), 4, "its handler ran; the answer was withheld");
    assert_eq!(faults.armed(), 0);
    let (status, res) = app.get(&header).await;
    assert_served(status, &res);
    assert_eq!(app.runs(), 5);
    headers.push(header);
    drop((app, deferred));
    let accepted: Vec<_> = headers.iter().collect();
    restart_and_settle(&chain, &path, &accepted, 3, before).await;
}
