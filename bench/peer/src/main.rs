//! The peer in the side-by-side run: `GET /weather` ("hello") behind x402-axum, priced like
//! tower-x402's load server ($0.001 USDC on Base Sepolia to anvil account #2), verified by the
//! in-process x402-facilitator-local with the eip155 `exact` scheme against a local anvil.
//!
//! Settlement is replaced by a no-op (`VerifyOnlyFacilitator`), the counterpart of
//! tower-x402's `VerifyOnly`, so both servers do the same work per request: decode, verify,
//! run the handler, attach a receipt. x402-axum's verification itself needs the chain: it
//! reads the payer's balance and simulates `transferWithAuthorization` with `eth_call`s.
//!
//! `x402-peer-bench --rpc http://127.0.0.1:PORT` prints `LISTENING <port>` and serves on one
//! thread until stdin closes.

use std::collections::HashMap;
use std::sync::Arc;

use alloy_primitives::address;
use axum::Router;
use axum::routing::get;
use tokio::io::AsyncReadExt;
use x402_axum::X402Middleware;
use x402_chain_eip155::chain::config::Eip155ChainConfig;
use x402_chain_eip155::chain::{Eip155ChainProvider, Eip155ChainReference};
use x402_chain_eip155::{KnownNetworkEip155, V2Eip155Exact};
use x402_facilitator_local::FacilitatorLocal;
use x402_types::chain::ChainId;
use x402_types::chain::{ChainProviderOps, ChainRegistry, FromConfig};
use x402_types::facilitator::Facilitator;
use x402_types::networks::USDC;
use x402_types::proto;
use x402_types::scheme::{
    SchemeBlueprints, SchemeConfig, SchemeRegistry, X402SchemeFacilitator,
    X402SchemeFacilitatorBuilder, X402SchemeId,
};

/// Anvil account #0: the (unused) relayer key the chain provider requires.
const RELAYER_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// The chain provider as the scheme registry wants it (a local type, so the registry's
/// builder traits can be implemented for it; x402-facilitator does the same with its enum).
struct Chain(Arc<Eip155ChainProvider>);

impl ChainProviderOps for Chain {
    fn signer_addresses(&self) -> Vec<String> {
        self.0.signer_addresses()
    }
    fn chain_id(&self) -> ChainId {
        self.0.chain_id()
    }
}

/// `V2Eip155Exact`, registered for [`Chain`].
struct Exact;

impl X402SchemeId for Exact {
    fn namespace(&self) -> &str {
        V2Eip155Exact.namespace()
    }
    fn scheme(&self) -> &str {
        V2Eip155Exact.scheme()
    }
}

impl X402SchemeFacilitatorBuilder<&Chain> for Exact {
    fn build(
        &self,
        chain: &Chain,
        config: Option<serde_json::Value>,
    ) -> Result<Box<dyn X402SchemeFacilitator>, Box<dyn std::error::Error>> {
        V2Eip155Exact.build(chain.0.clone(), config)
    }
}

/// Verifies with the local facilitator; settles nothing (like tower-x402's `VerifyOnly`).
#[derive(Clone)]
struct VerifyOnlyFacilitator(Arc<FacilitatorLocal<SchemeRegistry>>);

impl Facilitator for VerifyOnlyFacilitator {
    type Error = <FacilitatorLocal<SchemeRegistry> as Facilitator>::Error;

    async fn verify(
        &self,
        request: &proto::VerifyRequest,
    ) -> Result<proto::VerifyResponse, Self::Error> {
        self.0.verify(request).await
    }

    async fn settle(
        &self,
        _request: &proto::SettleRequest,
    ) -> Result<proto::SettleResponse, Self::Error> {
        Ok(proto::SettleResponse(serde_json::json!({
            "success": true,
            "payer": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
            "transaction": "",
            "network": "eip155:84532",
        })))
    }

    async fn supported(&self) -> Result<proto::SupportedResponse, Self::Error> {
        self.0.supported().await
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let rpc = match args.iter().position(|a| a == "--rpc") {
        Some(i) if i + 1 < args.len() => args[i + 1].clone(),
        _ => return Err("usage: x402-peer-bench --rpc <anvil url>".into()),
    };
    // One thread, like tower-x402's load server: the harness pins the process to one core.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(rpc))
}

async fn serve(rpc: String) -> Result<(), Box<dyn std::error::Error>> {
    let config = Eip155ChainConfig {
        chain_reference: Eip155ChainReference::new(84532),
        inner: serde_json::from_value(serde_json::json!({
            "signers": [RELAYER_KEY],
            "rpc": [{ "http": rpc }],
        }))?,
    };
    let provider = Arc::new(Eip155ChainProvider::from_config(&config).await?);
    let chains = ChainRegistry::new(HashMap::from([(provider.chain_id(), Chain(provider))]));
    let blueprints = SchemeBlueprints::new().and_register(Exact);
    let schemes: Vec<SchemeConfig> = serde_json::from_value(serde_json::json!([
        { "id": "v2-eip155-exact", "chains": "eip155:84532" }
    ]))?;
    let registry = SchemeRegistry::build(chains, blueprints, &schemes);
    let facilitator = VerifyOnlyFacilitator(Arc::new(FacilitatorLocal::new(registry)));

    let x402 = X402Middleware::from_facilitator(facilitator);
    let app = Router::new().route(
        "/weather",
        get(|| async { "hello" }).layer(x402.with_price_tag(V2Eip155Exact::price_tag(
            address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
            USDC::base_sepolia().amount(1000u64),
        ))),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("LISTENING {}", listener.local_addr()?.port());
    // Serve until the harness closes our stdin.
    let stop = async {
        let mut sink = [0u8; 64];
        let mut stdin = tokio::io::stdin();
        while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await?;
    Ok(())
}
