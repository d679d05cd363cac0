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
//! Records: `pending` (the verified payment), `sent` (a transaction hash that carries it,
//! written **before** the transaction is broadcast), `settled` / `failed` (final). Replaying
//! is idempotent, so a record written twice (compaction racing an append) is harmless.
//!
//! # Compaction
//!
//! Final records make a payment dead weight. [`Journal::compact`] rewrites the file with the
//! live payments only (to a temporary file, synced, renamed over the journal, directory
//! synced); the worker runs it when the file holds more than `compact_after` records and more
//! than twice the live ones.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use alloy_primitives::{Address, B256, Bytes, U256, keccak256};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::Network;
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
    fn apply(&mut self, record: &Record) {
        match record {
            Record::Meta { next_id } => self.next_id = self.next_id.max(*next_id),
            Record::Pending {
                id,
                payment,
                accepted_ms,
            } => {
                self.next_id = self.next_id.max(id + 1);
                self.entries.entry(*id).or_insert_with(|| Live {
                    payment: (**payment).clone(),
                    accepted_ms: *accepted_ms,
                    sent: Vec::new(),
                });
            }
            Record::Sent { ids, tx } => {
                for id in ids {
                    if let Some(live) = self.entries.get_mut(id)
                        && !live.sent.contains(tx)
                    {
                        live.sent.push(*tx);
                    }
                }
            }
            Record::Settled { id, .. } | Record::Failed { id, .. } => {
                self.next_id = self.next_id.max(id + 1);
                self.entries.remove(id);
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

/// Appends not yet synced, and who leads the next sync.
#[derive(Debug, Default)]
struct Group {
    buf: Vec<u8>,
    /// Appends queued so far (each `append` call counts one).
    appended: u64,
    syncing: bool,
    live: LiveSet,
}

#[derive(Debug)]
struct Io {
    file: File,
    /// Records in the file (for the compaction threshold).
    records: u64,
}

/// How far the file is synced.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    synced: u64,
    /// A write or sync failed: the file's tail is unknown, nothing more is acknowledged.
    failed: bool,
}

/// The journal file. See the module docs.
#[derive(Debug)]
pub(super) struct Journal {
    path: PathBuf,
    state: Arc<State>,
}

/// What the sync leader needs, shared with the blocking task that writes and syncs.
#[derive(Debug)]
struct State {
    io: Mutex<Io>,
    group: Mutex<Group>,
    progress: watch::Sender<Progress>,
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

/// Parses frames from `data`: the records and the length of the valid prefix.
fn parse(data: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some(head) = data.get(at..at + HEADER) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len == 0 || len > MAX_FRAME {
            break;
        }
        let Some(payload) = data.get(at + HEADER..at + HEADER + len) else {
            break; // torn tail
        };
        if keccak256(payload)[..4] != head[4..8] {
            break;
        }
        let Ok(record) = serde_json::from_slice::<Record>(payload) else {
            break;
        };
        records.push(record);
        at += HEADER + len;
    }
    (records, at)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

impl Journal {
    /// Opens (or creates) the journal at `path`, replays it and cuts a torn tail. Returns the
    /// live payments by id and the next free id.
    pub(super) fn open(path: &Path) -> io::Result<(Self, BTreeMap<u64, Live>, u64)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (records, valid) = parse(&data);
        if valid < data.len() {
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        // A new file must survive a crash by name too.
        if data.is_empty() {
            sync_dir(path)?;
        }
        let mut live = LiveSet::default();
        for r in &records {
            live.apply(r);
        }
        let entries = live.entries.clone();
        let next_id = live.next_id;
        let journal = Self {
            path: path.to_owned(),
            state: Arc::new(State {
                io: Mutex::new(Io {
                    file,
                    records: records.len() as u64,
                }),
                group: Mutex::new(Group {
                    live,
                    ..Group::default()
                }),
                progress: watch::Sender::new(Progress::default()),
            }),
        };
        Ok((journal, entries, next_id))
    }

    /// Appends `records` and returns once they are on disk (`fdatasync`). Appends that arrive
    /// while a sync runs share the next one. The write and sync run on a blocking thread.
    ///
    /// # Errors
    /// The write or sync failed (then every later append fails too: the file's tail is
    /// unknown until it is reopened).
    pub(super) async fn append(&self, records: &[Record]) -> io::Result<()> {
        let (mine, lead) = {
            let mut g = lock(&self.state.group);
            if self.state.progress.borrow().failed {
                return Err(io::Error::other("journal failed earlier; reopen it"));
            }
            for r in records {
                frame(r, &mut g.buf);
                g.live.apply(r);
            }
            g.appended += 1;
            let lead = !g.syncing;
            g.syncing = true;
            (g.appended, lead)
        };
        if lead {
            // A blocking task: a sync on the request's thread would stall a current-thread
            // runtime, and no other append could join this group while it runs.
            let state = self.state.clone();
            return tokio::task::spawn_blocking(move || state.lead())
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
        }
        let mut rx = self.state.progress.subscribe();
        let done = rx
            .wait_for(|p| p.synced >= mine || p.failed)
            .await
            .map(|p| p.synced >= mine)
            .unwrap_or(false);
        if done {
            Ok(())
        } else {
            Err(io::Error::other("journal write failed"))
        }
    }

    /// Records in the file and live payments.
    pub(super) fn sizes(&self) -> (u64, usize) {
        let records = lock(&self.state.io).records;
        (records, lock(&self.state.group).live.entries.len())
    }

    /// Rewrites the file with the live payments only. Blocking (file I/O and syncs).
    ///
    /// # Errors
    /// Any I/O error; the old file is then left as it was.
    pub(super) fn compact(&self) -> io::Result<()> {
        let mut io = lock(&self.state.io);
        let records = lock(&self.state.group).live.records();
        let mut buf = Vec::new();
        for r in &records {
            frame(r, &mut buf);
        }
        let tmp = self.path.with_extension("compacting");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(&self.path)?;
        io.file = OpenOptions::new().append(true).open(&self.path)?;
        io.records = records.len() as u64;
        Ok(())
    }
}

fn count_frames(buf: &[u8]) -> u64 {
    let mut n = 0;
    let mut at = 0;
    while let Some(head) = buf.get(at..at + HEADER) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        at += HEADER + len;
        n += 1;
    }
    n
}

impl State {
    /// Writes and syncs whatever is queued until nothing is.
    fn lead(&self) -> io::Result<()> {
        loop {
            let (buf, upto) = {
                let mut g = lock(&self.group);
                if g.buf.is_empty() {
                    g.syncing = false;
                    return Ok(());
                }
                (std::mem::take(&mut g.buf), g.appended)
            };
            let written = {
                let mut io = lock(&self.io);
                io.records += count_frames(&buf);
                io.file.write_all(&buf).and_then(|()| io.file.sync_data())
            };
            if let Err(e) = written {
                lock(&self.group).syncing = false;
                self.progress.send_modify(|p| p.failed = true);
                return Err(e);
            }
            self.progress.send_modify(|p| p.synced = upto);
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
        }
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
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn replays_live_payments_and_cuts_a_torn_tail() {
        let d = dir("replay");
        let path = d.join("j.log");
        {
            let (j, live, next) = Journal::open(&path).unwrap();
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

        let (j, live, next) = Journal::open(&path).unwrap();
        assert_eq!(live.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(live[&1].sent, vec![B256::repeat_byte(9)]);
        assert_eq!(live[&1].payment, payment(1));
        assert_eq!(next, 2);
        // Appends after the cut are readable.
        j.append(&[pending(2)]).await.unwrap();
        drop(j);
        let (_, live, next) = Journal::open(&path).unwrap();
        assert_eq!(live.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(next, 3);
    }

    #[tokio::test]
    async fn compaction_keeps_only_live_payments() {
        let d = dir("compact");
        let path = d.join("j.log");
        let (j, _, _) = Journal::open(&path).unwrap();
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
        drop(j);
        let (_, live, next) = Journal::open(&path).unwrap();
        assert_eq!(live.keys().copied().collect::<Vec<_>>(), vec![17, 50]);
        assert_eq!(live[&17].sent, vec![B256::repeat_byte(4)]);
        assert_eq!(next, 51);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_syncs_and_all_land() {
        let d = dir("group");
        let path = d.join("j.log");
        let (j, _, _) = Journal::open(&path).unwrap();
        let j = std::sync::Arc::new(j);
        let mut tasks = Vec::new();
        for id in 0..64 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move { j.append(&[pending(id)]).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        drop(j);
        let (_, live, _) = Journal::open(&path).unwrap();
        assert_eq!(live.len(), 64);
    }
}
