//! x402 over gRPC: a tonic server behind `PaymentLayer::grpc()`, called by a tonic client over
//! loopback HTTP/2. The messages are hand-written prost types; no `protoc`.
#![cfg(all(feature = "tonic", feature = "test-util"))]

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body::Body as _;
use serde_json::{Value, json};
use tonic::body::Body;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower::{ServiceBuilder, ServiceExt};
use tower_x402::grpc::{GrpcPaymentLayer, payment_required};
use tower_x402::hooks::{HookResponse, PaymentHooks, PaymentRequest};
use tower_x402::nonce::{ClaimToken, NonceKey, NonceStore, Reservation, StoreError};
use tower_x402::proto::PaymentPayload;
use tower_x402::proto::v2::{PaymentRequired, PaymentRequirements};
use tower_x402::verify::{Verifier, VerifyError};
use tower_x402::{PaymentRejection, VerifiedPayment};

#[derive(Clone, PartialEq, prost::Message)]
struct ForecastRequest {
    #[prost(string, tag = "1")]
    city: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ForecastReply {
    #[prost(string, tag = "1")]
    forecast: String,
    #[prost(string, tag = "2")]
    handler: String,
}

const FORECAST: &str = "/weather.Weather/Forecast";

/// `weather.Weather/Forecast`, counting runs with [`Hits`]; answers with a gRPC error when
/// the call's `x-test-status` metadata asks for a status >= 400.
#[derive(Clone)]
struct Weather(Hits);

impl NamedService for Weather {
    const NAME: &'static str = "weather.Weather";
}

impl tower::Service<http::Request<Body>> for Weather {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let hits = self.0.clone();
        let handler = tower::service_fn(move |req: tonic::Request<ForecastRequest>| {
            let hits = hits.clone();
            async move {
                let payment = req.extensions().get::<VerifiedPayment>().cloned();
                let (status, body) = hits.run(req.metadata().as_ref(), payment).await;
                if status != StatusCode::OK {
                    return Err(Status::not_found(format!("handler said {status}")));
                }
                Ok(tonic::Response::new(ForecastReply {
                    forecast: format!("sunny in {}", req.get_ref().city),
                    handler: body.to_string(),
                }))
            }
        });
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<ForecastReply, ForecastRequest>::default());
            Ok(grpc.unary(handler, req).await)
        })
    }
}

/// Serves [`Weather`] behind `layer` with tonic's server on 127.0.0.1:0.
async fn serve(layer: GrpcPaymentLayer, hits: &Hits) -> (Channel, tokio::task::JoinHandle<()>) {
    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = incoming.local_addr().expect("local addr");
    let server = Server::builder()
        .layer(layer)
        .add_service(Weather(hits.clone()))
        .serve_with_incoming(incoming);
    let task = tokio::spawn(async move { server.await.expect("server runs") });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect()
        .await
        .expect("connect over loopback");
    (channel, task)
}

/// Calls `Forecast` with `metadata` (ASCII entries).
async fn call(
    channel: &Channel,
    metadata: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
) -> Result<tonic::Response<ForecastReply>, Status> {
    let mut client = tonic::client::Grpc::new(channel.clone());
    client.ready().await.expect("channel ready");
    let mut req = tonic::Request::new(ForecastRequest {
        city: "Lisbon".into(),
    });
    for (name, value) in metadata {
        let value = MetadataValue::try_from(value.as_bytes()).expect("ASCII metadata");
        let key = MetadataKey::from_bytes(name.as_str().as_bytes()).expect("valid key");
        req.metadata_mut().append(key, value);
    }
    client
        .unary(
            req,
            PathAndQuery::from_static(FORECAST),
            ProstCodec::<ForecastRequest, ForecastReply>::default(),
        )
        .await
}

fn refused(result: Result<tonic::Response<ForecastReply>, Status>) -> Status {
    match result {
        Ok(res) => panic!("served: {:?}", res.get_ref()),
        Err(status) => status,
    }
}

fn challenge(status: &Status) -> PaymentRequired {
    payment_required(status)
        .expect("payment-required metadata")
        .expect("payment-required decodes")
}

fn receipt(metadata: &MetadataMap) -> Option<Value> {
    let raw = metadata.get("payment-response")?;
    let json = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        raw.as_encoded_bytes(),
    )
    .expect("receipt is base64");
    Some(serde_json::from_slice(&json).expect("receipt is JSON"))
}

