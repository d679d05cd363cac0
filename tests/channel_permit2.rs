//! Payment channels funded by Permit2 deposits (`assetTransferMethod: "permit2"`).
//!
//! Without services: the OFFICIAL `@x402/evm` 2.27.0 client's permit2 deposits
//! (`tests/clients/batch-vectors.mjs --permit2`, committed output
//! `tests/data/batch-permit2-vectors.json`) decode byte for byte and verify in-process (the
//! Permit2 witness signature by ECDSA recovery, spender, token, amount, witness, deadline), and
//! each tampered field gets the reference's code. On anvil (feature `onchain`): the official
//! client through `@x402/fetch` (the payer approved Permit2 first) opens a channel on our
//! server with a Permit2 deposit, submitted by our relayer through our own
//! `Permit2DepositCollector` at the canonical address, pays calls with vouchers and refunds;
//! balances exact to the unit. Hostile permit2 deposits (and an honest one from a payer who
//! never approved Permit2) get a 402 with the reference's code, the handler not run and
//! nothing sent on chain.
#![cfg(all(feature = "axum", feature = "test-util"))]

#[cfg(feature = "onchain")]
mod chain;
mod common;

use serde_json::Value;
use tower_x402::channel::{self, verify};
use tower_x402::primitives::{B256, U256};
use tower_x402::proto::batch::{BatchEvmPayload, ChannelConfig, Erc3009Authorization};
use tower_x402::proto::v2::PaymentRequirements;

fn vectors(name: &str) -> Value {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("read vectors")).expect("json")
}

/// The permit of a deposit payload, to edit.
fn permit_of(
    payload: &mut BatchEvmPayload,
) -> &mut tower_x402::proto::batch::Permit2DepositAuthorization {
    let BatchEvmPayload::Deposit { deposit, .. } = payload else {
        panic!("not a deposit");
    };
    deposit
        .authorization
        .permit2_authorization
        .as_deref_mut()
        .expect("permit2")
}

/// A change to a signed payload.
type Edit<'a> = dyn Fn(&mut BatchEvmPayload) + 'a;

