//! A reader for the compact JSON clients send (no whitespace, no escapes), the direct path of
//! [`super::exact::ExactEvmPayload::from_json`] and [`super::v2::PaymentPayload::from_json`].
//! Anything it does not expect is `None`, and the caller then hands the whole document to
//! serde: it may refuse what serde accepts, never the other way round.

use serde::Deserialize;
use serde::de::value::BorrowedStrDeserializer;

pub(super) struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Self { text, at: 0 }
    }

    /// Whether the whole text was read (serde refuses trailing text).
    pub(super) fn done(&self) -> bool {
        self.at == self.text.len()
    }

    /// Where the cursor is, to come back to ([`Self::back_to`]) or to cut the text read
    /// since ([`Self::since`]).
    pub(super) fn at(&self) -> usize {
        self.at
    }

    /// Moves the cursor back to `at` (from [`Self::at`]).
    pub(super) fn back_to(&mut self, at: usize) {
        self.at = at;
    }

    /// The text from the cursor on.
    pub(super) fn rest(&self) -> &'a str {
        self.text.get(self.at..).unwrap_or_default()
    }

    /// The text read since `at` (from [`Self::at`]).
    pub(super) fn since(&self, at: usize) -> Option<&'a str> {
        self.text.get(at..self.at)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    pub(super) fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    pub(super) fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// A string's raw content, up to the next quote, which is looked for first where it
    /// usually is (`usual` bytes on: an address, a nonce). Escapes and control characters
    /// are not looked for: for keys that must equal a known name and values that must be hex
    /// or decimal digits, content with either, or cut at an escaped or a later quote, never
    /// passes. Any other string is read with [`Self::text`].
    pub(super) fn string(&mut self, usual: usize) -> Option<&'a str> {
        self.expect(b'"')?;
        let rest = self.text.as_bytes().get(self.at..)?;
        let len = match rest.get(usual) {
            Some(b'"') => usual,
            _ => rest.iter().position(|&b| b == b'"')?,
        };
        let content = self.text.get(self.at..self.at + len)?;
        self.at += len + 1;
        Some(content)
    }

    /// A string whose content is taken as is: `None` on an escape or a control character
    /// (serde decodes the one and refuses the other).
    pub(super) fn text(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let rest = self.text.as_bytes().get(self.at..)?;
        let len = special(rest)?;
        (rest[len] == b'"').then_some(())?;
        let content = self.text.get(self.at..self.at + len)?;
        self.at += len + 1;
        Some(content)
    }

    /// An unsigned JSON integer as serde reads it into `u64`: `0` or digits without a leading
    /// zero, no sign, fraction or exponent, no overflow.
    pub(super) fn uint(&mut self) -> Option<u64> {
        let start = self.at;
        let mut n = 0u64;
        while let Some(b @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
            self.at += 1;
        }
        let digits = &self.text.as_bytes()[start..self.at];
        let canonical = !digits.is_empty() && (digits == b"0" || digits[0] != b'0');
        // `1.5`, `1e3`: serde reads a float, which `u64` refuses; leave it the error.
        let whole = !matches!(self.peek(), Some(b'.' | b'e' | b'E'));
        (canonical && whole).then_some(n)
    }

    /// An object value as a `RawValue`, found and checked by serde_json itself (as when it
    /// reads the field of a struct), so its extent and validity are serde's.
    pub(super) fn raw_object(&mut self) -> Option<Box<serde_json::value::RawValue>> {
        let rest = self.text.get(self.at..)?;
        (rest.as_bytes().first() == Some(&b'{')).then_some(())?;
        let mut values = serde_json::Deserializer::from_str(rest)
            .into_iter::<Box<serde_json::value::RawValue>>();
        let raw = values.next()?.ok()?;
        self.at += values.byte_offset();
        Some(raw)
    }

    /// `{"k":v,...}`: calls `field` for each key (read as [`Self::string`]: a caller that
    /// takes any key must refuse escapes, see [`plain`]), the cursor on its value. `{}` is
    /// `None` (rare; serde reads it).
    pub(super) fn object(
        &mut self,
        field: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        self.expect(b'{')?;
        self.members(field)
    }

    /// The rest of an object from just after a member's value (its `,` or `}`), as
    /// [`Self::object`] reads it: to resume reading an object from the middle.
    pub(super) fn more_members(
        &mut self,
        field: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        match self.next()? {
            b',' => self.members(field),
            b'}' => Some(()),
            _ => None,
        }
    }

    /// `"k":v,...}`, the members of an object whose `{` was read.
    fn members(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        loop {
            let key = self.string(0)?;
            self.expect(b':')?;
            field(self, key)?;
            match self.next()? {
                b',' => {}
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// A string value read by `T`'s own `Deserialize` (its visitor's `visit_borrowed_str`,
    /// as serde_json calls it for a string without escapes).
    pub(super) fn parsed<T: Deserialize<'a>>(&mut self) -> Option<T> {
        let s = self.text()?;
        T::deserialize(BorrowedStrDeserializer::<serde_json::Error>::new(s)).ok()
    }
}

/// The index of the first `"`, `\\` or control character of `bytes`: eight bytes at a time
/// (strings here are addresses, hashes and signatures of 40-132 characters).
fn special(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Nonzero iff some byte of `v` is below `n` (n <= 128): its subtraction borrows.
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH;
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_ne_bytes(word);
        let hit = below(v ^ (ONES * u64::from(b'"')), 1)
            | below(v ^ (ONES * u64::from(b'\\')), 1)
            | below(v, 0x20);
        if hit != 0 {
            break;
        }
        at += 8;
    }
    // The chunk with the hit (the bit trick may flag a byte past it, never miss one), or the
    // tail.
    let tail = bytes.get(at..)?;
    tail.iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|i| at + i)
}

