//! Shared by the channel tests over HTTP (`#[path]`-included, as `common/redis_server.rs`): the
//! receiver authorizer's key, and (feature `onchain`) the official `@x402/evm` batch-settlement
//! client paying 100 metered calls on our axum server and refunding, whatever escrow backs the
//! channels (our relayer in tests/channel_http.rs, the reference facilitator in
//! tests/channel_facilitator.rs). The caller settles and checks the balances.
#![allow(dead_code)]

use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use std::time::{SystemTime, UNIX_EPOCH};
use tower_x402::channel::store::ChannelStore;
use tower_x402::channel::{self, AssetTransferMethod};
use tower_x402::{Asset, PaymentOption};

use tower_x402::primitives::{Address, B256, Bytes, U256, address};
use tower_x402::proto::batch::{
    BatchEvmPayload, ChannelConfig, Deposit, DepositAuthorization, Erc3009Authorization, Voucher,
};

/// The receiver authorizer of the channel tests (`tests/common/channel.rs`): anvil #5.
pub use crate::common::channel::authorizer;

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The chain of the tests (Base Sepolia's id, anvil's too).
pub const CHAIN: u64 = 84532;
/// The route's token (Base Sepolia USDC; the test USDC on anvil).
pub const TOKEN: Address = address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e");
/// The route's `payTo` (anvil #2).
pub const RECEIVER: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
/// The receiver authorizer's address (anvil #5).
pub const AUTHORIZER: Address = address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc");

/// A payer and its channel (payer = payer authorizer).
pub struct Payer {
    /// The payer's key.
    pub key: PrivateKeySigner,
    /// Its channel.
    pub config: ChannelConfig,
    /// The channel's id.
    pub id: B256,
}

impl Payer {
    pub fn new(salt: u8) -> Self {
        let key: PrivateKeySigner =
            "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"
                .parse()
                .expect("key");
        Self::with(key, salt, |_| {})
    }

    /// A channel whose config `edit` changed (its id recomputed: the config is consistent).
    pub fn with(key: PrivateKeySigner, salt: u8, edit: impl FnOnce(&mut ChannelConfig)) -> Self {
        let mut config = ChannelConfig {
            payer: key.address(),
            payer_authorizer: key.address(),
            receiver: RECEIVER,
            receiver_authorizer: AUTHORIZER,
            token: TOKEN,
            withdraw_delay: 900,
            salt: B256::repeat_byte(salt),
        };
        edit(&mut config);
        let id = channel::channel_id(CHAIN, &config);
        Payer { key, config, id }
    }

    pub fn sign(&self, digest: B256) -> Bytes {
        Bytes::from(
            self.key
                .sign_hash_sync(&digest)
                .expect("sign")
                .as_bytes()
                .to_vec(),
        )
    }

    pub fn voucher(&self, ceiling: u128) -> Voucher {
        let digest = channel::voucher_digest(CHAIN, self.id, U256::from(ceiling)).expect("u128");
        Voucher {
            channel_id: self.id,
            max_claimable_amount: U256::from(ceiling),
            signature: self.sign(digest),
        }
    }

    pub fn pay(&self, ceiling: u128) -> BatchEvmPayload {
        BatchEvmPayload::Voucher {
            channel_config: self.config.clone(),
            voucher: self.voucher(ceiling),
        }
    }

    pub fn deposit(&self, amount: u128, ceiling: u128) -> BatchEvmPayload {
        let salt = B256::repeat_byte(0x5a);
        let valid_before = U256::from(now() + 600);
        let digest = channel::receive_authorization_digest(
            &channel::token_domain(CHAIN, TOKEN, "USDC", "2"),
            self.config.payer,
            U256::from(amount),
            U256::ZERO,
            valid_before,
            channel::deposit_nonce(self.id, salt),
        );
        BatchEvmPayload::Deposit {
            channel_config: self.config.clone(),
            voucher: self.voucher(ceiling),
            deposit: Deposit {
                amount: U256::from(amount),
                authorization: DepositAuthorization {
                    erc3009_authorization: Some(Erc3009Authorization {
                        valid_after: U256::ZERO,
                        valid_before,
                        salt,
                        signature: self.sign(digest),
                    }),
                    permit2_authorization: None,
                },
            },
        }
    }
}

/// The route's `batch-settlement` option: [`PRICE`] per call at most, paid to [`RECEIVER`],
/// claims and refunds signed by [`AUTHORIZER`], EIP-3009 deposits.
pub fn option() -> PaymentOption {
    PaymentOption::batch_settlement(
        &Asset::usdc_base_sepolia(),
        U256::from(PRICE),
        RECEIVER,
        AUTHORIZER,
        900,
        AssetTransferMethod::Eip3009,
    )
    .expect("option")
}

/// What `store` records as charged on channel `id` (0 without a record).
pub async fn charged(store: &impl ChannelStore, id: B256) -> u128 {
    store
        .load(id)
        .await
        .expect("load")
        .map_or(0, |s| s.charged_cumulative)
}

/// The route's price (the per-call maximum).
pub const PRICE: u128 = 1_000;

#[cfg(feature = "onchain")]
pub use official::*;

#[cfg(feature = "onchain")]
mod official {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::routing::get;
    use serde_json::{Value, json};
    use tower_x402::PaymentLayer;
    use tower_x402::channel::serve::{Channels, Escrow};
    use tower_x402::channel::store::MemoryChannelStore;
    use tower_x402::primitives::B256;
    use tower_x402::upto::Usage;

