//! Payment channels with the REFERENCE facilitator as the escrow backend: our axum server
//! (`PaymentLayerBuilder::channels`) with `FacilitatorClient` as its `Escrow`, the reference
//! facilitator (`tests/clients/facilitator.mjs`: `@x402/evm` 2.27.0 `BatchSettlementEvmScheme`)
//! on anvil with the batch-settlement contracts at their canonical addresses (`tests/chain`).
//!
//! The official `@x402/evm` batch-settlement client opens a channel (a deposit the facilitator
//! verifies and submits), pays 100 metered calls with vouchers (verified in-process: no
//! facilitator call), recovers lost state through our corrective 402 and refunds (the claim and
//! `refundWithSignature` in one facilitator `multicall`); the facilitator then settles: the
//! receiver holds exactly the charged sum, the payer got the rest back. Faults at the deposit
//! (facilitator down, 500s, garbage) are a 503 with `Retry-After`, the handler not run, nothing
//! charged or deposited; a deposit lost after it was sent is reconciled from the chain on the
//! client's retry and never sent twice. Faults come from a proxy in front of the facilitator.
#![cfg(all(
    feature = "facilitator",
    feature = "onchain",
    feature = "axum",
    feature = "test-util"
))]

mod chain;
#[path = "common/channel_fac.rs"]
mod channel_fac;
mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use channel_fac::Payer;
use common::{Hits, Reply, WireClient, app, client, serve, wire};
use http::HeaderName;
use serde_json::{Value, json};
use tower_x402::channel::serve::Channels;
use tower_x402::channel::store::MemoryChannelStore;
use tower_x402::facilitator::FacilitatorClient;
use tower_x402::primitives::{B256, U256};
use tower_x402::proto::batch::BatchEvmPayload;
use tower_x402::test_util::encode;
use tower_x402::{Network, PaymentLayer};

const PRICE: u128 = channel_fac::PRICE;
const DEPOSIT: u128 = 10_000;

/// anvil and the reference facilitator on it; killed on drop.
struct Stack {
    chain: chain::Chain,
    _facilitator: chain::process::Server,
    url: String,
    deps: PathBuf,
}

