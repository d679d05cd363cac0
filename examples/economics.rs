//! Unit economics of settlement: what each mode costs in gas and adds in latency.
//!
//! ```sh
//! cargo run --release --example economics --features axum,test-util,onchain,deferred
//! cargo run --release --example economics --features axum,test-util,onchain,deferred -- \
//!     --payments 64 --batch 32 --gas-price-gwei 0.01 --eth-usd 2500 --price-usd 0.001
//! ```
//!
//! Without `--rpc-url` it starts its own anvil (from `target/test-deps`, installed by
//! `scripts/install-test-deps.sh`) with the test token at the Base Sepolia USDC address and
//! Multicall3 at its canonical address — the harness of the tests, `tests/chain/mod.rs`, is
//! compiled in, with Permit2 and the x402 upto proxy etched and the payers' Permit2 approvals
//! given. With `--rpc-url URL` it uses that chain (Base Sepolia or a fork of it): the
//! relayer key is read from `X402_RELAYER_KEY` and the payer key (which needs test USDC, and
//! for `upto` an approval of Permit2) from `X402_PAYER_KEY`.
//!
//! For each mode — after the handler, before it, deferred one transfer per payment, deferred
//! in batches, `upto` (Permit2, the handler meters one price's worth per call), and a prepaid
//! bundle of `--bundle` calls (one `exact` payment, then sign-in-with-x calls with no
//! transaction) — it sends `--payments` paid requests (the prepaid mode: `--bundle` calls) one
//! after the other through a real `PaymentLayer` and prints (`--modes after,prepaid` picks
//! some):
//!
//! - gas per payment (relayer gas of the mined transactions over the calls served),
//! - added request latency p50/p99: the paid request minus the same handler without payment,
//!   and the pre-check (`check`) and `settle` steps alone (a last row runs deferred batches
//!   without the on-chain pre-check: verification and the journal only),
//! - settlement latency p50/p99 (request → receipt; deferred: journaled → mined),
//! - failures, and the break-even price: the price at which the gas equals the revenue, for a
//!   gas price and an ETH price given as arguments. Defaults, Base-like: 0.01 gwei (Base
//!   Mainnet's minimum base fee is 0.002 gwei, docs.base.org "Network Fees"; 0.01 gwei allows
//!   for busier blocks) and $2500 per ETH (the reference price of that page). Only the L2
//!   execution gas is measured: on Base an L1 data fee comes on top, per byte of calldata.
//!
//! Payment channels (`batch-settlement`, issue #19; `--modes channels` alone): real
//! transactions through the relayer into the escrow (`OnchainSettler` as the channel
//! `Escrow`, `claim_channels`, `settle_channels`): for 10, 100, 1,000 and 10,000 calls per
//! deposit and claims batched over 1 and 32 channels, each channel gets one EIP-3009 deposit
//! of exactly its calls' worth, one claim of its last cumulative voucher (the vouchers before
//! it cost no gas) and its share of one `settle`; the table gives deposit, claim and settle
//! gas per channel from the receipts, gas and $ per call, the share of the price and which
//! step dominates. A first unmeasured round fills the escrow and the receiver's claim record
//! (zero-to-nonzero storage, once per deployment), so the rows are the steady state. Locally
//! the payer needs ~$370 of the test token (minted); with `--rpc-url`, as much test USDC.
//!
//! A full run (no `--modes`) also draws `docs/economics.svg` (`--svg PATH` elsewhere, also
//! with `--modes`): on-chain cost per call against calls per payer (1 to 10,000, log scales)
//! for each measured mode and the channels, with the price line. One-by-one modes are flat;
//! a prepaid bundle costs its payment over the calls used of each bundle bought; a channel
//! its deposit + claim + settle over the calls of its one deposit.
//!
//! With `svm-settle` and `svm-client` (`--all-features`), a last table gives the Solana row
//! (`--modes svm` alone): `--payments` payments by our `PayingLayer` to a route settled by
//! `SvmSettler` on the local litesvm chain of the tests (`tests/svm/chain.mjs`): the fee per
//! payment in lamports (the fee payer's balance) and in $ at `--sol-usd` (default 150), and
//! the confirmation latency (the settle step: send until confirmed).

#[path = "../tests/chain/mod.rs"]
mod chain;

// The local Solana chain of the tests (litesvm behind JSON-RPC), for the SVM row.
#[cfg(all(feature = "svm-settle", feature = "svm-client"))]
mod common {
    pub use super::chain::process;
}
#[cfg(all(feature = "svm-settle", feature = "svm-client"))]
#[path = "../tests/svm/chain.rs"]
mod svm_chain;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::Full;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_x402::body::ResponseBody;
use tower_x402::prepaid::Bundle;
use tower_x402::primitives::U256;
use tower_x402::proto::X402Version;
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::settle::deferred::{DeferredSettler, Outcome};
use tower_x402::settle::onchain::OnchainSettler;
use tower_x402::settle::{SettleError, Settlement, SettlementMode, Settler};
use tower_x402::test_util::{PrivateKeySigner, pay, pay_upto, sign_in_with_x, upto_payload};
use tower_x402::upto::Usage;
use tower_x402::{Asset, PaymentLayer, PaymentOption, VerifiedPayment};

type BoxError = Box<dyn std::error::Error>;

struct Args {
    rpc_url: Option<String>,
    payments: usize,
    batch: usize,
    max_wait: Duration,
    gas_price_gwei: f64,
    eth_usd: f64,
    price_usd: f64,
    bundle: u64,
    modes: Option<Vec<String>>,
    sol_usd: f64,
    /// Where the chart goes: `--svg PATH`; by default docs/economics.svg on a full run
    /// (all modes), nowhere with `--modes`.
    svg: Option<String>,
}

