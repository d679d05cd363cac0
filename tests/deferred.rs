//! Deferred settlement on a real local chain (anvil + TestUSDC + MiniMulticall3, see
//! `tests/chain/mod.rs`; no chain mocks): [`DeferredSettler`] over [`OnchainSettler`] behind a
//! real `PaymentLayer`, batches through Multicall3, the RPC going away before and after a
//! payment is journaled, and `kill -9` of a server process (the `quickstart` example in
//! deferred mode) with recovery from its journal. Without anvil the tests print SKIPPED (and
//! fail under `CI=true`).
#![cfg(all(
    feature = "onchain",
    feature = "deferred",
    feature = "axum",
    feature = "test-util"
))]

mod chain;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256, U256};
use alloy_provider::Provider;
use axum::Router;
use axum::body::Body;
use axum::routing::get;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use serde_json::Value;
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_x402::proto::X402Version;
use tower_x402::proto::exact::ExactEvmPayload;
use tower_x402::proto::v2::{PaymentRequired, PaymentRequirements};
use tower_x402::settle::Settler;
use tower_x402::settle::deferred::{DeferredSettler, Outcome, OutcomeStatus};
use tower_x402::settle::onchain::{OnchainSettler, reason};
use tower_x402::test_util::{PrivateKeySigner, demo_payer, exact_payload, pay, sign};
use tower_x402::{Asset, ExactEvmVerifier, Network, PaymentLayer, PaymentOption, VerifiedPayment};

use chain::process;
use chain::{Chain, PAY_TO, PAYER3_KEY, PAYER4_KEY, RELAYER, RELAYER_KEY, TOKEN};

/// `$0.01` in 6-decimal USDC units.
const PRICE_UNITS: u64 = 10_000;
/// The quickstart's price, `$0.001`.
const QUICKSTART_UNITS: u64 = 1_000;
const WAIT: Duration = Duration::from_secs(30);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn option(price: &str) -> PaymentOption {
    PaymentOption::exact(&Asset::usdc_base_sepolia(), price, PAY_TO).expect("valid option")
}

fn key(hex: &str) -> PrivateKeySigner {
    hex.parse().expect("anvil key")
}

fn payers() -> [PrivateKeySigner; 3] {
    [demo_payer(), key(PAYER3_KEY), key(PAYER4_KEY)]
}

async fn onchain(url: &str) -> OnchainSettler {
    OnchainSettler::connect(url, key(RELAYER_KEY))
        .await
        .expect("settler")
}

fn journal(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tower-x402-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("x402.journal")
}

/// A deferred settler whose outcomes arrive on the returned channel.
fn deferred(
    chain: OnchainSettler,
    path: &Path,
    max_batch: usize,
    max_wait: Duration,
) -> (DeferredSettler, mpsc::UnboundedReceiver<Outcome>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let settler = DeferredSettler::builder(chain)
        .journal(path)
        .max_batch(max_batch)
        .max_wait(max_wait)
        .retry(Duration::from_millis(100), Duration::from_millis(400))
        .on_outcome(move |o| {
            let _ = tx.send(o.clone());
        })
        .start()
        .expect("deferred settler");
    (settler, rx)
}

async fn outcomes(rx: &mut mpsc::UnboundedReceiver<Outcome>, n: usize) -> Vec<Outcome> {
    let mut out = Vec::new();
    while out.len() < n {
        let o = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} outcomes after {WAIT:?}", out.len()))
            .expect("worker alive");
        out.push(o);
    }
    out
}

/// The proof as the layer hands it to the settler.
fn verified(payload: &ExactEvmPayload) -> VerifiedPayment {
    let a = &payload.authorization;
    VerifiedPayment::exact(
        X402Version::V2,
        Network::BASE_SEPOLIA,
        TOKEN,
        a.clone(),
        payload.signature.clone(),
    )
}

/// A paid `$0.01` route counting its calls, behind the layer with `settler`.
struct App {
    router: Router,
    hits: Arc<AtomicUsize>,
}

fn app(settler: impl Settler) -> App {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let layer = PaymentLayer::builder()
        .no_challenge_binding()
        .accept(option("$0.01"))
        .verifier(ExactEvmVerifier::new())
        .settler(settler)
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
    App { router, hits }
}

