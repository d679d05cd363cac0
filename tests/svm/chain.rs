//! The local Solana chain of the tests: `tests/svm/chain.mjs` (litesvm behind JSON-RPC),
//! started like anvil, killed on drop; and the official client's driver `tests/svm/pay.mjs`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::process;

/// The packages the Solana tests need, under `$X402_TEST_DEPS/svm`.
pub const MARKERS: &[&str] = &[
    "svm/node_modules/litesvm/package.json",
    "svm/node_modules/@x402/svm/package.json",
    "svm/node_modules/@x402/fetch/package.json",
];

/// The deps dir, or `None` after a loud skip (a failure under `CI=true`).
pub fn deps(test: &str) -> Option<PathBuf> {
    process::test_deps(test, MARKERS)
}

/// The accounts of the Solana tests: the fee payer (the server's, or the facilitator's).
#[cfg(feature = "svm")]
pub fn fee_payer() -> tower_x402::svm::Keypair {
    tower_x402::svm::Keypair::from_seed([1; 32])
}

/// The payer, funded with 5 USDC by [`Chain::devnet`].
#[cfg(feature = "svm")]
pub fn payer() -> tower_x402::svm::Keypair {
    tower_x402::svm::Keypair::from_seed([2; 32])
}

/// The seller (`payTo`).
#[cfg(feature = "svm")]
pub fn pay_to() -> tower_x402::svm::Keypair {
    tower_x402::svm::Keypair::from_seed([3; 32])
}

/// A running local chain.
pub struct Chain {
    process: process::Server,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Chain {
    /// Starts the chain with `setup` (see chain.mjs).
    pub fn start(deps: &std::path::Path, setup: Value) -> Chain {
        let script = process::repo().join("tests/svm/chain.mjs");
        let mut cmd = Command::new("node");
        cmd.arg(script)
            .arg(setup.to_string())
            .env("X402_TEST_DEPS", deps);
        let (process, url) =
            process::Server::listening("svm chain", &mut cmd, Duration::from_secs(30));
        Chain { process, url }
    }

    /// The chain posing as devnet (the official client knows only the public clusters' ids;
    /// its RPC is ours): devnet USDC's mint address, [`payer`] funded with 5 USDC, [`pay_to`]'s
    /// token account open, [`fee_payer`] with SOL.
    #[cfg(feature = "svm")]
    pub fn devnet(deps: &std::path::Path) -> Chain {
        Chain::start(
            deps,
            json!({
                "mint": tower_x402::svm::program::USDC_DEVNET.to_string(),
                "decimals": 6,
                "payer": payer().pubkey().to_string(),
                "payerBalance": 5_000_000,
                "feePayer": fee_payer().pubkey().to_string(),
                "payTo": pay_to().pubkey().to_string(),
            }),
        )
    }

    /// One JSON-RPC call; panics on a transport failure, returns `result` or the `error`.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, Value> {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let v = post(&self.url, "/", &body)
            .unwrap_or_else(|reply| panic!("chain reply {reply:?}; log:\n{}", self.log()));
        match v.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(v["result"].clone()),
        }
    }

    /// `owner`'s token balance of the chain's mint (atomic units).
    pub fn token_balance(&self, owner: &str) -> Option<u64> {
        let v = self
            .call("x402_tokenBalance", json!([owner]))
            .expect("balance");
        v.as_str().map(|s| s.parse().expect("decimal"))
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// POSTs `body` to `base` + `path` (plain HTTP/1.1, no client crate); the reply's JSON, or
/// the raw reply when it is not JSON. Panics when nothing listens.
pub fn post(base: &str, path: &str, body: &Value) -> Result<Value, String> {
    let body = body.to_string();
    let host = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).expect("server reachable");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read");
    let json = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(json).map_err(|_| reply)
}

/// The reference Solana facilitator (`tests/svm/facilitator.mjs`) settling through `rpc` with
/// the fee payer `key` (64 bytes).
pub struct Facilitator {
    process: process::Server,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Facilitator {
    /// Starts it.
    pub fn start(deps: &std::path::Path, rpc: &str, key: &[u8; 64]) -> Facilitator {
        let script = process::repo().join("tests/svm/facilitator.mjs");
        let mut cmd = Command::new("node");
        cmd.arg(script)
            .args(["--rpc", rpc, "--key", &hex(key)])
            .env("X402_TEST_DEPS", deps);
        let (process, url) =
            process::Server::listening("svm facilitator", &mut cmd, Duration::from_secs(30));
        Facilitator { process, url }
    }

    /// Its next answer on `endpoint` (`/verify` or `/settle`), after it acted, is `status`
    /// with `body` as it is.
    pub fn inject(&self, endpoint: &str, status: u16, body: &str) {
        let ok = post(
            &self.url,
            "/x402/reply",
            &json!({"endpoint": endpoint, "status": status, "body": body}),
        );
        assert_eq!(ok, Ok(json!({"ok": true})));
    }

    /// How many calls of `endpoint` it has processed so far.
    pub fn calls(&self, endpoint: &str) -> usize {
        let prefix = format!("{endpoint} v");
        self.log().lines().filter(|l| l.contains(&prefix)).count()
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the official client against `url` (RPC `rpc`) with the 64-byte keypair `key`.
pub fn pay(deps: &std::path::Path, url: &str, rpc: &str, key: &[u8; 64], replay: bool) -> Value {
    let script = process::repo().join("tests/svm/pay.mjs");
    let mut cmd = Command::new("node");
    cmd.arg(script)
        .args(["--url", url, "--rpc", rpc, "--key", &hex(key)])
        .env("X402_TEST_DEPS", deps);
    if replay {
        cmd.arg("--replay");
    }
    process::run_json(&mut cmd, Duration::from_secs(60), String::new)
}

/// Runs the official Python SDK's Solana client (`tests/clients/pay_svm.py`) against `url`.
pub fn pay_py(deps: &std::path::Path, url: &str, rpc: &str, key: &[u8; 64], replay: bool) -> Value {
    let script = process::repo().join("tests/clients/pay_svm.py");
    let mut cmd = Command::new(deps.join("venv/bin/python"));
    cmd.arg(script)
        .args(["--url", url, "--rpc", rpc, "--key", &hex(key)])
        .env("X402_TEST_DEPS", deps);
    if replay {
        cmd.arg("--replay");
    }
    process::run_json(&mut cmd, Duration::from_secs(60), String::new)
}
