//! [`RedisNonceStore`]: the replay guard in Redis (feature `redis`). The documentation
//! (key layout, scripts, atomicity, failure behaviour) is on the type.

use std::sync::LazyLock;

use std::time::Duration;

use crate::store::RedisConnection;
use ::redis::Script;
use async_trait::async_trait;

use super::{ClaimToken, NonceKey, NonceStore, Reservation, StoreError};
pub(crate) use crate::store::redis::MAX_EXPIRY_MS;
use crate::store::redis::{self, new_token};

/// `KEYS[1]` the key, `ARGV[1]` `<token>:r`, `ARGV[2]` expiry in Unix ms, `ARGV[3]` minimum
/// TTL in ms, `ARGV[4]` `"1"` on a retry. Returns nil when this caller holds the key now, else
/// the value found.
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
local at = ARGV[2]
if tonumber(at) < floor then at = string.format('%d', floor) end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PXAT', at) then return false end
local v = redis.call('GET', KEYS[1])
if ARGV[4] == '1' and v == ARGV[1] then return false end
return v
",
    )
});

/// `KEYS[1]` the key, `ARGV[1]` `<token>:r`, `ARGV[2]` `<token>:u`. Returns 1 when the holder
/// consumed it (now or before), 0 otherwise.
static CONSUME: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
if v == ARGV[2] then return 1 end
return 0
",
    )
});

/// `KEYS[1]` the key, `ARGV[1]` `<token>:r`. Returns 1 when the holder released it, else 0.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// A [`NonceStore`] in Redis: one atomic claim per proof across every instance that shares
/// the Redis.
///
/// # Key layout
///
/// One string key per authorization:
///
/// ```text
/// <prefix><160 lowercase hex digits>
///          └ chain_id (8 bytes, big-endian) ‖ asset (20) ‖ from (20) ‖ nonce (32)
/// ```
///
/// The prefix defaults to `"x402:nonce:"`. Every field has a fixed width, so two different
/// [`NonceKey`]s never share a key. The value is `<token>:r` while reserved and `<token>:u`
/// once used, where `<token>` is the 32 hex digits of the holder's [`ClaimToken`]. Every key
/// carries an absolute expiry (`PXAT`): the authorization's `validBefore`.
///
/// # Scripts and atomicity
///
/// Each operation is ONE Lua script, and Redis runs a script atomically: no other command
/// runs between its reads and its writes, whichever instance sent it.
///
/// * **reserve**: `SET key <token>:r NX PXAT <validBefore in ms>`. If the key already exists,
///   the same script returns its value, so the answer ([`Reservation::InUse`] for `:r`,
///   [`Reservation::Used`] for `:u`) is read in the same atomic step as the failed `SET`. Exactly
///   one of any number of concurrent callers, on any number of instances, wins the `SET NX`.
/// * **consume**: if the value is `<token>:r`, rewrite it to `<token>:u` with `KEEPTTL` (the
///   key stays blocked until `validBefore`). Consuming again with the same token is a no-op.
/// * **release**: if the value is `<token>:r`, delete the key.
///
/// A caller whose token does not match (a stranger, or a holder whose reservation already
/// expired) gets [`StoreError::NotHeld`] and changes nothing.
///
/// **Expiry already passed.** The script reads Redis's own clock (`TIME`) and never sets an
/// expiry less than a minimum TTL (default 1 s, see [`RedisNonceStore::with_min_ttl`]) ahead
/// of it. So an `expires_at` at or before Redis's now (or closer than the minimum TTL) still
/// answers `Reserved`, and the key lives for the minimum TTL: it can never live forever, yet for that moment concurrent
/// duplicates are still refused and the holder can still consume or release. (Through the
/// layer this happens only if Redis's clock runs ahead of the verifier's by more than the
/// verifier's headroom: keep both NTP-synced.)
///
/// Requires Redis 6.2 or later (`PXAT`, `KEEPTTL`), or a compatible server such as Valkey.
///
/// # Failure behaviour: fail closed
///
/// Every command runs under a deadline (default 500 ms, [`RedisNonceStore::with_timeout`]).
/// A connection error, a Redis error or the deadline turns into [`StoreError::Unavailable`]:
/// the layer answers 503 with `Retry-After` and the handler does not run. Nothing here panics.
///
/// The connection ([`RedisConnection`]) reconnects by itself: once Redis is back, requests succeed again
/// without rebuilding the store. After a connection error `reserve` and `consume` are retried
/// once within the same deadline (both are idempotent for the same token: a retry that finds
/// its own earlier write counts it), so the first request after Redis returns usually
/// succeeds. `release` is not retried.
///
/// An operation whose reply is lost (deadline hit after Redis ran it) leaves the key reserved:
/// it stays blocked until `validBefore`, never free twice. A client is never charged twice
/// for one proof; at worst it must sign a new one.
///
/// A Tokio runtime with the time driver enabled (as `#[tokio::main]` gives) is required.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_x402::nonce::RedisNonceStore;
/// use tower_x402::PaymentLayer;
/// use tower_x402::primitives::address;
///
/// let store = RedisNonceStore::connect("redis://127.0.0.1:6379/")
///     .await?
///     .with_prefix("myapp:x402:")
///     .with_timeout(Duration::from_millis(300))
///     .with_retry_after(Duration::from_secs(2));
/// let paywall = PaymentLayer::builder()
///     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
///     .price("$0.001")
///     .network(tower_x402::Network::BASE_SEPOLIA)
///     .nonce_store(store)
///     .build()?;
/// # let _ = paywall;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RedisNonceStore {
    redis: redis::Base,
    min_ttl: Duration,
}

