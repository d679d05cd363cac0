//! The paying client's test doubles, shared by `tests/client.rs` and `tests/reqwest.rs`: a
//! signer that counts its signatures and a policy that allows the test price.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use alloy_primitives::{Address, B256, ChainId, Signature, U256};
use alloy_signer::Signer;
use async_trait::async_trait;
use tower_x402::Asset;
use tower_x402::client::Policy;
use tower_x402::test_util::{PrivateKeySigner, demo_payer};

/// The demo key, counting every signature it makes.
#[derive(Clone)]
pub struct Counting {
    key: PrivateKeySigner,
    count: Arc<AtomicUsize>,
}

impl Counting {
    /// The demo payer, no signature yet.
    pub fn new() -> Self {
        Self {
            key: demo_payer(),
            count: Arc::default(),
        }
    }

    /// Signatures made so far.
    pub fn signatures(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Signer for Counting {
    async fn sign_hash(&self, hash: &B256) -> alloy_signer::Result<Signature> {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.key.sign_hash(hash).await
    }

    fn address(&self) -> Address {
        self.key.address()
    }

    fn chain_id(&self) -> Option<ChainId> {
        None
    }

    fn set_chain_id(&mut self, _: Option<ChainId>) {}
}

/// A policy that allows the test price (1000 units of Base Sepolia USDC).
pub fn policy() -> Policy {
    Policy::new(U256::from(10_000)).allow_asset(&Asset::usdc_base_sepolia())
}
