//! Smart-wallet sign-ins: ERC-1271 signatures of deployed contract wallets and ERC-6492
//! signatures of wallets not deployed yet, checked by asking the chain.
//!
//! A sign-in whose signature does not recover in-process to the claimed `address` (or is not
//! 65 bytes) is handed to the [`ContractSignatures`] configured with
//! [`Prepaid::contract_signatures`](super::Prepaid::contract_signatures); without one it is
//! refused, as before. The answer must come from the chain: a long signature from an address
//! with code is never accepted on its own.
//!
//! The types live in [`crate::verify::wallet`], which `exact` payments share
//! ([`ExactEvmVerifier::with_contract_signatures`](crate::verify::ExactEvmVerifier::with_contract_signatures));
//! this module re-exports them under their old path.

pub use crate::verify::wallet::*;
