//! [`PostgresCreditLedger`]: prepaid credit in PostgreSQL (feature `postgres`), shared by
//! every instance. The documentation (schema, statements, expiry, failure behaviour) is on
//! the type.

use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::Address;
use async_trait::async_trait;

use super::ledger::{CreditLedger, Debit, Grant, MAX_CALLS, secs};
use crate::nonce::StoreError;
use crate::store::postgres::{self as pg, CLEANUP_BATCH, NOW_MS, PostgresPool};

/// The schema, one migration per version (`{p}` is the table prefix). Never edit a released
/// one: add the next.
const MIGRATIONS: &[&str] = &["CREATE TABLE IF NOT EXISTS {p}credits (
        payer BYTEA PRIMARY KEY,
        calls BIGINT,
        expires_at BIGINT,
        updated_ms BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS {p}credits_expires ON {p}credits (expires_at);"];

/// The statements of one table prefix.
struct Sql {
    grant: String,
    debit: String,
    refund: String,
}

/// Deletes credit dead for longer than `keep_ms` (built per grant: the retention and prefix
/// may be set in any order, and grants are rare).
fn cleanup(p: &str, keep_ms: i64) -> Arc<str> {
    format!(
        "DELETE FROM {p}credits WHERE payer IN (SELECT payer FROM {p}credits
            WHERE (expires_at IS NOT NULL AND expires_at * 1000 + {keep_ms} < {NOW_MS})
               OR (calls = 0 AND updated_ms + {keep_ms} < {NOW_MS})
            LIMIT {CLEANUP_BATCH})"
    )
    .into()
}

impl Sql {
    fn new(p: &str) -> Self {
        // In `DO UPDATE SET` every right-hand side reads the row as it was, so `live` is the
        // old credit's: expired credit is replaced, live credit topped up (calls add, the
        // later expiry wins, a `None` absorbs), as `MemoryCreditLedger` does.
        let live = format!("({p}credits.expires_at IS NULL OR $4 < {p}credits.expires_at)");
        Self {
            grant: format!(
                "INSERT INTO {p}credits (payer, calls, expires_at, updated_ms)
                 VALUES ($1, $2, $3, {NOW_MS})
                 ON CONFLICT (payer) DO UPDATE SET
                    calls = CASE
                        WHEN NOT {live} THEN EXCLUDED.calls
                        WHEN {p}credits.calls IS NULL OR EXCLUDED.calls IS NULL THEN NULL
                        ELSE least({p}credits.calls + EXCLUDED.calls, {MAX_CALLS}) END,
                    expires_at = CASE
                        WHEN NOT {live} THEN EXCLUDED.expires_at
                        WHEN {p}credits.expires_at IS NULL OR EXCLUDED.expires_at IS NULL THEN NULL
                        ELSE greatest({p}credits.expires_at, EXCLUDED.expires_at) END,
                    updated_ms = {NOW_MS}"
            ),
            // `taken`: the calls left after this debit, when one was taken (one row lock:
            // concurrent debits queue on it and re-check `calls > 0`). Otherwise the row as of
            // the statement's snapshot tells why not.
            debit: format!(
                "WITH taken AS (
                    UPDATE {p}credits SET calls = calls - 1, updated_ms = {NOW_MS}
                    WHERE payer = $1 AND calls > 0 AND (expires_at IS NULL OR $2 < expires_at)
                    RETURNING calls)
                 SELECT (SELECT calls FROM taken), c.payer IS NOT NULL, c.calls, c.expires_at
                 FROM (SELECT 1) AS one LEFT JOIN {p}credits c ON c.payer = $1"
            ),
            refund: format!(
                "UPDATE {p}credits SET calls = least(calls + 1, {MAX_CALLS}), updated_ms = {NOW_MS}
                 WHERE payer = $1 AND calls IS NOT NULL"
            ),
        }
    }
}

