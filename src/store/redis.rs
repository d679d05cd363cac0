//! Redis plumbing every Redis store shares: a fail-fast connection, one script run under a
//! deadline with one retry after a dropped connection, and the builder methods.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::{Cmd, Pipeline, RedisError, RedisFuture, Script, Value};

use super::{BoxError, ClaimToken, StoreError};

/// Largest expiry passed to Redis, in ms: keeps the script's arithmetic exact (Lua numbers
/// are doubles). About the year 287,000.
pub(crate) const MAX_EXPIRY_MS: u64 = (1 << 53) - 1;
/// Pause before the one retry after a connection error, letting the reconnect start.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// The connection every Redis store of this crate speaks through (cheap to clone): one Redis
/// node, through a [`ConnectionManager`] that reconnects by itself, or (feature
/// `redis-cluster`) a Redis Cluster. Each store runs one script on one key per operation, so
/// a cluster routes it to the key's slot with no cross-slot script.
///
/// ```no_run
/// # async fn demo() -> Result<(), tower_x402::store::StoreError> {
/// use tower_x402::nonce::RedisNonceStore;
/// use tower_x402::store::RedisConnection;
/// let conn = RedisConnection::connect("redis://127.0.0.1:6379/").await?;
/// let nonces = RedisNonceStore::new(conn.clone());
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub enum RedisConnection {
    /// One node (or a primary behind a proxy).
    Node(ConnectionManager),
    /// A Redis Cluster (feature `redis-cluster`).
    #[cfg(feature = "redis-cluster")]
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(_) => f.write_str("RedisConnection::Node"),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(_) => f.write_str("RedisConnection::Cluster"),
        }
    }
}

impl From<ConnectionManager> for RedisConnection {
    fn from(conn: ConnectionManager) -> Self {
        Self::Node(conn)
    }
}

#[cfg(feature = "redis-cluster")]
impl From<::redis::cluster_async::ClusterConnection> for RedisConnection {
    fn from(conn: ::redis::cluster_async::ClusterConnection) -> Self {
        Self::Cluster(conn)
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConnection {
    /// Connects to one node at `url`: `redis://[:password@]host[:port][/db]`, or with feature
    /// `redis-tls` `rediss://…` (TLS, the server's certificate checked against the system's
    /// and the webpki roots). Waits for the first connection at most `within`; later
    /// connection attempts time out after 1 s and come at most 200 ms apart, so service
    /// resumes within a command deadline once Redis is back.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]: the URL does not parse, or Redis cannot be reached in time.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = ::redis::Client::open(url).map_err(|e| unavailable(None, e))?;
        Self::node(client, CONNECT_TIMEOUT).await
    }

    /// Connects to one node over TLS whose certificate is signed by `root_cert` (PEM), a
    /// private CA (feature `redis-tls`; `url` is `rediss://…`).
    ///
    /// # Errors
    /// As [`Self::connect`]; also a certificate that does not parse.
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub async fn connect_tls(url: &str, root_cert: &[u8]) -> Result<Self, StoreError> {
        install_crypto();
        let certs = ::redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert.to_vec()),
        };
        let client =
            ::redis::Client::build_with_tls(url, certs).map_err(|e| unavailable(None, e))?;
        Self::node(client, CONNECT_TIMEOUT).await
    }

    /// Connects to a Redis Cluster through any of `nodes` (`redis://host:port`, or
    /// `rediss://` with `redis-tls`); the cluster's own map then routes each key to its slot
    /// and follows failovers. Commands time out after 1 s on the wire (each store adds its
    /// own deadline).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]: no node answers in time, or the cluster is not serving.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub async fn cluster(nodes: &[&str]) -> Result<Self, StoreError> {
        #[cfg(feature = "redis-tls")]
        install_crypto();
        let client = ::redis::cluster::ClusterClientBuilder::new(nodes.iter().copied())
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| unavailable(None, e))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection()).await {
            Ok(Ok(conn)) => Ok(Self::Cluster(conn)),
            Ok(Err(e)) => Err(unavailable(None, e)),
            Err(_) => Err(unavailable(None, Timeout(CONNECT_TIMEOUT))),
        }
    }

    async fn node(client: ::redis::Client, within: Duration) -> Result<Self, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(100));
        match tokio::time::timeout(within, ConnectionManager::new_with_config(client, config)).await
        {
            Ok(Ok(conn)) => Ok(Self::Node(conn)),
            Ok(Err(e)) => Err(unavailable(None, e)),
            Err(_) => Err(unavailable(None, Timeout(within))),
        }
    }
}

