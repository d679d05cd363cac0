//! Solana `exact` (issue #20): the challenge offering EVM and Solana side by side, the
//! in-process verifier against a table of hostile transactions (each refused with the
//! reference's code, the handler never run), one proof one handler run under concurrency.
//!
//! Every proof here is built against the server's own 402 (`PAYMENT-REQUIRED`, the accepted
//! entry with its bound challenge), as the official client does.

#![cfg(all(feature = "svm", feature = "axum", feature = "test-util"))]

mod common;
#[path = "svm/tx.rs"]
mod tx;

use axum::Router;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower_x402::nonce::MemoryNonceStore;
use tower_x402::proto::svm::Pubkey;
use tower_x402::svm::{Keypair, SvmAsset, SvmVerifier, program};
use tower_x402::verify::EvmVerifier;
use tower_x402::{Network, PaymentLayer, PaymentOption};

use common::{Hits, NOW, Reply, clock, get_with};
use tx::{Ix, Payment, meta};

const AMOUNT: u64 = 1000;

fn fee_payer() -> Keypair {
    Keypair::from_seed([1; 32])
}

fn payer() -> Keypair {
    Keypair::from_seed([2; 32])
}

fn pay_to() -> Pubkey {
    Keypair::from_seed([3; 32]).pubkey()
}

fn svm_option() -> PaymentOption {
    PaymentOption::exact_svm(
        &SvmAsset::usdc_devnet(),
        "$0.001",
        pay_to(),
        fee_payer().pubkey(),
    )
    .expect("valid option")
}

fn verifier() -> SvmVerifier {
    SvmVerifier::new([fee_payer().pubkey()])
        .with_clock(clock())
        .with_evm(EvmVerifier::new().with_clock(clock()))
}

/// `/paid` offering `$0.001` USDC on Base Sepolia and on Solana devnet; challenges bound.
fn app(hits: &Hits, verifier: SvmVerifier) -> Router {
    let layer = PaymentLayer::builder()
        .accept(common::option())
        .accept(svm_option())
        .verifier(verifier)
        .nonce_store(MemoryNonceStore::with_capacity_and_clock(10_000, clock()))
        .build()
        .expect("valid layer");
    common::app(hits).layer(layer)
}

/// The official client's payment for the devnet USDC requirement.
fn payment() -> Payment {
    Payment {
        fee_payer: fee_payer().pubkey(),
        payer: payer(),
        mint: program::USDC_DEVNET,
        pay_to: pay_to(),
        amount: AMOUNT,
        decimals: 6,
        blockhash: [7; 32],
    }
}

