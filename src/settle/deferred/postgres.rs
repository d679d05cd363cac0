//! [`PostgresSettlementQueue`]: the deferred settlement queue in PostgreSQL, shared by every
//! instance on one database (features `deferred` and `postgres`). The documentation
//! (schema, statements, leases, failure behaviour) is on the type.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alloy_primitives::{B256, U256};
use async_trait::async_trait;

use super::journal::StoredPayment;
use super::queue::{Appended, Exposure, Final, LeaseOwner, LeaseRequest, Leased, SettlementQueue};
use crate::alert::{Alert, alert};
use crate::nonce::PostgresNonceStore;
use crate::store::StoreError;
use crate::store::postgres::{self as pg, CLEANUP_BATCH, NOW_MS, PostgresPool};
use crate::verify::VerifiedPayment;

/// The schema, one migration per version (`{p}` is the table prefix). Never edit a released
/// one: add the next.
const MIGRATIONS: &[&str] = &["CREATE TABLE IF NOT EXISTS {p}settlements (
        id BIGSERIAL PRIMARY KEY,
        k BYTEA NOT NULL UNIQUE,
        token BYTEA NOT NULL,
        asset BYTEA NOT NULL,
        payer BYTEA NOT NULL,
        amount NUMERIC(78, 0) NOT NULL,
        payment TEXT NOT NULL,
        accepted_ms BIGINT NOT NULL,
        sent BYTEA[] NOT NULL DEFAULT '{}',
        attempts INTEGER NOT NULL DEFAULT 0,
        leases INTEGER NOT NULL DEFAULT 0,
        not_before_ms BIGINT NOT NULL DEFAULT 0,
        owner BYTEA,
        lease_until_ms BIGINT,
        done BOOLEAN NOT NULL DEFAULT false,
        outcome TEXT,
        done_ms BIGINT);
    CREATE INDEX IF NOT EXISTS {p}settlements_open ON {p}settlements (id) WHERE NOT done;
    CREATE INDEX IF NOT EXISTS {p}settlements_owed
        ON {p}settlements (payer, asset) WHERE NOT done;
    CREATE INDEX IF NOT EXISTS {p}settlements_done ON {p}settlements (done_ms) WHERE done;"];

/// The statements of one table prefix.
struct Sql {
    append: String,
    exposure: String,
    owed: String,
    lease: String,
    sent: String,
    finish: String,
    renew: String,
    release: String,
    pending: String,
}

