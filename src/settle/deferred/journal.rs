//! The durable journal of accepted payments: an append-only file of checksummed records,
//! written with group commit.
//!
//! # Why a file and not an embedded database
//!
//! The journal is written once per paid request, on the request's path, and must be on disk
//! before the response goes out. One `write` + `fdatasync` of a ~700-byte record costs about
//! 55-70 µs on the disk this was developed on; an embedded B-tree database (redb, sled) adds
//! page writes and usually two syncs per commit, and none of them merges the commits of
//! concurrent writers. Here every append that arrives while a sync is running joins the next
//! one: one `fdatasync` for all of them (group commit), so the cost per request falls as the
//! load rises. Reading it back needs nothing but a sequential scan.
//!
//! # Format
//!
//! Frames of `[len: u32 LE][check: u32 LE][payload: JSON]`, `check` being the first 4 bytes of
//! `keccak256(payload)`. A crash can leave a torn last frame; opening stops at the first frame
//! that does not check out and truncates the file there (everything before it was acknowledged
//! only after its sync, everything after it never was).
//!
//! Opening **refuses** (an `InvalidData` error naming the byte offset, the file left as it is,
//! [`Alert::JournalUnreadable`]) rather than truncate when that could drop an acknowledged
//! record: a frame that checks out but does not parse (written by another version: a
//! downgrade), or damaged bytes followed by a frame that checks out (not a torn tail). Skipping
//! such a record could silently drop a payment or its final state; a server that will not start
//! until an operator looks loses nothing.
//!
//! Records: `pending` (the verified payment), `sent` (a transaction hash that carries it,
//! written **before** the transaction is broadcast), `settled` / `failed` (final). Replaying
//! is idempotent, so a record written twice (compaction racing an append) is harmless.
//!
//! # Write failures
//!
//! A failed write or sync fails every append of its group (raised as
//! [`Alert::JournalWrite`]; the deferred settler answers those requests 503) and cuts the file
//! back to its last synced length, at once or before the next write, so the journal recovers
//! by itself: the next append works if the disk does. A crash between the failure and the cut
//! can leave the refused records in the file; they are then settled like the others (the
//! payer's proof was released with the 503, so a retry of it is refused as already used and
//! the payer pays once).
//!
//! # Compaction
//!
//! Final records make a payment dead weight. [`Journal::compact`] rewrites the file with the
//! live payments only (to a temporary file, synced, renamed over the journal, directory
//! synced); the worker runs it when the file holds more than `compact_after` records and more
//! than twice the live ones. Appends wait while it runs and then go to the new file, which is
//! opened before the rename: a failure at any step never leaves them going to the replaced,
//! unlinked file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use alloy_primitives::{Address, B256, Bytes, U256, keccak256};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::faults::JournalFaults;
use crate::Network;
use crate::alert::{Alert, alert};
use crate::proto::X402Version;
use crate::proto::exact::Authorization;
use crate::verify::VerifiedPayment;

/// Largest frame accepted when reading (a record is well under 2 KiB).
const MAX_FRAME: usize = 1 << 20;
const HEADER: usize = 8;

/// A verified payment as the journal stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StoredPayment {
    version: u8,
    network: Network,
    asset: Address,
    payer: Address,
    pay_to: Address,
    amount: U256,
    authorization: Authorization,
    signature: Bytes,
    valid_before: u64,
    /// A contract wallet's signature (sent as is); absent in older journals.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    contract_signature: bool,
}

impl StoredPayment {
    /// The stored form of an `exact` payment; `None` for any other proof (a deferred settler
    /// settles EIP-3009 authorizations only).
    pub(super) fn of(p: &VerifiedPayment) -> Option<Self> {
        let (authorization, signature) = p.eip3009()?;
        Some(Self {
            version: p.version.number(),
            network: p.network,
            asset: p.asset,
            payer: p.payer,
            pay_to: p.pay_to,
            amount: p.amount,
            authorization: authorization.clone(),
            signature: signature.clone(),
            valid_before: p.valid_before,
            contract_signature: p.signer == crate::verify::wallet::SignerKind::Contract,
        })
    }

