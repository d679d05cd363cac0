//! The map both in-process stores keep their entries in: `N` mutex-guarded shards of a hash
//! map, picked by a randomly seeded hash, each swept of expired entries as it grows.

use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard};

use alloy_primitives::map::{DefaultHashBuilder, HashMap};

/// `N` shards (a power of two) holding at most about `capacity` entries in all.
pub(crate) struct Sharded<K, V, const N: usize> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    capacity_per_shard: usize,
    /// A shard is swept when it reaches twice its size after the last sweep, and never
    /// below this size.
    min_sweep: usize,
    hasher: DefaultHashBuilder,
}

/// One shard: its map and the size at which it is next swept.
pub(crate) struct Shard<K, V> {
    pub(crate) map: HashMap<K, V>,
    next_sweep: usize,
}

impl<K, V> Shard<K, V> {
    /// True when an insert should sweep first (amortized O(1) per insert).
    pub(crate) fn sweep_due(&self, capacity: usize) -> bool {
        self.map.len() >= self.next_sweep.min(capacity)
    }

    /// Keeps the entries `keep` says are alive and schedules the next sweep.
    pub(crate) fn sweep(&mut self, min_sweep: usize, keep: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(keep);
        self.next_sweep = (self.map.len() * 2).max(min_sweep);
    }
}

impl<K: Hash + Eq, V, const N: usize> Sharded<K, V, N> {
    const BITS: u32 = {
        assert!(
            N.is_power_of_two() && N > 1,
            "shard count must be a power of two"
        );
        N.trailing_zeros()
    };

    /// Empty shards for about `capacity` entries (at least one per shard), swept from
    /// `min_sweep` entries per shard on.
    pub(crate) fn new(capacity: usize, min_sweep: usize) -> Self {
        let shards = (0..N)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::default(),
                    next_sweep: min_sweep,
                })
            })
            .collect();
        Self {
            shards,
            capacity_per_shard: capacity.div_ceil(N).max(1),
            min_sweep,
            hasher: DefaultHashBuilder::default(),
        }
    }

    /// The shard of `key`, locked. Clients choose keys (nonces, payment ids), so the shard
    /// comes from a randomly seeded hash, never from raw bytes a client could aim at one.
    pub(crate) fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K, V>> {
        let i = (avalanche(self.hasher.hash_one(key)) >> (64 - Self::BITS)) as usize;
        lock(&self.shards[i % N])
    }

    /// Every shard, locked one at a time.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&mut Shard<K, V>)) {
        for s in self.shards.iter() {
            f(&mut lock(s));
        }
    }

    /// Entries held now, expired ones not yet swept included.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// Most entries one shard takes.
    pub(crate) fn capacity_per_shard(&self) -> usize {
        self.capacity_per_shard
    }

    /// Most entries in all (the capacity rounded up to a multiple of `N`).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity_per_shard * N
    }

    /// The size under which a shard is never swept.
    pub(crate) fn min_sweep(&self) -> usize {
        self.min_sweep
    }
}

/// The default hasher is tuned for hash tables, which read the low bits: for small integer
/// keys its top bits repeat with a short period and some shards stayed empty (seen in CI).
/// MurmurHash3's finalizer is a bijection that spreads every input bit over the top ones.
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update of a shard is a single write: a panic elsewhere while it was held cannot
    // leave half an entry, so the data is consistent; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed spreads sequential keys (the worst case for the table hasher) over every
    /// shard; 200 seeds so that a bad mix cannot pass by luck (it failed in CI before).
    #[test]
    fn sequential_keys_fill_every_shard_whatever_the_seed() {
        for _ in 0..200 {
            let m: Sharded<u64, (), 16> = Sharded::new(1_000, 4);
            for k in 0..1_000u64 {
                m.shard(&k).map.insert(k, ());
            }
            let mut sizes = Vec::new();
            m.for_each(|s| sizes.push(s.map.len()));
            assert!(sizes.iter().all(|n| *n > 20), "{sizes:?}");
        }
    }

    #[test]
    fn keys_spread_over_every_shard_and_sweeps_amortize() {
        let m: Sharded<u64, u64, 16> = Sharded::new(1_000, 4);
        assert_eq!(m.capacity(), 1_008);
        assert_eq!(m.capacity_per_shard(), 63);
        for k in 0..1_000u64 {
            m.shard(&k).map.insert(k, k);
        }
        assert_eq!(m.len(), 1_000);
        let mut sizes = Vec::new();
        m.for_each(|s| sizes.push(s.map.len()));
        assert!(sizes.iter().all(|n| *n > 20), "{sizes:?}");

        let mut s = m.shard(&7);
        assert!(s.sweep_due(usize::MAX), "past min_sweep");
        s.sweep(m.min_sweep(), |k, _| k % 2 == 0);
        let left = s.map.len();
        assert!(
            !s.sweep_due(usize::MAX),
            "next sweep at twice the survivors"
        );
        assert!(s.sweep_due(left), "a full shard sweeps at once");
    }
}
