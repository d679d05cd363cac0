//! [`RedisChannelStore`]: channel state in Redis (feature `redis`), shared by every instance
//! of a server.
//!
//! # Key layout
//!
//! Per channel, a hash `{prefix}s:{channelId hex}` with `c` (the charged cumulative amount,
//! decimal: what commits compare) and `j` (the [`ChannelState`] as JSON), and the lease, a
//! string `{prefix}l:{channelId hex}` holding the holder's token with a `PX` expiry (Redis's
//! clock). Every operation is one single-key command or script, so it is atomic on one node
//! and on a cluster.
//!
//! [`ChannelStore::list`] reads the set `{prefix}index` (one key, so it lists every channel on
//! a cluster too, where a `SCAN` would see one node). A channel enters it **before** its first
//! commit and leaves it **after** its removal, so the index always holds every stored channel
//! (a crash in between leaves at most a stray id, whose `load` is `None`): the claim manager
//! never misses a voucher.
//!
//! # Durability
//!
//! The latest voucher is money: run Redis with AOF and `appendfsync always` (or accept losing
//! the vouchers of the last second on a crash; the spec lets the server fall back to the
//! on-chain claimed total, forfeiting what it had not claimed).

use std::sync::LazyLock;

use ::redis::Script;
use alloy_primitives::{B256, hex};
use async_trait::async_trait;

use super::store::{ChannelState, ChannelStore, Lease};
use crate::store::redis::{self, new_token, unavailable};
use crate::store::{RedisConnection, StoreError};

/// `KEYS[1]` the lease, `ARGV[1]` the token, `ARGV[2]` the lease in ms (Redis's clock
/// decides it). 1: taken.
static LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
",
    )
});

/// `KEYS[1]` the lease, `ARGV[1]` the token.
static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// `KEYS[1]` the state, `ARGV[1]` the expected charged amount (`-` for none), `ARGV[2]` the
/// new one, `ARGV[3]` the JSON. 1: written.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local c = redis.call('HGET', KEYS[1], 'c')
if ARGV[1] == '-' then
  if c then return 0 end
elseif c ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'c', ARGV[2], 'j', ARGV[3])
return 1
",
    )
});

/// `KEYS[1]` the state, `ARGV[1]` the expected charged amount. 1: deleted.
static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'c') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// A [`ChannelStore`] in Redis: leases and compare-and-set commits shared by every instance.
/// See the [module docs](self) for the key layout and durability.
#[derive(Clone, Debug)]
pub struct RedisChannelStore {
    redis: redis::Base,
}

redis::redis_store_builders!(RedisChannelStore, "x402:channel:", base = redis);

impl RedisChannelStore {
    /// A store on `conn`: prefix `"x402:channel:"`, 500 ms per command.
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        Self {
            redis: redis::Base::new(conn.into(), Self::DEFAULT_PREFIX),
        }
    }

    fn state_key(&self, channel: B256) -> String {
        format!("{}s:{}", self.redis.prefix, hex::encode(channel))
    }

    fn lease_key(&self, channel: B256) -> String {
        format!("{}l:{}", self.redis.prefix, hex::encode(channel))
    }

    fn index_key(&self) -> String {
        format!("{}index", self.redis.prefix)
    }

    /// One plain command under the deadline.
    async fn command<T: ::redis::FromRedisValue>(
        &self,
        cmd: &::redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = self.redis.conn.clone();
        tokio::time::timeout(self.redis.timeout, cmd.query_async(&mut conn))
            .await
            .map_err(|_| self.redis.unavailable("redis did not answer in time"))?
            .map_err(|e| self.redis.unavailable(e))
    }

    async fn script<T: ::redis::FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        // No retry: a commit repeated after a lost reply would compare against its own write.
        self.redis.run(script, key, args, false).await
    }
}

#[async_trait]
impl ChannelStore for RedisChannelStore {
    async fn load(&self, channel: B256) -> Result<Option<ChannelState>, StoreError> {
        let json: Option<String> = self
            .command(::redis::cmd("HGET").arg(self.state_key(channel)).arg("j"))
            .await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| self.redis.unavailable(e)))
            .transpose()
    }

    async fn lock(&self, channel: B256, seconds: u64) -> Result<Option<Lease>, StoreError> {
        let token = new_token();
        let at = seconds.clamp(1, 86_400).saturating_mul(1000).to_string();
        let taken: i64 = self
            .script(
                &LOCK,
                &self.lease_key(channel),
                &[token.0.to_string().as_bytes(), at.as_bytes()],
            )
            .await?;
        Ok((taken == 1).then_some(Lease { channel, token }))
    }

    async fn unlock(&self, lease: Lease) -> Result<(), StoreError> {
        let _: i64 = self
            .script(
                &UNLOCK,
                &self.lease_key(lease.channel),
                &[lease.token.0.to_string().as_bytes()],
            )
            .await?;
        Ok(())
    }

    async fn commit(
        &self,
        channel: B256,
        expected: Option<u128>,
        next: ChannelState,
    ) -> Result<bool, StoreError> {
        if expected.is_none() {
            // Indexed before it exists: the index never lacks a stored channel.
            let _: i64 = self
                .command(
                    ::redis::cmd("SADD")
                        .arg(self.index_key())
                        .arg(hex::encode(channel)),
                )
                .await?;
        }
        let expected = expected.map_or_else(|| "-".to_owned(), |c| c.to_string());
        let charged = next.charged_cumulative.to_string();
        let json = serde_json::to_string(&next).map_err(|e| unavailable(None, e))?;
        let written: i64 = self
            .script(
                &COMMIT,
                &self.state_key(channel),
                &[expected.as_bytes(), charged.as_bytes(), json.as_bytes()],
            )
            .await?;
        Ok(written == 1)
    }

    async fn remove(&self, channel: B256, expected: u128) -> Result<bool, StoreError> {
        let deleted: i64 = self
            .script(
                &REMOVE,
                &self.state_key(channel),
                &[expected.to_string().as_bytes()],
            )
            .await?;
        if deleted == 1 {
            // Unindexed after it is gone; if this fails the stray id loads as `None`.
            let _: Result<i64, _> = self
                .command(
                    ::redis::cmd("SREM")
                        .arg(self.index_key())
                        .arg(hex::encode(channel)),
                )
                .await;
        }
        Ok(deleted == 1)
    }

    async fn list(&self) -> Result<Vec<B256>, StoreError> {
        let index = self.index_key();
        let mut cursor = 0u64;
        let mut out = Vec::new();
        loop {
            let (next, ids): (u64, Vec<String>) = self
                .command(
                    ::redis::cmd("SSCAN")
                        .arg(&index)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await?;
            out.extend(ids.iter().filter_map(|h| h.parse::<B256>().ok()));
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    fn is_shared(&self) -> bool {
        true
    }
}
