//! The local-chain fixture of the x402 `batch-settlement` scheme: our own escrow and ERC-3009
//! deposit collector (tests/chain/contracts/BatchSettlement.sol, ERC3009DepositCollector.sol,
//! written from the spec) etched at the canonical addresses, driven through the spec's flow
//! with the crate's EIP-712 hashes (`tower_x402::channel`): a deposit through the collector, a
//! claim of a signed voucher with the receiver authorizer's `ClaimBatch` signature, `settle` to
//! the receiver and a cooperative `refundWithSignature` of the rest; balances exact to the unit.
//! Hostile transactions revert. Without anvil the tests print SKIPPED, and fail under `CI=true`.
#![cfg(all(feature = "onchain", feature = "test-util", feature = "axum"))]

mod chain;
#[cfg(all(feature = "channel-manager", feature = "redis"))]
#[path = "common/redis_server.rs"]
mod redis_server;

use std::time::{SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256, Bytes, U256, b256};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use alloy_sol_types::{SolCall, SolValue, sol};

use chain::{
    BATCH_SETTLEMENT, Chain, ERC3009_DEPOSIT_COLLECTOR, FUNDED, MINTED, PAY_TO, PAYER3_KEY,
    RELAYER, TOKEN,
};
use tower_x402::channel::{self, ClaimEntry};
use tower_x402::proto::batch::ChannelConfig;

sol! {
    struct SolChannelConfig {
        address payer;
        address payerAuthorizer;
        address receiver;
        address receiverAuthorizer;
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }
    struct SolVoucher {
        SolChannelConfig channel;
        uint128 maxClaimableAmount;
    }
    struct VoucherClaim {
        SolVoucher voucher;
        bytes signature;
        uint128 totalClaimed;
    }
    function deposit(SolChannelConfig config, uint128 amount, address collector, bytes collectorData) external;
    function claimWithSignature(VoucherClaim[] voucherClaims, bytes authorizerSignature) external;
    function settle(address receiver, address token) external;
    function refundWithSignature(SolChannelConfig config, uint128 amount, uint256 nonce, bytes receiverAuthorizerSignature) external;
    function getChannelId(SolChannelConfig config) external view returns (bytes32);
    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) external view returns (bytes32);
    function getClaimBatchDigest(VoucherClaim[] voucherClaims) external view returns (bytes32);
    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) external view returns (bytes32);
    function channels(bytes32 channelId) external view returns (uint128 balance, uint128 totalClaimed);
    function refundNonce(bytes32 channelId) external view returns (uint256);
    function receivers(address receiver, address token) external view returns (uint128 totalClaimed, uint128 totalSettled);
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes data) external;
    function initiateWithdraw(SolChannelConfig config, uint128 amount) external;
    function finalizeWithdraw(SolChannelConfig config) external;
}

/// Anvil account #5: the server's receiver authorizer (signs claims and refunds).
const AUTHORIZER_KEY: &str = "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba";
const CHAIN_ID: u64 = 84532;
/// 1 test USDC into the channel.
const DEPOSIT: u128 = 1_000_000;
/// Three requests of 0.001 charged.
const CHARGED: u128 = 3_000;

