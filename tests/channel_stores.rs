//! The shared channel stores, `RedisChannelStore` against a real `redis-server` and
//! `PostgresChannelStore` against a real PostgreSQL: the `ChannelStore` contract the memory
//! store meets, two instances (two connections, two `Channels`) serving one channel
//! alternately, 64 concurrent copies of one voucher across both instances → one handler run,
//! and a restarted instance continuing from the shared state. One body per check runs against
//! both backends. Without the server the tests print SKIPPED, and fail under `CI=true`
//! (`tests/common/redis_server.rs`, `tests/common/postgres.rs`).
#![cfg(feature = "test-util")]

// The PostgreSQL harness reports through `common::process`.
#[cfg(feature = "postgres")]
mod common;
#[cfg(feature = "postgres")]
#[path = "common/postgres.rs"]
mod pg_server;
#[cfg(feature = "redis")]
#[path = "common/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use async_trait::async_trait;
use tower_x402::channel;
use tower_x402::channel::serve::{
    Channels, CooperativeRefund, Escrow, EscrowChannel, EscrowError, Mirror, PayError,
};
use tower_x402::channel::store::{ChannelStore, conformance};
use tower_x402::channel::verify::{BatchError, ChannelTerms};
use tower_x402::primitives::{Address, B256, Bytes, U256, address};
use tower_x402::proto::batch::{
    BatchEvmPayload, ChannelConfig, Deposit, DepositAuthorization, Erc3009Authorization, Voucher,
};