fn parse_args() -> Result<Args, BoxError> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| -> Result<Option<&str>, BoxError> {
        match argv.iter().position(|a| a == name) {
            Some(i) => Ok(Some(
                argv.get(i + 1)
                    .ok_or_else(|| format!("{name} needs a value"))?,
            )),
            None => Ok(None),
        }
    };
    Ok(Args {
        rpc_url: get("--rpc-url")?.map(str::to_owned),
        payments: get("--payments")?.map_or(Ok(40), str::parse)?,
        batch: get("--batch")?.map_or(Ok(20), str::parse)?,
        max_wait: Duration::from_millis(get("--max-wait-ms")?.map_or(Ok(500), str::parse)?),
        gas_price_gwei: get("--gas-price-gwei")?.map_or(Ok(0.01), str::parse)?,
        eth_usd: get("--eth-usd")?.map_or(Ok(2500.0), str::parse)?,
        price_usd: get("--price-usd")?.map_or(Ok(0.001), str::parse)?,
        bundle: get("--bundle")?.map_or(Ok(100), str::parse)?,
        modes: get("--modes")?.map(|m| m.split(',').map(str::to_owned).collect()),
        sol_usd: get("--sol-usd")?.map_or(Ok(150.0), str::parse)?,
        svg: match (get("--svg")?, get("--modes")?) {
            (Some(path), _) => Some(path.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/economics.svg").into()),
        },
    })
}

/// Records how long `check` and `settle` take.
#[derive(Clone)]
struct Timed<S> {
    inner: S,
    check: Arc<Mutex<Vec<Duration>>>,
    settle: Arc<Mutex<Vec<Duration>>>,
}

impl<S> Timed<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            check: Arc::default(),
            settle: Arc::default(),
        }
    }
}

#[async_trait]
impl<S: Settler> Settler for Timed<S> {
    async fn check(&self, payment: &VerifiedPayment) -> Result<(), SettleError> {
        let t = Instant::now();
        let r = self.inner.check(payment).await;
        self.check.lock().expect("lock").push(t.elapsed());
        r
    }
    async fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        let t = Instant::now();
        let r = self.inner.settle(payment).await;
        self.settle.lock().expect("lock").push(t.elapsed());
        r
    }
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    let i = ((s.len() - 1) as f64 * p).round() as usize;
    s[i.min(s.len() - 1)]
}

fn us(d: Duration) -> String {
    if d >= Duration::from_millis(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{} µs", d.as_micros())
    }
}

async fn handler(_req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(
        b"paid content",
    ))))
}

/// The `upto` handler: meters one price's worth per call.
async fn metered(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let charged = match (
        req.extensions().get::<Usage>(),
        req.extensions().get::<Price>(),
    ) {
        (Some(usage), Some(price)) => usage.charge(price.0).is_ok(),
        _ => false,
    };
    let body: &'static [u8] = if charged {
        b"metered content"
    } else {
        b"unmetered"
    };
    Ok(Response::new(Full::new(Bytes::from_static(body))))
}

/// What the `upto` handler charges per call (atomic units).
#[derive(Clone, Copy)]
struct Price(U256);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Requests, each with a fresh signed payment (signed before timing starts).
fn requests(
    payers: &[PrivateKeySigner],
    option: &PaymentOption,
    n: usize,
) -> Vec<Request<Full<Bytes>>> {
    (0..n)
        .map(|i| {
            let (name, value): (HeaderName, HeaderValue) = pay(
                &payers[i % payers.len()],
                option.requirements(),
                now(),
                X402Version::V2,
            );
            Request::get("http://api.test/paid")
                .header(name, value)
                .body(Full::new(Bytes::new()))
                .expect("valid request")
        })
        .collect()
}

/// The layered service of a mode.
type Svc = BoxCloneService<Request<Full<Bytes>>, Response<ResponseBody<Full<Bytes>>>, Infallible>;

/// `upto` requests, each with a fresh signed Permit2 permit.
fn upto_requests(
    payers: &[PrivateKeySigner],
    option: &PaymentOption,
    n: usize,
) -> Vec<Request<Full<Bytes>>> {
    (0..n)
        .map(|i| {
            let req = option.requirements();
            let payload = upto_payload(&payers[i % payers.len()], req, now());
            let (name, value) = pay_upto(req, &payload);
            Request::get("http://api.test/paid")
                .header(name, value)
                .body(Full::new(Bytes::new()))
                .expect("valid request")
        })
        .collect()
}

/// A prepaid bundle's calls: the paying call, then `bundle - 1` sign-ins, each answering a
/// 402 of its own (a sign-in nonce is good for one call).
async fn prepaid_requests(
    svc: &mut Svc,
    payer: &PrivateKeySigner,
    bundle: u64,
) -> Result<Vec<Request<Full<Bytes>>>, BoxError> {
    let get = || {
        Request::get("http://api.test/paid")
            .body(Full::new(Bytes::new()))
            .expect("valid request")
    };
    let mut out = Vec::new();
    for i in 0..bundle {
        let res = svc.ready().await?.call(get()).await?;
        let challenge = res
            .headers()
            .get("payment-required")
            .ok_or("no PAYMENT-REQUIRED header")?;
        let json = tower_x402::proto::header::decode_bytes(challenge, 64 * 1024)?;
        let required: serde_json::Value = serde_json::from_slice(&json)?;
        let (name, value) = if i == 0 {
            let accepts: PaymentRequirements =
                serde_json::from_value(required["accepts"][0].clone())?;
            pay(payer, &accepts, now(), X402Version::V2)
        } else {
            sign_in_with_x(payer, &required["extensions"]["sign-in-with-x"])
        };
        let mut req = get();
        req.headers_mut().insert(name, value);
        out.push(req);
    }
    Ok(out)
}

