//! Payment channels served in-process (`channel::serve::Channels` over a `MemoryChannelStore`):
//! a deposit then vouchers, one handler run for 64 concurrent copies of one voucher, state left
//! unchanged by a failed handler (the same voucher then pays), the corrective state on a
//! cumulative mismatch, and hostile payloads each refused with the reference's code and the
//! handler not run. Deposits go to a recording escrow here (the real escrow on anvil is
//! `tests/channel_chain.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use async_trait::async_trait;
use tower_x402::channel;
use tower_x402::channel::serve::{
    Channels, CooperativeRefund, Escrow, EscrowChannel, EscrowError, Mirror, PayError,
};
use tower_x402::channel::store::{ChannelStore, MemoryChannelStore};
use tower_x402::channel::verify::{BatchError, ChannelTerms};
use tower_x402::primitives::{Address, B256, Bytes, U256, address};
use tower_x402::proto::batch::{
    BatchEvmPayload, ChannelConfig, Deposit, DepositAuthorization, Erc3009Authorization, Voucher,
};

const NOW: u64 = 1_800_000_000;
const PRICE: u128 = 1_000;
const DEPOSIT: u128 = 100_000;
const CHAIN: u64 = 84532;
const TOKEN: Address = address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e");
const RECEIVER: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
const AUTHORIZER: Address = address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc");

/// An escrow that records deposits and reports the balance they make.
#[derive(Default)]
struct RecordingEscrow {
    deposits: AtomicUsize,
    balance: std::sync::Mutex<u128>,
    fail: std::sync::atomic::AtomicBool,
    claimed: std::sync::Mutex<u128>,
    /// Reported below what was deposited (the chain disagrees with the payload).
    short: std::sync::atomic::AtomicBool,
    /// (amount, nonce, claimed total sent first).
    refunds: std::sync::Mutex<Vec<(u128, U256, Option<u128>)>>,
}

#[async_trait]
impl Escrow for RecordingEscrow {
    async fn deposit(
        &self,
        _channel: EscrowChannel<'_>,
        deposit: &Deposit,
    ) -> Result<Mirror, EscrowError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(EscrowError("injected: the deposit reverted".into()));
        }
        self.deposits.fetch_add(1, Ordering::SeqCst);
        let mut balance = self.balance.lock().expect("lock");
        *balance += u128::try_from(deposit.amount).expect("u128");
        let reported = if self.short.load(Ordering::SeqCst) {
            *balance / 2
        } else {
            *balance
        };
        Ok(Mirror {
            transaction: B256::repeat_byte(0xde),
            balance: reported,
            total_claimed: *self.claimed.lock().expect("lock"),
        })
    }

    async fn refund(
        &self,
        _channel: EscrowChannel<'_>,
        refund: CooperativeRefund,
    ) -> Result<Mirror, EscrowError> {
        let CooperativeRefund {
            claim,
            amount,
            nonce,
            ..
        } = refund;
        self.refunds.lock().expect("lock").push((
            amount,
            nonce,
            claim.as_ref().map(|(c, _)| c.total_claimed),
        ));
        let mut claimed = self.claimed.lock().expect("lock");
        if let Some((c, _)) = claim {
            *claimed = (*claimed).max(c.total_claimed);
        }
        let mut balance = self.balance.lock().expect("lock");
        *balance -= amount;
        Ok(Mirror {
            transaction: B256::repeat_byte(0xef),
            balance: *balance,
            total_claimed: *claimed,
        })
    }
}

struct Payer {
    key: PrivateKeySigner,
    config: ChannelConfig,
    id: B256,
}

