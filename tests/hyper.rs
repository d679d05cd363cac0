//! The layer in a plain hyper 1 server, no axum: `service_fn` → `ServiceBuilder` with the
//! payment layer → `TowerToHyperService` → `http1::Builder::serve_connection`.
#![cfg(feature = "test-util")]

mod common;

use std::net::SocketAddr;

use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;
use tower_x402::PaymentLayer;
use tower_x402::proto::header::PAYMENT_SIGNATURE;

/// Serves `hits`' handler behind `layer` with nothing but hyper and tower.
async fn serve_plain(layer: PaymentLayer, hits: &Hits) -> (SocketAddr, JoinHandle<()>) {
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(plain_service::<Incoming>(hits.clone()));
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                // A client hanging up mid-request is not a test failure.
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, server)
}

#[tokio::test]
async fn unpaid_paid_and_replayed_over_plain_hyper() {
    let clock = clock();
    let hits = Hits::new();
    let (addr, server) = serve_plain(layer(&clock), &hits).await;
    let client = client();

    let r = wire(&client, addr, "/report?day=1", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.reason(), None);
    let challenge = r.challenge();
    assert_eq!(challenge.x402_version, 2);
    assert_eq!(
        challenge.resource.url,
        format!("http://{addr}/report?day=1"),
        "from the Host header"
    );
    assert_eq!(challenge.accepts, vec![requirements()]);
    assert_eq!(r.json()["accepts"][0]["network"], json!("base-sepolia"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(hits.get(), 0);

    // The client pays what the challenge asks.
    let proof = tower_x402::test_util::pay(
        &payer(),
        &challenge.accepts[0],
        NOW,
        tower_x402::proto::X402Version::V2,
    );
    let r = wire(&client, addr, "/report?day=1", [proof.clone()]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_success_receipt(&r.receipt(), "eip155:84532");
    assert_eq!(
        r.json()["payer"],
        json!(payer().address().to_checksum(None))
    );
    assert_eq!(r.json()["amount"], json!(AMOUNT));
    assert_eq!(hits.get(), 1);

    let r = wire(&client, addr, "/report?day=1", [proof]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.to_owned()))
    );
    assert!(r.has_no_receipt());
    assert_eq!(hits.get(), 1);
    server.abort();
}

#[tokio::test]
async fn v1_and_refusals_over_plain_hyper() {
    let clock = clock();
    let hits = Hits::new();
    let (addr, server) = serve_plain(layer(&clock), &hits).await;
    let client = client();

    let r = wire(&client, addr, "/x", [proof_v1()]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_success_receipt(&r.v1_receipt(), "base-sepolia");
    assert_eq!(hits.get(), 1);

    // A handler error: no receipt, the proof comes back.
    let proof = proof_v2();
    let status = (
        HeaderName::from_static(STATUS_HEADER),
        HeaderValue::from(500u16),
    );
    let r = wire(&client, addr, "/x", [proof.clone(), status]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.has_no_receipt());
    let r = wire(&client, addr, "/x", [proof.clone()]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(hits.get(), 3);

    // Refusals survive the trip through hyper's header parsing.
    let r = wire(
        &client,
        addr,
        "/x",
        [(PAYMENT_SIGNATURE, HeaderValue::from_static("not base64!"))],
    )
    .await;
    assert_eq!(
        r.outcome(),
        (StatusCode::BAD_REQUEST, Some("invalid_payload".to_owned()))
    );
    let r = wire(&client, addr, "/x", [proof_v2(), proof_v2()]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::BAD_REQUEST, Some("invalid_payload".to_owned())),
        "repeated header lines"
    );
    let huge = HeaderValue::from_bytes(&[b'A'; 9000]).unwrap();
    let r = wire(&client, addr, "/x", [(PAYMENT_SIGNATURE, huge)]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Some("invalid_payload".to_owned())
        )
    );
    assert_eq!(hits.get(), 3);
    server.abort();
}

/// `examples/hyper.rs` runs its own demo (free, unpaid, paid, replayed) and exits 0 only when
/// every answer is the expected one; its printed outcomes are checked too, so it cannot rot.
#[test]
fn the_hyper_example_demo_runs() {
    let out = run_example("hyper");
    for want in [
        "200 OK free: try GET /report",
        "402 Payment Required — pay 1000 atomic units of 0x036CbD53842c5426634e7929541eC2318f3dCF7e on eip155:84532",
        "\"paidBy\":\"0x70997970C51812dc3A010C7d01b50e0d17dc79C8\"",
        "receipt: {\"success\":true,",
        "402 Payment Required — invalid_exact_evm_nonce_already_used",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}
