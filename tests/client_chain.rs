//! The paying client against the **reference** x402 sellers, with real money on a local chain:
//! `@x402/express` 2.27.0 (v2) and `x402-express` 1.2.0 (v1), settling through the reference
//! facilitator (`@x402/core` + `@x402/evm`) on anvil with our test USDC at the Base Sepolia
//! address (`tests/chain/mod.rs`). All three run in one node process,
//! `tests/clients/reference-server.mjs`. Also: the on-chain balance check refuses an unfunded
//! payer before signing.
//!
//! Without anvil or the node packages the tests print SKIPPED, except under `CI=true`, where
//! they fail (run `scripts/install-test-deps.sh`).
#![cfg(all(feature = "client", feature = "onchain", feature = "test-util"))]

mod chain;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use alloy_primitives::U256;
use alloy_provider::Provider;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tower::{ServiceBuilder, ServiceExt};
use tower_x402::client::{
    Budget, Error, PayingLayer, PaymentOutcome, PaymentReport, Policy, ProviderBalance, Refusal,
};
use tower_x402::proto::X402Version;
use tower_x402::test_util::{PrivateKeySigner, demo_payer};
use tower_x402::{Asset, Network};

use chain::process::{self, repo};
use chain::{Chain, FUNDED, PAY_TO};

/// What the reference sellers charge: `$0.01` in 6-decimal units.
const PRICE: u64 = 10_000;

/// The node packages' dir, or `None` after a loud SKIPPED (a panic under `CI=true`).
fn node_deps(test: &str) -> Option<PathBuf> {
    process::test_deps(test, &["node/node_modules/@x402/express/package.json"])
}

/// `reference-server.mjs` running; killed on drop.
struct Sellers {
    process: process::Server,
    v2: String,
    v1: String,
}

impl Sellers {
    fn start(deps: &Path, rpc: &str) -> Sellers {
        let mut cmd = Command::new("node");
        cmd.arg(repo().join("tests/clients/reference-server.mjs"))
            .args(["--rpc", rpc, "--pay-to", &PAY_TO.to_checksum(None)])
            .env("X402_TEST_DEPS", deps);
        // Its first line is JSON: `{"v2": URL, "v1": URL}`.
        let (process, line) =
            process::Server::start("reference-server.mjs", &mut cmd, Duration::from_secs(60));
        let urls: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{}", process.log()));
        let url = |k: &str| urls[k].as_str().expect("url").to_owned();
        Sellers {
            v2: url("v2"),
            v1: url("v1"),
            process,
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }
}

fn policy() -> Policy {
    Policy::new(U256::from(PRICE)).allow_asset(&Asset::usdc_base_sepolia())
}

fn hyper() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).expect("request")
}

#[tokio::test]
async fn pays_the_reference_sellers_v2_and_v1_on_chain() {
    let test = "pays_the_reference_sellers_v2_and_v1_on_chain";
    let Some(deps) = node_deps(test) else { return };
    let Some(chain) = Chain::start(test).await else {
        return;
    };
    let sellers = Sellers::start(&deps, chain.url());
    let payer = demo_payer();
    assert_eq!(payer.address(), FUNDED[0]);
    let budget = Budget::new(U256::from(3 * PRICE));
    let client = ServiceBuilder::new()
        .layer(PayingLayer::new(
            payer.clone(),
            policy().budget(budget.clone()),
        ))
        .service(hyper());

    for (url, version) in [
        (format!("{}/weather", sellers.v2), X402Version::V2),
        (format!("{}/weather", sellers.v1), X402Version::V1),
    ] {
        let before = (
            chain.balance(PAY_TO).await,
            chain.balance(payer.address()).await,
        );
        let res = client
            .clone()
            .oneshot(get(&url))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}; sellers:\n{}", sellers.log()));
        let status = res.status();
        let paid = res.extensions().get::<PaymentReport>().cloned();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(
            status,
            StatusCode::OK,
            "{url}: {paid:?} {}; sellers:\n{}",
            String::from_utf8_lossy(&body),
            sellers.log()
        );
        let paid = paid.expect("report");
        assert_eq!(paid.version, version);
        assert_eq!(paid.outcome, PaymentOutcome::Settled, "{paid:?}");
        let receipt = paid.receipt.as_ref().expect("receipt");
        assert_eq!(receipt.network, Network::BASE_SEPOLIA);
        let tx = paid.transaction().expect("a settlement transaction");
        let mined = chain
            .provider()
            .get_transaction_receipt(tx)
            .await
            .expect("rpc")
            .expect("the receipt's transaction is mined");
        assert!(mined.status());
        let json: Value = serde_json::from_slice(&body).expect("JSON body");
        assert_eq!(json["report"]["weather"], "sunny");
        assert!(
            chain
                .authorization_used(payer.address(), paid.nonce())
                .await
        );
        let after = (
            chain.balance(PAY_TO).await,
            chain.balance(payer.address()).await,
        );
        assert_eq!(
            after.0 - before.0,
            U256::from(PRICE),
            "payTo got exactly the price"
        );
        assert_eq!(
            before.1 - after.1,
            U256::from(PRICE),
            "payer paid exactly the price"
        );
    }
    assert_eq!(budget.spent(), U256::from(2 * PRICE));
}