impl App {
    async fn get(&self, header: (HeaderName, HeaderValue)) -> (StatusCode, HeaderMap) {
        let req = Request::get("/paid")
            .header(header.0, header.1)
            .body(Body::empty())
            .expect("request");
        let res = self.router.clone().oneshot(req).await.expect("infallible");
        let (parts, body) = res.into_parts();
        let _ = body.collect().await.expect("body");
        (parts.status, parts.headers)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn header_json(headers: &HeaderMap, name: &str) -> Value {
    let value = headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"));
    let json = base64::engine::general_purpose::STANDARD
        .decode(value.as_bytes())
        .expect("base64");
    serde_json::from_slice(&json).expect("json")
}

fn refusal(status: StatusCode, headers: &HeaderMap) -> String {
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{headers:?}");
    header_json(headers, "payment-required")["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The nonce of a v2 payment header.
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

/// Mined transactions sent by the relayer so far.
async fn relayer_txs(chain: &Chain) -> u64 {
    chain
        .provider()
        .get_transaction_count(RELAYER)
        .latest()
        .await
        .expect("nonce")
}

async fn wait_for_balance(chain: &Chain, who: Address, want: U256) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = chain.balance(who).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "balance of {who}: {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn deferred_answers_at_once_and_the_worker_settles_in_one_batch() {
    let Some(chain) = Chain::start("deferred_settles").await else {
        return;
    };
    let onchain = onchain(chain.url()).await;
    let path = journal("deferred_settles");
    let (settler, mut rx) = deferred(onchain.clone(), &path, 8, Duration::from_secs(600));
    let app = app(settler.clone());
    let before = chain.balance(PAY_TO).await;
    let txs = relayer_txs(&chain).await;

    let req = option("$0.01").requirements().clone();
    let mut headers = Vec::new();
    for payer in &payers()[..2] {
        let header = pay(payer, &req, now(), X402Version::V2);
        let (status, res) = app.get(header.clone()).await;
        assert_eq!(status, StatusCode::OK);
        // Accepted, not settled: a success receipt without a transaction.
        let receipt = header_json(&res, "payment-response");
        assert_eq!(receipt["success"], true, "{receipt}");
        assert_eq!(receipt["transaction"], "", "{receipt}");
        headers.push(header);
    }
    assert_eq!(app.hits(), 2);
    assert_eq!(settler.pending(), 2);
    assert_eq!(chain.balance(PAY_TO).await, before, "nothing settled yet");

    // The same proof again: refused from the journal before the handler, though the chain
    // has not seen it yet.
    let (status, res) = app.get(headers[0].clone()).await;
    assert_eq!(refusal(status, &res), reason::NONCE_ALREADY_USED);
    assert_eq!(app.hits(), 2);

    settler.flush();
    let done = outcomes(&mut rx, 2).await;
    tokio::time::timeout(WAIT, settler.idle())
        .await
        .expect("idle");
    assert!(done.iter().all(Outcome::is_settled), "{done:?}");
    let hash = done[0].transaction.expect("a transaction");
    assert!(
        done.iter().all(|o| o.transaction == Some(hash)),
        "one batch"
    );
    let receipt = chain
        .provider()
        .get_transaction_receipt(hash)
        .await
        .expect("rpc")
        .expect("mined");
    assert!(receipt.status());
    assert_eq!(receipt.to, Some(chain::MULTICALL3));
    assert_eq!(relayer_txs(&chain).await, txs + 1);
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(2 * PRICE_UNITS)
    );
    for h in &headers {
        let (from, nonce) = nonce_of(&h.1);
        assert!(chain.authorization_used(from, nonce).await);
    }
    let gas: u64 = done.iter().map(|o| o.gas_used.expect("gas")).sum();
    assert_eq!(gas, receipt.gas_used - receipt.gas_used % 2);
    eprintln!(
        "deferred: batch of 2 used {} gas ({} per payment), worker latency {:?}",
        receipt.gas_used,
        receipt.gas_used / 2,
        done[0].latency
    );

    // Settled now: the journal forgot it, the chain refuses it.
    let (status, res) = app.get(headers[1].clone()).await;
    assert_eq!(refusal(status, &res), reason::NONCE_ALREADY_USED);
    assert_eq!(app.hits(), 2);
    assert_eq!(onchain.stats().settled, 2);
}

#[tokio::test]
async fn n_payments_take_ceil_n_over_batch_transactions_and_a_bad_one_fails_alone() {
    let Some(chain) = Chain::start("deferred_batches").await else {
        return;
    };
    let onchain = onchain(chain.url()).await;
    let path = journal("deferred_batches");
    let (settler, mut rx) = deferred(onchain.clone(), &path, 3, Duration::from_secs(600));
    let before = chain.balance(PAY_TO).await;
    let txs = relayer_txs(&chain).await;
    let req = option("$0.01").requirements().clone();

    // A forged signature, journaled first (settle without the pre-check, as if the check had
    // been fooled): the batch simulation drops it with its reason.
    let payer = demo_payer();
    let mut forged = exact_payload(&payer, &req, now());
    forged.signature = sign(&key(PAYER3_KEY), &req, &forged.authorization);
    settler.settle(&verified(&forged)).await.expect("journaled");

    const N: usize = 7;
    let mut good = Vec::new();
    for i in 0..N {
        let payload = exact_payload(&payers()[i % 3], &req, now());
        let payment = verified(&payload);
        settler.check(&payment).await.expect("pre-check");
        settler.settle(&payment).await.expect("journaled");
        good.push(payload);
    }
    settler.flush();
    let done = outcomes(&mut rx, N + 1).await;
    let failed: Vec<_> = done.iter().filter(|o| !o.is_settled()).collect();
    assert_eq!(failed.len(), 1, "{done:?}");
    assert_eq!(failed[0].nonce, forged.authorization.nonce);
    assert_eq!(
        failed[0].status,
        OutcomeStatus::Failed(reason::SIGNATURE.to_string())
    );
    let mut hashes: Vec<B256> = done.iter().filter_map(|o| o.transaction).collect();
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), N.div_ceil(3), "{done:?}");
    assert_eq!(relayer_txs(&chain).await, txs + N.div_ceil(3) as u64);
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(N as u64 * PRICE_UNITS)
    );
    for p in &good {
        assert!(
            chain
                .authorization_used(p.authorization.from, p.authorization.nonce)
                .await
        );
    }
    assert!(
        !chain
            .authorization_used(payer.address(), forged.authorization.nonce)
            .await
    );
    let stats = onchain.stats();
    assert_eq!(
        (stats.sent, stats.settled),
        (N.div_ceil(3) as u64, N as u64)
    );
    let per_payment = stats.gas_per_settlement().expect("settled");
    eprintln!(
        "deferred: {N} payments in batches of 3: {} transactions, {per_payment} gas per payment",
        stats.sent
    );
    // Batches of 2, 3 and 2 (the forged one dropped from the first) share the 21k base cost
    // and warm slots: less per payment than one transfer each (68.5k on this chain).
    assert!(per_payment < 64_000, "gas per payment {per_payment}");
}

