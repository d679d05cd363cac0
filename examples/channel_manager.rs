//! The payment-channel manager as a cron-style command: one round (or, with `--every`, one
//! per interval until Ctrl-C) over the channels a server keeps in Redis. A round refreshes
//! each channel's mirrored escrow state, claims the latest vouchers of many channels per
//! `claimWithSignature` transaction (withdrawing channels first, so that a payer's timed
//! withdrawal cannot take charges the server has not claimed), refunds idle channels if asked,
//! and sweeps the claims to the receiver with `settle`.
//!
//! ```sh
//! export X402_RELAYER_KEY=0x...               # pays the gas
//! export X402_RECEIVER_AUTHORIZER_KEY=0x...   # the channels' receiverAuthorizer
//! cargo run --example channel_manager --features channel-manager,redis,test-util -- \
//!     --rpc http://127.0.0.1:8545 --redis redis://127.0.0.1:6379/ \
//!     [--threshold 100000] [--max-per-tx 32] [--claim-before-withdrawal 300] \
//!     [--refund-idle-after 86400] [--every 60]
//! ```
//!
//! It prints the round's report (channels refreshed, claimed, refunded; amounts; the
//! transactions and their gas). Exit status 1 if the store could not be read.

use std::time::Duration;

use tower_x402::channel::LocalAuthorizer;
use tower_x402::channel::redis::RedisChannelStore;
use tower_x402::settle::onchain::{ChannelManager, OnchainSettler};
use tower_x402::test_util::PrivateKeySigner;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn number<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    arg(args, name).map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}: not a number: {v}"))
    })
}

fn key(var: &str) -> PrivateKeySigner {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("set {var}"))
        .parse()
        .unwrap_or_else(|_| panic!("{var}: not a private key"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let rpc = arg(&args, "--rpc").unwrap_or_else(|| "http://127.0.0.1:8545".into());
    let redis = arg(&args, "--redis").unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let settler = OnchainSettler::connect(&rpc, key("X402_RELAYER_KEY")).await?;
    let store = RedisChannelStore::connect(&redis).await?;
    // The channels' receiverAuthorizer, from X402_RECEIVER_AUTHORIZER_KEY.
    let authorizer = LocalAuthorizer::from_env()?;
    let mut builder = ChannelManager::builder(settler, store, authorizer)
        .refund_idle_after(number(&args, "--refund-idle-after"));
    if let Some(t) = number(&args, "--threshold") {
        builder = builder.claim_threshold(t);
    }
    if let Some(n) = number(&args, "--max-per-tx") {
        builder = builder.max_per_transaction(n);
    }
    if let Some(s) = number(&args, "--claim-before-withdrawal") {
        builder = builder.claim_before_withdrawal(s);
    }
    let Some(every) = number::<u64>(&args, "--every") else {
        let report = builder.build().run_once().await?;
        println!("{report:#?}");
        return Ok(());
    };
    let manager = builder.interval(Duration::from_secs(every)).build();
    let handle = manager.spawn();
    tokio::signal::ctrl_c().await?;
    // Waits for the round in flight: a claim is never cut mid-send.
    let rounds = handle.shutdown().await?;
    println!("stopped after {rounds} rounds");
    Ok(())
}