    pub(super) fn to_payment(&self) -> VerifiedPayment {
        // Batch settlers settle from the authorization itself, never through a facilitator.
        let mut payment = VerifiedPayment::exact(
            if self.version == 1 {
                X402Version::V1
            } else {
                X402Version::V2
            },
            self.network,
            self.asset,
            self.authorization.clone(),
            self.signature.clone(),
        );
        // As verified (an upto-style amount never reaches a deferred journal, but the stored
        // fields are the ones that were acknowledged).
        payment.payer = self.payer;
        payment.pay_to = self.pay_to;
        payment.amount = self.amount;
        payment.valid_before = self.valid_before;
        if self.contract_signature {
            payment.signer = crate::verify::wallet::SignerKind::Contract;
        }
        payment
    }
}

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "camelCase")]
pub(super) enum Record {
    /// Written first by a compacted file: ids continue from here.
    Meta { next_id: u64 },
    /// Accepted, not settled yet.
    Pending {
        id: u64,
        payment: Box<StoredPayment>,
        /// Unix milliseconds.
        accepted_ms: u64,
    },
    /// `tx` carries payments `ids`; written before it is broadcast.
    Sent { ids: Vec<u64>, tx: B256 },
    /// Final: the money moved.
    Settled {
        id: u64,
        tx: Option<B256>,
        gas_used: Option<u64>,
    },
    /// Final: it never will.
    Failed {
        id: u64,
        reason: String,
        tx: Option<B256>,
    },
}

/// A payment found live in the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Live {
    pub(super) payment: StoredPayment,
    pub(super) accepted_ms: u64,
    /// Transactions that may carry it (possibly never broadcast).
    pub(super) sent: Vec<B256>,
}

/// The live set, kept by replaying records.
#[derive(Debug, Default)]
struct LiveSet {
    entries: BTreeMap<u64, Live>,
    next_id: u64,
}

impl LiveSet {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Meta { next_id } => self.next_id = self.next_id.max(next_id),
            Record::Pending {
                id,
                payment,
                accepted_ms,
            } => {
                self.next_id = self.next_id.max(id.saturating_add(1));
                self.entries.entry(id).or_insert_with(|| Live {
                    payment: *payment,
                    accepted_ms,
                    sent: Vec::new(),
                });
            }
            Record::Sent { ids, tx } => {
                for id in ids {
                    if let Some(live) = self.entries.get_mut(&id)
                        && !live.sent.contains(&tx)
                    {
                        live.sent.push(tx);
                    }
                }
            }
            Record::Settled { id, .. } | Record::Failed { id, .. } => {
                self.next_id = self.next_id.max(id.saturating_add(1));
                self.entries.remove(&id);
            }
        }
    }

    /// The records that rebuild this set.
    fn records(&self) -> Vec<Record> {
        let mut out = vec![Record::Meta {
            next_id: self.next_id,
        }];
        for (id, live) in &self.entries {
            out.push(Record::Pending {
                id: *id,
                payment: Box::new(live.payment.clone()),
                accepted_ms: live.accepted_ms,
            });
            out.extend(live.sent.iter().map(|tx| Record::Sent {
                ids: vec![*id],
                tx: *tx,
            }));
        }
        out
    }
}

/// One group commit's outcome: `None` while it runs, then whether its records are on disk.
type Batch = Arc<watch::Sender<Option<bool>>>;

fn new_batch() -> Batch {
    Arc::new(watch::Sender::new(None))
}

/// Appends not yet written, and who leads the next write + sync.
#[derive(Debug)]
struct Group {
    buf: Vec<u8>,
    /// The records framed in `buf`: they join `live` once they are on disk.
    records: Vec<Record>,
    /// What the appends in `buf` wait for.
    batch: Batch,
    syncing: bool,
    /// Built from durable records only, so compaction never keeps a refused append.
    live: LiveSet,
}

#[derive(Debug)]
struct Io {
    /// Opened for appending to the file the journal's path names (compaction swaps it under
    /// this lock, so an append never goes to a replaced file).
    file: File,
    /// Bytes known to be on disk: a failed write is cut back to here.
    len: u64,
    /// Records in the file (for the compaction threshold).
    records: u64,
    /// A write or sync failed and its bytes may be in the file: cut them before writing more.
    torn: bool,
    /// A compaction's directory sync failed: its rename may not survive a crash, so the
    /// directory is synced before anything more is acknowledged.
    dir_unsynced: bool,
}