impl Sql {
    fn new(p: &str) -> Self {
        Self {
            // The token makes a retry after a lost reply find its own row, not a duplicate.
            append: format!(
                "INSERT INTO {p}settlements AS s
                    (k, token, asset, payer, amount, payment, accepted_ms)
                 VALUES ($1, $2, $3, $4, $5::text::numeric, $6, $7)
                 ON CONFLICT (k) DO UPDATE SET k = EXCLUDED.k WHERE s.token = EXCLUDED.token
                 RETURNING id"
            ),
            exposure: format!(
                "SELECT (SELECT count(*) FROM {p}settlements WHERE NOT done),
                    (SELECT coalesce(sum(amount), 0)::text FROM {p}settlements
                        WHERE NOT done AND payer = $1 AND asset = $2),
                    EXISTS (SELECT 1 FROM {p}settlements WHERE k = $3)"
            ),
            owed: format!(
                "SELECT (SELECT coalesce(sum(amount), 0)::text FROM {p}settlements
                        WHERE NOT done AND payer = $1 AND asset = $2),
                    EXISTS (SELECT 1 FROM {p}settlements WHERE k = $3)"
            ),
            // Oldest due rows no one else is locking; of those, all if they make a full batch,
            // else the ripe ones and the ones leased before (retries, take-overs).
            lease: format!(
                "WITH due AS (
                    SELECT id, accepted_ms, leases FROM {p}settlements
                    WHERE NOT done AND not_before_ms <= {NOW_MS}
                        AND (lease_until_ms IS NULL OR lease_until_ms <= {NOW_MS})
                    ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED),
                 pick AS (
                    SELECT id FROM due
                    WHERE (SELECT count(*) FROM due) >= $1 OR accepted_ms <= $2 OR leases > 0)
                 UPDATE {p}settlements s
                 SET owner = $3, lease_until_ms = {NOW_MS} + $4, leases = s.leases + 1
                 FROM pick WHERE s.id = pick.id
                 RETURNING s.id, s.payment, s.accepted_ms, s.sent, s.attempts, s.leases"
            ),
            // All or nothing: only while the owner holds every one of them.
            sent: format!(
                "WITH held AS (
                    SELECT count(*) AS n FROM {p}settlements
                    WHERE id = ANY($1) AND owner = $2 AND lease_until_ms > {NOW_MS}
                        AND NOT done)
                 UPDATE {p}settlements
                 SET sent = CASE WHEN $3 = ANY(sent) THEN sent ELSE array_append(sent, $3) END
                 WHERE id = ANY($1) AND owner = $2 AND NOT done
                    AND (SELECT n FROM held) = $4"
            ),
            finish: format!(
                "UPDATE {p}settlements s
                 SET done = true, outcome = v.outcome, done_ms = {NOW_MS},
                     owner = NULL, lease_until_ms = NULL
                 FROM unnest($1::bigint[], $2::text[]) AS v(id, outcome)
                 WHERE s.id = v.id AND NOT s.done
                 RETURNING s.id"
            ),
            renew: format!(
                "WITH open AS (
                    SELECT count(*) AS n FROM {p}settlements WHERE id = ANY($1) AND NOT done),
                 renewed AS (
                    UPDATE {p}settlements SET lease_until_ms = {NOW_MS} + $3
                    WHERE id = ANY($1) AND owner = $2 AND lease_until_ms > {NOW_MS}
                        AND NOT done
                    RETURNING 1)
                 SELECT (SELECT count(*) FROM renewed), (SELECT n FROM open)"
            ),
            release: format!(
                "UPDATE {p}settlements
                 SET owner = NULL, lease_until_ms = NULL, not_before_ms = {NOW_MS} + $3,
                     attempts = attempts + $4
                 WHERE id = ANY($1) AND owner = $2 AND NOT done"
            ),
            pending: format!("SELECT count(*) FROM {p}settlements WHERE NOT done"),
        }
    }

    fn cleanup(p: &str, retention: Duration) -> Arc<str> {
        let keep = retention.as_millis().min(i64::MAX as u128);
        format!(
            "DELETE FROM {p}settlements WHERE id IN
                (SELECT id FROM {p}settlements WHERE done AND done_ms < {NOW_MS} - {keep}
                 LIMIT {CLEANUP_BATCH})"
        )
        .into()
    }
}