/// One mode's numbers.
struct Row {
    mode: String,
    payments: usize,
    transactions: u64,
    gas_per_payment: Option<u64>,
    added: (Duration, Duration),
    check: Duration,
    settle: (Duration, Duration),
    settlement: (Duration, Duration),
    failures: u64,
}

struct Env {
    rpc_url: String,
    relayer: PrivateKeySigner,
    payers: Vec<PrivateKeySigner>,
    option: PaymentOption,
    price_usd: f64,
    baseline: Duration,
}

async fn run_mode(env: &Env, args: &Args, mode: &str) -> Result<Row, BoxError> {
    let chain = OnchainSettler::connect(&env.rpc_url, env.relayer.clone()).await?;
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let (settler, layer_mode, deferred): (Arc<dyn Settler>, _, _) = match mode {
        "after" | "upto" | "prepaid" => {
            (Arc::new(chain.clone()), SettlementMode::AfterHandler, None)
        }
        "before" => (Arc::new(chain.clone()), SettlementMode::BeforeHandler, None),
        _ => {
            let batch = if mode == "deferred-1" { 1 } else { args.batch };
            let precheck = mode != "deferred-optimistic";
            let dir =
                std::env::temp_dir().join(format!("tower-x402-economics-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(format!("{mode}.journal"));
            let _ = std::fs::remove_file(&path);
            let sink = outcomes.clone();
            let d = DeferredSettler::builder(chain.clone())
                .journal(&path)
                .max_batch(batch)
                .max_wait(args.max_wait)
                .precheck(precheck)
                .on_outcome(move |o| sink.lock().expect("lock").push(o.clone()))
                .start()?;
            (Arc::new(d.clone()), SettlementMode::AfterHandler, Some(d))
        }
    };
    let timed = Timed::new(settler);
    let builder = PaymentLayer::builder()
        // Payloads are signed before timing starts, from requirements built here, not a 402.
        .no_challenge_binding()
        .settler(timed.clone())
        .settlement_mode(layer_mode);
    // Requests are signed (and sign-in challenges fetched) before timing starts.
    let (mut svc, reqs) = match mode {
        "upto" => {
            let price = Price(env.option.requirements().amount);
            // The client authorises ten prices; the handler meters one.
            let upto = PaymentOption::upto_atomic(
                &Asset::usdc_base_sepolia(),
                price.0 * U256::from(10),
                chain::PAY_TO,
                chain.relayer(),
            )?;
            let layer = builder.accept(upto.clone()).build()?;
            let svc = ServiceBuilder::new()
                .layer(layer)
                .map_request(move |mut r: Request<Full<Bytes>>| {
                    r.extensions_mut().insert(price);
                    r
                })
                .service(service_fn(metered))
                .boxed_clone();
            (svc, upto_requests(&env.payers, &upto, args.payments))
        }
        "prepaid" => {
            let bundle_price = env.price_usd * args.bundle as f64;
            let layer = builder
                .pay_to(chain::PAY_TO)
                .asset(Asset::usdc_base_sepolia())
                .resource_base("http://api.test")
                .prepaid(Bundle::calls(args.bundle).for_price(format!("${bundle_price}")))
                .build()?;
            let mut svc = ServiceBuilder::new()
                .layer(layer)
                .service(service_fn(handler))
                .boxed_clone();
            let reqs = prepaid_requests(&mut svc, &env.payers[0], args.bundle).await?;
            (svc, reqs)
        }
        _ => {
            let layer = builder.accept(env.option.clone()).build()?;
            let svc = ServiceBuilder::new()
                .layer(layer)
                .service(service_fn(handler))
                .boxed_clone();
            (svc, requests(&env.payers, &env.option, args.payments))
        }
    };
    let calls = reqs.len();
    let mut latencies = Vec::with_capacity(calls);
    let mut failures = 0u64;
    let started = Instant::now();
    for req in reqs {
        let t = Instant::now();
        let res = svc.ready().await?.call(req).await?;
        latencies.push(t.elapsed());
        if !res.status().is_success() {
            failures += 1;
        }
    }
    if let Some(d) = &deferred {
        d.flush();
        tokio::time::timeout(Duration::from_secs(120), d.idle()).await?;
    }
    let _elapsed = started.elapsed();
    let stats = chain.stats();
    let added = |p| percentile(&latencies, p).saturating_sub(env.baseline);
    let checks = timed.check.lock().expect("lock").clone();
    let settles = timed.settle.lock().expect("lock").clone();
    let settlement = match &deferred {
        None => settles.clone(),
        Some(_) => outcomes
            .lock()
            .expect("lock")
            .iter()
            .map(|o| o.latency)
            .collect(),
    };
    let failed_outcomes = outcomes
        .lock()
        .expect("lock")
        .iter()
        .filter(|o| !o.is_settled())
        .count() as u64;
    Ok(Row {
        mode: match mode {
            "after" => "AfterHandler".into(),
            "before" => "BeforeHandler".into(),
            "deferred-1" => "Deferred, unbatched".into(),
            "deferred-optimistic" => format!("Deferred, batches of {}, no pre-check", args.batch),
            "upto" => "upto (Permit2), one settlement per call".into(),
            "prepaid" => format!("Prepaid bundle of {} calls (SIWX)", args.bundle),
            _ => format!("Deferred, batches of {}", args.batch),
        },
        payments: calls,
        transactions: stats.sent,
        // Over the calls served: a prepaid bundle's one transaction pays for all its calls.
        gas_per_payment: (stats.settled > 0).then(|| stats.gas_used / calls.max(1) as u64),
        added: (added(0.5), added(0.99)),
        check: percentile(&checks, 0.5),
        settle: (percentile(&settles, 0.5), percentile(&settles, 0.99)),
        settlement: (percentile(&settlement, 0.5), percentile(&settlement, 0.99)),
        failures: failures + failed_outcomes + stats.refused + stats.unknown,
    })
}

/// The journal alone: `settle` of a deferred settler whose worker never runs (a dead RPC,
/// batches that never fill), sequential and 16 at a time, next to a raw `write` +
/// `fdatasync` of the same size on the same disk.
async fn journal_bench(env: &Env, n: usize) -> Result<(), BoxError> {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("tower-x402-economics-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let raw_path = dir.join("raw.bin");
    let mut raw = std::fs::File::create(&raw_path)?;
    let record = vec![b'x'; 760];
    let mut raw_times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        raw.write_all(&record)?;
        raw.sync_data()?;
        raw_times.push(t.elapsed());
    }
    drop(raw);
    let _ = std::fs::remove_file(&raw_path);

    let dead = OnchainSettler::connect("http://127.0.0.1:1", env.relayer.clone()).await?;
    let path = dir.join("bench.journal");
    let _ = std::fs::remove_file(&path);
    let settler = DeferredSettler::builder(dead)
        .journal(&path)
        .max_batch(usize::MAX)
        .max_wait(Duration::from_secs(3600))
        .precheck(false)
        .start()?;
    let payments: Vec<VerifiedPayment> = (0..n * 2)
        .map(|i| {
            let payer = &env.payers[i % env.payers.len()];
            let payload =
                tower_x402::test_util::exact_payload(payer, env.option.requirements(), now());
            let a = &payload.authorization;
            VerifiedPayment::exact(
                X402Version::V2,
                tower_x402::Network::BASE_SEPOLIA,
                env.option.requirements().asset.evm().unwrap_or_default(),
                a.clone(),
                payload.signature.clone(),
            )
        })
        .collect();
    let mut seq = Vec::with_capacity(n);
    for p in &payments[..n] {
        let t = Instant::now();
        settler.settle(p).await?;
        seq.push(t.elapsed());
    }
    let concurrent: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for chunk in payments[n..].chunks(n.div_ceil(16)) {
        let (settler, chunk, times) = (settler.clone(), chunk.to_vec(), concurrent.clone());
        tasks.spawn(async move {
            for p in &chunk {
                let t = Instant::now();
                let _ = settler.settle(p).await;
                times.lock().expect("lock").push(t.elapsed());
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let wall = started.elapsed();
    let concurrent = concurrent.lock().expect("lock").clone();
    println!(
        "journal ({n} appends each): raw write+fdatasync p50 {} p99 {}; deferred settle sequential p50 {} p99 {}; 16 concurrent p50 {} p99 {}, {:.0} payments/s",
        us(percentile(&raw_times, 0.5)),
        us(percentile(&raw_times, 0.99)),
        us(percentile(&seq, 0.5)),
        us(percentile(&seq, 0.99)),
        us(percentile(&concurrent, 0.5)),
        us(percentile(&concurrent, 0.99)),
        concurrent.len() as f64 / wall.as_secs_f64(),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    let local;
    let (rpc_url, relayer, payers) = match &args.rpc_url {
        Some(url) => {
            let relayer: PrivateKeySigner = std::env::var("X402_RELAYER_KEY")
                .map_err(|_| "--rpc-url needs X402_RELAYER_KEY")?
                .trim()
                .parse()?;
            let payer: PrivateKeySigner = std::env::var("X402_PAYER_KEY")
                .map_err(|_| "--rpc-url needs X402_PAYER_KEY (an account holding test USDC)")?
                .trim()
                .parse()?;
            (url.clone(), relayer, vec![payer])
        }
        None => {
            local = chain::Chain::start("economics")
                .await
                .ok_or("anvil not found: run scripts/install-test-deps.sh or pass --rpc-url")?;
            let payers = [
                tower_x402::test_util::DEMO_PAYER_KEY,
                chain::PAYER3_KEY,
                chain::PAYER4_KEY,
            ]
            .iter()
            .map(|k| k.parse())
            .collect::<Result<Vec<PrivateKeySigner>, _>>()?;
            // The `upto` mode pulls through Permit2: a one-time approval per payer.
            for p in &payers {
                local.approve_permit2(p.address()).await;
            }
            (local.url().to_owned(), chain::RELAYER_KEY.parse()?, payers)
        }
    };
    let option = PaymentOption::exact(
        &Asset::usdc_base_sepolia(),
        &format!("${}", args.price_usd),
        chain::PAY_TO,
    )?;

    // The same handler without the layer, with the same header: the baseline.
    let mut bare = service_fn(handler);
    let mut base = Vec::new();
    for req in requests(&payers, &option, args.payments.max(200)) {
        let t = Instant::now();
        let _ = bare.ready().await?.call(req).await?;
        base.push(t.elapsed());
    }
    let env = Env {
        rpc_url,
        relayer,
        payers,
        option,
        price_usd: args.price_usd,
        baseline: percentile(&base, 0.5),
    };
    println!(
        "{} payments per mode at ${} each, sequential requests; bare handler p50 {}\n",
        args.payments,
        args.price_usd,
        us(env.baseline)
    );
    if args
        .modes
        .as_ref()
        .is_none_or(|m| m.iter().any(|x| x == "journal"))
    {
        journal_bench(&env, 1000).await?;
        println!();
    }
    let mut rows = Vec::new();
    let mut keys = Vec::new();
    let all = [
        "after",
        "before",
        "deferred-1",
        "deferred-batch",
        "deferred-optimistic",
        "upto",
        "prepaid",
    ];
    for mode in all {
        if args
            .modes
            .as_ref()
            .is_some_and(|m| !m.iter().any(|x| x == mode))
        {
            continue;
        }
        let row = run_mode(&env, &args, mode).await?;
        eprintln!("{}: done", row.mode);
        rows.push(row);
        keys.push(mode);
    }

    let usd_per_gas = args.gas_price_gwei * 1e-9 * args.eth_usd;
    let single = rows.first().and_then(|r| r.gas_per_payment);
    println!(
        "| mode | txs | gas / payment | vs one tx each | added latency p50 / p99 | check p50 | settle step p50 / p99 | settlement p50 / p99 | failures | gas cost / payment | break-even price |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let gas = r.gas_per_payment.unwrap_or(0);
        let cost = gas as f64 * usd_per_gas;
        let ratio = single
            .filter(|s| *s > 0)
            .map(|s| format!("{:.0} %", 100.0 * gas as f64 / s as f64))
            .unwrap_or_default();
        println!(
            "| {} | {} for {} | {} | {} | {} / {} | {} | {} / {} | {} / {} | {} | ${:.7} | ${:.7} ({:.2} % of ${}) |",
            r.mode,
            r.transactions,
            r.payments,
            gas,
            ratio,
            us(r.added.0),
            us(r.added.1),
            us(r.check),
            us(r.settle.0),
            us(r.settle.1),
            us(r.settlement.0),
            us(r.settlement.1),
            r.failures,
            cost,
            cost,
            100.0 * cost / args.price_usd,
            args.price_usd,
        );
    }
    println!(
        "\ngas price {} gwei, ETH ${}: 1 gas = ${:.3e}. Break-even price: the price at which the settlement gas eats the whole payment (L2 execution gas only; Base adds an L1 data fee).",
        args.gas_price_gwei, args.eth_usd, usd_per_gas
    );
    let channels = if args
        .modes
        .as_ref()
        .is_none_or(|m| m.iter().any(|x| x == "channels"))
    {
        let rows = channel_rows(&env).await?;
        print_channel_rows(&rows, usd_per_gas, args.price_usd, single);
        rows
    } else {
        Vec::new()
    };
    if let Some(path) = &args.svg {
        let curves = curves(&keys, &rows, &channels, usd_per_gas, args.bundle);
        write_chart(
            path,
            &curves,
            args.price_usd,
            args.gas_price_gwei,
            args.eth_usd,
        )?;
        println!("\nchart: {path}");
    }
    #[cfg(all(feature = "svm-settle", feature = "svm-client"))]
    if args
        .modes
        .as_ref()
        .is_none_or(|m| m.iter().any(|x| x == "svm"))
    {
        svm_row(&args).await?;
    }
    Ok(())
}

/// The SVM row: `--payments` Solana `exact` payments, one after the other, made by our
/// `PayingLayer` (the official client's transaction) to a `PaymentLayer` settling after the
/// handler with `SvmSettler`, on the local chain (`tests/svm/chain.mjs`, litesvm, posing as
/// devnet). Fee per payment: the fee payer's lamports spent over the payments. Confirmation
/// latency: the settle step (`sendTransaction` until the status is confirmed).
#[cfg(all(feature = "svm-settle", feature = "svm-client"))]
async fn svm_row(args: &Args) -> Result<(), BoxError> {
    use serde_json::json;
    use tower_x402::client::{PayingLayer, PaymentOutcome, PaymentReport, Policy, SvmPayer};
    use tower_x402::nonce::MemoryNonceStore;
    use tower_x402::svm::{Keypair, SvmAsset, SvmSettler, SvmVerifier, program};

    let deps = svm_chain::deps("economics")
        .ok_or("the local Solana chain is not installed: run scripts/install-test-deps.sh")?;
    let (fee_payer, payer, pay_to) = (
        Keypair::from_seed([1; 32]),
        Keypair::from_seed([2; 32]),
        Keypair::from_seed([3; 32]),
    );
    let price = (args.price_usd * 1e6).round() as u64;
    let chain = svm_chain::Chain::start(
        &deps,
        json!({
            "mint": program::USDC_DEVNET.to_string(),
            "decimals": 6,
            "payer": payer.pubkey().to_string(),
            "payerBalance": price * (args.payments as u64 + 1),
            "feePayer": fee_payer.pubkey().to_string(),
            "payTo": pay_to.pubkey().to_string(),
        }),
    );
    let lamports = |who: &Keypair| -> Result<u64, BoxError> {
        chain
            .call("getBalance", json!([who.pubkey().to_string()]))
            .map_err(|e| format!("getBalance: {e}"))?["value"]
            .as_u64()
            .ok_or_else(|| "getBalance: no value".into())
    };
    let option = PaymentOption::exact_svm(
        &SvmAsset::usdc_devnet(),
        &format!("${}", args.price_usd),
        pay_to.pubkey(),
        fee_payer.pubkey(),
    )?;
    let settler = Timed::new(SvmSettler::new(
        chain.url.clone(),
        tower_x402::Network::SOLANA_DEVNET,
        fee_payer.clone(),
    )?);
    let layer = PaymentLayer::builder()
        .accept(option)
        .verifier(SvmVerifier::new([fee_payer.pubkey()]))
        .settler(settler.clone())
        .settlement_mode(SettlementMode::AfterHandler)
        .nonce_store(MemoryNonceStore::new())
        .build()?;
    let server = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(handler));
    let policy = Policy::new(U256::from(price))
        .allow_svm_token(tower_x402::Network::SOLANA_DEVNET, program::USDC_DEVNET);
    let client = ServiceBuilder::new()
        .layer(
            PayingLayer::new(PrivateKeySigner::random(), policy)
                .svm(SvmPayer::new(payer.clone(), chain.url.clone())?),
        )
        .service(server);

    let fees_before = lamports(&fee_payer)?;
    let (mut paid, mut failures) = (Vec::new(), 0u64);
    for _ in 0..args.payments {
        let req = Request::get("http://local/paid").body(Full::<Bytes>::default())?;
        let t = Instant::now();
        let res = client.clone().oneshot(req).await?;
        let settled = res
            .extensions()
            .get::<PaymentReport>()
            .is_some_and(|r| r.outcome == PaymentOutcome::Settled);
        if res.status().is_success() && settled {
            paid.push(t.elapsed());
        } else {
            failures += 1;
        }
    }
    let fees = fees_before.saturating_sub(lamports(&fee_payer)?);
    let per = fees as f64 / paid.len().max(1) as f64;
    let usd = per * 1e-9 * args.sol_usd;
    let settle = settler.settle.lock().expect("lock").clone();
    println!(
        "\n| network | payments | fee / payment | fee $ / payment | share of ${} | confirmation (settle step) p50 / p99 | paid request p50 / p99 | failures |",
        args.price_usd
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| Solana (local litesvm, SvmSettler) | {} | {per:.0} lamports | ${usd:.7} | {:.3} % | {} / {} | {} / {} | {failures} |",
        paid.len(),
        100.0 * usd / args.price_usd,
        us(percentile(&settle, 0.5)),
        us(percentile(&settle, 0.99)),
        us(percentile(&paid, 0.5)),
        us(percentile(&paid, 0.99)),
    );
    println!(
        "\nSOL ${}: fee = the fee payer's lamports spent (5,000 per signature, two signatures, plus the 20,000 CU x 1 micro-lamport priority fee). The paid request includes the client's two RPC reads (blockhash; the mint once) and the server's simulation.",
        args.sol_usd
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Payment channels (`batch-settlement`, issue #19): deposit, claim and settle gas, measured.

/// Calls per deposit of the channel rows.
const CHANNEL_CALLS: [u64; 4] = [10, 100, 1_000, 10_000];
/// Channels per claim transaction.
const CHANNEL_BATCHES: [usize; 2] = [1, 32];

/// One channel row: `channels` channels, each funded for `calls` calls by one deposit,
/// claimed together in one `claimWithSignature` and swept by one `settle`.
struct ChannelRow {
    calls: u64,
    channels: usize,
    /// Mean gas of one deposit (EIP-3009 `receiveWithAuthorization` into the escrow through
    /// the collector, plus the channel's storage).
    deposit: u64,
    /// The claim transaction's gas over its channels.
    claim: u64,
    /// The settle transaction's gas over the channels it sweeps.
    settle: u64,
}

impl ChannelRow {
    fn per_channel(&self) -> u64 {
        self.deposit + self.claim + self.settle
    }
    fn gas_per_call(&self) -> f64 {
        self.per_channel() as f64 / self.calls as f64
    }
}

/// The channel rows: for every calls-per-deposit and channels-per-claim pair, real
/// transactions on the chain through the relayer (`OnchainSettler`): `channels` deposits of
/// `calls` prices each (fresh channels), one claim of every channel's last voucher (cumulative
/// `calls` prices: the vouchers before it are off-chain and cost no gas), one `settle` to the
/// receiver. Gas from each transaction's receipt.
async fn channel_rows(env: &Env) -> Result<Vec<ChannelRow>, BoxError> {
    use alloy_provider::Provider as _;
    use alloy_signer::SignerSync;
    use tower_x402::channel::serve::Escrow as _;
    use tower_x402::channel::{self, ChannelClaim, ReceiverAuthorizer as _};
    use tower_x402::primitives::{B256, Bytes as ABytes};
    use tower_x402::proto::batch::{
        ChannelConfig, Deposit, DepositAuthorization, Erc3009Authorization,
    };

    let settler = OnchainSettler::connect(&env.rpc_url, env.relayer.clone()).await?;
    let provider =
        alloy_provider::RootProvider::<alloy_network::Ethereum>::connect(&env.rpc_url).await?;
    let chain_id = provider.get_chain_id().await?;
    let gas_of = async |hash: B256| -> Result<u64, BoxError> {
        let receipt = provider
            .get_transaction_receipt(hash)
            .await?
            .ok_or("no receipt")?;
        Ok(alloy_network::ReceiptResponse::gas_used(&receipt))
    };
    let token = Asset::usdc_base_sepolia().address;
    let price = u128::try_from(env.option.requirements().amount)?;
    // The receiver authorizer: a fresh key (it signs the claims, it pays no gas).
    let authorizer = channel::LocalAuthorizer::random()?;
    // The payer least used by the other modes.
    let payer = env.payers.last().ok_or("no payer")?;
    let sign = |digest: B256| -> Result<ABytes, BoxError> {
        Ok(payer.sign_hash_sync(&digest)?.as_bytes().to_vec().into())
    };
    let run = std::process::id() as u64;
    let mut rows = Vec::new();
    // A first round, not measured: the first deposit into an empty escrow and the receiver's
    // first claim write zero-to-nonzero storage (about 17k gas more each), once in the life of
    // a deployment. It leaves one price unclaimed in the escrow, so the measured rounds see
    // the steady state of a shared escrow (its token balance never back to zero).
    let rounds = std::iter::once((1, 2, true)).chain(
        CHANNEL_BATCHES
            .into_iter()
            .flat_map(|b| CHANNEL_CALLS.into_iter().map(move |c| (b, c, false))),
    );
    for (channels, calls, warm_up) in rounds {
        {
            let amount = price * u128::from(calls);
            let claimed = if warm_up { price } else { amount };
            let mut claims = Vec::with_capacity(channels);
            let mut deposit_gas = 0u64;
            for i in 0..channels {
                let salt = B256::from(U256::from_limbs([i as u64, calls, channels as u64, run]));
                let config = ChannelConfig {
                    payer: payer.address(),
                    payer_authorizer: payer.address(),
                    receiver: chain::PAY_TO,
                    receiver_authorizer: authorizer.address(),
                    token,
                    withdraw_delay: 900,
                    salt,
                };
                let id = channel::channel_id(chain_id, &config);
                let valid_before = U256::from(now() + 3600);
                let deposit_salt = B256::repeat_byte(0x5a);
                let digest = channel::receive_authorization_digest(
                    &channel::token_domain(chain_id, token, "USDC", "2"),
                    payer.address(),
                    U256::from(amount),
                    U256::ZERO,
                    valid_before,
                    channel::deposit_nonce(id, deposit_salt),
                );
                let deposit = Deposit {
                    amount: U256::from(amount),
                    authorization: DepositAuthorization {
                        erc3009_authorization: Some(Erc3009Authorization {
                            valid_after: U256::ZERO,
                            valid_before,
                            salt: deposit_salt,
                            signature: sign(digest)?,
                        }),
                        permit2_authorization: None,
                    },
                };
                let mirror = settler
                    .deposit(
                        tower_x402::channel::serve::EscrowChannel {
                            config: &config,
                            id,
                        },
                        &deposit,
                    )
                    .await
                    .map_err(|e| format!("deposit: {e}"))?;
                if mirror.balance != amount {
                    return Err(format!("deposit: balance {} != {amount}", mirror.balance).into());
                }
                deposit_gas += gas_of(mirror.transaction).await?;
                // The last voucher of the channel: `calls` prices, cumulative.
                let ceiling = channel::voucher_digest(chain_id, id, U256::from(claimed))
                    .ok_or("voucher amount")?;
                claims.push(ChannelClaim {
                    config,
                    max_claimable: claimed,
                    signature: sign(ceiling)?,
                    total_claimed: claimed,
                });
            }
            let signature = authorizer
                .sign_digest(channel::claim_digest(chain_id, &claims))
                .map_err(|e| format!("authorizer: {e}"))?;
            let (claim_tx, _) = settler
                .claim_channels(&claims, signature)
                .await
                .map_err(|e| format!("claim: {e}"))?;
            let claim_gas = gas_of(claim_tx).await?;
            let (settle_tx, _, owed) = settler
                .settle_channels(chain::PAY_TO, token)
                .await
                .map_err(|e| format!("settle: {e}"))?
                .ok_or("settle: nothing to settle")?;
            if owed != claimed * channels as u128 {
                return Err(format!(
                    "settle swept {owed}, expected {}",
                    claimed * channels as u128
                )
                .into());
            }
            let settle_gas = gas_of(settle_tx).await?;
            let n = channels as u64;
            if !warm_up {
                rows.push(ChannelRow {
                    calls,
                    channels,
                    deposit: deposit_gas / n,
                    claim: claim_gas / n,
                    settle: settle_gas / n,
                });
            }
        }
    }
    eprintln!("channels: done");
    Ok(rows)
}

fn print_channel_rows(rows: &[ChannelRow], usd_per_gas: f64, price_usd: f64, exact: Option<u64>) {
    println!(
        "\n| calls per deposit | channels per claim | deposit gas / channel | claim gas / channel | settle gas / channel | gas / call | vs one exact tx | cost / call | share of ${price_usd} | dominant |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let per_call = r.gas_per_call();
        let cost = per_call * usd_per_gas;
        let dominant = [
            ("deposit", r.deposit),
            ("claim", r.claim),
            ("settle", r.settle),
        ]
        .into_iter()
        .max_by_key(|(_, g)| *g)
        .map(|(what, g)| {
            format!(
                "{what} ({:.0} %)",
                100.0 * g as f64 / r.per_channel().max(1) as f64
            )
        })
        .unwrap_or_default();
        let ratio = exact
            .filter(|g| *g > 0)
            .map(|g| format!("{:.2} %", 100.0 * per_call / g as f64))
            .unwrap_or_default();
        println!(
            "| {} | {} | {} | {} | {} | {per_call:.1} | {ratio} | ${cost:.9} | {:.4} % | {dominant} |",
            r.calls,
            r.channels,
            r.deposit,
            r.claim,
            r.settle,
            100.0 * cost / price_usd,
        );
    }
    println!(
        "\nchannels: every deposit funds exactly its calls; the vouchers in between are off-chain (no gas); one claim per channel carries its last voucher, one settle sweeps every channel of the claim. Gas from the receipts of real transactions."
    );
}

// ------------------------------------------------------------------------------------------------
// The chart: on-chain cost per call against calls per payer, every mode, hand-written SVG.

/// One line of the chart: its label, colour and cost per call ($) at `n` calls per payer.
struct Curve {
    label: String,
    colour: &'static str,
    dashed: bool,
    cost: Box<dyn Fn(u64) -> f64>,
}

/// The curves of the measured modes: one-by-one modes are flat (each call pays its own
/// transaction); a prepaid bundle of `B` calls costs its one payment over the calls used of
/// each bundle bought (`ceil(n / B)` bundles); a channel costs its deposit, claim and settle
/// over the `n` calls of its one deposit.
fn curves(
    keys: &[&str],
    rows: &[Row],
    channels: &[ChannelRow],
    usd_per_gas: f64,
    bundle: u64,
) -> Vec<Curve> {
    let mut out = Vec::new();
    for (key, row) in keys.iter().zip(rows) {
        let Some(gas) = row.gas_per_payment else {
            continue;
        };
        let per_call = gas as f64 * usd_per_gas;
        let (colour, dashed) = match *key {
            "after" => ("#d62728", false),
            "deferred-batch" => ("#ff7f0e", false),
            "upto" => ("#9467bd", false),
            "prepaid" => ("#2ca02c", false),
            _ => continue,
        };
        let label = match *key {
            "after" => "exact, one transfer per call".to_owned(),
            "prepaid" => format!("prepaid bundle of {bundle} calls"),
            _ => row.mode.replacen("Deferred", "deferred", 1),
        };
        let cost: Box<dyn Fn(u64) -> f64> = if *key == "prepaid" {
            let total = per_call * row.payments as f64;
            Box::new(move |n| total * n.div_ceil(bundle) as f64 / n as f64)
        } else {
            Box::new(move |_| per_call)
        };
        out.push(Curve {
            label,
            colour,
            dashed,
            cost,
        });
    }
    for (batch, colour, dashed) in [(1, "#1f77b4", true), (32, "#17becf", false)] {
        let rows: Vec<&ChannelRow> = channels.iter().filter(|r| r.channels == batch).collect();
        if rows.is_empty() {
            continue;
        }
        // Deposit, claim and settle do not depend on the amount: their mean over the rows.
        let gas = rows.iter().map(|r| r.per_channel()).sum::<u64>() as f64 / rows.len() as f64;
        let per_channel = gas * usd_per_gas;
        out.push(Curve {
            label: format!(
                "channel, one deposit, claims of {batch} channel{}",
                if batch == 1 { "" } else { "s" }
            ),
            colour,
            dashed,
            cost: Box::new(move |n| per_channel / n as f64),
        });
    }
    out
}

/// Writes the chart: log x (calls per payer, 1 to 10,000), log y (on-chain $ per call), one
/// polyline per curve, the price as a horizontal line, a legend.
fn write_chart(
    path: &str,
    curves: &[Curve],
    price_usd: f64,
    gas_price_gwei: f64,
    eth_usd: f64,
) -> Result<(), BoxError> {
    use std::fmt::Write as _;
    const W: f64 = 960.0;
    const H: f64 = 520.0;
    const LEFT: f64 = 90.0;
    const RIGHT: f64 = 600.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 450.0;
    const X_MAX: f64 = 4.0; // log10(10,000)
    let xs: Vec<u64> = {
        let mut v: Vec<u64> = (0..=160)
            .map(|i| 10f64.powf(X_MAX * i as f64 / 160.0).round() as u64)
            .collect();
        v.dedup();
        v
    };
    let mut lo = price_usd.log10();
    let mut hi = lo;
    for c in curves {
        for &n in &xs {
            let y = (c.cost)(n);
            if y > 0.0 {
                lo = lo.min(y.log10());
                hi = hi.max(y.log10());
            }
        }
    }
    let (lo, hi) = (lo.floor(), hi.ceil().max(lo.floor() + 1.0));
    let px = |n: f64| LEFT + (RIGHT - LEFT) * n.log10() / X_MAX;
    let py = |y: f64| BOTTOM - (BOTTOM - TOP) * (y.log10() - lo) / (hi - lo);
    let mut svg = String::new();
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="Helvetica, Arial, sans-serif" font-size="13">"#
    )?;
    writeln!(svg, r#"<rect width="{W}" height="{H}" fill="white"/>"#)?;
    writeln!(
        svg,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle" font-weight="bold">On-chain cost per call against calls per payer</text>"#,
        (LEFT + RIGHT) / 2.0
    )?;
    writeln!(
        svg,
        r##"<text x="{}" y="40" font-size="11" text-anchor="middle" fill="#555">measured on anvil; gas at {gas_price_gwei} gwei, ETH ${eth_usd}; L2 execution gas only</text>"##,
        (LEFT + RIGHT) / 2.0
    )?;
    // Grid and ticks.
    for d in 0..=4 {
        let x = px(10f64.powi(d));
        writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{BOTTOM}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            BOTTOM + 18.0,
            ["1", "10", "100", "1,000", "10,000"][d as usize]
        )?;
    }
    let mut e = lo as i32;
    while e <= hi as i32 {
        let y = py(10f64.powi(e));
        let label = if e >= 0 {
            format!("${}", 10u64.pow(e as u32))
        } else {
            format!("${:.*}", (-e) as usize, 10f64.powi(e))
        };
        writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{RIGHT}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            LEFT - 6.0,
            y + 4.0
        )?;
        e += 1;
    }
    writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        RIGHT - LEFT,
        BOTTOM - TOP
    )?;
    writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">calls per payer (log scale)</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 40.0
    )?;
    writeln!(
        svg,
        r#"<text x="22" y="{}" text-anchor="middle" transform="rotate(-90 22 {})">on-chain cost per call, USD (log scale)</text>"#,
        (TOP + BOTTOM) / 2.0,
        (TOP + BOTTOM) / 2.0
    )?;
    let mut legend = vec![(
        format!("price per call (${price_usd})"),
        "#000",
        "2,4".to_owned(),
    )];
    for c in curves {
        let points: Vec<String> = xs
            .iter()
            .map(|&n| format!("{:.1},{:.1}", px(n as f64), py((c.cost)(n))))
            .collect();
        let dash = if c.dashed { "6,4" } else { "none" };
        writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2.2" stroke-dasharray="{dash}" points="{}"/>"#,
            c.colour,
            points.join(" ")
        )?;
        legend.push((c.label.clone(), c.colour, dash.to_owned()));
    }
    // The price line, over the curves (a mode at the price would hide it).
    let y = py(price_usd);
    writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{y:.1}" x2="{RIGHT}" y2="{y:.1}" stroke="#000" stroke-width="2" stroke-dasharray="2,4"/>"##
    )?;
    for (i, (label, colour, dash)) in legend.iter().enumerate() {
        let y = TOP + 14.0 + 24.0 * i as f64;
        writeln!(
            svg,
            r#"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{colour}" stroke-width="2.2" stroke-dasharray="{dash}"/><text x="{}" y="{:.1}">{}</text>"#,
            RIGHT + 14.0,
            RIGHT + 44.0,
            RIGHT + 50.0,
            y + 4.0,
            label.replace('&', "&amp;").replace('<', "&lt;")
        )?;
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg)?;
    Ok(())
}
