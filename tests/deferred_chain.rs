//! What the chain does to settlements after they are sent, on a local anvil (see
//! `tests/chain/mod.rs`; no chain mocks): a block holding a batch rolled back (reorg), a
//! transaction stuck in the pool (replaced with higher fees), and the RPC cut under load
//! (through a TCP proxy the test cuts). Each test checks that every accepted payment moves
//! exactly once: one `AuthorizationUsed` log per authorization on the canonical chain, and
//! the payee's balance. Without anvil the tests print SKIPPED (and fail under `CI=true`).
#![cfg(all(
    feature = "onchain",
    feature = "deferred",
    feature = "axum",
    feature = "test-util"
))]

mod chain;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256, U256};
use alloy_provider::Provider;
use async_trait::async_trait;
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
use tower_x402::settle::deferred::{BatchSettler, DeferredSettler, Outcome, SendLog};
use tower_x402::settle::onchain::{OnchainSettler, RolledBack};
use tower_x402::settle::{SettleError, Settler};
use tower_x402::test_util::{PrivateKeySigner, authorization, demo_payer, pay, sign};
use tower_x402::verify::{BoxError, VerifiedPayment};
use tower_x402::{Asset, ExactEvmVerifier, Network, PaymentLayer, PaymentOption};

use chain::{Chain, PAY_TO, PAYER3_KEY, PAYER4_KEY, RELAYER, RELAYER_KEY, RpcProxy};

/// `$0.01` in 6-decimal USDC units.
const PRICE_UNITS: u64 = 10_000;
const WAIT: Duration = Duration::from_secs(60);

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

fn relayer() -> PrivateKeySigner {
    RELAYER_KEY.parse().expect("key")
}

/// A fresh journal path for `test` (its directory emptied).
fn journal(test: &str) -> PathBuf {
    let path = journal_path(test);
    let dir = path.parent().expect("a directory");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("temp dir");
    path
}

/// Where `test`'s journal lives.
fn journal_path(test: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!("tower-x402-chain-{test}-{}", std::process::id()))
        .join("x402.journal")
}

