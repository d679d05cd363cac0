//! `FacilitatorClient` against the REFERENCE facilitator: `tests/clients/facilitator.mjs`
//! (`@x402/core` + `@x402/evm` 2.27.0) settling on a local anvil chain (`tests/chain`), behind
//! `examples/facilitator.rs` (our layer with the client as verifier and settler). The official
//! clients pay it (`tests/clients/pay.mjs` JS v2 and v1, `tests/clients/pay.py` Python v2); each
//! test checks that the payee's balance rose by exactly the price, that the receipt carries the
//! mined transaction, and that the same proof replayed is refused. The `upto` scheme goes
//! through the same facilitator (its `UptoEvmScheme`), settling exactly the metered amount.
//!
//! Needs node + the pinned packages, the Python venv and anvil in `$X402_TEST_DEPS` (default
//! `<repo>/target/test-deps`, from `scripts/install-test-deps.sh`), and the example binary
//! (`cargo build --all-features --examples`, which `scripts/test` does). Missing pieces fail
//! under `CI=true` and print a loud SKIPPED elsewhere.
#![cfg(all(
    feature = "facilitator",
    feature = "onchain",
    feature = "axum",
    feature = "test-util"
))]

#[path = "chain/mod.rs"]
mod chain;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use alloy_primitives::{B256, U256};
use alloy_provider::Provider;
use chain::process::{self, Log, repo};
use chain::{Chain, PAY_TO};
use serde_json::Value;

/// What the example charges for `GET /weather` ($0.001 of 6-decimal USDC).
const PRICE: u64 = 1000;
const PAYER_1: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
/// The reference facilitator's refusals of a used or unfunded authorization. Its precise
/// diagnosis (`…_nonce_already_used`, `…_insufficient_balance`) needs Multicall3, which the
/// test chain etches at its canonical address (tests/chain/mod.rs); without it the reference
/// says `…_transaction_simulation_failed`.
const NONCE_USED: &str = "invalid_exact_evm_nonce_already_used";
const SIMULATION_FAILED: &str = "invalid_exact_evm_transaction_simulation_failed";
const INSUFFICIENT_BALANCE: &str = "invalid_exact_evm_insufficient_balance";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process that prints `listening on URL` first; killed on drop. Its output is kept
/// for failure messages.
struct Proc {
    process: process::Server,
    url: String,
}

impl Proc {
    fn start(name: &str, mut cmd: Command) -> Proc {
        let (process, url) = process::Server::listening(name, &mut cmd, START_TIMEOUT);
        Proc { process, url }
    }
}

/// anvil, the reference facilitator on it, and the example server using that facilitator.
struct Stack {
    chain: Chain,
    facilitator: Proc,
    server: Proc,
    deps: PathBuf,
}

impl Stack {
    async fn start(test: &str, marker: &str) -> Option<Stack> {
        let deps =
            process::test_deps(test, &["node/node_modules/@x402/core/package.json", marker])?;
        let chain = Chain::start(test).await?;
        let mut node = Command::new("node");
        node.arg(repo().join("tests/clients/facilitator.mjs"))
            .args(["--rpc", chain.url()])
            .env("X402_TEST_DEPS", &deps);
        let facilitator = Proc::start("facilitator.mjs", node);
        let mut example = Command::new(process::example_bin("facilitator"));
        example.args(["--facilitator", &facilitator.url, "--port", "0"]);
        let server = Proc::start("examples/facilitator", example);
        Some(Stack {
            chain,
            facilitator,
            server,
            deps,
        })
    }

    fn logs(&self) -> String {
        logs(
            &self.facilitator.process.log_handle(),
            &self.server.process.log_handle(),
        )
    }

    /// Runs a client driver (blocking, in a thread) and returns its JSON line.
    async fn pay(&self, program: String, args: Vec<String>) -> Value {
        let mut cmd = Command::new(program);
        cmd.args(args).env("X402_TEST_DEPS", &self.deps);
        let facilitator = self.facilitator.process.log_handle();
        let server = self.server.process.log_handle();
        tokio::task::spawn_blocking(move || {
            process::run_json(&mut cmd, CLIENT_TIMEOUT, || logs(&facilitator, &server))
        })
        .await
        .expect("client thread")
    }

    async fn pay_js(&self, client: &str) -> Value {
        let script = repo().join("tests/clients/pay.mjs");
        let args = [
            script.to_str().unwrap(),
            "--client",
            client,
            "--url",
            &format!("{}/weather", self.server.url),
            "--replay",
        ];
        self.pay("node".into(), args.iter().map(|s| s.to_string()).collect())
            .await
    }

