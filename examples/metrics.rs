//! Payment metrics on a Prometheus `/metrics` endpoint, next to a paid route.
//!
//! ```sh
//! cargo run --example metrics --features axum,metrics,test-util,dev-heavy              # self-demo, then exit
//! cargo run --example metrics --features axum,metrics,test-util,dev-heavy -- --serve   # keep serving (port 4023)
//! ```
//!
//! The demo serves on a free port, sends one unpaid and one paid request (signed with the
//! public demo key; verify-only, no chain), then scrapes `/metrics` and prints the `x402_*`
//! series. `GET /metrics` is free: only `/weather` is behind the paywall.

use std::net::SocketAddr;

use axum::{Router, routing::get};
use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_x402::metrics::PaymentMetrics;
use tower_x402::primitives::address;
use tower_x402::proto::X402Version;
use tower_x402::proto::v2::PaymentRequired;
use tower_x402::test_util::{demo_payer, pay};
use tower_x402::{Network, PaymentLayer, VerifiedPayment};

fn app(prometheus: PrometheusHandle) -> Result<Router, tower_x402::error::ConfigError> {
    let paywall = PaymentLayer::builder()
        // Anvil's account #2: a public test address.
        .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
        .price("$0.001")
        .network(Network::BASE_SEPOLIA)
        .hook(PaymentMetrics::new().with_label("api", "weather"))
        .build()?;
    Ok(Router::new()
        .route(
            "/weather",
            get(|p: VerifiedPayment| async move { format!("sunny, paid by {}\n", p.payer) }),
        )
        .route_layer(paywall)
        .route(
            "/metrics",
            get(move || {
                let prometheus = prometheus.clone();
                async move {
                    // Drains the histograms' recent samples; cheap, so once per scrape is fine.
                    prometheus.run_upkeep();
                    prometheus.render()
                }
            }),
        ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve = args.iter().any(|a| a == "--serve");
    // Installed once, before any request: the `metrics` macros then record into it.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let port = if serve { 4023 } else { 0 };
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr} (GET /weather costs $0.001, GET /metrics is free)");
    let app = app(prometheus)?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if serve {
        server.await??;
        return Ok(());
    }
    demo(addr).await?;
    server.abort();
    Ok(())
}

/// One unpaid request, one paid request, then a scrape.
async fn demo(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let get = |path: &str, header: Option<(http::HeaderName, http::HeaderValue)>| {
        let mut req = http::Request::get(format!("http://{addr}{path}"));
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

    let (parts, _) = get("/weather", None).await?;
    println!("GET /weather unpaid: {}", parts.status);
    let value = parts
        .headers
        .get("payment-required")
        .ok_or("no challenge")?;
    let challenge: PaymentRequired =
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(value)?)?;
    let requirements = challenge.accepts.first().ok_or("empty accepts")?;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let proof = pay(&demo_payer(), requirements, now, X402Version::V2);
    let (parts, _) = get("/weather", Some(proof)).await?;
    println!("GET /weather paid:   {}", parts.status);
    if parts.status != http::StatusCode::OK {
        return Err("the payment was not accepted".into());
    }

    let (parts, body) = get("/metrics", None).await?;
    println!("\nGET /metrics: {} (x402 series)", parts.status);
    let text = String::from_utf8(body.to_vec())?;
    for line in text.lines().filter(|l| l.contains("x402_")) {
        println!("  {line}");
    }
    if !text.contains("x402_payments_settled_total") {
        return Err("no settlement was recorded".into());
    }
    Ok(())
}
