//! Payment channels served by the `PaymentLayer` over HTTP (`PaymentLayerBuilder::channels`):
//! an axum server on loopback, payloads echoing the server's own 402 (bound challenges on),
//! deposits into a recording escrow (the real escrow on anvil, paid by the official client, is
//! `tests/channel_chain.rs`). A deposit then vouchers with their receipts; 64 concurrent
//! requests carrying one voucher run the handler once; a failed handler charges nothing and
//! the same voucher pays again; hostile payloads get a 402 with the reference's code (the
//! corrective 402 with the server's channel state for a cumulative mismatch), the handler not
//! run; a deposit that does not land is a 503, nothing run.
#![cfg(all(feature = "axum", feature = "test-util"))]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower_x402::channel::serve::{Channels, Escrow, EscrowError, Mirror};
use tower_x402::channel::store::{ChannelStore, MemoryChannelStore};
use tower_x402::channel::{self, AssetTransferMethod};
use tower_x402::primitives::{Address, B256, Bytes, U256, address};
use tower_x402::proto::batch::{
    BatchEvmPayload, ChannelConfig, Deposit, DepositAuthorization, Erc3009Authorization, Voucher,
};
use tower_x402::test_util::encode;
use tower_x402::{Asset, PaymentLayer, PaymentOption};

use common::{Hits, Reply, STATUS_HEADER, WireClient, app, client, serve, wire};

const PRICE: u128 = 1_000;
const DEPOSIT: u128 = 100_000;
const CHAIN: u64 = 84532;
const TOKEN: Address = address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e");
const RECEIVER: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
const AUTHORIZER: Address = address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc");
const DEPOSIT_TX: B256 = B256::repeat_byte(0xde);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// An escrow that records deposits and reports the balance they make; can be told to fail.
#[derive(Default)]
struct RecordingEscrow {
    deposits: AtomicUsize,
    balance: std::sync::Mutex<u128>,
    fail: AtomicBool,
}

#[async_trait]
impl Escrow for RecordingEscrow {
    async fn deposit(
        &self,
        _config: &ChannelConfig,
        _channel: B256,
        deposit: &Deposit,
    ) -> Result<Mirror, EscrowError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(EscrowError("injected: the deposit reverted".into()));
        }
        self.deposits.fetch_add(1, Ordering::SeqCst);
        let mut balance = self.balance.lock().expect("lock");
        *balance += u128::try_from(deposit.amount).expect("u128");
        Ok(Mirror {
            transaction: DEPOSIT_TX,
            balance: *balance,
            total_claimed: 0,
        })
    }

    async fn refund(
        &self,
        _config: &ChannelConfig,
        _channel: B256,
        _claim: Option<(channel::ChannelClaim, Bytes)>,
        _amount: u128,
        _nonce: U256,
        _signature: Bytes,
    ) -> Result<Mirror, EscrowError> {
        Err(EscrowError("no refunds in this test".into()))
    }
}

/// A payer and its channel (payer = payer authorizer).
struct Payer {
    key: PrivateKeySigner,
    config: ChannelConfig,
    id: B256,
}

impl Payer {
    fn new(salt: u8) -> Self {
        let key: PrivateKeySigner =
            "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"
                .parse()
                .expect("key");
        Self::with(key, salt, |_| {})
    }

