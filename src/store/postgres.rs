//! PostgreSQL plumbing every PostgreSQL store shares (feature `postgres`): the pool, one
//! statement run under a deadline with one retry after a dropped connection, and the
//! versioned schema migrations.
//!
//! # Why tokio-postgres + deadpool-postgres
//!
//! A store needs little: one prepared statement per operation, a pool that replaces broken
//! connections by itself, and a deadline on every call. tokio-postgres (the `rust-postgres`
//! project, maintained since 2013) speaks the protocol with prepared statements; deadpool-postgres
//! adds the pool and a per-connection statement cache. Together they make the cold build
//! 142 crates (`cargo tree -e normal --no-default-features --features postgres --prefix none |
//! sort -u | wc -l`), against 155 for `redis` and 89 without features. sqlx would bring its own runtime layer, a query macro machinery and
//! migrations framework the stores do not need; its pool is comparable.
//!
//! TLS is not built in: reach PostgreSQL over a local socket, a private network or a
//! TLS-terminating proxy, or build a [`PostgresPool`] with your own TLS connector.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use tokio::sync::OnceCell;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{BoxError, StoreError};

/// The pool every PostgreSQL store speaks through (cheap to clone): open the crate's
/// PostgreSQL stores on one database with it.
pub type PostgresPool = deadpool_postgres::Pool;