const PRICE: u128 = 1_000;
const DEPOSIT: u128 = 100_000;
const CHAIN: u64 = 84532;
const TOKEN: Address = address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e");
const RECEIVER: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
const AUTHORIZER: Address = address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Deposits always land with the deposited balance (the chain is `tests/channel_chain.rs`'s).
struct Landing;

#[async_trait]
impl Escrow for Landing {
    async fn deposit(
        &self,
        _channel: EscrowChannel<'_>,
        deposit: &Deposit,
    ) -> Result<Mirror, EscrowError> {
        Ok(Mirror {
            transaction: B256::repeat_byte(1),
            balance: u128::try_from(deposit.amount).expect("u128"),
            total_claimed: 0,
        })
    }
    async fn refund(
        &self,
        _channel: EscrowChannel<'_>,
        _refund: CooperativeRefund,
    ) -> Result<Mirror, EscrowError> {
        Err(EscrowError("not in this test".into()))
    }
}

fn payer() -> (PrivateKeySigner, ChannelConfig, B256) {
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
    (key, config, id)
}

fn sign(key: &PrivateKeySigner, digest: B256) -> Bytes {
    Bytes::from(
        key.sign_hash_sync(&digest)
            .expect("sign")
            .as_bytes()
            .to_vec(),
    )
}

fn voucher(ceiling: u128) -> BatchEvmPayload {
    let (key, config, id) = payer();
    let digest = channel::voucher_digest(CHAIN, id, U256::from(ceiling)).expect("u128");
    BatchEvmPayload::Voucher {
        channel_config: config,
        voucher: Voucher {
            channel_id: id,
            max_claimable_amount: U256::from(ceiling),
            signature: sign(&key, digest),
        },
    }
}

fn deposit() -> BatchEvmPayload {
    let (key, config, id) = payer();
    let salt = B256::repeat_byte(9);
    let valid_before = U256::from(now() + 600);
    let digest = channel::receive_authorization_digest(
        &channel::token_domain(CHAIN, TOKEN, "USDC", "2"),
        config.payer,
        U256::from(DEPOSIT),
        U256::ZERO,
        valid_before,
        channel::deposit_nonce(id, salt),
    );
    let BatchEvmPayload::Voucher { voucher, .. } = voucher(PRICE) else {
        unreachable!()
    };
    BatchEvmPayload::Deposit {
        channel_config: config,
        voucher,
        deposit: Deposit {
            amount: U256::from(DEPOSIT),
            authorization: DepositAuthorization {
                erc3009_authorization: Some(Erc3009Authorization {
                    valid_after: U256::ZERO,
                    valid_before,
                    salt,
                    signature: sign(&key, digest),
                }),
                permit2_authorization: None,
            },
        },
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

async fn serve<S: ChannelStore>(
    channels: &Channels<S, Landing>,
    payload: &BatchEvmPayload,
    runs: &AtomicUsize,
) -> Result<u128, PayError<&'static str>> {
    channels
        .pay(&terms(), payload, now(), |_| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok::<_, &'static str>(((), PRICE))
        })
        .await
        .map(|p| p.state.charged_cumulative)
}

/// Two instances on one shared store serve one channel; a third (a restart) continues.
async fn shared_channel<S: ChannelStore>(a: S, b: S, c: S) {
    assert!(a.is_shared());
    let a = Arc::new(Channels::new(a, Landing));
    let b = Arc::new(Channels::new(b, Landing));
    let runs = Arc::new(AtomicUsize::new(0));
    // Alternately: the deposit on A, vouchers on B, A, B.
    assert_eq!(serve(&a, &deposit(), &runs).await.expect("deposit"), PRICE);
    for (i, instance) in [&b, &a, &b].into_iter().enumerate() {
        let charged = (i as u128 + 1) * PRICE;
        assert_eq!(
            serve(instance, &voucher(charged + PRICE), &runs)
                .await
                .expect("voucher"),
            charged + PRICE
        );
    }
    // A voucher already paid on one instance is refused on the other.
    assert!(matches!(
        serve(&a, &voucher(4 * PRICE), &runs).await,
        Err(PayError::Refused {
            error: BatchError::CumulativeAmountMismatch,
            ..
        })
    ));
    runs.store(0, Ordering::SeqCst);
    let payload = Arc::new(voucher(5 * PRICE));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let instance = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (payload, runs) = (payload.clone(), runs.clone());
            tokio::spawn(async move { serve(&instance, &payload, &runs).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(charged) => {
                assert_eq!(charged, 5 * PRICE);
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
    assert_eq!((ok, runs.load(Ordering::SeqCst)), (1, 1), "one handler run");

    // A restarted instance (a new connection, nothing in memory) continues from the store.
    drop(a);
    let c = Channels::new(c, Landing);
    let state = c
        .store()
        .load(payer().2)
        .await
        .expect("load")
        .expect("record");
    assert_eq!(state.charged_cumulative, 5 * PRICE);
    assert_eq!(state.signed_max_claimable, 5 * PRICE);
    assert_eq!(
        serve(&c, &voucher(6 * PRICE), &runs)
            .await
            .expect("after restart"),
        6 * PRICE
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_meets_the_channel_store_contract() {
    use tower_x402::channel::redis::RedisChannelStore;
    let Some(redis) = redis_server::RedisServer::start("channel_redis_contract") else {
        return;
    };
    let store = RedisChannelStore::connect(&redis.url())
        .await
        .expect("connect");
    assert!(store.is_shared());
    conformance(&store, now(), 1, |s| {
        tokio::time::sleep(std::time::Duration::from_secs(s))
    })
    .await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_redis_share_a_channel_and_64_copies_of_a_voucher_run_once() {
    use tower_x402::channel::redis::RedisChannelStore;
    let Some(redis) = redis_server::RedisServer::start("channel_redis_instances") else {
        return;
    };
    let store = || async {
        RedisChannelStore::connect(&redis.url())
            .await
            .expect("connect")
    };
    shared_channel(store().await, store().await, store().await).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_meets_the_channel_store_contract() {
    use tower_x402::channel::PostgresChannelStore;
    let Some(server) = pg_server::PgServer::start("channel_postgres_contract") else {
        return;
    };
    let store = PostgresChannelStore::connect(&server.url())
        .await
        .expect("connect");
    assert!(store.is_shared());
    conformance(&store, now(), 1, |s| {
        tokio::time::sleep(std::time::Duration::from_secs(s))
    })
    .await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_postgres_share_a_channel_and_64_copies_of_a_voucher_run_once() {
    use tower_x402::channel::PostgresChannelStore;
    let Some(server) = pg_server::PgServer::start("channel_postgres_instances") else {
        return;
    };
    let store = || async {
        PostgresChannelStore::connect(&server.url())
            .await
            .expect("connect")
            .with_prefix("shared_")
    };
    shared_channel(store().await, store().await, store().await).await;
}
