//! Solana `exact` end to end (issue #20): the official `@x402/svm` client pays our axum
//! route, its transaction built against the local chain (`tests/svm/chain.mjs`, litesvm),
//! verified in-process by `SvmVerifier`.

#![cfg(all(feature = "svm", feature = "axum", feature = "test-util"))]

#[path = "svm/chain.rs"]
mod chain;
mod common;

use serde_json::json;
use tower_x402::nonce::MemoryNonceStore;
use tower_x402::svm::{Keypair, SvmAsset, SvmVerifier, program};
use tower_x402::verify::EvmVerifier;
use tower_x402::{PaymentLayer, PaymentOption};

use chain::Chain;
use common::Hits;

fn fee_payer() -> Keypair {
    Keypair::from_seed([1; 32])
}

fn payer() -> Keypair {
    Keypair::from_seed([2; 32])
}

fn pay_to() -> Keypair {
    Keypair::from_seed([3; 32])
}

/// The chain poses as devnet (the official client knows only the public clusters' ids; its
/// RPC is ours): devnet USDC's mint address, the payer funded with 5 USDC.
fn start_chain(deps: &std::path::Path) -> Chain {
    Chain::start(
        deps,
        json!({
            "mint": program::USDC_DEVNET.to_string(),
            "decimals": 6,
            "payer": payer().pubkey().to_string(),
            "payerBalance": 5_000_000,
            "feePayer": fee_payer().pubkey().to_string(),
            "payTo": pay_to().pubkey().to_string(),
        }),
    )
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
