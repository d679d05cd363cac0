//! The official x402 clients pay on a real chain in each settlement mode: JS v2
//! (`@x402/fetch`), JS v1 (`x402-fetch`) and Python (`x402`, requests) pay the quickstart
//! example started with `--rpc-url` (an `OnchainSettler` on anvil, see `tests/chain/mod.rs`) in
//! `--mode after`, `before` and `deferred`. Each client pays once per mode and replays its
//! proof; payTo's balance must rise by exactly the three prices, each authorization must be
//! used on-chain, and the receipt must carry the real transaction hash (after, before) or an
//! empty one (deferred: the payment is journaled, the transaction comes later in a batch).
//!
//! The clients are installed by `scripts/install-test-deps.sh` (see `tests/interop.rs`);
//! without them or anvil the test prints SKIPPED, and fails under `CI=true`.
#![cfg(all(
    feature = "onchain",
    feature = "deferred",
    feature = "axum",
    feature = "test-util"
))]

mod chain;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, U256};
use alloy_provider::Provider;
use base64::Engine as _;
use serde_json::Value;

use chain::process::{self, repo};
use chain::{Chain, PAY_TO, RELAYER, RELAYER_KEY, TOKEN};

/// The quickstart's price, `$0.001`.
const PRICE_UNITS: u64 = 1_000;
const NONCE_USED: &str = "invalid_exact_evm_nonce_already_used";
const TIMEOUT: Duration = Duration::from_secs(60);

/// The clients' install dir, or `None` after a loud SKIPPED (a panic under `CI=true`).
fn deps(test: &str) -> Option<PathBuf> {
    process::test_deps(
        test,
        &[
            "node/node_modules/@x402/fetch/package.json",
            "node/node_modules/x402-fetch/package.json",
            "venv/bin/python",
        ],
    )
}

/// `quickstart --serve --port 0 --rpc-url .. --mode ..`; killed on drop.
struct Server {
    process: process::Server,
    base: String,
}

impl Server {
    fn start(rpc: &str, mode: &str, journal: &Path) -> Server {
        let mut cmd = Command::new(process::example_bin("quickstart"));
        cmd.args(["--serve", "--port", "0", "--rpc-url", rpc, "--mode", mode])
            .args(["--max-wait-ms", "100"])
            .arg("--journal")
            .arg(journal)
            .env("X402_RELAYER_KEY", RELAYER_KEY);
        let (process, base) = process::Server::listening("quickstart", &mut cmd, TIMEOUT);
        Server { process, base }
    }

    fn log(&self) -> String {
        self.process.log()
    }
}

/// Runs a client driver (`tests/clients/pay.mjs` / `pay.py`) and returns its JSON line.
fn run(deps: &Path, server: &Server, program: &Path, args: &[&str]) -> Value {
    let mut cmd = Command::new(program);
    cmd.args(args).env("X402_TEST_DEPS", deps);
    process::run_json(&mut cmd, TIMEOUT, || {
        format!("server log:\n{}", server.log())
    })
}

/// The three official clients, each paying `url` once and replaying its proof.
fn pay_all(deps: &Path, server: &Server) -> Vec<(&'static str, Value)> {
    let url = format!("{}/weather", server.base);
    let mjs = repo().join("tests/clients/pay.mjs");
    let py = repo().join("tests/clients/pay.py");
    let mjs = mjs.to_str().expect("utf-8 path");
    let py = py.to_str().expect("utf-8 path");
    let node = Path::new("node");
    let python = deps.join("venv/bin/python");
    vec![
        (
            "js-v2",
            run(
                deps,
                server,
                node,
                &[mjs, "--client", "v2", "--url", &url, "--replay"],
            ),
        ),
        (
            "js-v1",
            run(
                deps,
                server,
                node,
                &[mjs, "--client", "v1", "--url", &url, "--replay"],
            ),
        ),
        (
            "python-v2",
            run(
                deps,
                server,
                &python,
                &[
                    py,
                    "--client",
                    "v2",
                    "--transport",
                    "requests",
                    "--url",
                    &url,
                    "--replay",
                ],
            ),
        ),
    ]
}

/// The (from, nonce) of the payment header a client sent (v1 and v2 share the payload).
fn authorization(r: &Value) -> (Address, B256) {
    let header = r["paymentHeader"]
        .as_str()
        .expect("the client sent a header");
    let json = base64::engine::general_purpose::STANDARD
        .decode(header)
        .expect("base64");
    let v: Value = serde_json::from_slice(&json).expect("json");
    let a = &v["payload"]["authorization"];
    (
        a["from"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("from"),
        a["nonce"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("nonce"),
    )
}

#[tokio::test]
async fn official_clients_pay_on_chain_in_every_settlement_mode() {
    let Some(deps) = deps("official_clients_pay_on_chain") else {
        return;
    };
    let Some(chain) = Chain::start("official_clients_pay_on_chain").await else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("tower-x402-clients-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");

    for mode in ["after", "before", "deferred"] {
        let server = Server::start(chain.url(), mode, &dir.join(format!("{mode}.journal")));
        let before = chain.balance(PAY_TO).await;
        let paid = pay_all(&deps, &server);
        let ctx = |client: &str, r: &Value| {
            format!(
                "mode {mode}, {client}: {r:#}\nserver log:\n{}",
                server.log()
            )
        };
        for (client, r) in &paid {
            assert_eq!(r["status"], 200, "{}", ctx(client, r));
            let receipt = &r["paymentResponse"];
            assert_eq!(receipt["success"], true, "{}", ctx(client, r));
            assert_eq!(r["replayStatus"], 402, "{}", ctx(client, r));
            let said = format!("{} {}", r["replayError"], r["replayBody"]);
            assert!(said.contains(NONCE_USED), "{}", ctx(client, r));
            let tx = receipt["transaction"].as_str().unwrap_or_default();
            if mode == "deferred" {
                // Journaled, not settled yet: no transaction to name.
                assert_eq!(tx, "", "{}", ctx(client, r));
                continue;
            }
            let hash: B256 = tx.parse().unwrap_or_else(|_| panic!("{}", ctx(client, r)));
            let mined = chain
                .provider()
                .get_transaction_receipt(hash)
                .await
                .expect("rpc")
                .unwrap_or_else(|| panic!("not mined; {}", ctx(client, r)));
            assert!(mined.status(), "{}", ctx(client, r));
            assert_eq!(mined.from, RELAYER);
            assert_eq!(mined.to, Some(TOKEN));
        }
        let want = before + U256::from(3 * PRICE_UNITS);
        let deadline = Instant::now() + TIMEOUT;
        while chain.balance(PAY_TO).await != want {
            assert!(
                Instant::now() < deadline,
                "mode {mode}: payTo balance {} want {want}; log:\n{}",
                chain.balance(PAY_TO).await,
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (client, r) in &paid {
            let (from, nonce) = authorization(r);
            assert!(
                chain.authorization_used(from, nonce).await,
                "{}",
                ctx(client, r)
            );
        }
        if mode == "deferred" {
            // The worker reported each outcome with the batch's real transaction.
            let log = server.log();
            let outcomes: Vec<Value> = log
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|v| v.get("outcome").cloned())
                .collect();
            assert_eq!(outcomes.len(), 3, "{log}");
            for o in &outcomes {
                assert_eq!(o["settled"], true, "{log}");
                let hash: B256 = o["transaction"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("{log}"));
                let mined = chain
                    .provider()
                    .get_transaction_receipt(hash)
                    .await
                    .expect("rpc")
                    .expect("mined");
                assert!(mined.status());
            }
        }
    }
}
