//! Solana `exact` end to end (issue #20): the official `@x402/svm` client pays our axum
//! route, its transaction built against the local chain (`tests/svm/chain.mjs`, litesvm),
//! verified in-process by `SvmVerifier`.

#![cfg(all(feature = "svm-settle", feature = "axum", feature = "test-util"))]

#[path = "svm/chain.rs"]
mod chain;
mod common;
#[path = "svm/tx.rs"]
mod tx;

use serde_json::json;
use tower_x402::nonce::MemoryNonceStore;
use tower_x402::settle::SettlementMode;
use tower_x402::svm::{Keypair, SvmAsset, SvmSettler, SvmVerifier, program};
use tower_x402::verify::EvmVerifier;
use tower_x402::{Network, PaymentLayer, PaymentOption};

use chain::{Chain, fee_payer, pay_to, payer};
use common::Hits;

fn start_chain(deps: &std::path::Path) -> Chain {
    Chain::devnet(deps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_pays_an_evm_and_solana_route_and_its_replay_is_refused() {
    let Some(deps) = chain::deps("svm_chain") else {
        return;
    };
    let chain = start_chain(&deps);
    let hits = Hits::new();
    let option = PaymentOption::exact_svm(
        &SvmAsset::usdc_devnet(),
        "$0.001",
        pay_to().pubkey(),
        fee_payer().pubkey(),
    )
    .unwrap();
    let layer = PaymentLayer::builder()
        .accept(common::option())
        .accept(option)
        .verifier(SvmVerifier::new([fee_payer().pubkey()]).with_evm(EvmVerifier::new()))
        .nonce_store(MemoryNonceStore::new())
        .build()
        .unwrap();
    let (addr, _server) = common::serve(common::app(&hits).layer(layer)).await;
    let url = format!("http://{addr}/paid");
    let rpc = chain.url.clone();
    let key = payer().to_bytes();
    let out = tokio::task::spawn_blocking(move || chain::pay(&deps, &url, &rpc, &key, true))
        .await
        .unwrap();
    assert_eq!(
        out["status"],
        json!(200),
        "{out:#}\nchain log:\n{}",
        chain.log()
    );
    assert_eq!(hits.get(), 1);
    assert_eq!(out["replayStatus"], json!(402), "{out:#}");
    assert_eq!(hits.get(), 1);
}

/// `/paid` for `$0.001` devnet USDC, settled by `SvmSettler` on `chain` in `mode`.
async fn settled_route(chain: &Chain, hits: &Hits, mode: SettlementMode) -> String {
    let option = PaymentOption::exact_svm(
        &SvmAsset::usdc_devnet(),
        "$0.001",
        pay_to().pubkey(),
        fee_payer().pubkey(),
    )
    .unwrap();
    let settler = SvmSettler::new(chain.url.clone(), Network::SOLANA_DEVNET, fee_payer())
        .unwrap()
        .with_confirm_timeout(std::time::Duration::from_secs(5));
    let layer = PaymentLayer::builder()
        .accept(option)
        .verifier(SvmVerifier::new([fee_payer().pubkey()]))
        .settler(settler)
        .settlement_mode(mode)
        .nonce_store(MemoryNonceStore::new())
        .build()
        .unwrap();
    let (addr, _server) = common::serve(common::app(hits).layer(layer)).await;
    format!("http://{addr}/paid")
}

fn lamports(chain: &Chain, who: &Keypair) -> u64 {
    chain
        .call("getBalance", json!([who.pubkey().to_string()]))
        .unwrap()["value"]
        .as_u64()
        .unwrap()
}

async fn pay_settled(mode: SettlementMode, fault: Option<&str>) {
    let Some(deps) = chain::deps("svm_chain") else {
        return;
    };
    let chain = start_chain(&deps);
    let hits = Hits::new();
    let url = settled_route(&chain, &hits, mode).await;
    let (payer_before, to_before) = (
        chain.token_balance(&payer().pubkey().to_string()),
        chain.token_balance(&pay_to().pubkey().to_string()),
    );
    let fees_before = lamports(&chain, &fee_payer());
    if let Some(fault) = fault {
        chain.call(fault, json!([])).unwrap();
    }
    let rpc = chain.url.clone();
    let key = payer().to_bytes();
    let out = {
        let deps = deps.clone();
        tokio::task::spawn_blocking(move || chain::pay(&deps, &url, &rpc, &key, true))
            .await
            .unwrap()
    };
    assert_eq!(
        out["status"],
        json!(200),
        "{out:#}\nchain log:\n{}",
        chain.log()
    );
    assert_eq!(out["paymentResponse"]["success"], json!(true), "{out:#}");
    // The receipt names the payer and the transaction as the reference's: base58, and the
    // chain knows that transaction as confirmed without error.
    let receipt = &out["paymentResponse"];
    assert_eq!(
        receipt["payer"],
        json!(payer().pubkey().to_string()),
        "{out:#}"
    );
    assert_eq!(receipt["network"], json!(Network::SOLANA_DEVNET.caip2()));
    let id = receipt["transaction"].as_str().unwrap();
    let status = chain.call("getSignatureStatuses", json!([[id]])).unwrap();
    assert_eq!(status["value"][0]["err"], json!(null), "{status}");
    assert_eq!(
        status["value"][0]["confirmationStatus"],
        json!("finalized"),
        "{status}"
    );
    assert_eq!(out["replayStatus"], json!(402), "{out:#}");
    assert_eq!(hits.get(), 1);
    // Exactly the price moved, once.
    assert_eq!(
        chain.token_balance(&payer().pubkey().to_string()),
        payer_before.map(|b| b - 1000)
    );
    assert_eq!(
        chain.token_balance(&pay_to().pubkey().to_string()),
        to_before.map(|b| b + 1000)
    );
    // The fee payer paid the network fee (two signatures) and nothing else.
    let fee = fees_before - lamports(&chain, &fee_payer());
    assert!((10_000..=10_100).contains(&fee), "fee {fee} lamports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_after_the_handler_moves_exactly_the_price() {
    pay_settled(SettlementMode::AfterHandler, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_before_the_handler_moves_exactly_the_price() {
    pay_settled(SettlementMode::BeforeHandler, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_reply_lost_after_submit_is_reconciled_from_the_signature_status() {
    // The chain processes the transaction but the reply to sendTransaction is an error: the
    // settler looks the signature up instead of sending again, and finds it confirmed.
    pay_settled(SettlementMode::AfterHandler, Some("x402_dropNextSendReply")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_down_answers_503_before_the_handler_and_moves_nothing() {
    let Some(deps) = chain::deps("svm_chain") else {
        return;
    };
    let chain = start_chain(&deps);
    let hits = Hits::new();
    let payer_before = chain.token_balance(&payer().pubkey().to_string());
    // The client builds its transaction against the chain; the server's settler meets an
    // RPC that is down (nothing listens on its port) in its pre-check.
    let option = PaymentOption::exact_svm(
        &SvmAsset::usdc_devnet(),
        "$0.001",
        pay_to().pubkey(),
        fee_payer().pubkey(),
    )
    .unwrap();
    let dead = SvmSettler::new("http://127.0.0.1:1", Network::SOLANA_DEVNET, fee_payer()).unwrap();
    let layer = PaymentLayer::builder()
        .accept(option)
        .verifier(SvmVerifier::new([fee_payer().pubkey()]))
        .settler(dead)
        .nonce_store(MemoryNonceStore::new())
        .build()
        .unwrap();
    let (addr, _server) = common::serve(common::app(&hits).layer(layer)).await;
    let url = format!("http://{addr}/paid");
    let rpc = chain.url.clone();
    let key = payer().to_bytes();
    let out = tokio::task::spawn_blocking(move || chain::pay(&deps, &url, &rpc, &key, false))
        .await
        .unwrap();
    assert_eq!(out["status"], json!(503), "{out:#}");
    assert_eq!(out["retryAfter"], json!("5"), "{out:#}");
    assert_eq!(hits.get(), 0);
    assert_eq!(
        chain.token_balance(&payer().pubkey().to_string()),
        payer_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_blockhash_is_refused_before_the_handler() {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    let Some(deps) = chain::deps("svm_chain") else {
        return;
    };
    let chain = start_chain(&deps);
    let hits = Hits::new();
    let option = PaymentOption::exact_svm(
        &SvmAsset::usdc_devnet(),
        "$0.001",
        pay_to().pubkey(),
        fee_payer().pubkey(),
    )
    .unwrap();
    let settler = SvmSettler::new(chain.url.clone(), Network::SOLANA_DEVNET, fee_payer()).unwrap();
    let layer = PaymentLayer::builder()
        .accept(option)
        .verifier(SvmVerifier::new([fee_payer().pubkey()]))
        .settler(settler)
        .nonce_store(MemoryNonceStore::new())
        .build()
        .unwrap();
    let app = common::app(&hits).layer(layer);
    // A well-formed payment on a blockhash the chain gave out, then expired.
    let hash = chain.call("getLatestBlockhash", json!([])).unwrap()["value"]["blockhash"]
        .as_str()
        .unwrap()
        .parse::<tower_x402::proto::svm::Pubkey>()
        .unwrap();
    let payment = tx::Payment {
        fee_payer: fee_payer().pubkey(),
        payer: payer(),
        mint: program::USDC_DEVNET,
        pay_to: pay_to().pubkey(),
        amount: 1000,
        decimals: 6,
        blockhash: hash.to_bytes(),
    };
    let r = common::get_with(&app, "/paid", []).await;
    let challenge = r.challenge();
    let accepted = serde_json::to_value(&challenge.accepts[0]).unwrap();
    let header = |bytes: Vec<u8>| {
        let proof = json!({
            "x402Version": 2,
            "resource": {"url": format!("{}/paid", common::BASE)},
            "accepted": accepted,
            "payload": {"transaction": STANDARD.encode(bytes)},
        });
        (
            http::HeaderName::from_static("payment-signature"),
            http::HeaderValue::from_str(&STANDARD.encode(proof.to_string())).unwrap(),
        )
    };
    // While the blockhash is alive the same construction pays (so what follows is the
    // blockhash's doing, not the transaction's).
    let r = common::get_with(&app, "/paid", [header(payment.transaction())]).await;
    assert_eq!(r.status, http::StatusCode::OK, "{:?}", r.outcome());
    assert_eq!(hits.get(), 1);
    chain.call("x402_expireBlockhash", json!([])).unwrap();
    let mut ixs = payment.instructions();
    ixs[3] = tx::memo(b"another payment, same blockhash");
    let stale = payment.signed(&payment.message(ixs));
    let before = chain.token_balance(&payer().pubkey().to_string());
    let r = common::get_with(&app, "/paid", [header(stale)]).await;
    assert_eq!(
        r.outcome(),
        (
            http::StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_svm_transaction_simulation_failed".into())
        ),
        "chain log:\n{}",
        chain.log()
    );
    assert_eq!(hits.get(), 1);
    assert_eq!(chain.token_balance(&payer().pubkey().to_string()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_outcome_cannot_be_learnt_is_unknown_kept_and_alerted() {
    use tower_x402::alert::{self, Alert};
    let Some(deps) = chain::deps("svm_chain") else {
        return;
    };
    let chain = start_chain(&deps);
    let hits = Hits::new();
    let url = settled_route(&chain, &hits, SettlementMode::BeforeHandler).await;
    let payer_before = chain.token_balance(&payer().pubkey().to_string());
    // sendTransaction times out and the transaction never shows up: the settler asks for its
    // status until its wait ends (5 s here), never sends it again, and answers "unknown".
    chain.call("x402_loseNextSend", json!([])).unwrap();
    let alerts = alert::count(Alert::SettlementUnknown);
    let rpc = chain.url.clone();
    let key = payer().to_bytes();
    let out = tokio::task::spawn_blocking(move || chain::pay(&deps, &url, &rpc, &key, true))
        .await
        .unwrap();
    assert_eq!(out["status"], json!(503), "{out:#}");
    assert_eq!(
        out["paymentResponse"]["errorReason"],
        json!("settlement_outcome_unknown"),
        "{out:#}"
    );
    // Kept: the same proof cannot buy a second attempt.
    assert_eq!(out["replayStatus"], json!(402), "{out:#}");
    assert_eq!(hits.get(), 0);
    assert!(alert::count(Alert::SettlementUnknown) > alerts);
    assert_eq!(
        chain.token_balance(&payer().pubkey().to_string()),
        payer_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_copies_of_one_proof_settle_one_transaction() {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    let Some(deps) = chain::deps("svm_chain") else {
        return;
    };
    let chain = start_chain(&deps);
    let hits = Hits::gated();
    let option = PaymentOption::exact_svm(
        &SvmAsset::usdc_devnet(),
        "$0.001",
        pay_to().pubkey(),
        fee_payer().pubkey(),
    )
    .unwrap();
    let settler = SvmSettler::new(chain.url.clone(), Network::SOLANA_DEVNET, fee_payer()).unwrap();
    let layer = PaymentLayer::builder()
        .accept(option)
        .verifier(SvmVerifier::new([fee_payer().pubkey()]))
        .settler(settler)
        .nonce_store(MemoryNonceStore::new())
        .build()
        .unwrap();
    let app = common::app(&hits).layer(layer);
    let hash = chain.call("getLatestBlockhash", json!([])).unwrap()["value"]["blockhash"]
        .as_str()
        .unwrap()
        .parse::<tower_x402::proto::svm::Pubkey>()
        .unwrap();
    let payment = tx::Payment {
        fee_payer: fee_payer().pubkey(),
        payer: payer(),
        mint: program::USDC_DEVNET,
        pay_to: pay_to().pubkey(),
        amount: 1000,
        decimals: 6,
        blockhash: hash.to_bytes(),
    };
    let accepted = serde_json::to_value(
        &common::get_with(&app, "/paid", [])
            .await
            .challenge()
            .accepts[0],
    )
    .unwrap();
    let proof = json!({
        "x402Version": 2,
        "resource": {"url": format!("{}/paid", common::BASE)},
        "accepted": accepted,
        "payload": {"transaction": STANDARD.encode(payment.transaction())},
    });
    let value = http::HeaderValue::from_str(&STANDARD.encode(proof.to_string())).unwrap();
    let before = chain.token_balance(&payer().pubkey().to_string()).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let app = app.clone();
        let header = (
            http::HeaderName::from_static("payment-signature"),
            value.clone(),
        );
        tasks.push(tokio::spawn(async move {
            common::get_with(&app, "/paid", [header]).await.status
        }));
    }
    while hits.get() == 0 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    hits.open();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            http::StatusCode::OK => ok += 1,
            s => assert_eq!(s, http::StatusCode::PAYMENT_REQUIRED),
        }
    }
    assert_eq!((ok, hits.get()), (1, 1));
    // One transfer on chain.
    assert_eq!(
        chain.token_balance(&payer().pubkey().to_string()),
        Some(before - 1000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_sdk_pays_our_solana_route_exactly_the_price_and_its_replay_is_refused() {
    let Some(deps) = chain::deps("svm_chain") else {
        return;
    };
    let chain = start_chain(&deps);
    let hits = Hits::new();
    let url = settled_route(&chain, &hits, SettlementMode::AfterHandler).await;
    let balances = || {
        (
            chain.token_balance(&payer().pubkey().to_string()),
            chain.token_balance(&pay_to().pubkey().to_string()),
        )
    };
    let (payer_before, to_before) = balances();
    let rpc = chain.url.clone();
    let key = payer().to_bytes();
    let out = {
        let deps = deps.clone();
        tokio::task::spawn_blocking(move || chain::pay_py(&deps, &url, &rpc, &key, true))
            .await
            .unwrap()
    };
    assert_eq!(
        out["status"],
        json!(200),
        "{out:#}\nchain log:\n{}",
        chain.log()
    );
    assert_eq!(out["paymentResponse"]["success"], json!(true), "{out:#}");
    assert_eq!(
        out["paymentResponse"]["payer"],
        json!(payer().pubkey().to_string())
    );
    assert_eq!(out["replayStatus"], json!(402), "{out:#}");
    assert_eq!(hits.get(), 1);
    let after = (payer_before.map(|b| b - 1000), to_before.map(|b| b + 1000));
    assert_eq!(balances(), after);
}

/// Our own `PayingLayer` paying a route that offers EVM and Solana: the policy picks the
/// network (the two prices tie, so without it the server's order would).
#[cfg(feature = "svm-client")]
mod paying_layer {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::{HeaderValue, Request, StatusCode};
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use tower::{ServiceBuilder, ServiceExt};
    use tower_x402::client::{PayingLayer, PaymentOutcome, PaymentReport, Policy, SvmPayer};
    use tower_x402::primitives::U256;
    use tower_x402::proto::header::PAYMENT_SIGNATURE;
    use tower_x402::test_util::PrivateKeySigner;
    use tower_x402::{Asset, Network};

    use super::*;

    type Hyper = Client<HttpConnector, Full<Bytes>>;

    fn hyper() -> Hyper {
        Client::builder(TokioExecutor::new()).build_http()
    }

    /// `/paid` offering Base Sepolia USDC (verified offline: no EVM chain here) and devnet
    /// USDC, both `$0.001`; Solana payments settled by `SvmSettler` when `settle`.
    async fn both_route(chain: &Chain, hits: &Hits, settle: bool) -> String {
        let svm = PaymentOption::exact_svm(
            &SvmAsset::usdc_devnet(),
            "$0.001",
            pay_to().pubkey(),
            fee_payer().pubkey(),
        )
        .unwrap();
        let mut builder = PaymentLayer::builder()
            .accept(common::option())
            .accept(svm)
            .verifier(SvmVerifier::new([fee_payer().pubkey()]).with_evm(EvmVerifier::new()))
            .nonce_store(MemoryNonceStore::new());
        if settle {
            builder = builder.settler(
                SvmSettler::new(chain.url.clone(), Network::SOLANA_DEVNET, fee_payer())
                    .unwrap()
                    .with_confirm_timeout(std::time::Duration::from_secs(5)),
            );
        }
        let (addr, _server) =
            common::serve(common::app(hits).layer(builder.build().unwrap())).await;
        format!("http://{addr}/paid")
    }

    /// Pays `url` once with our layer (Solana payer = `payer()`), recording the proof header
    /// it sent; returns the status, the report and that header.
    async fn pay(
        chain: &Chain,
        url: &str,
        policy: Policy,
    ) -> (StatusCode, PaymentReport, HeaderValue) {
        let sent: Arc<Mutex<Option<HeaderValue>>> = Arc::default();
        let seen = sent.clone();
        let http = hyper();
        let recording = tower::service_fn(move |req: Request<Full<Bytes>>| {
            if let Some(v) = req.headers().get(PAYMENT_SIGNATURE) {
                *seen.lock().unwrap() = Some(v.clone());
            }
            http.request(req)
        });
        let layer = PayingLayer::new(PrivateKeySigner::random(), policy)
            .svm(SvmPayer::new(payer(), chain.url.clone()).unwrap());
        let client = ServiceBuilder::new().layer(layer).service(recording);
        let req = Request::get(url).body(Full::default()).unwrap();
        let res = client.oneshot(req).await.unwrap();
        let report = res.extensions().get::<PaymentReport>().cloned().unwrap();
        let header = sent.lock().unwrap().clone().expect("a proof was sent");
        (res.status(), report, header)
    }

    async fn replay(url: &str, proof: HeaderValue) -> StatusCode {
        let req = Request::get(url)
            .header(PAYMENT_SIGNATURE, proof)
            .body(Full::default())
            .unwrap();
        hyper().request(req).await.unwrap().status()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn our_paying_layer_pays_the_solana_offer_when_its_policy_says_solana() {
        let Some(deps) = chain::deps("svm_chain") else {
            return;
        };
        let chain = start_chain(&deps);
        let hits = Hits::new();
        let url = both_route(&chain, &hits, true).await;
        let balances = || {
            (
                chain.token_balance(&payer().pubkey().to_string()),
                chain.token_balance(&pay_to().pubkey().to_string()),
            )
        };
        let (payer_before, to_before) = balances();
        let policy = Policy::new(U256::from(10_000))
            .allow_network(Network::SOLANA_DEVNET)
            .allow_svm_token(Network::SOLANA_DEVNET, program::USDC_DEVNET);
        let budget = tower_x402::client::Budget::new(U256::from(1_000_000));
        let (status, report, proof) = pay(&chain, &url, policy.budget(budget.clone())).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{report:?}\nchain log:\n{}",
            chain.log()
        );
        assert_eq!(report.outcome, PaymentOutcome::Settled, "{report:?}");
        assert_eq!(report.requirements.network, Network::SOLANA_DEVNET);
        assert_eq!(report.svm_payer, Some(payer().pubkey()));
        // The receipt names our payer and a transaction the chain knows as finalized.
        let receipt = report.receipt.clone().unwrap();
        assert_eq!(receipt.payer, Some(payer().pubkey().into()));
        let id = receipt.signature.unwrap().to_string();
        let st = chain.call("getSignatureStatuses", json!([[id]])).unwrap();
        assert_eq!(st["value"][0]["err"], json!(null), "{st}");
        assert_eq!(report.amount(), U256::from(1000));
        assert_eq!(budget.spent(), U256::from(1000));
        assert_eq!(hits.get(), 1);
        // Exactly the price moved, once.
        let after = (payer_before.map(|b| b - 1000), to_before.map(|b| b + 1000));
        assert_eq!(balances(), after);

        // The same transaction again: refused before the handler, nothing moves.
        assert_eq!(replay(&url, proof).await, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(hits.get(), 1);
        assert_eq!(balances(), after);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn our_paying_layer_pays_the_evm_offer_when_its_policy_says_evm() {
        let Some(deps) = chain::deps("svm_chain") else {
            return;
        };
        let chain = start_chain(&deps);
        let hits = Hits::new();
        // No settler: the EVM proof is verified and claimed in-process (no EVM chain here).
        let url = both_route(&chain, &hits, false).await;
        let before = chain.token_balance(&payer().pubkey().to_string());
        let policy = Policy::new(U256::from(10_000)).allow_asset(&Asset::usdc_base_sepolia());
        let (status, report, proof) = pay(&chain, &url, policy).await;
        assert_eq!(status, StatusCode::OK, "{report:?}");
        assert_eq!(report.requirements.network, Network::BASE_SEPOLIA);
        assert_eq!(report.svm_payer, None);
        assert_eq!(hits.get(), 1);
        assert_eq!(replay(&url, proof).await, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(hits.get(), 1);
        // The Solana payer was not touched.
        assert_eq!(chain.token_balance(&payer().pubkey().to_string()), before);
    }
}