/// The Solana entry of the route's 402.
async fn offered(app: &Router) -> Value {
    let r = get_with(app, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    let raw = r.header("payment-required").expect("challenge");
    let challenge: Value = serde_json::from_slice(&STANDARD.decode(raw).unwrap()).unwrap();
    challenge["accepts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["network"] == json!(Network::SOLANA_DEVNET.caip2()))
        .expect("a Solana option")
        .clone()
}

/// A `PAYMENT-SIGNATURE` carrying `payload` for `accepted`.
fn header(accepted: &Value, payload: Value) -> (HeaderName, HeaderValue) {
    let proof = json!({
        "x402Version": 2,
        "resource": {"url": format!("{}/paid", common::BASE)},
        "accepted": accepted,
        "payload": payload,
    });
    (
        HeaderName::from_static("payment-signature"),
        HeaderValue::from_str(&STANDARD.encode(proof.to_string())).unwrap(),
    )
}

fn transaction(bytes: &[u8]) -> Value {
    json!({ "transaction": STANDARD.encode(bytes) })
}

async fn pay(app: &Router, accepted: &Value, bytes: &[u8]) -> Reply {
    get_with(app, "/paid", [header(accepted, transaction(bytes))]).await
}

#[tokio::test]
async fn one_route_offers_evm_and_solana_side_by_side() {
    // Unbound here only to compare the entries byte for byte with what the reference server
    // sends (a bound challenge adds `extra.challenge`, checked in the other tests).
    let layer = PaymentLayer::builder()
        .accept(common::option())
        .accept(svm_option())
        .no_challenge_binding()
        .verifier(verifier())
        .build()
        .unwrap();
    let app = common::app(&Hits::new()).layer(layer);
    let r = get_with(&app, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    let raw = STANDARD
        .decode(r.header("payment-required").unwrap())
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let challenge: Value = serde_json::from_str(&text).unwrap();
    let accepts = challenge["accepts"].as_array().unwrap();
    assert_eq!(accepts.len(), 2, "{challenge}");
    assert_eq!(accepts[0]["network"], json!("eip155:84532"));
    let fee_payer = fee_payer().pubkey().to_string();
    // The reference server's entry: `extra` is `{feePayer}`, the key order its own.
    let expected = format!(
        r#"{{"scheme":"exact","network":"solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1","amount":"1000","asset":"4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU","payTo":"{}","maxTimeoutSeconds":300,"extra":{{"feePayer":"{fee_payer}"}}}}"#,
        pay_to()
    );
    assert!(text.contains(&format!(",{expected}]")), "{text}");
    // The v1 body lists it with the v1 network name.
    let v1 = r.json();
    assert_eq!(v1["accepts"][1]["network"], json!("solana-devnet"), "{v1}");
    assert_eq!(v1["accepts"][1]["payTo"], json!(pay_to().to_string()));
}

#[tokio::test]
async fn a_solana_payment_runs_the_handler_once_and_its_replay_is_refused() {
    let hits = Hits::new();
    let app = app(&hits, verifier());
    let accepted = offered(&app).await;
    let bytes = payment().transaction();

    let r = pay(&app, &accepted, &bytes).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert_eq!(hits.get(), 1);
    assert_eq!(r.json()["amount"], json!("1000"));

    let again = pay(&app, &accepted, &bytes).await;
    assert_eq!(
        again.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("duplicate_settlement".into())
        )
    );
    // The same message under another client signature is the same transaction on chain.
    let mut other_sig = bytes.clone();
    other_sig[65 + 10] ^= 1;
    let r = pay(&app, &accepted, &other_sig).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn the_legacy_message_and_lighthouse_instructions_are_accepted() {
    let hits = Hits::new();
    let app = app(&hits, verifier());
    let accepted = offered(&app).await;
    let p = payment();
    let mut legacy = p.message(p.instructions());
    legacy.v0 = false;
    assert_eq!(
        pay(&app, &accepted, &p.signed(&legacy)).await.status,
        StatusCode::OK
    );

    let mut ixs = p.instructions();
    let lighthouse = Ix {
        program: program::LIGHTHOUSE,
        accounts: vec![],
        data: vec![1, 2, 3],
    };
    ixs.extend([lighthouse.clone(), lighthouse.clone(), lighthouse]);
    assert_eq!(ixs.len(), 7);
    let r = pay(&app, &accepted, &p.signed(&p.message(ixs))).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert_eq!(hits.get(), 2);
}

/// A hostile transaction and the code the reference facilitator refuses it with.
struct Case {
    what: &'static str,
    bytes: Vec<u8>,
    reason: &'static str,
}

fn case(what: &'static str, reason: &'static str, bytes: Vec<u8>) -> Case {
    Case {
        what,
        bytes,
        reason,
    }
}

/// The official layout with instruction `i` replaced.
fn with_ix(i: usize, ix: Ix) -> Vec<u8> {
    let p = payment();
    let mut ixs = p.instructions();
    ixs[i] = ix;
    p.signed(&p.message(ixs))
}

fn with_ixs(edit: impl FnOnce(&mut Vec<Ix>)) -> Vec<u8> {
    let p = payment();
    let mut ixs = p.instructions();
    edit(&mut ixs);
    p.signed(&p.message(ixs))
}

fn hostile() -> Vec<Case> {
    let p = payment();
    let payer = p.payer.pubkey();
    let fee = fee_payer().pubkey();
    let usdc = program::USDC_DEVNET;
    let transfer = |mint, to, amount| tx::transfer(program::TOKEN, mint, payer, to, amount, 6);
    let system = Ix {
        program: program::SYSTEM,
        accounts: vec![meta(payer, true, true)],
        data: vec![2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
    };
    let other_mint = Keypair::from_seed([9; 32]).pubkey();
    let stranger = Keypair::from_seed([8; 32]);
    let mut cases = vec![
        case(
            "wrong mint",
            "invalid_exact_svm_payload_mint_mismatch",
            with_ix(2, transfer(other_mint, pay_to(), AMOUNT)),
        ),
        case(
            "wrong destination (another owner's account)",
            "invalid_exact_svm_payload_recipient_mismatch",
            with_ix(2, transfer(usdc, stranger.pubkey(), AMOUNT)),
        ),
        case(
            "destination is payTo itself, not its token account",
            "invalid_exact_svm_payload_recipient_mismatch",
            with_ix(
                2,
                tx::transfer_raw(program::TOKEN, payer, usdc, pay_to(), payer, AMOUNT, 6),
            ),
        ),
        case(
            "Token-2022 transfer to the SPL Token account",
            "invalid_exact_svm_payload_recipient_mismatch",
            with_ix(2, {
                let mut ix = transfer(usdc, pay_to(), AMOUNT);
                ix.program = program::TOKEN_2022;
                ix
            }),
        ),
        case(
            "amount one more",
            "invalid_exact_svm_payload_amount_mismatch",
            with_ix(2, transfer(usdc, pay_to(), AMOUNT + 1)),
        ),
        case(
            "amount one less",
            "invalid_exact_svm_payload_amount_mismatch",
            with_ix(2, transfer(usdc, pay_to(), AMOUNT - 1)),
        ),
        case(
            "plain Transfer (unchecked) in place of TransferChecked",
            "invalid_exact_svm_payload_no_transfer_instruction",
            with_ix(2, {
                let mut ix = transfer(usdc, pay_to(), AMOUNT);
                ix.data = ix.data[..9].to_vec();
                ix.data[0] = 3;
                ix
            }),
        ),
        case(
            "transfer by an unknown program",
            "invalid_exact_svm_payload_no_transfer_instruction",
            with_ix(2, {
                let mut ix = transfer(usdc, pay_to(), AMOUNT);
                ix.program = other_mint;
                ix
            }),
        ),
        case(
            "extra system transfer as 4th instruction",
            "invalid_exact_svm_payload_unknown_fourth_instruction",
            with_ix(3, system.clone()),
        ),
        case(
            "extra instruction as 5th",
            "invalid_exact_svm_payload_unknown_fifth_instruction",
            with_ixs(|ixs| ixs.push(system.clone())),
        ),
        case(
            "duplicated transfer",
            "invalid_exact_svm_payload_unknown_fourth_instruction",
            with_ixs(|ixs| ixs.insert(3, transfer(usdc, pay_to(), AMOUNT))),
        ),
        case(
            "8 instructions",
            "invalid_exact_svm_payload_transaction_instructions_length",
            with_ixs(|ixs| {
                for _ in 0..4 {
                    ixs.push(tx::memo(b"m"));
                }
            }),
        ),
        case(
            "transfer alone",
            "invalid_exact_svm_payload_transaction_instructions_length",
            with_ixs(|ixs| {
                ixs.drain(..2);
                ixs.pop();
            }),
        ),
        case(
            "compute budget instructions swapped",
            "invalid_exact_svm_payload_transaction_instructions_compute_limit_instruction",
            with_ixs(|ixs| ixs.swap(0, 1)),
        ),
        case(
            "compute price instruction truncated",
            "invalid_exact_svm_payload_transaction_instructions_compute_price_instruction",
            with_ix(1, {
                let mut ix = tx::compute_price(1);
                ix.data.pop();
                ix
            }),
        ),
        case(
            "compute price above 5 lamports per unit",
            "invalid_exact_svm_payload_transaction_instructions_compute_price_instruction_too_high",
            with_ix(1, tx::compute_price(5_000_001)),
        ),
        case(
            "compute limit above the configured cap",
            "invalid_exact_svm_payload_transaction_instructions_compute_limit_instruction_too_high",
            with_ix(0, tx::compute_limit(1_400_000)),
        ),
        case(
            "fee payer as the transfer's authority",
            "invalid_exact_svm_payload_transaction_fee_payer_transferring_funds",
            with_ix(
                2,
                tx::transfer(program::TOKEN, usdc, fee, pay_to(), AMOUNT, 6),
            ),
        ),
        case(
            "fee payer as the transfer's source account",
            "invalid_exact_svm_smart_wallet_fee_payer_not_isolated",
            with_ix(2, {
                let dest = tower_x402::svm::ata::associated_token_address(
                    &pay_to(),
                    &usdc,
                    &program::TOKEN,
                );
                tx::transfer_raw(program::TOKEN, fee, usdc, dest, payer, AMOUNT, 6)
            }),
        ),
        case(
            "fee payer signs the memo",
            "invalid_exact_svm_smart_wallet_fee_payer_not_isolated",
            with_ix(
                3,
                Ix {
                    program: program::MEMO,
                    accounts: vec![meta(fee, true, false)],
                    data: b"x".to_vec(),
                },
            ),
        ),
        case(
            "a third required signer",
            "invalid_exact_svm_payload_excessive_signers",
            {
                let ixs = {
                    let mut ixs = p.instructions();
                    ixs[3].accounts.push(meta(stranger.pubkey(), true, false));
                    ixs
                };
                let (msg, keys) = p.message(ixs).compile();
                tx::sign(&msg, &keys, &[&p.payer, &stranger])
            },
        ),
        case(
            "payer signature flipped",
            "invalid_exact_svm_payload_signature_invalid",
            {
                let mut b = p.transaction();
                b[1 + 64 + 5] ^= 0x40;
                b
            },
        ),
        case(
            "signed by another key",
            "invalid_exact_svm_payload_signature_invalid",
            {
                let (msg, keys) = p.message(p.instructions()).compile();
                let mut b = tx::sign(&msg, &keys, &[]);
                b[1 + 64..1 + 128].copy_from_slice(&stranger.sign(&msg));
                b
            },
        ),
        case(
            "another fee payer in the transaction",
            "invalid_exact_svm_fee_payer_mismatch",
            {
                let mut m = p.message(p.instructions());
                m.fee_payer = stranger.pubkey();
                let (msg, keys) = m.compile();
                tx::sign(&msg, &keys, &[&p.payer, &stranger])
            },
        ),
        case(
            "address lookup table",
            "invalid_exact_svm_smart_wallet_alt_resolution_not_available",
            {
                let mut m = p.message(p.instructions());
                m.lookup_tables = vec![other_mint];
                p.signed(&m)
            },
        ),
        case(
            "legacy message paying one less",
            "invalid_exact_svm_payload_amount_mismatch",
            {
                let mut ixs = p.instructions();
                ixs[2] = transfer(usdc, pay_to(), AMOUNT - 1);
                let mut m = p.message(ixs);
                m.v0 = false;
                p.signed(&m)
            },
        ),
        case(
            "oversized transaction (a 1,200-byte memo)",
            "invalid_exact_svm_payload_transaction_could_not_be_decoded",
            with_ix(3, tx::memo(&[b'a'; 1200])),
        ),
        case(
            "truncated transaction",
            "invalid_exact_svm_payload_transaction_could_not_be_decoded",
            {
                let mut b = p.transaction();
                b.pop();
                b
            },
        ),
        case(
            "trailing byte",
            "invalid_exact_svm_payload_transaction_could_not_be_decoded",
            {
                let mut b = p.transaction();
                b.push(0);
                b
            },
        ),
        case(
            "message version 1",
            "invalid_exact_svm_payload_transaction_could_not_be_decoded",
            {
                let mut b = p.transaction();
                b[1 + 128] = 0x81;
                b
            },
        ),
    ];
    // The fee payer's signature slot holds garbage, not a signature: not checked (it is ours
    // to fill), so it is not a refusal; the transfer of another mint still is.
    let mut b = with_ix(2, transfer(other_mint, pay_to(), AMOUNT));
    b[1..65].fill(0xee);
    cases.push(case(
        "wrong mint, fee payer slot filled",
        "invalid_exact_svm_payload_mint_mismatch",
        b,
    ));
    cases
}

#[tokio::test]
async fn hostile_transactions_are_refused_with_the_reference_code_and_never_served() {
    let hits = Hits::new();
    let app = app(&hits, verifier().with_max_compute_units(200_000));
    let accepted = offered(&app).await;
    let cases = hostile();
    assert!(cases.len() >= 25, "{}", cases.len());
    for c in &cases {
        let r = pay(&app, &accepted, &c.bytes).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some(c.reason.into())),
            "{}",
            c.what
        );
    }
    // Payloads that are not a transaction at all: the reference's decode refusal, or 400.
    let r = get_with(
        &app,
        "/paid",
        [header(&accepted, json!({"transaction": "@@@"}))],
    )
    .await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_svm_payload_transaction_could_not_be_decoded".into())
        )
    );
    let r = get_with(&app, "/paid", [header(&accepted, json!({"tx": "AA=="}))]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::BAD_REQUEST, Some("invalid_payload".into()))
    );
    assert_eq!(hits.get(), 0, "a hostile transaction ran the handler");
    // And the honest payment still goes through after all that.
    let r = pay(&app, &accepted, &payment().transaction()).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn a_fee_payer_not_ours_is_refused() {
    // The route offers a fee payer the verifier does not sign for (a misconfiguration, or a
    // facilitator's key): refused before the transaction is even read.
    let hits = Hits::new();
    let app = app(
        &hits,
        SvmVerifier::new([Keypair::from_seed([5; 32]).pubkey()]),
    );
    let accepted = offered(&app).await;
    let r = pay(&app, &accepted, &payment().transaction()).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_svm_fee_payer_not_managed_by_facilitator".into())
        )
    );
    assert_eq!(hits.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_copies_of_one_proof_run_the_handler_once() {
    let hits = Hits::gated();
    let app = app(&hits, verifier());
    let accepted = offered(&app).await;
    let bytes = payment().transaction();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let app = app.clone();
        let proof = header(&accepted, transaction(&bytes));
        tasks.push(tokio::spawn(async move {
            get_with(&app, "/paid", [proof]).await.status
        }));
    }
    // Let every copy reach the layer while the winner's handler waits at the gate.
    while hits.get() == 0 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    hits.open();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            s => assert_eq!(s, StatusCode::PAYMENT_REQUIRED),
        }
    }
    assert_eq!((ok, hits.get()), (1, 1));
    let _ = NOW;
}

#[tokio::test]
async fn a_v1_proof_on_the_v1_network_name_pays_once() {
    let hits = Hits::new();
    let app = app(&hits, verifier());
    let proof = json!({
        "x402Version": 1,
        "scheme": "exact",
        "network": "solana-devnet",
        "payload": transaction(&payment().transaction()),
    });
    let header = (
        HeaderName::from_static("x-payment"),
        HeaderValue::from_str(&STANDARD.encode(proof.to_string())).unwrap(),
    );
    let r = get_with(&app, "/paid", [header.clone()]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.outcome());
    assert!(r.header("x-payment-response").is_some());
    let again = get_with(&app, "/paid", [header]).await;
    assert_eq!(again.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(hits.get(), 1);
}
