//! [`SvmVerifier`]: the checks of a Solana `exact` transaction, in-process.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use alloy_primitives::{B256, Bytes, U256};
use async_trait::async_trait;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::ata::associated_token_address;
use super::program;
use super::tx::{self, Transaction};
use crate::clock::{Clock, SystemClock};
use crate::proto::svm::Pubkey;
use crate::proto::{PaymentPayload, v2::PaymentRequirements};
use crate::verify::svm::SvmError;
use crate::verify::{EvmVerifier, SvmProof, VerifiedPayment, Verifier, VerifyError};

/// `SetComputeUnitLimit` and `SetComputeUnitPrice` in the compute budget program.
const SET_COMPUTE_UNIT_LIMIT: u8 = 2;
const SET_COMPUTE_UNIT_PRICE: u8 = 3;
/// `TransferChecked` in SPL Token and Token-2022.
const TRANSFER_CHECKED: u8 = 12;

/// The payload's JSON, the transaction still base64: a bad encoding is the reference's
/// "could not be decoded" (402), not a malformed proof (400).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPayload<'a> {
    #[serde(borrow)]
    transaction: Cow<'a, str>,
}

/// Verifies Solana `exact` payments in-process: the transaction's layout, amounts and
/// accounts as the `@x402/svm` 2.27 facilitator checks them, every required ed25519 signature
/// but the fee payer's (strict verification), and the fee payer's isolation. No RPC: whether
/// the payer has the funds and the blockhash is still alive is learnt at settlement (choose
/// settle-before-handler to learn it before the handler runs).
///
/// Requirements on other networks go to the EVM verifier given with [`Self::with_evm`] (one
/// route may offer both), or are refused.
#[derive(Clone)]
pub struct SvmVerifier {
    fee_payers: Arc<HashSet<Pubkey>>,
    max_compute_units: Option<u32>,
    max_compute_unit_price: u64,
    max_signers: u8,
    claim_ttl: u64,
    clock: Arc<dyn Clock>,
    evm: Option<EvmVerifier>,
}

impl std::fmt::Debug for SvmVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvmVerifier")
            .field("fee_payers", &self.fee_payers)
            .field("max_compute_units", &self.max_compute_units)
            .field("max_compute_unit_price", &self.max_compute_unit_price)
            .field("max_signers", &self.max_signers)
            .field("claim_ttl", &self.claim_ttl)
            .finish_non_exhaustive()
    }
}

impl SvmVerifier {
    /// The reference's cap on the compute-unit price: 5 lamports (5,000,000 micro-lamports).
    pub const DEFAULT_MAX_COMPUTE_UNIT_PRICE: u64 = 5_000_000;
    /// How long a claimed transaction stays blocked (seconds): a blockhash lives ~150 slots
    /// (60 to 90 s), so after 10 minutes the chain itself refuses the transaction.
    pub const DEFAULT_CLAIM_TTL: u64 = 600;

    /// A verifier for transactions whose fee payer is one of `fee_payers` (the keys this
    /// server co-signs with; `extra.feePayer` must be one of them).
    pub fn new(fee_payers: impl IntoIterator<Item = Pubkey>) -> Self {
        Self {
            fee_payers: Arc::new(fee_payers.into_iter().collect()),
            max_compute_units: None,
            max_compute_unit_price: Self::DEFAULT_MAX_COMPUTE_UNIT_PRICE,
            max_signers: 2,
            claim_ttl: Self::DEFAULT_CLAIM_TTL,
            clock: Arc::new(SystemClock),
            evm: None,
        }
    }

    setters! {
        /// Refuses a compute-unit limit above `units` (default: no cap, as the reference).
        #[must_use]
        pub fn with_max_compute_units(units: u32) => max_compute_units = Some(units);

        /// Refuses a compute-unit price above `micro_lamports` (default 5,000,000).
        #[must_use]
        pub fn with_max_compute_unit_price(micro_lamports: u64)
            => max_compute_unit_price = micro_lamports;

        /// Keeps a claimed transaction blocked `secs` (default 600).
        #[must_use]
        pub fn with_claim_ttl(secs: u64) => claim_ttl = secs;

        /// Uses `clock` for the claim's expiry (tests inject a fixed clock).
        #[must_use]
        pub fn with_clock(clock: impl Clock) => clock = Arc::new(clock);

        /// Verifies requirements on EVM networks with `evm` (a route offering both).
        #[must_use]
        pub fn with_evm(evm: EvmVerifier) => evm = Some(evm);
    }

