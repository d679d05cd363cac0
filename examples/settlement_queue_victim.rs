//! One instance of a deferred-settlement fleet, left to die: the victim that
//! `tests/settlement_queue_postgres.rs` kills with SIGKILL in the middle of a batch. Not a
//! usage example (see `DeferredSettler`'s docs for that).
//!
//! With `X402_RPC` (an anvil with automine off, the test's TestUSDC at Base Sepolia's USDC
//! address) and `X402_PG` (a PostgreSQL URL), it accepts `X402_PAYMENTS` payments (default
//! 12) from anvil's demo payers into a `PostgresSettlementQueue`, with batches of 4 and two
//! rounds in flight: the first two batches get their `sent` record and are broadcast (and
//! wait unmined), the rest stay queued. It then leases two of those without sending them (a
//! round cut short before its broadcast), prints `READY` and waits to be killed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tower_x402::proto::X402Version;
use tower_x402::settle::Settler;
use tower_x402::settle::deferred::{
    DeferredSettler, LeaseOwner, LeaseRequest, PostgresSettlementQueue, SettlementQueue,
};
use tower_x402::settle::onchain::OnchainSettler;
use tower_x402::test_util::{PrivateKeySigner, demo_payer, exact_payload};
use tower_x402::{Asset, Network, PaymentOption, VerifiedPayment};

/// anvil's account 0.
const RELAYER_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
/// anvil's accounts 3 and 4 (funded with TestUSDC by the test chain).
const PAYER_KEYS: [&str; 2] = [
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
];
/// anvil's account 2, the payee of the test chain.
const PAY_TO: &str = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rpc = std::env::var("X402_RPC")?;
    let pg = std::env::var("X402_PG")?;
    let n: usize = std::env::var("X402_PAYMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let relayer: PrivateKeySigner = RELAYER_KEY.parse()?;
    let onchain = OnchainSettler::connect(&rpc, relayer).await?;
    let queue = PostgresSettlementQueue::connect(&pg).await?;
    queue.migrate().await?;
    let settler = DeferredSettler::builder(onchain)
        .queue(queue.clone())
        .max_batch(4)
        .max_wait(Duration::from_secs(600))
        .in_flight(2)
        .lease_ttl(Duration::from_secs(2))
        .start()?;
    let mut payers = vec![demo_payer()];
    for k in PAYER_KEYS {
        payers.push(k.parse()?);
    }
    let option = PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.01", PAY_TO.parse()?)?;
    let req = option.requirements();
    for i in 0..n {
        let payload = exact_payload(&payers[i % payers.len()], req, now());
        let payment = VerifiedPayment::exact(
            X402Version::V2,
            Network::BASE_SEPOLIA,
            req.asset.evm().ok_or("an EVM asset")?,
            payload.authorization,
            payload.signature,
        );
        settler.check(&payment).await?;
        settler.settle(&payment).await?;
    }
    // Two queued payments leased by a round that dies before its broadcast.
    let stalled = queue
        .lease(LeaseRequest::new(
            LeaseOwner::random(),
            2,
            Duration::from_secs(2),
            u64::MAX,
        ))
        .await?;
    println!("LEASED {}", stalled.len());
    println!("READY");
    std::future::pending::<()>().await;
    Ok(())
}
