//! Metered billing with `upto`: the client authorises a maximum, the handler charges what the
//! call used, and exactly that is settled.
//!
//! ```sh
//! cargo run --example metered --features axum,client,test-util
//! ```
//!
//! Starts, in-process, a text-generation API on loopback that charges $0.0001 per generated
//! word, up to $0.01 per call (`PaymentOption::upto`), and an agent (`PayingLayer` with
//! `Policy::allow_upto`) that asks it for 3, 40, 0 and 150 words (the last one stops at the
//! maximum). Verify-only: no chain is needed
//! and no money moves, so each receipt names the metered amount without a transaction. To
//! settle for real, give the layer an `OnchainSettler` and pass its `relayer()` as the option's
//! facilitator (see the README, "Metered billing"); the payer approves Permit2 once.

use std::net::SocketAddr;

use axum::{Router, routing::get};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_x402::client::{Budget, PayingLayer, PaymentReport, Policy};
use tower_x402::primitives::{U256, address};
use tower_x402::test_util::demo_payer;
use tower_x402::upto::Usage;
use tower_x402::{Asset, PaymentLayer, PaymentOption};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// $0.0001 per word, in USDC atomic units (6 decimals).
const PER_WORD: u64 = 100;

/// Generates `?words=N` words, charging each one; stops early at the client's maximum.
async fn generate(usage: Usage, uri: http::Uri) -> String {
    let words: u64 = uri
        .query()
        .and_then(|q| q.strip_prefix("words="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let mut out = Vec::new();
    for i in 0..words {
        if usage.remaining() < U256::from(PER_WORD) {
            out.push("[stopped: maximum reached]".to_owned());
            break;
        }
        // Within the remaining maximum, so this charge cannot fail.
        if usage.charge_atomic(PER_WORD).is_err() {
            break;
        }
        out.push(format!("word{i}"));
    }
    out.join(" ")
}

async fn demo_api() -> Result<SocketAddr, BoxError> {
    let pay_to = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
    // The account that would send the settlement transaction (an `OnchainSettler`'s relayer).
    let relayer = address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
    let option = PaymentOption::upto(&Asset::usdc_base_sepolia(), "$0.01", pay_to, relayer)?;
    let paywall = PaymentLayer::builder().accept(option).build()?;
    let app = Router::new()
        .route("/generate", get(generate))
        .route_layer(paywall);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let addr = demo_api().await?;
    println!("metered API on http://{addr}/generate: $0.0001 per word, at most $0.01 per call");
    let budget = Budget::new(U256::from(1_000_000)); // $1
    let client = ServiceBuilder::new()
        .layer(PayingLayer::new(
            demo_payer(),
            Policy::new(U256::from(10_000))
                .allow_upto()
                .budget(budget.clone()),
        ))
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    for words in [3, 40, 0, 150] {
        let url = format!("http://{addr}/generate?words={words}");
        let res = client
            .clone()
            .oneshot(http::Request::get(&url).body(Full::default())?)
            .await?;
        let status = res.status();
        let report = res.extensions().get::<PaymentReport>().cloned();
        let body = res.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body);
        // Long answers: their start and their end (where a stop is said).
        let chars: Vec<char> = text.chars().collect();
        let shown: String = if chars.len() > 70 {
            let (head, tail) = (&chars[..24], &chars[chars.len() - 40..]);
            format!("{} … {}", String::from_iter(head), String::from_iter(tail))
        } else {
            text.to_string()
        };
        println!("{words} words: {status} \"{shown}\"");
        if let Some(r) = report {
            println!(
                "  authorised up to {} units, charged {} units ({:?}), transaction: {}",
                r.max_amount(),
                r.amount(),
                r.outcome,
                r.transaction().map_or("none".into(), |t| t.to_string()),
            );
        }
    }
    println!(
        "budget: {} units spent, {} left",
        budget.spent(),
        budget.remaining()
    );
    Ok(())
}