/// A [`SettlementQueue`] in PostgreSQL: several instances (each with its
/// [`DeferredSettler`](super::DeferredSettler)) share it, any instance's worker settles what
/// any instance accepted, and a dead instance's leased payments are taken over once its
/// lease expires.
///
/// # Schema
///
/// Created by the queue on first use (or by [`PostgresSettlementQueue::migrate`]), versioned
/// in `<prefix>migrations` (component `settlement_queue`); the prefix defaults to `"x402_"`.
/// One row per accepted payment, `<prefix>settlements`: the nonce key `k` (unique: one row
/// per authorization; the same 80 bytes as [`PostgresNonceStore::row_key`]), the payment as
/// JSON, payer, token and amount (`NUMERIC(78,0)`, for what a payer owes), `accepted_ms`,
/// the transactions recorded as carrying it (`sent BYTEA[]`), the attempt count, the
/// lease (`owner`, `lease_until_ms`, and `leases`, how often it was leased), and once final
/// `done`, `outcome` (JSON) and `done_ms`. Final rows are kept for the retention
/// (default 7 days, [`PostgresSettlementQueue::with_retention`]), then deleted in batches by
/// a clean-up one instance starts at most once a minute.
///
/// # Statements and atomicity
///
/// Each operation is ONE statement:
///
/// * **append**: `INSERT ... ON CONFLICT (k)`: a second row for one authorization is
///   refused ([`Appended::Duplicate`]). Committed (durable as the server's
///   `synchronous_commit` makes it) before the paid request is answered.
/// * **lease**: `WITH due AS (SELECT ... ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED) UPDATE
///   ... RETURNING`: concurrent workers on any number of instances lock disjoint rows, so
///   no payment is in two live leases. A row whose lease expired is due again, and comes
///   back [`Leased::recovered`] (as does any row leased before), so its chain state is
///   read through [`BatchSettler::state`](super::BatchSettler::state) (the `sent` hashes'
///   receipts, `authorizationState`) before anything is resent.
/// * **sent**: appends the hash only if the caller still holds the lease on **every** row,
///   else changes nothing and fails ([`StoreError::NotHeld`]): a worker whose lease was
///   taken over never broadcasts.
/// * **finish**: `UPDATE ... WHERE NOT done RETURNING`: a final outcome is recorded once;
///   only the worker that recorded it reports it to its outcome hook.
/// * **renew**, **release**, **pending**, **exposure** (the backlog, what the payer owes,
///   and whether the authorization is queued: the pre-check's questions, answered for every
///   instance; the backlog is counted at most every 100 ms per instance, so `max_pending`
///   is a bound within what all instances accept in that time).
///
/// Lease times follow PostgreSQL's clock; `accepted_ms` and the worker's ripeness cut-off
/// follow the instances' clocks (a skew delays or hastens a batch, nothing more).
///
/// # Failure behaviour
///
/// Every operation runs under a deadline (default 500 ms,
/// [`PostgresSettlementQueue::with_timeout`]); a connection error, a database error or the
/// deadline is [`StoreError::Unavailable`]. At accept time that means **not accepted**: the
/// layer answers 503 with `Retry-After`, withholds the handler's answer and releases the
/// proof (raised as [`Alert::JournalWrite`]). Append, lease, sent, finish and renew are
/// retried once after a connection error within the deadline (each is idempotent for its
/// caller). An append whose commit succeeded but whose reply was lost twice is settled like
/// the others while its client got 503: a retry of that proof is then refused as already
/// used, and the payer pays once. The worker retries everything else with backoff; the pool
/// reconnects by itself once PostgreSQL is back.
#[derive(Clone, Debug)]
pub struct PostgresSettlementQueue {
    pg: pg::Base<Sql>,
    retention: Duration,
    /// The backlog as last counted, and when (Unix ms; see `exposure`).
    counted: Arc<(AtomicU64, AtomicU64)>,
}

/// How long a backlog count serves `exposure` before it is counted again.
const COUNT_FOR: u64 = 100;

pg::postgres_store_builders!(
    PostgresSettlementQueue,
    "`<prefix>settlements` (every instance that should settle the others' payments uses the same prefix)",
    base = pg,
    retry_after = "(default 1 s)"
);

impl PostgresSettlementQueue {
    /// Default time final rows are kept.
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

    /// A queue on `pool` (share it with the crate's other PostgreSQL stores), with the
    /// defaults: prefix `"x402_"`, 500 ms per operation, `Retry-After: 1` when PostgreSQL
    /// is unavailable.
    pub fn new(pool: PostgresPool) -> Self {
        let retry_after = Some(Duration::from_secs(1));
        Self {
            pg: pg::Base::new(pool, Sql::new, "settlement_queue", MIGRATIONS, retry_after),
            retention: Self::DEFAULT_RETENTION,
            counted: Arc::new((AtomicU64::new(0), AtomicU64::new(0))),
        }
    }

    /// Sets how long final rows are kept before the clean-up deletes them (default 7 days).
    pub fn with_retention(mut self, keep: Duration) -> Self {
        self.retention = keep;
        self
    }
}

