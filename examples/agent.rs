//! An agent that calls a paid API within a budget and says what it paid.
//!
//! ```sh
//! cargo run --example agent --features axum,client,test-util
//!     # offline: starts a paid weather API in-process (verify-only, no chain) and calls it
//!     # 3 times with a budget that covers 2 calls: the third is refused before signing
//! cargo run --example agent --features axum,client,test-util -- \
//!     --url https://api.example/weather --max 10000 --budget 50000 --calls 1
//!     # pays a real server; the key comes from $X402_PAYER_KEY (hex)
//! ```
//!
//! Amounts are atomic units of the token (USDC: 6 decimals, `1000` = $0.001).

use std::net::SocketAddr;

use axum::{Json, Router, routing::get};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tower::{ServiceBuilder, ServiceExt};
use tower_x402::client::{Budget, PayingLayer, PaymentReport, Policy};
use tower_x402::primitives::{U256, address};
use tower_x402::test_util::{PrivateKeySigner, demo_payer};
use tower_x402::{Network, PaymentLayer, VerifiedPayment};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    url: Option<String>,
    max: U256,
    budget: U256,
    calls: u32,
}

fn args() -> Result<Args, BoxError> {
    let mut args = Args {
        url: None,
        max: U256::from(1_000),
        budget: U256::from(2_500),
        calls: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = Some(value()?),
            "--max" => args.max = value()?.parse()?,
            "--budget" => args.budget = value()?.parse()?,
            "--calls" => args.calls = value()?.parse()?,
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: agent [--url URL] [--max UNITS] [--budget UNITS] [--calls N]"
                )
                .into());
            }
        }
    }
    Ok(args)
}

/// The demo seller: `GET /weather` for $0.001 in Base Sepolia USDC, checked in-process.
async fn demo_api() -> Result<SocketAddr, BoxError> {
    async fn weather(payment: VerifiedPayment) -> Json<Value> {
        Json(json!({ "weather": "sunny", "paidBy": payment.payer }))
    }
    let paywall = PaymentLayer::builder()
        .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
        .price("$0.001")
        .network(Network::BASE_SEPOLIA)
        .build()?;
    let app = Router::new()
        .route("/weather", get(weather))
        .route_layer(paywall);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// Atomic units as a 6-decimal token amount.
fn usdc(units: U256) -> String {
    let scale = U256::from(1_000_000);
    format!("{}.{:06}", units / scale, (units % scale).to::<u64>())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = args()?;
    let (url, signer) = match &args.url {
        Some(url) => {
            let key = std::env::var("X402_PAYER_KEY")
                .map_err(|_| "--url pays for real: set X402_PAYER_KEY to the payer's hex key")?;
            (url.clone(), key.parse::<PrivateKeySigner>()?)
        }
        None => {
            let addr = demo_api().await?;
            println!("demo API on http://{addr}/weather ($0.001 per call, verify-only)");
            (format!("http://{addr}/weather"), demo_payer())
        }
    };
    println!(
        "agent {}: at most {} per call, budget {}",
        signer.address(),
        usdc(args.max),
        usdc(args.budget)
    );

    let budget = Budget::new(args.budget);
    let client = ServiceBuilder::new()
        .layer(PayingLayer::new(
            signer,
            Policy::new(args.max).budget(budget.clone()),
        ))
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());

    for call in 1..=args.calls {
        let req = http::Request::get(&url).body(Full::default())?;
        match client.clone().oneshot(req).await {
            Ok(res) => {
                let status = res.status();
                let paid = res.extensions().get::<PaymentReport>().cloned();
                let body = res.into_body().collect().await?.to_bytes();
                println!("call {call}: {status} {}", String::from_utf8_lossy(&body));
                match paid {
                    Some(p) => println!(
                        "  paid {} ({} units of {} on {}) to {}: {:?}, tx {}",
                        usdc(p.amount()),
                        p.amount(),
                        p.requirements.asset,
                        p.requirements.network,
                        p.requirements.pay_to,
                        p.outcome,
                        p.transaction()
                            .map_or("none (not settled on-chain)".into(), |t| t.to_string()),
                    ),
                    None => println!("  nothing to pay"),
                }
            }
            Err(e) if e.is_refused() => println!("call {call}: not paid: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    println!(
        "signed {} in total, {} left",
        usdc(budget.spent()),
        usdc(budget.remaining())
    );
    Ok(())
}