impl Payer {
    fn new() -> Self {
        let key: PrivateKeySigner =
            "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"
                .parse()
                .expect("key");
        let config = ChannelConfig {
            payer: key.address(),
            payer_authorizer: key.address(),
            receiver: RECEIVER,
            receiver_authorizer: AUTHORIZER,
            token: TOKEN,
            withdraw_delay: 900,
            salt: B256::ZERO,
        };
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
        let valid_before = U256::from(NOW + 600);
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

fn terms() -> ChannelTerms {
    ChannelTerms {
        chain_id: CHAIN,
        receiver: RECEIVER,
        receiver_authorizer: AUTHORIZER,
        token: TOKEN,
        withdraw_delay: 900,
        token_name: "USDC".into(),
        token_version: "2".into(),
        price: PRICE,
        asset_transfer_method: tower_x402::channel::AssetTransferMethod::Eip3009,
    }
}

type Engine = Channels<Arc<MemoryChannelStore>, Arc<RecordingEscrow>>;

fn engine() -> (Engine, Arc<MemoryChannelStore>, Arc<RecordingEscrow>) {
    let store = Arc::new(MemoryChannelStore::new());
    let escrow = Arc::new(RecordingEscrow::default());
    (Channels::new(store.clone(), escrow.clone()), store, escrow)
}

/// Serves `payload` with a handler that counts its runs and charges `charge`.
async fn serve(
    engine: &Engine,
    payload: &BatchEvmPayload,
    runs: &AtomicUsize,
    charge: u128,
) -> Result<u128, PayError<&'static str>> {
    engine
        .pay(&terms(), payload, NOW, |max| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            assert_eq!(max, PRICE, "the handler may charge the price at most");
            tokio::task::yield_now().await;
            Ok::<_, &'static str>(((), charge))
        })
        .await
        .map(|paid| paid.state.charged_cumulative)
}