/// Pause before the one retry after a connection error, letting the pool drop the dead one.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Default number of connections in a pool made by [`pool`].
pub(crate) const POOL_SIZE: usize = 16;
/// The longest a new connection may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The builder methods every PostgreSQL store of this crate shares, on the [`Base`] field
/// named after `base =` (which also brings the `DEFAULT_*` and `CONNECT_TIMEOUT` constants);
/// `min_ttl` adds `with_min_ttl` (a `min_ttl` field of the type); `retry_after = "(default …)"`
/// documents a default `Retry-After` other than none. Its module has a `Sql::new`; `$tables`
/// names the tables (for docs).
macro_rules! postgres_store_builders {
    ($ty:ident, $tables:literal, base = $base:ident, min_ttl) => {
        $crate::store::postgres::postgres_store_builders!($ty, $tables, base = $base);
        impl $ty {
            /// Sets the shortest life of an entry, by PostgreSQL's clock (default 1 s; whole
            /// milliseconds). An expiry closer than that, or already past, is held this long
            /// instead: never forever, and long enough for the holder to finish.
            pub fn with_min_ttl(mut self, ttl: ::std::time::Duration) -> Self {
                self.min_ttl = ttl;
                self
            }
        }
    };
    ($ty:ident, $tables:literal, base = $base:ident $(, retry_after = $retry:literal)?) => {
        impl $ty {
            /// Default table prefix.
            pub const DEFAULT_PREFIX: &str = $crate::store::postgres::DEFAULT_PREFIX;
            /// Default deadline of each operation.
            pub const DEFAULT_TIMEOUT: ::std::time::Duration =
                $crate::store::postgres::DEFAULT_TIMEOUT;
            /// Default interval between two clean-ups of expired rows by one instance.
            pub const DEFAULT_CLEANUP_INTERVAL: ::std::time::Duration =
                $crate::store::postgres::DEFAULT_CLEANUP_INTERVAL;
            #[doc = concat!("The longest [`", stringify!($ty), "::connect`] and [`",
                stringify!($ty), "::migrate`] wait.")]
            pub const CONNECT_TIMEOUT: ::std::time::Duration =
                $crate::store::postgres::CONNECT_TIMEOUT;
        }
        $crate::store::postgres::postgres_store_builders!(@methods $ty, $tables, $base,
            [$($retry)? "(default none: the layer's own `retry_after` applies)"]);
    };
    (@methods $ty:ident, $tables:literal, $base:ident, [$retry_doc:literal $($_default:literal)?]) => {
        impl $ty {
            #[doc = concat!(
                "Connects to `url` (`postgres://user[:password]@host[:port]/database`, or the ",
                "`key=value` form of libpq) with a pool of 16 connections, and checks that the ",
                "server answers. For another pool size, TLS or a shared pool, build a ",
                "[`PostgresPool`](crate::store::PostgresPool) yourself and pass it to [`",
                stringify!($ty), "::new`].\n\n",
                "# Errors\n[`StoreError::Unavailable`](crate::store::StoreError::Unavailable): ",
                "the URL does not parse, or PostgreSQL cannot be reached within [`",
                stringify!($ty), "::CONNECT_TIMEOUT`]."
            )]
            pub async fn connect(url: &str) -> Result<Self, $crate::store::StoreError> {
                Ok(Self::new(
                    $crate::store::postgres::connect(url, Self::CONNECT_TIMEOUT).await?,
                ))
            }

            /// The pool (cheap to clone): open the crate's other PostgreSQL stores on the
            /// same database with it.
            pub fn pool(&self) -> $crate::store::PostgresPool {
                self.$base.pool.clone()
            }

            #[doc = concat!(
                "Sets the table prefix (default `\"x402_\"`): give each deployment sharing a ",
                "database its own. The tables are ", $tables, " and `<prefix>migrations`.\n\n",
                "# Panics\nWhen `prefix` is not at most 40 ASCII letters, digits and `_` (not ",
                "starting with a digit): it is spliced into SQL, so anything else is refused at ",
                "start-up."
            )]
            pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
                let prefix = prefix.into();
                if let Err(e) = $crate::store::postgres::check_prefix(&prefix) {
                    panic!(concat!(stringify!($ty), "::with_prefix: {}"), e);
                }
                self.$base.sql = ::std::sync::Arc::new(Sql::new(&prefix));
                self.$base.schema = ::std::sync::Arc::new(::tokio::sync::OnceCell::new());
                self.$base.prefix = prefix;
                self
            }

            /// The table prefix.
            pub fn prefix(&self) -> &str {
                &self.$base.prefix
            }

            /// Sets the deadline of each operation, retry included (default 500 ms). Past it
            /// the operation fails closed with [`StoreError::Unavailable`](crate::store::StoreError::Unavailable)
            /// (503 for a request).
            pub fn with_timeout(mut self, timeout: ::std::time::Duration) -> Self {
                self.$base.timeout = timeout;
                self
            }

            #[doc = concat!("Sets the `Retry-After` suggested when PostgreSQL is unavailable ",
                $retry_doc, ".")]
            pub fn with_retry_after(mut self, wait: ::std::time::Duration) -> Self {
                self.$base.retry_after = Some(wait);
                self
            }

            /// Sets how often one instance deletes expired rows (default 60 s).
            pub fn with_cleanup_interval(mut self, interval: ::std::time::Duration) -> Self {
                self.$base.cleanup =
                    ::std::sync::Arc::new($crate::store::postgres::Cleanup::new(interval));
                self
            }

            /// Creates the tables, or brings them to this version, if needed (once per store:
            /// later calls return at once). Operations do it themselves on first use; calling
            /// it at start-up surfaces a wrong URL, prefix or permission before the first
            /// request.
            ///
            /// # Errors
            /// [`StoreError::Unavailable`](crate::store::StoreError::Unavailable): PostgreSQL
            /// did not answer within `CONNECT_TIMEOUT`, or refused the DDL (e.g. no `CREATE`
            /// privilege).
            pub async fn migrate(&self) -> Result<(), $crate::store::StoreError> {
                let timeout = Self::CONNECT_TIMEOUT.max(self.$base.timeout);
                self.$base.schema_within(timeout).await
            }
        }
    };
}
pub(crate) use postgres_store_builders;

/// Default table prefix of every PostgreSQL store.
pub(crate) const DEFAULT_PREFIX: &str = "x402_";
/// Default deadline of each operation.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default interval between two clean-ups of expired rows by one instance.
pub(crate) const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(60);

