//! `PostgresSettlementQueue` against a real PostgreSQL (`tests/common/postgres.rs`) and, for
//! the settling tests, a local anvil chain (`tests/chain/mod.rs`; no chain mocks): the
//! shared `SettlementQueue` contract, two deferred settlers ("instances") sharing one queue
//! and one chain, and PostgreSQL stopped under load. Without PostgreSQL or anvil: SKIPPED,
//! or a failure under `CI=true`.
#![cfg(all(
    feature = "postgres",
    feature = "deferred",
    feature = "onchain",
    feature = "axum",
    feature = "test-util"
))]

mod chain;
mod common;
#[path = "common/contract.rs"]
mod contract;
#[path = "common/postgres.rs"]
mod pg_server;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
use tower_x402::proto::X402Version;
use tower_x402::settle::Settler;
use tower_x402::settle::deferred::{DeferredSettler, Outcome, PostgresSettlementQueue};
use tower_x402::settle::onchain::OnchainSettler;
use tower_x402::test_util::{PrivateKeySigner, demo_payer, exact_payload, pay};
use tower_x402::{Asset, ExactEvmVerifier, Network, PaymentLayer, PaymentOption, VerifiedPayment};

use chain::{Chain, PAY_TO, PAYER3_KEY, PAYER4_KEY, RELAYER_KEY, TOKEN};
use pg_server::PgServer;

/// `$0.01` in 6-decimal USDC units.
const PRICE_UNITS: u64 = 10_000;
const WAIT: Duration = Duration::from_secs(60);
/// A second relayer (anvil's account 5: ETH only, no tokens), for the second instance: two
/// instances must not share a relayer key (each manages its own nonces).
const RELAYER2_KEY: &str = "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba";

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

async fn queue(server: &PgServer) -> PostgresSettlementQueue {
    PostgresSettlementQueue::connect(&server.url())
        .await
        .expect("connect to the test postgres")
}

/// One instance: its own pool on the shared database, its own relayer, outcomes to `tx`.
async fn instance(
    chain: &Chain,
    server: &PgServer,
    relayer: &str,
    tx: mpsc::UnboundedSender<Outcome>,
) -> DeferredSettler {
    let onchain = OnchainSettler::connect(
        chain.url(),
        relayer.parse::<PrivateKeySigner>().expect("key"),
    )
    .await
    .expect("settler");
    DeferredSettler::builder(onchain)
        .queue(queue(server).await)
        .max_batch(4)
        .max_wait(Duration::from_millis(200))
        .in_flight(2)
        .lease_ttl(Duration::from_secs(5))
        .retry(Duration::from_millis(100), Duration::from_millis(400))
        .on_outcome(move |o| {
            let _ = tx.send(o.clone());
        })
        .start()
        .expect("deferred settler")
}