fn signer(key: &str) -> PrivateKeySigner {
    key.parse().expect("test key")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn sign(key: &PrivateKeySigner, digest: B256) -> Bytes {
    Bytes::from(
        key.sign_hash_sync(&digest)
            .expect("sign")
            .as_bytes()
            .to_vec(),
    )
}

fn sol_config(c: &ChannelConfig) -> SolChannelConfig {
    SolChannelConfig {
        payer: c.payer,
        payerAuthorizer: c.payer_authorizer,
        receiver: c.receiver,
        receiverAuthorizer: c.receiver_authorizer,
        token: c.token,
        withdrawDelay: alloy_primitives::aliases::U40::from(c.withdraw_delay),
        salt: c.salt,
    }
}

struct Fixture {
    chain: Chain,
    payer: PrivateKeySigner,
    authorizer: PrivateKeySigner,
    config: ChannelConfig,
    id: B256,
}

impl Fixture {
    async fn start(test: &str) -> Option<Fixture> {
        let chain = Chain::start(test).await?;
        let payer = signer(PAYER3_KEY);
        let authorizer = signer(AUTHORIZER_KEY);
        let config = ChannelConfig {
            payer: payer.address(),
            payer_authorizer: payer.address(),
            receiver: PAY_TO,
            receiver_authorizer: authorizer.address(),
            token: TOKEN,
            withdraw_delay: 900,
            salt: b256!("0x00000000000000000000000000000000000000000000000000000000000000a1"),
        };
        let id = channel::channel_id(CHAIN_ID, &config);
        Some(Fixture {
            chain,
            payer,
            authorizer,
            config,
            id,
        })
    }

    async fn view<C: SolCall>(&self, call: C) -> C::Return {
        let out = self
            .chain
            .call_as(Address::ZERO, BATCH_SETTLEMENT, call.abi_encode().into())
            .await
            .unwrap_or_else(|revert| panic!("view reverted: {revert:?}"));
        C::abi_decode_returns(&out).expect("decode")
    }

    /// `deposit` calldata: a `ReceiveWithAuthorization` to the collector signed by the payer.
    fn deposit_call(&self, amount: u128, salt: B256) -> Bytes {
        let valid_before = U256::from(now() + 3600);
        let nonce = channel::deposit_nonce(self.id, salt);
        let domain = channel::token_domain(CHAIN_ID, TOKEN, "USDC", "2");
        let digest = channel::receive_authorization_digest(
            &domain,
            self.config.payer,
            U256::from(amount),
            U256::ZERO,
            valid_before,
            nonce,
        );
        let signature = sign(&self.payer, digest);
        let data = (
            U256::ZERO,
            valid_before,
            U256::from_be_bytes(salt.0),
            signature,
        )
            .abi_encode_params();
        depositCall {
            config: sol_config(&self.config),
            amount,
            collector: ERC3009_DEPOSIT_COLLECTOR,
            collectorData: data.into(),
        }
        .abi_encode()
        .into()
    }

    fn claim(&self, ceiling: u128, total: u128) -> VoucherClaim {
        let digest = channel::voucher_digest(CHAIN_ID, self.id, U256::from(ceiling)).expect("u128");
        VoucherClaim {
            voucher: SolVoucher {
                channel: sol_config(&self.config),
                maxClaimableAmount: ceiling,
            },
            signature: sign(&self.payer, digest),
            totalClaimed: total,
        }
    }

    fn claim_call(&self, claims: Vec<VoucherClaim>) -> Bytes {
        let entries: Vec<ClaimEntry> = claims
            .iter()
            .map(|c| ClaimEntry {
                channel_id: self.id,
                max_claimable_amount: c.voucher.maxClaimableAmount,
                total_claimed: c.totalClaimed,
            })
            .collect();
        let signature = sign(
            &self.authorizer,
            channel::claim_batch_digest(CHAIN_ID, &entries),
        );
        claimWithSignatureCall {
            voucherClaims: claims,
            authorizerSignature: signature,
        }
        .abi_encode()
        .into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_claim_settle_and_refund_move_exact_balances() {
    let Some(f) = Fixture::start("deposit_claim_settle_and_refund_move_exact_balances").await
    else {
        return;
    };
    let payer = f.config.payer;
    assert_eq!(payer, FUNDED[1]);
    // Our hashes are the contract's.
    let on_chain_id = f
        .view(getChannelIdCall {
            config: sol_config(&f.config),
        })
        .await;
    assert_eq!(on_chain_id, f.id, "channelId");
    let digest = f
        .view(getVoucherDigestCall {
            channelId: f.id,
            maxClaimableAmount: CHARGED,
        })
        .await;
    assert_eq!(
        Some(digest),
        channel::voucher_digest(CHAIN_ID, f.id, U256::from(CHARGED))
    );

    // Deposit through the ERC-3009 collector.
    let salt = B256::repeat_byte(0x42);
    let deposit = f.deposit_call(DEPOSIT, salt);
    let tx = f
        .chain
        .send_as(RELAYER, BATCH_SETTLEMENT, deposit.clone())
        .await;
    let deposit_gas = f.chain.gas_used(tx).await;
    let state = f.view(channelsCall { channelId: f.id }).await;
    assert_eq!((state.balance, state.totalClaimed), (DEPOSIT, 0));
    assert_eq!(
        f.chain.balance(payer).await,
        U256::from(MINTED) - U256::from(DEPOSIT)
    );
    assert_eq!(f.chain.balance(BATCH_SETTLEMENT).await, U256::from(DEPOSIT));
    assert_eq!(f.chain.balance(ERC3009_DEPOSIT_COLLECTOR).await, U256::ZERO);
    // The same authorization cannot be spent twice.
    assert!(
        f.chain
            .call_as(RELAYER, BATCH_SETTLEMENT, deposit)
            .await
            .is_err(),
        "a replayed deposit must revert"
    );

    // The receiver claims the latest voucher (ceiling 3 requests), authorized by its
    // authorizer, relayed by anyone.
    let claims = vec![f.claim(CHARGED, CHARGED)];
    let on_chain_batch = f
        .view(getClaimBatchDigestCall {
            voucherClaims: claims.clone(),
        })
        .await;
    assert_eq!(
        on_chain_batch,
        channel::claim_batch_digest(
            CHAIN_ID,
            &[ClaimEntry {
                channel_id: f.id,
                max_claimable_amount: CHARGED,
                total_claimed: CHARGED
            }]
        )
    );
    let tx = f
        .chain
        .send_as(RELAYER, BATCH_SETTLEMENT, f.claim_call(claims))
        .await;
    let claim_gas = f.chain.gas_used(tx).await;
    let state = f.view(channelsCall { channelId: f.id }).await;
    assert_eq!((state.balance, state.totalClaimed), (DEPOSIT, CHARGED));

    // Settle sweeps the claimed amount to the receiver.
    let receiver_before = f.chain.balance(PAY_TO).await;
    let settle = settleCall {
        receiver: PAY_TO,
        token: TOKEN,
    };
    let tx = f
        .chain
        .send_as(RELAYER, BATCH_SETTLEMENT, settle.abi_encode().into())
        .await;
    let settle_gas = f.chain.gas_used(tx).await;
    assert_eq!(
        f.chain.balance(PAY_TO).await - receiver_before,
        U256::from(CHARGED)
    );
    let totals = f
        .view(receiversCall {
            receiver: PAY_TO,
            token: TOKEN,
        })
        .await;
    assert_eq!(
        (totals.totalClaimed, totals.totalSettled),
        (CHARGED, CHARGED)
    );

    // Cooperative refund of everything unclaimed, relayed with the authorizer's signature.
    let rest = DEPOSIT - CHARGED;
    let nonce = f.view(refundNonceCall { channelId: f.id }).await;
    assert_eq!(nonce, U256::ZERO);
    let digest = channel::refund_digest(CHAIN_ID, f.id, nonce, rest);
    let on_chain = f
        .view(getRefundDigestCall {
            channelId: f.id,
            nonce,
            amount: rest,
        })
        .await;
    assert_eq!(on_chain, digest);
    let refund = refundWithSignatureCall {
        config: sol_config(&f.config),
        amount: rest,
        nonce,
        receiverAuthorizerSignature: sign(&f.authorizer, digest),
    };
    let tx = f
        .chain
        .send_as(RELAYER, BATCH_SETTLEMENT, refund.abi_encode().into())
        .await;
    let refund_gas = f.chain.gas_used(tx).await;
    // Exact to the unit: the receiver got what was charged, the payer everything else.
    assert_eq!(
        f.chain.balance(payer).await,
        U256::from(MINTED) - U256::from(CHARGED)
    );
    assert_eq!(f.chain.balance(BATCH_SETTLEMENT).await, U256::ZERO);
    let state = f.view(channelsCall { channelId: f.id }).await;
    assert_eq!((state.balance, state.totalClaimed), (CHARGED, CHARGED));
    assert_eq!(
        f.view(refundNonceCall { channelId: f.id }).await,
        U256::from(1)
    );
    // The refund signature was for nonce 0: it cannot be replayed.
    assert!(
        f.chain
            .call_as(RELAYER, BATCH_SETTLEMENT, refund.abi_encode().into())
            .await
            .is_err()
    );
    println!(
        "batch-settlement gas on anvil: deposit {deposit_gas}, claim (1 channel) {claim_gas}, \
         settle {settle_gas}, refund {refund_gas}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_escrow_calls_revert() {
    let Some(f) = Fixture::start("hostile_escrow_calls_revert").await else {
        return;
    };
    let tx = f
        .chain
        .send_as(
            RELAYER,
            BATCH_SETTLEMENT,
            f.deposit_call(DEPOSIT, B256::repeat_byte(1)),
        )
        .await;
    assert_ne!(tx, B256::ZERO);
    let reverts = |data: Bytes| {
        let chain = &f.chain;
        async move {
            chain
                .call_as(RELAYER, BATCH_SETTLEMENT, data)
                .await
                .is_err()
        }
    };
    // A claim above the voucher's ceiling.
    assert!(reverts(f.claim_call(vec![f.claim(CHARGED, CHARGED + 1)])).await);
    // A claim above the channel's balance.
    assert!(reverts(f.claim_call(vec![f.claim(DEPOSIT + 1, DEPOSIT + 1)])).await);
    // A voucher signed by someone else than the payer authorizer.
    let mut forged = f.claim(CHARGED, CHARGED);
    forged.signature = sign(
        &f.authorizer,
        channel::voucher_digest(CHAIN_ID, f.id, U256::from(CHARGED)).expect("u128"),
    );
    assert!(reverts(f.claim_call(vec![forged])).await);
    // A claim batch not signed by the receiver authorizer.
    let claims = vec![f.claim(CHARGED, CHARGED)];
    let mut call = claimWithSignatureCall::abi_decode(&f.claim_call(claims)).expect("decode");
    call.authorizerSignature = sign(&f.payer, B256::repeat_byte(9));
    assert!(reverts(call.abi_encode().into()).await);
    // A refund signed for another amount.
    let refund = refundWithSignatureCall {
        config: sol_config(&f.config),
        amount: 10,
        nonce: U256::ZERO,
        receiverAuthorizerSignature: sign(
            &f.authorizer,
            channel::refund_digest(CHAIN_ID, f.id, U256::ZERO, 11),
        ),
    };
    assert!(reverts(refund.abi_encode().into()).await);
    // The collector serves the escrow only.
    let direct = collectCall {
        payer: f.config.payer,
        token: TOKEN,
        amount: U256::from(1),
        channelId: f.id,
        data: Bytes::new(),
    };
    assert!(
        f.chain
            .call_as(
                RELAYER,
                ERC3009_DEPOSIT_COLLECTOR,
                direct.abi_encode().into()
            )
            .await
            .is_err()
    );
    // A withdraw delay below 15 minutes is refused at deposit.
    let mut short = Fixture::start("hostile_escrow_calls_revert/short")
        .await
        .expect("anvil");
    short.config.withdraw_delay = 899;
    short.id = channel::channel_id(CHAIN_ID, &short.config);
    assert!(
        short
            .chain
            .call_as(
                RELAYER,
                BATCH_SETTLEMENT,
                short.deposit_call(DEPOSIT, B256::repeat_byte(2))
            )
            .await
            .is_err()
    );
    // Nothing moved: the channel still holds the deposit, nothing claimed.
    let state = f.view(channelsCall { channelId: f.id }).await;
    assert_eq!((state.balance, state.totalClaimed), (DEPOSIT, 0));
}

/// Runs `tests/clients/batch-sign.mjs`: the official client's deposit payload and its vouchers
/// for the charged totals `charged` (before each call after the first).
fn official_channel(
    deps: &std::path::Path,
    requirements: &serde_json::Value,
    deposit: u128,
    charged: &[u128],
    salt: B256,
) -> serde_json::Value {
    let mut cmd = std::process::Command::new("node");
    cmd.arg(chain::process::repo().join("tests/clients/batch-sign.mjs"))
        .arg(PAYER3_KEY)
        .arg(requirements.to_string())
        .arg(deposit.to_string())
        .arg(
            serde_json::to_string(&charged.iter().map(u128::to_string).collect::<Vec<_>>())
                .expect("json"),
        )
        .arg(salt.to_string())
        .env("X402_TEST_DEPS", deps);
    chain::process::run_json(&mut cmd, std::time::Duration::from_secs(60), String::new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_opens_a_channel_through_our_relayer_and_pays_with_vouchers() {
    use tower_x402::channel::serve::Channels;
    use tower_x402::channel::store::{ChannelStore, MemoryChannelStore};
    use tower_x402::channel::verify::{self, ChannelTerms};
    use tower_x402::settle::onchain::OnchainSettler;

    let test = "the_official_client_opens_a_channel_through_our_relayer";
    let Some(deps) = chain::process::test_deps(test, &["node/node_modules/@x402/evm/package.json"])
    else {
        return;
    };
    let Some(f) = Fixture::start(test).await else {
        return;
    };
    const PRICE: u128 = 1_000;
    const CALLS: usize = 20;
    // The challenge our option sends is what the official client signs against.
    let option = tower_x402::PaymentOption::batch_settlement(
        &tower_x402::Asset::usdc_base_sepolia(),
        U256::from(PRICE),
        PAY_TO,
        f.authorizer.address(),
        900,
        channel::AssetTransferMethod::Eip3009,
    )
    .expect("option");
    let requirements = serde_json::to_value(option.requirements()).expect("requirements");
    assert_eq!(
        requirements["asset"],
        serde_json::json!(TOKEN.to_checksum(None))
    );
    // Dynamic prices: every third call costs 600 instead of the 1000 maximum.
    let charges: Vec<u128> = (0..CALLS)
        .map(|i| if i % 3 == 2 { 600 } else { PRICE })
        .collect();
    let before: Vec<u128> = charges
        .iter()
        .scan(0u128, |total, c| {
            let b = *total;
            *total += c;
            Some(b)
        })
        .collect();
    // The last voucher (ceiling = everything charged) is the refund's zero-charge voucher.
    let total: u128 = charges.iter().sum();
    let mut ceilings_less_price = before[1..].to_vec();
    ceilings_less_price.push(total - PRICE);
    let official = official_channel(
        &deps,
        &requirements,
        DEPOSIT,
        &ceilings_less_price,
        f.config.salt,
    );
    let req: tower_x402::proto::v2::PaymentRequirements =
        serde_json::from_value(requirements.clone()).expect("requirements");
    let terms = ChannelTerms::from_requirements(&req).expect("terms");
    let id: B256 = official["channelId"]
        .as_str()
        .expect("id")
        .parse()
        .expect("b256");
    assert_eq!(
        id, f.id,
        "the official client's channel is the fixture's (same salt, payer = payer authorizer)"
    );

    let settler = OnchainSettler::connect(f.chain.url(), signer(chain::RELAYER_KEY))
        .await
        .expect("settler");
    let channels = Channels::new(MemoryChannelStore::new(), settler.clone())
        .with_authorizer(authorizer(&signer(AUTHORIZER_KEY)));
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let deposit = verify::parse_raw(&official["deposit"]["payload"].to_string()).expect("deposit");
    let mut payloads = vec![deposit];
    let mut vouchers = official["vouchers"].as_array().expect("vouchers").clone();
    let refund_voucher = vouchers.pop().expect("refund voucher");
    for v in &vouchers {
        payloads.push(BatchEvmPayloadJson::voucher(&official["channelConfig"], v));
    }
    let mut deposit_gas = None;
    for (i, payload) in payloads.iter().enumerate() {
        let charge = charges[i];
        let paid = channels
            .pay(&terms, payload, now(), |max| {
                let runs = &runs;
                async move {
                    assert_eq!(max, PRICE);
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(((), charge))
                }
            })
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        if let Some(m) = paid.deposit {
            deposit_gas = Some(f.chain.gas_used(m.transaction).await);
            assert_eq!((m.balance, m.total_claimed), (DEPOSIT, 0));
        }
        assert_eq!(paid.state.charged_cumulative, before[i] + charge);
    }
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), CALLS);
    let state = channels
        .store()
        .load(id)
        .await
        .expect("load")
        .expect("record");
    assert_eq!(state.charged_cumulative, total);
    assert_eq!(f.chain.balance(BATCH_SETTLEMENT).await, U256::from(DEPOSIT));

    // The client asks for its money back with its zero-charge voucher: the server claims what
    // was charged (below the last ceiling) and refunds the rest, no handler run.
    let raw = serde_json::json!({
        "type": "refund",
        "channelConfig": official["channelConfig"],
        "voucher": refund_voucher,
    });
    let refund = verify::parse_raw(&raw.to_string()).expect("refund payload");
    let refunded = channels
        .refund(&terms, &refund, now())
        .await
        .expect("refund");
    assert_eq!(refunded.amount, DEPOSIT - total);
    assert!(refunded.state.is_none(), "a full refund deletes the record");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), CALLS);
    let receiver_before = f.chain.balance(PAY_TO).await;
    settler
        .settle_channels(PAY_TO, TOKEN)
        .await
        .expect("settle")
        .expect("owed");
    // Exact to the unit: the receiver got the charged sum, the payer everything else.
    assert_eq!(
        f.chain.balance(PAY_TO).await - receiver_before,
        U256::from(total)
    );
    assert_eq!(
        f.chain.balance(f.config.payer).await,
        U256::from(MINTED) - U256::from(total)
    );
    assert_eq!(f.chain.balance(BATCH_SETTLEMENT).await, U256::ZERO);
    println!("official client: {CALLS} calls, {total} charged, deposit gas {deposit_gas:?}");
}

/// Builds a `voucher` payload from the official client's config and signed voucher JSON.
struct BatchEvmPayloadJson;

impl BatchEvmPayloadJson {
    fn voucher(
        config: &serde_json::Value,
        voucher: &serde_json::Value,
    ) -> tower_x402::proto::batch::BatchEvmPayload {
        let raw =
            serde_json::json!({ "type": "voucher", "channelConfig": config, "voucher": voucher });
        tower_x402::channel::verify::parse_raw(&raw.to_string()).expect("voucher payload")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_batch_31_channels_in_one_transaction_and_one_settle_pays_the_receiver() {
    use tower_x402::channel::serve::Channels;
    use tower_x402::channel::store::{ChannelStore, MemoryChannelStore};
    use tower_x402::channel::verify::parse_raw;
    use tower_x402::settle::onchain::{ChannelClaim, OnchainSettler, claim_digest};

    let Some(mut f) = Fixture::start("claims_batch_31_channels_in_one_transaction").await else {
        return;
    };
    const PRICE: u128 = 1_000;
    const CHANNELS: usize = 32;
    const CALLS: u128 = 3;
    let settler = OnchainSettler::connect(f.chain.url(), signer(chain::RELAYER_KEY))
        .await
        .expect("settler");
    let channels = Channels::new(MemoryChannelStore::new(), settler.clone());
    let terms = channel_terms(&f, PRICE);
    let mut ids = Vec::new();
    for n in 0..CHANNELS {
        f.config.salt = B256::with_last_byte(u8::try_from(n).expect("u8"));
        f.id = channel::channel_id(CHAIN_ID, &f.config);
        ids.push(f.id);
        for call in 0..CALLS {
            let ceiling = (call + 1) * PRICE;
            let digest =
                channel::voucher_digest(CHAIN_ID, f.id, U256::from(ceiling)).expect("u128");
            let voucher = serde_json::json!({
                "channelId": f.id,
                "maxClaimableAmount": ceiling.to_string(),
                "signature": sign(&f.payer, digest),
            });
            let mut raw = serde_json::json!({
                "type": "voucher",
                "channelConfig": serde_json::to_value(&f.config).expect("config"),
                "voucher": voucher,
            });
            if call == 0 {
                let data = f.deposit_call(10 * PRICE, B256::repeat_byte(0x33));
                let decoded = depositCall::abi_decode(&data).expect("decode");
                let (valid_after, valid_before, salt, signature) =
                    <(U256, U256, U256, Bytes)>::abi_decode_params(&decoded.collectorData)
                        .expect("collector data");
                raw["type"] = "deposit".into();
                raw["deposit"] = serde_json::json!({
                    "amount": (10 * PRICE).to_string(),
                    "authorization": { "erc3009Authorization": {
                        "validAfter": valid_after.to_string(),
                        "validBefore": valid_before.to_string(),
                        "salt": B256::from(salt),
                        "signature": signature,
                    }},
                });
            }
            let payload = parse_raw(&raw.to_string()).expect("payload");
            channels
                .pay(&terms, &payload, now(), |_| async {
                    Ok::<_, std::convert::Infallible>(((), PRICE))
                })
                .await
                .unwrap_or_else(|e| panic!("channel {n} call {call}: {e:?}"));
        }
    }
    let mut claims = Vec::new();
    for id in &ids {
        let state = channels
            .store()
            .load(*id)
            .await
            .expect("load")
            .expect("record");
        claims.push(ChannelClaim::of(&state).expect("unclaimed"));
    }
    // One channel alone, then the other 31 in one transaction.
    let (first, rest) = claims.split_at(1);
    let sig = sign(&f.authorizer, claim_digest(CHAIN_ID, first));
    let (_, gas_one) = settler.claim_channels(first, sig).await.expect("claim 1");
    let sig = sign(&f.authorizer, claim_digest(CHAIN_ID, rest));
    let (_, gas_many) = settler
        .claim_channels(rest, sig.clone())
        .await
        .expect("claim 31");
    // Sent again (an unknown outcome retried): every row is a no-op, nothing claimed twice.
    settler
        .claim_channels(rest, sig)
        .await
        .expect("claim again");
    let total = PRICE * CALLS * CHANNELS as u128;
    let before = f.chain.balance(PAY_TO).await;
    let (_, settle_gas, owed) = settler
        .settle_channels(PAY_TO, TOKEN)
        .await
        .expect("settle")
        .expect("something to settle");
    assert_eq!(owed, total);
    assert_eq!(f.chain.balance(PAY_TO).await - before, U256::from(total));
    assert_eq!(
        settler
            .settle_channels(PAY_TO, TOKEN)
            .await
            .expect("settle"),
        None
    );
    for id in &ids {
        let state = f.view(channelsCall { channelId: *id }).await;
        assert_eq!(
            (state.balance, state.totalClaimed),
            (10 * PRICE, CALLS * PRICE)
        );
    }
    println!(
        "claimWithSignature gas: 1 channel {gas_one}, 31 channels {gas_many} ({} per channel); settle {settle_gas}",
        gas_many / 31
    );
}

/// The crate's local-key receiver authorizer with `key`: the engine's and the manager's signer.
fn authorizer(key: &PrivateKeySigner) -> tower_x402::channel::LocalAuthorizer {
    tower_x402::channel::LocalAuthorizer::from_bytes(key.to_bytes().0).expect("a signer's key")
}

impl Fixture {
    /// A `voucher` payload's JSON for `ceiling`, signed by `key`.
    fn voucher_json(&self, key: &PrivateKeySigner, ceiling: u128) -> serde_json::Value {
        let digest = channel::voucher_digest(CHAIN_ID, self.id, U256::from(ceiling)).expect("u128");
        serde_json::json!({
            "type": "voucher",
            "channelConfig": serde_json::to_value(&self.config).expect("config"),
            "voucher": {
                "channelId": self.id,
                "maxClaimableAmount": ceiling.to_string(),
                "signature": sign(key, digest),
            },
        })
    }

    /// A `voucher` payload for `ceiling`, or a `deposit` of `deposit` with it.
    fn payload(
        &self,
        ceiling: u128,
        deposit: Option<u128>,
    ) -> tower_x402::proto::batch::BatchEvmPayload {
        let mut raw = self.voucher_json(&self.payer, ceiling);
        if let Some(amount) = deposit {
            let data = self.deposit_call(amount, B256::repeat_byte(0x44));
            let decoded = depositCall::abi_decode(&data).expect("decode");
            let (valid_after, valid_before, salt, signature) =
                <(U256, U256, U256, Bytes)>::abi_decode_params(&decoded.collectorData)
                    .expect("collector data");
            raw["type"] = "deposit".into();
            raw["deposit"] = serde_json::json!({
                "amount": amount.to_string(),
                "authorization": { "erc3009Authorization": {
                    "validAfter": valid_after.to_string(),
                    "validBefore": valid_before.to_string(),
                    "salt": B256::from(salt),
                    "signature": signature,
                }},
            });
        }
        tower_x402::channel::verify::parse_raw(&raw.to_string()).expect("payload")
    }
}

/// The server's terms for the fixture's channels at `price` per request.
fn channel_terms(f: &Fixture, price: u128) -> tower_x402::channel::verify::ChannelTerms {
    tower_x402::channel::verify::ChannelTerms {
        chain_id: CHAIN_ID,
        receiver: PAY_TO,
        receiver_authorizer: f.authorizer.address(),
        token: TOKEN,
        withdraw_delay: 900,
        token_name: "USDC".into(),
        token_version: "2".into(),
        price,
        asset_transfer_method: tower_x402::channel::AssetTransferMethod::Eip3009,
    }
}

/// Moves anvil's clock `seconds` ahead and mines a block at the new time.
async fn advance(chain: &Chain, seconds: u64) {
    use alloy_provider::Provider;
    let _: serde_json::Value = chain
        .provider()
        .raw_request("evm_increaseTime".into(), (seconds,))
        .await
        .expect("evm_increaseTime");
    chain.mine().await;
}

/// The payer starts a timed withdrawal of its whole deposit.
async fn initiate_withdraw(f: &Fixture) {
    let withdraw = initiateWithdrawCall {
        config: sol_config(&f.config),
        amount: DEPOSIT,
    };
    f.chain
        .send_as(
            f.config.payer,
            BATCH_SETTLEMENT,
            withdraw.abi_encode().into(),
        )
        .await;
}

/// The payer finalizes its withdrawal (its delay elapsed) and the receiver settles: the
/// receiver gets exactly `charged`, the payer all the rest of what was minted to it.
async fn finalize_and_settle(
    f: &Fixture,
    settler: &tower_x402::settle::onchain::OnchainSettler,
    charged: u128,
) {
    let finalize = finalizeWithdrawCall {
        config: sol_config(&f.config),
    };
    f.chain
        .send_as(
            f.config.payer,
            BATCH_SETTLEMENT,
            finalize.abi_encode().into(),
        )
        .await;
    let before = f.chain.balance(PAY_TO).await;
    settler
        .settle_channels(PAY_TO, TOKEN)
        .await
        .expect("settle")
        .expect("owed");
    assert_eq!(f.chain.balance(PAY_TO).await - before, U256::from(charged));
    assert_eq!(
        f.chain.balance(f.config.payer).await,
        U256::from(MINTED) - U256::from(charged),
        "the payer got back exactly what it did not spend: no voucher lost to the withdrawal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_claims_before_a_timed_withdrawal_can_take_unclaimed_vouchers() {
    use tower_x402::channel::serve::Channels;
    use tower_x402::channel::store::{ChannelStore, MemoryChannelStore};
    use tower_x402::settle::onchain::OnchainSettler;

    let Some(f) = Fixture::start("the_manager_claims_before_a_timed_withdrawal").await else {
        return;
    };
    const PRICE: u128 = 1_000;
    let settler = OnchainSettler::connect(f.chain.url(), signer(chain::RELAYER_KEY))
        .await
        .expect("settler");
    let store = std::sync::Arc::new(MemoryChannelStore::new());
    let channels = Channels::new(store.clone(), settler.clone());
    let terms = channel_terms(&f, PRICE);
    for call in 0..5u128 {
        let payload = f.payload((call + 1) * PRICE, (call == 0).then_some(DEPOSIT));
        channels
            .pay(&terms, &payload, now(), |_| async {
                Ok::<_, std::convert::Infallible>(((), PRICE))
            })
            .await
            .unwrap_or_else(|e| panic!("call {call}: {e:?}"));
    }
    let charged = 5 * PRICE;
    let authorizer = authorizer(&signer(AUTHORIZER_KEY));
    // Nothing pressing: no withdrawal, below the threshold.
    let quiet = settler
        .watch_channels(&*store, &authorizer, now(), u128::MAX)
        .await
        .expect("round");
    assert_eq!(
        (quiet.refreshed, quiet.withdrawing, quiet.claimed),
        (1, 0, 0)
    );

    // The payer starts a timed withdrawal of the whole deposit, vouchers unclaimed.
    initiate_withdraw(&f).await;
    let round = settler
        .watch_channels(&*store, &authorizer, now(), u128::MAX)
        .await
        .expect("round");
    assert_eq!((round.withdrawing, round.claimed), (1, 1), "{round:?}");
    assert!(round.transaction.is_some());
    let state = f.view(channelsCall { channelId: f.id }).await;
    assert_eq!(
        state.totalClaimed, charged,
        "claimed before the delay elapsed"
    );
    let mirrored = store.load(f.id).await.expect("load").expect("record");
    assert_eq!(mirrored.total_claimed, charged);
    assert_ne!(mirrored.withdraw_requested_at, 0);
    // A repeated round claims nothing again.
    let again = settler
        .watch_channels(&*store, &authorizer, now(), u128::MAX)
        .await
        .expect("round");
    assert_eq!(again.claimed, 0);

    // The delay elapses; the payer takes back only what is unclaimed.
    advance(&f.chain, 901).await;
    finalize_and_settle(&f, &settler, charged).await;
    assert_eq!(f.chain.balance(BATCH_SETTLEMENT).await, U256::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_lost_its_state_recovers_through_our_corrective_402() {
    use tower_x402::channel::serve::{Channels, PayError};
    use tower_x402::channel::store::MemoryChannelStore;
    use tower_x402::channel::verify::{BatchError, ChannelTerms};
    use tower_x402::settle::onchain::OnchainSettler;

    let test = "a_client_that_lost_its_state_recovers";
    let Some(deps) = chain::process::test_deps(test, &["node/node_modules/@x402/evm/package.json"])
    else {
        return;
    };
    let Some(f) = Fixture::start(test).await else {
        return;
    };
    const PRICE: u128 = 1_000;
    let option = tower_x402::PaymentOption::batch_settlement(
        &tower_x402::Asset::usdc_base_sepolia(),
        U256::from(PRICE),
        PAY_TO,
        f.authorizer.address(),
        900,
        channel::AssetTransferMethod::Eip3009,
    )
    .expect("option");
    let terms = ChannelTerms::from_requirements(option.requirements()).expect("terms");
    let settler = OnchainSettler::connect(f.chain.url(), signer(chain::RELAYER_KEY))
        .await
        .expect("settler");
    let channels = Channels::new(MemoryChannelStore::new(), settler);
    let mut charged = 0;
    for (call, charge) in [1_000u128, 400, 1_000].into_iter().enumerate() {
        let payload = f.payload(charged + PRICE, (call == 0).then_some(DEPOSIT));
        channels
            .pay(&terms, &payload, now(), |_| async {
                Ok::<_, std::convert::Infallible>(((), charge))
            })
            .await
            .unwrap_or_else(|e| panic!("call {call}: {e:?}"));
        charged += charge;
    }
    // A cold client signs from the on-chain claimed total (0): refused with the server's state.
    let state = match channels
        .pay(&terms, &f.payload(PRICE, None), now(), |_| async {
            Ok::<_, std::convert::Infallible>(((), PRICE))
        })
        .await
    {
        Err(PayError::Refused {
            error: BatchError::CumulativeAmountMismatch,
            state: Some(state),
        }) => *state,
        other => panic!("expected a corrective refusal, got {other:?}"),
    };
    let corrective = |state: &tower_x402::channel::store::ChannelState| {
        serde_json::json!({
            "x402Version": 2,
            "error": BatchError::CumulativeAmountMismatch.code(),
            "resource": { "url": "http://127.0.0.1/paid" },
            "accepts": [channel::corrective_requirements(option.requirements(), f.id, state)],
        })
    };
    let recover = |body: serde_json::Value| {
        let mut cmd = std::process::Command::new("node");
        cmd.arg(chain::process::repo().join("tests/clients/batch-recover.mjs"))
            .arg(PAYER3_KEY)
            .arg(f.chain.url())
            .arg(body.to_string())
            .arg(f.config.salt.to_string())
            .env("X402_TEST_DEPS", &deps);
        chain::process::run_json(&mut cmd, std::time::Duration::from_secs(60), String::new)
    };
    let out = recover(corrective(&state));
    assert_eq!(out["recovered"], true, "{out}");
    assert_eq!(
        out["context"]["chargedCumulativeAmount"],
        charged.to_string()
    );
    let raw = serde_json::json!({
        "type": "voucher",
        "channelConfig": out["channelConfig"],
        "voucher": out["voucher"],
    });
    let next = tower_x402::channel::verify::parse_raw(&raw.to_string()).expect("voucher");
    let paid = channels
        .pay(&terms, &next, now(), |_| async {
            Ok::<_, std::convert::Infallible>(((), PRICE))
        })
        .await
        .expect("the recovered client pays on");
    assert_eq!(paid.state.charged_cumulative, charged + PRICE);
    // The receipt's extra as the spec has it.
    let extra = channel::receipt_extra(Some(PRICE), f.id, &paid.state);
    assert_eq!(extra["chargedAmount"], PRICE.to_string());
    assert_eq!(
        extra["channelState"]["chargedCumulativeAmount"],
        (charged + PRICE).to_string()
    );

    // A server claiming more than the client signed cannot make it adopt that: a voucher
    // state signed by another key is refused by the official client.
    let mut forged = paid.state.clone();
    forged.charged_cumulative += 50_000;
    forged.signed_max_claimable = forged.charged_cumulative;
    forged.signature = sign(
        &f.authorizer,
        channel::voucher_digest(CHAIN_ID, f.id, U256::from(forged.signed_max_claimable))
            .expect("u128"),
    );
    let out = recover(corrective(&forged));
    assert_eq!(out["recovered"], false, "{out}");
}

/// The channel manager (`ChannelManager`, issue #19 item 5) on anvil: many channels claimed
/// per transaction by its task, claims timed against a withdrawal by chain time, a claim whose
/// RPC is lost after the send reconciled from the chain and never sent twice, a shutdown that
/// waits for the round in flight, idle refunds, its metrics; and EIP-1271 vouchers of a
/// smart-wallet payer checked through the chain.
#[cfg(all(
    feature = "channel-manager",
    feature = "metrics",
    feature = "dev-heavy"
))]
mod manager {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use alloy_provider::Provider;
    use tower_x402::alert::{self, Alert};
    use tower_x402::channel::serve::{Channels, PayError};
    use tower_x402::channel::store::{ChannelState, ChannelStore, MemoryChannelStore};
    use tower_x402::channel::verify::{BatchError, ChannelTerms};
    use tower_x402::settle::onchain::{ChannelManager, OnchainSettler};

    use super::*;
    use chain::RpcProxy;

    const PRICE: u128 = 1_000;
    const WAIT: Duration = Duration::from_secs(30);

    type Engine = Channels<Arc<MemoryChannelStore>, OnchainSettler>;

    fn terms(f: &Fixture) -> ChannelTerms {
        channel_terms(f, PRICE)
    }

    async fn settler(url: &str) -> OnchainSettler {
        OnchainSettler::connect(url, signer(chain::RELAYER_KEY))
            .await
            .expect("settler")
            .with_poll_interval(Duration::from_millis(20))
    }

    /// A chain with the escrow, a settler, a memory store and the channel engine on them.
    async fn setup(
        test: &str,
    ) -> Option<(Fixture, OnchainSettler, Arc<MemoryChannelStore>, Engine)> {
        let f = Fixture::start(test).await?;
        let settler = settler(f.chain.url()).await;
        let store = Arc::new(MemoryChannelStore::new());
        let engine = Channels::new(store.clone(), settler.clone());
        Some((f, settler, store, engine))
    }

    /// Opens `n` channels (salts `first..first + n`) with a deposit and `calls` paid
    /// requests each, at Unix time `at`; their ids.
    async fn open<S: ChannelStore>(
        f: &mut Fixture,
        engine: &Channels<S, OnchainSettler>,
        first: u8,
        n: u8,
        calls: u128,
        at: u64,
    ) -> Vec<B256> {
        let terms = terms(f);
        let mut ids = Vec::new();
        for salt in first..first + n {
            f.config.salt = B256::with_last_byte(salt);
            f.id = channel::channel_id(CHAIN_ID, &f.config);
            ids.push(f.id);
            for call in 0..calls {
                let payload = f.payload((call + 1) * PRICE, (call == 0).then_some(DEPOSIT));
                engine
                    .pay(&terms, &payload, at, |_| async {
                        Ok::<_, std::convert::Infallible>(((), PRICE))
                    })
                    .await
                    .unwrap_or_else(|e| panic!("channel {salt} call {call}: {e:?}"));
            }
        }
        ids
    }

    async fn relayer_txs(chain: &Chain) -> u64 {
        chain
            .provider()
            .get_transaction_count(RELAYER)
            .latest()
            .await
            .expect("nonce")
    }

    async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The one Prometheus recorder of this test binary.
    fn recorder() -> &'static metrics_exporter_prometheus::PrometheusHandle {
        static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
            std::sync::OnceLock::new();
        HANDLE.get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).expect("no other recorder in this binary");
            handle
        })
    }

    /// The value of the series `name{labels}` (labels as rendered, e.g. `op="claim",test="x"`).
    fn metric(name: &str, labels: &str) -> u64 {
        let text = recorder().render();
        let series = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.trim().parse::<f64>().expect("a number") as u64)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_manager_task_claims_many_channels_in_one_transaction_and_counts_them() {
        let Some((mut f, settler, store, engine)) = setup("manager_task_claims_many").await else {
            return;
        };
        recorder();
        const CHANNELS: u8 = 6;
        const CALLS: u128 = 3;
        let ids = open(&mut f, &engine, 0, CHANNELS, CALLS, now()).await;
        let total = PRICE * CALLS * u128::from(CHANNELS);
        let manager =
            ChannelManager::builder(settler.clone(), store.clone(), authorizer(&f.authorizer))
                .claim_threshold(PRICE)
                .interval(Duration::from_millis(200))
                .metrics_label("test", "many")
                .build();
        let (txs, before) = (relayer_txs(&f.chain).await, f.chain.balance(PAY_TO).await);

        let handle = manager.spawn();
        until("every channel claimed and settled", async || {
            f.chain.balance(PAY_TO).await - before == U256::from(total)
        })
        .await;
        let rounds = handle.shutdown().await.expect("no panic");
        assert!(rounds >= 1);
        assert_eq!(
            relayer_txs(&f.chain).await - txs,
            2,
            "one claim transaction for the {CHANNELS} channels, one settle"
        );
        for id in &ids {
            let on_chain = f.view(channelsCall { channelId: *id }).await;
            assert_eq!(on_chain.totalClaimed, CALLS * PRICE);
            let mirrored = store.load(*id).await.expect("load").expect("record");
            assert_eq!(mirrored.total_claimed, CALLS * PRICE, "mirrored");
        }
        assert_eq!(
            metric("x402_channels_claimed_total", r#"test="many""#),
            u64::from(CHANNELS)
        );
        assert_eq!(
            metric("x402_channel_amount_total", r#"test="many",op="claim""#),
            total as u64
        );
        assert_eq!(
            metric("x402_channel_amount_total", r#"test="many",op="settle""#),
            total as u64
        );
        assert_eq!(
            metric(
                "x402_channel_transactions_total",
                r#"test="many",op="claim""#
            ),
            1
        );
        assert!(metric("x402_channel_gas_used_total", r#"test="many""#) > 0);
        assert_eq!(
            metric("x402_channel_rounds_total", r#"test="many""#),
            rounds
        );
        assert_eq!(
            metric("x402_channel_failures_total", r#"test="many",op="round""#),
            0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_small_max_per_transaction_splits_the_claim_and_idle_channels_are_refunded() {
        let Some((mut f, settler, store, engine)) = setup("manager_split_and_idle").await else {
            return;
        };
        // Three channels last used two hours ago: idle after an hour.
        let ids = open(&mut f, &engine, 10, 3, 2, now() - 7200).await;
        let manager =
            ChannelManager::builder(settler.clone(), store.clone(), authorizer(&f.authorizer))
                .max_per_transaction(2)
                .refund_idle_after(Some(3600))
                .build();
        let txs = relayer_txs(&f.chain).await;
        let report = manager.run_once().await.expect("round");
        assert_eq!(report.claimed, 3, "{report:?}");
        assert_eq!(report.claim_transactions.len(), 2, "2 + 1 channels");
        assert_eq!(report.refunded, 3);
        assert_eq!(report.refunded_amount, 3 * (DEPOSIT - 2 * PRICE));
        assert_eq!(report.settled_amount, 3 * 2 * PRICE);
        assert_eq!(report.failures, 0);
        assert_eq!(relayer_txs(&f.chain).await - txs, 2 + 3 + 1);
        for id in &ids {
            assert_eq!(store.load(*id).await.expect("load"), None, "fully refunded");
            let on_chain = f.view(channelsCall { channelId: *id }).await;
            assert_eq!(on_chain.balance, on_chain.totalClaimed);
        }
        assert_eq!(
            f.chain.balance(f.config.payer).await,
            U256::from(MINTED) - U256::from(3 * 2 * PRICE),
            "the payer got back exactly what it did not spend"
        );
        // Nothing left: a second round sends nothing.
        let again = manager.run_once().await.expect("round");
        assert_eq!((again.claimed, again.refunded), (0, 0));
        assert_eq!(relayer_txs(&f.chain).await - txs, 6);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_manager_claims_once_a_withdrawal_is_about_to_finalize_by_chain_time() {
        let Some((mut f, settler, store, engine)) = setup("manager_withdrawal_margin").await else {
            return;
        };
        let ids = open(&mut f, &engine, 20, 1, 4, now()).await;
        let charged = 4 * PRICE;
        let manager =
            ChannelManager::builder(settler.clone(), store.clone(), authorizer(&f.authorizer))
                .claim_before_withdrawal(300)
                .settle(false)
                .build();
        initiate_withdraw(&f).await;
        // 900 s to go: not yet.
        let early = manager.run_once().await.expect("round");
        assert_eq!((early.withdrawing, early.claimed), (1, 0), "{early:?}");
        advance(&f.chain, 650).await;
        let due = manager.run_once().await.expect("round");
        assert_eq!((due.withdrawing, due.claimed), (1, 1), "{due:?}");
        let on_chain = f.view(channelsCall { channelId: ids[0] }).await;
        assert_eq!(
            on_chain.totalClaimed, charged,
            "claimed before it finalized"
        );
        advance(&f.chain, 300).await;
        finalize_and_settle(&f, &settler, charged).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_claim_whose_rpc_is_lost_after_the_send_is_reconciled_and_never_sent_twice() {
        let Some((mut f, _, store, engine)) = setup("manager_rpc_lost").await else {
            return;
        };
        let ids = open(&mut f, &engine, 30, 2, 2, now()).await;
        let proxy = RpcProxy::start(f.chain.url()).await;
        let settler = settler(proxy.url())
            .await
            .with_receipt_timeout(Duration::from_secs(2))
            .with_replace_after(None)
            .with_rpc_timeout(Duration::from_secs(2));
        let manager = ChannelManager::builder(settler, store.clone(), authorizer(&f.authorizer))
            .claim_threshold(PRICE)
            .settle(false)
            .build();
        let retries = alert::count(Alert::SettlementRetry);
        f.chain.set_automine(false).await;
        let round = tokio::spawn({
            let manager = manager.clone();
            async move { manager.run_once().await }
        });
        // The claim reaches the node; then the RPC dies before any receipt.
        until("the claim sent", async || {
            proxy.calls("eth_sendRawTransaction") == 1
        })
        .await;
        proxy.cut();
        let lost = round.await.expect("no panic").expect("round");
        assert_eq!((lost.claimed, lost.unknown), (0, 1), "{lost:?}");
        assert!(alert::count(Alert::SettlementRetry) > retries, "raised");
        proxy.restore();
        assert_eq!(f.chain.pool().await.len(), 1, "the claim waits in the pool");

        // Still in the pool: its channels wait, nothing is sent again.
        let waiting = manager.run_once().await.expect("round");
        assert_eq!((waiting.in_flight, waiting.claimed), (1, 0), "{waiting:?}");
        assert_eq!(proxy.calls("eth_sendRawTransaction"), 1);

        // Mined: reconciled from the chain, still nothing sent again.
        f.chain.mine().await;
        f.chain.set_automine(true).await;
        let reconciled = manager.run_once().await.expect("round");
        assert_eq!(
            (
                reconciled.reconciled,
                reconciled.claimed,
                reconciled.failures
            ),
            (1, 0, 0),
            "{reconciled:?}"
        );
        assert_eq!(proxy.calls("eth_sendRawTransaction"), 1, "sent once");
        for id in &ids {
            let on_chain = f.view(channelsCall { channelId: *id }).await;
            assert_eq!(on_chain.totalClaimed, 2 * PRICE);
            let mirrored = store.load(*id).await.expect("load").expect("record");
            assert_eq!(mirrored.total_claimed, 2 * PRICE, "mirrored from the chain");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn shutdown_waits_for_the_round_in_flight() {
        let Some((mut f, settler, store, engine)) = setup("manager_shutdown").await else {
            return;
        };
        let settler = settler.with_replace_after(None);
        let ids = open(&mut f, &engine, 40, 1, 3, now()).await;
        let manager = ChannelManager::builder(settler, store.clone(), authorizer(&f.authorizer))
            .claim_threshold(PRICE)
            .settle(false)
            .interval(Duration::from_secs(3600))
            .build();
        f.chain.set_automine(false).await;
        let handle = manager.spawn();
        until("the claim in the pool", async || {
            f.chain.pool().await.len() == 1
        })
        .await;
        let done = Arc::new(AtomicUsize::new(0));
        let stopping = tokio::spawn({
            let done = done.clone();
            async move {
                let rounds = handle.shutdown().await.expect("no panic");
                done.store(1, Ordering::SeqCst);
                rounds
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            done.load(Ordering::SeqCst),
            0,
            "shutdown waits while the claim is unmined"
        );
        f.chain.mine().await;
        let rounds = tokio::time::timeout(WAIT, stopping)
            .await
            .expect("stopped")
            .expect("no panic");
        assert_eq!(rounds, 1, "stopped after the round in flight");
        let mirrored = store.load(ids[0]).await.expect("load").expect("record");
        assert_eq!(
            mirrored.total_claimed,
            3 * PRICE,
            "the round finished its bookkeeping before shutdown returned"
        );
        f.chain.set_automine(true).await;
    }

    // ---- EIP-1271 vouchers ---------------------------------------------------------------

    sol! {
        function deploy(address owner, bytes32 salt) external returns (address wallet);
        function walletAddress(address owner, bytes32 salt) external view returns (address);
    }

    const FACTORY: Address =
        alloy_primitives::address!("0x000000000000000000000000000000000000FAC7");
    const FACTORY_HEX: &str = include_str!("chain/contracts/TestWalletFactory.runtime.hex");

    /// A smart-wallet payer (`TestWallet`, ERC-1271, owned by `owner`) with a funded channel
    /// whose `payerAuthorizer` is zero, the deposit sent straight to the escrow (the deposit's
    /// authorization is checked by the token through ERC-1271), and the server's record of it.
    async fn wallet_channel(
        test: &str,
    ) -> Option<(
        Fixture,
        OnchainSettler,
        Arc<MemoryChannelStore>,
        PrivateKeySigner,
    )> {
        let (mut f, settler, store, _) = setup(test).await?;
        let owner = signer(chain::PAYER4_KEY);
        f.chain.set_code(FACTORY, FACTORY_HEX).await;
        let salt = B256::repeat_byte(0x12);
        f.chain
            .send_as(
                chain::FUNDED[0],
                FACTORY,
                deployCall {
                    owner: owner.address(),
                    salt,
                }
                .abi_encode()
                .into(),
            )
            .await;
        let out = f
            .chain
            .call_as(
                Address::ZERO,
                FACTORY,
                walletAddressCall {
                    owner: owner.address(),
                    salt,
                }
                .abi_encode()
                .into(),
            )
            .await
            .expect("walletAddress");
        let wallet = walletAddressCall::abi_decode_returns(&out).expect("address");
        f.chain.mint(wallet, U256::from(DEPOSIT)).await;
        f.config.payer = wallet;
        f.config.payer_authorizer = Address::ZERO;
        f.config.salt = B256::repeat_byte(0x50);
        f.id = channel::channel_id(CHAIN_ID, &f.config);
        // The deposit's EIP-3009 authorization, signed by the wallet's owner.
        let payer = std::mem::replace(&mut f.payer, owner.clone());
        let deposit = f.deposit_call(DEPOSIT, B256::repeat_byte(0x51));
        f.chain.send_as(RELAYER, BATCH_SETTLEMENT, deposit).await;
        f.payer = payer;
        let on_chain = f.view(channelsCall { channelId: f.id }).await;
        assert_eq!(on_chain.balance, DEPOSIT, "the wallet's deposit landed");
        let state = ChannelState {
            config: f.config.clone(),
            charged_cumulative: 0,
            signed_max_claimable: 0,
            signature: Bytes::new(),
            balance: DEPOSIT,
            total_claimed: 0,
            withdraw_requested_at: 0,
            refund_nonce: U256::ZERO,
            onchain_synced_at: now(),
            last_request_at: now(),
        };
        assert!(store.commit(f.id, None, state).await.expect("commit"));
        Some((f, settler, store, owner))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn eip1271_vouchers_are_checked_through_the_chain_after_every_in_process_check() {
        let Some((f, settler, store, owner)) = wallet_channel("manager_eip1271_vouchers").await
        else {
            return;
        };
        let terms = terms(&f);
        let runs = Arc::new(AtomicUsize::new(0));
        let handler = |runs: Arc<AtomicUsize>| {
            move |_| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(((), PRICE))
            }
        };
        let voucher_by = |key: &PrivateKeySigner, ceiling: u128| {
            let raw = f.voucher_json(key, ceiling).to_string();
            tower_x402::channel::verify::parse_raw(&raw).expect("payload")
        };
        let refused = |e: PayError<std::convert::Infallible>| match e {
            PayError::Refused { error, .. } => error,
            other => panic!("expected a refusal, got {other:?}"),
        };

        // Without a checker: refused (no RPC), handler not run.
        let plain = Channels::new(store.clone(), settler.clone());
        let good = voucher_by(&owner, PRICE);
        let e = plain
            .pay(&terms, &good, now(), handler(runs.clone()))
            .await
            .expect_err("no checker");
        assert_eq!(refused(e), BatchError::VoucherSignature);

        let checked =
            Channels::new(store.clone(), settler.clone()).with_contract_signatures(settler.clone());
        // Signed by another key: the wallet says no; the spec's reason, handler not run.
        let wrong = voucher_by(&f.payer, PRICE);
        let e = checked
            .pay(&terms, &wrong, now(), handler(runs.clone()))
            .await
            .expect_err("wrong signer");
        let e = refused(e);
        assert_eq!(e, BatchError::VoucherSignature);
        assert_eq!(e.code(), "invalid_batch_settlement_evm_voucher_signature");
        // An in-process check fails first: no chain call needed (wrong channel id).
        let mut bad = voucher_by(&owner, PRICE);
        if let tower_x402::proto::batch::BatchEvmPayload::Voucher { voucher, .. } = &mut bad {
            voucher.channel_id = B256::repeat_byte(9);
        }
        let e = checked
            .pay(&terms, &bad, now(), handler(runs.clone()))
            .await
            .expect_err("wrong id");
        assert_eq!(refused(e), BatchError::ChannelIdMismatch);
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "no handler run on a refusal"
        );

        // The chain cannot answer: unavailable (503 + Retry-After on the layer), not refused.
        let proxy = RpcProxy::start(f.chain.url()).await;
        let through = self::settler(proxy.url())
            .await
            .with_rpc_timeout(Duration::from_millis(500));
        proxy.cut();
        let outage =
            Channels::new(store.clone(), settler.clone()).with_contract_signatures(through);
        let e = outage
            .pay(&terms, &good, now(), handler(runs.clone()))
            .await
            .expect_err("no chain");
        assert!(matches!(e, PayError::Escrow(_)), "{e:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 0);

        // Signed by the wallet's owner: accepted, one handler run.
        let paid = checked
            .pay(&terms, &good, now(), handler(runs.clone()))
            .await
            .expect("accepted");
        assert_eq!(paid.charged, PRICE);
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        // The escrow takes the wallet's voucher too: the manager claims it.
        let manager =
            ChannelManager::builder(settler.clone(), store.clone(), authorizer(&f.authorizer))
                .claim_threshold(PRICE)
                .build();
        let report = manager.run_once().await.expect("round");
        assert_eq!((report.claimed, report.failures), (1, 0), "{report:?}");
        let on_chain = f.view(channelsCall { channelId: f.id }).await;
        assert_eq!(on_chain.totalClaimed, PRICE);
    }

    /// The `PAYMENT-REQUIRED` header's JSON.
    fn required(res: &http::Response<axum::body::Body>) -> serde_json::Value {
        use base64::Engine;
        let raw = res
            .headers()
            .get("payment-required")
            .expect("PAYMENT-REQUIRED");
        let json = base64::engine::general_purpose::STANDARD
            .decode(raw.as_bytes())
            .expect("base64");
        serde_json::from_slice(&json).expect("json")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn over_http_an_eip1271_voucher_is_served_a_wrong_one_refused_and_an_outage_is_503() {
        use tower::ServiceExt;
        use tower_x402::channel::AssetTransferMethod;
        use tower_x402::{Asset, PaymentLayer, PaymentOption};

        let Some((f, settler, store, owner)) = wallet_channel("manager_eip1271_http").await else {
            return;
        };
        // The checker reaches the chain through a proxy the test cuts.
        let proxy = RpcProxy::start(f.chain.url()).await;
        let checker = self::settler(proxy.url())
            .await
            .with_rpc_timeout(Duration::from_millis(500));
        let option = PaymentOption::batch_settlement(
            &Asset::usdc_base_sepolia(),
            U256::from(PRICE),
            PAY_TO,
            f.authorizer.address(),
            900,
            AssetTransferMethod::Eip3009,
        )
        .expect("option");
        let layer = PaymentLayer::builder()
            .accept(option)
            .channels(
                Channels::new(store.clone(), settler.clone()).with_contract_signatures(checker),
            )
            .build()
            .expect("layer");
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let app = axum::Router::new()
            .route(
                "/paid",
                axum::routing::get(move || {
                    let runs = counted.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        "paid"
                    }
                }),
            )
            .layer(layer);
        let get = |header: Option<http::HeaderValue>| {
            let mut req = http::Request::get("/paid");
            if let Some(h) = header {
                req = req.header("payment-signature", h);
            }
            app.clone()
                .oneshot(req.body(axum::body::Body::empty()).expect("request"))
        };
        let challenge = get(None).await.expect("infallible");
        assert_eq!(challenge.status(), http::StatusCode::PAYMENT_REQUIRED);
        // Bound challenges: echo the 402's requirement, as the official client does.
        let accepted = required(&challenge)["accepts"][0].clone();
        let voucher = |key: &PrivateKeySigner| {
            tower_x402::test_util::encode(&serde_json::json!({
                "x402Version": 2, "accepted": accepted, "payload": f.voucher_json(key, PRICE),
            }))
        };

        let wrong = get(Some(voucher(&f.payer))).await.expect("infallible");
        assert_eq!(wrong.status(), http::StatusCode::PAYMENT_REQUIRED);
        assert_eq!(
            required(&wrong)["error"],
            serde_json::json!("invalid_batch_settlement_evm_voucher_signature")
        );
        assert!(wrong.headers().get("payment-response").is_none());

        proxy.cut();
        let outage = get(Some(voucher(&owner))).await.expect("infallible");
        assert_eq!(outage.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(outage.headers().contains_key("retry-after"), "Retry-After");
        assert_eq!(runs.load(Ordering::SeqCst), 0, "no handler run");

        proxy.restore();
        let paid = get(Some(voucher(&owner))).await.expect("infallible");
        assert_eq!(paid.status(), http::StatusCode::OK);
        assert!(paid.headers().contains_key("payment-response"), "a receipt");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one handler run");
        let record = store.load(f.id).await.expect("load").expect("record");
        assert_eq!(record.charged_cumulative, PRICE);
    }

    /// `examples/channel_manager.rs`, the cron-style command, runs one round over the channels
    /// a server keeps in Redis: one claim transaction for all of them, one settle.
    #[cfg(feature = "redis")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_cron_command_claims_and_settles_the_channels_kept_in_redis() {
        use tower_x402::channel::redis::RedisChannelStore;

        let Some(redis) = crate::redis_server::RedisServer::start("manager_cron_command") else {
            return;
        };
        let Some((mut f, settler, _, _)) = setup("manager_cron_command").await else {
            return;
        };
        let store = RedisChannelStore::connect(&redis.url())
            .await
            .expect("redis");
        let engine = Channels::new(store.clone(), settler.clone());
        let ids = open(&mut f, &engine, 60, 3, 2, now()).await;
        let (txs, before) = (relayer_txs(&f.chain).await, f.chain.balance(PAY_TO).await);
        let mut cmd = std::process::Command::new(chain::process::example_bin("channel_manager"));
        cmd.args(["--rpc", f.chain.url(), "--redis", &redis.url()])
            .args(["--threshold", &PRICE.to_string()])
            .env("X402_RELAYER_KEY", chain::RELAYER_KEY)
            .env("X402_RECEIVER_AUTHORIZER_KEY", AUTHORIZER_KEY);
        let out =
            tokio::task::spawn_blocking(move || chain::process::run(&mut cmd, WAIT, String::new))
                .await
                .expect("no panic");
        assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("claimed: 3,"), "{}", out.stdout);
        assert_eq!(
            relayer_txs(&f.chain).await - txs,
            2,
            "one claim, one settle"
        );
        assert_eq!(
            f.chain.balance(PAY_TO).await - before,
            U256::from(3 * 2 * PRICE)
        );
        for id in &ids {
            let on_chain = f.view(channelsCall { channelId: *id }).await;
            assert_eq!(on_chain.totalClaimed, 2 * PRICE);
            let mirrored = store.load(*id).await.expect("load").expect("record");
            assert_eq!(mirrored.total_claimed, 2 * PRICE, "mirrored in Redis");
        }
    }
}