#[test]
fn official_permit2_deposits_decode_hash_verify_and_each_tampered_field_is_refused() {
    use verify::BatchError as E;
    let v = vectors("batch-permit2-vectors.json");
    let cases = v["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let what = case["description"].as_str().expect("description");
        let req: PaymentRequirements =
            serde_json::from_value(case["requirements"].clone()).expect("requirements");
        let terms = verify::ChannelTerms::from_requirements(&req).expect("terms");
        assert_eq!(
            terms.asset_transfer_method,
            channel::AssetTransferMethod::Permit2
        );
        let config: ChannelConfig =
            serde_json::from_value(case["channelConfig"].clone()).expect("config");
        let id: B256 = case["channelId"]
            .as_str()
            .expect("id")
            .parse()
            .expect("b256");
        assert_eq!(channel::channel_id(84532, &config), id, "{what}");

        // The client's payload decodes and re-encodes to the same JSON.
        let raw = &case["deposit"]["payload"];
        let payload = verify::parse_raw(&raw.to_string()).expect("deposit payload");
        assert_eq!(
            serde_json::to_value(&payload).expect("encode"),
            *raw,
            "{what}"
        );
        let mut p = payload.clone();
        let permit = permit_of(&mut p).clone();
        assert_eq!(permit.spender, channel::PERMIT2_DEPOSIT_COLLECTOR);
        assert_eq!(permit.witness.channel_id, id);
        let deadline = u64::try_from(permit.deadline).expect("u64");
        let now = deadline - 3600;
        let authentic = verify::authenticate(&terms, &payload, now).expect("official deposit");
        assert_eq!(
            authentic.deposit.map(U256::from),
            Some(permit.permitted.amount)
        );
        let accepted = verify::verify(&terms, &payload, None, now).expect("first request");
        assert_eq!(
            accepted.max_charge(),
            u128::try_from(req.amount).expect("u128")
        );

        // Each field changed after signing: the reference's code, in its order.
        let tampered = |edit: &Edit<'_>| {
            let mut p = payload.clone();
            edit(&mut p);
            verify::authenticate(&terms, &p, now).map(|_| ())
        };
        let cases: [(&str, &Edit<'_>, E); 8] = [
            (
                "spender",
                &|p| permit_of(p).spender = channel::ERC3009_DEPOSIT_COLLECTOR,
                E::Permit2InvalidSpender,
            ),
            (
                "owner",
                &|p| permit_of(p).from = config.receiver,
                E::Permit2InvalidSignature,
            ),
            (
                "token",
                &|p| permit_of(p).permitted.token = config.receiver,
                E::TokenMismatch,
            ),
            (
                "permit amount",
                &|p| permit_of(p).permitted.amount += U256::from(1),
                E::Permit2AmountMismatch,
            ),
            (
                "witness",
                &|p| permit_of(p).witness.channel_id = B256::repeat_byte(7),
                E::ChannelIdMismatch,
            ),
            (
                "nonce",
                &|p| permit_of(p).nonce += U256::from(1),
                E::Permit2InvalidSignature,
            ),
            (
                "deadline",
                &|p| permit_of(p).deadline -= U256::from(1),
                E::Permit2InvalidSignature,
            ),
            (
                "both amounts",
                &|p| {
                    let BatchEvmPayload::Deposit { deposit, .. } = p else {
                        unreachable!()
                    };
                    deposit.amount += U256::from(1);
                    permit_of(p).permitted.amount += U256::from(1);
                },
                E::Permit2InvalidSignature,
            ),
        ];
        for (field, edit, want) in cases {
            assert_eq!(tampered(edit), Err(want), "{what}: {field}");
        }
        assert_eq!(
            verify::authenticate(&terms, &payload, deadline - 5),
            Err(E::Permit2DeadlineExpired),
            "{what}: within the mining margin"
        );

        // A second, unverified authorization riding along is refused.
        let mut both = payload.clone();
        if let BatchEvmPayload::Deposit { deposit, .. } = &mut both {
            deposit.authorization.erc3009_authorization = Some(Erc3009Authorization {
                valid_after: U256::ZERO,
                valid_before: U256::from(deadline),
                salt: B256::ZERO,
                signature: vec![0x11; 65].into(),
            });
        }
        assert_eq!(
            verify::authenticate(&terms, &both, now),
            Err(E::DepositPayload),
            "{what}: two authorizations"
        );

        // A permit2 deposit on an eip3009 requirement, and the other way round.
        let mut eip3009 = req.clone();
        if let Some(e) = eip3009.extra.as_mut() {
            e.insert("assetTransferMethod".into(), "eip3009".into());
        }
        let eip3009 = verify::ChannelTerms::from_requirements(&eip3009).expect("terms");
        assert_eq!(
            verify::authenticate(&eip3009, &payload, now),
            Err(E::Erc3009AuthorizationRequired)
        );
    }
    let other = vectors("batch-vectors.json");
    let eip3009_payload =
        verify::parse_raw(&other["cases"][0]["deposit"]["payload"].to_string()).expect("payload");
    let req: PaymentRequirements =
        serde_json::from_value(cases[0]["requirements"].clone()).expect("requirements");
    let terms = verify::ChannelTerms::from_requirements(&req).expect("terms");
    assert_eq!(
        verify::authenticate(&terms, &eip3009_payload, 1_700_000_000),
        Err(E::PayloadType),
        "an EIP-3009 deposit where permit2 is asked for"
    );
}

#[cfg(feature = "onchain")]
mod on_chain {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    use alloy_provider::Provider;
    use alloy_signer::SignerSync;
    use alloy_signer_local::PrivateKeySigner;
    use axum::routing::get;
    use http::{HeaderName, StatusCode};
    use serde_json::{Value, json};
    use tower_x402::channel::serve::Channels;
    use tower_x402::channel::store::MemoryChannelStore;
    use tower_x402::channel::{self, AssetTransferMethod, verify};
    use tower_x402::primitives::{B256, Bytes, U256};
    use tower_x402::proto::batch::{
        BatchEvmPayload, ChannelConfig, Deposit, DepositAuthorization, DepositWitness,
        Erc3009Authorization, Permit2DepositAuthorization, Voucher,
    };
    use tower_x402::proto::upto::TokenPermissions;
    use tower_x402::settle::onchain::OnchainSettler;
    use tower_x402::test_util::encode;
    use tower_x402::{Asset, PaymentLayer, PaymentOption};

    use super::{chain, common};

