//! Payment channels served by the `PaymentLayer` over HTTP (`PaymentLayerBuilder::channels`):
//! an axum server on loopback, payloads echoing the server's own 402 (bound challenges on),
//! deposits into a recording escrow (the real escrow on anvil, paid by the official client, is
//! `tests/channel_chain.rs`). A deposit then vouchers with their receipts; 64 concurrent
//! requests carrying one voucher run the handler once; a failed handler charges nothing and
//! the same voucher pays again; hostile payloads get a 402 with the reference's code (the
//! corrective 402 with the server's channel state for a cumulative mismatch), the handler not
//! run; a deposit that does not land is a 503, nothing run. On anvil (feature `onchain`): the
//! official `@x402/evm` client through `@x402/fetch` opens a channel (deposit through our
//! relayer), pays 100 metered calls with vouchers (a second client process that lost the
//! channel's state recovers through our corrective 402) and refunds; balances exact to the
//! unit.
#![cfg(all(feature = "axum", feature = "test-util"))]

#[cfg(feature = "onchain")]
mod chain;
#[path = "common/channel_fac.rs"]
mod channel_fac;
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower_x402::PaymentLayer;
use tower_x402::channel;
use tower_x402::channel::serve::Channels;
use tower_x402::channel::store::{ChannelStore, MemoryChannelStore};
use tower_x402::primitives::{Address, B256, Bytes, U256};
use tower_x402::proto::batch::BatchEvmPayload;
use tower_x402::test_util::encode;

use channel_fac::{CHAIN, Payer, now};
use common::channel::{DEPOSIT_TX, REFUND_TX, RecordingEscrow};
use common::{Hits, Reply, STATUS_HEADER, WireClient, app, client, serve, wire};

