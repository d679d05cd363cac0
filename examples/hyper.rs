//! A paid endpoint on plain hyper 1 + hyper-util: no axum, no router.
//!
//! ```sh
//! cargo run --example hyper --features test-util              # serve, call free/unpaid/paid/replay, exit
//! cargo run --example hyper --features test-util -- --serve   # keep serving (port 4022)
//! ```
//!
//! The stack is `service_fn` → `ServiceBuilder` with the payment layer →
//! `TowerToHyperService` → `http1::Builder::serve_connection`. Without a router, a pricing
//! function decides what is charged: `GET /` is free, every other path costs $0.001 in Base
//! Sepolia USDC, checked in-process (verify-only: no chain is needed, and no money moves).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_x402::primitives::address;
use tower_x402::proto::X402Version;
use tower_x402::proto::v2::PaymentRequired;
use tower_x402::test_util::{demo_payer, pay};
use tower_x402::{Asset, PaymentLayer, PaymentOption, VerifiedPayment};

/// The handler: the verified payment, if any, is in the request extensions.
async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.extensions().get::<VerifiedPayment>() {
        Some(payment) => serde_json::json!({
            "report": "sunny, 21 °C",
            "paidBy": payment.payer.to_checksum(None),
            "amount": payment.amount.to_string(),
        })
        .to_string(),
        None => "free: try GET /report\n".to_owned(),
    };
    Ok(Response::new(Full::new(Bytes::from(body))))
}

fn paywall() -> Result<PaymentLayer, tower_x402::error::ConfigError> {
    let price: Arc<[PaymentOption]> = Arc::new([PaymentOption::exact(
        &Asset::usdc_base_sepolia(),
        "$0.001",
        // Anvil's account #2: a public test address.
        address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
    )?]);
    PaymentLayer::builder()
        .pricing(move |parts| (parts.uri.path() != "/").then(|| price.clone()))
        .description("Weather report")
        .mime_type("application/json")
        .build()
}

/// Accepts connections on `listener` forever, one task per connection.
async fn serve(listener: TcpListener, paywall: PaymentLayer) {
    let svc = ServiceBuilder::new()
        .layer(paywall)
        .service(tower::service_fn(handle));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let svc = TowerToHyperService::new(svc.clone());
        tokio::spawn(async move {
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("connection: {e}");
            }
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let serve_only = std::env::args().skip(1).any(|a| a == "--serve");
    let port = if serve_only { 4022 } else { 0 };
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    let server = tokio::spawn(serve(listener, paywall()?));
    if serve_only {
        server.await?;
        return Ok(());
    }
    let result = demo(addr).await;
    server.abort();
    result
}

type Error = Box<dyn std::error::Error>;

/// Walks the loop as a client would, and fails on any unexpected answer.
async fn demo(addr: SocketAddr) -> Result<(), Error> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = |path: &str, header: Option<(HeaderName, HeaderValue)>| {
        let mut req = Request::get(format!("http://{addr}{path}"));
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        let req = req.body(Empty::new());
        let client = client.clone();
        async move {
            let res = client.request(req?).await?;
            let (parts, body) = res.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, Error>((parts, body))
        }
    };
    let expect = |got: StatusCode, want: StatusCode| {
        if got == want {
            Ok(())
        } else {
            Err(format!("expected {want}, got {got}"))
        }
    };

    println!("\n1. GET / (free)");
    let (parts, body) = get("/", None).await?;
    println!(
        "   {} {}",
        parts.status,
        String::from_utf8_lossy(&body).trim()
    );
    expect(parts.status, StatusCode::OK)?;

    println!("\n2. GET /report without paying");
    let (parts, _) = get("/report", None).await?;
    let challenge = decode_challenge(&parts.headers)?;
    let req = challenge.accepts.first().ok_or("empty accepts")?.clone();
    println!(
        "   {} — pay {} atomic units of {} on {} to {}",
        parts.status, req.amount, req.asset, req.network, req.pay_to
    );
    expect(parts.status, StatusCode::PAYMENT_REQUIRED)?;

    println!("\n3. sign an EIP-3009 authorization (demo key), retry with PAYMENT-SIGNATURE");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let proof = pay(&demo_payer(), &req, now, X402Version::V2);
    let (parts, body) = get("/report", Some(proof.clone())).await?;
    println!("   {} {}", parts.status, String::from_utf8_lossy(&body));
    expect(parts.status, StatusCode::OK)?;
    let receipt = parts.headers.get("payment-response").ok_or("no receipt")?;
    let receipt = base64::engine::general_purpose::STANDARD.decode(receipt)?;
    println!("   receipt: {}", String::from_utf8_lossy(&receipt));

    println!("\n4. replay the same proof");
    let (parts, _) = get("/report", Some(proof)).await?;
    let again = decode_challenge(&parts.headers)?;
    println!(
        "   {} — {}",
        parts.status,
        again.error.as_deref().unwrap_or("?")
    );
    expect(parts.status, StatusCode::PAYMENT_REQUIRED)?;
    println!(
        "\nverify-only mode: the proof was checked in-process and claimed once; no money moved."
    );
    Ok(())
}

/// The v2 challenge from a 402's `PAYMENT-REQUIRED` header.
fn decode_challenge(headers: &http::HeaderMap) -> Result<PaymentRequired, Error> {
    let value = headers.get("payment-required").ok_or("no challenge")?;
    let json = base64::engine::general_purpose::STANDARD.decode(value)?;
    Ok(serde_json::from_slice(&json)?)
}
