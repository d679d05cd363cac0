//! Our `PayingLayer` paying `batch-settlement` channels (`PayingLayer::channels`): against our
//! axum server (`PaymentLayerBuilder::channels`) on anvil with the escrow at its canonical
//! addresses (one deposit, 100 vouchers, a metered handler, a cooperative refund, balances
//! exact to the unit), against our server on a recording escrow (lost client state recovered
//! through the corrective 402 with no double charge, partial then full refunds, 16 concurrent
//! calls on one channel serialized with one deposit, the deposit cap and the budget), against
//! a hostile stub (a corrective 402 or a receipt charging more than the client signed: refused,
//! nothing signed above the client's record), and against the reference `@x402/express`
//! batch-settlement seller (`tests/clients/reference-server.mjs`: one deposit, vouchers, its
//! claim and settle, a refund; balances exact to the unit).
#![cfg(all(
    feature = "axum",
    feature = "client",
    feature = "onchain",
    feature = "test-util"
))]

mod chain;
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::routing::get;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tower::{Layer, Service, ServiceExt};
use tower_x402::body::ResponseBody;
use tower_x402::channel::serve::{Channels, Escrow};
use tower_x402::channel::store::{ChannelStore, MemoryChannelStore};
use tower_x402::channel::{self, AssetTransferMethod};
use tower_x402::client::{
    Budget, ChannelError, ChannelPolicy, Error, MemoryChannelBook, Paying, PayingLayer,
    PaymentOutcome, PaymentReport, Policy,
};
use tower_x402::primitives::{Address, B256, U256, address};
use tower_x402::test_util::{PrivateKeySigner, encode};
use tower_x402::upto::Usage;
use tower_x402::{Asset, PaymentLayer, PaymentOption};

use common::channel::{RecordingEscrow, authorizer};
use common::paying::Counting;
use common::serve;

const PRICE: u128 = 1_000;
const RECEIVER: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
const CHAIN: u64 = 84532;

type Http = Client<HttpConnector, Full<Bytes>>;
type Payer<Sg> = Paying<Http, Sg>;
type Answer = Response<ResponseBody<hyper::body::Incoming>>;

fn option() -> PaymentOption {
    PaymentOption::batch_settlement(
        &Asset::usdc_base_sepolia(),
        U256::from(PRICE),
        RECEIVER,
        authorizer().address(),
        900,
        AssetTransferMethod::Eip3009,
    )
    .expect("option")
}

/// Our server on `escrow`: `/paid` charges the price, `/metered` every third call 600 of it.
/// Returns its address and the handler runs.
async fn server<X: Escrow>(
    store: Arc<MemoryChannelStore>,
    escrow: X,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let layer = PaymentLayer::builder()
        .accept(option())
        .channels(Channels::new(store, escrow).with_authorizer(authorizer()))
        .build()
        .expect("layer");
    let runs = Arc::new(AtomicUsize::new(0));
    let (paid, metered) = (runs.clone(), runs.clone());
    let app = axum::Router::new()
        .route(
            "/paid",
            get(move || {
                paid.fetch_add(1, Ordering::SeqCst);
                async { "paid" }
            }),
        )
        .route(
            "/metered",
            get(move |req: axum::extract::Request| {
                let runs = metered.clone();
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) % 3 == 2 {
                        let usage = req.extensions().get::<Usage>().expect("a meter");
                        usage.charge_atomic(600).expect("within the price");
                    }
                    "metered"
                }
            }),
        )
        .layer(layer);
    let (addr, _task) = serve(app).await;
    (addr, runs)
}

fn policy() -> Policy {
    Policy::new(U256::from(PRICE)).allow_asset(&Asset::usdc_base_sepolia())
}

fn payer<Sg: alloy_signer::Signer + Send + Sync + 'static>(
    signer: Sg,
    policy: Policy,
    channels: ChannelPolicy,
) -> Payer<Sg> {
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    PayingLayer::new(signer, policy)
        .channels(channels)
        .layer(http)
}