    async fn pay_py(&self) -> Value {
        let script = repo().join("tests/clients/pay.py");
        let python = self.deps.join("venv/bin/python");
        let args = [
            script.to_str().unwrap(),
            "--client",
            "v2",
            "--transport",
            "requests",
            "--url",
            &format!("{}/weather", self.server.url),
            "--replay",
        ];
        self.pay(
            python.to_str().unwrap().into(),
            args.iter().map(|s| s.to_string()).collect(),
        )
        .await
    }

    /// The client paid the price, once, on chain; the receipt names the mined transaction;
    /// the replay was refused.
    async fn assert_paid(&self, r: &Value, network: &str, before: U256) {
        let ctx = || format!("client output: {r:#}\n{}", self.logs());
        assert_eq!(r["status"], 200, "paid request must succeed; {}", ctx());
        let receipt = &r["paymentResponse"];
        assert_eq!(receipt["success"], true, "{}", ctx());
        assert_eq!(receipt["network"], network, "{}", ctx());
        assert!(
            receipt["payer"]
                .as_str()
                .is_some_and(|p| p.eq_ignore_ascii_case(PAYER_1)),
            "{}",
            ctx()
        );
        let tx: B256 = receipt["transaction"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("receipt.transaction is a tx hash; {}", ctx()));
        let mined = self
            .chain
            .provider()
            .get_transaction_receipt(tx)
            .await
            .expect("eth_getTransactionReceipt")
            .unwrap_or_else(|| panic!("transaction {tx} is not on the chain; {}", ctx()));
        assert!(mined.status(), "transaction {tx} reverted; {}", ctx());
        assert_eq!(
            self.chain.balance(PAY_TO).await,
            before + U256::from(PRICE),
            "payTo received exactly the price; {}",
            ctx()
        );
        assert_eq!(r["replayStatus"], 402, "replay refused; {}", ctx());
        let said = format!("{} {}", r["replayError"], r["replayBody"]);
        assert!(
            said.contains(NONCE_USED) || said.contains(SIMULATION_FAILED),
            "replay reason; {}",
            ctx()
        );
        // The replay moved nothing more.
        assert_eq!(self.chain.balance(PAY_TO).await, before + U256::from(PRICE));
    }
}

