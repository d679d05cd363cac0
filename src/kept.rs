//! [`Kept`]: the last few values a thread keeps of something costly to make again (a proof's
//! start, a challenge, a receipt, a MAC or Keccak state, a signer's address, a channel's
//! terms).

/// Up to `N` values, the oldest replaced once all slots are taken. Not a map: each caller
/// finds by its own test (a text prefix, a pointer, a whole block), so a miss costs at most
/// `N` comparisons and nothing grows.
pub(crate) struct Kept<T, const N: usize> {
    slots: Vec<T>,
    /// The slot the next value replaces once all are taken.
    next: usize,
}

impl<T, const N: usize> Kept<T, N> {
    pub(crate) const fn new() -> Self {
        Self {
            slots: Vec::new(),
            next: 0,
        }
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, T> {
        self.slots.iter()
    }

    /// Keeps `value` in a free slot, else in place of the oldest.
    pub(crate) fn keep(&mut self, value: T) {
        if self.slots.len() < N {
            self.slots.push(value);
        } else {
            self.slots[self.next] = value;
            self.next = (self.next + 1) % N;
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    #[cfg(test)]
    pub(crate) fn clear(&mut self) {
        self.slots.clear();
        self.next = 0;
    }
}

impl<T, const N: usize> Default for Kept<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::Kept;

    #[test]
    fn keeps_the_last_n_in_turn() {
        let mut kept = Kept::<u32, 3>::new();
        for v in 0..3 {
            kept.keep(v);
        }
        assert_eq!(kept.iter().copied().collect::<Vec<_>>(), [0, 1, 2]);
        kept.keep(3);
        kept.keep(4);
        assert_eq!(kept.iter().copied().collect::<Vec<_>>(), [3, 4, 2]);
        kept.keep(5);
        kept.keep(6);
        assert_eq!(kept.iter().copied().collect::<Vec<_>>(), [6, 4, 5]);
        assert_eq!(kept.len(), 3);
        kept.clear();
        assert_eq!(kept.len(), 0);
    }
}