#[tokio::test]
async fn unpaid_paid_and_replayed_over_tonic() {
    let clock = clock();
    let hits = Hits::new();
    let (channel, server) = serve(layer(&clock).grpc(), &hits).await;

    let status = refused(call(&channel, []).await);
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "payment required");
    let challenge = challenge(&status);
    assert_eq!(challenge.x402_version, 2);
    assert_eq!(challenge.error, None);
    assert_eq!(challenge.accepts, vec![requirements()]);
    assert_eq!(challenge.accepts[0].pay_to, PAY_TO);
    assert_eq!(challenge.accepts[0].amount.to_string(), AMOUNT);
    assert!(
        challenge.resource.url.ends_with(FORECAST),
        "{}",
        challenge.resource.url
    );
    assert_eq!(
        status.metadata().get("cache-control").unwrap(),
        "no-store",
        "refusals are per call"
    );
    assert_eq!(hits.get(), 0);

    // The client pays what the challenge asks, in `payment-signature` metadata.
    let proof = tower_x402::test_util::pay(
        &payer(),
        &challenge.accepts[0],
        NOW,
        tower_x402::proto::X402Version::V2,
    );
    let res = call(&channel, [proof.clone()]).await.expect("paid call");
    assert_eq!(res.get_ref().forecast, "sunny in Lisbon");
    let handler: Value = serde_json::from_str(&res.get_ref().handler).unwrap();
    assert_eq!(handler["payer"], json!(payer().address().to_checksum(None)));
    assert_eq!(handler["amount"], json!(AMOUNT));
    let receipt = receipt(res.metadata()).expect("payment-response metadata");
    assert_success_receipt(&receipt, "eip155:84532");
    assert_eq!(hits.get(), 1);

    // One proof, one run.
    let status = refused(call(&channel, [proof]).await);
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), NONCE_USED);
    assert_eq!(self::challenge(&status).error.as_deref(), Some(NONCE_USED));
    assert!(status.metadata().get("payment-response").is_none());
    assert_eq!(hits.get(), 1);
    server.abort();
}

#[tokio::test]
async fn malformed_and_oversized_proofs_are_invalid_argument() {
    let clock = clock();
    let hits = Hits::new();
    let (channel, server) = serve(layer(&clock).grpc(), &hits).await;
    let signature = HeaderName::from_static("payment-signature");

    let status = refused(
        call(
            &channel,
            [(signature.clone(), HeaderValue::from_static("not base64!"))],
        )
        .await,
    );
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "invalid_payload");
    assert!(payment_required(&status).is_none(), "no challenge on 400");

    let json_garbage = tower_x402::test_util::encode(&json!({"x402Version": 2, "nope": 1}));
    let status = refused(call(&channel, [(signature.clone(), json_garbage)]).await);
    assert_eq!(status.code(), Code::InvalidArgument);

    let huge = HeaderValue::from_bytes(&[b'A'; 9000]).unwrap();
    let status = refused(call(&channel, [(signature, huge)]).await);
    assert_eq!(status.code(), Code::InvalidArgument, "431 over HTTP");
    assert_eq!(status.message(), "invalid_payload");
    assert_eq!(hits.get(), 0);
    server.abort();
}

#[tokio::test]
async fn a_handler_error_is_not_charged_and_the_proof_comes_back() {
    let clock = clock();
    let hits = Hits::new();
    let (channel, server) = serve(layer(&clock).grpc(), &hits).await;
    let proof = proof_v2();
    let fail = (
        HeaderName::from_static(STATUS_HEADER),
        HeaderValue::from_static("500"),
    );

    // tonic sends the handler's Err(Status) as HTTP 200 + grpc-status: without the
    // HandlerStatus shim this would be settled.
    let status = refused(call(&channel, [proof.clone(), fail]).await);
    assert_eq!(status.code(), Code::NotFound, "the handler's own status");
    assert_eq!(receipt(status.metadata()), None, "not charged");
    assert!(payment_required(&status).is_none());
    assert_eq!(hits.get(), 1);

    let res = call(&channel, [proof.clone()]).await.expect("same proof");
    assert_success_receipt(&receipt(res.metadata()).expect("receipt"), "eip155:84532");
    assert_eq!(hits.get(), 2);
    let status = refused(call(&channel, [proof]).await);
    assert_eq!(status.message(), NONCE_USED);
    assert_eq!(hits.get(), 2);
    server.abort();
}

/// A nonce store that is down.
struct DownStore;

#[async_trait]
impl NonceStore for DownStore {
    async fn reserve(&self, _: &NonceKey, _: u64) -> Result<Reservation, StoreError> {
        Err(StoreError::Unavailable {
            retry_after: Some(Duration::from_millis(2500)),
            source: "redis down".into(),
        })
    }
    async fn consume(&self, _: &NonceKey, _: ClaimToken) -> Result<(), StoreError> {
        panic!("nothing was reserved")
    }
    async fn release(&self, _: &NonceKey, _: ClaimToken) -> Result<(), StoreError> {
        panic!("nothing was reserved")
    }
}

#[tokio::test]
async fn a_store_outage_is_unavailable_with_retry_after() {
    let clock = clock();
    let hits = Hits::new();
    let layer = builder(&clock).nonce_store(DownStore).build().unwrap();
    let (channel, server) = serve(layer.grpc(), &hits).await;

    let status = refused(call(&channel, [proof_v2()]).await);
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "service_unavailable");
    assert_eq!(status.metadata().get("retry-after").unwrap(), "3");
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "2500"
    );
    assert_eq!(hits.get(), 0);
    server.abort();
}