const PRICE: u128 = 1_000;
const DEPOSIT: u128 = 100_000;

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
        Self::start_on(store, escrow, hits, false).await
    }

    /// A server (an instance) on `store` and `escrow`, which other instances may share.
    async fn start_on(
        store: Arc<MemoryChannelStore>,
        escrow: Arc<RecordingEscrow>,
        hits: Hits,
        authorizer: bool,
    ) -> Self {
        let option = channel_fac::option();
        let layer = PaymentLayer::builder()
            .accept(option)
            .channels(if authorizer {
                Channels::new(store.clone(), escrow.clone())
                    .with_authorizer(channel_fac::authorizer())
            } else {
                Channels::new(store.clone(), escrow.clone())
            })
            .build()
            .expect("layer");
        // `/over` meters more than the price: the charge the voucher cannot cover.
        let over = hits.clone();
        let app = app(&hits).route(
            "/over",
            axum::routing::get(move |req: axum::extract::Request| {
                let over = over.clone();
                async move {
                    over.run(req.headers(), None).await;
                    let usage = req.extensions().get::<tower_x402::upto::Usage>().cloned();
                    let refused = usage.map(|u| u.charge_atomic(2 * PRICE as u64).is_err());
                    format!("overrun refused: {refused:?}")
                }
            }),
        );
        let (addr, _task) = serve(app.layer(layer)).await;
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

    /// `payload` to `path`, echoing that path's own 402.
    async fn send_to(&self, path: &str, payload: &BatchEvmPayload) -> Reply {
        let challenge = wire(&self.client, self.addr, path, []).await.challenge();
        let v = json!({ "x402Version": 2, "accepted": challenge.accepts[0], "payload": payload });
        let header = (HeaderName::from_static("payment-signature"), encode(&v));
        wire(&self.client, self.addr, path, [header]).await
    }

    async fn send(&self, payload: &BatchEvmPayload) -> Reply {
        wire(&self.client, self.addr, "/paid", [self.header(payload)]).await
    }

    async fn charged(&self, id: B256) -> u128 {
        channel_fac::charged(self.store.as_ref(), id).await
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
    let gated = Arc::new(
        Server::start_on(
            first.store.clone(),
            first.escrow.clone(),
            Hits::gated(),
            false,
        )
        .await,
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_payloads_get_the_reference_codes_and_run_nothing() {
    let s = Server::start(Hits::new()).await;
    let payer = Payer::new(3);
    assert_eq!(
        s.send(&payer.deposit(DEPOSIT, PRICE)).await.status,
        StatusCode::OK
    );
    assert_eq!(s.hits.get(), 1);
    let stranger: PrivateKeySigner =
        "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a"
            .parse()
            .expect("key");

    let mut cases: Vec<(&str, BatchEvmPayload, &str)> = Vec::new();
    // The config hashes to another id than the voucher names.
    let mut wrong_id = payer.pay(2 * PRICE);
    if let BatchEvmPayload::Voucher { channel_config, .. } = &mut wrong_id {
        channel_config.salt = B256::repeat_byte(0x77);
    }
    cases.push((
        "config of another channel",
        wrong_id,
        "invalid_batch_settlement_evm_channel_id_mismatch",
    ));
    // Signed by another key than the payer authorizer.
    let mut forged = payer.pay(2 * PRICE);
    if let BatchEvmPayload::Voucher { voucher, .. } = &mut forged {
        let digest = channel::voucher_digest(CHAIN, payer.id, U256::from(2 * PRICE)).expect("u128");
        voucher.signature = Bytes::from(
            stranger
                .sign_hash_sync(&digest)
                .expect("sign")
                .as_bytes()
                .to_vec(),
        );
    }
    cases.push((
        "voucher signed by a stranger",
        forged,
        "invalid_batch_settlement_evm_voucher_signature",
    ));
    cases.push((
        "receiver not ours",
        Payer::with(payer.key.clone(), 3, |c| {
            c.receiver = Address::repeat_byte(9)
        })
        .pay(PRICE),
        "invalid_batch_settlement_evm_receiver_mismatch",
    ));
    cases.push((
        "receiver authorizer not ours",
        Payer::with(payer.key.clone(), 3, |c| {
            c.receiver_authorizer = Address::repeat_byte(9)
        })
        .pay(PRICE),
        "invalid_batch_settlement_evm_receiver_authorizer_mismatch",
    ));
    cases.push((
        "token not the asset",
        Payer::with(payer.key.clone(), 3, |c| c.token = Address::repeat_byte(9)).pay(PRICE),
        "invalid_batch_settlement_evm_token_mismatch",
    ));
    cases.push((
        "another withdraw delay",
        Payer::with(payer.key.clone(), 3, |c| c.withdraw_delay = 1_000).pay(PRICE),
        "invalid_batch_settlement_evm_withdraw_delay_mismatch",
    ));
    cases.push((
        "a voucher on a channel with no deposit",
        Payer::new(4).pay(PRICE),
        "invalid_batch_settlement_evm_missing_channel",
    ));
    // A deposit whose token authorization the stranger signed.
    let mut bad_deposit = Payer::new(5).deposit(DEPOSIT, PRICE);
    if let BatchEvmPayload::Deposit { deposit, .. } = &mut bad_deposit
        && let Some(auth) = deposit.authorization.erc3009_authorization.as_mut()
    {
        auth.signature = Bytes::from(
            stranger
                .sign_hash_sync(&B256::repeat_byte(1))
                .expect("sign")
                .as_bytes()
                .to_vec(),
        );
    }
    cases.push((
        "deposit authorization signed by a stranger",
        bad_deposit,
        "invalid_batch_settlement_evm_receive_authorization_signature",
    ));
    let mut no_auth = Payer::new(6).deposit(DEPOSIT, PRICE);
    if let BatchEvmPayload::Deposit { deposit, .. } = &mut no_auth {
        deposit.authorization.erc3009_authorization = None;
    }
    cases.push((
        "deposit without an authorization",
        no_auth,
        "invalid_batch_settlement_evm_erc3009_authorization_required",
    ));
    cases.push((
        "a refund to a server without a receiver authorizer",
        BatchEvmPayload::Refund {
            channel_config: payer.config.clone(),
            voucher: payer.voucher(PRICE),
            amount: None,
        },
        "invalid_batch_settlement_evm_refund_payload",
    ));
    // A deposit authorization that expires before the deposit could be mined.
    let mut expiring = Payer::new(10).deposit(DEPOSIT, PRICE);
    if let BatchEvmPayload::Deposit { deposit, .. } = &mut expiring
        && let Some(auth) = deposit.authorization.erc3009_authorization.as_mut()
    {
        auth.valid_before = U256::from(now());
    }
    cases.push((
        "deposit authorization about to expire",
        expiring,
        "invalid_batch_settlement_evm_payload_authorization_valid_before",
    ));
    // A deposit too small for its own voucher.
    cases.push((
        "voucher above the deposit",
        Payer::new(11).deposit(PRICE / 2, PRICE),
        "invalid_batch_settlement_evm_cumulative_exceeds_balance",
    ));
    for (what, payload, code) in &cases {
        let reply = s.send(payload).await;
        assert_refused(&reply, code, what);
    }

    // Not JSON of the scheme at all.
    let junk = [
        (
            json!({ "type": "nonsense" }),
            "invalid_batch_settlement_evm_payload_type",
        ),
        (
            json!({ "type": "voucher", "channelConfig": 1 }),
            "invalid_batch_settlement_evm_voucher_payload",
        ),
        (
            json!({ "type": "deposit", "deposit": "all of it" }),
            "invalid_batch_settlement_evm_deposit_payload",
        ),
    ];
    for (payload, code) in junk {
        let reply = wire(&s.client, s.addr, "/paid", [s.header_raw(payload.clone())]).await;
        assert_refused(&reply, code, &payload.to_string());
    }
    assert_eq!(s.hits.get(), 1, "no hostile payload ran the handler");
    assert_eq!(
        s.escrow.deposits.load(Ordering::SeqCst),
        1,
        "no hostile deposit reached the escrow"
    );
    assert_eq!(s.charged(payer.id).await, PRICE, "nothing charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_voucher_below_the_charged_amount_gets_the_corrective_402() {
    let s = Server::start(Hits::new()).await;
    let payer = Payer::new(7);
    assert_eq!(
        s.send(&payer.deposit(DEPOSIT, PRICE)).await.status,
        StatusCode::OK
    );
    assert_eq!(s.send(&payer.pay(2 * PRICE)).await.status, StatusCode::OK);
    // A client that lost its state signs from zero again.
    let reply = s.send(&payer.pay(PRICE)).await;
    assert_refused(
        &reply,
        "invalid_batch_settlement_evm_cumulative_amount_mismatch",
        "stale voucher",
    );
    let required = reply.challenge();
    let extra = required.accepts[0].extra.as_ref().expect("extra");
    let state = &extra["channelState"];
    assert_eq!(state["channelId"], json!(payer.id.to_string()));
    assert_eq!(state["chargedCumulativeAmount"], json!("2000"));
    assert_eq!(state["balance"], json!(DEPOSIT.to_string()));
    let voucher = &extra["voucherState"];
    assert_eq!(voucher["signedMaxClaimable"], json!("2000"));
    assert_eq!(
        voucher["signature"],
        json!(payer.voucher(2 * PRICE).signature.to_string()),
        "the latest signed voucher, for the client to check against its key"
    );
    // Adopting the server's amount, the next voucher pays.
    assert_eq!(s.send(&payer.pay(3 * PRICE)).await.status, StatusCode::OK);
    assert_eq!(s.hits.get(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_handler_charges_nothing_and_the_same_voucher_pays_again() {
    let s = Server::start(Hits::new()).await;
    let payer = Payer::new(8);
    assert_eq!(
        s.send(&payer.deposit(DEPOSIT, PRICE)).await.status,
        StatusCode::OK
    );
    let voucher = payer.pay(2 * PRICE);
    let failing = (
        HeaderName::from_static(STATUS_HEADER),
        HeaderValue::from_static("500"),
    );
    let reply = wire(&s.client, s.addr, "/paid", [s.header(&voucher), failing]).await;
    assert_eq!(
        reply.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the handler's own answer"
    );
    assert!(reply.has_no_receipt(), "nothing charged, no receipt");
    assert_eq!(s.hits.get(), 2);
    assert_eq!(s.charged(payer.id).await, PRICE, "the charge is unchanged");
    let retried = s.send(&voucher).await;
    assert_eq!(retried.status, StatusCode::OK);
    assert_eq!(s.charged(payer.id).await, 2 * PRICE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposit_that_does_not_land_is_a_503_and_runs_nothing() {
    let s = Server::start(Hits::new()).await;
    let payer = Payer::new(9);
    s.escrow.fail.store(true, Ordering::SeqCst);
    let reply = s.send(&payer.deposit(DEPOSIT, PRICE)).await;
    assert_eq!(
        (reply.status, reply.reason().as_deref()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("service_unavailable"))
    );
    assert!(reply.header("retry-after").is_some());
    assert_eq!(s.hits.get(), 0, "the handler did not run");
    assert_eq!(s.charged(payer.id).await, 0);
    // The chain is back: the same payload opens the channel.
    s.escrow.fail.store(false, Ordering::SeqCst);
    assert_eq!(
        s.send(&payer.deposit(DEPOSIT, PRICE)).await.status,
        StatusCode::OK
    );
    assert_eq!(s.hits.get(), 1);
}

#[cfg(feature = "onchain")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_client_pays_100_calls_over_http_recovers_lost_state_and_refunds_exact_to_the_unit()
 {
    use tower_x402::settle::onchain::OnchainSettler;

    let test = "the_official_client_pays_100_calls_over_http";
    let Some(deps) = chain::process::test_deps(
        test,
        &[
            "node/node_modules/@x402/evm/package.json",
            "node/node_modules/@x402/fetch/package.json",
        ],
    ) else {
        return;
    };
    let Some(c) = chain::Chain::start(test).await else {
        return;
    };
    let payer: PrivateKeySigner = chain::PAYER3_KEY.parse().expect("key");
    let relayer: PrivateKeySigner = chain::RELAYER_KEY.parse().expect("key");
    let settler = OnchainSettler::connect(c.url(), relayer)
        .await
        .expect("settler");
    let (addr, runs, _task) = channel_fac::metered_server(settler.clone()).await;
    let receiver_before = c.balance(chain::PAY_TO).await;
    let payer_before = c.balance(payer.address()).await;
    let channel_fac::OfficialRun { total, deposit, .. } =
        channel_fac::official_client_pays_and_refunds(&c, &deps, addr, &runs);

    settler
        .settle_channels(chain::PAY_TO, chain::TOKEN)
        .await
        .expect("settle")
        .expect("owed");
    // Exact to the unit: the receiver got the charged sum, the payer everything else back.
    assert_eq!(
        c.balance(chain::PAY_TO).await - receiver_before,
        U256::from(total)
    );
    assert_eq!(
        payer_before - c.balance(payer.address()).await,
        U256::from(total)
    );
    assert_eq!(c.balance(chain::BATCH_SETTLEMENT).await, U256::ZERO);
    println!(
        "official client over HTTP: {} calls, {total} charged, {deposit} deposited",
        channel_fac::CALLS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_metering_above_the_price_gets_nothing_charged_and_no_body() {
    let s = Server::start(Hits::new()).await;
    let payer = Payer::new(12);
    assert_eq!(
        s.send(&payer.deposit(DEPOSIT, PRICE)).await.status,
        StatusCode::OK
    );
    let reply = s.send_to("/over", &payer.pay(2 * PRICE)).await;
    assert_refused(
        &reply,
        "invalid_batch_settlement_evm_charge_exceeds_signed_cumulative",
        "metered above the price",
    );
    assert!(
        !String::from_utf8_lossy(&reply.body).contains("overrun"),
        "the handler's body is withheld"
    );
    assert_eq!(s.hits.get(), 2, "the handler ran (and metered too much)");
    assert_eq!(s.charged(payer.id).await, PRICE, "nothing charged");
    // The same voucher pays on a route that stays within the price.
    assert_eq!(s.send(&payer.pay(2 * PRICE)).await.status, StatusCode::OK);
    assert_eq!(s.charged(payer.id).await, 2 * PRICE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cooperative_refund_over_http_runs_no_handler_and_refuses_what_is_not_refundable() {
    let s = Server::start_on(
        Arc::new(MemoryChannelStore::new()),
        Arc::new(RecordingEscrow::default()),
        Hits::new(),
        true,
    )
    .await;
    let refund = |p: &Payer, ceiling: u128, amount: Option<u128>| BatchEvmPayload::Refund {
        channel_config: p.config.clone(),
        voucher: p.voucher(ceiling),
        amount: amount.map(U256::from),
    };
    // A channel whose deposit is all charged: nothing to give back.
    let spent = Payer::new(13);
    assert_eq!(
        s.send(&spent.deposit(PRICE, PRICE)).await.status,
        StatusCode::OK
    );
    let reply = s.send(&refund(&spent, PRICE, None)).await;
    assert_refused(
        &reply,
        "invalid_batch_settlement_evm_refund_no_balance",
        "no balance",
    );

    let payer = Payer::new(14);
    assert_eq!(
        s.send(&payer.deposit(DEPOSIT, PRICE)).await.status,
        StatusCode::OK
    );
    let reply = s.send(&refund(&payer, PRICE, Some(DEPOSIT))).await;
    assert_refused(
        &reply,
        "invalid_batch_settlement_evm_refund_amount_invalid",
        "more than is refundable",
    );
    // A refund whose voucher charges (its ceiling is above the charged amount).
    let reply = s.send(&refund(&payer, 2 * PRICE, None)).await;
    assert_refused(
        &reply,
        "invalid_batch_settlement_evm_cumulative_amount_mismatch",
        "a refund with a charging voucher",
    );
    assert_eq!(s.escrow.refunds.load(Ordering::SeqCst), 0);

    let done = s.send(&refund(&payer, PRICE, None)).await;
    assert_eq!(done.status, StatusCode::OK, "{:?}", done.body);
    let receipt = done.receipt();
    assert_eq!(receipt["success"], json!(true), "{receipt}");
    assert_eq!(receipt["transaction"], json!(REFUND_TX.to_string()));
    assert_eq!(receipt["amount"], json!((DEPOSIT - PRICE).to_string()));
    assert_eq!(s.hits.get(), 2, "the refunds ran no handler");
    assert_eq!(s.escrow.refunds.load(Ordering::SeqCst), 1);
    assert!(
        s.store.load(payer.id).await.expect("load").is_none(),
        "a full refund deletes the record"
    );
}

#[test]
fn a_batch_settlement_option_without_channels_does_not_build() {
    let option = channel_fac::option();
    let built = PaymentLayer::builder().accept(option).build();
    assert!(
        matches!(built, Err(tower_x402::error::ConfigError::Contradictory(m)) if m.contains(".channels")),
        "{built:?}"
    );
}

/// Refuses every payment before verification.
struct Refuse;

#[async_trait]
impl tower_x402::hooks::PaymentHooks for Refuse {
    async fn before_verify(
        &self,
        _request: &tower_x402::hooks::PaymentRequest<'_>,
    ) -> Result<(), tower_x402::hooks::HookResponse> {
        let mut res = tower_x402::hooks::HookResponse::new(bytes::Bytes::from_static(b"no"));
        *res.status_mut() = StatusCode::FORBIDDEN;
        Err(res)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_before_verify_hook_refuses_a_channel_payment_before_the_engine() {
    let option = channel_fac::option();
    let escrow = Arc::new(RecordingEscrow::default());
    let layer = PaymentLayer::builder()
        .accept(option)
        .hook(Refuse)
        .channels(Channels::new(MemoryChannelStore::new(), escrow.clone()))
        .build()
        .expect("layer");
    let hits = Hits::new();
    let (addr, _task) = serve(app(&hits).layer(layer)).await;
    let client = client();
    let challenge = wire(&client, addr, "/paid", []).await.challenge();
    let v = json!({
        "x402Version": 2,
        "accepted": challenge.accepts[0],
        "payload": Payer::new(15).deposit(DEPOSIT, PRICE),
    });
    let header = (HeaderName::from_static("payment-signature"), encode(&v));
    let reply = wire(&client, addr, "/paid", [header]).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(hits.get(), 0);
    assert_eq!(escrow.deposits.load(Ordering::SeqCst), 0, "no deposit sent");
}
