//! A paid API whose payments a remote x402 facilitator verifies and settles.
//!
//! ```sh
//! cargo run --example facilitator --features axum,facilitator -- \
//!     --facilitator https://x402.org/facilitator [--port 4021] [--pay-to 0x...]
//! ```
//!
//! `GET /` is free; `GET /weather` costs $0.001 in Base Sepolia USDC. The first stdout line is
//! `listening on http://ADDR` (`--port 0` picks a free port). Set `FACILITATOR_TOKEN` to send
//! `Authorization: Bearer <token>` to a facilitator that wants one.

use std::net::SocketAddr;
use std::time::Duration;

use axum::{Json, Router, routing::get};
use serde_json::{Value, json};
use tower_x402::facilitator::{BearerToken, FacilitatorClient};
use tower_x402::primitives::{Address, address};
use tower_x402::{Network, PaymentLayer, VerifiedPayment};

async fn weather(payment: VerifiedPayment) -> Json<Value> {
    Json(json!({
        "report": { "weather": "sunny", "temperature": 21 },
        "paidBy": payment.payer,
        "amount": payment.amount.to_string(),
    }))
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = arg(&args, "--facilitator").ok_or("--facilitator URL is required")?;
    let port: u16 = arg(&args, "--port").unwrap_or("4021").parse()?;
    // Anvil's account #2 by default: a public test address.
    let pay_to: Address = match arg(&args, "--pay-to") {
        Some(a) => a.parse()?,
        None => address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
    };

    let mut facilitator = FacilitatorClient::builder(url).settle_timeout(Duration::from_secs(30));
    if let Ok(token) = std::env::var("FACILITATOR_TOKEN") {
        facilitator = facilitator.auth(BearerToken::new(token)?);
    }
    let facilitator = facilitator.build()?;
    // Fail fast on a wrong URL, and spare the first payer the wait.
    match facilitator.supported().await {
        Ok(s) => eprintln!("facilitator {url}: {} payment kinds", s.kinds.len()),
        Err(e) => eprintln!("facilitator {url}: GET /supported failed ({e}); continuing"),
    }

    let paywall = PaymentLayer::builder()
        .pay_to(pay_to)
        .price("$0.001")
        .network(Network::BASE_SEPOLIA)
        .description("Weather report")
        .mime_type("application/json")
        .expose_headers(true)
        .verifier(facilitator.clone())
        .settler(facilitator)
        .build()?;
    let app = Router::new()
        .route("/weather", get(weather))
        .route_layer(paywall)
        .route("/", get(|| async { "free: try GET /weather\n" }));

    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
