//! [`PostgresChannelStore`]: channel state in PostgreSQL (feature `postgres`), shared by every
//! instance of a server and durable as the database is. The documentation is on the type.

use std::sync::Arc;

use alloy_primitives::B256;
use async_trait::async_trait;

use super::store::{ChannelState, ChannelStore, Lease};
use crate::store::postgres::{self as pg, CLEANUP_BATCH, NOW_MS, PostgresPool};
use crate::store::{ClaimToken, StoreError};

/// The schema, one migration per version (`{p}` is the table prefix). Never edit a released
/// one: add the next.
const MIGRATIONS: &[&str] = &["CREATE TABLE IF NOT EXISTS {p}channels (
        id BYTEA PRIMARY KEY,
        charged TEXT NOT NULL,
        state TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS {p}channel_leases (
        id BYTEA PRIMARY KEY,
        token BYTEA NOT NULL,
        expires_ms BIGINT NOT NULL);"];

/// Longest lease, as the Redis store's (a crashed holder blocks a channel at most this long).
const MAX_LEASE_SECS: u64 = 86_400;

/// The statements of one table prefix.
struct Sql {
    load: String,
    lock: String,
    unlock: String,
    insert: String,
    update: String,
    remove: String,
    list: String,
    cleanup: Arc<str>,
}

impl Sql {
    fn new(p: &str) -> Self {
        Self {
            load: format!("SELECT state FROM {p}channels WHERE id = $1"),
            // The primary key gives one winner among concurrent takers; an expired lease (by
            // PostgreSQL's clock) is taken over in the same statement.
            lock: format!(
                "INSERT INTO {p}channel_leases AS l (id, token, expires_ms)
                 VALUES ($1, $2, {NOW_MS} + $3::bigint)
                 ON CONFLICT (id) DO UPDATE
                    SET token = EXCLUDED.token, expires_ms = EXCLUDED.expires_ms
                    WHERE l.expires_ms <= {NOW_MS}
                 RETURNING 1"
            ),
            unlock: format!("DELETE FROM {p}channel_leases WHERE id = $1 AND token = $2"),
            insert: format!(
                "INSERT INTO {p}channels (id, charged, state) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO NOTHING"
            ),
            update: format!(
                "UPDATE {p}channels SET charged = $2, state = $3 WHERE id = $1 AND charged = $4"
            ),
            remove: format!("DELETE FROM {p}channels WHERE id = $1 AND charged = $2"),
            list: format!("SELECT id FROM {p}channels"),
            cleanup: format!(
                "DELETE FROM {p}channel_leases WHERE id IN (SELECT id FROM {p}channel_leases
                    WHERE expires_ms <= {NOW_MS} LIMIT {CLEANUP_BATCH})"
            )
            .into(),
        }
    }
}

/// A [`ChannelStore`] in PostgreSQL: per-channel leases and compare-and-set commits shared by
/// every instance, every committed voucher as durable as the database's commit.
///
/// # Schema
///
/// Created by the store on first use (or by [`PostgresChannelStore::migrate`]), versioned in
/// `<prefix>migrations` (component `channel`); the prefix defaults to `"x402_"`:
///
/// ```sql
/// CREATE TABLE x402_channels (
///     id BYTEA PRIMARY KEY,      -- the channel id (32 bytes)
///     charged TEXT NOT NULL,     -- the charged cumulative amount, decimal: what commits compare
///     state TEXT NOT NULL        -- the ChannelState as JSON (the Redis store's encoding)
/// );
/// CREATE TABLE x402_channel_leases (
///     id BYTEA PRIMARY KEY,      -- the channel id
///     token BYTEA NOT NULL,      -- the holder's ClaimToken (16 bytes, big-endian)
///     expires_ms BIGINT NOT NULL -- Unix ms by PostgreSQL's clock
/// );
/// ```
///
/// # Statements and atomicity
///
/// Every method is ONE statement, atomic whatever the isolation level:
///
/// * **lock**: `INSERT .. ON CONFLICT (id) DO UPDATE .. WHERE <the lease expired>
///   RETURNING`: one holder per channel across instances; its length is decided by
///   PostgreSQL's clock, so a caller's skewed clock can never shorten it.
/// * **unlock**: `DELETE .. WHERE id = $1 AND token = $2` (a stale holder frees nothing).
/// * **commit**: a first commit is `INSERT .. ON CONFLICT DO NOTHING`; a later one
///   `UPDATE .. WHERE charged = <expected>`: never over a newer charge.
/// * **remove**: `DELETE .. WHERE charged = <expected>`.
///
/// Expired leases are deleted in batches by a clean-up that a `lock` starts at most once per
/// interval per instance (default 60 s, [`PostgresChannelStore::with_cleanup_interval`]); an
/// expired lease blocks nothing meanwhile (the next `lock` takes it over).
///
/// # Failure behaviour: fail closed
///
/// Every operation runs under a deadline (default 500 ms, [`PostgresChannelStore::with_timeout`])
/// and fails as [`StoreError::Unavailable`] (503 with `Retry-After`, handler not run). Only
/// `load` and `list` are retried after a dropped connection: a retried commit would compare
/// against its own write, so a commit whose reply is lost reports failure and the channel's
/// next request reads what was stored.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_x402::channel::PostgresChannelStore;
/// use tower_x402::nonce::PostgresNonceStore;
///
/// let nonces = PostgresNonceStore::connect("postgres://x402:secret@127.0.0.1:5432/shop").await?;
/// // One pool for every PostgreSQL store of the server.
/// let channels = PostgresChannelStore::new(nonces.pool()).with_prefix("shop_x402_");
/// channels.migrate().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresChannelStore {
    pg: pg::Base<Sql>,
}

