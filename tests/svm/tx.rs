//! Builds Solana transactions for the tests: the layout the official `@x402/svm` client
//! builds, and any variation of it (the hostile table). Written from the wire format, not
//! from a Solana SDK.

#![allow(dead_code)]

use tower_x402::proto::svm::Pubkey;
use tower_x402::svm::ata::associated_token_address;
use tower_x402::svm::{Keypair, program};

/// An account of an instruction.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    pub key: Pubkey,
    pub signer: bool,
    pub writable: bool,
}

pub fn meta(key: Pubkey, signer: bool, writable: bool) -> Meta {
    Meta {
        key,
        signer,
        writable,
    }
}

/// An instruction before compilation.
#[derive(Clone, Debug)]
pub struct Ix {
    pub program: Pubkey,
    pub accounts: Vec<Meta>,
    pub data: Vec<u8>,
}

pub fn compute_limit(units: u32) -> Ix {
    let mut data = vec![2];
    data.extend(units.to_le_bytes());
    Ix {
        program: program::COMPUTE_BUDGET,
        accounts: vec![],
        data,
    }
}

pub fn compute_price(micro_lamports: u64) -> Ix {
    let mut data = vec![3];
    data.extend(micro_lamports.to_le_bytes());
    Ix {
        program: program::COMPUTE_BUDGET,
        accounts: vec![],
        data,
    }
}

/// `TransferChecked` of `amount` from `owner`'s account to `to_owner`'s, both derived.
pub fn transfer(
    token_program: Pubkey,
    mint: Pubkey,
    owner: Pubkey,
    to_owner: Pubkey,
    amount: u64,
    decimals: u8,
) -> Ix {
    let source = associated_token_address(&owner, &mint, &token_program);
    let destination = associated_token_address(&to_owner, &mint, &token_program);
    transfer_raw(
        token_program,
        source,
        mint,
        destination,
        owner,
        amount,
        decimals,
    )
}

pub fn transfer_raw(
    token_program: Pubkey,
    source: Pubkey,
    mint: Pubkey,
    destination: Pubkey,
    authority: Pubkey,
    amount: u64,
    decimals: u8,
) -> Ix {
    let mut data = vec![12];
    data.extend(amount.to_le_bytes());
    data.push(decimals);
    Ix {
        program: token_program,
        accounts: vec![
            meta(source, false, true),
            meta(mint, false, false),
            meta(destination, false, true),
            meta(authority, true, false),
        ],
        data,
    }
}

pub fn memo(text: &[u8]) -> Ix {
    Ix {
        program: program::MEMO,
        accounts: vec![],
        data: text.to_vec(),
    }
}

fn compact(n: usize, out: &mut Vec<u8>) {
    let mut n = n;
    loop {
        let mut b = (n & 0x7f) as u8;
        n >>= 7;
        if n != 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// How a message is compiled.
#[derive(Clone, Debug)]
pub struct Message {
    pub fee_payer: Pubkey,
    pub instructions: Vec<Ix>,
    pub blockhash: [u8; 32],
    /// v0 (as the official client) or legacy.
    pub v0: bool,
    /// v0 lookup tables to name (never resolved by the verifier).
    pub lookup_tables: Vec<Pubkey>,
}

impl Message {
    /// Compiles: account list (fee payer first; writable signers, read-only signers,
    /// writable, read-only), header, instructions.
    pub fn compile(&self) -> (Vec<u8>, Vec<Pubkey>) {
        let mut metas: Vec<Meta> = vec![meta(self.fee_payer, true, true)];
        let mut add = |m: Meta| {
            if let Some(e) = metas.iter_mut().find(|e| e.key == m.key) {
                e.signer |= m.signer;
                e.writable |= m.writable;
            } else {
                metas.push(m);
            }
        };
        for ix in &self.instructions {
            for a in &ix.accounts {
                add(*a);
            }
            add(meta(ix.program, false, false));
        }
        let (payer, rest) = metas.split_at(1);
        let mut ordered = payer.to_vec();
        for (s, w) in [(true, true), (true, false), (false, true), (false, false)] {
            ordered.extend(rest.iter().filter(|m| m.signer == s && m.writable == w));
        }
        let keys: Vec<Pubkey> = ordered.iter().map(|m| m.key).collect();
        let signers = ordered.iter().filter(|m| m.signer).count();
        let ro_signed = ordered.iter().filter(|m| m.signer && !m.writable).count();
        let ro_unsigned = ordered.iter().filter(|m| !m.signer && !m.writable).count();
        let mut out = Vec::new();
        if self.v0 {
            out.push(0x80);
        }
        out.extend([signers as u8, ro_signed as u8, ro_unsigned as u8]);
        compact(keys.len(), &mut out);
        for k in &keys {
            out.extend(k.as_bytes());
        }
        out.extend(self.blockhash);
        compact(self.instructions.len(), &mut out);
        let index = |k: &Pubkey| keys.iter().position(|e| e == k).expect("compiled") as u8;
        for ix in &self.instructions {
            out.push(index(&ix.program));
            compact(ix.accounts.len(), &mut out);
            out.extend(ix.accounts.iter().map(|a| index(&a.key)));
            compact(ix.data.len(), &mut out);
            out.extend(&ix.data);
        }
        if self.v0 {
            compact(self.lookup_tables.len(), &mut out);
            for t in &self.lookup_tables {
                out.extend(t.as_bytes());
                // One writable index loaded from it, none read-only.
                out.extend([1, 0, 0]);
            }
        }
        (out, keys)
    }
}

/// Signs `message` with every keypair in `signers` that is a required signer; other signer
/// slots (the fee payer's) stay zero.
pub fn sign(message: &[u8], keys: &[Pubkey], signers: &[&Keypair]) -> Vec<u8> {
    let n = usize::from(message[usize::from(message[0] & 0x80 != 0)]);
    let mut out = Vec::new();
    compact(n, &mut out);
    for key in &keys[..n] {
        match signers.iter().find(|k| k.pubkey() == *key) {
            Some(k) => out.extend(k.sign(message)),
            None => out.extend([0u8; 64]),
        }
    }
    out.extend(message);
    out
}

/// What the official client builds for a requirement: limit 20,000 units, price 1
/// micro-lamport, the transfer, a random memo; v0.
pub struct Payment {
    pub fee_payer: Pubkey,
    pub payer: Keypair,
    pub mint: Pubkey,
    pub pay_to: Pubkey,
    pub amount: u64,
    pub decimals: u8,
    pub blockhash: [u8; 32],
}

impl Payment {
    pub fn instructions(&self) -> Vec<Ix> {
        vec![
            compute_limit(20_000),
            compute_price(1),
            transfer(
                program::TOKEN,
                self.mint,
                self.payer.pubkey(),
                self.pay_to,
                self.amount,
                self.decimals,
            ),
            memo(b"0123456789abcdef0123456789abcdef"),
        ]
    }

    pub fn message(&self, instructions: Vec<Ix>) -> Message {
        Message {
            fee_payer: self.fee_payer,
            instructions,
            blockhash: self.blockhash,
            v0: true,
            lookup_tables: vec![],
        }
    }

    /// The signed transaction of `message`, signed by the payer.
    pub fn signed(&self, message: &Message) -> Vec<u8> {
        let (bytes, keys) = message.compile();
        sign(&bytes, &keys, &[&self.payer])
    }

    /// The default transaction.
    pub fn transaction(&self) -> Vec<u8> {
        self.signed(&self.message(self.instructions()))
    }
}