redis::redis_store_builders!(RedisNonceStore, "x402:nonce:", base = redis);

impl RedisNonceStore {
    /// Default minimum TTL of a reservation (see [`RedisNonceStore::with_min_ttl`]).
    pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);

    /// A store on `conn`, with the defaults: prefix `"x402:nonce:"`, 500 ms per command, no
    /// `Retry-After` of its own (the layer's applies).
    ///
    /// The manager's own configuration applies to reconnection; [`RedisNonceStore::connect`]
    /// chooses one suited to fail-fast use.
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        Self {
            redis: redis::Base::new(conn.into(), Self::DEFAULT_PREFIX),
            min_ttl: Self::DEFAULT_MIN_TTL,
        }
    }

    /// Sets the minimum TTL of a reservation, by Redis's clock (default 1 s; whole
    /// milliseconds, at least 1). An `expires_at` closer than that, or already past, is held
    /// for this long instead: never forever, and long enough for the holder to finish.
    pub fn with_min_ttl(mut self, ttl: Duration) -> Self {
        self.min_ttl = ttl;
        self
    }

    /// The Redis key of `key`: the prefix and 160 hex digits (see the [type docs](RedisNonceStore)).
    pub fn redis_key(&self, key: &NonceKey) -> String {
        let mut raw = [0u8; 80];
        raw[..8].copy_from_slice(&key.chain_id.to_be_bytes());
        raw[8..28].copy_from_slice(key.asset.as_slice());
        raw[28..48].copy_from_slice(key.from.as_slice());
        raw[48..].copy_from_slice(key.nonce.as_slice());
        self.redis.key(&raw, 0)
    }
}

fn value(token: ClaimToken, state: char) -> String {
    format!("{:032x}:{state}", token.0)
}

#[async_trait]
impl NonceStore for RedisNonceStore {
    async fn reserve(&self, key: &NonceKey, expires_at: u64) -> Result<Reservation, StoreError> {
        let token = new_token();
        let at = expires_at
            .saturating_mul(1000)
            .min(MAX_EXPIRY_MS)
            .to_string();
        let min_ttl = self
            .min_ttl
            .as_millis()
            .clamp(1, u128::from(u32::MAX))
            .to_string();
        let found: Option<String> = self
            .redis
            .run(
                &RESERVE,
                &self.redis_key(key),
                &[
                    value(token, 'r').as_bytes(),
                    at.as_bytes(),
                    min_ttl.as_bytes(),
                ],
                true,
            )
            .await?;
        Ok(match found {
            None => Reservation::Reserved(token),
            Some(v) if v.ends_with(":u") => Reservation::Used,
            // `:r`, or anything unexpected under our prefix: refuse, never double-serve.
            Some(_) => Reservation::InUse,
        })
    }

    async fn consume(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError> {
        let (reserved, used) = (value(token, 'r'), value(token, 'u'));
        self.redis
            .run_held(
                &CONSUME,
                &self.redis_key(key),
                &[reserved.as_bytes(), used.as_bytes()],
                true,
            )
            .await
    }

    async fn release(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError> {
        let reserved = value(token, 'r');
        self.redis
            .run_held(
                &RELEASE,
                &self.redis_key(key),
                &[reserved.as_bytes()],
                false,
            )
            .await
    }

    fn is_shared(&self) -> bool {
        true
    }
}