    use super::{PRICE, authorizer};
    use crate::chain;

    /// Calls paid.
    pub const CALLS: u128 = 100;

    /// What the official client paid.
    pub struct OfficialRun {
        /// The sum charged over the calls.
        pub total: u128,
        /// The deposit.
        pub deposit: u128,
        /// Handler runs.
        pub runs: usize,
    }

    /// A paid `GET /paid` served with channels in memory, deposits and refunds through
    /// `escrow`. Metered: every third call charges 600 of the 1000 maximum, the others the
    /// full price. Returns its address and the handler-run counter.
    pub async fn metered_server<X: Escrow>(
        escrow: X,
    ) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let authorizer = authorizer();
        let option = super::option();
        let layer = PaymentLayer::builder()
            .accept(option)
            .channels(
                Channels::new(Arc::new(MemoryChannelStore::new()), escrow)
                    .with_authorizer(authorizer),
            )
            .build()
            .expect("layer");
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let app = axum::Router::new()
            .route(
                "/paid",
                get(move |req: axum::extract::Request| {
                    let runs = counted.clone();
                    async move {
                        let call = runs.fetch_add(1, Ordering::SeqCst);
                        if call % 3 == 2 {
                            let usage = req.extensions().get::<Usage>().expect("a meter");
                            usage.charge_atomic(600).expect("within the price");
                        }
                        "paid"
                    }
                }),
            )
            .layer(layer);
        let (addr, task) = crate::common::serve(app).await;
        (addr, runs, task)
    }

    /// The official client pays [`CALLS`] calls of `url` on chain `c` (payer: anvil's
    /// `PAYER3`): a first process pays 40 and forgets its channel (in-memory storage), a second
    /// one on the same channel meets the corrective 402, recovers, pays the other 60 and
    /// refunds. Checks every status, receipt, the refund and one handler run per call.
    pub fn official_client_pays_and_refunds(
        c: &chain::Chain,
        deps: &Path,
        addr: SocketAddr,
        runs: &AtomicUsize,
    ) -> OfficialRun {
        let run = |calls: u128, refund: &str| {
            let mut cmd = std::process::Command::new("node");
            cmd.arg(chain::process::repo().join("tests/clients/batch-pay.mjs"))
                .arg(chain::PAYER3_KEY)
                .arg(format!("http://{addr}/paid"))
                .arg(calls.to_string())
                .arg(c.url())
                .arg((CALLS + 10).to_string())
                .arg(B256::ZERO.to_string())
                .arg(refund)
                .env("X402_TEST_DEPS", deps);
            chain::process::run_json(&mut cmd, std::time::Duration::from_secs(300), || c.log())
        };
        let first = run(40, "no-refund");
        assert_eq!(first["error"], Value::Null, "{first}");
        assert_eq!(first["refusals"], json!([]), "{first}");
        let out = run(CALLS - 40, "refund");
        assert_eq!(out["error"], Value::Null, "{out}");
        assert_eq!(
            out["refusals"],
            json!(["invalid_batch_settlement_evm_cumulative_amount_mismatch"]),
            "the client without state met one corrective 402: {out}"
        );
        let both = |key: &str| -> Vec<Value> {
            let mut all = first[key].as_array().expect(key).clone();
            all.extend(out[key].as_array().expect(key).iter().cloned());
            all
        };
        let statuses = both("statuses");
        assert_eq!(statuses.len(), CALLS as usize, "{out}");
        assert!(statuses.iter().all(|s| s == &json!(200)), "{statuses:?}");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            CALLS as usize,
            "one handler run per call"
        );
        let charges: Vec<u128> = (0..CALLS)
            .map(|i| if i % 3 == 2 { 600 } else { PRICE })
            .collect();
        let total: u128 = charges.iter().sum();
        let receipts = both("receipts");
        let mut cumulative = 0;
        for (i, (r, charge)) in receipts.iter().zip(&charges).enumerate() {
            cumulative += charge;
            assert_eq!(r["success"], json!(true), "call {i}: {r}");
            assert_eq!(
                r["extra"]["chargedAmount"],
                json!(charge.to_string()),
                "call {i}"
            );
            assert_eq!(
                r["extra"]["channelState"]["chargedCumulativeAmount"],
                json!(cumulative.to_string()),
                "call {i}"
            );
            let tx = r["transaction"].as_str().expect("transaction");
            assert_eq!(
                i == 0,
                !tx.is_empty(),
                "call {i}: only the deposit has a transaction"
            );
        }
        let deposit = (CALLS + 10) * PRICE;
        assert_eq!(
            receipts[0]["extra"]["channelState"]["balance"],
            json!(deposit.to_string())
        );
        let refund = &out["refund"];
        assert_eq!(refund["success"], json!(true), "{refund}");
        assert!(
            !refund["transaction"].as_str().unwrap_or("").is_empty(),
            "{refund}"
        );
        assert_eq!(
            refund["amount"],
            json!((deposit - total).to_string()),
            "{refund}"
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            CALLS as usize,
            "the refund ran no handler"
        );
        OfficialRun {
            total,
            deposit,
            runs: runs.load(Ordering::SeqCst),
        }
    }
}