    /// A channel whose config `edit` changed (its id recomputed: the config is consistent).
    fn with(key: PrivateKeySigner, salt: u8, edit: impl FnOnce(&mut ChannelConfig)) -> Self {
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

    fn sign(&self, digest: B256) -> Bytes {
        Bytes::from(
            self.key
                .sign_hash_sync(&digest)
                .expect("sign")
                .as_bytes()
                .to_vec(),
        )
    }

    fn voucher(&self, ceiling: u128) -> Voucher {
        let digest = channel::voucher_digest(CHAIN, self.id, U256::from(ceiling)).expect("u128");
        Voucher {
            channel_id: self.id,
            max_claimable_amount: U256::from(ceiling),
            signature: self.sign(digest),
        }
    }

    fn pay(&self, ceiling: u128) -> BatchEvmPayload {
        BatchEvmPayload::Voucher {
            channel_config: self.config.clone(),
            voucher: self.voucher(ceiling),
        }
    }

    fn deposit(&self, amount: u128, ceiling: u128) -> BatchEvmPayload {
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

struct Server {
    addr: SocketAddr,
    client: WireClient,
    hits: Hits,
    store: Arc<MemoryChannelStore>,
    escrow: Arc<RecordingEscrow>,
    /// `accepts[0]` of the server's 402, echoed by every payload (bound challenges).
    accepted: Value,
}

impl Server {
    async fn start(hits: Hits) -> Self {
        let store = Arc::new(MemoryChannelStore::new());
        let escrow = Arc::new(RecordingEscrow::default());
        Self::start_on(store, escrow, hits).await
    }

    /// A server (an instance) on `store` and `escrow`, which other instances may share.
    async fn start_on(
        store: Arc<MemoryChannelStore>,
        escrow: Arc<RecordingEscrow>,
        hits: Hits,
    ) -> Self {
        let option = PaymentOption::batch_settlement(
            &Asset::usdc_base_sepolia(),
            U256::from(PRICE),
            RECEIVER,
            AUTHORIZER,
            900,
            AssetTransferMethod::Eip3009,
        )
        .expect("option");
        let layer = PaymentLayer::builder()
            .accept(option)
            .channels(Channels::new(store.clone(), escrow.clone()))
            .build()
            .expect("layer");
        let (addr, _task) = serve(app(&hits).layer(layer)).await;
        let client = client();
        let challenge = wire(&client, addr, "/paid", []).await;
        assert_eq!(challenge.status, StatusCode::PAYMENT_REQUIRED);
        let required = challenge.challenge();
        let accepted = serde_json::to_value(&required.accepts[0]).expect("json");
        assert_eq!(accepted["scheme"], json!("batch-settlement"));
        Server {
            addr,
            client,
            hits,
            store,
            escrow,
            accepted,
        }
    }

    fn header(&self, payload: &BatchEvmPayload) -> (HeaderName, HeaderValue) {
        self.header_raw(serde_json::to_value(payload).expect("json"))
    }

    fn header_raw(&self, payload: Value) -> (HeaderName, HeaderValue) {
        let v = json!({ "x402Version": 2, "accepted": self.accepted, "payload": payload });
        (HeaderName::from_static("payment-signature"), encode(&v))
    }

    async fn send(&self, payload: &BatchEvmPayload) -> Reply {
        wire(&self.client, self.addr, "/paid", [self.header(payload)]).await
    }

    async fn charged(&self, id: B256) -> u128 {
        self.store
            .load(id)
            .await
            .expect("load")
            .map_or(0, |s| s.charged_cumulative)
    }
}

fn assert_refused(reply: &Reply, code: &str, what: &str) {
    assert_eq!(
        (reply.status, reply.reason().as_deref()),
        (StatusCode::PAYMENT_REQUIRED, Some(code)),
        "{what}"
    );
    assert!(reply.has_no_receipt(), "{what}: no receipt on a refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposit_then_vouchers_are_served_with_channel_receipts() {
    let s = Server::start(Hits::new()).await;
    let payer = Payer::new(1);

    let first = s.send(&payer.deposit(DEPOSIT, PRICE)).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let receipt = first.receipt();
    assert_eq!(receipt["success"], json!(true), "{receipt}");
    assert_eq!(receipt["transaction"], json!(DEPOSIT_TX.to_string()));
    assert_eq!(receipt["network"], json!("eip155:84532"));
    assert_eq!(
        receipt["payer"],
        json!(payer.config.payer.to_checksum(None))
    );
    assert_eq!(receipt["extra"]["chargedAmount"], json!("1000"));
    let state = &receipt["extra"]["channelState"];
    assert_eq!(state["channelId"], json!(payer.id.to_string()));
    assert_eq!(state["balance"], json!(DEPOSIT.to_string()));
    assert_eq!(state["chargedCumulativeAmount"], json!("1000"));

    for call in 2..=25u128 {
        let reply = s.send(&payer.pay(call * PRICE)).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "call {call}: {:?}",
            reply.body
        );
        let receipt = reply.receipt();
        assert_eq!(receipt["transaction"], json!(""), "voucher only: {receipt}");
        assert_eq!(receipt["extra"]["chargedAmount"], json!("1000"));
        assert_eq!(
            receipt["extra"]["channelState"]["chargedCumulativeAmount"],
            json!((call * PRICE).to_string())
        );
    }
    assert_eq!(s.hits.get(), 25);
    assert_eq!(s.charged(payer.id).await, 25 * PRICE);
    assert_eq!(s.escrow.deposits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_requests_carrying_one_voucher_run_the_handler_once() {
    // Two instances share the channel store: the first opens the channel, the second (its
    // handler held at a gate) meets the 64 copies.
    let first = Server::start(Hits::new()).await;
    let payer = Payer::new(2);
    let opened = first.send(&payer.deposit(DEPOSIT, PRICE)).await;
    assert_eq!(opened.status, StatusCode::OK);
    assert_eq!(first.hits.get(), 1);
    let gated =
        Arc::new(Server::start_on(first.store.clone(), first.escrow.clone(), Hits::gated()).await);
    let voucher = payer.pay(2 * PRICE);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (gated, voucher) = (gated.clone(), voucher.clone());
        tasks.spawn(async move { gated.send(&voucher).await });
    }
    let mut replies = Vec::new();
    while replies.len() < 63 {
        replies.push(tasks.join_next().await.expect("task").expect("join"));
    }
    gated.hits.open();
    replies.push(tasks.join_next().await.expect("task").expect("join"));
    let served = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(served, 1, "one copy served");
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_refused(r, "invalid_batch_settlement_evm_channel_busy", "a copy");
    }
    assert_eq!(gated.hits.get(), 1, "the handler ran once");
    assert_eq!(gated.charged(payer.id).await, 2 * PRICE, "charged once");
    // The voucher, once more after the race: spent (its ceiling is the charged amount now).
    let again = gated.send(&voucher).await;
    assert_refused(
        &again,
        "invalid_batch_settlement_evm_cumulative_amount_mismatch",
        "the same voucher later",
    );
    assert_eq!(gated.hits.get(), 1);
}
