//! Real-client interop: the quickstart example (`quickstart --serve --port 0`) is paid by the
//! official x402 clients, driven by `tests/clients/pay.mjs` (JS) and `tests/clients/pay.py`
//! (Python), which print one JSON line each. The clients are installed by
//! `scripts/install-test-deps.sh` into `$X402_TEST_DEPS` (default `<repo>/target/test-deps`).
//!
//! Missing clients: with `CI=true` the tests fail; otherwise they print a loud SKIPPED and return,
//! so a bare `cargo test` works on a machine without node/python (`scripts/test` installs them).
//! The quickstart needs the `axum` and `test-util` features, hence the gate below.
#![cfg(all(feature = "axum", feature = "test-util"))]

#[path = "common/process.rs"]
mod process;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;

/// Anvil accounts: #1 is the default payer of the drivers, #3 a second payer.
const PAYER_1: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
const PAYER_3_KEY: &str = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6";
const PAYER_3: &str = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";
/// What the quickstart charges for `GET /weather`.
const PAY_TO: &str = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";
const ASSET: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
const AMOUNT: &str = "1000";
const NONCE_USED: &str = "invalid_exact_evm_nonce_already_used";
/// Upper bound for one client run (the official clients take ~1 s); a hang fails, not stalls CI.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
enum Lang {
    Js,
    Python,
}

/// The install dir when the clients for `lang` are installed; else `None` after a loud SKIPPED
/// (a failure under `CI=true`: CI must run them).
fn deps(lang: Lang, test: &str) -> Option<PathBuf> {
    let marker = match lang {
        Lang::Js => "node/node_modules/@x402/fetch/package.json",
        Lang::Python => "venv/bin/python",
    };
    process::test_deps(test, &[marker])
}

// ------------------------------------------------------------------------------------------------
// The quickstart server

/// A running `quickstart --serve --port 0`; killed on drop, also when the test panics.
struct Server {
    process: process::Server,
    base: String,
}