/// The proof as the layer hands it to the settler.
fn verified(payer: &PrivateKeySigner) -> VerifiedPayment {
    let payload = exact_payload(payer, option().requirements(), now());
    VerifiedPayment::exact(
        X402Version::V2,
        Network::BASE_SEPOLIA,
        TOKEN,
        payload.authorization.clone(),
        payload.signature.clone(),
    )
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

/// Every outcome settled, one per nonce, `n` of them; no outcome comes after.
async fn settled_exactly_once(rx: &mut mpsc::UnboundedReceiver<Outcome>, n: usize) -> Vec<Outcome> {
    let done = outcomes(rx, n).await;
    assert!(done.iter().all(Outcome::is_settled), "{done:?}");
    let nonces: HashSet<(Address, B256)> = done.iter().map(|o| (o.payer, o.nonce)).collect();
    assert_eq!(nonces.len(), n, "one outcome per payment: {done:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "no second outcome for any payment");
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_contract_postgres() {
    let Some(server) = PgServer::start("queue_contract") else {
        return;
    };
    let q = queue(&server).await.with_prefix("contract_");
    q.migrate().await.expect("migrate");
    contract::settlement_queue("postgres", &q).await;
    assert!(tower_x402::settle::deferred::SettlementQueue::is_shared(&q));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_sharing_one_queue_settle_every_payment_exactly_once() {
    let Some(server) = PgServer::start("queue_two_instances") else {
        return;
    };
    let Some(chain) = Chain::start("queue_two_instances").await else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = instance(&chain, &server, RELAYER_KEY, tx.clone()).await;
    let b = instance(&chain, &server, RELAYER2_KEY, tx).await;
    let before = chain.balance(PAY_TO).await;

    // The same proof on both instances at once: exactly one accepts it.
    let twice = verified(&payers()[0]);
    let (ra, rb) = tokio::join!(a.settle(&twice), b.settle(&twice));
    assert_eq!(
        usize::from(ra.is_ok()) + usize::from(rb.is_ok()),
        1,
        "{ra:?} {rb:?}"
    );
    // 31 more, accepted alternately on each, from 3 payers, concurrently.
    let mut tasks = Vec::new();
    for i in 0..31 {
        let settler = if i % 2 == 0 { a.clone() } else { b.clone() };
        let payment = verified(&payers()[i % 3]);
        tasks.push(tokio::spawn(async move {
            settler.check(&payment).await.expect("pre-check");
            settler.settle(&payment).await.expect("accepted");
            payment
        }));
    }
    let mut paid = vec![twice];
    for t in tasks {
        paid.push(t.await.expect("task"));
    }
    // A queued proof is refused on the other instance too.
    let e = b
        .check(&paid[1])
        .await
        .expect_err("queued on the other instance");
    assert!(format!("{e:?}").contains("NonceAlreadyUsed"), "{e:?}");

    settled_exactly_once(&mut rx, 32).await;
    tokio::time::timeout(WAIT, a.idle()).await.expect("idle");
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(32 * PRICE_UNITS),
        "each payment moved exactly once"
    );
    for p in &paid {
        assert!(chain.authorization_used(p.payer, p.nonce()).await);
    }
    let relayer2 = RELAYER2_KEY
        .parse::<PrivateKeySigner>()
        .expect("key")
        .address();
    let mut sent = Vec::new();
    for who in [chain::RELAYER, relayer2] {
        sent.push(
            chain
                .provider()
                .get_transaction_count(who)
                .latest()
                .await
                .expect("nonce"),
        );
    }
    eprintln!(
        "two instances: batches sent by instance A {}, by instance B {}",
        sent[0], sent[1]
    );
}

// ------------------------------------------------------------------------------------------------
// PostgreSQL stopped under load

/// A paid `$0.01` route counting its runs.
struct App {
    router: Router,
    runs: Arc<AtomicUsize>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_queue_without_a_challenge_key_does_not_build() {
    let Some(server) = PgServer::start("queue_needs_a_key") else {
        return;
    };
    let Some(chain) = Chain::start("queue_needs_a_key").await else {
        return;
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    let settler = instance(&chain, &server, RELAYER_KEY, tx).await;
    assert!(settler.is_shared());
    let build = |keys: Option<tower_x402::ChallengeKeys>| {
        let b = PaymentLayer::builder()
            .accept(option())
            .settler(settler.clone());
        match keys {
            Some(k) => b.bind_challenges(k),
            None => b,
        }
        .build()
    };
    // A process-random key would make one instance's 402 unpayable at the other.
    assert!(matches!(
        build(None),
        Err(tower_x402::error::ConfigError::ChallengeKeyRequired)
    ));
    let key = tower_x402::ChallengeKeys::from_hex(&"ab".repeat(32)).expect("key");
    assert!(build(Some(key)).is_ok(), "with a shared key it builds");
}

fn app(settler: &DeferredSettler) -> App {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    // Proofs are signed over the option's requirements directly (no 402 round trip): what is
    // tested here is the queue behind an accepted proof, not challenge binding.
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

/// The receipt's `success`, or `None` without a receipt.
fn receipt(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get("payment-response")?;
    let json = base64::engine::general_purpose::STANDARD
        .decode(value.as_bytes())
        .expect("base64");
    let v: Value = serde_json::from_slice(&json).expect("json");
    v["success"].as_bool()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_under_load_answers_503_loses_nothing_and_drains_when_back() {
    let Some(mut server) = PgServer::start("queue_pg_stopped") else {
        return;
    };
    let Some(chain) = Chain::start("queue_pg_stopped").await else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let settler = instance(&chain, &server, RELAYER_KEY, tx).await;
    let app = Arc::new(app(&settler));
    let before = chain.balance(PAY_TO).await;

    // Accepted while PostgreSQL is up.
    let mut accepted = Vec::new();
    for i in 0..6 {
        let proof = pay(
            &payers()[i % 3],
            option().requirements(),
            now(),
            X402Version::V2,
        );
        let (status, headers) = app.get(&proof).await;
        assert_eq!(status, StatusCode::OK, "{headers:?}");
        assert_eq!(receipt(&headers), Some(true));
        accepted.push(proof);
    }
    assert_eq!(app.runs(), 6);

    // Stopped, under concurrent load: every request 503 + Retry-After, handler not run.
    server.stop();
    let mut refused = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let proof = pay(
            &payers()[i % 3],
            option().requirements(),
            now(),
            X402Version::V2,
        );
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let (status, headers) = app.get(&proof).await;
            (proof, status, headers)
        }));
    }
    for t in tasks {
        let (proof, status, headers) = t.await.expect("task");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{headers:?}");
        assert!(
            headers.contains_key(http::header::RETRY_AFTER),
            "{headers:?}"
        );
        assert_ne!(receipt(&headers), Some(true), "nothing accepted");
        refused.push(proof);
    }
    assert_eq!(
        app.runs(),
        6,
        "the handler did not run while the queue was down"
    );

    // Back: what was accepted drains, and the refused proofs (released) are served now.
    server.restart();
    for proof in &refused {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, headers) = app.get(proof).await;
            if status == StatusCode::OK {
                assert_eq!(receipt(&headers), Some(true));
                break;
            }
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{headers:?}");
            assert!(tokio::time::Instant::now() < deadline, "still refused");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(app.runs(), 18);
    settler.flush();
    settled_exactly_once(&mut rx, 18).await;
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(18 * PRICE_UNITS),
        "nothing accepted was lost, nothing moved twice"
    );
}

// ------------------------------------------------------------------------------------------------
// kill -9 of an instance mid-batch

/// Rows of the queue: (not final, with a `sent` hash, leased now).
async fn rows(q: &PostgresSettlementQueue) -> (i64, i64, i64) {
    let row = q
        .pool()
        .get()
        .await
        .expect("connection")
        .query_one(
            "SELECT count(*) FILTER (WHERE NOT done),
                    count(*) FILTER (WHERE NOT done AND cardinality(sent) > 0),
                    count(*) FILTER (WHERE NOT done AND lease_until_ms IS NOT NULL)
             FROM x402_settlements",
            &[],
        )
        .await
        .expect("query");
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_batch_and_another_instance_settles_everything_exactly_once() {
    let Some(server) = PgServer::start("queue_kill9") else {
        return;
    };
    let Some(chain) = Chain::start("queue_kill9").await else {
        return;
    };
    let bin = common::process::example_bin("settlement_queue_victim");
    let before = chain.balance(PAY_TO).await;
    // Blocks wait: the victim's batches are broadcast and stay unmined.
    chain.set_automine(false).await;
    let mut victim = std::process::Command::new(&bin)
        .env("X402_RPC", chain.url())
        .env("X402_PG", server.url())
        .env("X402_PAYMENTS", "12")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("victim starts");
    let stdout = victim.stdout.take().expect("stdout");
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut leased = None;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.expect("victim output");
            if let Some(n) = line.strip_prefix("LEASED ") {
                leased = n.parse::<usize>().ok();
            }
            if line == "READY" {
                return leased;
            }
        }
        None
    });
    let leased = tokio::time::timeout(WAIT, ready)
        .await
        .expect("victim ready in time")
        .expect("task")
        .expect("victim printed READY");
    assert_eq!(leased, 2, "two payments leased and never sent");
    let q = queue(&server).await;
    // Both batches broadcast (their `sent` recorded first) and waiting in the node's pool.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pending = chain
            .provider()
            .get_transaction_count(chain::RELAYER)
            .pending()
            .await
            .expect("nonce");
        let (_, sent, _) = rows(&q).await;
        if pending == 2 && sent == 8 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "victim: {pending} transactions pending, {sent} payments sent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (open, sent, leased_now) = rows(&q).await;
    assert_eq!(
        (open, sent),
        (12, 8),
        "12 accepted, 8 in two unmined batches"
    );
    assert!(leased_now >= 10, "{leased_now} leased when killed");

    let hashes: HashSet<Vec<u8>> = q
        .pool()
        .get()
        .await
        .expect("connection")
        .query("SELECT DISTINCT unnest(sent) FROM x402_settlements", &[])
        .await
        .expect("query")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        hashes.len(),
        2,
        "two batch transactions recorded before broadcast"
    );

    victim.kill().expect("SIGKILL");
    let _ = victim.wait();

    // The survivor, another relayer: takes the work over once the victim's leases expire,
    // reads the sent ones from the chain (in flight: waits; it never resends them).
    let (tx, mut rx) = mpsc::unbounded_channel();
    let survivor = instance(&chain, &server, RELAYER2_KEY, tx).await;
    // Let it find the victim's batches in flight before they are mined.
    tokio::time::sleep(Duration::from_secs(4)).await;
    chain.set_automine(true).await;
    chain.mine().await;
    survivor.flush();
    let done = settled_exactly_once(&mut rx, 12).await;
    // The 8 in the victim's batches were read from the chain and found settled by them.
    let by_victim = done
        .iter()
        .filter(|o| o.transaction.is_some_and(|t| hashes.contains(t.as_slice())))
        .count();
    assert_eq!(by_victim, 8, "{done:?}");
    assert_eq!(
        chain.balance(PAY_TO).await,
        before + U256::from(12 * PRICE_UNITS),
        "every accepted payment moved exactly once"
    );
    assert_eq!(rows(&q).await.0, 0, "nothing left in the queue");
    let victim_batches = chain
        .provider()
        .get_transaction_count(chain::RELAYER)
        .latest()
        .await
        .expect("nonce");
    assert_eq!(
        victim_batches, 2,
        "the victim's two batches were mined, not resent"
    );
}