/// A verifier whose backend rate-limits us.
struct RateLimitedVerifier;

#[async_trait]
impl Verifier for RateLimitedVerifier {
    async fn verify(
        &self,
        _: &PaymentPayload,
        _: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        Err(VerifyError::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
        })
    }
}

#[tokio::test]
async fn a_rate_limited_backend_is_resource_exhausted_with_retry_after() {
    let clock = clock();
    let hits = Hits::new();
    let layer = builder(&clock)
        .verifier(RateLimitedVerifier)
        .build()
        .unwrap();
    let (channel, server) = serve(layer.grpc(), &hits).await;

    let status = refused(call(&channel, [proof_v2()]).await);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.message(), "rate_limited");
    assert_eq!(status.metadata().get("retry-after").unwrap(), "2");
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "2000"
    );
    assert_eq!(hits.get(), 0);
    server.abort();
}

/// A hook that refuses every payment with the response its function builds.
struct Refuse(fn() -> HookResponse);

#[async_trait]
impl PaymentHooks for Refuse {
    async fn before_verify(&self, _: &PaymentRequest<'_>) -> Result<(), HookResponse> {
        Err((self.0)())
    }
}

#[tokio::test]
async fn hook_refusals_map_by_status_or_pass_when_already_grpc() {
    let clock = clock();
    let hits = Hits::new();
    let grpc_request = || {
        let mut req = request("/weather.Weather/Forecast", [proof_v2()]);
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        req
    };

    // An HTTP-shaped refusal: mapped by its status, its headers kept as metadata.
    let forbidden = || {
        http::Response::builder()
            .status(StatusCode::FORBIDDEN)
            .header("x-why", "payer blocked")
            .body(bytes::Bytes::from_static(b"{\"error\":\"blocked\"}"))
            .unwrap()
    };
    let svc = ServiceBuilder::new()
        .layer(
            builder(&clock)
                .hook(Refuse(forbidden))
                .build()
                .unwrap()
                .grpc(),
        )
        .service(plain_service(hits.clone()));
    let r = send(&svc, grpc_request()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("grpc-status"), Some("7"), "PERMISSION_DENIED");
    assert_eq!(r.header("grpc-message"), Some("refused_by_hook"));
    assert_eq!(r.header("x-why"), Some("payer blocked"));
    assert!(r.body.is_empty());

    // A hook that already answers in gRPC is sent unchanged.
    let grpc_shaped = || {
        http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "16")
            .header("grpc-message", "sign%20in%20first")
            .body(bytes::Bytes::new())
            .unwrap()
    };
    let svc = ServiceBuilder::new()
        .layer(
            builder(&clock)
                .hook(Refuse(grpc_shaped))
                .build()
                .unwrap()
                .grpc(),
        )
        .service(plain_service(hits.clone()));
    let r = send(&svc, grpc_request()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("grpc-status"), Some("16"));
    assert_eq!(r.header("grpc-message"), Some("sign%20in%20first"));
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn only_grpc_requests_are_rewritten() {
    let clock = clock();
    let hits = Hits::new();
    let svc = ServiceBuilder::new()
        .layer(layer(&clock).grpc())
        .service(plain_service(hits.clone()));

    // A REST request on the same stack keeps the HTTP 402 and its v1 JSON body.
    let r = get_with(&svc, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.v1_challenge().accepts.len(), 1);

    let mut req = request("/weather.Weather/Forecast", []);
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc+proto"),
    );
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "application/grpc");
    assert_eq!(res.headers()["grpc-status"], "9");
    assert!(res.body().is_end_stream(), "trailers-only: no body");
    assert_eq!(
        res.extensions().get::<PaymentRejection>().map(|r| r.status),
        Some(StatusCode::PAYMENT_REQUIRED),
        "outer layers still see why"
    );
    let r = Reply::read(res).await;
    assert_eq!(r.challenge().accepts, vec![requirements()]);
    assert!(r.body.is_empty());
    assert_eq!(hits.get(), 0);
}

/// `examples/grpc.rs` runs its own demo (unpaid, paid, replayed) over tonic and exits 0 only
/// when every answer is the expected one; its printed outcomes are checked too.
#[test]
fn the_grpc_example_demo_runs() {
    let out = run_example("grpc");
    for want in [
        "FailedPrecondition: payment required",
        "payment-required: pay 1000 atomic units of 0x036CbD53842c5426634e7929541eC2318f3dCF7e on eip155:84532 to 0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
        "OK: ForecastReply { forecast: \"sunny in Lisbon\", paid_by: \"0x70997970C51812dc3A010C7d01b50e0d17dc79C8\" }",
        "payment-response: {\"success\":true,",
        "FailedPrecondition: invalid_exact_evm_nonce_already_used",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}
