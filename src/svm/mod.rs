//! The x402 `exact` scheme on Solana (issue #20), verified in-process.
//!
//! The client sends a partially signed transaction: a compute-unit limit, a compute-unit
//! price, one SPL Token (or Token-2022) `TransferChecked` of the asset to `payTo`'s associated
//! token account, and optional Memo or Lighthouse instructions; its first account, the fee
//! payer, is the server's key (`extra.feePayer`) and has not signed yet. [`SvmVerifier`]
//! decodes it ([`tx`], legacy and v0 messages) and makes the `@x402/svm` 2.27 facilitator's
//! checks, in its order and with its codes ([`SvmError`](crate::verify::svm::SvmError)), plus
//! two of the spec's sponsor rules the reference leaves to simulation: the fee payer appears
//! in no instruction, and address lookup tables are refused (they cannot be resolved without
//! the chain, so the fee payer's isolation could not be proven).
//!
//! The proof's claim key is the hash of the signed message ([`crate::nonce::NonceKey::svm`]):
//! the chain deduplicates a transaction by its fee payer's signature, a function of the
//! message, so one message is one payment whatever the client's signature bytes.
//!
//! ```
//! use tower_x402::{Network, PaymentOption};
//! use tower_x402::proto::svm::Pubkey;
//! use tower_x402::svm::{SvmAsset, SvmVerifier};
//!
//! let fee_payer = Pubkey::from_static("EwWqGE4ZFKLofuestmU4LDdK7XM1N4ALgdZccwYugwGd");
//! let pay_to = Pubkey::from_static("2wKupLR9q6wXYppw8Gr2NvWxKBUqm4PPJKkQfoxHDBg4");
//! let option = PaymentOption::exact_svm(&SvmAsset::usdc_devnet(), "$0.001", pay_to, fee_payer)?;
//! assert_eq!(option.requirements().network, Network::SOLANA_DEVNET);
//! let verifier = SvmVerifier::new([fee_payer]);
//! # let _ = verifier;
//! # Ok::<_, tower_x402::error::ConfigError>(())
//! ```

pub mod ata;
mod keypair;
pub mod pay;
#[cfg(any(feature = "svm-settle", feature = "svm-client"))]
pub(crate) mod rpc;
#[cfg(feature = "svm-settle")]
mod settle;
pub mod tx;
mod verify;

pub use keypair::Keypair;
#[cfg(feature = "svm-settle")]
#[cfg_attr(docsrs, doc(cfg(feature = "svm-settle")))]
pub use settle::SvmSettler;
pub use verify::SvmVerifier;

use crate::Network;
use crate::proto::svm::Pubkey;

/// Program and mint addresses.
pub mod program {
    use crate::proto::svm::Pubkey;

    /// Decodes a base58 constant at compile time.
    const fn key(s: &str) -> Pubkey {
        const ALPHABET: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
        let s = s.as_bytes();
        let mut out = [0u8; 32];
        let mut i = 0;
        while i < s.len() {
            let mut digit = 0;
            while ALPHABET[digit] != s[i] {
                digit += 1;
            }
            // out = out * 58 + digit, big-endian.
            let mut carry = digit as u32;
            let mut j = 32;
            while j > 0 {
                j -= 1;
                let v = out[j] as u32 * 58 + carry;
                out[j] = (v & 0xff) as u8;
                carry = v >> 8;
            }
            assert!(carry == 0, "base58 constant longer than 32 bytes");
            i += 1;
        }
        Pubkey::new(out)
    }

    /// SPL Token.
    pub const TOKEN: Pubkey = key("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA");
    /// SPL Token-2022.
    pub const TOKEN_2022: Pubkey = key("TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb");
    /// The associated token account program.
    pub const ASSOCIATED_TOKEN: Pubkey = key("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL");
    /// The compute budget program.
    pub const COMPUTE_BUDGET: Pubkey = key("ComputeBudget111111111111111111111111111111");
    /// SPL Memo (v2).
    pub const MEMO: Pubkey = key("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr");
    /// Lighthouse, the assertions Phantom and Solflare add to a transaction.
    pub const LIGHTHOUSE: Pubkey = key("L2TExMFKdjpN9kozasaurPirfHy9P8sbXoAN1qA3S95");
    /// The system program.
    pub const SYSTEM: Pubkey = key("11111111111111111111111111111111");
    /// USDC on mainnet-beta.
    pub const USDC_MAINNET: Pubkey = key("EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v");
    /// USDC on devnet and testnet.
    pub const USDC_DEVNET: Pubkey = key("4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU");
}

/// An SPL token on a Solana cluster: the mint, its decimals and the program that owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvmAsset {
    /// The cluster.
    pub network: Network,
    /// The mint (the requirement's `asset`).
    pub mint: Pubkey,
    /// Decimals used to turn a `$` price into atomic units.
    pub decimals: u8,
    /// SPL Token or Token-2022.
    pub token_program: Pubkey,
}

impl SvmAsset {
    /// USDC on mainnet-beta.
    pub fn usdc() -> Self {
        Self {
            network: Network::SOLANA,
            mint: program::USDC_MAINNET,
            decimals: 6,
            token_program: program::TOKEN,
        }
    }

    /// USDC on devnet.
    pub fn usdc_devnet() -> Self {
        Self {
            network: Network::SOLANA_DEVNET,
            mint: program::USDC_DEVNET,
            decimals: 6,
            token_program: program::TOKEN,
        }
    }

    /// The USDC preset for `network`, if we ship one.
    pub fn usdc_on(network: Network) -> Option<Self> {
        match network {
            Network::SOLANA => Some(Self::usdc()),
            Network::SOLANA_DEVNET => Some(Self::usdc_devnet()),
            Network::SOLANA_TESTNET => Some(Self {
                network,
                ..Self::usdc_devnet()
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn const_base58_matches_the_decoder() {
        for (k, s) in [
            (
                program::TOKEN,
                "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA",
            ),
            (
                program::COMPUTE_BUDGET,
                "ComputeBudget111111111111111111111111111111",
            ),
            (program::SYSTEM, "11111111111111111111111111111111"),
            (
                program::USDC_MAINNET,
                "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
            ),
        ] {
            assert_eq!(k, s.parse::<Pubkey>().unwrap(), "{s}");
            assert_eq!(k.to_string(), s);
        }
    }
}