/// A deferred settler over `onchain` that sends when flushed (or when `max_wait` passes),
/// its outcomes on the returned channel.
fn deferred(
    onchain: OnchainSettler,
    test: &str,
    configure: impl FnOnce(
        tower_x402::settle::deferred::DeferredSettlerBuilder,
    ) -> tower_x402::settle::deferred::DeferredSettlerBuilder,
) -> (DeferredSettler, mpsc::UnboundedReceiver<Outcome>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let builder = DeferredSettler::builder(onchain)
        .journal(journal(test))
        .max_batch(8)
        .max_wait(Duration::from_secs(600))
        .retry(Duration::from_millis(100), Duration::from_millis(400))
        .on_outcome(move |o| {
            let _ = tx.send(o.clone());
        });
    let settler = configure(builder).start().expect("deferred settler");
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
    // Proofs are signed for `option()` directly (no 402 round trip first), as in
    // tests/deferred_faults.rs: what is tested is the chain side, not the challenge binding.
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

/// A verified payment of `$0.01` signed by `payer` (what the layer hands a settler).
fn payment(payer: &PrivateKeySigner) -> VerifiedPayment {
    let req = option().requirements().clone();
    let auth = authorization(&req, payer.address(), now());
    let signature = sign(payer, &req, &auth);
    VerifiedPayment::exact(
        X402Version::V2,
        Network::BASE_SEPOLIA,
        chain::TOKEN,
        auth,
        signature,
    )
}

/// The relayer's mined transaction count.
async fn relayer_txs(chain: &Chain) -> u64 {
    chain
        .provider()
        .get_transaction_count(RELAYER)
        .latest()
        .await
        .expect("nonce")
}

async fn until_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + WAIT;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The hash of the first transaction of the head block.
async fn head_tx(chain: &Chain) -> B256 {
    let head = chain.head().await;
    let block = chain
        .provider()
        .get_block_by_number(head.into())
        .await
        .expect("eth_getBlockByNumber")
        .expect("head block");
    block.transactions.hashes().next().expect("a transaction")
}

/// Returns once the settler behind `proxy` has read a mined receipt: called after the test
/// saw the transaction mined, two more receipt polls mean the first of them reached the node
/// after the block and its answer was handled (polls are sequential).
async fn seen_mined(proxy: &RpcProxy) {
    let polls = proxy.calls("eth_getTransactionReceipt");
    until_async("the settler polled the mined receipt", || async {
        proxy.calls("eth_getTransactionReceipt") >= polls + 2
    })
    .await;
}

/// A transaction as the node returns it (`eth_getTransactionByHash`).
async fn tx_json(chain: &Chain, hash: B256) -> Value {
    let tx: Value = chain
        .provider()
        .raw_request("eth_getTransactionByHash".into(), (hash,))
        .await
        .expect("eth_getTransactionByHash");
    assert!(!tx.is_null(), "{hash} known");
    tx
}

/// Mines a block every 100 ms until dropped (anvil's automine only mines on a new
/// transaction; confirmations need blocks after it).
struct Miner(Arc<AtomicBool>, tokio::task::JoinHandle<()>);

impl Miner {
    fn start(chain: &Chain) -> Miner {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, url) = (stop.clone(), chain.url().to_owned());
        let task = tokio::spawn(async move {
            let provider = alloy_provider::RootProvider::<alloy_network::Ethereum>::connect(&url)
                .await
                .expect("provider");
            while !flag.load(Ordering::SeqCst) {
                let _: Result<Value, _> = provider.raw_request("evm_mine".into(), ()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Miner(stop, task)
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
        self.1.abort();
    }
}

/// Every one of `nonces` moved the money exactly once on the canonical chain, and the payee
/// got exactly that many payments since `before`.
async fn moved_once(chain: &Chain, nonces: &[(Address, B256)], before: U256) {
    for (from, nonce) in nonces {
        assert_eq!(
            chain.authorization_used_logs(*from, *nonce).await,
            1,
            "one AuthorizationUsed for {nonce}"
        );
        assert!(chain.authorization_used(*from, *nonce).await);
    }
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(PRICE_UNITS * nonces.len() as u64),
        "each payment moved once"
    );
}

/// A batch mined, then its block reorged away while the settler waits for 3 confirmations:
/// detected (counted, raised), its payments come back as unknown, the worker reads them from
/// the chain (unused, the transaction dropped) and sends them again: each settles exactly
/// once, in another transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reorged_batch_is_detected_and_its_payments_settle_again_exactly_once() {
    let Some(chain) = Chain::start("chain_reorg").await else {
        return;
    };
    // Through a proxy that counts the settler's receipt polls (see `seen_mined`).
    let proxy = RpcProxy::start(chain.url()).await;
    let onchain = OnchainSettler::connect(proxy.url(), relayer())
        .await
        .expect("settler")
        .with_confirmations(3)
        .with_poll_interval(Duration::from_millis(50));
    let stats = onchain.clone();
    let (deferred, mut rx) = deferred(onchain, "reorg", |b| b);
    let app = app(&deferred);
    let before = chain.balance(PAY_TO).await;
    let reorgs = alert::count(Alert::ChainReorg);

    let headers: Vec<_> = payers().iter().map(proof).collect();
    for h in &headers {
        let (status, res) = app.get(h).await;
        assert_eq!(status, StatusCode::OK, "{res:?}");
        assert_eq!(receipt(&res), Some(true));
    }
    assert_eq!(app.runs(), 3);
    let txs = relayer_txs(&chain).await;
    deferred.flush();
    // Automine puts the batch in its own block; no block follows until the test mines one,
    // so the settler is still waiting for its confirmations.
    until_async("the batch mined", || async {
        relayer_txs(&chain).await == txs + 1
    })
    .await;
    let first = head_tx(&chain).await;
    seen_mined(&proxy).await;
    chain.reorg(1).await;
    assert!(
        chain
            .provider()
            .get_transaction_receipt(first)
            .await
            .expect("receipt")
            .is_none(),
        "the reorg dropped the batch"
    );
    assert_eq!(relayer_txs(&chain).await, txs, "and the relayer's nonce");
    let _miner = Miner::start(&chain);

    let mut outcomes = Vec::new();
    while outcomes.len() < headers.len() {
        let o = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("outcomes")
            .expect("worker alive");
        outcomes.push(o);
    }
    for o in &outcomes {
        assert!(o.is_settled(), "{o:?}");
        assert_ne!(o.transaction, Some(first), "settled by the resend");
    }
    tokio::time::timeout(WAIT, deferred.idle())
        .await
        .expect("idle");
    assert_eq!(stats.stats().rolled_back, 1, "detected once");
    assert!(alert::count(Alert::ChainReorg) > reorgs, "raised");
    let nonces: Vec<_> = headers.iter().map(|h| nonce_of(&h.1)).collect();
    moved_once(&chain, &nonces, before).await;
    assert_eq!(relayer_txs(&chain).await, txs + 1, "one batch on the chain");
    assert_eq!(app.runs(), 3);
}

/// The reorg that drops a batch also carries a transfer emptying one payer's wallet: after
/// the rollback that payer's payment can no longer settle and ends failed, the token's reason
/// in the outcome hook; the other payment settles once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reorg_that_empties_a_payers_wallet_ends_its_payment_failed_with_the_reason() {
    let Some(chain) = Chain::start("chain_reorg_failed").await else {
        return;
    };
    let proxy = RpcProxy::start(chain.url()).await;
    let onchain = OnchainSettler::connect(proxy.url(), relayer())
        .await
        .expect("settler")
        .with_confirmations(3)
        .with_poll_interval(Duration::from_millis(50));
    let (deferred, mut rx) = deferred(onchain, "reorg_failed", |b| b);
    let app = app(&deferred);
    let before = chain.balance(PAY_TO).await;
    let [emptied, kept, _] = payers();
    let headers = [proof(&emptied), proof(&kept)];
    for h in &headers {
        let (status, res) = app.get(h).await;
        assert_eq!(status, StatusCode::OK, "{res:?}");
    }
    let txs = relayer_txs(&chain).await;
    // Its whole balance before the batch: what the reorged chain moves away.
    let all = chain.balance(emptied.address()).await;
    deferred.flush();
    until_async("the batch mined", || async {
        relayer_txs(&chain).await == txs + 1
    })
    .await;
    let first = head_tx(&chain).await;
    seen_mined(&proxy).await;
    // The new chain: the payer moved everything away instead.
    let data =
        alloy_primitives::Bytes::from(alloy_sol_types::SolCall::abi_encode(&chain::transferCall {
            to: Address::repeat_byte(0x77),
            value: all,
        }));
    chain
        .reorg_with(
            1,
            vec![
                serde_json::json!({ "from": emptied.address(), "to": chain::TOKEN, "data": data }),
            ],
        )
        .await;
    assert_eq!(chain.balance(emptied.address()).await, U256::ZERO);
    let _miner = Miner::start(&chain);
    let mut outcomes = Vec::new();
    for _ in 0..headers.len() {
        let o = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("outcomes")
            .expect("worker alive");
        outcomes.push(o);
    }
    let of = |who: Address| {
        outcomes
            .iter()
            .find(|o| o.payer == who)
            .expect("an outcome each")
    };
    match &of(emptied.address()).status {
        tower_x402::settle::deferred::OutcomeStatus::Failed(reason) => {
            assert!(reason.contains("insufficient_balance"), "{reason}")
        }
        settled => panic!("the emptied payer's payment cannot settle: {settled:?}"),
    }
    let kept_outcome = of(kept.address());
    assert!(kept_outcome.is_settled(), "{kept_outcome:?}");
    assert_ne!(kept_outcome.transaction, Some(first));
    let (from, nonce) = nonce_of(&headers[0].1);
    assert_eq!(chain.authorization_used_logs(from, nonce).await, 0);
    assert!(!chain.authorization_used(from, nonce).await);
    moved_once(&chain, &[nonce_of(&headers[1].1)], before).await;
}

/// One payment settled alone (the synchronous path) with 3 confirmations, its block rolled
/// back with `evm_revert` while the settler waits: the answer is an unknown outcome naming
/// the transaction and the block (the layer keeps the proof reserved); the authorization is
/// unused on the chain, and settling it again moves the money once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_back_single_settlement_is_an_unknown_outcome_never_a_settlement() {
    let Some(chain) = Chain::start("chain_revert").await else {
        return;
    };
    let proxy = RpcProxy::start(chain.url()).await;
    let settler = OnchainSettler::connect(proxy.url(), relayer())
        .await
        .expect("settler")
        .with_confirmations(3)
        .with_poll_interval(Duration::from_millis(50));
    let before = chain.balance(PAY_TO).await;
    let p = payment(&demo_payer());
    let snapshot = chain.snapshot().await;
    let txs = relayer_txs(&chain).await;
    let task = {
        let (settler, p) = (settler.clone(), p.clone());
        tokio::spawn(async move { settler.settle(&p).await })
    };
    until_async("the transfer mined", || async {
        relayer_txs(&chain).await == txs + 1
    })
    .await;
    let sent = head_tx(&chain).await;
    seen_mined(&proxy).await;
    chain.revert(snapshot).await;
    chain.mine_blocks(3).await;
    match task.await.expect("no panic") {
        Err(SettleError::Unknown {
            transaction,
            source,
            ..
        }) => {
            assert_eq!(transaction, Some(sent));
            let rolled = source.downcast_ref::<RolledBack>().expect("a rollback");
            assert_eq!(rolled.transaction, sent);
        }
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
    assert_eq!(settler.stats().rolled_back, 1);
    assert!(!chain.authorization_used(p.payer, p.nonce()).await);
    // Reconciled (unused, nothing in flight): settling again moves the money once, from the
    // relayer's nonce as the chain has it now.
    let _miner = Miner::start(&chain);
    let settled = settler.settle(&p).await.expect("settles");
    assert_ne!(settled.transaction, Some(sent));
    moved_once(&chain, &[(p.payer, p.nonce())], before).await;
}

/// A restart while a batch is mined but short of its confirmations: the recovered payments
/// are in flight, not settled (neither its receipt nor `authorizationState` counts before the
/// block is buried), nothing is sent again, and once the head is deep enough they settle with
/// that transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_waits_for_a_mined_batchs_confirmations_and_does_not_resend() {
    let Some(chain) = Chain::start("chain_restart_shallow").await else {
        return;
    };
    let proxy = RpcProxy::start(chain.url()).await;
    let connect = || async {
        OnchainSettler::connect(proxy.url(), relayer())
            .await
            .expect("settler")
            .with_confirmations(3)
            .with_poll_interval(Duration::from_millis(50))
    };
    let (first, _rx) = deferred(connect().await, "restart_shallow", |b| b);
    let path = journal_path("restart_shallow");
    let app = app(&first);
    let before = chain.balance(PAY_TO).await;
    let headers: Vec<_> = payers().iter().map(proof).collect();
    for h in &headers {
        let (status, res) = app.get(h).await;
        assert_eq!(status, StatusCode::OK, "{res:?}");
    }
    let txs = relayer_txs(&chain).await;
    first.flush();
    until_async("the batch mined", || async {
        relayer_txs(&chain).await == txs + 1
    })
    .await;
    let sent = head_tx(&chain).await;
    // A crash while the worker waits for the confirmations.
    drop((app, first));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let second = DeferredSettler::builder(connect().await)
        .journal(&path)
        .retry(Duration::from_millis(100), Duration::from_millis(400))
        .on_outcome(move |o| {
            let _ = tx.send(o.clone());
        })
        .start()
        .expect("restart");
    assert_eq!(second.pending(), 3, "recovered");
    // Several reconciliation rounds read the shallow receipt...
    let polls = proxy.calls("eth_getTransactionReceipt");
    until_async("reconciliation rounds", || async {
        proxy.calls("eth_getTransactionReceipt") >= polls + 6 || !rx.is_empty()
    })
    .await;
    // ... and settle nothing, send nothing.
    assert!(
        rx.try_recv().is_err(),
        "not settled before its confirmations"
    );
    assert_eq!(second.pending(), 3);
    assert_eq!(relayer_txs(&chain).await, txs + 1, "nothing sent again");
    chain.mine_blocks(2).await;
    for _ in 0..headers.len() {
        let o = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("outcomes")
            .expect("worker alive");
        assert!(o.is_settled(), "{o:?}");
        assert_eq!(
            o.transaction,
            Some(sent),
            "by the batch sent before the crash"
        );
    }
    let nonces: Vec<_> = headers.iter().map(|h| nonce_of(&h.1)).collect();
    moved_once(&chain, &nonces, before).await;
    assert_eq!(relayer_txs(&chain).await, txs + 1);
}