/// What every PostgreSQL store holds (one field of it, named to
/// [`postgres_store_builders!`]): the pool, its prefix's statements `S`, whether the schema
/// is in place, and the settings the builder methods set.
pub(crate) struct Base<S> {
    pub(crate) pool: PostgresPool,
    pub(crate) prefix: String,
    pub(crate) sql: Arc<S>,
    pub(crate) schema: Arc<OnceCell<()>>,
    pub(crate) timeout: Duration,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) cleanup: Arc<Cleanup>,
    component: &'static str,
    migrations: &'static [&'static str],
}

// By hand: `S` is shared behind its `Arc`, it need not be `Clone` itself.
impl<S> Clone for Base<S> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            prefix: self.prefix.clone(),
            sql: self.sql.clone(),
            schema: self.schema.clone(),
            timeout: self.timeout,
            retry_after: self.retry_after,
            cleanup: self.cleanup.clone(),
            component: self.component,
            migrations: self.migrations,
        }
    }
}

// The stores derive their `Debug` through this one.
impl<S> std::fmt::Debug for Base<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        super::debug_settings(f, "Postgres", &self.prefix, self.timeout, self.retry_after)
            .field("cleanup_interval", &self.cleanup.interval())
            .finish_non_exhaustive()
    }
}

impl<S> Base<S> {
    /// The defaults on `pool`: prefix `"x402_"` (its statements from `sql`), 500 ms per
    /// operation, a clean-up every 60 s; `component` names the `migrations` in
    /// `<prefix>migrations`.
    pub(crate) fn new(
        pool: PostgresPool,
        sql: fn(&str) -> S,
        component: &'static str,
        migrations: &'static [&'static str],
        retry_after: Option<Duration>,
    ) -> Self {
        Self {
            pool,
            prefix: DEFAULT_PREFIX.to_owned(),
            sql: Arc::new(sql(DEFAULT_PREFIX)),
            schema: Arc::new(OnceCell::new()),
            timeout: DEFAULT_TIMEOUT,
            retry_after,
            cleanup: Arc::new(Cleanup::new(DEFAULT_CLEANUP_INTERVAL)),
            component,
            migrations,
        }
    }

    /// An `Unavailable` error with this store's `Retry-After`.
    pub(crate) fn unavailable(&self, source: impl Into<BoxError>) -> StoreError {
        unavailable(self.retry_after, source)
    }

    /// `row`'s column `i`, or `Unavailable` (fail closed) when it does not read as a `T`.
    pub(crate) fn get<'r, T: tokio_postgres::types::FromSql<'r>>(
        &self,
        row: &'r Row,
        i: usize,
    ) -> Result<T, StoreError> {
        row.try_get(i).map_err(|e| self.unavailable(e))
    }

    /// Starts the clean-up `sql` in the background if its interval has passed (see
    /// [`Cleanup::maybe_run`]).
    pub(crate) fn maybe_clean(&self, sql: Arc<str>, what: &'static str) {
        self.cleanup.maybe_run(&self.pool, sql, self.timeout, what);
    }

    /// Runs `sql` with `params` once the schema is in place, under the deadline (`retry`: see
    /// [`run`]); the rows changed.
    pub(crate) async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        retry: bool,
    ) -> Result<u64, StoreError> {
        self.call(
            sql,
            retry,
            |c, s| async move { c.execute(&s, params).await },
        )
        .await
    }

    /// As [`Base::execute`], for the rows it returns.
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        retry: bool,
    ) -> Result<Vec<Row>, StoreError> {
        self.call(sql, retry, |c, s| async move { c.query(&s, params).await })
            .await
    }

    /// [`Base::query`] of a statement that always returns one row: that row (none fails
    /// closed).
    pub(crate) async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        retry: bool,
    ) -> Result<Row, StoreError> {
        let rows = self.query(sql, params, retry).await?;
        rows.into_iter()
            .next()
            .ok_or_else(|| self.unavailable("the statement returned no row"))
    }

    async fn call<T, F, Fut>(&self, sql: &str, retry: bool, op: F) -> Result<T, StoreError>
    where
        F: Fn(deadpool_postgres::Object, tokio_postgres::Statement) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.schema_within(self.timeout).await?;
        run(self.timeout, self.retry_after, retry, || async {
            let client = self.pool.get().await?;
            let stmt = client.prepare_cached(sql).await?;
            Ok(op(client, stmt).await?)
        })
        .await
    }

    /// Brings the schema to this version within `timeout`, once per store.
    pub(crate) async fn schema_within(&self, timeout: Duration) -> Result<(), StoreError> {
        ensure_schema(
            &self.schema,
            &self.pool,
            &self.prefix,
            self.retry_after,
            timeout,
            self.component,
            self.migrations,
        )
        .await
    }
}

