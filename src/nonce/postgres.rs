//! [`PostgresNonceStore`]: the replay guard in PostgreSQL (feature `postgres`). The
//! documentation (schema, statements, atomicity, failure behaviour) is on the type.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{ClaimToken, NonceKey, NonceStore, Reservation, StoreError};
use crate::store::postgres::{self as pg, CLEANUP_BATCH, MAX_EXPIRY_MS, NOW_MS, PostgresPool};

/// The schema, one migration per version (`{p}` is the table prefix). Never edit a released
/// one: add the next.
const MIGRATIONS: &[&str] = &["CREATE TABLE IF NOT EXISTS {p}nonces (
        k BYTEA PRIMARY KEY,
        token BYTEA NOT NULL,
        used BOOLEAN NOT NULL,
        expires_ms BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS {p}nonces_expires ON {p}nonces (expires_ms);"];

/// The statements of one table prefix.
struct Sql {
    reserve: String,
    consume: String,
    release: String,
    cleanup: Arc<str>,
}

impl Sql {
    fn new(p: &str) -> Self {
        Self {
            // `won`: this caller inserted the row, or took over an expired one, or (a retry)
            // finds its own reservation. Otherwise the row's state as of the statement's
            // snapshot: `used`, or NULL when the winner committed after it (then in use).
            reserve: format!(
                "WITH won AS (
                    INSERT INTO {p}nonces AS n (k, token, used, expires_ms)
                    VALUES ($1, $2, false, greatest($3::bigint, {NOW_MS} + $4::bigint))
                    ON CONFLICT (k) DO UPDATE
                        SET token = EXCLUDED.token, used = false, expires_ms = EXCLUDED.expires_ms
                        WHERE n.expires_ms <= {NOW_MS} OR (n.token = EXCLUDED.token AND NOT n.used)
                    RETURNING 1)
                SELECT EXISTS (SELECT 1 FROM won), (SELECT used FROM {p}nonces WHERE k = $1)"
            ),
            consume: format!(
                "UPDATE {p}nonces SET used = true
                 WHERE k = $1 AND token = $2 AND expires_ms > {NOW_MS}"
            ),
            release: format!(
                "DELETE FROM {p}nonces
                 WHERE k = $1 AND token = $2 AND NOT used AND expires_ms > {NOW_MS}"
            ),
            cleanup: format!(
                "DELETE FROM {p}nonces WHERE k IN
                    (SELECT k FROM {p}nonces WHERE expires_ms <= {NOW_MS} LIMIT {CLEANUP_BATCH})"
            )
            .into(),
        }
    }
}

/// A [`NonceStore`] in PostgreSQL: one atomic claim per proof across every instance that
/// shares the database.
///
/// # Schema
///
/// Created by the store on first use (or by [`PostgresNonceStore::migrate`]), versioned in
/// `<prefix>migrations` (component `nonce`); the prefix defaults to `"x402_"`:
///
/// ```sql
/// CREATE TABLE x402_nonces (
///     k BYTEA PRIMARY KEY,       -- chain_id (8 bytes, big-endian) ‖ asset (20) ‖ from (20) ‖ nonce (32)
///     token BYTEA NOT NULL,      -- the holder's ClaimToken (16 bytes, big-endian)
///     used BOOLEAN NOT NULL,     -- false: reserved; true: consumed
///     expires_ms BIGINT NOT NULL -- validBefore in Unix ms (PostgreSQL's clock decides)
/// );
/// CREATE INDEX x402_nonces_expires ON x402_nonces (expires_ms);
/// ```
///
/// Every field of the key has a fixed width, so two different [`NonceKey`]s never share a row.
///
/// # Statements and atomicity
///
/// Each operation is ONE statement, so it is atomic whatever the isolation level:
///
/// * **reserve**: `INSERT ... ON CONFLICT (k) DO UPDATE ... WHERE <the row expired> RETURNING`.
///   The primary key lets exactly one of any number of concurrent inserts, on any number of
///   instances, create (or take over an expired) row; the others wait for it to commit and
///   then see the conflict: [`Reservation::Used`] when the row is consumed, else
///   [`Reservation::InUse`] (also when the winner committed too recently for the statement's
///   snapshot to say which: both refuse).
/// * **consume**: `UPDATE ... SET used = true WHERE k = $1 AND token = $2 AND <not expired>`
///   (again with the same token: a no-op that succeeds).
/// * **release**: `DELETE ... WHERE k = $1 AND token = $2 AND NOT used AND <not expired>`.
///
/// A caller whose token does not match (a stranger, or a holder whose reservation expired)
/// gets [`StoreError::NotHeld`] and changes nothing.
///
/// **Expiry** follows PostgreSQL's clock (`now()`), with a minimum TTL (default 1 s,
/// [`PostgresNonceStore::with_min_ttl`]) as for the Redis store: an `expires_at` already past
/// still answers `Reserved` and blocks duplicates for that long. An expired row is taken over
/// by the next `reserve` of its key; the others are deleted in batches of 10,000 by a
/// clean-up that a `reserve` starts at most once per interval per instance (default 60 s,
/// [`PostgresNonceStore::with_cleanup_interval`]).
///
/// # Failure behaviour: fail closed
///
/// Every operation runs under a deadline (default 500 ms, [`PostgresNonceStore::with_timeout`];
/// the first one of a store also creates the schema if needed, under its own deadline). A
/// connection error, a database error or the deadline turns into [`StoreError::Unavailable`]:
/// the layer answers 503 with `Retry-After` and the handler does not run.
///
/// The pool ([`PostgresPool`]) replaces dead connections by itself: once PostgreSQL is back,
/// requests succeed again without rebuilding the store. After a connection error `reserve`
/// and `consume` are retried once within the same deadline (both are idempotent for the same
/// token); `release` is not. An operation whose reply is lost leaves the row reserved until
/// `validBefore`: never free twice, a client is never charged twice for one proof.
///
/// A Tokio runtime with the time driver enabled (as `#[tokio::main]` gives) is required.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_x402::nonce::PostgresNonceStore;
/// use tower_x402::PaymentLayer;
/// use tower_x402::primitives::address;
///
/// let store = PostgresNonceStore::connect("postgres://x402:secret@127.0.0.1:5432/shop")
///     .await?
///     .with_prefix("myapp_x402_")
///     .with_timeout(Duration::from_millis(300))
///     .with_retry_after(Duration::from_secs(2));
/// // Create (or check) the tables at start-up rather than on the first request.
/// store.migrate().await?;
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
pub struct PostgresNonceStore {
    pg: pg::Base<Sql>,
    min_ttl: Duration,
}