/// Records each hash `sending` is called with, after checking the node does not know it yet
/// (recorded before broadcast).
struct RecordingLog {
    provider: alloy_provider::DynProvider,
    hashes: Mutex<Vec<B256>>,
}

#[async_trait]
impl SendLog for RecordingLog {
    async fn sending(&self, transaction: B256, payments: &[usize]) -> Result<(), BoxError> {
        let known = self
            .provider
            .get_transaction_by_hash(transaction)
            .await?
            .is_some();
        assert!(!known, "{transaction} logged before it is broadcast");
        assert_eq!(payments, [0, 1], "every hash carries the whole batch");
        self.hashes.lock().expect("lock").push(transaction);
        Ok(())
    }
}

/// A batch transaction that no block takes (mining off) is replaced after `replace_after`:
/// same nonce, fees raised by at least 12.5 %, every hash logged before its broadcast. When
/// a block is mined, the replacement is in it, and each payment settles once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_batch_is_replaced_with_higher_fees_and_settles_once() {
    let Some(chain) = Chain::start("chain_stuck").await else {
        return;
    };
    chain.set_automine(false).await;
    let settler = OnchainSettler::connect(chain.url(), relayer())
        .await
        .expect("settler")
        .with_replace_after(Some(Duration::from_millis(700)))
        .with_poll_interval(Duration::from_millis(50));
    let before = chain.balance(PAY_TO).await;
    let [a, b, _] = payers();
    let payments = vec![payment(&a), payment(&b)];
    let log = Arc::new(RecordingLog {
        provider: chain.provider().clone(),
        hashes: Mutex::new(Vec::new()),
    });
    let task = {
        let (settler, payments, log) = (settler.clone(), payments.clone(), log.clone());
        tokio::spawn(async move { settler.settle_batch(&payments, &*log).await })
    };
    let hashes = || log.hashes.lock().expect("lock").clone();
    until_async("the batch in the pool", || async {
        let sent = hashes();
        !sent.is_empty() && chain.pool().await.contains(&sent[0])
    })
    .await;
    let first = hashes()[0];
    let first_tx = tx_json(&chain, first).await;
    until_async("a replacement in the pool", || async {
        let sent = hashes();
        sent.len() >= 2 && chain.pool().await.contains(sent.last().expect("two"))
    })
    .await;
    let pool = chain.pool().await;
    assert_eq!(pool.len(), 1, "the replacement took the first one's place");
    chain.mine().await;
    let results = tokio::time::timeout(WAIT, task)
        .await
        .expect("settled")
        .expect("no panic");
    let sent = hashes();
    let mined = pool[0];
    assert!(sent.contains(&mined) && mined != first, "{sent:?}");
    for r in &results {
        let s = r.as_ref().expect("settled");
        assert_eq!(s.transaction, Some(mined));
    }
    let mined_tx = tx_json(&chain, mined).await;
    let field = |tx: &Value, name: &str| {
        let hex = tx[name].as_str().expect(name).trim_start_matches("0x");
        u128::from_str_radix(hex, 16).expect(name)
    };
    for name in ["maxFeePerGas", "maxPriorityFeePerGas"] {
        let (old, new) = (field(&first_tx, name), field(&mined_tx, name));
        assert!(new >= old + old / 8, "{name}: {old} -> {new}");
    }
    assert_eq!(first_tx["nonce"], mined_tx["nonce"], "same nonce");
    assert!(
        chain
            .provider()
            .get_transaction_receipt(first)
            .await
            .expect("receipt")
            .is_none(),
        "the first never mined"
    );
    assert!(settler.stats().replaced >= 1);
    let nonces: Vec<_> = payments.iter().map(|p| (p.payer, p.nonce())).collect();
    moved_once(&chain, &nonces, before).await;
}

