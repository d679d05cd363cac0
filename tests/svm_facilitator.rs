//! Solana `exact` settled through a facilitator (issue #20 item 4): the official `@x402/svm`
//! client pays our axum route whose verifier and settler is a `FacilitatorClient` talking to
//! the reference facilitator (`tests/svm/facilitator.mjs`: `@x402/core` + `@x402/svm` 2.27),
//! which co-signs as fee payer and settles on the local chain (`tests/svm/chain.mjs`).

#![cfg(all(feature = "svm", feature = "facilitator", feature = "axum"))]

#[path = "svm/chain.rs"]
mod chain;
mod common;

use std::time::Duration;

use serde_json::{Value, json};
use tower_x402::facilitator::FacilitatorClient;
use tower_x402::nonce::MemoryNonceStore;
use tower_x402::proto::svm::Pubkey;
use tower_x402::settle::SettlementMode;
use tower_x402::svm::SvmAsset;
use tower_x402::{Network, PaymentLayer, PaymentOption};

use chain::{Chain, Facilitator, fee_payer, pay_to, payer};
use common::Hits;

/// The price, in atomic USDC.
const PRICE: u64 = 1000;

/// The chain (posing as devnet, see `Chain::devnet`) and the reference facilitator on it,
/// co-signing with `fee_payer()`.
fn start(deps: &std::path::Path) -> (Chain, Facilitator) {
    let chain = Chain::devnet(deps);
    let facilitator = Facilitator::start(deps, &chain.url, &fee_payer().to_bytes());
    (chain, facilitator)
}

/// `/paid` for `$0.001` devnet USDC, verified and settled by `client` in `mode`, advertising
/// `fee_payer` as `extra.feePayer`.
async fn route(
    client: FacilitatorClient,
    fee_payer: Pubkey,
    hits: &Hits,
    mode: SettlementMode,
) -> String {
    let option = PaymentOption::exact_svm(
        &SvmAsset::usdc_devnet(),
        "$0.001",
        pay_to().pubkey(),
        fee_payer,
    )
    .unwrap();
    let layer = PaymentLayer::builder()
        .accept(option)
        .verifier(client.clone())
        .settler(client)
        .settlement_mode(mode)
        .nonce_store(MemoryNonceStore::new())
        .build()
        .unwrap();
    let (addr, server) = common::serve(common::app(hits).layer(layer)).await;
    // The server lives as long as the test's runtime.
    std::mem::forget(server);
    format!("http://{addr}/paid")
}

/// Our client for the facilitator, its fee payer read from `/supported`.
async fn client(facilitator: &Facilitator) -> (FacilitatorClient, Pubkey) {
    let client = FacilitatorClient::builder(facilitator.url.clone())
        .settle_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let supported = client.supported().await.unwrap();
    let fee_payer = supported
        .svm_fee_payer(Network::SOLANA_DEVNET)
        .expect("the facilitator advertises a devnet fee payer");
    (client, fee_payer)
}

/// The official client pays `url` (and replays its proof when `replay`).
async fn pay(chain: &Chain, url: &str, replay: bool) -> Value {
    let deps = chain::deps("svm_facilitator").expect("deps checked by the caller");
    let (url, rpc, key) = (url.to_owned(), chain.url.clone(), payer().to_bytes());
    tokio::task::spawn_blocking(move || chain::pay(&deps, &url, &rpc, &key, replay))
        .await
        .unwrap()
}

fn balances(chain: &Chain) -> (Option<u64>, Option<u64>) {
    (
        chain.token_balance(&payer().pubkey().to_string()),
        chain.token_balance(&pay_to().pubkey().to_string()),
    )
}