fn refused<T: std::fmt::Debug>(r: Result<T, PayError<&'static str>>) -> BatchError {
    match r {
        Err(PayError::Refused { error, .. }) => error,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_deposit_then_vouchers_charge_what_the_handler_charged() {
    let (engine, store, escrow) = engine();
    let payer = Payer::new();
    let runs = AtomicUsize::new(0);
    // Deposit + first voucher: the handler charges less than the price (dynamic pricing).
    assert_eq!(
        serve(&engine, &payer.deposit(DEPOSIT, PRICE), &runs, 700)
            .await
            .expect("deposit"),
        700
    );
    assert_eq!(escrow.deposits.load(Ordering::SeqCst), 1);
    // Each next voucher is charged + price.
    assert_eq!(
        serve(&engine, &payer.pay(700 + PRICE), &runs, PRICE)
            .await
            .expect("2nd"),
        1_700
    );
    assert_eq!(
        serve(&engine, &payer.pay(1_700 + PRICE), &runs, 0)
            .await
            .expect("3rd"),
        1_700
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let state = store.load(payer.id).await.expect("load").expect("record");
    assert_eq!(state.balance, DEPOSIT);
    assert_eq!(state.charged_cumulative, 1_700);
    // The latest signed voucher is kept: what a claim needs.
    assert_eq!(state.signed_max_claimable, 2_700);
    assert_eq!(state.signature, payer.voucher(2_700).signature);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_copies_of_one_voucher_run_the_handler_once() {
    let (engine, _store, _escrow) = engine();
    let payer = Payer::new();
    let runs = Arc::new(AtomicUsize::new(0));
    serve(&engine, &payer.deposit(DEPOSIT, PRICE), &runs, PRICE)
        .await
        .expect("deposit");
    runs.store(0, Ordering::SeqCst);
    let engine = Arc::new(engine);
    let payload = Arc::new(payer.pay(2 * PRICE));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (engine, payload, runs) = (engine.clone(), payload.clone(), runs.clone());
            tokio::spawn(async move { serve(&engine, &payload, &runs, PRICE).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(charged) => {
                assert_eq!(charged, 2 * PRICE);
                ok += 1;
            }
            Err(PayError::Refused { error, .. }) => assert!(
                matches!(
                    error,
                    BatchError::ChannelBusy | BatchError::CumulativeAmountMismatch
                ),
                "{error:?}"
            ),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "one handler run for one voucher"
    );
}

#[tokio::test]
async fn a_failed_handler_leaves_the_state_and_the_same_voucher_pays_again() {
    let (engine, store, _escrow) = engine();
    let payer = Payer::new();
    let runs = AtomicUsize::new(0);
    serve(&engine, &payer.deposit(DEPOSIT, PRICE), &runs, PRICE)
        .await
        .expect("deposit");
    let before = store.load(payer.id).await.expect("load");
    let voucher = payer.pay(2 * PRICE);
    let failed = engine
        .pay(&terms(), &voucher, NOW, |_| async {
            Err::<((), u128), _>("injected failure")
        })
        .await;
    assert!(matches!(failed, Err(PayError::Handler("injected failure"))));
    assert_eq!(
        store.load(payer.id).await.expect("load"),
        before,
        "unchanged"
    );
    assert_eq!(
        serve(&engine, &voucher, &runs, PRICE).await.expect("retry"),
        2 * PRICE
    );
    // A handler charging above the price is refused and commits nothing.
    let over = engine
        .pay(&terms(), &payer.pay(3 * PRICE), NOW, |max| async move {
            Ok::<_, &str>(((), max + 1))
        })
        .await;
    assert_eq!(refused(over), BatchError::ChargeExceedsSignedCumulative);
    assert_eq!(
        store
            .load(payer.id)
            .await
            .expect("load")
            .expect("record")
            .charged_cumulative,
        2 * PRICE
    );
}

#[tokio::test]
async fn a_deposit_that_does_not_land_runs_nothing() {
    let (engine, store, escrow) = engine();
    let payer = Payer::new();
    let runs = AtomicUsize::new(0);
    escrow.fail.store(true, Ordering::SeqCst);
    let r = serve(&engine, &payer.deposit(DEPOSIT, PRICE), &runs, PRICE).await;
    assert!(matches!(r, Err(PayError::Escrow(_))), "{r:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(store.load(payer.id).await.expect("load"), None);
    // The deposit lands but the handler fails: the balance is mirrored, nothing charged.
    escrow.fail.store(false, Ordering::SeqCst);
    let r = engine
        .pay(&terms(), &payer.deposit(DEPOSIT, PRICE), NOW, |_| async {
            Err::<((), u128), _>("down")
        })
        .await;
    assert!(matches!(r, Err(PayError::Handler("down"))));
    let state = store.load(payer.id).await.expect("load").expect("kept");
    assert_eq!((state.balance, state.charged_cumulative), (DEPOSIT, 0));
    // The client goes on with a voucher on that balance.
    assert_eq!(
        serve(&engine, &payer.pay(PRICE), &runs, PRICE)
            .await
            .expect("voucher"),
        PRICE
    );
}

#[tokio::test]
async fn a_cumulative_mismatch_carries_the_servers_state() {
    let (engine, _store, _escrow) = engine();
    let payer = Payer::new();
    let runs = AtomicUsize::new(0);
    serve(&engine, &payer.deposit(DEPOSIT, PRICE), &runs, 400)
        .await
        .expect("deposit");
    // A client that lost its state signs from zero again.
    match serve(&engine, &payer.pay(PRICE), &runs, PRICE).await {
        Err(PayError::Refused {
            error: BatchError::CumulativeAmountMismatch,
            state: Some(state),
        }) => {
            assert_eq!(state.charged_cumulative, 400);
            assert_eq!(state.signed_max_claimable, PRICE);
            assert_eq!(state.signature, payer.voucher(PRICE).signature);
        }
        other => panic!("{other:?}"),
    }
    // It adopts the server's charged amount and pays on.
    assert_eq!(
        serve(&engine, &payer.pay(400 + PRICE), &runs, PRICE)
            .await
            .expect("recovered"),
        1_400
    );
}

#[tokio::test]
async fn hostile_payloads_are_refused_with_the_reference_codes_and_run_nothing() {
    let (engine, _store, escrow) = engine();
    let payer = Payer::new();
    let runs = AtomicUsize::new(0);
    serve(&engine, &payer.deposit(DEPOSIT, PRICE), &runs, PRICE)
        .await
        .expect("deposit");
    runs.store(0, Ordering::SeqCst);
    let deposits = escrow.deposits.load(Ordering::SeqCst);
    let next = 2 * PRICE;
    let stranger: PrivateKeySigner =
        "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a"
            .parse()
            .expect("key");

    let with_config = |f: &dyn Fn(&mut ChannelConfig), resign: bool| {
        let mut config = payer.config.clone();
        f(&mut config);
        let id = if resign {
            channel::channel_id(CHAIN, &config)
        } else {
            payer.id
        };
        let digest = channel::voucher_digest(CHAIN, id, U256::from(next)).expect("u128");
        BatchEvmPayload::Voucher {
            channel_config: config,
            voucher: Voucher {
                channel_id: id,
                max_claimable_amount: U256::from(next),
                signature: payer.sign(digest),
            },
        }
    };
    let mut cases: Vec<(&str, BatchEvmPayload, BatchError)> = vec![
        (
            "config not hashing to the id",
            with_config(&|c| c.salt = B256::repeat_byte(1), false),
            BatchError::ChannelIdMismatch,
        ),
        (
            "another receiver",
            with_config(&|c| c.receiver = Address::repeat_byte(9), true),
            BatchError::ReceiverMismatch,
        ),
        (
            "another receiver authorizer",
            with_config(&|c| c.receiver_authorizer = Address::repeat_byte(9), true),
            BatchError::ReceiverAuthorizerMismatch,
        ),
        (
            "another token",
            with_config(&|c| c.token = Address::repeat_byte(9), true),
            BatchError::TokenMismatch,
        ),
        (
            "another withdraw delay",
            with_config(&|c| c.withdraw_delay = 1_000, true),
            BatchError::WithdrawDelayMismatch,
        ),
        (
            "payer authorizer zero (EIP-1271 needs the chain)",
            with_config(&|c| c.payer_authorizer = Address::ZERO, true),
            BatchError::VoucherSignature,
        ),
        (
            "voucher below the expected cumulative",
            payer.pay(next - 1),
            BatchError::CumulativeAmountMismatch,
        ),
        (
            "voucher above the expected cumulative",
            payer.pay(next + 1),
            BatchError::CumulativeAmountMismatch,
        ),
        (
            "voucher replayed from the deposit",
            payer.pay(PRICE),
            BatchError::CumulativeAmountMismatch,
        ),
    ];
    // Signed by the wrong key.
    let mut wrong = payer.pay(next);
    if let BatchEvmPayload::Voucher { voucher, .. } = &mut wrong {
        let digest = channel::voucher_digest(CHAIN, payer.id, U256::from(next)).expect("u128");
        voucher.signature = Bytes::from(
            stranger
                .sign_hash_sync(&digest)
                .expect("sign")
                .as_bytes()
                .to_vec(),
        );
    }
    cases.push((
        "signature by the wrong key",
        wrong,
        BatchError::VoucherSignature,
    ));
    // Signed for another chain (wrong domain).
    let mut other_domain = payer.pay(next);
    if let BatchEvmPayload::Voucher { voucher, .. } = &mut other_domain {
        voucher.signature =
            payer.sign(channel::voucher_digest(8453, payer.id, U256::from(next)).expect("u128"));
    }
    cases.push((
        "voucher signed for another chain",
        other_domain,
        BatchError::VoucherSignature,
    ));
    // A ceiling beyond uint128.
    let mut huge = payer.pay(next);
    if let BatchEvmPayload::Voucher { voucher, .. } = &mut huge {
        voucher.max_claimable_amount = U256::from(u128::MAX) + U256::from(1);
    }
    cases.push(("ceiling beyond uint128", huge, BatchError::VoucherPayload));
    // A truncated signature.
    let mut short = payer.pay(next);
    if let BatchEvmPayload::Voucher { voucher, .. } = &mut short {
        voucher.signature = Bytes::from(vec![1u8; 64]);
    }
    cases.push(("64-byte signature", short, BatchError::VoucherSignature));
    // A deposit whose authorization expired, or is not valid yet, or is signed by another key.
    let mut expired = payer.deposit(DEPOSIT, next);
    if let BatchEvmPayload::Deposit { deposit, .. } = &mut expired {
        deposit
            .authorization
            .erc3009_authorization
            .as_mut()
            .expect("auth")
            .valid_before = U256::from(NOW + 5);
    }
    cases.push((
        "expired deposit authorization",
        expired,
        BatchError::ValidBefore,
    ));
    let mut early = payer.deposit(DEPOSIT, next);
    if let BatchEvmPayload::Deposit { deposit, .. } = &mut early {
        deposit
            .authorization
            .erc3009_authorization
            .as_mut()
            .expect("auth")
            .valid_after = U256::from(NOW + 60);
    }
    cases.push((
        "deposit authorization not valid yet",
        early,
        BatchError::ValidAfter,
    ));
    let mut resized = payer.deposit(DEPOSIT, next);
    if let BatchEvmPayload::Deposit { deposit, .. } = &mut resized {
        deposit.amount = U256::from(DEPOSIT * 10);
    }
    cases.push((
        "deposit amount changed after signing",
        resized,
        BatchError::ReceiveAuthorizationSignature,
    ));
    let mut no_auth = payer.deposit(DEPOSIT, next);
    if let BatchEvmPayload::Deposit { deposit, .. } = &mut no_auth {
        deposit.authorization.erc3009_authorization = None;
    }
    cases.push((
        "deposit without an EIP-3009 authorization",
        no_auth,
        BatchError::Erc3009AuthorizationRequired,
    ));
    let mut zero = payer.deposit(DEPOSIT, next);
    if let BatchEvmPayload::Deposit { deposit, .. } = &mut zero {
        deposit.amount = U256::ZERO;
    }
    cases.push(("deposit of zero", zero, BatchError::DepositPayload));
    // A deposit signed for another channel: its nonce binds the channel id.
    let other = {
        let mut p = Payer::new();
        p.config.salt = B256::repeat_byte(7);
        p.id = channel::channel_id(CHAIN, &p.config);
        p
    };
    let mut crossed = payer.deposit(DEPOSIT, next);
    if let (
        BatchEvmPayload::Deposit { deposit, .. },
        BatchEvmPayload::Deposit {
            deposit: theirs, ..
        },
    ) = (&mut crossed, other.deposit(DEPOSIT, next))
    {
        *deposit = theirs;
    }
    cases.push((
        "deposit authorization for another channel",
        crossed,
        BatchError::ReceiveAuthorizationSignature,
    ));
    // A voucher for a channel the server never saw.
    cases.push((
        "voucher on an unknown channel",
        other.pay(PRICE),
        BatchError::MissingChannel,
    ));
    assert!(cases.len() >= 20, "{}", cases.len());
    for (what, payload, expected) in &cases {
        let got = refused(serve(&engine, payload, &runs, PRICE).await);
        assert_eq!(got, *expected, "{what}");
        assert_eq!(expected.code(), got.code());
        assert!(
            got.code().starts_with("invalid_batch_settlement_evm_"),
            "{what}"
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "no hostile payload ran the handler"
    );
    assert_eq!(
        escrow.deposits.load(Ordering::SeqCst),
        deposits,
        "no hostile deposit was sent"
    );

    // Refund payloads are not served by this engine yet: refused, never run.
    let refund = BatchEvmPayload::Refund {
        channel_config: payer.config.clone(),
        voucher: payer.voucher(PRICE),
        amount: None,
    };
    assert!(matches!(
        serve(&engine, &refund, &runs, 0).await,
        Err(PayError::RefundUnsupported)
    ));
    // Malformed payload JSON is named by its type.
    for (raw, expected) in [
        (
            r#"{"type":"voucher","channelConfig":{}}"#,
            BatchError::VoucherPayload,
        ),
        (r#"{"type":"deposit"}"#, BatchError::DepositPayload),
        (
            r#"{"type":"refund","amount":"-1"}"#,
            BatchError::RefundPayload,
        ),
        (r#"{"type":"claim"}"#, BatchError::PayloadType),
        (r#"[1,2]"#, BatchError::PayloadType),
    ] {
        assert_eq!(channel::verify::parse_raw(raw), Err(expected), "{raw}");
    }
    // A ceiling above the balance: a route priced at the whole deposit, after one charge.
    let dear = ChannelTerms {
        price: DEPOSIT,
        ..terms()
    };
    let r = engine
        .pay(&dear, &payer.pay(PRICE + DEPOSIT), NOW, |_| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, &'static str>(((), 0))
        })
        .await;
    assert_eq!(refused(r), BatchError::CumulativeExceedsBalance);
    // Terms a server cannot offer: a withdraw delay out of range, no token domain.
    let mut req: tower_x402::proto::v2::PaymentRequirements = serde_json::from_value(serde_json::json!({
        "scheme": "batch-settlement", "network": "eip155:84532", "amount": "1000",
        "asset": TOKEN, "payTo": RECEIVER, "maxTimeoutSeconds": 60,
        "extra": {"receiverAuthorizer": AUTHORIZER, "withdrawDelay": 899, "name": "USDC", "version": "2"}
    }))
    .expect("requirement");
    assert_eq!(
        ChannelTerms::from_requirements(&req),
        Err(BatchError::WithdrawDelayOutOfRange)
    );
    req.extra
        .as_mut()
        .expect("extra")
        .insert("withdrawDelay".into(), 2_592_001.into());
    assert_eq!(
        ChannelTerms::from_requirements(&req),
        Err(BatchError::WithdrawDelayOutOfRange)
    );
    req.extra
        .as_mut()
        .expect("extra")
        .insert("withdrawDelay".into(), 900.into());
    assert_eq!(
        ChannelTerms::from_requirements(&req).map(|t| t.withdraw_delay),
        Ok(900)
    );
    req.extra.as_mut().expect("extra").remove("version");
    assert_eq!(
        ChannelTerms::from_requirements(&req),
        Err(BatchError::MissingEip712Domain)
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "no hostile payload ran the handler"
    );
}

#[test]
fn the_batch_settlement_option_refuses_terms_the_escrow_would() {
    use tower_x402::channel::AssetTransferMethod;
    use tower_x402::error::ConfigError;
    use tower_x402::{Asset, PaymentOption};
    let asset = Asset::usdc_base_sepolia();
    let make = |authorizer: Address, delay: u64| {
        PaymentOption::batch_settlement(
            &asset,
            U256::from(PRICE),
            RECEIVER,
            authorizer,
            delay,
            AssetTransferMethod::Permit2,
        )
    };
    assert!(matches!(
        make(Address::ZERO, 900),
        Err(ConfigError::Channel(BatchError::ReceiverAuthorizerMismatch))
    ));
    assert!(matches!(
        make(AUTHORIZER, 899),
        Err(ConfigError::Channel(BatchError::WithdrawDelayOutOfRange))
    ));
    assert!(matches!(
        make(AUTHORIZER, 2_592_001),
        Err(ConfigError::Channel(BatchError::WithdrawDelayOutOfRange))
    ));
    let opt = make(AUTHORIZER, 2_592_000).expect("30 days is allowed");
    let req = opt.requirements();
    assert_eq!(req.extra_str("assetTransferMethod"), Some("permit2"));
    assert_eq!(
        req.extra_str("receiverAuthorizer"),
        Some(AUTHORIZER.to_checksum(None).as_str())
    );
    // The terms a server derives from its own option are the option's.
    let terms = ChannelTerms::from_requirements(req).expect("terms");
    assert_eq!(
        (
            terms.receiver,
            terms.receiver_authorizer,
            terms.withdraw_delay,
            terms.price
        ),
        (RECEIVER, AUTHORIZER, 2_592_000, PRICE)
    );
}

/// A store whose commits fail (a database down after the handler ran).
struct FailingCommits(MemoryChannelStore, std::sync::atomic::AtomicBool);

#[async_trait]
impl ChannelStore for FailingCommits {
    async fn load(
        &self,
        channel: B256,
    ) -> Result<Option<tower_x402::channel::store::ChannelState>, tower_x402::store::StoreError>
    {
        self.0.load(channel).await
    }
    async fn lock(
        &self,
        channel: B256,
        seconds: u64,
    ) -> Result<Option<tower_x402::channel::store::Lease>, tower_x402::store::StoreError> {
        self.0.lock(channel, seconds).await
    }
    async fn unlock(
        &self,
        lease: tower_x402::channel::store::Lease,
    ) -> Result<(), tower_x402::store::StoreError> {
        self.0.unlock(lease).await
    }
    async fn commit(
        &self,
        channel: B256,
        expected: Option<u128>,
        next: tower_x402::channel::store::ChannelState,
    ) -> Result<bool, tower_x402::store::StoreError> {
        if self.1.load(Ordering::SeqCst) {
            return Err(tower_x402::store::StoreError::Unavailable {
                retry_after: None,
                source: "injected: store down".into(),
            });
        }
        self.0.commit(channel, expected, next).await
    }
    async fn remove(
        &self,
        channel: B256,
        expected: u128,
    ) -> Result<bool, tower_x402::store::StoreError> {
        self.0.remove(channel, expected).await
    }
    async fn list(&self) -> Result<Vec<B256>, tower_x402::store::StoreError> {
        self.0.list().await
    }
}

#[tokio::test]
async fn a_commit_failing_after_the_handler_raises_an_alert_and_keeps_the_old_state() {
    use tower_x402::alert::{Alert, count};
    let store = Arc::new(FailingCommits(MemoryChannelStore::new(), false.into()));
    let engine = Channels::new(store.clone(), Arc::new(RecordingEscrow::default()));
    let payer = Payer::new();
    let ok = engine
        .pay(&terms(), &payer.deposit(DEPOSIT, PRICE), NOW, |_| async {
            Ok::<_, &str>(((), PRICE))
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    store.1.store(true, Ordering::SeqCst);
    let alerts = count(Alert::ChannelState);
    let r = engine
        .pay(&terms(), &payer.pay(2 * PRICE), NOW, |_| async {
            Ok::<_, &str>(((), PRICE))
        })
        .await;
    assert!(matches!(r, Err(PayError::Store(_))), "{r:?}");
    assert!(
        count(Alert::ChannelState) > alerts,
        "the lost charge is raised"
    );
    // Nothing was written: the record still holds the first charge and its voucher, and the
    // lease was given back (the channel is usable again once the store is).
    let state = store.load(payer.id).await.expect("load").expect("record");
    assert_eq!(
        (state.charged_cumulative, state.signed_max_claimable),
        (PRICE, PRICE)
    );
    store.1.store(false, Ordering::SeqCst);
    let again = engine
        .pay(&terms(), &payer.pay(2 * PRICE), NOW, |_| async {
            Ok::<_, &str>(((), PRICE))
        })
        .await
        .expect("served again once the store is back");
    assert_eq!(again.state.charged_cumulative, 2 * PRICE);
}

#[tokio::test]
async fn a_cooperative_refund_claims_first_then_refunds_and_runs_no_handler() {
    let store = Arc::new(MemoryChannelStore::new());
    let escrow = Arc::new(RecordingEscrow::default());
    let engine = Channels::new(store.clone(), escrow.clone()).with_authorizer(
        tower_x402::channel::LocalAuthorizer::from_hex(
            "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
        )
        .expect("anvil #5"),
    );
    let payer = Payer::new();
    let runs = AtomicUsize::new(0);
    serve(&engine, &payer.deposit(DEPOSIT, PRICE), &runs, PRICE)
        .await
        .expect("deposit");
    serve(&engine, &payer.pay(2 * PRICE), &runs, 300)
        .await
        .expect("voucher");
    let charged = PRICE + 300;
    let refund = |voucher: u128, amount: Option<u128>| BatchEvmPayload::Refund {
        channel_config: payer.config.clone(),
        voucher: payer.voucher(voucher),
        amount: amount.map(U256::from),
    };
    // Hostile refunds: a charging voucher, zero, more than is refundable.
    for (what, payload, expected) in [
        (
            "refund with a charging voucher",
            refund(charged + PRICE, None),
            BatchError::CumulativeAmountMismatch,
        ),
        (
            "refund below the charged amount",
            refund(charged - 1, None),
            BatchError::CumulativeAmountMismatch,
        ),
        (
            "refund of zero",
            refund(charged, Some(0)),
            BatchError::RefundAmountInvalid,
        ),
        (
            "refund above the balance",
            refund(charged, Some(DEPOSIT)),
            BatchError::RefundAmountInvalid,
        ),
    ] {
        let got = engine.refund(&terms(), &payload, NOW).await;
        assert!(
            matches!(got, Err(PayError::Refused { error, .. }) if error == expected),
            "{what}: {got:?}"
        );
    }
    assert!(
        escrow.refunds.lock().expect("lock").is_empty(),
        "no hostile refund was sent"
    );
    // A partial refund: the unclaimed charges are claimed first, with the refund's voucher.
    let partial = engine
        .refund(&terms(), &refund(charged, Some(10_000)), NOW)
        .await
        .expect("partial");
    assert_eq!(partial.amount, 10_000);
    let state = partial.state.expect("kept");
    assert_eq!(
        (state.balance, state.total_claimed, state.refund_nonce),
        (DEPOSIT - 10_000, charged, U256::from(1))
    );
    // The rest, without an amount: everything refundable; the record goes.
    let full = engine
        .refund(&terms(), &refund(charged, None), NOW)
        .await
        .expect("full");
    assert_eq!(full.amount, DEPOSIT - 10_000 - charged);
    assert!(full.state.is_none());
    assert_eq!(store.load(payer.id).await.expect("load"), None);
    assert_eq!(
        *escrow.refunds.lock().expect("lock"),
        vec![
            (10_000, U256::ZERO, Some(charged)),
            (DEPOSIT - 10_000 - charged, U256::from(1), None)
        ]
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2, "refunds run no handler");
    // Without an authorizer, refunds are refused.
    let (plain, _, _) = self::engine();
    assert!(matches!(
        plain.refund(&terms(), &refund(0, None), NOW).await,
        Err(PayError::RefundUnsupported)
    ));
}

#[tokio::test]
async fn a_deposit_that_lands_short_of_the_voucher_runs_nothing_but_is_mirrored() {
    let (engine, store, escrow) = engine();
    let payer = Payer::new();
    let runs = AtomicUsize::new(0);
    escrow.short.store(true, Ordering::SeqCst);
    // A deposit of 1.5 prices; the chain reports 0.75 of a price: below the voucher's ceiling.
    let r = serve(
        &engine,
        &payer.deposit(PRICE + PRICE / 2, PRICE),
        &runs,
        PRICE,
    )
    .await;
    assert_eq!(refused(r), BatchError::CumulativeExceedsBalance);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let state = store.load(payer.id).await.expect("load").expect("mirrored");
    assert_eq!(
        (state.balance, state.charged_cumulative),
        ((PRICE + PRICE / 2) / 2, 0)
    );
}