impl Stack {
    async fn start(test: &str) -> Option<Stack> {
        let deps = chain::process::test_deps(
            test,
            &[
                "node/node_modules/@x402/core/package.json",
                "node/node_modules/@x402/evm/package.json",
                "node/node_modules/@x402/fetch/package.json",
            ],
        )?;
        let chain = chain::Chain::start(test).await?;
        let mut node = std::process::Command::new("node");
        node.arg(chain::process::repo().join("tests/clients/facilitator.mjs"))
            .args(["--rpc", chain.url()])
            .env("X402_TEST_DEPS", &deps);
        let (facilitator, url) = chain::process::Server::listening(
            "facilitator.mjs",
            &mut node,
            Duration::from_secs(30),
        );
        Some(Stack {
            chain,
            _facilitator: facilitator,
            url,
            deps,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_client_pays_100_calls_through_the_reference_facilitator_exact_to_the_unit() {
    let Some(s) = Stack::start("the_official_client_pays_100_calls_through_the_facilitator").await
    else {
        return;
    };
    let c = &s.chain;
    let facilitator = FacilitatorClient::new(&s.url).expect("client");
    let (addr, runs, _task) = channel_fac::metered_server(facilitator.clone()).await;
    let payer = Payer::new(0).config.payer;
    let receiver_before = c.balance(chain::PAY_TO).await;
    let payer_before = c.balance(payer).await;
    let run = channel_fac::official_client_pays_and_refunds(c, &s.deps, addr, &runs);

    // The refund claimed everything charged; the facilitator sweeps it to the receiver.
    let (tx, moved) = facilitator
        .settle_channels(Network::BASE_SEPOLIA, chain::PAY_TO, chain::TOKEN)
        .await
        .expect("settle")
        .expect("something to settle");
    assert_ne!(tx, B256::ZERO);
    assert_eq!(moved, run.total, "the facilitator settled the charged sum");
    assert_eq!(
        facilitator
            .settle_channels(Network::BASE_SEPOLIA, chain::PAY_TO, chain::TOKEN)
            .await
            .expect("second settle"),
        None,
        "nothing is left to settle"
    );
    // Exact to the unit: the receiver got the charged sum, the payer everything else back.
    assert_eq!(
        c.balance(chain::PAY_TO).await - receiver_before,
        U256::from(run.total)
    );
    assert_eq!(payer_before - c.balance(payer).await, U256::from(run.total));
    assert_eq!(c.balance(chain::BATCH_SETTLEMENT).await, U256::ZERO);
    println!(
        "official client through the reference facilitator: {} calls, {} charged, {} deposited",
        run.runs, run.total, run.deposit
    );
}

// ------------------------------------------------------------------------------------------------
// Faults, from a proxy in front of the reference facilitator

/// What the proxy does with one call.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// 500, not forwarded.
    Status500,
    /// 200 with a body that is not JSON, not forwarded.
    Garbage,
    /// Forwarded; the facilitator's answer is dropped and a 502 sent instead.
    LoseAnswer,
}

#[derive(Default)]
struct ProxyState {
    /// Faults for the next `/verify` and `/settle` calls, in order (then: forward).
    verify: VecDeque<Fault>,
    settle: VecDeque<Fault>,
    /// Calls that reached the facilitator, by path.
    forwarded: Vec<String>,
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    http: reqwest::Client,
    state: Arc<Mutex<ProxyState>>,
}

impl Proxy {
    async fn start(upstream: &str) -> (Proxy, SocketAddr) {
        let proxy = Proxy {
            upstream: upstream.to_owned(),
            http: reqwest::Client::new(),
            state: Arc::default(),
        };
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(proxy.clone());
        let (addr, _task) = serve(app).await;
        (proxy, addr)
    }

    fn fail(&self, path: &str, faults: &[Fault]) {
        let mut s = self.state.lock().expect("lock");
        let queue = if path == "/verify" {
            &mut s.verify
        } else {
            &mut s.settle
        };
        queue.extend(faults.iter().copied());
    }

    /// Calls to `path` that reached the facilitator.
    fn forwarded(&self, path: &str) -> usize {
        let s = self.state.lock().expect("lock");
        s.forwarded.iter().filter(|p| *p == path).count()
    }

    /// Every forwarded call, as `path type`.
    fn settle_types(&self) -> Vec<String> {
        self.state.lock().expect("lock").forwarded.clone()
    }
}

async fn forward(
    State(p): State<Proxy>,
    uri: Uri,
    method: http::Method,
    body: Bytes,
) -> axum::response::Response {
    let path = uri.path().to_owned();
    let fault = {
        let mut s = p.state.lock().expect("lock");
        match path.as_str() {
            "/verify" => s.verify.pop_front(),
            "/settle" => s.settle.pop_front(),
            _ => None,
        }
    };
    match fault {
        Some(Fault::Status500) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "{\"error\":\"boom\"}").into_response();
        }
        Some(Fault::Garbage) => return (StatusCode::OK, "<html>oops</html>").into_response(),
        _ => {}
    }
    let kind = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| {
            v["paymentPayload"]["payload"]["type"]
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    p.state
        .lock()
        .expect("lock")
        .forwarded
        .push(format!("{path} {kind}"));
    let req = p
        .http
        .request(method, format!("{}{path}", p.upstream))
        .header("content-type", "application/json")
        .body(body);
    let res = req.send().await.expect("the facilitator answers");
    let status = res.status().as_u16();
    let text = res.bytes().await.expect("body");
    if let Some(Fault::LoseAnswer) = fault {
        return (StatusCode::BAD_GATEWAY, "upstream connection lost").into_response();
    }
    (
        StatusCode::from_u16(status).expect("status"),
        [("content-type", "application/json")],
        text,
    )
        .into_response()
}

/// Our server with channels in memory and `facilitator` as escrow, and a counting handler.
struct Server {
    addr: SocketAddr,
    client: WireClient,
    hits: Hits,
    store: Arc<MemoryChannelStore>,
}

impl Server {
    async fn start(facilitator: FacilitatorClient) -> Server {
        let store = Arc::new(MemoryChannelStore::new());
        let layer = PaymentLayer::builder()
            .accept(channel_fac::option())
            .channels(
                Channels::new(store.clone(), facilitator)
                    .with_authorizer(channel_fac::authorizer()),
            )
            .build()
            .expect("layer");
        let hits = Hits::new();
        let (addr, _task) = serve(app(&hits).layer(layer)).await;
        Server {
            addr,
            client: client(),
            hits,
            store,
        }
    }

    /// `payload` to `/paid`, echoing the server's own 402.
    async fn send(&self, payload: &BatchEvmPayload) -> Reply {
        let challenge = wire(&self.client, self.addr, "/paid", []).await.challenge();
        let v = json!({ "x402Version": 2, "accepted": challenge.accepts[0], "payload": payload });
        let header = (HeaderName::from_static("payment-signature"), encode(&v));
        wire(&self.client, self.addr, "/paid", [header]).await
    }

    async fn charged(&self, id: B256) -> u128 {
        channel_fac::charged(self.store.as_ref(), id).await
    }
}

/// A client with short deadlines and two attempts, so faults resolve quickly.
fn facilitator(url: &str) -> FacilitatorClient {
    FacilitatorClient::builder(url)
        .max_attempts(2)
        .build()
        .expect("client")
}

fn assert_unavailable(reply: &Reply, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {:?}",
        reply.reason()
    );
    assert!(reply.header("retry-after").is_some(), "{what}: Retry-After");
    assert!(reply.has_no_receipt(), "{what}: no receipt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_facilitator_down_failing_or_answering_garbage_at_the_deposit_is_a_503_and_runs_nothing()
{
    let Some(s) = Stack::start("a_facilitator_failing_at_the_deposit_is_a_503").await else {
        return;
    };
    let c = &s.chain;
    let payer = Payer::new(1);
    let deposit = payer.deposit(DEPOSIT, PRICE);

    // Down: nothing listens at its address.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let down_url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let down = Server::start(facilitator(&down_url)).await;
    assert_unavailable(&down.send(&deposit).await, "facilitator down");
    assert_eq!(
        down.hits.get(),
        0,
        "facilitator down: the handler did not run"
    );
    assert_eq!(down.charged(payer.id).await, 0);

    let (proxy, at) = Proxy::start(&s.url).await;
    let server = Server::start(facilitator(&format!("http://{at}"))).await;
    let cases: [(&str, &str, &[Fault]); 4] = [
        (
            "/verify",
            "500 at /verify (every attempt)",
            &[Fault::Status500, Fault::Status500],
        ),
        ("/verify", "garbage at /verify", &[Fault::Garbage]),
        (
            "/settle",
            "500 at /settle, not forwarded",
            &[Fault::Status500],
        ),
        (
            "/settle",
            "garbage at /settle, not forwarded",
            &[Fault::Garbage],
        ),
    ];
    for (path, what, faults) in cases {
        proxy.fail(path, faults);
        assert_unavailable(&server.send(&deposit).await, what);
        assert_eq!(server.hits.get(), 0, "{what}: the handler did not run");
        assert_eq!(server.charged(payer.id).await, 0, "{what}: nothing charged");
        assert_eq!(
            c.balance(chain::BATCH_SETTLEMENT).await,
            U256::ZERO,
            "{what}: nothing deposited"
        );
    }
    assert_eq!(
        proxy.forwarded("/settle deposit"),
        0,
        "no deposit reached it"
    );

    // The facilitator is back: the same payload opens the channel, once.
    let ok = server.send(&deposit).await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.reason());
    assert_eq!(server.hits.get(), 1);
    assert_eq!(server.charged(payer.id).await, PRICE);
    assert_eq!(
        c.balance(chain::BATCH_SETTLEMENT).await,
        U256::from(DEPOSIT)
    );
    assert_eq!(
        proxy.forwarded("/settle deposit"),
        1,
        "{:?}",
        proxy.settle_types()
    );
    let receipt = ok.receipt();
    assert_eq!(
        receipt["extra"]["channelState"]["balance"],
        json!(DEPOSIT.to_string())
    );
    assert!(!receipt["transaction"].as_str().unwrap_or("").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposit_lost_after_it_was_sent_is_reconciled_from_the_chain_and_never_sent_twice() {
    let Some(s) = Stack::start("a_deposit_lost_after_it_was_sent_is_reconciled").await else {
        return;
    };
    let c = &s.chain;
    let (proxy, at) = Proxy::start(&s.url).await;
    let server = Server::start(facilitator(&format!("http://{at}"))).await;

    // The deposit lands, its answer is lost: 503, nothing run, the money in the escrow.
    let landed = Payer::new(2);
    let deposit = landed.deposit(DEPOSIT, PRICE);
    proxy.fail("/settle", &[Fault::LoseAnswer]);
    assert_unavailable(&server.send(&deposit).await, "answer lost");
    assert_eq!(server.hits.get(), 0, "the handler did not run");
    assert_eq!(server.charged(landed.id).await, 0);
    assert_eq!(
        c.balance(chain::BATCH_SETTLEMENT).await,
        U256::from(DEPOSIT)
    );
    assert_eq!(proxy.forwarded("/settle deposit"), 1);
    // The client retries the same payload: the chain says it landed; nothing is sent again.
    let retry = server.send(&deposit).await;
    assert_eq!(retry.status, StatusCode::OK, "{:?}", retry.reason());
    assert_eq!(server.hits.get(), 1, "one handler run");
    assert_eq!(server.charged(landed.id).await, PRICE);
    assert_eq!(
        proxy.forwarded("/settle deposit"),
        1,
        "the deposit was not sent twice: {:?}",
        proxy.settle_types()
    );
    assert_eq!(
        retry.receipt()["extra"]["channelState"]["balance"],
        json!(DEPOSIT.to_string())
    );
    assert_eq!(
        c.balance(chain::BATCH_SETTLEMENT).await,
        U256::from(DEPOSIT)
    );
    // The channel goes on with vouchers.
    let next = server.send(&landed.pay(2 * PRICE)).await;
    assert_eq!(next.status, StatusCode::OK, "{:?}", next.reason());
    assert_eq!(server.charged(landed.id).await, 2 * PRICE);

    // A `/settle` that failed before reaching the facilitator (its outcome unknown to us):
    // the retry finds nothing on chain, and only then sends the deposit, once.
    let lost = Payer::new(3);
    let deposit = lost.deposit(DEPOSIT, PRICE);
    proxy.fail("/settle", &[Fault::Status500]);
    assert_unavailable(&server.send(&deposit).await, "500 at /settle");
    let retry = server.send(&deposit).await;
    assert_eq!(retry.status, StatusCode::OK, "{:?}", retry.reason());
    assert_eq!(
        proxy.forwarded("/settle deposit"),
        2,
        "{:?}",
        proxy.settle_types()
    );
    assert_eq!(server.hits.get(), 3);
    assert_eq!(
        c.balance(chain::BATCH_SETTLEMENT).await,
        U256::from(2 * DEPOSIT)
    );
}