#[tokio::test]
async fn rpc_down_at_request_time_answers_503_unless_the_precheck_is_off() {
    let down = onchain(&chain::closed_port_url()).await;
    let path = journal("deferred_rpc_down");
    let (settler, _rx) = deferred(down, &path, 8, Duration::from_millis(50));
    let checked = app(settler.clone());
    let req = option("$0.01").requirements().clone();
    let (status, res) = checked
        .get(pay(&demo_payer(), &req, now(), X402Version::V2))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.contains_key(http::header::RETRY_AFTER));
    assert_eq!(checked.hits(), 0);
    assert_eq!(settler.pending(), 0);

    // Without the on-chain pre-check the chain is not asked at request time: served and
    // journaled (settled when the RPC answers); a replay is refused from the journal.
    let optimistic = DeferredSettler::builder(onchain(&chain::closed_port_url()).await)
        .journal(journal("deferred_optimistic"))
        .max_wait(Duration::from_secs(600))
        .precheck(false)
        .start()
        .expect("deferred settler");
    let served = app(optimistic.clone());
    let header = pay(&demo_payer(), &req, now(), X402Version::V2);
    let (status, _) = served.get(header.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served.hits(), 1);
    assert_eq!(optimistic.pending(), 1);
    let (status, res) = served.get(header).await;
    assert_eq!(refusal(status, &res), reason::NONCE_ALREADY_USED);
    assert_eq!(served.hits(), 1);
}