impl Io {
    /// Writes and syncs one group. On failure the file is cut back to its synced length, at
    /// once or, if that fails too, before the next write.
    fn commit(&mut self, buf: &[u8], path: &Path, faults: &JournalFaults) -> io::Result<()> {
        if self.torn {
            self.cut()?;
        }
        let written = faults
            .write(&mut self.file, buf)
            .and_then(|()| faults.sync(&self.file))
            .and_then(|()| {
                if self.dir_unsynced {
                    faults.sync_dir(path)?;
                    self.dir_unsynced = false;
                }
                Ok(())
            });
        match written {
            Ok(()) => {
                self.len = self.len.saturating_add(buf.len() as u64);
                Ok(())
            }
            Err(e) => {
                self.torn = true;
                if let Err(cut) = self.cut() {
                    alert!(
                        Alert::JournalWrite,
                        cause = &cut,
                        "journal {}: could not cut a failed write back to {} bytes yet \
                         (retried before the next append)",
                        path.display(),
                        self.len
                    );
                }
                Err(e)
            }
        }
    }

    /// Drops whatever a failed write left after the synced length.
    fn cut(&mut self) -> io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.sync_data()?;
        self.torn = false;
        Ok(())
    }
}

/// The journal file. See the module docs.
#[derive(Debug)]
pub(super) struct Journal {
    state: Arc<State>,
}

/// What the sync leader needs, shared with the blocking task that writes and syncs.
#[derive(Debug)]
struct State {
    path: PathBuf,
    /// Locked before `group` whenever both are held.
    io: Mutex<Io>,
    group: Mutex<Group>,
    faults: JournalFaults,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded state stays consistent across a panic (no multi-step updates in place).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn frame(record: &Record, out: &mut Vec<u8>) {
    // Records are plain data: serializing them cannot fail.
    let payload = serde_json::to_vec(record).unwrap_or_default();
    let check = keccak256(&payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&check[..4]);
    out.extend_from_slice(&payload);
}

/// The frame at `at`: its payload, if it is whole and checks out.
fn frame_at(data: &[u8], at: usize) -> Option<&[u8]> {
    let head = data.get(at..at.checked_add(HEADER)?)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return None;
    }
    let start = at + HEADER;
    let payload = data.get(start..start.checked_add(len)?)?;
    (keccak256(payload)[..4] == head[4..8]).then_some(payload)
}

/// Parses frames from `data`: the records and the length of the valid prefix, after which
/// only a torn tail may follow.
///
/// # Errors
/// `InvalidData` when cutting there could lose an acknowledged record: a frame that checks
/// out but does not parse (written by another version), or damaged bytes followed by a frame
/// that checks out (not a torn tail).
fn parse(data: &[u8]) -> io::Result<(Vec<Record>, usize)> {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some(payload) = frame_at(data, at) {
        let record = serde_json::from_slice::<Record>(payload).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the record at byte {at} checks out but cannot be read ({e}): written by \
                     another version? Refusing to open rather than drop it and the records \
                     after it"
                ),
            )
        })?;
        records.push(record);
        at += HEADER + payload.len();
    }
    // A crash tears at most the last group write, so nothing whole can follow the tear.
    if let Some(next) = (at + 1..data.len()).find(|i| frame_at(data, *i).is_some()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "bytes {at}..{next} are damaged and a valid record follows them: not a torn \
                 tail. Refusing to open rather than drop the records after byte {at}"
            ),
        ));
    }
    Ok((records, at))
}

impl Journal {
    /// Opens (or creates) the journal at `path`, replays it and cuts a torn tail. Returns the
    /// live payments by id and the next free id.
    ///
    /// # Errors
    /// I/O errors, and `InvalidData` for a record it cannot read (see [`parse`]): the file is
    /// then left untouched for an operator to look at.
    pub(super) fn open(
        path: &Path,
        faults: JournalFaults,
    ) -> io::Result<(Self, BTreeMap<u64, Live>, u64)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (records, valid) = parse(&data).inspect_err(|e| {
            alert!(
                Alert::JournalUnreadable,
                cause = e,
                "journal {} not opened (left as it is; nothing settles until it is fixed)",
                path.display()
            );
        })?;
        if valid < data.len() {
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        // A new file must survive a crash by name too.
        if data.is_empty() {
            faults.sync_dir(path)?;
        }
        let count = records.len() as u64;
        let mut live = LiveSet::default();
        for r in records {
            live.apply(r);
        }
        let entries = live.entries.clone();
        let next_id = live.next_id;
        let journal = Self {
            state: Arc::new(State {
                path: path.to_owned(),
                io: Mutex::new(Io {
                    file,
                    len: valid as u64,
                    records: count,
                    torn: false,
                    dir_unsynced: false,
                }),
                group: Mutex::new(Group {
                    buf: Vec::new(),
                    records: Vec::new(),
                    batch: new_batch(),
                    syncing: false,
                    live,
                }),
                faults,
            }),
        };
        Ok((journal, entries, next_id))
    }