/// How long [`RedisConnection::connect`] waits for the first connection.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// rustls needs one process-wide crypto provider; with several compiled in (reqwest brings
/// aws-lc-rs) it cannot pick one itself. Ours is ring, unless the application installed one.
#[cfg(feature = "redis-tls")]
fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The builder methods every Redis store of this crate shares, on the [`Base`] field named
/// after `base =`, and the `DEFAULT_*` and `CONNECT_TIMEOUT` constants. The type has
/// `new(impl Into<RedisConnection>)`; `$prefix` is its default prefix.
macro_rules! redis_store_builders {
    ($ty:ident, $prefix:literal, base = $base:ident) => {
        impl $ty {
            /// Default key prefix.
            pub const DEFAULT_PREFIX: &str = $prefix;
            /// Default deadline of each operation.
            pub const DEFAULT_TIMEOUT: ::std::time::Duration =
                $crate::store::redis::DEFAULT_TIMEOUT;
            #[doc = concat!("The longest [`", stringify!($ty),
                "::connect`] waits for the first connection.")]
            pub const CONNECT_TIMEOUT: ::std::time::Duration =
                $crate::store::redis::CONNECT_TIMEOUT;
        }
        impl $ty {
            #[doc = concat!(
                "Connects to one Redis node at `url` (`redis://[:password@]host[:port][/db]`, ",
                "`rediss://` with feature `redis-tls`) as [`RedisConnection::connect`]",
                "(crate::store::RedisConnection::connect) does. For a cluster, a private CA or a ",
                "connection made only on first use, make the [`RedisConnection`]",
                "(crate::store::RedisConnection) yourself and pass it to [`",
                stringify!($ty), "::new`].\n\n",
                "# Errors\n[`StoreError::Unavailable`](crate::store::StoreError::Unavailable): ",
                "the URL does not parse, or Redis cannot be reached in time."
            )]
            pub async fn connect(url: &str) -> Result<Self, $crate::store::StoreError> {
                Ok(Self::new(
                    $crate::store::RedisConnection::connect(url).await?,
                ))
            }

            /// The connection (cheap to clone): open the crate's other Redis stores (nonces,
            /// idempotency, prepaid credit) on the same Redis with it.
            pub fn connection(&self) -> $crate::store::RedisConnection {
                self.$base.conn.clone()
            }

            #[doc = concat!(
                "Sets the key prefix (default `\"", $prefix, "\"`): give each deployment (and ",
                "each prepaid route) sharing a Redis its own."
            )]
            pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
                self.$base.prefix = prefix.into();
                self
            }

            /// Sets the deadline of each operation, retry included (default 500 ms). Past it
            /// the request fails closed with 503.
            pub fn with_timeout(mut self, timeout: ::std::time::Duration) -> Self {
                self.$base.timeout = timeout;
                self
            }

            /// Sets the `Retry-After` suggested when Redis is unavailable (default none: the
            /// layer's own `retry_after` applies).
            pub fn with_retry_after(mut self, wait: ::std::time::Duration) -> Self {
                self.$base.retry_after = Some(wait);
                self
            }
        }
    };
}
pub(crate) use redis_store_builders;

/// Default deadline of each operation.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// What every Redis store holds (one field of it, named to [`redis_store_builders!`]): the
/// connection and the settings the builder methods set.
#[derive(Clone)]
pub(crate) struct Base {
    pub(crate) conn: RedisConnection,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) retry_after: Option<Duration>,
}

// The stores derive their `Debug` through this one.
impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        super::debug_settings(f, "Redis", &self.prefix, self.timeout, self.retry_after)
            .finish_non_exhaustive()
    }
}

impl Base {
    /// The defaults on `conn`: `prefix`, 500 ms per operation, no `Retry-After` of its own.
    pub(crate) fn new(conn: RedisConnection, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            retry_after: None,
        }
    }

    /// The prefix and `raw` in lowercase hex, with room for `more` bytes.
    pub(crate) fn key(&self, raw: &[u8], more: usize) -> String {
        let mut out = String::with_capacity(self.prefix.len() + 2 * raw.len() + more);
        out.push_str(&self.prefix);
        out.push_str(&alloy_primitives::hex::encode(raw));
        out
    }

    /// Runs `script` on `key` under this store's deadline (see [`run_script`]).
    pub(crate) async fn run<T: ::redis::FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[&[u8]],
        retry: bool,
    ) -> Result<T, StoreError> {
        let (timeout, wait) = (self.timeout, self.retry_after);
        run_script(&self.conn, script, key, args, retry, timeout, wait).await
    }

    /// Runs a holder's `script` on `key` (see [`Base::run`]): it answers 1 when the caller
    /// holds the key, else [`StoreError::NotHeld`].
    pub(crate) async fn run_held(
        &self,
        script: &Script,
        key: &str,
        args: &[&[u8]],
        retry: bool,
    ) -> Result<(), StoreError> {
        let done: i64 = self.run(script, key, args, retry).await?;
        StoreError::held(done == 1)
    }

    /// An `Unavailable` error with this store's `Retry-After`.
    pub(crate) fn unavailable(&self, source: impl Into<BoxError>) -> StoreError {
        unavailable(self.retry_after, source)
    }
}

/// Runs `script` on `key` under `timeout`; with `retry`, once more after a connection error,
/// with a last argument `"1"` (`"0"` on the first attempt) so the script can recognise its
/// own earlier write. Every failure is [`StoreError::Unavailable`].
async fn run_script<T: ::redis::FromRedisValue>(
    conn: &RedisConnection,
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

pub(crate) use super::unavailable;

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
