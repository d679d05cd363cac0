//! [`PostgresIdempotencyStore`]: payment ids in PostgreSQL (feature `postgres`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    Begin, ClaimToken, Fingerprint, IdempotencyKey, IdempotencyStore, StoreError, StoredResponse,
};
use crate::store::postgres::{self as pg, CLEANUP_BATCH, MAX_EXPIRY_MS, NOW_MS, PostgresPool};

/// The schema, one migration per version (`{p}` is the table prefix). Never edit a released
/// one: add the next.
const MIGRATIONS: &[&str] = &["CREATE TABLE IF NOT EXISTS {p}idempotency (
        payer BYTEA NOT NULL,
        id TEXT NOT NULL,
        fingerprint BYTEA NOT NULL,
        token BYTEA NOT NULL,
        response BYTEA,
        expires_ms BIGINT NOT NULL,
        PRIMARY KEY (payer, id));
    CREATE INDEX IF NOT EXISTS {p}idempotency_expires ON {p}idempotency (expires_ms);"];

struct Sql {
    begin: String,
    complete: String,
    abort: String,
    cleanup: Arc<str>,
}

impl Sql {
    fn new(p: &str) -> Self {
        // A live row is left as it is, an expired one is taken over; either way the row is
        // locked and RETURNING gives its latest version, so the answer is exact.
        let expired = format!("i.expires_ms <= {NOW_MS}");
        Self {
            begin: format!(
                "INSERT INTO {p}idempotency AS i (payer, id, fingerprint, token, response, expires_ms)
                 VALUES ($1, $2, $3, $4, NULL,
                         least(greatest($5::bigint, {NOW_MS} + $6::bigint), {NOW_MS} + $7::bigint))
                 ON CONFLICT (payer, id) DO UPDATE SET
                    fingerprint = CASE WHEN {expired} THEN EXCLUDED.fingerprint ELSE i.fingerprint END,
                    token = CASE WHEN {expired} THEN EXCLUDED.token ELSE i.token END,
                    response = CASE WHEN {expired} THEN NULL ELSE i.response END,
                    expires_ms = CASE WHEN {expired} THEN EXCLUDED.expires_ms ELSE i.expires_ms END
                 RETURNING token, fingerprint, response"
            ),
            complete: format!(
                "UPDATE {p}idempotency SET response = $4
                 WHERE payer = $1 AND id = $2 AND token = $3 AND expires_ms > {NOW_MS}
                   AND (response IS NULL OR response = $4)"
            ),
            abort: format!(
                "DELETE FROM {p}idempotency
                 WHERE payer = $1 AND id = $2 AND token = $3 AND response IS NULL
                   AND expires_ms > {NOW_MS}"
            ),
            cleanup: format!(
                "DELETE FROM {p}idempotency WHERE (payer, id) IN
                    (SELECT payer, id FROM {p}idempotency WHERE expires_ms <= {NOW_MS}
                     LIMIT {CLEANUP_BATCH})"
            )
            .into(),
        }
    }
}

/// An [`IdempotencyStore`] in PostgreSQL: one atomic claim per (payer, id) across every
/// instance sharing the database, and the stored response for all of them.
///
/// # Schema
///
/// Created on first use (or by [`PostgresIdempotencyStore::migrate`]), versioned in
/// `<prefix>migrations` (component `idempotency`); the prefix defaults to `"x402_"` and
/// may be shared with [`PostgresNonceStore`](crate::nonce::PostgresNonceStore):
///
/// ```sql
/// CREATE TABLE x402_idempotency (
///     payer BYTEA NOT NULL,        -- 20 bytes
///     id TEXT NOT NULL,            -- the client's payment id
///     fingerprint BYTEA NOT NULL,  -- 32 bytes: the proof and request target it is bound to
///     token BYTEA NOT NULL,        -- the holder's ClaimToken (16 bytes, big-endian)
///     response BYTEA,              -- NULL in progress; StoredResponse::to_bytes once done
///     expires_ms BIGINT NOT NULL,  -- Unix ms, PostgreSQL's clock
///     PRIMARY KEY (payer, id));
/// ```
///
/// An entry lives until the time `begin` asks, at most the maximum TTL (default 1 h) and at
/// least the minimum TTL (default 1 s) ahead of PostgreSQL's clock. Expired rows are taken
/// over by the next `begin` of their key, and deleted in batches by a clean-up a `begin`
/// starts at most once per interval per instance (default 60 s).
///
/// # Statements and atomicity
///
/// * **begin**: `INSERT ... ON CONFLICT (payer, id) DO UPDATE` that takes the row over only
///   when it expired, `RETURNING` the row: this caller started it when the token returned is
///   its own; otherwise the row tells in progress, done or conflict (another fingerprint).
///   The primary key gives one winner among any number of concurrent callers on any
///   instances; the losers wait for its commit and read the row it left.
/// * **complete**: `UPDATE` with the holder's token, only while in progress (or done with the
///   same response: a retried complete).
/// * **abort**: `DELETE` with the holder's token, only while in progress.
///
/// # Failure behaviour: fail closed
///
/// Every operation runs under a deadline (default 500 ms); an error, a timeout or a stored
/// response that does not decode is [`StoreError::Unavailable`], answered 503 with
/// `Retry-After` without running the handler. `begin` and `complete` are retried once after
/// a connection error (both recognise their own earlier write); `abort` is not. The pool
/// replaces dead connections by itself.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_x402::idempotency::PostgresIdempotencyStore;
/// use tower_x402::nonce::PostgresNonceStore;
/// let nonces = PostgresNonceStore::connect("postgres://x402@127.0.0.1/shop").await?;
/// // The same pool for both.
/// let ids = PostgresIdempotencyStore::new(nonces.pool()).with_prefix("myapp_x402_");
/// ids.migrate().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresIdempotencyStore {
    pg: pg::Base<Sql>,
    min_ttl: Duration,
    max_ttl: Duration,
}