pg::postgres_store_builders!(PostgresNonceStore, "`<prefix>nonces`", base = pg, min_ttl);

impl PostgresNonceStore {
    /// Default minimum TTL of a reservation (see [`PostgresNonceStore::with_min_ttl`]).
    pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);

    /// A store on `pool`, with the defaults: prefix `"x402_"`, 500 ms per operation, no
    /// `Retry-After` of its own (the layer's applies).
    pub fn new(pool: PostgresPool) -> Self {
        Self {
            pg: pg::Base::new(pool, Sql::new, "nonce", MIGRATIONS, None),
            min_ttl: Self::DEFAULT_MIN_TTL,
        }
    }

    /// The row key of `key`: 80 bytes (see the [type docs](PostgresNonceStore)).
    pub fn row_key(key: &NonceKey) -> [u8; 80] {
        let mut raw = [0u8; 80];
        raw[..8].copy_from_slice(&key.chain_id.to_be_bytes());
        raw[8..28].copy_from_slice(key.asset.as_slice());
        raw[28..48].copy_from_slice(key.from.as_slice());
        raw[48..].copy_from_slice(key.nonce.as_slice());
        raw
    }

    /// Runs `sql` (consume or release) on `key` held with `token`: `NotHeld` when it
    /// changed no row.
    async fn settle(
        &self,
        sql: &str,
        key: &NonceKey,
        token: ClaimToken,
        retry: bool,
    ) -> Result<(), StoreError> {
        let (k, t) = (Self::row_key(key), token.0.to_be_bytes());
        match self.pg.execute(sql, &[&&k[..], &&t[..]], retry).await? {
            0 => Err(StoreError::NotHeld),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl NonceStore for PostgresNonceStore {
    async fn reserve(&self, key: &NonceKey, expires_at: u64) -> Result<Reservation, StoreError> {
        let token = ClaimToken::random();
        let (k, t) = (Self::row_key(key), token.0.to_be_bytes());
        let at = expires_at.saturating_mul(1000).min(MAX_EXPIRY_MS) as i64;
        let min_ttl = self.min_ttl.as_millis().clamp(1, u128::from(u32::MAX)) as i64;
        let row = self
            .pg
            .query_one(
                &self.pg.sql.reserve,
                &[&&k[..], &&t[..], &at, &min_ttl],
                true,
            )
            .await?;
        let (won, used): (bool, Option<bool>) = (self.pg.get(&row, 0)?, self.pg.get(&row, 1)?);
        self.pg
            .maybe_clean(self.pg.sql.cleanup.clone(), "nonce store");
        Ok(match (won, used) {
            (true, _) => Reservation::Reserved(token),
            (false, Some(true)) => Reservation::Used,
            // Reserved, or committed after our snapshot: refuse, never double-serve.
            (false, _) => Reservation::InUse,
        })
    }

    async fn consume(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError> {
        self.settle(&self.pg.sql.consume, key, token, true).await
    }

    async fn release(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError> {
        self.settle(&self.pg.sql.release, key, token, false).await
    }

    fn is_shared(&self) -> bool {
        true
    }
}
