//! A decoder of the Solana transaction wire format: signatures, then a legacy or v0 message.
//!
//! Strict: every length is checked against the bytes left before anything is allocated,
//! compact-u16 lengths must be canonical, indices must name an account, and no byte may
//! follow the message. Nothing here trusts the input; it never panics.

use crate::proto::svm::{MAX_TRANSACTION_BYTES, Pubkey};

/// Why bytes are not a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// A decoded transaction, borrowing the input.
#[derive(Debug, Clone)]
pub struct Transaction<'a> {
    /// One 64-byte signature per required signer, in account order.
    pub signatures: Vec<&'a [u8; 64]>,
    /// The signed bytes (what every signature signs).
    pub message: &'a [u8],
    /// The decoded message.
    pub header: Header,
    /// `None` for a legacy message, `Some(0)` for v0.
    pub version: Option<u8>,
    /// The accounts the message lists itself (lookup-table accounts are not resolved).
    pub accounts: Vec<Pubkey>,
    /// The blockhash the transaction lives by.
    pub blockhash: [u8; 32],
    /// The top-level instructions.
    pub instructions: Vec<Instruction<'a>>,
    /// v0 address-table lookups (how many tables are named).
    pub lookup_tables: usize,
}

/// The message header: how the account list splits into signers and read-only accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Signers are the first `required_signatures` accounts.
    pub required_signatures: u8,
    /// The last `readonly_signed` signers are read-only.
    pub readonly_signed: u8,
    /// The last `readonly_unsigned` accounts are read-only.
    pub readonly_unsigned: u8,
}

/// One compiled instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction<'a> {
    /// Index of the program in the account list.
    pub program: u8,
    /// Indices of its accounts.
    pub accounts: &'a [u8],
    /// Its data.
    pub data: &'a [u8],
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(n).ok_or(Malformed)?;
        let out = self.bytes.get(self.at..end).ok_or(Malformed)?;
        self.at = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<&'a [u8; N], Malformed> {
        self.take(N)?.try_into().map_err(|_| Malformed)
    }

    /// Solana's compact-u16 ("shortvec"): 7 bits per byte, at most 3 bytes, canonical.
    fn compact_u16(&mut self) -> Result<usize, Malformed> {
        let mut value = 0usize;
        for i in 0..3 {
            let b = self.byte()?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                // A zero last byte after the first would be a longer spelling of a smaller value.
                if i > 0 && b == 0 {
                    return Err(Malformed);
                }
                // The third byte carries 2 bits at most.
                if value > usize::from(u16::MAX) {
                    return Err(Malformed);
                }
                return Ok(value);
            }
        }
        Err(Malformed)
    }

    /// A length of items of `size` bytes each, refused if more than the bytes left.
    fn len_of(&mut self, size: usize) -> Result<usize, Malformed> {
        let n = self.compact_u16()?;
        if n.saturating_mul(size) > self.bytes.len() - self.at {
            return Err(Malformed);
        }
        Ok(n)
    }
}