/// Both servers' output, for failure messages.
fn logs(facilitator: &Log, server: &Log) -> String {
    format!(
        "--- facilitator.mjs ---\n{}\n--- examples/facilitator ---\n{}",
        facilitator.text(),
        server.text()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn js_v2_pays_through_the_reference_facilitator() {
    let Some(stack) = Stack::start("js_v2", "node/node_modules/@x402/fetch/package.json").await
    else {
        return;
    };
    let before = stack.chain.balance(PAY_TO).await;
    let r = stack.pay_js("v2").await;
    stack.assert_paid(&r, "eip155:84532", before).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn js_v1_pays_through_the_reference_facilitator() {
    let Some(stack) = Stack::start("js_v1", "node/node_modules/x402-fetch/package.json").await
    else {
        return;
    };
    let before = stack.chain.balance(PAY_TO).await;
    let r = stack.pay_js("v1").await;
    stack.assert_paid(&r, "base-sepolia", before).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_v2_pays_through_the_reference_facilitator() {
    let Some(stack) = Stack::start("python_v2", "venv/bin/python").await else {
        return;
    };
    let before = stack.chain.balance(PAY_TO).await;
    let r = stack.pay_py().await;
    stack.assert_paid(&r, "eip155:84532", before).await;
}

/// Our client reads the reference facilitator's `/supported` (v2 and v1 kinds), and a payment
/// that facilitator refuses comes back as its reason, with its message kept for logs: an
/// authorization for more than the payer holds fails its simulation.
#[tokio::test(flavor = "multi_thread")]
async fn reference_supported_and_refusal_reach_our_types() {
    use tower_x402::facilitator::FacilitatorClient;
    use tower_x402::proto::X402Version;
    use tower_x402::test_util::{PrivateKeySigner, exact_payload};
    use tower_x402::{Asset, Network, PaymentOption, Verifier};
    let Some(stack) = Stack::start(
        "reference_refusal",
        "node/node_modules/@x402/core/package.json",
    )
    .await
    else {
        return;
    };
    let client = FacilitatorClient::new(stack.facilitator.url.clone()).unwrap();
    let supported = client.supported().await.expect("GET /supported");
    assert_eq!(
        supported.refusal(X402Version::V2, "exact", Network::BASE_SEPOLIA),
        None,
        "{supported:?}"
    );
    assert_eq!(
        supported.refusal(X402Version::V1, "exact", Network::BASE_SEPOLIA),
        None,
        "{supported:?}"
    );
    // Anvil #5 holds no test USDC.
    let broke: PrivateKeySigner =
        "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba"
            .parse()
            .unwrap();
    let option = PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.001", PAY_TO).unwrap();
    let req = option.requirements().clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let payload = exact_payload(&broke, &req, now);
    let json = tower_x402::test_util::v2_json(&req, &payload, None);
    let payload = tower_x402::proto::PaymentPayload::V2(serde_json::from_value(json).unwrap());
    let err = client.verify(&payload, &req).await.unwrap_err();
    assert_eq!(
        err.reason(),
        INSUFFICIENT_BALANCE,
        "{err:?}\n{}",
        stack.logs()
    );
    // The facilitator's own words stay in the error for logs (bounded), not in the 402.
    assert!(err.to_string().contains("exceeds balance"), "{err}");
}

/// `upto` through the reference facilitator: its `/supported` names the settling account, our
/// `FacilitatorClient` verifies the official-shaped permit there and settles exactly the
/// metered amount (`/settle` gets the verified request with `amount` = the usage); zero usage
/// and usage above the maximum send nothing.
#[tokio::test(flavor = "multi_thread")]
async fn upto_through_the_reference_facilitator_settles_the_metered_amount() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::routing::get;
    use tower::ServiceExt as _;
    use tower_x402::facilitator::FacilitatorClient;
    use tower_x402::test_util::{PrivateKeySigner, pay_upto, upto_payload};
    use tower_x402::upto::Usage;
    use tower_x402::{Asset, Network, PaymentLayer, PaymentOption};

    const MAX: u64 = 50_000;
    let Some(stack) = Stack::start(
        "upto_facilitator",
        "node/node_modules/@x402/evm/package.json",
    )
    .await
    else {
        return;
    };
    let client = FacilitatorClient::new(stack.facilitator.url.clone()).unwrap();
    let supported = client.supported().await.expect("GET /supported");
    let facilitator = supported
        .upto_facilitator(Network::BASE_SEPOLIA)
        .unwrap_or_else(|| panic!("no upto kind with a facilitatorAddress: {supported:?}"));
    assert_eq!(
        facilitator,
        chain::RELAYER,
        "facilitator.mjs settles from anvil #0"
    );
    let payer: PrivateKeySigner = chain::PAYER3_KEY.parse().unwrap();
    stack.chain.approve_permit2(payer.address()).await;
    let option = PaymentOption::upto_atomic(
        &Asset::usdc_base_sepolia(),
        U256::from(MAX),
        PAY_TO,
        facilitator,
    )
    .unwrap();
    let req = option.requirements().clone();
    let layer = PaymentLayer::builder()
        .no_challenge_binding()
        .accept(option)
        .verifier(client.clone())
        .settler(client)
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/generate",
            get(move |usage: Usage, uri: http::Uri| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let want: u64 = uri
                        .query()
                        .and_then(|q| q.strip_prefix("use="))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let _ = usage.charge_atomic(want);
                    format!("used {}", usage.total())
                }
            }),
        )
        .layer(layer);
    let call = |path: String| {
        let app = app.clone();
        let header = pay_upto(&req, &upto_payload(&payer, &req, now()));
        async move {
            let mut request = http::Request::get(format!("http://api.test{path}"))
                .body(axum::body::Body::empty())
                .unwrap();
            request.headers_mut().insert(header.0, header.1);
            let res = app.oneshot(request).await.unwrap();
            let receipt = res
                .headers()
                .get("payment-response")
                .map(|v| tower_x402::proto::header::decode_bytes(v, 1 << 16).unwrap())
                .map(|j| serde_json::from_slice::<Value>(&j).unwrap());
            (res.status(), receipt)
        }
    };
    let (to_before, from_before) = (
        stack.chain.balance(PAY_TO).await,
        stack.chain.balance(payer.address()).await,
    );

    let (status, receipt) = call("/generate?use=1234".into()).await;
    let receipt = receipt.expect("a receipt");
    assert_eq!(status, http::StatusCode::OK, "{receipt}\n{}", stack.logs());
    assert_eq!(receipt["amount"], "1234", "{receipt}");
    let tx: B256 = receipt["transaction"].as_str().unwrap().parse().unwrap();
    let mined = stack
        .chain
        .provider()
        .get_transaction_receipt(tx)
        .await
        .unwrap();
    assert!(mined.is_some_and(|r| r.status()), "{}", stack.logs());

    let (status, receipt) = call("/generate?use=0".into()).await;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(receipt.expect("a receipt")["transaction"], "");
    let (status, _) = call(format!("/generate?use={}", MAX + 1)).await;
    assert_eq!(status, http::StatusCode::PAYMENT_REQUIRED);

    // Exactly the metered amount moved, once.
    assert_eq!(
        stack.chain.balance(PAY_TO).await,
        to_before + U256::from(1234)
    );
    assert_eq!(
        stack.chain.balance(payer.address()).await,
        from_before - U256::from(1234)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let settles = stack.facilitator.process.log().matches("/settle").count();
    assert_eq!(settles, 1, "one /settle call:\n{}", stack.logs());
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
