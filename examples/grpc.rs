//! A paid gRPC method on tonic, and a demo client that pays it.
//!
//! ```sh
//! cargo run --example grpc --features tonic,test-util,dev-heavy              # serve, call unpaid, pay, replay, exit
//! cargo run --example grpc --features tonic,test-util,dev-heavy -- --serve   # keep serving (port 50051)
//! ```
//!
//! `weather.Weather/Forecast` costs $0.001 in Base Sepolia USDC, checked in-process
//! (verify-only: no chain is needed, and no money moves). No `protoc`: the two messages are
//! written by hand with `prost`'s derive, and the service uses tonic's codegen-free
//! `tonic::server::Grpc` / `tonic::client::Grpc` with `tonic_prost::ProstCodec`.
//!
//! The x402 messages travel in gRPC metadata: the challenge in `payment-required` on a
//! `FAILED_PRECONDITION` status, the proof in `payment-signature`, the receipt in
//! `payment-response`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use http::uri::PathAndQuery;
use tonic::body::Body;
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower_x402::primitives::address;
use tower_x402::proto::X402Version;
use tower_x402::test_util::{demo_payer, pay};
use tower_x402::{Network, PaymentLayer, VerifiedPayment};

/// The request message (hand-written: what `protoc` would generate from
/// `message ForecastRequest { string city = 1; }`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ForecastRequest {
    /// Where.
    #[prost(string, tag = "1")]
    pub city: String,
}

/// The reply message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ForecastReply {
    /// The forecast.
    #[prost(string, tag = "1")]
    pub forecast: String,
    /// Who paid for it (from the verified payment).
    #[prost(string, tag = "2")]
    pub paid_by: String,
}

const FORECAST: &str = "/weather.Weather/Forecast";

/// The method's handler: the verified payment is in the request extensions.
async fn forecast(
    req: tonic::Request<ForecastRequest>,
) -> Result<tonic::Response<ForecastReply>, Status> {
    let payer = req
        .extensions()
        .get::<VerifiedPayment>()
        .map(|p| p.payer.to_checksum(None))
        .ok_or_else(|| Status::internal("no verified payment: is the payment layer on?"))?;
    Ok(tonic::Response::new(ForecastReply {
        forecast: format!("sunny in {}", req.get_ref().city),
        paid_by: payer,
    }))
}

/// `weather.Weather` as a tower service: what tonic's codegen would write, by hand.
#[derive(Clone, Copy)]
struct WeatherServer;

impl NamedService for WeatherServer {
    const NAME: &'static str = "weather.Weather";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Request<Body>> for WeatherServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match req.uri().path() {
            FORECAST => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(
                    ProstCodec::<ForecastReply, ForecastRequest>::default(),
                );
                Ok(grpc.unary(tower::service_fn(forecast), req).await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

fn paywall() -> Result<PaymentLayer, tower_x402::error::ConfigError> {
    PaymentLayer::builder()
        // Anvil's account #2: a public test address.
        .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
        .price("$0.001")
        .network(Network::BASE_SEPOLIA)
        .description("Weather forecast")
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let serve = std::env::args().skip(1).any(|a| a == "--serve");
    let port = if serve { 50051 } else { 0 };
    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    let addr = incoming.local_addr()?;
    println!("listening on http://{addr} (gRPC)");
    let server = Server::builder()
        .layer(paywall()?.grpc())
        .add_service(WeatherServer)
        .serve_with_incoming(incoming);
    if serve {
        server.await?;
        return Ok(());
    }
    let server = tokio::spawn(server);
    let result = demo(addr).await;
    server.abort();
    result
}

/// Calls `Forecast` with an optional `payment-signature`.
async fn call(
    addr: SocketAddr,
    proof: Option<&str>,
) -> Result<Result<tonic::Response<ForecastReply>, Status>, Box<dyn std::error::Error>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await?;
    let mut req = tonic::Request::new(ForecastRequest {
        city: "Lisbon".into(),
    });
    if let Some(proof) = proof {
        req.metadata_mut()
            .insert("payment-signature", MetadataValue::try_from(proof)?);
    }
    Ok(client
        .unary(
            req,
            PathAndQuery::from_static(FORECAST),
            ProstCodec::<ForecastRequest, ForecastReply>::default(),
        )
        .await)
}

/// Walks the whole loop as a gRPC client would.
async fn demo(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    println!("\n1. call Forecast without paying");
    let refused = match call(addr, None).await? {
        Ok(_) => return Err("an unpaid call was served".into()),
        Err(status) => status,
    };
    let challenge = tower_x402::grpc::payment_required(&refused).ok_or("no payment-required")??;
    let req = challenge.accepts.first().ok_or("empty accepts")?.clone();
    println!("   {:?}: {}", refused.code(), refused.message());
    println!(
        "   payment-required: pay {} atomic units of {} on {} to {} for {}",
        req.amount, req.asset, req.network, req.pay_to, challenge.resource.url
    );

    println!(
        "\n2. sign an EIP-3009 authorization (demo key) and call again with payment-signature"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let (_, proof) = pay(&demo_payer(), &req, now, X402Version::V2);
    let proof = proof.to_str()?;
    let reply = call(addr, Some(proof)).await??;
    let receipt = reply
        .metadata()
        .get("payment-response")
        .ok_or("no receipt")?;
    let receipt = base64::engine::general_purpose::STANDARD.decode(receipt.as_encoded_bytes())?;
    println!("   OK: {:?}", reply.get_ref());
    println!("   payment-response: {}", String::from_utf8_lossy(&receipt));

    println!("\n3. replay the same proof");
    let again = match call(addr, Some(proof)).await? {
        Ok(_) => return Err("a replayed proof was served".into()),
        Err(status) => status,
    };
    println!("   {:?}: {}", again.code(), again.message());
    if again.code() != Code::FailedPrecondition {
        return Err("replay was not refused with FAILED_PRECONDITION".into());
    }
    println!(
        "\nverify-only mode: the proof was checked in-process and claimed once; no money moved."
    );
    Ok(())
}
