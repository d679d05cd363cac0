//! A paid API in a few lines, and a demo client that pays it.
//!
//! ```sh
//! cargo run --example quickstart --features axum,test-util   # serve, pay once as a demo client, replay, exit
//! cargo run --example quickstart --features axum,test-util -- --serve   # keep serving (port 4021)
//! cargo run --example quickstart --features axum,test-util -- --serve --port 0   # any free port
//! ```
//!
//! `GET /` is free; `GET /weather` costs $0.001 in Base Sepolia USDC, checked in-process
//! (verify-only: no chain is needed, and no money moves).
//!
//! # Settling on a real chain
//!
//! With `--rpc-url URL` (and the `onchain` feature; `deferred` for `--mode deferred`) the
//! payments are settled on that chain by an `OnchainSettler`, from the relayer whose private
//! key (hex) is in the `X402_RELAYER_KEY` environment variable; it pays the gas. The chain must
//! be Base Sepolia (84532) or a local fork of it, e.g. anvil with the test token
//! (`cargo run --release --example economics --features test-util,onchain,deferred` starts one).
//!
//! ```sh
//! X402_RELAYER_KEY=0x... cargo run --example quickstart --features axum,test-util,onchain,deferred -- \
//!     --rpc-url https://sepolia.base.org [--mode after|before|deferred] [--serve]
//! ```
//!
//! | option | meaning |
//! |---|---|
//! | `--mode after` (default) | settle after the handler; the receipt carries the transaction hash |
//! | `--mode before` | settle before the handler, which then streams |
//! | `--mode deferred` | journal the payment and answer at once (receipt `transaction` empty); settle in batches |
//! | `--journal PATH` | deferred: the journal file (default `x402-quickstart.journal`) |
//! | `--max-batch N`, `--max-wait-ms N` | deferred: batch size (default 32) and longest wait (default 2000) |
//!
//! Deferred outcomes are printed as JSON lines (`{"outcome": ...}`) on stdout.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::{Json, Router, routing::get};
use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tower_x402::primitives::{U256, address};
use tower_x402::proto::X402Version;
use tower_x402::proto::v2::PaymentRequired;
use tower_x402::settle::{SettlementMode, Settler};
use tower_x402::test_util::{demo_payer, pay};
use tower_x402::{ChallengeKeys, Network, PaymentLayer, VerifiedPayment};

async fn weather(payment: VerifiedPayment) -> Json<Value> {
    Json(json!({
        "report": { "weather": "sunny", "temperature": 21 },
        "paidBy": payment.payer,
        "amount": payment.amount.to_string(),
    }))
}

fn app(settle: Option<Settle>) -> Result<Router, Box<dyn std::error::Error>> {
    let mut paywall = PaymentLayer::builder();
    if let Some(settle) = settle {
        paywall = paywall.settler(settle.settler).settlement_mode(settle.mode);
    }
    // Challenges are bound to their request by default, with a key of this process. Several
    // instances (or challenges that must survive a restart) share one: X402_CHALLENGE_KEY.
    match ChallengeKeys::from_env() {
        Ok(keys) => paywall = paywall.bind_challenges(keys),
        Err(e) if e.is_not_set() => {}
        Err(e) => return Err(e.into()),
    }
    let paywall = paywall
        // Anvil's account #2: a public test address.
        .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
        .price("$0.001")
        .network(Network::BASE_SEPOLIA)
        .description("Weather report")
        .mime_type("application/json")
        .expose_headers(true);
    // `--features paywall`: a browser opening /weather gets a page that pays with its wallet.
    #[cfg(feature = "paywall")]
    let paywall = paywall.paywall(tower_x402::paywall::Paywall::new().app_name("Weather demo"));
    let paywall = paywall.build()?;
    Ok(Router::new()
        .route("/weather", get(weather))
        .route_layer(paywall)
        .route("/", get(|| async { "free: try GET /weather\n" })))
}

/// How payments settle when `--rpc-url` is given.
struct Settle {
    settler: Arc<dyn Settler>,
    mode: SettlementMode,
    /// Set in deferred mode: wait for it before the demo exits.
    #[cfg(feature = "deferred")]
    deferred: Option<tower_x402::settle::deferred::DeferredSettler>,
}

/// The value after `--name`, if given.
fn arg<'a>(args: &'a [String], name: &str) -> Result<Option<&'a str>, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .map(|v| Some(v.as_str()))
            .ok_or_else(|| format!("{name} needs a value")),
        None => Ok(None),
    }
}