#[tokio::test]
async fn the_balance_check_refuses_an_unfunded_payer_before_signing() {
    let test = "the_balance_check_refuses_an_unfunded_payer_before_signing";
    let Some(deps) = node_deps(test) else { return };
    let Some(chain) = Chain::start(test).await else {
        return;
    };
    let sellers = Sellers::start(&deps, chain.url());
    let url = format!("{}/weather", sellers.v2);
    let balances = ProviderBalance::new(Network::BASE_SEPOLIA, chain.provider().clone());

    let unfunded = PrivateKeySigner::random();
    let budget = Budget::new(U256::from(PRICE));
    let err = ServiceBuilder::new()
        .layer(
            PayingLayer::new(unfunded, policy().budget(budget.clone()))
                .balance_source(balances.clone()),
        )
        .service(hyper())
        .oneshot(get(&url))
        .await
        .expect_err("refused");
    match &err {
        Error::NoAcceptableOption(r) => assert_eq!(r.0, vec![Refusal::InsufficientBalance]),
        other => panic!("{other}"),
    }
    assert_eq!(budget.spent(), U256::ZERO, "nothing signed");

    // A funded payer passes the same check and pays.
    let before = chain.balance(PAY_TO).await;
    let res = ServiceBuilder::new()
        .layer(PayingLayer::new(demo_payer(), policy()).balance_source(balances))
        .service(hyper())
        .oneshot(get(&url))
        .await
        .expect("paid");
    assert_eq!(res.status(), StatusCode::OK, "sellers:\n{}", sellers.log());
    assert_eq!(chain.balance(PAY_TO).await - before, U256::from(PRICE));
}

/// Our own seller, settling on the chain: `PaymentLayer` + `OnchainSettler` behind axum.
async fn our_seller(chain: &Chain) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::{Router, routing::get};
    use tower_x402::PaymentLayer;
    use tower_x402::settle::onchain::OnchainSettler;

    let relayer: PrivateKeySigner = chain::RELAYER_KEY.parse().expect("anvil key #0");
    let settler = OnchainSettler::connect(chain.url(), relayer)
        .await
        .expect("settler");
    let paywall = PaymentLayer::builder()
        .pay_to(PAY_TO)
        .price("$0.01")
        .network(Network::BASE_SEPOLIA)
        .settler(settler)
        .nonce_store(tower_x402::MemoryNonceStore::new())
        .build()
        .expect("layer");
    let app = Router::new()
        .route(
            "/weather",
            get(|| async { "{\"report\":{\"weather\":\"sunny\"}}" }),
        )
        .route_layer(paywall);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (addr, task)
}

#[tokio::test]
async fn pays_our_server_settling_on_chain_v2_and_v1() {
    let Some(chain) = Chain::start("pays_our_server_settling_on_chain_v2_and_v1").await else {
        return;
    };
    let (addr, _server) = our_seller(&chain).await;
    let payer = demo_payer();
    for version in [X402Version::V2, X402Version::V1] {
        let client = ServiceBuilder::new()
            .layer(PayingLayer::new(payer.clone(), policy()).only_version(version))
            .service(hyper());
        let before = (
            chain.balance(PAY_TO).await,
            chain.balance(payer.address()).await,
        );
        let res = client
            .oneshot(get(&format!("http://{addr}/weather")))
            .await
            .expect("paid call");
        assert_eq!(res.status(), StatusCode::OK, "{version:?}");
        let paid = res
            .extensions()
            .get::<PaymentReport>()
            .cloned()
            .expect("report");
        assert_eq!(
            (paid.version, &paid.outcome),
            (version, &PaymentOutcome::Settled)
        );
        let tx = paid
            .transaction()
            .expect("the receipt names the settlement");
        let mined = chain
            .provider()
            .get_transaction_receipt(tx)
            .await
            .expect("rpc")
            .expect("mined");
        assert!(mined.status());
        assert!(
            chain
                .authorization_used(payer.address(), paid.nonce())
                .await
        );
        let after = (
            chain.balance(PAY_TO).await,
            chain.balance(payer.address()).await,
        );
        assert_eq!(after.0 - before.0, U256::from(PRICE), "{version:?}");
        assert_eq!(before.1 - after.1, U256::from(PRICE), "{version:?}");
    }
}
