//! Redis plumbing every Redis store shares: a fail-fast connection, one script run under a
//! deadline with one retry after a dropped connection, and the builder methods.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{RedisError, Script};

use super::{BoxError, ClaimToken, StoreError};

/// Largest expiry passed to Redis, in ms: keeps the script's arithmetic exact (Lua numbers
/// are doubles). About the year 287,000.
pub(crate) const MAX_EXPIRY_MS: u64 = (1 << 53) - 1;
/// Pause before the one retry after a connection error, letting the reconnect start.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// The builder methods every Redis store of this crate shares; the type has `conn`, `prefix`,
/// `timeout` and `retry_after` fields, `new(ConnectionManager)` and a `CONNECT_TIMEOUT`.
macro_rules! redis_store_builders {
    ($ty:ident, $prefix:literal) => {
        impl $ty {
            #[doc = concat!(
                "Connects to `url` (`redis://[:password@]host[:port][/db]`; `rediss://` needs a ",
                "TLS feature of the `redis` crate) and waits for the first connection, at most [`",
                stringify!($ty), "::CONNECT_TIMEOUT`].\n\n",
                "Each later connection attempt times out after 1 s, and reconnection attempts are ",
                "at most 200 ms apart (100 ms plus jitter), so service resumes within the command ",
                "deadline once Redis is back. For a connection made only on first use, build a ",
                "manager with `ConnectionManager::new_lazy_with_config` and pass it to [`",
                stringify!($ty), "::new`].\n\n",
                "# Errors\n[`StoreError::Unavailable`](crate::store::StoreError::Unavailable): ",
                "the URL does not parse, or Redis cannot be reached in time."
            )]
            pub async fn connect(url: &str) -> Result<Self, $crate::store::StoreError> {
                Ok(Self::new(
                    $crate::store::redis::connect(url, Self::CONNECT_TIMEOUT).await?,
                ))
            }

            /// The connection manager (cheap to clone): open the crate's other Redis stores
            /// (nonces, idempotency, prepaid credit) on the same Redis with it.
            pub fn connection(&self) -> ::redis::aio::ConnectionManager {
                self.conn.clone()
            }

            #[doc = concat!(
                "Sets the key prefix (default `\"", $prefix, "\"`): give each deployment (and ",
                "each prepaid route) sharing a Redis its own."
            )]
            pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
                self.prefix = prefix.into();
                self
            }

            /// Sets the deadline of each operation, retry included (default 500 ms). Past it
            /// the request fails closed with 503.
            pub fn with_timeout(mut self, timeout: ::std::time::Duration) -> Self {
                self.timeout = timeout;
                self
            }

            /// Sets the `Retry-After` suggested when Redis is unavailable (default none: the
            /// layer's own `retry_after` applies).
            pub fn with_retry_after(mut self, wait: ::std::time::Duration) -> Self {
                self.retry_after = Some(wait);
                self
            }
        }
    };
}
pub(crate) use redis_store_builders;

/// Runs `script` on `key` under `timeout`; with `retry`, once more after a connection error,
/// with a last argument `"1"` (`"0"` on the first attempt) so the script can recognise its
/// own earlier write. Every failure is [`StoreError::Unavailable`].
pub(crate) async fn run_script<T: ::redis::FromRedisValue>(
    conn: &ConnectionManager,
    script: &Script,
    key: &str,
    args: &[&[u8]],
    retry: bool,
    timeout: Duration,
    retry_after: Option<Duration>,
) -> Result<T, StoreError> {
    let attempt = |again: bool| {
        let mut conn = conn.clone();
        let mut inv = script.key(key);
        for a in args {
            inv.arg(*a);
        }
        if retry {
            inv.arg(if again { "1" } else { "0" });
        }
        async move { inv.invoke_async::<T>(&mut conn).await }
    };
    let work = async {
        match attempt(false).await {
            Err(e) if retry && is_connection_error(&e) => {
                tokio::time::sleep(RETRY_PAUSE).await;
                attempt(true).await
            }
            other => other,
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(retry_after, e)),
        Err(_) => Err(unavailable(retry_after, Timeout(timeout))),
    }
}

/// Connects a manager configured for fail-fast use (see [`RedisNonceStore::connect`]).
pub(crate) async fn connect(url: &str, within: Duration) -> Result<ConnectionManager, StoreError> {
    let client = ::redis::Client::open(url).map_err(|e| unavailable(None, e))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(100));
    match tokio::time::timeout(within, ConnectionManager::new_with_config(client, config)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unavailable(None, e)),
        Err(_) => Err(unavailable(None, Timeout(within))),
    }
}

pub(crate) fn unavailable(
    retry_after: Option<Duration>,
    source: impl Into<BoxError>,
) -> StoreError {
    StoreError::Unavailable {
        retry_after,
        source: source.into(),
    }
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

/// A Redis operation ran past its deadline.
#[derive(Debug, thiserror::Error)]
#[error("redis did not answer within {0:?}")]
struct Timeout(Duration);

/// A fresh token, unique even if the OS randomness failed (then [`ClaimToken::random`] is
/// all zeros): a process-wide counter and the time are mixed in.
pub(crate) fn new_token() -> ClaimToken {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    ClaimToken(ClaimToken::random().0 ^ u128::from(n) ^ (u128::from(nanos) << 64))
}