/// `max_pending`: with the backlog full, a new payment gets 503 with `Retry-After: 1`
/// before the handler, and keeps its proof: re-sent once the backlog drained, it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_backlog_answers_503_and_keeps_the_proof() {
    let Some(chain) = Chain::start("deferred_backlog").await else {
        return;
    };
    // Nothing drains until `flush` (max_wait 600 s): the backlog only grows meanwhile.
    let settler = DeferredSettler::builder(onchain(chain.url()).await)
        .journal(journal("deferred_backlog"))
        .max_wait(Duration::from_secs(600))
        .max_pending(2)
        .start()
        .expect("deferred settler");
    let served = app(settler.clone());
    let before = chain.balance(PAY_TO).await;
    let req = option("$0.01").requirements().clone();
    for payer in &payers()[..2] {
        let (status, _) = served.get(pay(payer, &req, now(), X402Version::V2)).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(settler.pending(), 2);
    let third = pay(&payers()[2], &req, now(), X402Version::V2);
    let (status, res) = served.get(third.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        res.get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(served.hits(), 2, "the third handler did not run");
    assert_eq!(settler.pending(), 2, "nothing journaled for it");

    // The backlog drains; the refused proof, sent again unchanged, is served and settles.
    settler.flush();
    tokio::time::timeout(WAIT, settler.idle())
        .await
        .expect("the backlog drains");
    let (status, res) = served.get(third.clone()).await;
    assert_eq!(status, StatusCode::OK, "{res:?}");
    assert_eq!(header_json(&res, "payment-response")["success"], true);
    assert_eq!(served.hits(), 3, "its handler ran once");
    settler.flush();
    tokio::time::timeout(WAIT, settler.idle())
        .await
        .expect("settled");
    let (from, nonce) = nonce_of(&third.1);
    assert!(chain.authorization_used(from, nonce).await);
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(3 * PRICE_UNITS)
    );
}

/// A TCP proxy to anvil that can be cut (every connection dropped, new ones refused) and
/// restored.
struct Proxy {
    url: String,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: &str) -> Proxy {
        let target: SocketAddr = target
            .strip_prefix("http://")
            .expect("http url")
            .parse()
            .expect("addr");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let up = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (up2, conns2) = (up.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: connection closed
                }
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns2.lock().expect("lock").push(conn);
            }
        });
        Proxy {
            url,
            up,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for conn in self.conns.lock().expect("lock").drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test]
async fn rpc_down_after_journaling_keeps_the_payment_and_settles_when_back() {
    let Some(chain) = Chain::start("deferred_rpc_comes_back").await else {
        return;
    };
    let proxy = Proxy::start(chain.url()).await;
    let onchain = onchain(&proxy.url)
        .await
        .with_rpc_timeout(Duration::from_secs(1));
    let path = journal("deferred_rpc_comes_back");
    let (settler, mut rx) = deferred(onchain.clone(), &path, 8, Duration::from_secs(600));
    let app = app(settler.clone());
    let before = chain.balance(PAY_TO).await;
    let req = option("$0.01").requirements().clone();
    let header = pay(&demo_payer(), &req, now(), X402Version::V2);
    let (status, _) = app.get(header.clone()).await;
    assert_eq!(status, StatusCode::OK);

    // The RPC goes away before the worker runs: the worker fails and backs off.
    proxy.cut();
    settler.flush();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(settler.pending(), 1, "kept in the journal");
    assert_eq!(chain.balance(PAY_TO).await, before);
    assert!(rx.try_recv().is_err(), "no outcome while the RPC is down");

    proxy.restore();
    let done = outcomes(&mut rx, 1).await;
    assert!(done[0].is_settled(), "{done:?}");
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(PRICE_UNITS)
    );
    let (from, nonce) = nonce_of(&header.1);
    assert!(chain.authorization_used(from, nonce).await);
    assert!(onchain.stats().unavailable >= 1, "{:?}", onchain.stats());
    assert_eq!(onchain.stats().sent, 1);
}

// ------------------------------------------------------------------------------------------------
// kill -9 recovery, with the quickstart example as the server process

/// The host every request names: a restarted server listens on another port, but its
/// challenges are for the same public URL, as behind a load balancer.
const HOST: &str = "weather.test";

/// `quickstart --serve --rpc-url .. --mode deferred`; killed (SIGKILL) on drop.
struct Server {
    process: process::Server,
    base: String,
}

