//! The journal's file-system calls, with a switch that makes them fail on command in tests
//! ([`JournalFaults`], with the `test-util` feature). Without it the switch is an empty type
//! and each call is the plain `std` one.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Syncs the directory holding `path`, so a file created or renamed there survives a crash.
fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(not(any(test, feature = "test-util")))]
mod off {
    use super::*;

    /// No faults: each call is the plain `std` one (zero-sized).
    #[derive(Clone, Debug, Default)]
    pub(in crate::settle::deferred) struct JournalFaults(());

    impl JournalFaults {
        #[inline]
        pub(in crate::settle::deferred) fn write(
            &self,
            file: &mut File,
            buf: &[u8],
        ) -> io::Result<()> {
            file.write_all(buf)
        }

        #[inline]
        pub(in crate::settle::deferred) fn sync(&self, file: &File) -> io::Result<()> {
            file.sync_data()
        }

        #[inline]
        pub(in crate::settle::deferred) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            std::fs::rename(from, to)
        }

        #[inline]
        pub(in crate::settle::deferred) fn sync_dir(&self, path: &Path) -> io::Result<()> {
            sync_parent(path)
        }
    }
}

#[cfg(not(any(test, feature = "test-util")))]
pub(super) use off::JournalFaults;

#[cfg(any(test, feature = "test-util"))]
mod on {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    /// Makes a [`DeferredSettler`](super::super::DeferredSettler)'s journal fail on command
    /// (test builds only). Give a clone to
    /// [`DeferredSettlerBuilder::journal_faults`](super::super::DeferredSettlerBuilder::journal_faults)
    /// and arm it at any time: each `fail_*` call makes the next `n` such operations fail with
    /// an I/O error, then they work again.
    ///
    /// ```
    /// use tower_x402::settle::deferred::JournalFaults;
    ///
    /// let faults = JournalFaults::new();
    /// faults.fail_syncs(1); // the next append's fdatasync fails: its request gets a 503
    /// assert_eq!(faults.syncs(), 0);
    /// ```
    #[derive(Clone, Debug, Default)]
    pub struct JournalFaults(Arc<Counters>);

    #[derive(Debug, Default)]
    struct Counters {
        writes: AtomicU32,
        syncs: AtomicU32,
        renames: AtomicU32,
        dir_syncs: AtomicU32,
        sync_delay_us: AtomicU64,
        synced: AtomicU64,
    }

    /// Takes one armed failure, if any.
    fn take(armed: &AtomicU32) -> bool {
        armed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn injected(what: &str) -> io::Error {
        io::Error::other(format!("injected {what} failure"))
    }

    impl JournalFaults {
        /// No faults armed.
        pub fn new() -> Self {
            Self::default()
        }

        /// The next `n` appends' writes fail after writing half their bytes (a torn write).
        pub fn fail_writes(&self, n: u32) {
            self.0.writes.store(n, Ordering::SeqCst);
        }

        /// The next `n` appends' `fdatasync` calls fail (after the write).
        pub fn fail_syncs(&self, n: u32) {
            self.0.syncs.store(n, Ordering::SeqCst);
        }

        /// The next `n` compactions fail at their `rename` over the journal.
        pub fn fail_renames(&self, n: u32) {
            self.0.renames.store(n, Ordering::SeqCst);
        }

        /// The next `n` directory syncs fail (a compaction's, after its rename, and the ones
        /// that retry it before an append is acknowledged).
        pub fn fail_dir_syncs(&self, n: u32) {
            self.0.dir_syncs.store(n, Ordering::SeqCst);
        }

        /// Makes every append's `fdatasync` take at least `delay` (a slow disk).
        pub fn delay_syncs(&self, delay: Duration) {
            let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
            self.0.sync_delay_us.store(us, Ordering::SeqCst);
        }

        /// Failures armed and not injected yet (0 once every armed one has happened).
        pub fn armed(&self) -> u32 {
            [
                &self.0.writes,
                &self.0.syncs,
                &self.0.renames,
                &self.0.dir_syncs,
            ]
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .fold(0, u32::saturating_add)
        }

        /// Append syncs that succeeded so far (one per group commit).
        pub fn syncs(&self) -> u64 {
            self.0.synced.load(Ordering::SeqCst)
        }

        pub(in crate::settle::deferred) fn write(
            &self,
            file: &mut File,
            buf: &[u8],
        ) -> io::Result<()> {
            if take(&self.0.writes) {
                file.write_all(buf.split_at(buf.len() / 2).0)?;
                return Err(injected("write"));
            }
            file.write_all(buf)
        }

        pub(in crate::settle::deferred) fn sync(&self, file: &File) -> io::Result<()> {
            let delay = self.0.sync_delay_us.load(Ordering::SeqCst);
            if delay > 0 {
                std::thread::sleep(Duration::from_micros(delay));
            }
            if take(&self.0.syncs) {
                return Err(injected("fdatasync"));
            }
            file.sync_data()?;
            self.0.synced.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        pub(in crate::settle::deferred) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            if take(&self.0.renames) {
                return Err(injected("rename"));
            }
            std::fs::rename(from, to)
        }

        pub(in crate::settle::deferred) fn sync_dir(&self, path: &Path) -> io::Result<()> {
            if take(&self.0.dir_syncs) {
                return Err(injected("directory sync"));
            }
            sync_parent(path)
        }
    }
}

#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub use on::JournalFaults;