impl Server {
    fn start() -> Server {
        let mut cmd = Command::new(process::example_bin("quickstart"));
        cmd.args(["--serve", "--port", "0"]);
        let (process, base) =
            process::Server::listening("quickstart", &mut cmd, SERVER_START_TIMEOUT);
        Server { process, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn log(&self) -> String {
        self.process.log()
    }
}

// ------------------------------------------------------------------------------------------------
// Running a client

/// Runs a driver and returns its JSON line; panics (with all output) on a timeout or bad output.
/// A non-zero exit is not a panic here: the JSON says why, and the caller asserts on it.
fn run_client(deps: &Path, server: &Server, program: &str, args: &[&str]) -> Value {
    let mut cmd = Command::new(program);
    cmd.args(args).env("X402_TEST_DEPS", deps);
    process::run_json(&mut cmd, CLIENT_TIMEOUT, || {
        format!("server log:\n{}", server.log())
    })
}

fn pay_js(deps: &Path, server: &Server, client: &str, key: Option<&str>) -> Value {
    let script = process::repo().join("tests/clients/pay.mjs");
    let url = server.url("/weather");
    let mut args = vec![
        script.to_str().unwrap(),
        "--client",
        client,
        "--url",
        &url,
        "--replay",
    ];
    args.extend(key.map(|k| ["--key", k]).into_iter().flatten());
    run_client(deps, server, "node", &args)
}

fn pay_py(deps: &Path, server: &Server, transport: &str) -> Value {
    let script = process::repo().join("tests/clients/pay.py");
    let python = deps.join("venv/bin/python");
    let url = server.url("/weather");
    let args = [
        script.to_str().unwrap(),
        "--client",
        "v2",
        "--transport",
        transport,
        "--url",
        &url,
        "--replay",
    ];
    run_client(deps, server, python.to_str().unwrap(), &args)
}

// ------------------------------------------------------------------------------------------------
// Assertions

fn same_address(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// A successful paid request: 200, a `success` receipt for `payer` on `network`, sent in the
/// expected dialect; then the identical proof replayed must be refused as a used nonce.
fn assert_paid(r: &Value, server: &Server, network: &str, header: &str, payer: &str) {
    let ctx = || format!("client output: {r:#}\nserver log:\n{}", server.log());
    assert_eq!(r["status"], 200, "paid request must succeed; {}", ctx());
    assert_eq!(
        r["paymentHeaderName"],
        header,
        "payment header the client sent; {}",
        ctx()
    );
    let receipt = &r["paymentResponse"];
    assert!(
        receipt.is_object(),
        "no decodable receipt header; {}",
        ctx()
    );
    assert_eq!(receipt["success"], true, "receipt.success; {}", ctx());
    assert_eq!(receipt["network"], network, "receipt.network; {}", ctx());
    assert!(
        receipt["payer"]
            .as_str()
            .is_some_and(|p| same_address(p, payer)),
        "receipt.payer must be {payer}; {}",
        ctx()
    );
    assert!(
        receipt["transaction"].is_string(),
        "receipt.transaction is required; {}",
        ctx()
    );

    assert_eq!(
        r["replayStatus"],
        402,
        "a replayed proof must be refused; {}",
        ctx()
    );
    let said = format!("{} {}", r["replayError"], r["replayBody"]);
    assert!(
        said.contains(NONCE_USED),
        "replay refusal must say {NONCE_USED}; {}",
        ctx()
    );
}

// ------------------------------------------------------------------------------------------------
// Tests

#[test]
fn js_v2_fetch_pays_and_replay_is_refused() {
    let Some(deps) = deps(Lang::Js, "js_v2_fetch") else {
        return;
    };
    let server = Server::start();
    let r = pay_js(&deps, &server, "v2", None);
    assert_paid(&r, &server, "eip155:84532", "PAYMENT-SIGNATURE", PAYER_1);
}

#[test]
fn js_v1_legacy_fetch_pays_and_replay_is_refused() {
    let Some(deps) = deps(Lang::Js, "js_v1_legacy_fetch") else {
        return;
    };
    let server = Server::start();
    let r = pay_js(&deps, &server, "v1", None);
    assert_paid(&r, &server, "base-sepolia", "X-PAYMENT", PAYER_1);
}

#[test]
fn python_v2_requests_pays_and_replay_is_refused() {
    let Some(deps) = deps(Lang::Python, "python_v2_requests") else {
        return;
    };
    let server = Server::start();
    let r = pay_py(&deps, &server, "requests");
    assert_paid(&r, &server, "eip155:84532", "PAYMENT-SIGNATURE", PAYER_1);
}

#[test]
fn python_v2_httpx_pays_and_replay_is_refused() {
    let Some(deps) = deps(Lang::Python, "python_v2_httpx") else {
        return;
    };
    let server = Server::start();
    let r = pay_py(&deps, &server, "httpx");
    assert_paid(&r, &server, "eip155:84532", "PAYMENT-SIGNATURE", PAYER_1);
}

#[test]
fn two_payers_both_get_200() {
    let Some(deps) = deps(Lang::Js, "two_payers") else {
        return;
    };
    let server = Server::start();
    let first = pay_js(&deps, &server, "v2", None);
    assert_paid(
        &first,
        &server,
        "eip155:84532",
        "PAYMENT-SIGNATURE",
        PAYER_1,
    );
    let second = pay_js(&deps, &server, "v2", Some(PAYER_3_KEY));
    assert_paid(
        &second,
        &server,
        "eip155:84532",
        "PAYMENT-SIGNATURE",
        PAYER_3,
    );
}

// Needs no client: checks the server's side of the contract the tests above rely on (free route,
// challenge in both dialects), so a bare `cargo test` still exercises the running example.
#[test]
fn unpaid_requests_get_a_challenge_in_both_dialects() {
    let server = Server::start();
    let (status, _, _) = http_get(&server, "/");
    assert_eq!(status, 200, "GET / is free; server log:\n{}", server.log());

    let (status, headers, body) = http_get(&server, "/weather");
    assert_eq!(status, 402, "unpaid GET /weather; body {body}");
    let v2 = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("payment-required"))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("402 without PAYMENT-REQUIRED: {headers:?}"));
    let v2: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(v2)
            .expect("PAYMENT-REQUIRED is standard base64"),
    )
    .expect("PAYMENT-REQUIRED is JSON");
    assert_eq!(v2["x402Version"], 2, "{v2:#}");
    let a = &v2["accepts"][0];
    assert_eq!(
        (a["scheme"].as_str(), a["network"].as_str()),
        (Some("exact"), Some("eip155:84532")),
        "{v2:#}"
    );
    assert_eq!(a["amount"], AMOUNT, "{v2:#}");
    assert!(
        a["asset"].as_str().is_some_and(|s| same_address(s, ASSET)),
        "{v2:#}"
    );
    assert!(
        a["payTo"].as_str().is_some_and(|s| same_address(s, PAY_TO)),
        "{v2:#}"
    );
    assert_eq!(a["maxTimeoutSeconds"], 300, "{v2:#}");
    assert_eq!(
        (a["extra"]["name"].as_str(), a["extra"]["version"].as_str()),
        (Some("USDC"), Some("2")),
        "{v2:#}"
    );

    let v1: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("402 body is not v1 JSON ({e}): {body}"));
    assert_eq!(v1["x402Version"], 1, "{v1:#}");
    let a = &v1["accepts"][0];
    assert_eq!(a["network"], "base-sepolia", "{v1:#}");
    assert_eq!(a["maxAmountRequired"], AMOUNT, "{v1:#}");
    assert!(
        a["payTo"].as_str().is_some_and(|s| same_address(s, PAY_TO)),
        "{v1:#}"
    );
}

/// Minimal HTTP/1.1 GET over std (no client dependency): (status, headers, body).
fn http_get(server: &Server, path: &str) -> (u16, Vec<(String, String)>, String) {
    let addr = server.base.strip_prefix("http://").expect("http base URL");
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response head");
    let (head, body) = (String::from_utf8_lossy(&raw[..split]), &raw[split + 4..]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// Decodes a chunked body (no trailers: our server sends none).
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..eol]).unwrap_or("0");
        let n =
            usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        let rest = &body[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        body = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}