    /// Appends `records` and returns once they are on disk (`fdatasync`). Appends that arrive
    /// while a sync runs share the next one. The write and sync run on a blocking thread.
    ///
    /// # Errors
    /// The write or sync of this append's group failed (raised as
    /// [`Alert::JournalWrite`]): nothing of it counts, and the file is cut back so the next
    /// append starts clean.
    pub(super) async fn append(&self, records: &[Record]) -> io::Result<()> {
        let (batch, lead) = {
            let mut g = lock(&self.state.group);
            for r in records {
                frame(r, &mut g.buf);
            }
            g.records.extend_from_slice(records);
            let lead = !g.syncing;
            g.syncing = true;
            (g.batch.subscribe(), lead)
        };
        if lead {
            // A blocking task: a sync on the request's thread would stall a current-thread
            // runtime, and no other append could join this group while it runs.
            let state = self.state.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || state.lead()).await {
                // It panicked (its guard failed every queued append) or never ran.
                return Err(io::Error::other(e));
            }
        }
        let mut batch = batch;
        match batch.wait_for(Option::is_some).await.map(|done| *done) {
            Ok(Some(true)) => Ok(()),
            _ => Err(io::Error::other(
                "the journal could not write or sync this record",
            )),
        }
    }

    /// Records in the file and live payments.
    pub(super) fn sizes(&self) -> (u64, usize) {
        let records = lock(&self.state.io).records;
        (records, lock(&self.state.group).live.entries.len())
    }

    /// Rewrites the file with the live payments only. Blocking (file I/O and syncs).
    ///
    /// Appends wait meanwhile, and from the rename on go to the new file: the file to append
    /// to is opened before the rename, so no append can land in the replaced one.
    ///
    /// # Errors
    /// An error before the rename leaves the old file as it was. One after it (the directory
    /// sync) leaves the new file in place, and every append syncs the directory before it is
    /// acknowledged until that works.
    pub(super) fn compact(&self) -> io::Result<()> {
        let state = &self.state;
        let mut io = lock(&state.io);
        let records = lock(&state.group).live.records();
        let mut buf = Vec::new();
        for r in &records {
            frame(r, &mut buf);
        }
        let tmp = state.path.with_extension("compacting");
        let replaced = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            let appender = OpenOptions::new().append(true).open(&tmp)?;
            state.faults.rename(&tmp, &state.path)?;
            Ok(appender)
        })();
        let appender = match replaced {
            Ok(f) => f,
            Err(e) => {
                // Best effort: a leftover temporary file is never read, and the next
                // compaction truncates it.
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        io.file = appender;
        io.len = buf.len() as u64;
        io.records = records.len() as u64;
        // The old file's torn bytes went with it.
        io.torn = false;
        if let Err(e) = state.faults.sync_dir(&state.path) {
            io.dir_unsynced = true;
            return Err(e);
        }
        Ok(())
    }
}

/// Fails every queued append if the leader panics, so none waits forever.
struct Leading<'a>(&'a State);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut g = lock(&self.0.group);
        g.syncing = false;
        g.buf.clear();
        g.records.clear();
        let queued = std::mem::replace(&mut g.batch, new_batch());
        queued.send_replace(Some(false));
        // The write in progress may have left bytes: cut them before the next one.
        drop(g);
        lock(&self.0.io).torn = true;
    }
}