/// Whether `key`, read by [`Cursor::string`], is its own value: no escape nor control
/// character.
pub(super) fn plain(key: &str) -> bool {
    !key.bytes().any(|b| b == b'\\' || b < 0x20)
}

/// `direct`'s value, or serde's answer when the direct path declines `json`.
pub(super) fn or_serde<'a, T: serde::Deserialize<'a>>(
    json: &'a str,
    direct: fn(&str) -> Option<T>,
) -> Result<T, serde_json::Error> {
    match direct(json) {
        Some(value) => Ok(value),
        None => serde_json::from_str(json),
    }
}

/// Sets `slot` once: a repeated field is serde's error to report.
pub(super) fn once<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value?);
    Some(())
}

/// What a caller can tell apart of a parse: the value, or serde's error text (the tests that
/// hold a direct path to serde's answers compare these).
#[cfg(test)]
pub(super) fn outcome<T: std::fmt::Debug>(r: Result<T, serde_json::Error>) -> String {
    match r {
        Ok(p) => format!("{p:?}"),
        Err(e) => format!("error: {e}"),
    }
}

/// An EOA's 65-byte signature as clients write it (the x402 spec's example).
#[cfg(test)]
pub(super) const SIG: &str = "0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c";

/// `{..}` of the fields `fields[i]` in the order `order` names them.
#[cfg(test)]
pub(super) fn object_of(fields: &[&str], order: &[usize]) -> String {
    let parts: Vec<&str> = order.iter().map(|&i| fields[i]).collect();
    format!("{{{}}}", parts.join(","))
}

/// `seeds`, then each seed with every character replaced by each of `replacements` (`""`
/// drops it) or doubled, with a space after, a space before and `{}` after: text that is
/// almost a document, for the tests that hold a direct path to serde's answers.
#[cfg(test)]
pub(super) fn mutations(seeds: &[String], replacements: &[&str]) -> Vec<String> {
    let mut docs = seeds.to_vec();
    for doc in seeds {
        for (i, ch) in doc.char_indices() {
            let end = i + ch.len_utf8();
            for r in replacements {
                docs.push(format!("{}{r}{}", &doc[..i], &doc[end..]));
            }
            docs.push(format!("{}{ch}{}", &doc[..end], &doc[end..]));
        }
        docs.push(format!("{doc} "));
        docs.push(format!(" {doc}"));
        docs.push(format!("{doc}{{}}"));
    }
    docs
}

/// Each seed with the first `from` of each edit replaced by its `to`.
#[cfg(test)]
pub(super) fn edited(seeds: &[String], edits: &[(&str, &str)]) -> Vec<String> {
    edits
        .iter()
        .flat_map(|(from, to)| seeds.iter().map(move |seed| seed.replacen(from, to, 1)))
        .collect()
}

/// Holds the direct path `direct` to serde over `docs`: what it takes, serde reads to the
/// same value, and [`or_serde`] answers as serde does for every document. Returns how many
/// the direct path took.
#[cfg(test)]
pub(super) fn agrees_with_serde<T>(docs: &[String], direct: fn(&str) -> Option<T>) -> usize
where
    T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut taken = 0;
    for doc in docs {
        if let Some(p) = direct(doc) {
            taken += 1;
            let serde: T = serde_json::from_str(doc)
                .unwrap_or_else(|e| panic!("serde refuses what the direct path took: {doc}: {e}"));
            assert_eq!(p, serde, "{doc}");
        }
        assert_eq!(
            outcome(or_serde(doc, direct)),
            outcome(serde_json::from_str::<T>(doc)),
            "{doc}"
        );
    }
    taken
}