pg::postgres_store_builders!(
    PostgresIdempotencyStore,
    "`<prefix>idempotency`",
    base = pg,
    min_ttl
);

impl PostgresIdempotencyStore {
    /// Default minimum TTL of an entry.
    pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);
    /// Default maximum TTL of an entry.
    pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

    /// A store on `pool` (e.g. [`PostgresNonceStore::pool`](crate::nonce::PostgresNonceStore::pool)),
    /// with the defaults.
    pub fn new(pool: PostgresPool) -> Self {
        Self {
            pg: pg::Base::new(pool, Sql::new, "idempotency", MIGRATIONS, None),
            min_ttl: Self::DEFAULT_MIN_TTL,
            max_ttl: Self::DEFAULT_MAX_TTL,
        }
    }

    /// Sets the longest life of an entry (default 1 h), by PostgreSQL's clock.
    pub fn with_max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = ttl;
        self
    }

    /// `sql` with `(payer, id, token, extra)`: `NotHeld` when it changed no row.
    async fn change(
        &self,
        sql: &str,
        key: &IdempotencyKey,
        token: ClaimToken,
        extra: Option<&[u8]>,
        retry: bool,
    ) -> Result<(), StoreError> {
        let (payer, id, t) = (key.payer.as_slice(), key.id.as_str(), token.0.to_be_bytes());
        let changed = match extra {
            Some(x) => {
                self.pg
                    .execute(sql, &[&payer, &id, &&t[..], &x], retry)
                    .await?
            }
            None => self.pg.execute(sql, &[&payer, &id, &&t[..]], retry).await?,
        };
        match changed {
            0 => Err(StoreError::NotHeld),
            _ => Ok(()),
        }
    }
}

fn millis(d: Duration) -> i64 {
    d.as_millis().clamp(1, u128::from(MAX_EXPIRY_MS)) as i64
}

#[async_trait]
impl IdempotencyStore for PostgresIdempotencyStore {
    async fn begin(
        &self,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        expires_at: u64,
    ) -> Result<Begin, StoreError> {
        let token = ClaimToken::random();
        let mine = token.0.to_be_bytes();
        let (payer, id, fp) = (
            key.payer.as_slice(),
            key.id.as_str(),
            fingerprint.0.as_slice(),
        );
        let at = expires_at.saturating_mul(1000).min(MAX_EXPIRY_MS) as i64;
        let (lo, hi) = (millis(self.min_ttl), millis(self.max_ttl));
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
            [&payer, &id, &fp, &&mine[..], &at, &lo, &hi];
        let row = self.pg.query_one(&self.pg.sql.begin, &params, true).await?;
        let (holder, theirs, response): (Vec<u8>, Vec<u8>, Option<Vec<u8>>) = (
            self.pg.get(&row, 0)?,
            self.pg.get(&row, 1)?,
            self.pg.get(&row, 2)?,
        );
        self.pg
            .maybe_clean(self.pg.sql.cleanup.clone(), "idempotency store");
        if holder == mine {
            return Ok(Begin::Started(token));
        }
        if theirs != fp {
            return Ok(Begin::Conflict);
        }
        match response {
            None => Ok(Begin::InProgress),
            Some(raw) => StoredResponse::from_bytes(&raw)
                .map(|r| Begin::Done(Box::new(r)))
                .map_err(|e| self.pg.unavailable(e)),
        }
    }

    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: ClaimToken,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let bytes = response.to_bytes();
        (self.change(&self.pg.sql.complete, key, token, Some(&bytes), true)).await
    }

    async fn abort(&self, key: &IdempotencyKey, token: ClaimToken) -> Result<(), StoreError> {
        (self.change(&self.pg.sql.abort, key, token, None, false)).await
    }

    fn is_shared(&self) -> bool {
        true
    }
}