fn get_req(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .expect("request")
}

async fn call<Sg>(client: &mut Payer<Sg>, addr: SocketAddr, path: &str) -> Result<Answer, Error>
where
    Sg: alloy_signer::Signer + Send + Sync + 'static,
{
    client
        .ready()
        .await
        .expect("ready")
        .call(get_req(addr, path))
        .await
}

/// The key of the channel with our server's receiver in test USDC.
fn channel_key() -> tower_x402::client::ChannelKey {
    tower_x402::client::ChannelKey {
        network: tower_x402::Network::BASE_SEPOLIA,
        receiver: RECEIVER,
        token: Asset::usdc_base_sepolia().address,
    }
}

fn report(res: &Answer) -> PaymentReport {
    res.extensions()
        .get::<PaymentReport>()
        .cloned()
        .expect("a payment report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn our_client_pays_100_calls_with_one_deposit_follows_metered_charges_and_refunds_exact_to_the_unit()
 {
    use tower_x402::settle::onchain::OnchainSettler;

    let Some(c) = chain::Chain::start("our_client_pays_100_calls_with_one_deposit").await else {
        return;
    };
    const CALLS: u128 = 100;
    let relayer: PrivateKeySigner = chain::RELAYER_KEY.parse().expect("key");
    let settler = OnchainSettler::connect(c.url(), relayer)
        .await
        .expect("settler");
    let store = Arc::new(MemoryChannelStore::new());
    let (addr, runs) = server(store.clone(), settler.clone()).await;
    let signer: PrivateKeySigner = chain::PAYER4_KEY.parse().expect("key");
    let payer_address = signer.address();
    let budget = Budget::new(U256::from(1_000 * PRICE));
    let deposit = (CALLS + 10) * PRICE;
    let book = MemoryChannelBook::new();
    let mut client = payer(
        signer,
        policy().budget(budget.clone()),
        ChannelPolicy::new(U256::from(deposit))
            .deposit_multiplier(u32::try_from(CALLS + 10).expect("small"))
            .book(book.clone()),
    );
    let receiver_before = c.balance(RECEIVER).await;
    let payer_before = c.balance(payer_address).await;

    let mut charged = 0u128;
    let mut deposits = 0;
    for i in 0..CALLS {
        let res = call(&mut client, addr, "/metered").await.expect("paid");
        assert_eq!(res.status(), StatusCode::OK, "call {i}");
        let r = report(&res);
        assert_eq!(r.outcome, PaymentOutcome::Settled, "call {i}");
        let ch = r.channel.clone().expect("a channel payment");
        // The voucher builds on what the server charged so far (600 on every third call).
        assert_eq!(ch.ceiling, U256::from(charged + PRICE), "call {i}");
        let expected = if i % 3 == 2 { 600 } else { PRICE };
        assert_eq!(ch.charged, Some(U256::from(expected)), "call {i}");
        assert_eq!(r.amount(), U256::from(expected), "call {i}");
        charged += expected;
        if let Some(d) = ch.deposit {
            assert_eq!(
                d,
                U256::from(deposit),
                "call {i}: the whole deposit at once"
            );
            deposits += 1;
        }
        assert_eq!(
            ch.deposit.is_some(),
            i == 0,
            "call {i}: one deposit, on the first call"
        );
    }
    assert_eq!(deposits, 1);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        CALLS as usize,
        "one handler run per call"
    );
    assert_eq!(
        budget.spent(),
        U256::from(charged),
        "the budget keeps what was charged"
    );
    let channel_id = report(&call(&mut client, addr, "/paid").await.expect("paid"))
        .channel
        .expect("channel")
        .channel_id;
    charged += PRICE;
    assert_eq!(
        store
            .load(channel_id)
            .await
            .expect("load")
            .expect("state")
            .charged_cumulative,
        charged
    );
    assert_eq!(
        c.balance(chain::BATCH_SETTLEMENT).await,
        U256::from(deposit),
        "one deposit in the escrow"
    );

    let refund = client
        .refund_channel(get_req(addr, "/paid"), None)
        .await
        .expect("refund");
    assert_eq!(refund.amount, U256::from(deposit - charged));
    assert!(refund.transaction.is_some(), "{refund:?}");
    assert_eq!(refund.record, None, "a full refund deletes the record");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        CALLS as usize + 1,
        "the refund ran no handler"
    );
    // Nothing left to refund: refused before anything is signed or sent.
    let again = client.refund_channel(get_req(addr, "/paid"), None).await;
    assert!(
        matches!(again, Err(Error::Channel(ChannelError::NoChannel))),
        "{again:?}"
    );

    settler
        .settle_channels(RECEIVER, chain::TOKEN)
        .await
        .expect("settle")
        .expect("owed");
    assert_eq!(
        c.balance(RECEIVER).await - receiver_before,
        U256::from(charged)
    );
    assert_eq!(
        payer_before - c.balance(payer_address).await,
        U256::from(charged)
    );
    assert_eq!(c.balance(chain::BATCH_SETTLEMENT).await, U256::ZERO);
    println!(
        "our client: {} calls, {charged} charged, {deposit} deposited",
        CALLS + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_lost_its_state_recovers_through_the_corrective_402_without_double_charge() {
    let store = Arc::new(MemoryChannelStore::new());
    let escrow = Arc::new(RecordingEscrow::default());
    let (addr, runs) = server(store.clone(), escrow.clone()).await;
    let signer = Counting::new();
    let channels = || ChannelPolicy::new(U256::from(50 * PRICE)).deposit_multiplier(50);
    let mut first = payer(signer.clone(), policy(), channels());
    for _ in 0..3 {
        let res = call(&mut first, addr, "/paid").await.expect("paid");
        assert_eq!(res.status(), StatusCode::OK);
    }
    // A new process: same key, same salt, no record.
    let budget = Budget::new(U256::from(10 * PRICE));
    let mut second = payer(signer.clone(), policy().budget(budget.clone()), channels());
    let res = call(&mut second, addr, "/paid").await.expect("paid");
    assert_eq!(res.status(), StatusCode::OK);
    let r = report(&res);
    assert_eq!(r.outcome, PaymentOutcome::Settled);
    let ch = r.channel.expect("channel");
    assert_eq!(
        ch.ceiling,
        U256::from(4 * PRICE),
        "built on the server's 3 charges"
    );
    assert_eq!(
        ch.deposit, None,
        "no second deposit: the server's balance covers it"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4, "one run per paid call");
    assert_eq!(escrow.deposits.load(Ordering::SeqCst), 1);
    let state = store
        .load(ch.channel_id)
        .await
        .expect("load")
        .expect("state");
    assert_eq!(state.charged_cumulative, 4 * PRICE, "no double charge");
    assert_eq!(
        budget.spent(),
        U256::from(PRICE),
        "the refused voucher is not counted"
    );
    // And it goes on with vouchers.
    let res = call(&mut second, addr, "/paid").await.expect("paid");
    assert_eq!(
        report(&res).channel.expect("channel").ceiling,
        U256::from(5 * PRICE)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 5);

    // A partial refund, then the rest: the record follows the receipts.
    let partial = second
        .refund_channel(get_req(addr, "/paid"), Some(U256::from(PRICE)))
        .await
        .expect("partial refund");
    assert_eq!(partial.amount, U256::from(PRICE));
    let record = partial.record.expect("still open");
    assert_eq!((record.balance, record.charged), (49 * PRICE, 5 * PRICE));
    let rest = second
        .refund_channel(get_req(addr, "/paid"), None)
        .await
        .expect("refund");
    assert_eq!(rest.amount, U256::from(44 * PRICE));
    assert_eq!(rest.record, None);
    assert_eq!(escrow.refunds.load(Ordering::SeqCst), 2);
    assert_eq!(runs.load(Ordering::SeqCst), 5, "refunds run no handler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_after_a_lost_receipt_recovers_through_the_corrective_402() {
    use tower_x402::client::ChannelBook;

    let store = Arc::new(MemoryChannelStore::new());
    let escrow = Arc::new(RecordingEscrow::default());
    let (addr, runs) = server(store, escrow.clone()).await;
    let book = MemoryChannelBook::new();
    let mut client = payer(
        Counting::new(),
        policy(),
        ChannelPolicy::new(U256::from(10 * PRICE))
            .deposit_multiplier(10)
            .book(book.clone()),
    );
    for _ in 0..3 {
        let res = call(&mut client, addr, "/paid").await.expect("paid");
        assert_eq!(res.status(), StatusCode::OK);
    }
    // The last receipt is lost: the record is one price behind what was charged (and signed).
    let key = channel_key();
    let mut record = book.load(&key).expect("record");
    assert_eq!((record.charged, record.signed_max), (3 * PRICE, 3 * PRICE));
    record.charged = 2 * PRICE;
    book.save(&key, Some(record));
    let refund = client
        .refund_channel(get_req(addr, "/paid"), None)
        .await
        .expect("refund after the corrective 402");
    assert_eq!(
        refund.amount,
        U256::from(7 * PRICE),
        "charged 3, refunded the other 7"
    );
    assert_eq!(refund.record, None);
    assert_eq!(escrow.refunds.load(Ordering::SeqCst), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_on_one_channel_are_serialized_one_deposit_one_run_each() {
    let store = Arc::new(MemoryChannelStore::new());
    let escrow = Arc::new(RecordingEscrow::default());
    let (addr, runs) = server(store, escrow.clone()).await;
    let client = payer(
        Counting::new(),
        policy(),
        ChannelPolicy::new(U256::from(100 * PRICE)).deposit_multiplier(100),
    );
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { call(&mut client, addr, "/paid").await })
        })
        .collect();
    let mut ceilings = Vec::new();
    for c in calls {
        let res = c.await.expect("task").expect("paid");
        assert_eq!(res.status(), StatusCode::OK);
        ceilings.push(report(&res).channel.expect("channel").ceiling);
    }
    ceilings.sort();
    let expected: Vec<U256> = (1..=16u128).map(|n| U256::from(n * PRICE)).collect();
    assert_eq!(
        ceilings, expected,
        "each voucher builds on the previous receipt"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 16);
    assert_eq!(escrow.deposits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deposit_cap_and_the_budget_refuse_before_signing() {
    let store = Arc::new(MemoryChannelStore::new());
    let escrow = Arc::new(RecordingEscrow::default());
    let (addr, runs) = server(store, escrow.clone()).await;

    // A cap below the price: the first voucher cannot be funded.
    let signer = Counting::new();
    let mut capped = payer(
        signer.clone(),
        policy(),
        ChannelPolicy::new(U256::from(PRICE / 2)),
    );
    let err = call(&mut capped, addr, "/paid").await.expect_err("refused");
    assert!(
        matches!(
            err,
            Error::Channel(ChannelError::DepositCap { needed, cap })
                if needed == U256::from(PRICE) && cap == U256::from(PRICE / 2)
        ),
        "{err:?}"
    );
    assert!(err.is_refused());
    assert_eq!(signer.signatures(), 0, "nothing signed");

    // A budget of two calls: the deposit is clamped to it (not 5 × the price), two calls pay,
    // the third is refused before signing.
    let signer = Counting::new();
    let budget = Budget::new(U256::from(2 * PRICE));
    let mut budgeted = payer(
        signer.clone(),
        policy().budget(budget.clone()),
        ChannelPolicy::new(U256::from(100 * PRICE)),
    );
    let first = call(&mut budgeted, addr, "/paid").await.expect("paid");
    assert_eq!(
        report(&first).channel.expect("channel").deposit,
        Some(U256::from(2 * PRICE))
    );
    assert_eq!(
        call(&mut budgeted, addr, "/paid")
            .await
            .expect("paid")
            .status(),
        StatusCode::OK
    );
    let signed = signer.signatures();
    let err = call(&mut budgeted, addr, "/paid")
        .await
        .expect_err("refused");
    assert!(err.is_budget_exceeded(), "{err:?}");
    assert_eq!(signer.signatures(), signed, "nothing signed");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(escrow.deposits.load(Ordering::SeqCst), 1);
}

/// How the hostile stub answers a paid request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hostile {
    /// A receipt whose `chargedAmount` is 5 × the price.
    OverchargingReceipt,
    /// The first call is served honestly; then a corrective 402 claiming 10 × the price
    /// charged, backed by nothing the client signed.
    CorrectiveAboveRecord,
    /// A corrective 402 showing the client's own voucher but claiming more than it.
    CorrectiveAboveVoucher,
    /// A corrective 402 with a voucher signed by another key.
    CorrectiveForeignSignature,
}

struct Stub {
    addr: SocketAddr,
    /// Every voucher ceiling the client sent.
    ceilings: Arc<Mutex<Vec<u128>>>,
}

/// A server that answers with `mode` (a small axum app, no payment layer).
async fn hostile(mode: Hostile) -> Stub {
    let ceilings = Arc::new(Mutex::new(Vec::new()));
    let seen = ceilings.clone();
    let stranger = PrivateKeySigner::random();
    let app = axum::Router::new().route(
        "/paid",
        get(move |req: axum::extract::Request| {
            let seen = seen.clone();
            let stranger = stranger.clone();
            async move {
                let requirements = serde_json::to_value(option().requirements()).expect("json");
                let Some(sig) = req.headers().get("payment-signature") else {
                    return challenge(json!({ "accepts": [requirements] }));
                };
                let proof: Value = serde_json::from_slice(
                    &tower_x402::proto::header::decode_bytes(sig, 64 * 1024).expect("base64"),
                )
                .expect("json");
                let payload = &proof["payload"];
                let voucher = &payload["voucher"];
                let ceiling: u128 = voucher["maxClaimableAmount"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .expect("ceiling");
                let n = {
                    let mut s = seen.lock().expect("lock");
                    s.push(ceiling);
                    s.len()
                };
                let channel_id = voucher["channelId"].clone();
                let state = |charged: u128| {
                    json!({
                        "channelId": channel_id, "balance": (100 * PRICE).to_string(),
                        "totalClaimed": "0", "withdrawRequestedAt": 0, "refundNonce": "0",
                        "chargedCumulativeAmount": charged.to_string(),
                    })
                };
                let receipt = |charged: u128, cumulative: u128| {
                    let r = json!({
                        "success": true, "transaction": "", "network": "eip155:84532",
                        "amount": charged.to_string(),
                        "extra": { "chargedAmount": charged.to_string(),
                                   "channelState": state(cumulative) },
                    });
                    axum::response::Response::builder()
                        .header("payment-response", encode(&r))
                        .body(axum::body::Body::from("served"))
                        .expect("response")
                };
                let corrective = |charged: u128, signed: u128, signature: Value| {
                    let mut req = requirements.clone();
                    req["extra"]["channelState"] = state(charged);
                    req["extra"]["voucherState"] = json!({
                        "signedMaxClaimable": signed.to_string(), "signature": signature,
                    });
                    challenge(json!({
                        "error": "invalid_batch_settlement_evm_cumulative_amount_mismatch",
                        "accepts": [req],
                    }))
                };
                match mode {
                    Hostile::OverchargingReceipt => receipt(5 * PRICE, ceiling + 4 * PRICE),
                    Hostile::CorrectiveAboveRecord if n == 1 => receipt(PRICE, PRICE),
                    Hostile::CorrectiveAboveRecord => {
                        corrective(10 * PRICE, 10 * PRICE, voucher["signature"].clone())
                    }
                    Hostile::CorrectiveAboveVoucher => {
                        corrective(ceiling + PRICE, ceiling, voucher["signature"].clone())
                    }
                    Hostile::CorrectiveForeignSignature => {
                        let id: B256 = channel_id.as_str().expect("id").parse().expect("id");
                        let digest = channel::voucher_digest(CHAIN, id, U256::from(10 * PRICE))
                            .expect("u128");
                        use alloy_signer::SignerSync;
                        let sig = stranger.sign_hash_sync(&digest).expect("sign");
                        let hex = format!("0x{}", alloy_primitives::hex::encode(sig.as_bytes()));
                        corrective(10 * PRICE, 10 * PRICE, json!(hex))
                    }
                }
            }
        }),
    );
    let (addr, _task) = serve(app).await;
    Stub { addr, ceilings }
}

fn challenge(mut body: Value) -> axum::response::Response {
    body["x402Version"] = json!(2);
    body["resource"] = json!({ "url": "http://stub/paid" });
    axum::response::Response::builder()
        .status(StatusCode::PAYMENT_REQUIRED)
        .header("payment-required", encode(&body))
        .body(axum::body::Body::empty())
        .expect("response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_server_cannot_make_the_client_sign_above_its_record() {
    // A receipt charging above the price: the client counts at most the voucher's increment,
    // reports the receipt refused, and its next voucher stays one price above that.
    let stub = hostile(Hostile::OverchargingReceipt).await;
    let budget = Budget::new(U256::from(100 * PRICE));
    let mut client = payer(
        Counting::new(),
        policy().budget(budget.clone()),
        ChannelPolicy::new(U256::from(10 * PRICE)),
    );
    let res = call(&mut client, stub.addr, "/paid").await.expect("answer");
    let r = report(&res);
    assert!(
        matches!(r.outcome, PaymentOutcome::Refused { .. }),
        "{:?}",
        r.outcome
    );
    assert_eq!(r.channel.expect("channel").charged, None);
    call(&mut client, stub.addr, "/paid").await.expect("answer");
    assert_eq!(*stub.ceilings.lock().expect("lock"), vec![PRICE, 2 * PRICE]);
    assert_eq!(
        budget.spent(),
        U256::from(2 * PRICE),
        "the budget counts the vouchers"
    );

    for mode in [
        Hostile::CorrectiveAboveRecord,
        Hostile::CorrectiveAboveVoucher,
        Hostile::CorrectiveForeignSignature,
    ] {
        let stub = hostile(mode).await;
        let signer = Counting::new();
        let book = MemoryChannelBook::new();
        let mut client = payer(
            signer.clone(),
            policy(),
            ChannelPolicy::new(U256::from(10 * PRICE))
                .salt(B256::repeat_byte(7))
                .book(book.clone()),
        );
        let calls = if mode == Hostile::CorrectiveAboveRecord {
            2
        } else {
            1
        };
        let mut last = None;
        for _ in 0..calls {
            last = Some(call(&mut client, stub.addr, "/paid").await.expect("answer"));
        }
        let res = last.expect("answered");
        assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED, "{mode:?}");
        let r = report(&res);
        assert_eq!(
            r.outcome,
            PaymentOutcome::Refused {
                reason: Some("invalid_batch_settlement_evm_cumulative_amount_mismatch".into())
            },
            "{mode:?}"
        );
        // One voucher per call, none re-signed on the server's word.
        let sent = stub.ceilings.lock().expect("lock").clone();
        let expected: Vec<u128> = (1..=calls).map(|n| n * PRICE).collect();
        assert_eq!(sent, expected, "{mode:?}");
        let key = channel_key();
        use tower_x402::client::ChannelBook;
        let record = book.load(&key).expect("record");
        assert_eq!(record.signed_max, calls * PRICE, "{mode:?}");
        assert_eq!(record.charged, (calls - 1) * PRICE, "{mode:?}: not adopted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn our_client_pays_the_reference_batch_settlement_seller_with_one_deposit() {
    use http_body_util::BodyExt;

    let test = "our_client_pays_the_reference_batch_settlement_seller";
    let Some(deps) =
        chain::process::test_deps(test, &["node/node_modules/@x402/express/package.json"])
    else {
        return;
    };
    let Some(c) = chain::Chain::start(test).await else {
        return;
    };
    let mut cmd = std::process::Command::new("node");
    cmd.arg(chain::process::repo().join("tests/clients/reference-server.mjs"))
        .args(["--rpc", c.url(), "--pay-to", &RECEIVER.to_checksum(None)])
        .env("X402_TEST_DEPS", &deps);
    let (seller, line) = chain::process::Server::start(
        "reference-server.mjs",
        &mut cmd,
        std::time::Duration::from_secs(60),
    );
    let urls: Value = serde_json::from_str(&line).expect("a JSON line");
    let base = urls["channel"]
        .as_str()
        .expect("the channel seller")
        .to_owned();
    const CALLS: u128 = 5;
    let deposit = 2 * CALLS * PRICE;
    let signer: PrivateKeySigner = chain::PAYER4_KEY.parse().expect("key");
    let payer_address = signer.address();
    let budget = Budget::new(U256::from(100 * PRICE));
    let mut client = payer(
        signer,
        policy().budget(budget.clone()),
        ChannelPolicy::new(U256::from(deposit)).deposit_multiplier(2 * CALLS as u32),
    );
    let (receiver_before, payer_before) =
        (c.balance(RECEIVER).await, c.balance(payer_address).await);
    let url = format!("{base}/channel");
    for i in 0..CALLS {
        let res = client
            .ready()
            .await
            .expect("ready")
            .call(Request::get(&url).body(Full::default()).expect("request"))
            .await
            .expect("paid");
        assert_eq!(res.status(), StatusCode::OK, "call {i}\n{}", seller.log());
        let r = report(&res);
        assert_eq!(r.outcome, PaymentOutcome::Settled, "call {i}: {r:?}");
        let ch = r.channel.expect("a channel payment");
        assert_eq!(ch.ceiling, U256::from((i + 1) * PRICE), "call {i}");
        assert_eq!(ch.charged, Some(U256::from(PRICE)), "call {i}");
        assert_eq!(ch.deposit.is_some(), i == 0, "call {i}: one deposit");
    }
    assert_eq!(budget.spent(), U256::from(CALLS * PRICE));
    assert_eq!(
        c.balance(chain::BATCH_SETTLEMENT).await,
        U256::from(deposit)
    );
    assert_eq!(
        payer_before - c.balance(payer_address).await,
        U256::from(deposit)
    );

    // The reference seller claims the latest voucher and settles it to the receiver.
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let res = http
        .request(
            Request::post(format!("{base}/claim-and-settle"))
                .body(Full::default())
                .expect("request"),
        )
        .await
        .expect("claim");
    let status = res.status();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        status,
        StatusCode::OK,
        "{}\n{}",
        String::from_utf8_lossy(&body),
        seller.log()
    );
    assert_eq!(
        c.balance(RECEIVER).await - receiver_before,
        U256::from(CALLS * PRICE),
        "the receiver got exactly the vouchers: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        c.balance(chain::BATCH_SETTLEMENT).await,
        U256::from(deposit - CALLS * PRICE)
    );
    // The cooperative refund through the reference seller: the payer gets the rest back.
    let refund = client
        .refund_channel(
            Request::get(&url).body(Full::default()).expect("request"),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("refund: {e:?}\n{}", seller.log()));
    assert_eq!(refund.amount, U256::from(deposit - CALLS * PRICE));
    assert_eq!(refund.record, None);
    assert_eq!(c.balance(chain::BATCH_SETTLEMENT).await, U256::ZERO);
    assert_eq!(
        payer_before - c.balance(payer_address).await,
        U256::from(CALLS * PRICE),
        "exact to the unit"
    );
}