fn ids_of(ids: &[u64]) -> Vec<i64> {
    ids.iter()
        .map(|id| i64::try_from(*id).unwrap_or(i64::MAX))
        .collect()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A row's stored payment, or `None` (raised) for one this version cannot read.
fn payment_of(id: i64, json: &str) -> Option<VerifiedPayment> {
    match serde_json::from_str::<StoredPayment>(json) {
        Ok(p) => Some(p.to_payment()),
        Err(e) => {
            alert!(
                Alert::JournalUnreadable,
                cause = &e,
                "settlement queue: row {id} holds a payment this version cannot read (written \
                 by another version?); left as it is, not settled by this instance"
            );
            None
        }
    }
}

#[async_trait]
impl SettlementQueue for PostgresSettlementQueue {
    async fn append(
        &self,
        payment: &VerifiedPayment,
        accepted_ms: u64,
    ) -> Result<Appended, StoreError> {
        let appended = async {
            let stored = StoredPayment::of(payment).ok_or_else(|| {
                pg::unavailable(
                    None,
                    "not an EIP-3009 payment: a deferred settler settles `exact` only",
                )
            })?;
            let json = serde_json::to_string(&stored).map_err(|e| pg::unavailable(None, e))?;
            let k = PostgresNonceStore::row_key(&payment.nonce_key());
            let mut token = [0u8; 16];
            token.copy_from_slice(&LeaseOwner::random().0.to_be_bytes());
            let amount = payment.amount.to_string();
            let at = i64::try_from(accepted_ms).unwrap_or(i64::MAX);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
                &&k[..],
                &&token[..],
                &payment.asset.as_slice(),
                &payment.payer.as_slice(),
                &amount,
                &json,
                &at,
            ];
            // One row when inserted, none for a duplicate.
            let rows = self.pg.query(&self.pg.sql.append, &params, true).await?;
            Ok(match rows.first() {
                Some(row) => Appended::Accepted(row.get::<_, i64>(0) as u64),
                None => Appended::Duplicate,
            })
        }
        .await;
        if let Err(e) = &appended {
            alert!(
                Alert::JournalWrite,
                cause = e,
                "settlement queue: a payment could not be recorded in PostgreSQL; it is not \
                 accepted (503, the proof is released, the client may retry)"
            );
        }
        appended
    }

    async fn exposure(&self, payment: &VerifiedPayment) -> Result<Exposure, StoreError> {
        let k = PostgresNonceStore::row_key(&payment.nonce_key());
        // Counting every open row on every request would cost more than the request: the
        // backlog is counted at most every 100 ms per instance (a soft bound either way).
        let now = super::unix_ms();
        let (count, at) = &*self.counted;
        let recount = now.saturating_sub(at.load(Ordering::Relaxed)) >= COUNT_FOR;
        let sql = if recount {
            &self.pg.sql.exposure
        } else {
            &self.pg.sql.owed
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [
            &payment.payer.as_slice(),
            &payment.asset.as_slice(),
            &&k[..],
        ];
        let row = self.pg.query_one(sql, &params, true).await?;
        // With a recount, the backlog comes first.
        let (pending, i): (Option<i64>, usize) = match recount {
            true => (Some(self.pg.get(&row, 0)?), 1),
            false => (None, 0),
        };
        let (owed, queued): (String, bool) = (self.pg.get(&row, i)?, self.pg.get(&row, i + 1)?);
        let pending = match pending {
            Some(n) => {
                let n = u64::try_from(n).unwrap_or(0);
                count.store(n, Ordering::Relaxed);
                at.store(now, Ordering::Relaxed);
                n
            }
            None => count.load(Ordering::Relaxed),
        };
        // A sum PostgreSQL computed from amounts this crate wrote: saturate if it is not one.
        let owed = owed.parse::<U256>().unwrap_or(U256::MAX);
        Ok(Exposure::new(
            usize::try_from(pending).unwrap_or(usize::MAX),
            owed,
            queued,
        ))
    }

    async fn lease(&self, req: LeaseRequest) -> Result<Vec<Leased>, StoreError> {
        let max = i64::try_from(req.max).unwrap_or(i64::MAX);
        let ripe = i64::try_from(req.ripe_ms).unwrap_or(i64::MAX);
        let owner = req.owner.0.to_be_bytes();
        let ttl = ms(req.ttl);
        let rows = self
            .pg
            .query(&self.pg.sql.lease, &[&max, &ripe, &&owner[..], &ttl], true)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.get(0);
            let json: String = row.get(1);
            let Some(payment) = payment_of(id, &json) else {
                continue;
            };
            let accepted_ms: i64 = row.get(2);
            let sent: Vec<Vec<u8>> = row.get(3);
            let attempts: i32 = row.get(4);
            let leases: i32 = row.get(5);
            out.push(Leased::new(
                id as u64,
                payment,
                accepted_ms.max(0) as u64,
                sent.iter()
                    .filter(|h| h.len() == 32)
                    .map(|h| B256::from_slice(h))
                    .collect(),
                attempts.max(0) as u32,
                leases > 1,
            ));
        }
        Ok(out)
    }

    async fn sent(&self, owner: LeaseOwner, ids: &[u64], tx: B256) -> Result<(), StoreError> {
        let ids = ids_of(ids);
        let n = ids.len() as i64;
        let owner = owner.0.to_be_bytes();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&ids, &&owner[..], &tx.as_slice(), &n];
        let changed = self.pg.execute(&self.pg.sql.sent, &params, true).await?;
        if changed as i64 != n {
            return Err(StoreError::NotHeld);
        }
        Ok(())
    }

    async fn finish(&self, outcomes: &[(u64, Final)]) -> Result<Vec<bool>, StoreError> {
        let ids: Vec<i64> = outcomes
            .iter()
            .map(|(id, _)| i64::try_from(*id).unwrap_or(i64::MAX))
            .collect();
        let texts: Vec<String> = outcomes.iter().map(|(_, f)| outcome_json(f)).collect();
        let rows = self
            .pg
            .query(&self.pg.sql.finish, &[&ids, &texts], true)
            .await?;
        let done: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        self.pg.maybe_clean(
            Sql::cleanup(&self.pg.prefix, self.retention),
            "settlement queue",
        );
        Ok(ids.iter().map(|id| done.contains(id)).collect())
    }

    async fn renew(&self, owner: LeaseOwner, ids: &[u64], ttl: Duration) -> Result<(), StoreError> {
        let ids = ids_of(ids);
        let owner = owner.0.to_be_bytes();
        let ttl = ms(ttl);
        let row = self
            .pg
            .query_one(&self.pg.sql.renew, &[&ids, &&owner[..], &ttl], true)
            .await?;
        let (renewed, open): (i64, i64) = (self.pg.get(&row, 0)?, self.pg.get(&row, 1)?);
        if renewed < open {
            return Err(StoreError::NotHeld);
        }
        Ok(())
    }

    async fn release(
        &self,
        owner: LeaseOwner,
        ids: &[u64],
        retry_in: Duration,
        failed: bool,
    ) -> Result<(), StoreError> {
        let ids = ids_of(ids);
        let owner = owner.0.to_be_bytes();
        let wait = ms(retry_in);
        let inc = i32::from(failed);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&ids, &&owner[..], &wait, &inc];
        self.pg
            .execute(&self.pg.sql.release, &params, false)
            .await?;
        Ok(())
    }

    async fn pending(&self) -> Result<usize, StoreError> {
        let row = self.pg.query_one(&self.pg.sql.pending, &[], true).await?;
        let n: i64 = self.pg.get(&row, 0)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn is_shared(&self) -> bool {
        true
    }
}

/// The outcome column: `{"settled":true,"tx":..,"gasUsed":..}` or
/// `{"settled":false,"reason":..,"tx":..}`.
fn outcome_json(f: &Final) -> String {
    let v = match f {
        Final::Settled { tx, gas_used } => serde_json::json!({
            "settled": true, "tx": tx, "gasUsed": gas_used,
        }),
        Final::Failed { reason, tx } => serde_json::json!({
            "settled": false, "reason": reason, "tx": tx,
        }),
    };
    v.to_string()
}