/// The RPC cut under load (a TCP proxy in front of anvil drops every connection): with the
/// pre-check off, requests are still accepted and journaled up to `max_pending`, then 503
/// with `Retry-After` and the handler does not run; with the pre-check on, 503 at once. The
/// worker retries (raised) meanwhile and sends nothing. RPC back: the backlog drains, the
/// refused proofs are accepted when sent again, and every payment moved exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_rpc_outage_grows_the_backlog_to_max_pending_then_it_drains_without_a_double_transfer() {
    let Some(chain) = Chain::start("chain_outage").await else {
        return;
    };
    let proxy = RpcProxy::start(chain.url()).await;
    let onchain = OnchainSettler::connect(proxy.url(), relayer())
        .await
        .expect("settler")
        .with_rpc_timeout(Duration::from_millis(500))
        .with_poll_interval(Duration::from_millis(50));
    const MAX_PENDING: usize = 6;
    let (deferred, mut rx) = deferred(onchain.clone(), "outage", |b| {
        b.precheck(false)
            .max_pending(MAX_PENDING)
            .max_batch(4)
            .max_wait(Duration::from_millis(50))
    });
    let (checked, _checked_rx) = self::deferred(onchain, "outage_checked", |b| b);
    let app = app(&deferred);
    let checked_app = self::app(&checked);
    let before = chain.balance(PAY_TO).await;
    let txs = relayer_txs(&chain).await;

    proxy.cut();
    let retries = alert::count(Alert::SettlementRetry);
    let payer = demo_payer();
    let headers: Vec<_> = (0..MAX_PENDING + 2).map(|_| proof(&payer)).collect();
    for (i, h) in headers.iter().enumerate() {
        let (status, res) = app.get(h).await;
        if i < MAX_PENDING {
            assert_eq!(status, StatusCode::OK, "{i}: {res:?}");
            assert_eq!(receipt(&res), Some(true));
            assert_eq!(deferred.pending(), i + 1, "the backlog grows");
        } else {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{i}: {res:?}");
            assert!(res.contains_key(http::header::RETRY_AFTER), "{res:?}");
            assert_ne!(receipt(&res), Some(true));
        }
    }
    assert_eq!(app.runs(), MAX_PENDING, "no handler past max_pending");
    // With the pre-check on, the chain cannot be asked: 503 before the handler.
    let (status, res) = checked_app.get(&proof(&payer)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{res:?}");
    assert!(res.contains_key(http::header::RETRY_AFTER), "{res:?}");
    assert_eq!((checked_app.runs(), checked.pending()), (0, 0));
    // The worker tries, fails and backs off; nothing reaches the chain.
    let deadline = Instant::now() + WAIT;
    while alert::count(Alert::SettlementRetry) < retries + 2 {
        assert!(Instant::now() < deadline, "the worker retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(deferred.pending(), MAX_PENDING);
    assert_eq!(relayer_txs(&chain).await, txs);

    proxy.restore();
    let mut settled = Vec::new();
    while settled.len() < MAX_PENDING {
        let o = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("outcomes")
            .expect("worker alive");
        assert!(o.is_settled(), "{o:?}");
        settled.push(o.nonce);
    }
    tokio::time::timeout(WAIT, deferred.idle())
        .await
        .expect("drained");
    // The proofs refused at the limit were not spent: the client sends them again.
    for h in &headers[MAX_PENDING..] {
        let (status, res) = app.get(h).await;
        assert_eq!(status, StatusCode::OK, "{res:?}");
    }
    for _ in MAX_PENDING..headers.len() {
        let o = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("outcomes")
            .expect("worker alive");
        assert!(o.is_settled(), "{o:?}");
        settled.push(o.nonce);
    }
    settled.sort();
    settled.dedup();
    assert_eq!(settled.len(), headers.len(), "one outcome each");
    let nonces: Vec<_> = headers.iter().map(|h| nonce_of(&h.1)).collect();
    moved_once(&chain, &nonces, before).await;
    assert_eq!(app.runs(), headers.len());
}
