//! Deferred settlement's drain rate against the chain's capacity (issue #21): how many
//! payments per second a `DeferredSettler` over an `OnchainSettler` settles when requests come
//! faster than the chain can take them.
//!
//! ```sh
//! scripts/bench-drain     # the BENCHMARKS.md table: two block gas limits, in_flight 1 and 4
//! cargo run --release --example drain --features axum,test-util,onchain,deferred -- \
//!     --gas-limit 30000000 --in-flight 4 --max-batch 160 --seconds 60
//! ```
//!
//! It starts its own anvil (`tests/chain/mod.rs`, compiled in: the test token at the Base
//! Sepolia USDC address, Multicall3 at its canonical address) with `--block-time` (default 2 s)
//! and `--gas-limit` (default 30M, anvil's own default), pre-signs `--rate` × `--seconds`
//! payments of $0.001 from three payers, and sends them through a real `PaymentLayer` +
//! `DeferredSettler` at `--rate` per second (default 1.5 × the chain's capacity at 40k gas per
//! payment) for `--seconds` (default 60), then waits for the backlog to drain (at most
//! `--tail` seconds, default 240; what is left is reported, not an error). Every second it prints the requests accepted and refused
//! (503 past `--max-pending`, default 20 000), the backlog (`pending()`) and the payments
//! settled so far.
//!
//! At the end: the gas per batched payment (relayer gas over payments settled), the chain's
//! capacity for them (block gas limit ÷ gas per payment ÷ block time), the drain rate while
//! the backlog was never empty (settled between `--warmup` (default 10 s) and the end of the
//! load, per second), their ratio, and the blocks' fill over the same window; then one
//! Markdown table row. The pre-check is off by default (`--precheck` turns it on): the drain
//! is the worker's, and a pre-check would spend anvil's CPU (shared with the worker's
//! simulations and estimates) on the request path. The fee cap is 1000 gwei: full blocks raise
//! the base fee ~10 % per block, which is the chain's price of the load, not the crate's limit.

#[path = "../tests/chain/mod.rs"]
mod chain;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy_provider::Provider;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_x402::proto::X402Version;
use tower_x402::settle::deferred::DeferredSettler;
use tower_x402::settle::onchain::OnchainSettler;
use tower_x402::test_util::{PrivateKeySigner, pay};
use tower_x402::{Asset, ExactEvmVerifier, PaymentLayer, PaymentOption};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Gas per batched payment assumed for the default rate (measured: ~35-40k).
const ASSUMED_GAS: f64 = 40_000.0;

struct Args {
    seconds: u64,
    rate: Option<f64>,
    gas_limit: u64,
    block_time: u64,
    in_flight: usize,
    max_batch: usize,
    max_pending: usize,
    precheck: bool,
    warmup: u64,
    tail: u64,
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
    let num = |name: &str, default: u64| -> Result<u64, BoxError> {
        Ok(get(name)?.map(str::parse).transpose()?.unwrap_or(default))
    };
    Ok(Args {
        seconds: num("--seconds", 60)?,
        rate: get("--rate")?.map(str::parse).transpose()?,
        gas_limit: num("--gas-limit", 30_000_000)?,
        block_time: num("--block-time", 2)?.max(1),
        in_flight: num("--in-flight", 1)? as usize,
        max_batch: num("--max-batch", 32)? as usize,
        max_pending: num("--max-pending", 20_000)? as usize,
        precheck: argv.iter().any(|a| a == "--precheck"),
        warmup: num("--warmup", 10)?,
        tail: num("--tail", 240)?,
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn handler(_req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(
        b"paid content",
    ))))
}

/// One line per second.
#[derive(Clone, Copy, Debug)]
struct Sample {
    t: f64,
    accepted: u64,
    refused: u64,
    pending: usize,
    settled: u64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    let (bt, gl) = (args.block_time.to_string(), args.gas_limit.to_string());
    let chain = chain::Chain::start_with("drain", &["--block-time", &bt, "--gas-limit", &gl])
        .await
        .ok_or("anvil not found: run scripts/install-test-deps.sh")?;
    let capacity_assumed = args.gas_limit as f64 / ASSUMED_GAS / args.block_time as f64;
    let rate = args.rate.unwrap_or(1.5 * capacity_assumed);
    let payers = [
        tower_x402::test_util::DEMO_PAYER_KEY,
        chain::PAYER3_KEY,
        chain::PAYER4_KEY,
    ]
    .iter()
    .map(|k| k.parse())
    .collect::<Result<Vec<PrivateKeySigner>, _>>()?;
    let option = PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.001", chain::PAY_TO)?;