/// A [`CreditLedger`] in PostgreSQL: every instance that shares the database sees the same
/// credit, concurrent debits on any number of instances never take more calls than were
/// granted, and a commit is durable as the server is configured (unlike Redis without AOF).
///
/// # Schema
///
/// Created by the ledger on first use (or by [`PostgresCreditLedger::migrate`]), versioned in
/// `<prefix>migrations` (component `credit`); the prefix defaults to `"x402_"`:
///
/// ```sql
/// CREATE TABLE x402_credits (
///     payer BYTEA PRIMARY KEY,    -- the payer's 20-byte address
///     calls BIGINT,               -- calls left; NULL: a time window, unlimited calls
///     expires_at BIGINT,          -- Unix second the credit ends; NULL: no time limit
///     updated_ms BIGINT NOT NULL  -- last change, by PostgreSQL's clock (for the clean-up)
/// );
/// CREATE INDEX x402_credits_expires ON x402_credits (expires_at);
/// ```
///
/// One ledger sells one bundle: give each prepaid route its own prefix.
///
/// # Statements and atomicity
///
/// Each method is ONE statement, atomic whatever the isolation level:
///
/// * **grant**: `INSERT ... ON CONFLICT (payer) DO UPDATE`: live credit is topped up (calls
///   add, the later expiry wins), absent or expired credit is replaced.
/// * **debit**: `UPDATE ... SET calls = calls - 1 WHERE calls > 0 AND <not expired>
///   RETURNING`. Concurrent debits of one payer queue on the row's lock, and each re-checks
///   `calls > 0` on the row as the previous one left it: never below zero. When nothing was
///   taken, the same statement reads why: expired → [`Debit::Expired`], a window →
///   [`Debit::Debited`] with no write, absent or zero → [`Debit::Exhausted`].
/// * **refund**: one call back to counted credit; nothing for a window or an absent row.
///
/// The semantics are those of [`MemoryCreditLedger`](super::MemoryCreditLedger), decided by
/// the `now` the layer passes (its [`Clock`](crate::clock::Clock)); counts and times are
/// capped as in `RedisCreditLedger`, so the three ledgers answer
/// alike (one contract test runs against all three).
///
/// # Expiry: dead credit is deleted after a retention
///
/// Expired credit and spent counted credit are kept for the retention (default 1 day,
/// [`PostgresCreditLedger::with_retention`]), then deleted in batches of 10,000 by a clean-up
/// that a grant starts at most once per interval per instance (default 60 s,
/// [`PostgresCreditLedger::with_cleanup_interval`]). During the retention a sign-in is told
/// `prepaid_credit_expired`, after it `prepaid_credit_exhausted` (both: buy another bundle).
///
/// # Failure behaviour: fail closed
///
/// Every operation runs under a deadline (default 500 ms, [`PostgresCreditLedger::with_timeout`];
/// the first also creates the schema if needed, under its own deadline). A connection error,
/// a database error or the deadline is [`StoreError::Unavailable`]: a sign-in is answered 503
/// with `Retry-After` and the handler does not run. Nothing here panics.
///
/// No operation is retried after a connection error: none is idempotent (a retried grant
/// would credit twice). A debit whose reply is lost has taken its call: the sign-in got a
/// 503, so the payer loses that one call, never the server. A grant or refund that fails is
/// retried and then owed by the layer (see [`Alert::CreditGrant`](crate::alert::Alert::CreditGrant)).
///
/// A Tokio runtime with the time driver enabled (as `#[tokio::main]` gives) is required.
///
/// # Example
///
/// Two instances behind one load balancer share the database, the nonce key and the prefix:
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_x402::nonce::PostgresNonceStore;
/// use tower_x402::prepaid::{Bundle, PostgresCreditLedger, Prepaid};
/// use tower_x402::primitives::address;
/// use tower_x402::{ChallengeKeys, Network, PaymentLayer};
///
/// let nonces = PostgresNonceStore::connect("postgres://x402:secret@127.0.0.1:5432/shop").await?;
/// // The same pool for both; one prefix per bundle.
/// let ledger = PostgresCreditLedger::new(nonces.pool()).with_prefix("search_x402_");
/// ledger.migrate().await?;
/// # fn shared_secret() -> [u8; 32] { [7; 32] }
/// let nonce_key: [u8; 32] = shared_secret(); // the same on every instance
/// let paywall = PaymentLayer::builder()
///     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
///     .network(Network::BASE_SEPOLIA)
///     .resource_base("https://api.example.com")
///     .bind_challenges(ChallengeKeys::from_env()?)
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
pub struct PostgresCreditLedger {
    pg: pg::Base<Sql>,
    retention: Duration,
}

