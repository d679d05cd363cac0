//! The paying side's transaction: what `@x402/svm` 2.27's `ExactSvmScheme` client builds.
//!
//! A v0 message whose fee payer is the server's `extra.feePayer`, with four instructions in
//! the official order: `SetComputeUnitLimit(20_000)`, `SetComputeUnitPrice(1)` (micro-lamports),
//! `TransferChecked` of `amount` from the payer's associated token account to `payTo`'s, and a
//! Memo (`extra.memo`, else 16 random bytes in hex, so two payments never share a message).
//! The payer signs as the transfer authority; the fee payer's signature slot stays zero for
//! the server to fill.

use super::ata::associated_token_address;
use super::{Keypair, program};
use crate::proto::svm::Pubkey;

/// The official client's compute-unit limit.
pub const COMPUTE_UNIT_LIMIT: u32 = 20_000;
/// The official client's compute-unit price, in micro-lamports.
pub const COMPUTE_UNIT_PRICE: u64 = 1;
/// The longest memo the official client sends.
pub const MAX_MEMO_BYTES: usize = 256;

/// What one `exact` payment transfers.
#[derive(Clone, Debug)]
pub struct Transfer<'a> {
    /// The server's fee payer (`extra.feePayer`), first account, signs later.
    pub fee_payer: Pubkey,
    /// The mint (`asset`).
    pub mint: Pubkey,
    /// The mint's owner: SPL Token or Token-2022.
    pub token_program: Pubkey,
    /// The mint's decimals (`TransferChecked` states them).
    pub decimals: u8,
    /// The recipient's wallet (`payTo`); the tokens go to its associated token account.
    pub pay_to: Pubkey,
    /// Atomic units.
    pub amount: u64,
    /// A recent blockhash.
    pub blockhash: [u8; 32],
    /// The memo's bytes.
    pub memo: &'a [u8],
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

/// The serialized transaction paying `t`, signed by `payer` (the fee payer's slot zero).
pub fn exact_transaction(payer: &Keypair, t: &Transfer<'_>) -> Vec<u8> {
    let authority = payer.pubkey();
    let source = associated_token_address(&authority, &t.mint, &t.token_program);
    let destination = associated_token_address(&t.pay_to, &t.mint, &t.token_program);
    // Fee payer (writable signer), authority (read-only signer), writable accounts, read-only
    // accounts. The fee payer appears in no instruction, so the verifier's isolation holds.
    let mut keys = vec![t.fee_payer, authority, source];
    if destination != source {
        keys.push(destination);
    }
    let writable = keys.len();
    keys.extend([
        t.mint,
        t.token_program,
        program::COMPUTE_BUDGET,
        program::MEMO,
    ]);
    let at = |k: &Pubkey| keys.iter().position(|x| x == k).unwrap_or_default() as u8;

    let mut limit = vec![2];
    limit.extend(COMPUTE_UNIT_LIMIT.to_le_bytes());
    let mut price = vec![3];
    price.extend(COMPUTE_UNIT_PRICE.to_le_bytes());
    let mut transfer = vec![12];
    transfer.extend(t.amount.to_le_bytes());
    transfer.push(t.decimals);
    let instructions: [(u8, Vec<u8>, &[u8]); 4] = [
        (at(&program::COMPUTE_BUDGET), vec![], &limit),
        (at(&program::COMPUTE_BUDGET), vec![], &price),
        (
            at(&t.token_program),
            vec![at(&source), at(&t.mint), at(&destination), at(&authority)],
            &transfer,
        ),
        (at(&program::MEMO), vec![], t.memo),
    ];

    let mut message = vec![0x80, 2, 1, (keys.len() - writable) as u8];
    compact(keys.len(), &mut message);
    for k in &keys {
        message.extend(k.as_bytes());
    }
    message.extend(t.blockhash);
    compact(instructions.len(), &mut message);
    for (program, accounts, data) in &instructions {
        message.push(*program);
        compact(accounts.len(), &mut message);
        message.extend(accounts);
        compact(data.len(), &mut message);
        message.extend(*data);
    }
    compact(0, &mut message); // no address lookup tables

    let mut tx = vec![2];
    tx.extend([0u8; 64]);
    tx.extend(payer.sign(&message));
    tx.extend(message);
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svm::tx::decode;

    #[test]
    fn decodes_as_the_official_layout_signed_by_the_payer() {
        let payer = Keypair::from_seed([2; 32]);
        let t = Transfer {
            fee_payer: Keypair::from_seed([1; 32]).pubkey(),
            mint: program::USDC_DEVNET,
            token_program: program::TOKEN,
            decimals: 6,
            pay_to: Keypair::from_seed([3; 32]).pubkey(),
            amount: 1000,
            blockhash: [9; 32],
            memo: b"00112233445566778899aabbccddeeff",
        };
        let bytes = exact_transaction(&payer, &t);
        let tx = decode(&bytes).unwrap();
        assert_eq!(tx.version, Some(0));
        assert_eq!(tx.accounts[0], t.fee_payer);
        assert_eq!(tx.signatures[0], &[0u8; 64]);
        let programs: Vec<_> = tx.instructions.iter().map(|i| tx.program(i)).collect();
        assert_eq!(
            programs,
            [
                program::COMPUTE_BUDGET,
                program::COMPUTE_BUDGET,
                program::TOKEN,
                program::MEMO
            ]
        );
        let key = ed25519_dalek::VerifyingKey::from_bytes(payer.pubkey().as_bytes()).unwrap();
        let sig = ed25519_dalek::Signature::from_bytes(tx.signatures[1]);
        assert!(key.verify_strict(tx.message, &sig).is_ok());
    }
}