/// Applies `migrations` (see [`migrate`]) under `timeout`, unless `schema` says this store
/// already did.
pub(crate) async fn ensure_schema(
    schema: &OnceCell<()>,
    pool: &PostgresPool,
    prefix: &str,
    retry_after: Option<Duration>,
    timeout: Duration,
    component: &str,
    migrations: &[&str],
) -> Result<(), StoreError> {
    schema
        .get_or_try_init(|| {
            run(timeout, retry_after, false, || {
                migrate(pool, prefix, component, migrations)
            })
        })
        .await
        .map(|_| ())
}

/// A pool on `url` that answered `SELECT 1` within `within`.
pub(crate) async fn connect(url: &str, within: Duration) -> Result<PostgresPool, StoreError> {
    let pool = pool(url)?;
    run(within, None, false, || async {
        pool.get().await?.simple_query("SELECT 1").await?;
        Ok(())
    })
    .await?;
    Ok(pool)
}

/// A pool on `url` (`postgres://user[:password]@host[:port]/db`, or the `key=value` form):
/// fast recycling (a connection the server closed is replaced on its next checkout), new
/// connections bounded by [`CONNECT_TIMEOUT`]. Connects lazily.
pub(crate) fn pool(url: &str) -> Result<PostgresPool, StoreError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| unavailable(None, e))?;
    config.connect_timeout(CONNECT_TIMEOUT);
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| unavailable(None, e))
}

/// Checks a table prefix: ASCII letters, digits and `_`, not starting with a digit, at most
/// 40 bytes (PostgreSQL identifiers are cut at 63). Used as given in unquoted SQL.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = prefix.len() <= 40
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !prefix.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "table prefix {prefix:?}: use at most 40 ASCII letters, digits and `_`, not starting with a digit"
        ))
    }
}

/// Why one attempt failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No connection from the pool.
    Pool(deadpool_postgres::PoolError),
    /// The statement failed.
    Db(tokio_postgres::Error),
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Pool(e)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

impl Failure {
    /// A dropped or refused connection (worth one retry), not an error PostgreSQL answered.
    fn is_connection(&self) -> bool {
        match self {
            Self::Pool(_) => true,
            Self::Db(e) => e.is_closed() || e.code().is_none(),
        }
    }

    fn into_box(self) -> BoxError {
        match self {
            Self::Pool(e) => Box::new(e),
            Self::Db(e) => Box::new(e),
        }
    }
}

/// Runs `attempt` under `timeout`; with `retry`, once more after a connection error (the
/// operation must then be idempotent for its caller). Every failure is
/// [`StoreError::Unavailable`].
pub(crate) async fn run<T, F, Fut>(
    timeout: Duration,
    retry_after: Option<Duration>,
    retry: bool,
    attempt: F,
) -> Result<T, StoreError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let work = async {
        match attempt().await {
            Err(e) if retry && e.is_connection() => {
                tokio::time::sleep(RETRY_PAUSE).await;
                attempt().await
            }
            other => other,
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(retry_after, e.into_box())),
        Err(_) => Err(unavailable(retry_after, Timeout(timeout))),
    }
}