pg::postgres_store_builders!(
    PostgresChannelStore,
    "`<prefix>channels`, `<prefix>channel_leases`",
    base = pg
);

impl PostgresChannelStore {
    /// A store on `pool`, with the defaults: prefix `"x402_"`, 500 ms per operation, no
    /// `Retry-After` of its own (the layer's applies).
    pub fn new(pool: PostgresPool) -> Self {
        Self {
            pg: pg::Base::new(pool, Sql::new, "channel", MIGRATIONS, None),
        }
    }

    /// Runs one write (never retried: see the type docs): whether it changed a row.
    async fn changed(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<bool, StoreError> {
        Ok(self.pg.execute(sql, params, false).await? > 0)
    }
}

#[async_trait]
impl ChannelStore for PostgresChannelStore {
    async fn load(&self, channel: B256) -> Result<Option<ChannelState>, StoreError> {
        let rows = self
            .pg
            .query(&self.pg.sql.load, &[&channel.as_slice()], true)
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let json: String = self.pg.get(row, 0)?;
        // A row that does not parse (a downgrade, a hand edit) fails closed.
        serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| self.pg.unavailable(e))
    }

    async fn lock(&self, channel: B256, seconds: u64) -> Result<Option<Lease>, StoreError> {
        let token = ClaimToken::random();
        let ms = (seconds.clamp(1, MAX_LEASE_SECS) * 1000) as i64;
        let t = token.0.to_be_bytes();
        let taken = self
            .changed(&self.pg.sql.lock, &[&channel.as_slice(), &&t[..], &ms])
            .await?;
        self.pg
            .maybe_clean(self.pg.sql.cleanup.clone(), "channel leases");
        Ok(taken.then_some(Lease { channel, token }))
    }

    async fn unlock(&self, lease: Lease) -> Result<(), StoreError> {
        let t = lease.token.0.to_be_bytes();
        self.changed(&self.pg.sql.unlock, &[&lease.channel.as_slice(), &&t[..]])
            .await
            .map(|_| ())
    }

    async fn commit(
        &self,
        channel: B256,
        expected: Option<u128>,
        next: ChannelState,
    ) -> Result<bool, StoreError> {
        let charged = next.charged_cumulative.to_string();
        let json = serde_json::to_string(&next).map_err(|e| pg::unavailable(None, e))?;
        match expected {
            None => {
                self.changed(&self.pg.sql.insert, &[&channel.as_slice(), &charged, &json])
                    .await
            }
            Some(e) => {
                let e = e.to_string();
                self.changed(
                    &self.pg.sql.update,
                    &[&channel.as_slice(), &charged, &json, &e],
                )
                .await
            }
        }
    }

    async fn remove(&self, channel: B256, expected: u128) -> Result<bool, StoreError> {
        self.changed(
            &self.pg.sql.remove,
            &[&channel.as_slice(), &expected.to_string()],
        )
        .await
    }

    async fn list(&self) -> Result<Vec<B256>, StoreError> {
        let rows = self.pg.query(&self.pg.sql.list, &[], true).await?;
        rows.iter()
            .map(|r| {
                let id: Vec<u8> = self.pg.get(r, 0)?;
                B256::try_from(id.as_slice()).map_err(|e| self.pg.unavailable(e))
            })
            .collect()
    }

    fn is_shared(&self) -> bool {
        true
    }
}