/// Decodes a serialized transaction.
///
/// # Errors
/// [`Malformed`] for anything that is not exactly one well-formed legacy or v0 transaction of
/// at most [`MAX_TRANSACTION_BYTES`].
pub fn decode(bytes: &[u8]) -> Result<Transaction<'_>, Malformed> {
    if bytes.len() > MAX_TRANSACTION_BYTES {
        return Err(Malformed);
    }
    let mut r = Reader { bytes, at: 0 };
    let n_sigs = r.len_of(64)?;
    let signatures = (0..n_sigs)
        .map(|_| r.array::<64>())
        .collect::<Result<Vec<_>, _>>()?;
    let message = &bytes[r.at..];

    let first = r.byte()?;
    let (version, required) = if first & 0x80 != 0 {
        let v = first & 0x7f;
        if v != 0 {
            return Err(Malformed);
        }
        (Some(v), r.byte()?)
    } else {
        (None, first)
    };
    let header = Header {
        required_signatures: required,
        readonly_signed: r.byte()?,
        readonly_unsigned: r.byte()?,
    };
    let n_keys = r.len_of(32)?;
    let accounts = (0..n_keys)
        .map(|_| r.array::<32>().map(|k| Pubkey::new(*k)))
        .collect::<Result<Vec<_>, _>>()?;
    let blockhash = *r.array::<32>()?;

    // The header must describe the list: at least one signer (the fee payer, writable), as many
    // signatures as signers, and the read-only parts inside their halves.
    let signers = usize::from(header.required_signatures);
    if signers == 0
        || signers != signatures.len()
        || header.readonly_signed >= header.required_signatures
        || signers + usize::from(header.readonly_unsigned) > accounts.len()
    {
        return Err(Malformed);
    }

    let n_ix = r.len_of(3)?;
    let mut instructions = Vec::with_capacity(n_ix);
    for _ in 0..n_ix {
        let program = r.byte()?;
        let n_acc = r.len_of(1)?;
        let accs = r.take(n_acc)?;
        let n_data = r.len_of(1)?;
        let data = r.take(n_data)?;
        instructions.push(Instruction {
            program,
            accounts: accs,
            data,
        });
    }

    let mut lookup_tables = 0;
    let mut loaded = 0usize;
    if version.is_some() {
        lookup_tables = r.len_of(34)?;
        for _ in 0..lookup_tables {
            r.array::<32>()?;
            let w = r.len_of(1)?;
            r.take(w)?;
            let ro = r.len_of(1)?;
            r.take(ro)?;
            loaded += w + ro;
        }
    }
    if r.at != bytes.len() {
        return Err(Malformed);
    }

    // Programs are always static accounts; instruction accounts may also be loaded ones.
    let total = accounts.len() + loaded;
    if total > 256 {
        return Err(Malformed);
    }
    for ix in &instructions {
        if usize::from(ix.program) >= accounts.len()
            || ix.accounts.iter().any(|a| usize::from(*a) >= total)
        {
            return Err(Malformed);
        }
    }

    Ok(Transaction {
        signatures,
        message,
        header,
        version,
        accounts,
        blockhash,
        instructions,
        lookup_tables,
    })
}

impl Transaction<'_> {
    /// The program an instruction calls.
    pub fn program(&self, ix: &Instruction<'_>) -> Pubkey {
        self.accounts[usize::from(ix.program)]
    }

    /// The `i`-th account of an instruction, if it is a static account.
    pub fn account(&self, ix: &Instruction<'_>, i: usize) -> Option<Pubkey> {
        let at = *ix.accounts.get(i)?;
        self.accounts.get(usize::from(at)).copied()
    }

    /// True if the account at `index` signs the transaction.
    pub fn is_signer(&self, index: usize) -> bool {
        index < usize::from(self.header.required_signatures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(bytes: &[u8]) -> Result<usize, Malformed> {
        Reader { bytes, at: 0 }.compact_u16()
    }

    #[test]
    fn compact_u16_is_canonical() {
        assert_eq!(compact(&[0]), Ok(0));
        assert_eq!(compact(&[0x7f]), Ok(127));
        assert_eq!(compact(&[0x80, 0x01]), Ok(128));
        assert_eq!(compact(&[0xff, 0xff, 0x03]), Ok(0xffff));
        for bad in [
            &[0x80, 0x00][..],
            &[0xff, 0xff, 0x04],
            &[0x80, 0x80, 0x80],
            &[0x80],
            &[],
        ] {
            assert_eq!(compact(bad), Err(Malformed), "{bad:?}");
        }
    }

    #[test]
    fn refuses_truncations_of_a_valid_transaction() {
        // One signature, legacy message: 1 signer, 2 accounts, one instruction.
        let mut tx = vec![1];
        tx.extend([7u8; 64]);
        tx.extend([1, 0, 1, 2]);
        tx.extend([1u8; 32]);
        tx.extend([2u8; 32]);
        tx.extend([9u8; 32]);
        tx.extend([1, 1, 1, 0, 2, 0xaa, 0xbb]);
        let ok = decode(&tx).unwrap();
        assert_eq!(ok.instructions[0].data, &[0xaa, 0xbb]);
        assert_eq!(ok.program(&ok.instructions[0]), Pubkey::new([2; 32]));
        for n in 0..tx.len() {
            assert_eq!(decode(&tx[..n]).map(|_| ()), Err(Malformed), "{n}");
        }
        let mut long = tx.clone();
        long.push(0);
        assert!(decode(&long).is_err());
    }
}
