//! The browser paywall ([`tower_x402::paywall`]): in-process checks of the page and of what
//! every other client keeps getting, then Debian's headless Chromium opening a paid URL with
//! an injected test wallet (Anvil #1), clicking "Pay" and getting the paid content.
#![cfg(all(feature = "paywall", feature = "test-util", feature = "axum"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use http::header::{ACCEPT, USER_AGENT};
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::Value;
use tower::Layer;
use tower_x402::paywall::{Paywall, PaywallError};
use tower_x402::{MemoryNonceStore, PaymentLayer};

const CHROME_UA: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
     Chrome/156.0.0.0 Safari/537.36";
const BROWSER_ACCEPT: &str =
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";

fn browser() -> [(HeaderName, HeaderValue); 2] {
    [
        (ACCEPT, HeaderValue::from_static(BROWSER_ACCEPT)),
        (USER_AGENT, HeaderValue::from_static(CHROME_UA)),
    ]
}

fn paywalled(clock: &tower_x402::clock::FixedClock, paywall: Paywall) -> PaymentLayer {
    builder(clock)
        .description("Today's weather")
        .paywall(paywall)
        .build()
        .expect("valid layer")
}

fn page(r: &Reply) -> String {
    String::from_utf8(r.body.to_vec()).expect("UTF-8 page")
}

#[tokio::test]
async fn a_browser_gets_the_page_with_the_same_challenge() {
    let clock = clock();
    let hits = Hits::new();
    let svc = paywalled(&clock, Paywall::new().app_name("Weather Inc.")).layer(app(&hits));
    let r = get_with(&svc, "/paid", browser()).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let csp = r.header("content-security-policy").expect("CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'sha256-"),
        "{csp}"
    );
    // The machine-readable challenge is still there, the one other clients get.
    let plain = get_with(&svc, "/paid", []).await;
    assert_eq!(r.challenge(), plain.challenge());
    let html = page(&r);
    assert!(html.starts_with("<!doctype html>"), "{html}");
    for text in [
        "<title>Weather Inc.</title>",
        "$0.001 USDC on Base Sepolia",
        "Today&#39;s weather",
        "http://api.test/paid",
        "Pay with browser wallet",
    ] {
        assert!(html.contains(text), "{text:?} not in {html}");
    }
    // The script reads the requirements from the header's own base64.
    let required = r.header("payment-required").unwrap();
    assert!(html.contains(&format!("data-required=\"{required}\"")));
    assert_eq!(hits.get(), 0);
}