async fn pays_through_the_facilitator(mode: SettlementMode) {
    let Some(deps) = chain::deps("svm_facilitator") else {
        return;
    };
    let (chain, facilitator) = start(&deps);
    let (client, advertised) = client(&facilitator).await;
    assert_eq!(advertised, fee_payer().pubkey());
    let hits = Hits::new();
    let url = route(client, advertised, &hits, mode).await;
    let (payer_before, to_before) = balances(&chain);

    let out = pay(&chain, &url, true).await;
    let logs = || {
        format!(
            "facilitator log:\n{}\nchain log:\n{}",
            facilitator.log(),
            chain.log()
        )
    };
    assert_eq!(out["status"], json!(200), "{out:#}\n{}", logs());
    let receipt = &out["paymentResponse"];
    assert_eq!(receipt["success"], json!(true), "{out:#}");
    assert_eq!(receipt["payer"], json!(payer().pubkey().to_string()));
    assert_eq!(receipt["network"], json!(Network::SOLANA_DEVNET.caip2()));
    // The receipt's transaction is the signature the chain knows as confirmed.
    let id = receipt["transaction"].as_str().unwrap();
    let status = chain.call("getSignatureStatuses", json!([[id]])).unwrap();
    assert_eq!(status["value"][0]["err"], json!(null), "{status}");
    assert_eq!(status["value"][0]["confirmationStatus"], json!("finalized"));
    // The replay is refused by our nonce store: the reference `/verify` approves it again (it
    // does not look at the chain), but it is never settled nor served twice.
    assert_eq!(out["replayStatus"], json!(402), "{out:#}");
    assert_eq!(hits.get(), 1);
    assert_eq!(facilitator.calls("/verify"), 2, "{}", logs());
    assert_eq!(facilitator.calls("/settle"), 1, "{}", logs());
    assert_eq!(
        balances(&chain),
        (
            payer_before.map(|b| b - PRICE),
            to_before.map(|b| b + PRICE)
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_client_pays_through_the_reference_facilitator_settling_after() {
    pays_through_the_facilitator(SettlementMode::AfterHandler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_client_pays_through_the_reference_facilitator_settling_before() {
    pays_through_the_facilitator(SettlementMode::BeforeHandler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn facilitator_down_answers_503_with_retry_after_and_the_handler_does_not_run() {
    let Some(deps) = chain::deps("svm_facilitator") else {
        return;
    };
    let (chain, _facilitator) = start(&deps);
    // Nothing listens there.
    let dead = FacilitatorClient::builder("http://127.0.0.1:1")
        .max_attempts(2)
        .build()
        .unwrap();
    let hits = Hits::new();
    let url = route(
        dead,
        fee_payer().pubkey(),
        &hits,
        SettlementMode::AfterHandler,
    )
    .await;
    let before = balances(&chain);
    let out = pay(&chain, &url, false).await;
    assert_eq!(out["status"], json!(503), "{out:#}");
    assert!(
        out["retryAfter"]
            .as_str()
            .is_some_and(|s| s.parse::<u64>().is_ok()),
        "{out:#}"
    );
    assert_eq!(hits.get(), 0);
    assert_eq!(balances(&chain), before);
}

/// What the facilitator answers, after it acted, in place of its real reply.
struct Hostile {
    name: &'static str,
    endpoint: &'static str,
    status: u16,
    body: String,
}

/// Each hostile reply is answered 503 (`Retry-After`), never a success nor a second
/// settlement. A hostile `/verify` stops before the handler and releases the proof (retried,
/// it pays normally); a hostile `/settle` (the facilitator did settle) is an unknown outcome:
/// the handler's body is withheld, the proof stays claimed (its replay is refused), and the
/// money moved exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_facilitator_replies_are_refused_safely() {
    let Some(deps) = chain::deps("svm_facilitator") else {
        return;
    };
    let (chain, facilitator) = start(&deps);
    let (client, advertised) = client(&facilitator).await;
    let hits = Hits::new();
    let url = route(client, advertised, &hits, SettlementMode::AfterHandler).await;
    let network = Network::SOLANA_DEVNET.caip2();
    let payer_key = payer().pubkey().to_string();
    // A well-formed signature that is not this transaction's.
    let forged = bs58::encode(fee_payer().sign(b"another message")).into_string();
    let cases = [
        Hostile { name: "settle: garbage", endpoint: "/settle", status: 200, body: "garbage".into() },
        Hostile {
            name: "settle: success without a signature",
            endpoint: "/settle",
            status: 200,
            body: json!({"success": true, "network": network, "payer": payer_key}).to_string(),
        },
        Hostile {
            name: "settle: success with a signature of another message",
            endpoint: "/settle",
            status: 200,
            body: json!({"success": true, "network": network, "payer": payer_key, "transaction": forged}).to_string(),
        },
        Hostile {
            name: "settle: success with an EVM hash",
            endpoint: "/settle",
            status: 200,
            body: json!({"success": true, "network": network, "payer": payer_key, "transaction": format!("0x{}", "ab".repeat(32))}).to_string(),
        },
        Hostile {
            name: "verify: valid for another payer",
            endpoint: "/verify",
            status: 200,
            body: json!({"isValid": true, "payer": pay_to().pubkey().to_string()}).to_string(),
        },
        Hostile { name: "verify: garbage", endpoint: "/verify", status: 200, body: "[true]".into() },
    ];
    for case in cases {
        // A fresh blockhash: each payment is a new transaction.
        chain.call("x402_expireBlockhash", json!([])).unwrap();
        let (hits_before, settles_before) = (hits.get(), facilitator.calls("/settle"));
        let before = balances(&chain);
        facilitator.inject(case.endpoint, case.status, &case.body);
        let out = pay(&chain, &url, true).await;
        let name = case.name;
        let logs = || format!("{name}: {out:#}\nfacilitator log:\n{}", facilitator.log());
        assert_eq!(out["status"], json!(503), "{}", logs());
        assert_ne!(out["paymentResponse"]["success"], json!(true), "{}", logs());
        assert!(
            !out["body"]
                .as_str()
                .unwrap_or_default()
                .contains("\"handler\""),
            "{}",
            logs()
        );
        // Either way the handler ran once, the facilitator settled once, the price moved once.
        assert_eq!(hits.get(), hits_before + 1, "{}", logs());
        assert_eq!(
            facilitator.calls("/settle"),
            settles_before + 1,
            "{}",
            logs()
        );
        let (p, t) = before;
        let moved = (p.map(|b| b - PRICE), t.map(|b| b + PRICE));
        assert_eq!(balances(&chain), moved, "{}", logs());
        if case.endpoint == "/verify" {
            // Refused before the handler and released: the same proof, retried against a
            // sane reply, is the one that ran, settled and paid.
            assert_eq!(out["replayStatus"], json!(200), "{}", logs());
        } else {
            // The facilitator did settle: claimed for good, the replay is refused.
            assert_eq!(out["replayStatus"], json!(402), "{}", logs());
        }
    }
}