    const PRICE: u128 = 1_000;
    const CHAIN_ID: u64 = 84532;
    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    /// Our server on `c`: a permit2 batch-settlement route whose handler counts its runs,
    /// deposits through our relayer.
    async fn server(c: &chain::Chain) -> (SocketAddr, OnchainSettler, Arc<AtomicUsize>) {
        let authorizer = common::channel::authorizer();
        let relayer: PrivateKeySigner = chain::RELAYER_KEY.parse().expect("key");
        let option = PaymentOption::batch_settlement(
            &Asset::usdc_base_sepolia(),
            U256::from(PRICE),
            chain::PAY_TO,
            authorizer.address(),
            900,
            AssetTransferMethod::Permit2,
        )
        .expect("option");
        assert_eq!(
            option.requirements().extra.as_ref().expect("extra")["assetTransferMethod"],
            json!("permit2")
        );
        let settler = OnchainSettler::connect(c.url(), relayer)
            .await
            .expect("settler");
        let layer = PaymentLayer::builder()
            .accept(option)
            .channels(
                Channels::new(Arc::new(MemoryChannelStore::new()), settler.clone())
                    .with_authorizer(authorizer),
            )
            .build()
            .expect("layer");
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let app = axum::Router::new()
            .route(
                "/paid",
                get(move || {
                    let runs = counted.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        "paid"
                    }
                }),
            )
            .layer(layer);
        let (addr, _task) = common::serve(app).await;
        (addr, settler, runs)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_official_client_opens_a_permit2_channel_pays_vouchers_and_refunds_exact_to_the_unit()
     {
        let test = "the_official_client_opens_a_permit2_channel";
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
        const CALLS: u128 = 20;
        const MULTIPLIER: u128 = 30;
        let payer: PrivateKeySigner = chain::PAYER3_KEY.parse().expect("key");
        // The official client signs a Permit2 permit: the payer approved Permit2 beforehand.
        c.approve_permit2(payer.address()).await;
        let (addr, settler, runs) = server(&c).await;
        let receiver_before = c.balance(chain::PAY_TO).await;
        let payer_before = c.balance(payer.address()).await;

        let mut cmd = std::process::Command::new("node");
        cmd.arg(chain::process::repo().join("tests/clients/batch-pay.mjs"))
            .arg(chain::PAYER3_KEY)
            .arg(format!("http://{addr}/paid"))
            .arg(CALLS.to_string())
            .arg(c.url())
            .arg(MULTIPLIER.to_string())
            .arg(B256::ZERO.to_string())
            .arg("refund")
            .env("X402_TEST_DEPS", &deps);
        let out =
            chain::process::run_json(&mut cmd, std::time::Duration::from_secs(300), || c.log());
        assert_eq!(out["error"], Value::Null, "{out}");
        assert_eq!(out["refusals"], json!([]), "{out}");
        let statuses = out["statuses"].as_array().expect("statuses");
        assert_eq!(statuses.len(), CALLS as usize, "{out}");
        assert!(statuses.iter().all(|s| s == &json!(200)), "{statuses:?}");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            CALLS as usize,
            "one run per call"
        );
        let receipts = out["receipts"].as_array().expect("receipts");
        for (i, r) in receipts.iter().enumerate() {
            assert_eq!(r["success"], json!(true), "call {i}: {r}");
            assert_eq!(
                r["extra"]["channelState"]["chargedCumulativeAmount"],
                json!(((i as u128 + 1) * PRICE).to_string()),
                "call {i}"
            );
            let tx = r["transaction"].as_str().expect("transaction");
            assert_eq!(i == 0, !tx.is_empty(), "call {i}: only the deposit has one");
        }
        let deposit = MULTIPLIER * PRICE;
        assert_eq!(
            receipts[0]["extra"]["channelState"]["balance"],
            json!(deposit.to_string())
        );
        let total = CALLS * PRICE;
        let refund = &out["refund"];
        assert_eq!(refund["success"], json!(true), "{refund}");
        assert_eq!(refund["amount"], json!((deposit - total).to_string()));
        assert_eq!(
            runs.load(Ordering::SeqCst),
            CALLS as usize,
            "refund ran nothing"
        );

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
        assert_eq!(
            c.balance(chain::PERMIT2_DEPOSIT_COLLECTOR).await,
            U256::ZERO
        );
    }

    /// A payer of the permit2 route that signs in Rust.
    struct Payer {
        key: PrivateKeySigner,
        config: ChannelConfig,
        id: B256,
    }

    impl Payer {
        fn new(key: &str) -> Self {
            let key: PrivateKeySigner = key.parse().expect("key");
            let authorizer = common::channel::authorizer();
            let config = ChannelConfig {
                payer: key.address(),
                payer_authorizer: key.address(),
                receiver: chain::PAY_TO,
                receiver_authorizer: authorizer.address(),
                token: chain::TOKEN,
                withdraw_delay: 900,
                salt: B256::repeat_byte(0x2a),
            };
            let id = channel::channel_id(CHAIN_ID, &config);
            Payer { key, config, id }
        }

        fn sign_with(key: &PrivateKeySigner, digest: B256) -> Bytes {
            Bytes::from(
                key.sign_hash_sync(&digest)
                    .expect("sign")
                    .as_bytes()
                    .to_vec(),
            )
        }

        /// A deposit of `amount` with the first voucher; `edit` changes the permit before the
        /// payer signs it, `signer` signs it (the payer when `None`).
        fn deposit(
            &self,
            amount: u128,
            edit: impl FnOnce(&mut Permit2DepositAuthorization),
            signer: Option<&PrivateKeySigner>,
        ) -> BatchEvmPayload {
            let mut permit = Permit2DepositAuthorization {
                from: self.config.payer,
                permitted: TokenPermissions {
                    token: chain::TOKEN,
                    amount: U256::from(amount),
                },
                spender: channel::PERMIT2_DEPOSIT_COLLECTOR,
                nonce: U256::from(now()),
                deadline: U256::from(now() + 600),
                witness: DepositWitness {
                    channel_id: self.id,
                },
                signature: Bytes::new(),
            };
            edit(&mut permit);
            let digest = verify::permit2_deposit_digest(CHAIN_ID, &permit);
            permit.signature = Self::sign_with(signer.unwrap_or(&self.key), digest);
            let voucher =
                channel::voucher_digest(CHAIN_ID, self.id, U256::from(PRICE)).expect("u128");
            BatchEvmPayload::Deposit {
                channel_config: self.config.clone(),
                voucher: Voucher {
                    channel_id: self.id,
                    max_claimable_amount: U256::from(PRICE),
                    signature: Self::sign_with(&self.key, voucher),
                },
                deposit: Deposit {
                    amount: U256::from(amount),
                    authorization: DepositAuthorization {
                        erc3009_authorization: None,
                        permit2_authorization: Some(Box::new(permit)),
                    },
                },
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hostile_permit2_deposits_get_the_reference_codes_run_nothing_and_send_nothing() {
        let Some(c) = chain::Chain::start("hostile_permit2_deposits").await else {
            return;
        };
        let payer = Payer::new(chain::PAYER3_KEY);
        c.approve_permit2(payer.key.address()).await;
        // Funded, but it never approved Permit2.
        let unapproved = Payer::new(chain::PAYER4_KEY);
        let (addr, _settler, runs) = server(&c).await;
        let client = common::client();
        let stranger: PrivateKeySigner = chain::PAYER4_KEY.parse().expect("key");
        const DEPOSIT: u128 = 50 * PRICE;
        let payer_before = c.balance(payer.key.address()).await;
        let unapproved_before = c.balance(unapproved.key.address()).await;
        let relayer_nonce = || async {
            c.provider()
                .get_transaction_count(chain::RELAYER)
                .await
                .expect("nonce")
        };
        let sent_before = relayer_nonce().await;

        let send = |payload: BatchEvmPayload| {
            let client = client.clone();
            async move {
                // Echo the server's own 402 (bound challenges).
                let challenge = common::wire(&client, addr, "/paid", []).await.challenge();
                let v = json!({
                    "x402Version": 2,
                    "accepted": challenge.accepts[0],
                    "payload": payload,
                });
                let header = (HeaderName::from_static("payment-signature"), encode(&v));
                common::wire(&client, addr, "/paid", [header]).await
            }
        };
        let erc3009 = {
            let BatchEvmPayload::Deposit {
                channel_config,
                voucher,
                deposit,
            } = payer.deposit(DEPOSIT, |_| {}, None)
            else {
                unreachable!()
            };
            BatchEvmPayload::Deposit {
                channel_config,
                voucher,
                deposit: Deposit {
                    amount: deposit.amount,
                    authorization: DepositAuthorization {
                        erc3009_authorization: Some(Erc3009Authorization {
                            valid_after: U256::ZERO,
                            valid_before: U256::from(now() + 600),
                            salt: B256::ZERO,
                            signature: Bytes::from(vec![0x11; 65]),
                        }),
                        permit2_authorization: None,
                    },
                },
            }
        };
        let hostile: Vec<(&str, BatchEvmPayload, &str)> = vec![
            (
                "spender: the ERC-3009 collector",
                payer.deposit(
                    DEPOSIT,
                    |p| p.spender = channel::ERC3009_DEPOSIT_COLLECTOR,
                    None,
                ),
                "invalid_batch_settlement_evm_permit2_invalid_spender",
            ),
            (
                "spender: the relayer",
                payer.deposit(DEPOSIT, |p| p.spender = chain::RELAYER, None),
                "invalid_batch_settlement_evm_permit2_invalid_spender",
            ),
            (
                "witness: another channel",
                payer.deposit(
                    DEPOSIT,
                    |p| p.witness.channel_id = B256::repeat_byte(9),
                    None,
                ),
                "invalid_batch_settlement_evm_channel_id_mismatch",
            ),
            (
                "deadline passed",
                payer.deposit(DEPOSIT, |p| p.deadline = U256::from(now() - 1), None),
                "invalid_batch_settlement_evm_permit2_deadline_expired",
            ),
            (
                "permit amount above the deposit",
                payer.deposit(
                    DEPOSIT,
                    |p| p.permitted.amount = U256::from(2 * DEPOSIT),
                    None,
                ),
                "invalid_batch_settlement_evm_permit2_amount_mismatch",
            ),
            (
                "permit amount below the deposit",
                payer.deposit(DEPOSIT, |p| p.permitted.amount = U256::from(PRICE), None),
                "invalid_batch_settlement_evm_permit2_amount_mismatch",
            ),
            (
                "signed by another key",
                payer.deposit(DEPOSIT, |_| {}, Some(&stranger)),
                "invalid_batch_settlement_evm_permit2_invalid_signature",
            ),
            (
                "owner: another account (its own signature)",
                payer.deposit(DEPOSIT, |p| p.from = stranger.address(), Some(&stranger)),
                "invalid_batch_settlement_evm_permit2_invalid_signature",
            ),
            (
                "token: another token",
                payer.deposit(DEPOSIT, |p| p.permitted.token = chain::MULTICALL3, None),
                "invalid_batch_settlement_evm_token_mismatch",
            ),
            (
                "an EIP-3009 authorization on the permit2 route",
                erc3009,
                "invalid_batch_settlement_evm_payload_type",
            ),
            (
                "a payer without a Permit2 allowance (honest permit)",
                unapproved.deposit(DEPOSIT, |_| {}, None),
                "invalid_batch_settlement_evm_permit2_allowance_required",
            ),
        ];
        for (what, payload, code) in hostile {
            let reply = send(payload).await;
            assert_eq!(
                (reply.status, reply.reason().as_deref()),
                (StatusCode::PAYMENT_REQUIRED, Some(code)),
                "{what}"
            );
            assert!(reply.has_no_receipt(), "{what}: no receipt");
            assert_eq!(runs.load(Ordering::SeqCst), 0, "{what}: handler not run");
        }
        // Nothing on chain: no relayer transaction, no token moved.
        assert_eq!(relayer_nonce().await, sent_before, "no transaction sent");
        assert_eq!(c.balance(payer.key.address()).await, payer_before);
        assert_eq!(c.balance(unapproved.key.address()).await, unapproved_before);
        assert_eq!(c.balance(chain::BATCH_SETTLEMENT).await, U256::ZERO);

        // The same harness with an honest permit: served, the deposit on chain.
        let reply = send(payer.deposit(DEPOSIT, |_| {}, None)).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.reason());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(
            c.balance(chain::BATCH_SETTLEMENT).await,
            U256::from(DEPOSIT)
        );
        assert_eq!(
            payer_before - c.balance(payer.key.address()).await,
            U256::from(DEPOSIT)
        );
        let gas = c
            .gas_used(
                reply.receipt()["transaction"]
                    .as_str()
                    .expect("tx")
                    .parse()
                    .expect("hash"),
            )
            .await;
        println!("permit2 deposit: {gas} gas");
    }
}