    let total = (rate * args.seconds as f64).ceil() as usize;
    eprintln!(
        "drain: block time {} s, block gas limit {}, in_flight {}, max_batch {}, max_pending {}, \
         pre-check {}; {total} payments at {rate:.0}/s for {} s (signing...)",
        args.block_time,
        args.gas_limit,
        args.in_flight,
        args.max_batch,
        args.max_pending,
        if args.precheck { "on" } else { "off" },
        args.seconds
    );
    let signed_at = now();
    let mut requests: Vec<Request<Full<Bytes>>> = (0..total)
        .map(|i| {
            let (name, value) = pay(
                &payers[i % payers.len()],
                option.requirements(),
                signed_at,
                X402Version::V2,
            );
            Request::get("http://api.test/paid")
                .header(name, value)
                .body(Full::new(Bytes::new()))
                .expect("valid request")
        })
        .collect();
    requests.reverse(); // popped from the end, in signing order

    let onchain =
        OnchainSettler::connect(chain.url(), chain::RELAYER_KEY.parse::<PrivateKeySigner>()?)
            .await?
            .with_max_fee_per_gas(1_000_000_000_000)
            .with_poll_interval(Duration::from_millis(100));
    let dir = std::env::temp_dir().join(format!("tower-x402-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let settled = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (s, f) = (settled.clone(), failed.clone());
    let deferred = DeferredSettler::builder(onchain.clone())
        .journal(dir.join("drain.journal"))
        .max_batch(args.max_batch)
        .in_flight(args.in_flight)
        .max_pending(args.max_pending)
        .precheck(args.precheck)
        .on_outcome(move |o| {
            if o.is_settled() {
                s.fetch_add(1, Ordering::Relaxed);
            } else if f.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("drain: first failed outcome: {o:?}");
            }
        })
        .start()?;
    let layer = PaymentLayer::builder()
        // Payments are signed before the run, from the requirements built here, not a 402.
        .no_challenge_binding()
        .accept(option.clone())
        .verifier(ExactEvmVerifier::new())
        .settler(deferred.clone())
        .build()?;
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(handler));

    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let start_block = chain.head().await;
    let load = {
        let (accepted, refused, other) = (accepted.clone(), refused.clone(), other.clone());
        let seconds = args.seconds;
        tokio::spawn(async move {
            // Paced in 10 ms ticks: the requests due by each tick go out then.
            let mut sent = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while start.elapsed() < Duration::from_secs(seconds) {
                tick.tick().await;
                let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(total);
                while sent < due {
                    let Some(req) = requests.pop() else { break };
                    sent += 1;
                    let svc = svc.clone();
                    let (accepted, refused, other) =
                        (accepted.clone(), refused.clone(), other.clone());
                    tokio::spawn(async move {
                        let counter = match svc.oneshot(req).await.map(|r| r.status()) {
                            Ok(StatusCode::OK) => &accepted,
                            Ok(StatusCode::SERVICE_UNAVAILABLE) => &refused,
                            _ => &other,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    });
                }
            }
        })
    };

    let mut samples: Vec<Sample> = Vec::new();
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let limit = Duration::from_secs(args.seconds + args.tail);
    println!("   t  accepted  refused(503)  backlog  settled");
    let end_block = loop {
        second.tick().await;
        let sample = Sample {
            t: start.elapsed().as_secs_f64(),
            accepted: accepted.load(Ordering::Relaxed),
            refused: refused.load(Ordering::Relaxed),
            pending: deferred.pending(),
            settled: settled.load(Ordering::Relaxed),
        };
        println!(
            "{:4.0}  {:8}  {:12}  {:7}  {:7}",
            sample.t, sample.accepted, sample.refused, sample.pending, sample.settled
        );
        samples.push(sample);
        let loaded = start.elapsed() >= Duration::from_secs(args.seconds);
        if loaded && load.is_finished() && sample.pending == 0 {
            break chain.head().await;
        }
        if start.elapsed() > limit {
            eprintln!("drain: not drained after {limit:?}");
            break chain.head().await;
        }
    };
    let drained_at = start.elapsed().as_secs_f64();

    // The steady window: from the warm-up to the end of the load (the backlog never empty).
    let at = |t: u64| {
        samples
            .iter()
            .min_by(|a, b| {
                (a.t - t as f64)
                    .abs()
                    .partial_cmp(&(b.t - t as f64).abs())
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .copied()
    };
    let (from, to) = (
        at(args.warmup).ok_or("no samples")?,
        at(args.seconds).ok_or("no samples")?,
    );
    let drain = (to.settled - from.settled) as f64 / (to.t - from.t).max(1.0);
    let empty_in_window = samples
        .iter()
        .filter(|s| s.t >= from.t && s.t <= to.t)
        .any(|s| s.pending == 0);
    let stats = onchain.stats();
    let gas = stats.gas_per_settlement().ok_or("nothing settled")? as f64;
    let capacity = args.gas_limit as f64 / gas / args.block_time as f64;
    // Block fill over the blocks mined during the window.
    let (mut used, mut limit_sum) = (0u128, 0u128);
    let window_blocks = {
        let first = start_block + (from.t / args.block_time as f64) as u64;
        let last = (start_block + (to.t / args.block_time as f64) as u64).min(end_block);
        first..=last
    };
    for n in window_blocks.clone() {
        if let Some(b) = chain.provider().get_block_by_number(n.into()).await? {
            used += u128::from(b.header.gas_used);
            limit_sum += u128::from(b.header.gas_limit);
        }
    }
    let fill = used as f64 / limit_sum.max(1) as f64;
    let max_backlog = samples.iter().map(|s| s.pending).max().unwrap_or(0);
    let total_settled = settled.load(Ordering::Relaxed);
    println!();
    println!(
        "gas per batched payment {gas:.0} (relayer gas {} over {} settled; {} transactions, {} replaced, {} rolled back)",
        stats.gas_used, stats.settled, stats.sent, stats.replaced, stats.rolled_back
    );
    println!(
        "chain capacity {capacity:.0} payments/s (block gas limit {} / {gas:.0} gas / {} s)",
        args.gas_limit, args.block_time
    );
    println!(
        "drain {drain:.0} payments/s from {:.0} s to {:.0} s{}; ratio {:.2}; blocks {}..={} filled {:.0} %",
        from.t,
        to.t,
        if empty_in_window {
            " (the backlog emptied in the window: offered load below the drain)"
        } else {
            ""
        },
        drain / capacity,
        window_blocks.start(),
        window_blocks.end(),
        fill * 100.0
    );
    println!(
        "offered {rate:.0}/s for {} s: {} accepted, {} refused 503, {} other; backlog max {max_backlog}; \
         {total_settled} settled, {} failed; drained {drained_at:.0} s after the start",
        args.seconds,
        accepted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!(
        "| {} M | {} | {} | {rate:.0} | {gas:.0} | {capacity:.0} | {drain:.0} | {:.2} | {:.0} % | {max_backlog} | {} |",
        args.gas_limit / 1_000_000,
        args.in_flight,
        args.max_batch,
        drain / capacity,
        fill * 100.0,
        refused.load(Ordering::Relaxed),
    );
    let _ = std::fs::remove_dir_all(&dir);
    if failed.load(Ordering::Relaxed) > 0 || other.load(Ordering::Relaxed) > 0 {
        return Err("some payments failed or got an unexpected answer".into());
    }
    let left = accepted.load(Ordering::Relaxed) - total_settled;
    if left > 0 {
        // Not an error: a drain slower than the load leaves a backlog the tail did not clear
        // (the journal keeps it; a longer `--tail` settles it).
        println!("{left} accepted payments still pending after the tail");
    }
    Ok(())
}