impl Server {
    fn start(rpc: &str, journal: &Path, max_batch: usize, max_wait_ms: u64) -> Server {
        let mut cmd = Command::new(process::example_bin("quickstart"));
        cmd.args([
            "--serve",
            "--port",
            "0",
            "--rpc-url",
            rpc,
            "--mode",
            "deferred",
        ])
        .arg("--journal")
        .arg(journal)
        .args(["--max-wait-ms", &max_wait_ms.to_string()])
        .args(["--max-batch", &max_batch.to_string()])
        .env("X402_RELAYER_KEY", RELAYER_KEY)
        // One challenge key across restarts: a proof made before the kill is judged by its
        // nonce after it, as on another instance.
        .env(tower_x402::challenge::ENV_KEY, "5a".repeat(32));
        // A restarted server's worker may print a recovered payment's outcome before the
        // `listening on` line: wait for that line, keeping every line in the log.
        let (process, base) = process::Server::start_until("quickstart", &mut cmd, WAIT, |line| {
            line.strip_prefix("listening on ")
                .map(|url| url.trim_end_matches('/').to_owned())
        });
        Server { process, base }
    }

    /// The requirement of its 402, as a client reads it (bound challenge id included).
    async fn challenge(&self) -> PaymentRequirements {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<bytes::Bytes>>();
        let req = Request::get(format!("{}/weather", self.base))
            .header(http::header::HOST, HOST)
            .body(Empty::new())
            .expect("request");
        let res = client.request(req).await.expect("server answers");
        assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
        let doc: PaymentRequired =
            serde_json::from_value(header_json(res.headers(), "payment-required"))
                .expect("challenge");
        doc.accepts.into_iter().next().expect("one requirement")
    }

    async fn get(&self, header: (HeaderName, HeaderValue)) -> (StatusCode, HeaderMap) {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<bytes::Bytes>>();
        let req = Request::get(format!("{}/weather", self.base))
            .header(http::header::HOST, HOST)
            .header(header.0, header.1)
            .body(Empty::new())
            .expect("request");
        let res = client.request(req).await.expect("server answers");
        (res.status(), res.headers().clone())
    }

    /// The deferred outcomes it printed (JSON lines on stdout; its log on stderr is not JSON).
    fn outcomes(&self) -> Vec<Value> {
        self.process
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v.get("outcome").cloned())
            .collect()
    }

    /// `kill -9`.
    fn kill(self) {
        self.process.kill();
    }
}

