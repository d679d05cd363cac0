//! A paid API in a few lines, and a demo client that pays it.
//!
//! ```sh
//! cargo run --example quickstart              # serve, pay once as a demo client, replay, exit
//! cargo run --example quickstart -- --serve   # keep serving for outside clients (port 4021)
//! cargo run --example quickstart -- --serve --port 0   # any free port, printed on the first line
//! ```
//!
//! `GET /` is free; `GET /weather` costs $0.001 in Base Sepolia USDC, checked in-process
//! (verify-only: no chain is needed, and no money moves).

use std::net::SocketAddr;

use axum::{Json, Router, routing::get};
use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tower_x402::primitives::address;
use tower_x402::proto::X402Version;
use tower_x402::proto::v2::PaymentRequired;
use tower_x402::test_util::{demo_payer, pay};
use tower_x402::{Network, PaymentLayer, VerifiedPayment};

async fn weather(payment: VerifiedPayment) -> Json<Value> {
    Json(json!({
        "report": { "weather": "sunny", "temperature": 21 },
        "paidBy": payment.payer,
        "amount": payment.amount.to_string(),
    }))
}

fn app() -> Result<Router, tower_x402::error::ConfigError> {
    let paywall = PaymentLayer::builder()
        // Anvil's account #2: a public test address.
        .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
        .price("$0.001")
        .network(Network::BASE_SEPOLIA)
        .description("Weather report")
        .mime_type("application/json")
        .expose_headers(true)
        .build()?;
    Ok(Router::new()
        .route("/weather", get(weather))
        .route_layer(paywall)
        .route("/", get(|| async { "free: try GET /weather\n" })))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve = args.iter().any(|a| a == "--serve");
    let port = match args.iter().position(|a| a == "--port") {
        Some(i) => args.get(i + 1).ok_or("--port needs a value")?.parse()?,
        None if serve => 4021,
        None => 0,
    };
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    let app = app()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if serve {
        server.await??;
        return Ok(());
    }
    demo(addr).await?;
    server.abort();
    Ok(())
}

/// Walks the whole loop as a client would.
async fn demo(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let url = format!("http://{addr}/weather");
    let get = |header: Option<(http::HeaderName, http::HeaderValue)>| {
        let mut req = http::Request::get(&url);
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        let req = req.body(Empty::new());
        let client = client.clone();
        async move {
            let res = client.request(req?).await?;
            let (parts, body) = res.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error>>((parts, body))
        }
    };
    let b64 = base64::engine::general_purpose::STANDARD;

    println!("\n1. GET /weather without paying");
    let (parts, _) = get(None).await?;
    let challenge = decode_challenge(&parts.headers)?;
    let req = challenge.accepts.first().ok_or("empty accepts")?.clone();
    println!(
        "   {} — pay {} atomic units of {} on {} to {}",
        parts.status, req.amount, req.asset, req.network, req.pay_to
    );

    println!("\n2. sign an EIP-3009 authorization (demo key) and retry with PAYMENT-SIGNATURE");
    let payer = demo_payer();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let header = pay(&payer, &req, now, X402Version::V2);
    let (parts, body) = get(Some(header.clone())).await?;
    let receipt = parts.headers.get("payment-response").ok_or("no receipt")?;
    println!("   {} {}", parts.status, String::from_utf8_lossy(&body));
    println!(
        "   receipt: {}",
        String::from_utf8_lossy(&b64.decode(receipt)?)
    );
    if parts.status != http::StatusCode::OK {
        return Err("payment was not accepted".into());
    }

    println!("\n3. replay the same proof");
    let (parts, _) = get(Some(header)).await?;
    let again = decode_challenge(&parts.headers)?;
    println!(
        "   {} — {}",
        parts.status,
        again.error.as_deref().unwrap_or("?")
    );
    if parts.status != http::StatusCode::PAYMENT_REQUIRED {
        return Err("replay was not refused".into());
    }
    println!(
        "\nverify-only mode: the proof was checked in-process and claimed once; no money moved."
    );
    Ok(())
}

/// The v2 challenge from a 402's `PAYMENT-REQUIRED` header.
fn decode_challenge(
    headers: &http::HeaderMap,
) -> Result<PaymentRequired, Box<dyn std::error::Error>> {
    let value = headers.get("payment-required").ok_or("no challenge")?;
    let json = base64::engine::general_purpose::STANDARD.decode(value)?;
    Ok(serde_json::from_slice(&json)?)
}