impl State {
    /// Writes and syncs whatever is queued until nothing is.
    fn lead(&self) {
        let _leading = Leading(self);
        loop {
            let mut io = lock(&self.io);
            let (buf, records, batch) = {
                let mut g = lock(&self.group);
                if g.buf.is_empty() {
                    g.syncing = false;
                    return;
                }
                let batch = std::mem::replace(&mut g.batch, new_batch());
                (
                    std::mem::take(&mut g.buf),
                    std::mem::take(&mut g.records),
                    batch,
                )
            };
            let result = io.commit(&buf, &self.path, &self.faults);
            match &result {
                Ok(()) => {
                    io.records = io.records.saturating_add(records.len() as u64);
                    let mut g = lock(&self.group);
                    for r in records {
                        g.live.apply(r);
                    }
                }
                Err(e) => alert!(
                    Alert::JournalWrite,
                    cause = e,
                    "journal {}: a write or sync failed; its {} records were refused (a paid \
                     request's gets 503 and may retry, the worker retries its own) and the \
                     file is cut back to its synced length",
                    self.path.display(),
                    records.len()
                ),
            }
            drop(io);
            batch.send_replace(Some(result.is_ok()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment(n: u8) -> StoredPayment {
        StoredPayment {
            version: 2,
            network: Network::BASE_SEPOLIA,
            asset: Address::repeat_byte(1),
            payer: Address::repeat_byte(2),
            pay_to: Address::repeat_byte(3),
            amount: U256::from(1000),
            authorization: Authorization {
                from: Address::repeat_byte(2),
                to: Address::repeat_byte(3),
                value: U256::from(1000),
                valid_after: U256::from(1),
                valid_before: U256::from(2),
                nonce: B256::repeat_byte(n),
            },
            signature: Bytes::from(vec![n; 65]),
            valid_before: 2,
            contract_signature: n == 1,
        }
    }

    #[test]
    fn a_contract_signature_survives_the_journal_and_old_records_read_as_keys() {
        let stored = payment(1);
        let back = StoredPayment::of(&stored.to_payment()).expect("exact");
        assert_eq!(back, stored);
        assert_eq!(
            stored.to_payment().signer,
            crate::verify::wallet::SignerKind::Contract
        );
        let mut old = serde_json::to_value(payment(2)).unwrap();
        assert!(old.get("contractSignature").is_none(), "omitted when false");
        old.as_object_mut().unwrap().remove("contractSignature");
        let read: StoredPayment = serde_json::from_value(old).unwrap();
        assert_eq!(
            read.to_payment().signer,
            crate::verify::wallet::SignerKind::Key
        );
    }

    fn pending(id: u64) -> Record {
        Record::Pending {
            id,
            payment: Box::new(payment(id as u8)),
            accepted_ms: 7,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("tower-x402-journal-{name}-{}", std::process::id()));
        // A leftover of an earlier run, if any; absent is fine.
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn replays_live_payments_and_cuts_a_torn_tail() {
        let d = dir("replay");
        let path = d.join("j.log");
        {
            let (j, live, next) = open(&path);
            assert!(live.is_empty());
            assert_eq!(next, 0);
            j.append(&[pending(0), pending(1)]).await.unwrap();
            j.append(&[Record::Sent {
                ids: vec![0, 1],
                tx: B256::repeat_byte(9),
            }])
            .await
            .unwrap();
            j.append(&[Record::Settled {
                id: 0,
                tx: Some(B256::repeat_byte(9)),
                gas_used: Some(1),
            }])
            .await
            .unwrap();
        }
        // A torn frame at the end: a crash mid-write.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let mut torn = Vec::new();
        frame(&pending(5), &mut torn);
        f.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(f);

        let (j, live, next) = open(&path);
        assert_eq!(live.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(live[&1].sent, vec![B256::repeat_byte(9)]);
        assert_eq!(live[&1].payment, payment(1));
        assert_eq!(next, 2);
        // Appends after the cut are readable.
        j.append(&[pending(2)]).await.unwrap();
        reopen(j, &path, &[1, 2], 3, "appended after the cut");
    }

    #[tokio::test]
    async fn compaction_keeps_only_live_payments() {
        let d = dir("compact");
        let path = d.join("j.log");
        let j = compactable(&path, &JournalFaults::default()).await;
        j.append(&[Record::Sent {
            ids: vec![17],
            tx: B256::repeat_byte(4),
        }])
        .await
        .unwrap();
        assert_eq!(j.sizes(), (100, 1));
        let before = std::fs::metadata(&path).unwrap().len();
        j.compact().unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < before / 10);
        assert_eq!(j.sizes(), (3, 1));
        j.append(&[pending(50)]).await.unwrap();
        let live = reopen(j, &path, &[17, 50], 51, "only the live payments");
        assert_eq!(live[&17].sent, vec![B256::repeat_byte(4)]);
    }

    fn open(path: &Path) -> (Journal, BTreeMap<u64, Live>, u64) {
        Journal::open(path, JournalFaults::default()).unwrap()
    }

    fn ids(live: &BTreeMap<u64, Live>) -> Vec<u64> {
        live.keys().copied().collect()
    }

    /// Closes `j` and opens its file again: it must hold the payments `ids`, live, and give
    /// `next` to the next one (`what` says why). Returns them.
    #[track_caller]
    fn reopen(j: Journal, path: &Path, ids: &[u64], next: u64, what: &str) -> BTreeMap<u64, Live> {
        drop(j);
        let (_, live, n) = open(path);
        assert_eq!(self::ids(&live), ids, "{what}");
        assert_eq!(n, next, "{what}: the next id");
        live
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_share_syncs_and_all_land() {
        let d = dir("group");
        let path = d.join("j.log");
        let faults = JournalFaults::new();
        // A slow disk (5 ms per fdatasync): appends arriving during a sync must share the next.
        faults.delay_syncs(std::time::Duration::from_millis(5));
        let (j, _, _) = Journal::open(&path, faults.clone()).unwrap();
        let j = std::sync::Arc::new(j);
        let mut tasks = Vec::new();
        for id in 0..64 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move { j.append(&[pending(id)]).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let syncs = faults.syncs();
        eprintln!("{syncs} fdatasync calls for 64 concurrent appends");
        assert!(syncs >= 1, "nothing was synced");
        assert!(
            syncs < 64 / 4,
            "{syncs} syncs for 64 concurrent appends: not shared"
        );
        drop(j);
        let (_, live, _) = open(&path);
        assert_eq!(ids(&live), (0..64).collect::<Vec<_>>());
    }

    /// One injected failure (`fail`) on the first append; the journal must refuse that append,
    /// accept the next one without a reopen, and after a reopen hold exactly what was accepted.
    async fn recovers_after(name: &str, fail: impl Fn(&JournalFaults)) {
        let d = dir(name);
        let path = d.join("j.log");
        let faults = JournalFaults::new();
        let (j, _, _) = Journal::open(&path, faults.clone()).unwrap();
        j.append(&[pending(0)]).await.unwrap();
        let synced = std::fs::metadata(&path).unwrap().len();
        fail(&faults);
        assert!(
            j.append(&[pending(1)]).await.is_err(),
            "the failure is reported"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            synced,
            "the failed write was cut back"
        );
        j.append(&[pending(2)]).await.unwrap();
        assert_eq!(
            j.sizes(),
            (2, 2),
            "the refused record is not counted or live"
        );
        let what = "accepted ones kept, the refused one gone";
        reopen(j, &path, &[0, 2], 3, what);
    }

    #[tokio::test]
    async fn a_failed_write_is_cut_back_and_the_next_append_lands() {
        let before = crate::alert::count(Alert::JournalWrite);
        recovers_after("write", |f| f.fail_writes(1)).await;
        assert!(crate::alert::count(Alert::JournalWrite) > before, "raised");
    }

    #[tokio::test]
    async fn a_failed_sync_is_cut_back_and_the_next_append_lands() {
        let before = crate::alert::count(Alert::JournalWrite);
        recovers_after("sync", |f| f.fail_syncs(1)).await;
        assert!(crate::alert::count(Alert::JournalWrite) > before, "raised");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failed_group_fails_only_its_appends_and_keeps_exactly_the_accepted() {
        let d = dir("group-fail");
        let path = d.join("j.log");
        let faults = JournalFaults::new();
        faults.delay_syncs(std::time::Duration::from_millis(5));
        let (j, _, _) = Journal::open(&path, faults.clone()).unwrap();
        let j = std::sync::Arc::new(j);
        j.append(&[pending(0)]).await.unwrap();
        // The first group of 48 concurrent appends fails its sync; later groups land.
        faults.fail_syncs(1);
        let mut tasks = Vec::new();
        for id in 1..49u64 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                (id, j.append(&[pending(id)]).await.is_ok())
            }));
        }
        let mut accepted = vec![0];
        let mut refused = 0;
        for t in tasks {
            match t.await.unwrap() {
                (id, true) => accepted.push(id),
                (_, false) => refused += 1,
            }
        }
        j.append(&[pending(49)]).await.unwrap();
        accepted.push(49);
        accepted.sort_unstable();
        assert!(refused > 0, "the injected failure refused some appends");
        assert_eq!(j.sizes().1, accepted.len());
        drop(j);
        let (_, live, _) = open(&path);
        assert_eq!(ids(&live), accepted, "exactly the acknowledged appends");
    }

    /// 50 payments, 49 final: a journal due for compaction.
    async fn compactable(path: &Path, faults: &JournalFaults) -> Journal {
        let (j, _, _) = Journal::open(path, faults.clone()).unwrap();
        for id in 0..50 {
            j.append(&[pending(id)]).await.unwrap();
            if id != 17 {
                j.append(&[Record::Failed {
                    id,
                    reason: "x".into(),
                    tx: None,
                }])
                .await
                .unwrap();
            }
        }
        j
    }

    #[tokio::test]
    async fn a_failed_compaction_rename_keeps_the_old_file_and_appends_land() {
        let d = dir("compact-rename");
        let path = d.join("j.log");
        let faults = JournalFaults::new();
        let j = compactable(&path, &faults).await;
        faults.fail_renames(1);
        assert!(j.compact().is_err());
        assert_eq!(j.sizes(), (99, 1), "the old file, as it was");
        j.append(&[pending(50)]).await.unwrap();
        reopen(j, &path, &[17, 50], 51, "compacted");
        assert!(!d.join("j.compacting").exists(), "no temporary file left");
    }

    #[tokio::test]
    async fn a_failed_directory_sync_after_the_rename_appends_to_the_new_file() {
        let d = dir("compact-dirsync");
        let path = d.join("j.log");
        let faults = JournalFaults::new();
        let j = compactable(&path, &faults).await;
        // The compaction's directory sync and the retry before the next append both fail:
        // that append is refused; the one after it syncs the directory and lands.
        faults.fail_dir_syncs(2);
        assert!(j.compact().is_err());
        assert_eq!(j.sizes(), (2, 1), "renamed: the new file is the journal");
        assert!(j.append(&[pending(50)]).await.is_err());
        j.append(&[pending(51)]).await.unwrap();
        assert_eq!(j.sizes(), (3, 2));
        reopen(j, &path, &[17, 51], 52, "nothing went to the unlinked file");
    }

    #[tokio::test]
    async fn a_readable_checksum_with_an_unknown_record_refuses_to_open() {
        let d = dir("unknown-record");
        let path = d.join("j.log");
        let (j, _, _) = open(&path);
        j.append(&[pending(0)]).await.unwrap();
        drop(j);
        let at = std::fs::metadata(&path).unwrap().len();
        // A record from a newer version: checks out, does not parse. Then an acknowledged one.
        let mut bytes = Vec::new();
        let payload = br#"{"t":"fromTheFuture","id":1}"#;
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&keccak256(payload)[..4]);
        bytes.extend_from_slice(payload);
        frame(&pending(2), &mut bytes);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&bytes).unwrap();
        drop(f);
        let len = std::fs::metadata(&path).unwrap().len();

        let before = crate::alert::count(Alert::JournalUnreadable);
        let e = Journal::open(&path, JournalFaults::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains(&format!("byte {at}")), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "nothing cut");
        assert!(crate::alert::count(Alert::JournalUnreadable) > before);
    }

    #[tokio::test]
    async fn damage_followed_by_a_valid_record_is_not_a_torn_tail() {
        let d = dir("damage");
        let path = d.join("j.log");
        let (j, _, _) = open(&path);
        j.append(&[pending(0)]).await.unwrap();
        j.append(&[pending(1)]).await.unwrap();
        j.append(&[pending(2)]).await.unwrap();
        drop(j);
        // Flip a byte inside the second record's payload.
        let mut data = std::fs::read(&path).unwrap();
        let first = HEADER + u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        data[first + HEADER + 3] ^= 0xff;
        std::fs::write(&path, &data).unwrap();

        let e = Journal::open(&path, JournalFaults::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains(&format!("bytes {first}..")), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), data, "nothing cut");
    }
}
