//! [`RedisCreditLedger`]: prepaid credit in Redis (feature `redis`), shared by every instance.
//! The documentation (key layout, scripts, expiry, failure behaviour) is on the type.

use std::sync::LazyLock;
use std::time::Duration;

use crate::store::RedisConnection;
use ::redis::Script;
use alloy_primitives::Address;
use async_trait::async_trait;

use super::ledger::{CreditLedger, Debit, Grant, secs};
use crate::nonce::StoreError;
use crate::store::redis::{self, MAX_EXPIRY_MS};

/// Shared head of the three scripts. An entry is `<calls>:<expires_at>`, each side decimal
/// digits or empty (`None`). `ARGV[1]` is the retention in ms. `put` writes an entry with its
/// key expiry: `expires_at` plus the retention for timed credit, the retention alone for
/// spent counted credit, none otherwise. Anything else under the key raises a script error
/// (the caller fails closed).
const PRELUDE: &str = r"
local MAX = 9007199254740991
local KEEP = tonumber(ARGV[1])
local function parse(v)
  local c, e = string.match(v, '^(%d*):(%d*)$')
  if not c or #c > 16 or #e > 16 then error('x402: not a credit entry') end
  return c, e
end
local function put(c, e)
  local v = c .. ':' .. e
  if e ~= '' then
    local at = tonumber(e) * 1000 + KEEP
    if at > MAX then at = MAX end
    redis.call('SET', KEYS[1], v, 'PXAT', string.format('%d', at))
  elseif c == '0' then
    redis.call('SET', KEYS[1], v, 'PX', string.format('%d', KEEP))
  else
    redis.call('SET', KEYS[1], v)
  end
end
";

/// A script with [`PRELUDE`] ahead of `body`.
fn with_prelude(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// `ARGV[2]` now, `ARGV[3]` calls granted, `ARGV[4]` their expiry (empty: `None`). Live credit
/// is topped up (calls add, the later expiry wins, a `None` absorbs); absent or expired
/// credit is replaced. Returns 1.
static GRANT: LazyLock<Script> = LazyLock::new(|| {
    with_prelude(
        r"
local now = tonumber(ARGV[2])
local c, e = ARGV[3], ARGV[4]
local v = redis.call('GET', KEYS[1])
if v then
  local oc, oe = parse(v)
  if oe == '' or now < tonumber(oe) then
    if oc == '' or c == '' then c = '' else
      local n = tonumber(oc) + tonumber(c)
      if n > MAX then n = MAX end
      c = string.format('%d', n)
    end
    if oe == '' or e == '' then e = '' elseif tonumber(oe) > tonumber(e) then e = oe end
  end
end
put(c, e)
return 1
",
    )
});

/// `ARGV[2]` now. Returns the calls left after taking one, `-3` for a window (nothing taken),
/// `-1` exhausted (absent or zero), `-2` expired.
static DEBIT: LazyLock<Script> = LazyLock::new(|| {
    with_prelude(
        r"
local v = redis.call('GET', KEYS[1])
if not v then return -1 end
local c, e = parse(v)
if e ~= '' and tonumber(ARGV[2]) >= tonumber(e) then return -2 end
if c == '' then return -3 end
local n = tonumber(c)
if n < 1 then return -1 end
n = n - 1
put(string.format('%d', n), e)
return n
",
    )
});

/// Gives one call back to counted credit. Returns 1 when it did, 0 otherwise.
static REFUND: LazyLock<Script> = LazyLock::new(|| {
    with_prelude(
        r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local c, e = parse(v)
if c == '' then return 0 end
local n = tonumber(c) + 1
if n > MAX then n = MAX end
put(string.format('%d', n), e)
return 1
",
    )
});

/// A [`CreditLedger`] in Redis: every instance that shares the Redis sees the same credit,
/// and concurrent debits on any number of instances never take more calls than were granted.
///
/// # Key layout
///
/// One string key per payer:
///
/// ```text
/// <prefix><payer: 40 lowercase hex digits>   →   <calls>:<expires_at>
/// ```
///
/// The prefix defaults to `"x402:credit:"` (the nonce store's is `"x402:nonce:"`). `calls` is
/// the number of calls left and `expires_at` the Unix second the credit ends, each empty for
/// `None` (`":1767225600"` is a time window, `"9:"` nine calls with no time limit). One ledger
/// sells one bundle: give each prepaid route its own prefix.
///
/// # Scripts and atomicity
///
/// Each method is ONE Lua script, run atomically by Redis: no other command runs between its
/// read and its write, whichever instance sent it.
///
/// * **grant**: reads the entry; live credit is topped up (calls add, the later expiry wins),
///   absent or expired credit is replaced; writes the result.
/// * **debit**: expired → [`Debit::Expired`]; a window → [`Debit::Debited`] with no write;
///   counted calls → decrement, or [`Debit::Exhausted`] at zero or when absent.
/// * **refund**: one call back to counted credit; nothing for a window or an absent entry.
///
/// The semantics are those of [`MemoryCreditLedger`](super::MemoryCreditLedger), decided by
/// the `now` the layer passes (its [`Clock`](crate::clock::Clock)), not by Redis's clock.
/// Counts are capped at 2⁵³ − 1 and times at 2⁵³ − 1 ms (the year 287,000), so the scripts'
/// arithmetic is exact.
///
/// # Expiry: Redis forgets dead credit
///
/// A key carries an absolute expiry (`PXAT`) when the credit does: its `expires_at` plus the
/// retention (default 1 day, [`RedisCreditLedger::with_retention`]). Spent counted credit
/// (zero calls) expires after the retention too; live counted credit without a time limit has
/// no key expiry. During the retention a sign-in is told `prepaid_credit_expired`, after it
/// `prepaid_credit_exhausted` (both: buy another bundle). Key expiry follows Redis's clock:
/// keep it NTP-synced with the layer's.
///
/// Requires Redis 6.2 or later (`PXAT`), or a compatible server such as Valkey. Without
/// persistence (RDB/AOF) a Redis restart loses the credit that was paid for.
///
/// # Failure behaviour: fail closed
///
/// Every operation runs under a deadline (default 500 ms, [`RedisCreditLedger::with_timeout`]).
/// A connection error, a Redis error, an entry under the key that does not parse or the
/// deadline is [`StoreError::Unavailable`]: a sign-in is answered 503 with `Retry-After` and
/// the handler does not run. Nothing here panics.
///
/// No operation is retried: none is idempotent (a retried grant would credit twice). A debit
/// whose reply is lost (deadline hit after Redis ran it) has taken its call: the sign-in
/// got a 503, so the payer loses that one call, never the server. A grant that fails after
/// the payment settled is logged (feature `tracing`); that call was still served.
///
/// A Tokio runtime with the time driver enabled (as `#[tokio::main]` gives) is required.
///
/// # Example
///
/// Two instances behind one load balancer share the Redis, the nonce key and the prefix:
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_x402::nonce::RedisNonceStore;
/// use tower_x402::prepaid::{Bundle, Prepaid, RedisCreditLedger};
/// use tower_x402::primitives::address;
/// use tower_x402::{Network, PaymentLayer};
///
/// let nonces = RedisNonceStore::connect("redis://127.0.0.1:6379/").await?;
/// // The same connection for both.
/// let ledger = RedisCreditLedger::new(nonces.connection()).with_prefix("myapp:credit:search:");
/// # fn shared_secret() -> [u8; 32] { [7; 32] }
/// let nonce_key: [u8; 32] = shared_secret(); // the same on every instance
/// let paywall = PaymentLayer::builder()
///     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
///     .network(Network::BASE_SEPOLIA)
///     .resource_base("https://api.example.com")
///     .nonce_store(nonces)
///     .prepaid(
///         Prepaid::new(Bundle::calls(100).within(Duration::from_secs(86_400)).for_price("$0.10"))
///             .ledger(ledger)
///             .nonce_key(nonce_key),
///     )
///     .build()?;
/// # let _ = paywall;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RedisCreditLedger {
    redis: redis::Base,
    retention: Duration,
}

