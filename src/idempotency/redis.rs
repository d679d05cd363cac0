//! [`RedisIdempotencyStore`]: payment ids in Redis (feature `redis`).

use std::sync::LazyLock;
use std::time::Duration;

use crate::store::RedisConnection;
use ::redis::Script;
use alloy_primitives::hex;
use async_trait::async_trait;

use super::{
    Begin, ClaimToken, Fingerprint, IdempotencyKey, IdempotencyStore, StoreError, StoredResponse,
};
use crate::store::redis::{self, MAX_EXPIRY_MS, new_token};

/// `KEYS[1]` the key, `ARGV[1]` the in-progress value, `ARGV[2]` expiry in Unix ms,
/// `ARGV[3]` minimum and `ARGV[4]` maximum TTL in ms, `ARGV[5]` `"1"` on a retry. Returns nil
/// when this caller holds the key now, else the value found.
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at = tonumber(ARGV[2])
local hi = now + tonumber(ARGV[4])
if at > hi then at = hi end
local lo = now + tonumber(ARGV[3])
if at < lo then at = lo end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PXAT', string.format('%d', at)) then return false end
local v = redis.call('GET', KEYS[1])
if ARGV[5] == '1' and v == ARGV[1] then return false end
return v
",
    )
});

/// `KEYS[1]` the key, `ARGV[1]` the holder's token (32 hex digits), `ARGV[2]` the encoded
/// response. Keeps the fingerprint, swaps in-progress for done. Returns 1 when stored (now or
/// by an earlier attempt), else 0.
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local kind = string.sub(v, 1, 1)
if kind == 'p' and string.sub(v, 66) == ARGV[1] then
  redis.call('SET', KEYS[1], 'd' .. string.sub(v, 2, 65) .. ARGV[2], 'KEEPTTL')
  return 1
end
if kind == 'd' and string.sub(v, 66) == ARGV[2] then return 1 end
return 0
",
    )
});

/// `KEYS[1]` the key, `ARGV[1]` the holder's token. Returns 1 when deleted.
static ABORT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'p' and string.sub(v, 66) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// An [`IdempotencyStore`] in Redis: one atomic claim per (payer, id) across every instance
/// sharing the Redis, and the stored response for all of them.
///
/// # Key layout
///
/// ```text
/// <prefix><payer: 40 lowercase hex digits>:<id>
/// ```
///
/// The prefix defaults to `"x402:idem:"` (the nonce store's is `"x402:nonce:"`). Ids are
/// `[A-Za-z0-9_-]` only, so no two keys collide. The value is
///
/// * `p<fingerprint: 64 hex><token: 32 hex>` while in progress,
/// * `d<fingerprint: 64 hex><StoredResponse::to_bytes>` once done,
///
/// with an absolute expiry (`PXAT`): the time `begin` asks (from the layer: an hour past the
/// authorization's `validBefore`), at most the maximum TTL (default 1 h) and at least the
/// minimum TTL (default 1 s) ahead of Redis's clock.
///
/// # Scripts and atomicity
///
/// Each operation is one Lua script, run atomically by Redis:
///
/// * **begin**: `SET key <in-progress> NX PXAT ..`; when the key exists the same script
///   returns its value, from which the caller tells in progress, done or conflict (another
///   fingerprint). One winner among any number of concurrent callers, on any instances.
/// * **complete**: compare-and-set: only if the value is in progress with the holder's
///   token, rewrite it to done (same fingerprint), `KEEPTTL`.
/// * **abort**: compare-and-delete on in progress with the holder's token.
///
/// # Failure behaviour: fail closed
///
/// Every operation runs under a deadline (default 500 ms); an error, a timeout or an entry
/// that does not decode is [`StoreError::Unavailable`], which the layer answers with 503 and
/// `Retry-After` without running the handler. `begin` and `complete` are retried once after a
/// connection error (both recognise their own earlier write); `abort` is not.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_x402::idempotency::RedisIdempotencyStore;
/// use tower_x402::nonce::RedisNonceStore;
/// let nonces = RedisNonceStore::connect("redis://127.0.0.1:6379/").await?;
/// // The same connection for both.
/// let ids = RedisIdempotencyStore::new(nonces.connection()).with_prefix("myapp:idem:");
/// # let _ = ids;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RedisIdempotencyStore {
    redis: redis::Base,
    min_ttl: Duration,
    max_ttl: Duration,
}