#[tokio::test]
async fn every_other_client_gets_the_exact_402_it_got_without_a_paywall() {
    let clock = clock();
    let hits = Hits::new();
    let with = paywalled(&clock, Paywall::new()).layer(app(&hits));
    let without = builder(&clock)
        .description("Today's weather")
        .build()
        .unwrap()
        .layer(app(&hits));
    let cases: [&[(HeaderName, &'static str)]; 5] = [
        &[],
        &[(ACCEPT, "application/json")],
        &[(ACCEPT, "*/*"), (USER_AGENT, CHROME_UA)],
        &[(ACCEPT, BROWSER_ACCEPT), (USER_AGENT, "curl/8.5.0")],
        &[(ACCEPT, "application/json"), (USER_AGENT, "node")],
    ];
    for headers in cases {
        let hs = || {
            headers
                .iter()
                .map(|(n, v)| (n.clone(), HeaderValue::from_static(v)))
        };
        let a = get_with(&with, "/paid", hs()).await;
        let b = get_with(&without, "/paid", hs()).await;
        assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED, "{headers:?}");
        assert_eq!(
            (a.status, &a.headers, &a.body),
            (b.status, &b.headers, &b.body),
            "{headers:?}"
        );
    }
    // A paid request from a browser is served as any other.
    let mut headers = browser().to_vec();
    headers.push(proof_v2());
    let r = get_with(&with, "/paid", headers).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert_eq!(r.json()["handler"], "ran");
    assert_eq!(hits.get(), 1);
    // A refused payment from a browser gets the 402 a client can act on, not the page.
    let mut headers = browser().to_vec();
    headers.push((
        HeaderName::from_static("payment-signature"),
        HeaderValue::from_static("bm90IGpzb24"),
    ));
    let r = get_with(&with, "/paid", headers).await;
    assert_ne!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn configured_text_is_escaped() {
    let clock = clock();
    let evil = "</title><script>alert(1)</script><img src=x onerror=alert(2)>";
    let svc = builder(&clock)
        .description(evil)
        .paywall(
            Paywall::new()
                .app_name(evil)
                .logo_url("/logo.png?\"><script>"),
        )
        .build()
        .unwrap()
        .layer(app(&Hits::new()));
    let html = page(&get_with(&svc, "/paid?q=%3Cscript%3E", browser()).await);
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(!html.contains("<img src=x"), "{html}");
    assert!(
        html.contains("&lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{html}"
    );
    assert!(
        html.contains("src=\"/logo.png?&quot;&gt;&lt;script&gt;\""),
        "{html}"
    );
    // Exactly one script element: the page's own.
    assert_eq!(html.matches("<script>").count(), 1, "{html}");
}

#[test]
fn a_paywall_that_could_run_script_does_not_build() {
    let clock = clock();
    let err = builder(&clock)
        .paywall(Paywall::new().logo_url("javascript:alert(1)"))
        .build()
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(
            err,
            tower_x402::error::ConfigError::Paywall(PaywallError::LogoUrl)
        ),
        "{err:?}"
    );
    let err = builder(&clock)
        .paywall(Paywall::new().css("}</style><script>"))
        .build()
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("CSS"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// Headless Chromium

/// Serves `/paid` as a seller would: bound challenges (the default), the system clock, the
/// paywall. Returns its URL.
async fn paid_site(hits: &Hits) -> (String, tokio::task::JoinHandle<()>) {
    let layer = PaymentLayer::builder()
        .pay_to(PAY_TO)
        .price(PRICE)
        .network(tower_x402::Network::BASE_SEPOLIA)
        .description("Today's weather")
        .nonce_store(MemoryNonceStore::new())
        .paywall(Paywall::new().app_name("Weather Inc."))
        .build()
        .unwrap();
    let (addr, task) = serve(app(hits).route_layer(layer)).await;
    (format!("http://{addr}/paid"), task)
}

fn chromium() -> PathBuf {
    std::env::var_os("X402_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// The test's dependencies: playwright-core next to the clients, and Chromium.
fn browser_deps(test: &str) -> Option<PathBuf> {
    let deps = process::test_deps(test, &["node/node_modules/playwright-core/package.json"])?;
    if !chromium().exists() {
        process::skip(format_args!("{test}: {} missing", chromium().display()));
        return None;
    }
    Some(deps)
}

async fn open_in_chromium(deps: PathBuf, url: String, screenshot: &Path, wallet: bool) -> Value {
    let script = process::repo().join("tests/clients/paywall.mjs");
    let screenshot = screenshot.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("node");
        cmd.arg(script)
            .args(["--url", &url, "--chromium"])
            .arg(chromium())
            .arg("--screenshot")
            .arg(&screenshot)
            .env("X402_TEST_DEPS", &deps);
        if !wallet {
            cmd.arg("--no-wallet");
        }
        process::run_json(&mut cmd, Duration::from_secs(90), String::new)
    })
    .await
    .expect("driver task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_the_page_and_a_click_pays_once() {
    let Some(deps) = browser_deps("chromium_renders_the_page_and_a_click_pays_once") else {
        return;
    };
    let hits = Hits::new();
    let (url, server) = paid_site(&hits).await;
    // Kept as the test's artefact: target/tmp/paywall.png.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("paywall.png");
    let _ = std::fs::remove_file(&shot);
    let r = open_in_chromium(deps, url.clone(), &shot, true).await;
    assert_eq!(r["error"], Value::Null, "{r:#}");
    assert_eq!(r["status"], 402, "{r:#}");
    assert_eq!(r["title"], "Weather Inc.", "{r:#}");
    let text = r["text"].as_str().unwrap_or_default();
    assert!(text.contains("$0.001 USDC on Base Sepolia"), "{r:#}");
    assert!(text.contains("Today's weather"), "{r:#}");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 2_000,
        "{}",
        png.len()
    );

    // The click paid: the handler ran once and its answer is on the page.
    assert_eq!(r["paidStatus"], 200, "{r:#}");
    let content: Value =
        serde_json::from_str(r["content"].as_str().unwrap_or_default()).expect("paid JSON shown");
    assert_eq!(content["handler"], "ran");
    assert_eq!(
        content["payer"],
        "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    );
    assert_eq!(hits.get(), 1);

    // The script echoed the challenge's requirement exactly (bound id included) and signed
    // an EIP-3009 authorization for it.
    let header = r["paymentHeader"].as_str().expect("PAYMENT-SIGNATURE sent");
    let sent: Value = serde_json::from_slice(&STANDARD.decode(header).unwrap()).unwrap();
    let fresh = {
        let client = client();
        let res = client
            .request(http::Request::get(&url).body(Default::default()).unwrap())
            .await
            .unwrap();
        Reply::read(res).await.challenge()
    };
    let mut accepted = sent["accepted"].clone();
    let id = accepted["extra"]
        .as_object_mut()
        .and_then(|e| e.remove("challenge"))
        .expect("bound challenge id echoed");
    assert_eq!(id.as_str().map(str::len), Some(60));
    let mut offered = serde_json::to_value(&fresh.accepts[0]).unwrap();
    offered["extra"]
        .as_object_mut()
        .unwrap()
        .remove("challenge");
    assert_eq!(accepted, offered);
    assert_eq!(sent["resource"]["url"], url.as_str());
    assert_eq!(sent["payload"]["authorization"]["value"], AMOUNT);

    // The same proof again (a reload replaying it) is refused; the handler does not run.
    let client = client();
    let res = client
        .request(
            http::Request::get(&url)
                .header("payment-signature", header)
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let replay = Reply::read(res).await;
    assert_eq!(replay.challenge().error.as_deref(), Some(NONCE_USED));
    assert_eq!(hits.get(), 1);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_without_a_wallet_is_told_what_to_install() {
    let Some(deps) = browser_deps("chromium_without_a_wallet_is_told_what_to_install") else {
        return;
    };
    let hits = Hits::new();
    let (url, server) = paid_site(&hits).await;
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("paywall-no-wallet.png");
    let r = open_in_chromium(deps, url, &shot, false).await;
    assert_eq!(r["error"], Value::Null, "{r:#}");
    let status = r["statusText"].as_str().unwrap_or_default();
    assert!(status.contains("No browser wallet found"), "{r:#}");
    assert_eq!(r["paymentHeader"], Value::Null);
    assert_eq!(hits.get(), 0);
    server.abort();
}