redis::redis_store_builders!(RedisCreditLedger, "x402:credit:", base = redis);

impl RedisCreditLedger {
    /// Default time Redis keeps spent or expired credit.
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(86_400);

    /// A ledger on `conn` (e.g. [`RedisNonceStore::connection`](crate::nonce::RedisNonceStore::connection)),
    /// with the defaults: prefix `"x402:credit:"`, 500 ms per operation, 1 day of retention,
    /// no `Retry-After` of its own (the layer's applies).
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        Self {
            redis: redis::Base::new(conn.into(), Self::DEFAULT_PREFIX),
            retention: Self::DEFAULT_RETENTION,
        }
    }

    /// Sets how long Redis keeps credit after it expired or was spent (default 1 day; whole
    /// milliseconds, at least 1). Expired credit is reported as expired for that long; a
    /// refund of the last call must come within it (it comes within the request).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The Redis key of `payer`: the prefix and 40 lowercase hex digits.
    pub fn redis_key(&self, payer: Address) -> String {
        self.redis.key(payer.as_slice(), 0)
    }

    async fn run(
        &self,
        script: &Script,
        payer: Address,
        args: &[&[u8]],
    ) -> Result<i64, StoreError> {
        let keep = self
            .retention
            .as_millis()
            .clamp(1, u128::from(MAX_EXPIRY_MS))
            .to_string();
        let mut all: Vec<&[u8]> = Vec::with_capacity(args.len() + 1);
        all.push(keep.as_bytes());
        all.extend_from_slice(args);
        self.redis
            .run(script, &self.redis_key(payer), &all, false)
            .await
    }
}

/// A script answered something it never returns.
#[derive(Debug, thiserror::Error)]
#[error("unexpected credit ledger reply {0}")]
struct UnexpectedReply(i64);

#[async_trait]
impl CreditLedger for RedisCreditLedger {
    async fn grant(&self, payer: Address, grant: Grant, now: u64) -> Result<(), StoreError> {
        // Capped, so that the scripts' arithmetic stays exact (Lua numbers are doubles).
        let grant = grant.capped();
        let calls = grant.calls.map_or_else(String::new, |n| n.to_string());
        let expires_at = grant.expires_at.map_or_else(String::new, |t| t.to_string());
        let now = secs(now).to_string();
        self.run(
            &GRANT,
            payer,
            &[now.as_bytes(), calls.as_bytes(), expires_at.as_bytes()],
        )
        .await
        .map(|_| ())
    }

    async fn debit(&self, payer: Address, now: u64) -> Result<Debit, StoreError> {
        let now = secs(now).to_string();
        match self.run(&DEBIT, payer, &[now.as_bytes()]).await? {
            -1 => Ok(Debit::Exhausted),
            -2 => Ok(Debit::Expired),
            -3 => Ok(Debit::Debited { remaining: None }),
            n => u64::try_from(n)
                .map(|n| Debit::Debited { remaining: Some(n) })
                .map_err(|_| self.redis.unavailable(UnexpectedReply(n))),
        }
    }

    async fn refund(&self, payer: Address) -> Result<(), StoreError> {
        self.run(&REFUND, payer, &[]).await.map(|_| ())
    }

    fn is_shared(&self) -> bool {
        true
    }
}
