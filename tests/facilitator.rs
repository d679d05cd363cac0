//! `FacilitatorClient` against the REFERENCE facilitator: `tests/clients/facilitator.mjs`
//! (`@x402/core` + `@x402/evm` 2.27.0) settling on a local anvil chain (`tests/chain`), behind
//! `examples/facilitator.rs` (our layer with the client as verifier and settler). The official
//! clients pay it (`tests/clients/pay.mjs` JS v2 and v1, `tests/clients/pay.py` Python v2); each
//! test checks that the payee's balance rose by exactly the price, that the receipt carries the
//! mined transaction, and that the same proof replayed is refused.
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

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use alloy_primitives::{B256, U256};
use alloy_provider::Provider;
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

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deps_dir() -> PathBuf {
    std::env::var_os("X402_TEST_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/test-deps"))
}

/// The deps dir when `marker` (relative to it) exists; else fails under `CI=true`, or skips.
fn deps(marker: &str, test: &str) -> Option<PathBuf> {
    let dir = deps_dir();
    if dir.join(marker).exists() {
        return Some(dir);
    }
    let why = format!("{test}: {} missing", dir.join(marker).display());
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}; CI must run this test: run scripts/install-test-deps.sh first");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {why} (run scripts/test to install the test dependencies) ***\n"
    );
    None
}

/// A child process that prints `listening on URL` first; killed on drop. Its output is kept
/// for failure messages.
struct Proc {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn start(name: &str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let (first_tx, first_rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let out_log = log.clone();
        thread::spawn(move || {
            let mut first = Some(first_tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(tx) = first.take() {
                    let _ = tx.send(line.clone());
                }
                out_log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let stderr = child.stderr.take().unwrap();
        let err_log = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                err_log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let mut proc = Proc {
            child,
            url: String::new(),
            log,
        };
        let first = first_rx.recv_timeout(START_TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "{name} printed nothing within {START_TIMEOUT:?}; log:\n{}",
                proc.log()
            )
        });
        proc.url = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{name}: unexpected first line {first:?}"))
            .trim_end_matches('/')
            .to_owned();
        proc
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        deps("node/node_modules/@x402/core/package.json", test)?;
        let deps = deps(marker, test)?;
        let chain = Chain::start(test).await?;
        let mut node = Command::new("node");
        node.arg(repo().join("tests/clients/facilitator.mjs"))
            .args(["--rpc", chain.url()])
            .env("X402_TEST_DEPS", &deps);
        let facilitator = Proc::start("facilitator.mjs", node);
        // <target>/debug/deps/facilitator-<hash> → <target>/debug/examples/facilitator
        let exe = std::env::current_exe().expect("current_exe");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("examples/facilitator");
        assert!(
            bin.exists(),
            "{} not found: build it with `cargo build --all-features --examples` (scripts/test does)",
            bin.display()
        );
        let mut example = Command::new(&bin);
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
        format!(
            "--- facilitator.mjs ---\n{}\n--- examples/facilitator ---\n{}",
            self.facilitator.log(),
            self.server.log()
        )
    }

    /// Runs a client driver (blocking, in a thread) and returns its JSON line.
    async fn pay(&self, program: String, args: Vec<String>) -> Value {
        let deps = self.deps.clone();
        let logs = self.logs();
        tokio::task::spawn_blocking(move || run_client(&deps, &program, &args, &logs))
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

fn run_client(deps: &Path, program: &str, args: &[String], logs: &str) -> Value {
    let mut child = Command::new(program)
        .args(args)
        .env("X402_TEST_DEPS", deps)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{program} timed out\nstderr: {}\n{logs}",
                err.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("{program} printed no JSON line ({e})\nstdout: {out}\nstderr: {err}\n{logs}")
    })
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