    /// The whole check, synchronously (EVM requirements go to the EVM verifier's
    /// `verify_sync`).
    ///
    /// # Errors
    /// [`VerifyError::Svm`] with the reference's code, or [`VerifyError::InvalidPayload`]
    /// when the payload is not `{"transaction": "<base64>"}`.
    pub fn verify_sync(
        &self,
        payload: &PaymentPayload,
        req: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        if !req.network.is_solana() {
            return match &self.evm {
                Some(evm) => evm.verify_sync(payload, req),
                None => Err(SvmError::NetworkMismatch.into()),
            };
        }
        self.verify_svm(payload, req)
    }

    fn verify_svm(
        &self,
        payload: &PaymentPayload,
        req: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        if payload.scheme() != crate::verify::exact::SCHEME
            || req.scheme != crate::verify::exact::SCHEME
        {
            return Err(SvmError::Scheme.into());
        }
        if payload.network() != req.network {
            return Err(SvmError::NetworkMismatch.into());
        }
        let (Some(mint), Some(pay_to)) = (req.asset.svm(), req.pay_to.svm()) else {
            // The server's own requirement is not a Solana one: nothing to pay.
            return Err(SvmError::NetworkMismatch.into());
        };
        let fee_payer = req
            .extra_str("feePayer")
            .and_then(|s| s.parse::<Pubkey>().ok())
            .ok_or(SvmError::MissingFeePayer)?;
        if !self.fee_payers.contains(&fee_payer) {
            return Err(SvmError::FeePayerNotManaged.into());
        }

        let raw: RawPayload<'_> = serde_json::from_str(payload.raw_payload().get())
            .map_err(VerifyError::InvalidPayload)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(raw.transaction.as_bytes())
            .map_err(|_| SvmError::Undecodable)?;
        let tx = tx::decode(&bytes).map_err(|_| SvmError::Undecodable)?;

        if tx.header.required_signatures > self.max_signers {
            return Err(SvmError::ExcessiveSigners.into());
        }
        check_signatures(&tx, &fee_payer)?;
        if tx.lookup_tables > 0 {
            return Err(SvmError::AddressLookupTables.into());
        }
        let transfer = self.check_layout(&tx, req, &fee_payer, &mint, &pay_to)?;

        let signer_index = tx
            .accounts
            .iter()
            .position(|k| *k == transfer.authority)
            .filter(|i| tx.is_signer(*i) && *i > 0)
            // The authority must sign, or the transfer fails on chain after we served.
            .ok_or(SvmError::SignatureInvalid)?;
        let signature = Bytes::copy_from_slice(tx.signatures[signer_index]);
        let message_hash = B256::from(<[u8; 32]>::from(Sha256::digest(tx.message)));
        let proof = SvmProof::new(
            Bytes::from(bytes.clone()),
            transfer.authority,
            pay_to,
            mint,
            fee_payer,
            signature,
            message_hash,
        );
        let expires = self.clock.now().saturating_add(self.claim_ttl);
        Ok(VerifiedPayment::exact_svm(
            payload.version(),
            req.network,
            U256::from(transfer.amount),
            expires,
            proof,
        ))
    }