pg::postgres_store_builders!(PostgresCreditLedger, "`<prefix>credits`", base = pg);

impl PostgresCreditLedger {
    /// Default time spent or expired credit is kept.
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(86_400);

    /// A ledger on `pool` (e.g. [`PostgresNonceStore::pool`](crate::nonce::PostgresNonceStore::pool)),
    /// with the defaults: prefix `"x402_"`, 500 ms per operation, 1 day of retention, no
    /// `Retry-After` of its own (the layer's applies).
    pub fn new(pool: PostgresPool) -> Self {
        Self {
            pg: pg::Base::new(pool, Sql::new, "credit", MIGRATIONS, None),
            retention: Self::DEFAULT_RETENTION,
        }
    }

    /// Sets how long spent or expired credit is kept before the clean-up deletes it (default
    /// 1 day; whole milliseconds). Expired credit is reported as expired for that long; a
    /// refund of the last call must come within it (it comes within the request).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }
}

/// A capped Unix second as PostgreSQL stores it.
fn at(t: u64) -> i64 {
    secs(t) as i64
}

/// A row that cannot come from the statements: fail closed.
#[derive(Debug, thiserror::Error)]
#[error("unexpected credit ledger row: {0}")]
struct UnexpectedRow(&'static str);

#[async_trait]
impl CreditLedger for PostgresCreditLedger {
    async fn grant(&self, payer: Address, grant: Grant, now: u64) -> Result<(), StoreError> {
        let grant = grant.capped();
        let calls: Option<i64> = grant.calls.map(|n| n as i64);
        let expires_at: Option<i64> = grant.expires_at.map(|t| t as i64);
        let now = at(now);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&payer.as_slice(), &calls, &expires_at, &now];
        self.pg.execute(&self.pg.sql.grant, &params, false).await?;
        let keep_ms = self.retention.as_millis().clamp(1, u128::from(MAX_CALLS)) as i64;
        self.pg
            .maybe_clean(cleanup(&self.pg.prefix, keep_ms), "credit ledger");
        Ok(())
    }

    async fn debit(&self, payer: Address, now: u64) -> Result<Debit, StoreError> {
        let now = at(now);
        let rows = self
            .pg
            .query(&self.pg.sql.debit, &[&payer.as_slice(), &now], false)
            .await?;
        let bad = |what| self.pg.unavailable(UnexpectedRow(what));
        let row = rows.first().ok_or_else(|| bad("no row"))?;
        let get = |i| -> Result<Option<i64>, StoreError> { self.pg.get(row, i) };
        if let Some(left) = get(0)? {
            return u64::try_from(left)
                .map(|n| Debit::Debited { remaining: Some(n) })
                .map_err(|_| bad("negative calls"));
        }
        let exists: bool = self.pg.get(row, 1)?;
        let (calls, expires_at) = (get(2)?, get(3)?);
        Ok(match (exists, calls, expires_at) {
            (false, ..) => Debit::Exhausted,
            (true, _, Some(t)) if now >= t => Debit::Expired,
            (true, None, _) => Debit::Debited { remaining: None },
            // Zero calls, or the last one taken by a concurrent debit.
            (true, Some(_), _) => Debit::Exhausted,
        })
    }

    async fn refund(&self, payer: Address) -> Result<(), StoreError> {
        self.pg
            .execute(&self.pg.sql.refund, &[&payer.as_slice()], false)
            .await
            .map(|_| ())
    }

    fn is_shared(&self) -> bool {
        true
    }
}