pub(crate) use super::unavailable;

/// A PostgreSQL operation ran past its deadline.
#[derive(Debug, thiserror::Error)]
#[error("postgresql did not answer within {0:?}")]
struct Timeout(Duration);

/// Applies the `migrations` of `component` not yet recorded in `<prefix>migrations`
/// (version = index + 1), each in the same transaction as its record. A transaction-scoped
/// advisory lock (keyed by the prefix) serialises instances that start together, so
/// `CREATE ... IF NOT EXISTS` never races. `{p}` in a migration stands for the prefix.
pub(crate) async fn migrate(
    pool: &PostgresPool,
    prefix: &str,
    component: &str,
    migrations: &[&str],
) -> Result<(), Failure> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_id(prefix)])
        .await?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {prefix}migrations (
            component TEXT NOT NULL,
            version INTEGER NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (component, version))"
    ))
    .await?;
    let row = tx
        .query_one(
            &format!(
                "SELECT coalesce(max(version), 0) FROM {prefix}migrations WHERE component = $1"
            ),
            &[&component],
        )
        .await?;
    let done: i32 = row.get(0);
    for (i, sql) in migrations.iter().enumerate() {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        if version <= done {
            continue;
        }
        tx.batch_execute(&sql.replace("{p}", prefix)).await?;
        tx.execute(
            &format!("INSERT INTO {prefix}migrations (component, version) VALUES ($1, $2)"),
            &[&component, &version],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The advisory lock of a prefix's migrations: FNV-1a of `tower-x402:<prefix>`.
fn lock_id(prefix: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"tower-x402:".iter().chain(prefix.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// When one instance last cleaned a table: a clean-up starts at most once per interval.
#[derive(Debug)]
pub(crate) struct Cleanup {
    interval: Duration,
    next_ms: AtomicU64,
}

impl Cleanup {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            next_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// Starts `sql` (a `DELETE` of expired rows) in the background when the interval has
    /// passed, and no other caller of this instance just did. `what` names the table in logs.
    pub(crate) fn maybe_run(
        &self,
        pool: &PostgresPool,
        sql: Arc<str>,
        timeout: Duration,
        what: &'static str,
    ) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let next = self.next_ms.load(Ordering::Relaxed);
        let later = now.saturating_add(self.interval.as_millis() as u64);
        if now < next
            || self
                .next_ms
                .compare_exchange(next, later, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            let done = run(timeout.max(CONNECT_TIMEOUT), None, false, || async {
                Ok(pool.get().await?.execute(&*sql, &[]).await?)
            })
            .await;
            // Only disk space is at stake (an expired row blocks nothing and is taken over
            // by the next claim of its key), not a payment: a warning, not an alert.
            if let Err(e) = done {
                log::warn!(
                    "postgres {what}: expired rows not deleted ({e}); retried after the interval"
                );
            }
        });
    }
}

/// Largest expiry stored, in Unix ms: far past any `validBefore` that matters, and no
/// overflow when a TTL is added in SQL.
pub(crate) const MAX_EXPIRY_MS: u64 = 1 << 52;
/// Expired rows deleted per clean-up statement.
pub(crate) const CLEANUP_BATCH: i64 = 10_000;

/// Now by PostgreSQL's clock, in Unix milliseconds (SQL).
pub(crate) const NOW_MS: &str = "(extract(epoch FROM now()) * 1000)::bigint";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(check_prefix("").is_ok());
        assert!(check_prefix("x402_").is_ok());
        assert!(check_prefix("My_App2_").is_ok());
        for bad in ["1x", "a-b", "a b", "a;drop", "é", &"a".repeat(41)] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
        assert_ne!(lock_id("a_"), lock_id("b_"));
    }
}