redis::redis_store_builders!(RedisIdempotencyStore, "x402:idem:", base = redis);

impl RedisIdempotencyStore {
    /// Default minimum TTL of an entry.
    pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);
    /// Default maximum TTL of an entry.
    pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

    /// A store on `conn` (e.g. [`RedisNonceStore::connection`](crate::nonce::RedisNonceStore::connection)),
    /// with the defaults.
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        Self {
            redis: redis::Base::new(conn.into(), Self::DEFAULT_PREFIX),
            min_ttl: Self::DEFAULT_MIN_TTL,
            max_ttl: Self::DEFAULT_MAX_TTL,
        }
    }

    setters! {
        /// Sets the longest life of an entry (default 1 h), by Redis's clock.
        pub fn with_max_ttl(ttl: Duration) => max_ttl = ttl;

        /// Sets the shortest life of an entry (default 1 s), by Redis's clock.
        pub fn with_min_ttl(ttl: Duration) => min_ttl = ttl;
    }

    /// The Redis key of `key` (see the [type docs](RedisIdempotencyStore)).
    pub fn redis_key(&self, key: &IdempotencyKey) -> String {
        let id = key.id.as_str();
        let mut out = self.redis.key(key.payer.as_slice(), 1 + id.len());
        out.push(':');
        out.push_str(id);
        out
    }
}

fn token_hex(token: ClaimToken) -> String {
    format!("{:032x}", token.0)
}

fn in_progress(fingerprint: Fingerprint, token: ClaimToken) -> Vec<u8> {
    format!("p{}{}", hex::encode(fingerprint.0), token_hex(token)).into_bytes()
}

fn millis(d: Duration) -> String {
    d.as_millis()
        .clamp(1, u128::from(MAX_EXPIRY_MS))
        .to_string()
}

#[async_trait]
impl IdempotencyStore for RedisIdempotencyStore {
    async fn begin(
        &self,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        expires_at: u64,
    ) -> Result<Begin, StoreError> {
        let token = new_token();
        let mine = in_progress(fingerprint, token);
        let at = expires_at
            .saturating_mul(1000)
            .min(MAX_EXPIRY_MS)
            .to_string();
        let (lo, hi) = (millis(self.min_ttl), millis(self.max_ttl));
        let found: Option<Vec<u8>> = self
            .redis
            .run(
                &BEGIN,
                &self.redis_key(key),
                &[&mine, at.as_bytes(), lo.as_bytes(), hi.as_bytes()],
                true,
            )
            .await?;
        let Some(found) = found else {
            return Ok(Begin::Started(token));
        };
        let fp = hex::encode(fingerprint.0);
        let corrupt = || self.redis.unavailable(super::CorruptResponse);
        let (Some(kind), Some(theirs)) = (found.first(), found.get(1..65)) else {
            return Err(corrupt());
        };
        if theirs != fp.as_bytes() {
            return Ok(Begin::Conflict);
        }
        match kind {
            b'p' => Ok(Begin::InProgress),
            b'd' => StoredResponse::from_bytes(&found[65..])
                .map(|r| Begin::Done(Box::new(r)))
                .map_err(|_| corrupt()),
            _ => Err(corrupt()),
        }
    }

    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: ClaimToken,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let (token, response) = (token_hex(token), response.to_bytes());
        self.redis
            .run_held(
                &COMPLETE,
                &self.redis_key(key),
                &[token.as_bytes(), &response],
                true,
            )
            .await
    }

    async fn abort(&self, key: &IdempotencyKey, token: ClaimToken) -> Result<(), StoreError> {
        let token = token_hex(token);
        self.redis
            .run_held(&ABORT, &self.redis_key(key), &[token.as_bytes()], false)
            .await
    }

    fn is_shared(&self) -> bool {
        true
    }
}
