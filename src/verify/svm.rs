//! Why a Solana `exact` payment was refused: the reference facilitator's checks, in its
//! order, each with its code. The checks themselves live in the `svm` feature
//! (`svm::SvmVerifier`); this is only the typed refusal, so the layer can map it without
//! that feature's dependencies.

use crate::reason::Reason;

/// A refused Solana `exact` transaction; [`Self::reason`] is the `@x402/svm` 2.27 code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvmError {
    /// The scheme is not `exact`.
    #[error("scheme is not exact")]
    Scheme,
    /// The payload and the requirement name different networks.
    #[error("network mismatch")]
    NetworkMismatch,
    /// The requirement has no `extra.feePayer` Solana address.
    #[error("requirement lacks extra.feePayer")]
    MissingFeePayer,
    /// `extra.feePayer` is not a key this server signs with.
    #[error("extra.feePayer is not our fee payer")]
    FeePayerNotManaged,
    /// Not base64, not a transaction, trailing bytes, or a malformed message.
    #[error("transaction could not be decoded")]
    Undecodable,
    /// A required signature is missing or does not verify (ed25519, strict).
    #[error("a required signature is missing or invalid")]
    SignatureInvalid,
    /// More required signers than the client and the fee payer.
    #[error("the transaction requires more signers than payer and fee payer")]
    ExcessiveSigners,
    /// The transaction's fee payer (first account) is not `extra.feePayer`.
    #[error("the transaction's fee payer is not extra.feePayer")]
    FeePayerMismatch,
    /// The transaction loads accounts from address lookup tables, which an in-process
    /// verifier cannot resolve (so the fee payer's isolation could not be proven).
    #[error("address lookup tables cannot be resolved in-process")]
    AddressLookupTables,
    /// Fewer than 3 or more than 7 instructions.
    #[error("3 to 7 instructions expected")]
    InstructionCount,
    /// The first instruction is not a well-formed `SetComputeUnitLimit`.
    #[error("first instruction is not SetComputeUnitLimit")]
    ComputeLimit,
    /// The compute-unit limit is above the configured cap.
    #[error("compute unit limit above the cap")]
    ComputeLimitTooHigh,
    /// The second instruction is not a well-formed `SetComputeUnitPrice`.
    #[error("second instruction is not SetComputeUnitPrice")]
    ComputePrice,
    /// The compute-unit price is above the cap (5 lamports per unit by default).
    #[error("compute unit price above the cap")]
    ComputePriceTooHigh,
    /// The third instruction is not a token `TransferChecked`.
    #[error("third instruction is not a TransferChecked")]
    NoTransfer,
    /// The fee payer is the transfer's authority: it would pay with its own tokens.
    #[error("the fee payer is the transfer's authority")]
    FeePayerTransferring,
    /// The fee payer appears in an instruction's accounts or as a program.
    #[error("the fee payer is referenced by an instruction")]
    FeePayerNotIsolated,
    /// The transfer moves another mint than `asset`.
    #[error("mint mismatch")]
    MintMismatch,
    /// The destination is not `payTo`'s associated token account for `asset`.
    #[error("destination is not payTo's associated token account")]
    RecipientMismatch,
    /// The transfer's amount is not exactly `amount`.
    #[error("amount mismatch")]
    AmountMismatch,
    /// An optional instruction (4th to 7th) is neither Memo nor Lighthouse; the position
    /// (3 = fourth).
    #[error("unknown instruction at index {0}")]
    UnknownInstruction(u8),
    /// `extra.memo` is set and the transaction has not exactly one Memo.
    #[error("expected exactly one memo")]
    MemoCount,
    /// The Memo differs from `extra.memo`.
    #[error("memo mismatch")]
    MemoMismatch,
}

impl SvmError {
    /// The x402 `invalidReason` code.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Scheme => Reason::InvalidExactSvmUnsupportedScheme,
            Self::NetworkMismatch => Reason::InvalidExactSvmNetworkMismatch,
            Self::MissingFeePayer => Reason::InvalidExactSvmPayloadMissingFeePayer,
            Self::FeePayerNotManaged => Reason::InvalidExactSvmFeePayerNotManagedByFacilitator,
            Self::Undecodable => Reason::InvalidExactSvmPayloadTransactionCouldNotBeDecoded,
            Self::SignatureInvalid => Reason::InvalidExactSvmPayloadSignatureInvalid,
            Self::ExcessiveSigners => Reason::InvalidExactSvmPayloadExcessiveSigners,
            Self::FeePayerMismatch => Reason::InvalidExactSvmFeePayerMismatch,
            Self::AddressLookupTables => {
                Reason::InvalidExactSvmSmartWalletAltResolutionNotAvailable
            }
            Self::InstructionCount => Reason::InvalidExactSvmPayloadTransactionInstructionsLength,
            Self::ComputeLimit => {
                Reason::InvalidExactSvmPayloadTransactionInstructionsComputeLimitInstruction
            }
            Self::ComputeLimitTooHigh => {
                Reason::InvalidExactSvmPayloadTransactionInstructionsComputeLimitInstructionTooHigh
            }
            Self::ComputePrice => {
                Reason::InvalidExactSvmPayloadTransactionInstructionsComputePriceInstruction
            }
            Self::ComputePriceTooHigh => {
                Reason::InvalidExactSvmPayloadTransactionInstructionsComputePriceInstructionTooHigh
            }
            Self::NoTransfer => Reason::InvalidExactSvmPayloadNoTransferInstruction,
            Self::FeePayerTransferring => {
                Reason::InvalidExactSvmPayloadTransactionFeePayerTransferringFunds
            }
            Self::FeePayerNotIsolated => Reason::InvalidExactSvmSmartWalletFeePayerNotIsolated,
            Self::MintMismatch => Reason::InvalidExactSvmPayloadMintMismatch,
            Self::RecipientMismatch => Reason::InvalidExactSvmPayloadRecipientMismatch,
            Self::AmountMismatch => Reason::InvalidExactSvmPayloadAmountMismatch,
            Self::UnknownInstruction(3) => Reason::InvalidExactSvmPayloadUnknownFourthInstruction,
            Self::UnknownInstruction(4) => Reason::InvalidExactSvmPayloadUnknownFifthInstruction,
            Self::UnknownInstruction(5) => Reason::InvalidExactSvmPayloadUnknownSixthInstruction,
            Self::UnknownInstruction(_) => Reason::InvalidExactSvmPayloadUnknownSeventhInstruction,
            Self::MemoCount => Reason::InvalidExactSvmPayloadMemoCount,
            Self::MemoMismatch => Reason::InvalidExactSvmPayloadMemoMismatch,
        }
    }
}