#[tokio::test]
async fn kill_9_and_restart_settles_every_journaled_payment_exactly_once() {
    let Some(chain) = Chain::start("deferred_kill_9").await else {
        return;
    };
    let path = journal("deferred_kill_9");
    let before = chain.balance(PAY_TO).await;
    let txs = relayer_txs(&chain).await;

    // 1. Three payments journaled, the worker told to wait ten minutes, then kill -9.
    let server = Server::start(chain.url(), &path, 32, 600_000);
    let req = server.challenge().await;
    let mut headers = Vec::new();
    for payer in &payers() {
        let header = pay(payer, &req, now(), X402Version::V2);
        let (status, res) = server.get(header.clone()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(header_json(&res, "payment-response")["transaction"], "");
        headers.push(header);
    }
    server.kill();
    assert_eq!(chain.balance(PAY_TO).await, before, "nothing settled");
    assert_eq!(relayer_txs(&chain).await, txs);

    // 2. Restart on the same journal: the three are recovered, checked on-chain, settled in
    // one batch at once (recovered payments do not wait for `max_wait`). A replay of one of
    // them is refused (journal or chain, whichever has it).
    let server = Server::start(chain.url(), &path, 32, 600_000);
    let (status, res) = server.get(headers[0].clone()).await;
    assert_eq!(refusal(status, &res), reason::NONCE_ALREADY_USED);
    wait_for_balance(&chain, PAY_TO, before + U256::from(3 * QUICKSTART_UNITS)).await;
    assert_eq!(relayer_txs(&chain).await, txs + 1, "one batch transaction");
    for h in &headers {
        let (from, nonce) = nonce_of(&h.1);
        assert!(chain.authorization_used(from, nonce).await);
    }

    // 3. Killed after broadcasting: the batch sits unmined in the pool (automine off) when
    // the server dies. After a restart the journal's `sent` hash is found mined: settled,
    // never sent again. (Batches of 2: the second payment sends the batch at once.)
    server.kill();
    let server = Server::start(chain.url(), &path, 2, 600_000);
    chain.set_automine(false).await;
    let pending_before = chain
        .provider()
        .get_transaction_count(RELAYER)
        .pending()
        .await
        .expect("nonce");
    for payer in &payers()[1..] {
        let (status, _) = server.get(pay(payer, &req, now(), X402Version::V2)).await;
        assert_eq!(status, StatusCode::OK);
    }
    let deadline = Instant::now() + WAIT;
    while chain
        .provider()
        .get_transaction_count(RELAYER)
        .pending()
        .await
        .expect("nonce")
        == pending_before
    {
        assert!(Instant::now() < deadline, "the worker never broadcast");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill();
    chain.mine().await;
    chain.set_automine(true).await;
    let server = Server::start(chain.url(), &path, 2, 600_000);
    let deadline = Instant::now() + WAIT;
    while server.outcomes().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "outcomes: {:?}",
            server.outcomes()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcomes = server.outcomes();
    assert!(
        outcomes.iter().all(|o| o["settled"] == true),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[0]["transaction"], outcomes[1]["transaction"]);
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(5 * QUICKSTART_UNITS)
    );
    // Two transactions in all, both successful: nothing was sent twice.
    assert_eq!(relayer_txs(&chain).await, txs + 2);
    let hash: B256 = outcomes[0]["transaction"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("hash");
    let receipt = chain
        .provider()
        .get_transaction_receipt(hash)
        .await
        .expect("rpc")
        .expect("mined");
    assert!(receipt.status());
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_batches_in_flight_land_in_one_block_and_each_payment_settles_once() {
    let Some(chain) = Chain::start("deferred_in_flight").await else {
        return;
    };
    let onchain = onchain(chain.url()).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let settler = DeferredSettler::builder(onchain.clone())
        .journal(journal("deferred_in_flight"))
        .max_batch(2)
        .max_wait(Duration::from_secs(600))
        .in_flight(4)
        .retry(Duration::from_millis(100), Duration::from_millis(400))
        .on_outcome(move |o| {
            let _ = tx.send(o.clone());
        })
        .start()
        .expect("deferred settler");
    let before = chain.balance(PAY_TO).await;
    let txs = relayer_txs(&chain).await;
    let req = option("$0.01").requirements().clone();
    // Blocks wait: the four batches (each full, so sent at once) must all be broadcast
    // before any is mined.
    chain.set_automine(false).await;
    let mut paid = Vec::new();
    for i in 0..8 {
        let payload = exact_payload(&payers()[i % 3], &req, now());
        let payment = verified(&payload);
        settler.check(&payment).await.expect("pre-check");
        settler.settle(&payment).await.expect("journaled");
        paid.push(payload);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let pending = chain
            .provider()
            .get_transaction_count(RELAYER)
            .pending()
            .await
            .expect("nonce");
        if pending == txs + 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 4 batches broadcast",
            pending - txs
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    chain.mine().await;
    chain.set_automine(true).await;
    let done = outcomes(&mut rx, 8).await;
    tokio::time::timeout(WAIT, settler.idle())
        .await
        .expect("idle");
    assert!(done.iter().all(Outcome::is_settled), "{done:?}");
    let mut hashes: Vec<B256> = done.iter().filter_map(|o| o.transaction).collect();
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), 4, "batches of 2: {done:?}");
    let mut blocks = Vec::new();
    for h in &hashes {
        let receipt = chain
            .provider()
            .get_transaction_receipt(*h)
            .await
            .expect("rpc")
            .expect("mined");
        assert!(receipt.status());
        blocks.push(receipt.block_number.expect("block"));
    }
    let all = blocks.clone();
    blocks.sort_unstable();
    blocks.dedup();
    assert_eq!(blocks.len(), 1, "all four batches in one block: {all:?}");
    assert_eq!(relayer_txs(&chain).await, txs + 4);
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(8 * PRICE_UNITS)
    );
    for p in &paid {
        assert!(
            chain
                .authorization_used(p.authorization.from, p.authorization.nonce)
                .await
        );
    }
    let mut nonces: Vec<B256> = done.iter().map(|o| o.nonce).collect();
    nonces.sort();
    nonces.dedup();
    assert_eq!(nonces.len(), 8, "one outcome per payment");
}