    /// The reference's static layout: limit, price, transfer, then up to 4 Memo or
    /// Lighthouse instructions; plus the fee payer in no instruction.
    fn check_layout(
        &self,
        tx: &Transaction<'_>,
        req: &PaymentRequirements,
        fee_payer: &Pubkey,
        mint: &Pubkey,
        pay_to: &Pubkey,
    ) -> Result<Transfer, SvmError> {
        let ixs = &tx.instructions;
        if !(3..=7).contains(&ixs.len()) {
            return Err(SvmError::InstructionCount);
        }
        let limit =
            compute_budget(tx, &ixs[0], SET_COMPUTE_UNIT_LIMIT, 4).ok_or(SvmError::ComputeLimit)?;
        let units = u32::from_le_bytes(limit.try_into().map_err(|_| SvmError::ComputeLimit)?);
        if self.max_compute_units.is_some_and(|max| units > max) {
            return Err(SvmError::ComputeLimitTooHigh);
        }
        let price =
            compute_budget(tx, &ixs[1], SET_COMPUTE_UNIT_PRICE, 8).ok_or(SvmError::ComputePrice)?;
        let micro_lamports =
            u64::from_le_bytes(price.try_into().map_err(|_| SvmError::ComputePrice)?);
        if micro_lamports > self.max_compute_unit_price {
            return Err(SvmError::ComputePriceTooHigh);
        }

        let transfer = transfer_checked(tx, &ixs[2]).ok_or(SvmError::NoTransfer)?;
        if transfer.authority == *fee_payer || self.fee_payers.contains(&transfer.authority) {
            return Err(SvmError::FeePayerTransferring);
        }
        if transfer.mint != *mint {
            return Err(SvmError::MintMismatch);
        }
        if transfer.destination != associated_token_address(pay_to, mint, &transfer.program) {
            return Err(SvmError::RecipientMismatch);
        }
        if U256::from(transfer.amount) != req.amount {
            return Err(SvmError::AmountMismatch);
        }

        let mut memos = Vec::new();
        for (i, ix) in ixs.iter().enumerate().skip(3) {
            let p = tx.program(ix);
            if p == program::MEMO {
                memos.push(ix.data);
            } else if p != program::LIGHTHOUSE {
                return Err(SvmError::UnknownInstruction(i as u8));
            }
        }
        if let Some(expected) = req.extra_str("memo") {
            match memos.as_slice() {
                [one] if *one == expected.as_bytes() => {}
                [_] => return Err(SvmError::MemoMismatch),
                _ => return Err(SvmError::MemoCount),
            }
        }

        // The spec's sponsor rule (§2.1.1): the fee payer signs for fees only, so no
        // instruction may name it, as a program or an account (whatever its role).
        let referenced = ixs
            .iter()
            .any(|ix| ix.program == 0 || ix.accounts.contains(&0))
            || tx.accounts[1..].contains(fee_payer);
        if referenced {
            return Err(SvmError::FeePayerNotIsolated);
        }
        Ok(transfer)
    }
}

/// The data after `discriminator` of a compute budget instruction of exactly that length.
fn compute_budget<'a>(
    tx: &Transaction<'a>,
    ix: &tx::Instruction<'a>,
    discriminator: u8,
    len: usize,
) -> Option<&'a [u8]> {
    if tx.program(ix) != program::COMPUTE_BUDGET {
        return None;
    }
    match ix.data.split_first() {
        Some((d, rest)) if *d == discriminator && rest.len() == len => Some(rest),
        _ => None,
    }
}

/// A decoded `TransferChecked`.
struct Transfer {
    program: Pubkey,
    mint: Pubkey,
    destination: Pubkey,
    authority: Pubkey,
    amount: u64,
}

/// `TransferChecked { amount: u64, decimals: u8 }` with accounts (source, mint, destination,
/// authority), in SPL Token or Token-2022.
fn transfer_checked(tx: &Transaction<'_>, ix: &tx::Instruction<'_>) -> Option<Transfer> {
    let program = tx.program(ix);
    if program != program::TOKEN && program != program::TOKEN_2022 {
        return None;
    }
    let (&d, rest) = ix.data.split_first()?;
    if d != TRANSFER_CHECKED || rest.len() != 9 || ix.accounts.len() < 4 {
        return None;
    }
    let amount = u64::from_le_bytes(rest[..8].try_into().ok()?);
    Some(Transfer {
        program,
        mint: tx.account(ix, 1)?,
        destination: tx.account(ix, 2)?,
        authority: tx.account(ix, 3)?,
        amount,
    })
}

/// Account 0 is `fee_payer` (its signature comes at settlement); every other required
/// signature verifies, strictly, over the message.
fn check_signatures(tx: &Transaction<'_>, fee_payer: &Pubkey) -> Result<(), SvmError> {
    if tx.accounts.first() != Some(fee_payer) {
        return Err(SvmError::FeePayerMismatch);
    }
    for i in 1..usize::from(tx.header.required_signatures) {
        let key = ed25519_dalek::VerifyingKey::from_bytes(tx.accounts[i].as_bytes())
            .map_err(|_| SvmError::SignatureInvalid)?;
        let sig = ed25519_dalek::Signature::from_bytes(tx.signatures[i]);
        key.verify_strict(tx.message, &sig)
            .map_err(|_| SvmError::SignatureInvalid)?;
    }
    Ok(())
}

#[async_trait]
impl Verifier for SvmVerifier {
    async fn verify(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        if !requirements.network.is_solana()
            && let Some(evm) = &self.evm
        {
            return evm.verify(payload, requirements).await;
        }
        self.verify_sync(payload, requirements)
    }
}
