//! The local-chain fixture of the x402 `batch-settlement` scheme: our own escrow and ERC-3009
//! deposit collector (tests/chain/contracts/BatchSettlement.sol, ERC3009DepositCollector.sol,
//! written from the spec) etched at the canonical addresses, driven through the spec's flow
//! with the crate's EIP-712 hashes (`tower_x402::channel`): a deposit through the collector, a
//! claim of a signed voucher with the receiver authorizer's `ClaimBatch` signature, `settle` to
//! the receiver and a cooperative `refundWithSignature` of the rest; balances exact to the unit.
//! Hostile transactions revert. Without anvil the tests print SKIPPED, and fail under `CI=true`.
#![cfg(all(feature = "onchain", feature = "test-util", feature = "axum"))]

mod chain;

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
        .with_authorizer(KeyAuthorizer(signer(AUTHORIZER_KEY)));
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
    use tower_x402::channel::verify::{ChannelTerms, parse_raw};
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
    let terms = ChannelTerms {
        chain_id: CHAIN_ID,
        receiver: PAY_TO,
        receiver_authorizer: f.authorizer.address(),
        token: TOKEN,
        withdraw_delay: 900,
        token_name: "USDC".into(),
        token_version: "2".into(),
        price: PRICE,
        asset_transfer_method: tower_x402::channel::AssetTransferMethod::Eip3009,
    };
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

/// The receiver authorizer's key, as the manager's signer.
struct KeyAuthorizer(PrivateKeySigner);

impl tower_x402::settle::onchain::ReceiverAuthorizer for KeyAuthorizer {
    fn sign_digest(&self, digest: B256) -> Result<Bytes, tower_x402::store::BoxError> {
        Ok(sign(&self.0, digest))
    }
}

impl Fixture {
    /// A `voucher` payload for `ceiling`, or a `deposit` of `deposit` with it.
    fn payload(
        &self,
        ceiling: u128,
        deposit: Option<u128>,
    ) -> tower_x402::proto::batch::BatchEvmPayload {
        let digest = channel::voucher_digest(CHAIN_ID, self.id, U256::from(ceiling)).expect("u128");
        let mut raw = serde_json::json!({
            "type": "voucher",
            "channelConfig": serde_json::to_value(&self.config).expect("config"),
            "voucher": {
                "channelId": self.id,
                "maxClaimableAmount": ceiling.to_string(),
                "signature": sign(&self.payer, digest),
            },
        });
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_claims_before_a_timed_withdrawal_can_take_unclaimed_vouchers() {
    use tower_x402::channel::serve::Channels;
    use tower_x402::channel::store::{ChannelStore, MemoryChannelStore};
    use tower_x402::channel::verify::ChannelTerms;
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
    let terms = ChannelTerms {
        chain_id: CHAIN_ID,
        receiver: PAY_TO,
        receiver_authorizer: f.authorizer.address(),
        token: TOKEN,
        withdraw_delay: 900,
        token_name: "USDC".into(),
        token_version: "2".into(),
        price: PRICE,
        asset_transfer_method: tower_x402::channel::AssetTransferMethod::Eip3009,
    };
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
    let authorizer = KeyAuthorizer(signer(AUTHORIZER_KEY));
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
    use alloy_provider::Provider;
    let _: serde_json::Value = f
        .chain
        .provider()
        .raw_request("evm_increaseTime".into(), (901u64,))
        .await
        .expect("evm_increaseTime");
    f.chain.mine().await;
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
        "the payer got back exactly what it did not spend"
    );
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