#[cfg(feature = "onchain")]
async fn settle(args: &[String], rpc_url: &str) -> Result<Settle, Box<dyn std::error::Error>> {
    use tower_x402::settle::onchain::OnchainSettler;
    let key = std::env::var("X402_RELAYER_KEY")
        .map_err(|_| "--rpc-url needs the relayer's private key in X402_RELAYER_KEY")?;
    let relayer: tower_x402::test_util::PrivateKeySigner = key
        .trim()
        .parse()
        .map_err(|e| format!("X402_RELAYER_KEY: {e}"))?;
    let chain = OnchainSettler::connect(rpc_url, relayer).await?;
    let mode = arg(args, "--mode")?.unwrap_or("after");
    let (settler, mode): (Arc<dyn Settler>, _) = match mode {
        "after" => (Arc::new(chain), SettlementMode::AfterHandler),
        "before" => (Arc::new(chain), SettlementMode::BeforeHandler),
        #[cfg(feature = "deferred")]
        "deferred" => {
            use tower_x402::settle::deferred::{DeferredSettler, OutcomeStatus};
            let ms = |name, default| -> Result<u64, Box<dyn std::error::Error>> {
                Ok(arg(args, name)?
                    .map(str::parse)
                    .transpose()?
                    .unwrap_or(default))
            };
            let deferred = DeferredSettler::builder(chain)
                .journal(arg(args, "--journal")?.unwrap_or("x402-quickstart.journal"))
                .max_batch(usize::try_from(ms("--max-batch", 32)?)?)
                .max_wait(std::time::Duration::from_millis(ms("--max-wait-ms", 2000)?))
                .on_outcome(|o| {
                    let (settled, reason) = match &o.status {
                        OutcomeStatus::Settled => (true, None),
                        OutcomeStatus::Failed(r) => (false, Some(r.clone())),
                        _ => (false, None),
                    };
                    println!(
                        "{}",
                        json!({ "outcome": {
                            "payer": o.payer, "nonce": o.nonce, "settled": settled,
                            "reason": reason, "transaction": o.transaction,
                            "gasUsed": o.gas_used, "latencyMs": o.latency.as_millis() as u64,
                        }})
                    );
                })
                .start()?;
            let settle = Settle {
                settler: Arc::new(deferred.clone()),
                mode: SettlementMode::AfterHandler,
                deferred: Some(deferred),
            };
            return Ok(settle);
        }
        other => return Err(format!("--mode {other}: want after, before or deferred").into()),
    };
    Ok(Settle {
        settler,
        mode,
        #[cfg(feature = "deferred")]
        deferred: None,
    })
}

#[cfg(not(feature = "onchain"))]
async fn settle(_: &[String], _: &str) -> Result<Settle, Box<dyn std::error::Error>> {
    Err("--rpc-url needs the `onchain` feature: cargo run --example quickstart --features axum,test-util,onchain,deferred -- --rpc-url URL".into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve = args.iter().any(|a| a == "--serve");
    let port = match arg(&args, "--port")? {
        Some(p) => p.parse()?,
        None if serve => 4021,
        None => 0,
    };
    let settle = match arg(&args, "--rpc-url")? {
        Some(url) => Some(settle(&args, url).await?),
        None => None,
    };
    let onchain = settle.is_some();
    #[cfg(feature = "deferred")]
    let deferred = settle.as_ref().and_then(|s| s.deferred.clone());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    let app = app(settle)?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if serve {
        server.await??;
        return Ok(());
    }
    demo(addr, onchain).await?;
    #[cfg(feature = "deferred")]
    if let Some(deferred) = deferred {
        println!("\nwaiting for the deferred settlement...");
        deferred.flush();
        deferred.idle().await;
    }
    server.abort();
    Ok(())
}

/// Walks the whole loop as a client would.
async fn demo(addr: SocketAddr, onchain: bool) -> Result<(), Box<dyn std::error::Error>> {
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
        "   {} — pay {} ({} atomic units of {} on {}) to {}",
        parts.status,
        human_price(&req),
        req.amount,
        req.asset,
        req.network,
        req.pay_to
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
    if !onchain {
        println!(
            "   (its `transaction` is empty: verify-only mode checks the signature and claims the\n    \
             nonce, but sends nothing on-chain; run with --rpc-url to settle for real)"
        );
    }
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
    if !onchain {
        println!(
            "\nverify-only mode: the proof was checked in-process and claimed once; no money moved."
        );
    }
    Ok(())
}

/// The price as a person reads it, e.g. `$0.001 USDC on Base Sepolia`, for the USDC presets;
/// other tokens in atomic units with the chain's name.
fn human_price(req: &tower_x402::proto::v2::PaymentRequirements) -> String {
    let network = match req.network {
        Network::BASE => "Base".to_owned(),
        Network::BASE_SEPOLIA => "Base Sepolia".to_owned(),
        other => other.caip2(),
    };
    match tower_x402::Asset::usdc(req.network).filter(|usdc| usdc.address == req.asset) {
        Some(usdc) => {
            let unit = U256::from(10u64).pow(U256::from(usdc.decimals));
            let (whole, frac) = (req.amount / unit, req.amount % unit);
            let frac = format!("{frac:0>width$}", width = usize::from(usdc.decimals));
            let frac = frac.trim_end_matches('0');
            let dot = if frac.is_empty() { "" } else { "." };
            format!("${whole}{dot}{frac} USDC on {network}")
        }
        None => format!("{} units of {} on {network}", req.amount, req.asset),
    }
}

/// The v2 challenge from a 402's `PAYMENT-REQUIRED` header.
fn decode_challenge(
    headers: &http::HeaderMap,
) -> Result<PaymentRequired, Box<dyn std::error::Error>> {
    let value = headers.get("payment-required").ok_or("no challenge")?;
    let json = base64::engine::general_purpose::STANDARD.decode(value)?;
    Ok(serde_json::from_slice(&json)?)
}
