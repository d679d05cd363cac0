//! The one catalogue of reason codes: every `error` / `invalidReason` / `errorReason` string
//! this crate sends or passes through, as a typed [`Reason`].
//!
//! Re-exported as [`crate::rejection::reason`]. The constants below (and those of [`settle::onchain::reason`][crate::settle::onchain::reason],
//! [`verify::upto::reason`](crate::verify::upto::reason), the prepaid and sign-in modules) are
//! names for its variants, kept so that code reads as the table in [`crate::rejection`] does.
//!
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[crate::settle::onchain::reason]: https://docs.rs/tower-x402/latest/tower_x402/settle/onchain/reason/index.html"
)]

use std::borrow::Cow;
use std::fmt;

macro_rules! reasons {
    ($($(#[$m:meta])* $variant:ident = $wire:literal,)*) => {
        /// A reason code, with the reference's wire string ([`Reason::as_str`]).
        ///
        /// `Custom` is a server-chosen code (a custom verifier's or hook's policy refusal); every
        /// other variant is a code of the x402 reference or of this crate.
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum Reason {
            $($(#[$m])* $variant,)*
            /// A server-chosen code (policy): sent as is, never parsed from a remote.
            Custom(Cow<'static, str>),
        }

        impl Reason {
            /// Every code of the catalogue (all but `Custom`).
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The wire string.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $wire,)*
                    Self::Custom(s) => s,
                }
            }

            /// The wire string of a catalogued code (`None` for `Custom`).
            pub fn as_static(&self) -> Option<&'static str> {
                match self {
                    $(Self::$variant => Some($wire),)*
                    Self::Custom(_) => None,
                }
            }

            /// The catalogued code spelled `s`, if any (`Custom` is never parsed).
            pub fn from_wire(s: &str) -> Option<Self> {
                match s {
                    $($wire => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    /// `asset_not_deployed_contract`
    AssetNotDeployedContract = "asset_not_deployed_contract",
    /// `challenge_expired`
    ChallengeExpired = "challenge_expired",
    /// `eip6492_factory_not_allowed`
    Eip6492FactoryNotAllowed = "eip6492_factory_not_allowed",
    /// `facilitator_rejected`
    FacilitatorRejected = "facilitator_rejected",
    /// `insufficient_funds`
    InsufficientFunds = "insufficient_funds",
    /// `invalid_challenge`
    InvalidChallenge = "invalid_challenge",
    /// `invalid_exact_evm_authorization_value`
    InvalidExactEvmAuthorizationValue = "invalid_exact_evm_authorization_value",
    /// `invalid_exact_evm_eip3009_not_supported`
    InvalidExactEvmEip3009NotSupported = "invalid_exact_evm_eip3009_not_supported",
    /// `invalid_exact_evm_failed_to_parse_signature`
    InvalidExactEvmFailedToParseSignature = "invalid_exact_evm_failed_to_parse_signature",
    /// `invalid_exact_evm_insufficient_balance`
    InvalidExactEvmInsufficientBalance = "invalid_exact_evm_insufficient_balance",
    /// `invalid_exact_evm_missing_eip712_domain`
    InvalidExactEvmMissingEip712Domain = "invalid_exact_evm_missing_eip712_domain",
    /// `invalid_exact_evm_network_mismatch`
    InvalidExactEvmNetworkMismatch = "invalid_exact_evm_network_mismatch",
    /// `invalid_exact_evm_nonce_already_used`
    InvalidExactEvmNonceAlreadyUsed = "invalid_exact_evm_nonce_already_used",
    /// `invalid_exact_evm_payload_authorization_valid_after`
    InvalidExactEvmPayloadAuthorizationValidAfter = "invalid_exact_evm_payload_authorization_valid_after",
    /// `invalid_exact_evm_payload_authorization_valid_before`
    InvalidExactEvmPayloadAuthorizationValidBefore = "invalid_exact_evm_payload_authorization_valid_before",
    /// `invalid_exact_evm_payload_authorization_value`
    InvalidExactEvmPayloadAuthorizationValue = "invalid_exact_evm_payload_authorization_value",
    /// `invalid_exact_evm_payload_authorization_value_mismatch`
    InvalidExactEvmPayloadAuthorizationValueMismatch = "invalid_exact_evm_payload_authorization_value_mismatch",
    /// `invalid_exact_evm_payload_recipient_mismatch`
    InvalidExactEvmPayloadRecipientMismatch = "invalid_exact_evm_payload_recipient_mismatch",
    /// `invalid_exact_evm_payload_signature`
    InvalidExactEvmPayloadSignature = "invalid_exact_evm_payload_signature",
    /// `invalid_exact_evm_payload_undeployed_smart_wallet`
    InvalidExactEvmPayloadUndeployedSmartWallet = "invalid_exact_evm_payload_undeployed_smart_wallet",
    /// `invalid_exact_evm_recipient_mismatch`
    InvalidExactEvmRecipientMismatch = "invalid_exact_evm_recipient_mismatch",
    /// `invalid_exact_evm_scheme`
    InvalidExactEvmScheme = "invalid_exact_evm_scheme",
    /// `invalid_exact_evm_signature`
    InvalidExactEvmSignature = "invalid_exact_evm_signature",
    /// `invalid_exact_evm_token_name_mismatch`
    InvalidExactEvmTokenNameMismatch = "invalid_exact_evm_token_name_mismatch",
    /// `invalid_exact_evm_token_version_mismatch`
    InvalidExactEvmTokenVersionMismatch = "invalid_exact_evm_token_version_mismatch",
    /// `invalid_exact_evm_transaction_failed`
    InvalidExactEvmTransactionFailed = "invalid_exact_evm_transaction_failed",
    /// `invalid_exact_evm_transaction_simulation_failed`
    InvalidExactEvmTransactionSimulationFailed = "invalid_exact_evm_transaction_simulation_failed",
    /// `invalid_exact_evm_transfer_event_mismatch`
    InvalidExactEvmTransferEventMismatch = "invalid_exact_evm_transfer_event_mismatch",
    /// `invalid_network`
    InvalidNetwork = "invalid_network",
    /// `invalid_payload`
    InvalidPayload = "invalid_payload",
    /// `invalid_payment_identifier`
    InvalidPaymentIdentifier = "invalid_payment_identifier",
    /// `invalid_payment_requirements`
    InvalidPaymentRequirements = "invalid_payment_requirements",
    /// `invalid_permit2_recipient_mismatch`
    InvalidPermit2RecipientMismatch = "invalid_permit2_recipient_mismatch",
    /// `invalid_permit2_signature`
    InvalidPermit2Signature = "invalid_permit2_signature",
    /// `invalid_permit2_spender`
    InvalidPermit2Spender = "invalid_permit2_spender",
    /// `invalid_scheme`
    InvalidScheme = "invalid_scheme",
    /// `invalid_siwx_domain_mismatch`
    InvalidSiwxDomainMismatch = "invalid_siwx_domain_mismatch",
    /// `invalid_siwx_expired`
    InvalidSiwxExpired = "invalid_siwx_expired",
    /// `invalid_siwx_malformed_signature`
    InvalidSiwxMalformedSignature = "invalid_siwx_malformed_signature",
    /// `invalid_siwx_nonce`
    InvalidSiwxNonce = "invalid_siwx_nonce",
    /// `invalid_siwx_nonce_reused`
    InvalidSiwxNonceReused = "invalid_siwx_nonce_reused",
    /// `invalid_siwx_not_before`
    InvalidSiwxNotBefore = "invalid_siwx_not_before",
    /// `invalid_siwx_payload`
    InvalidSiwxPayload = "invalid_siwx_payload",
    /// `invalid_siwx_signature`
    InvalidSiwxSignature = "invalid_siwx_signature",
    /// `invalid_siwx_unsupported_chain`
    InvalidSiwxUnsupportedChain = "invalid_siwx_unsupported_chain",
    /// `invalid_siwx_uri_mismatch`
    InvalidSiwxUriMismatch = "invalid_siwx_uri_mismatch",
    /// `invalid_transaction_state`
    InvalidTransactionState = "invalid_transaction_state",
    /// `invalid_upto_evm_network_mismatch`
    InvalidUptoEvmNetworkMismatch = "invalid_upto_evm_network_mismatch",
    /// `invalid_upto_evm_payload_settlement_exceeds_amount`
    InvalidUptoEvmPayloadSettlementExceedsAmount = "invalid_upto_evm_payload_settlement_exceeds_amount",
    /// `invalid_upto_evm_scheme`
    InvalidUptoEvmScheme = "invalid_upto_evm_scheme",
    /// `invalid_x402_version`
    InvalidX402Version = "invalid_x402_version",
    /// `missing_eip712_domain`
    MissingEip712Domain = "missing_eip712_domain",
    /// `network_mismatch`
    NetworkMismatch = "network_mismatch",
    /// `overloaded`
    Overloaded = "overloaded",
    /// `payment_identifier_conflict`
    PaymentIdentifierConflict = "payment_identifier_conflict",
    /// `payment_identifier_required`
    PaymentIdentifierRequired = "payment_identifier_required",
    /// `payment_in_progress`
    PaymentInProgress = "payment_in_progress",
    /// `permit2_allowance_required`
    Permit2AllowanceRequired = "permit2_allowance_required",
    /// `permit2_amount_mismatch`
    Permit2AmountMismatch = "permit2_amount_mismatch",
    /// `permit2_deadline_expired`
    Permit2DeadlineExpired = "permit2_deadline_expired",
    /// `permit2_deadline_too_far`
    Permit2DeadlineTooFar = "permit2_deadline_too_far",
    /// `permit2_insufficient_balance`
    Permit2InsufficientBalance = "permit2_insufficient_balance",
    /// `permit2_invalid_amount`
    Permit2InvalidAmount = "permit2_invalid_amount",
    /// `permit2_invalid_destination`
    Permit2InvalidDestination = "permit2_invalid_destination",
    /// `permit2_invalid_nonce`
    Permit2InvalidNonce = "permit2_invalid_nonce",
    /// `permit2_invalid_owner`
    Permit2InvalidOwner = "permit2_invalid_owner",
    /// `permit2_not_yet_valid`
    Permit2NotYetValid = "permit2_not_yet_valid",
    /// `permit2_payment_too_early`
    Permit2PaymentTooEarly = "permit2_payment_too_early",
    /// `permit2_proxy_not_deployed`
    Permit2ProxyNotDeployed = "permit2_proxy_not_deployed",
    /// `permit2_simulation_failed`
    Permit2SimulationFailed = "permit2_simulation_failed",
    /// `permit2_token_mismatch`
    Permit2TokenMismatch = "permit2_token_mismatch",
    /// `prepaid_credit_exhausted`
    PrepaidCreditExhausted = "prepaid_credit_exhausted",
    /// `prepaid_credit_expired`
    PrepaidCreditExpired = "prepaid_credit_expired",
    /// `rate_limited`
    RateLimited = "rate_limited",
    /// `refused_by_hook`
    RefusedByHook = "refused_by_hook",
    /// `resource_mismatch`: a v2 proof's echoed `resource.url` names another resource than
    /// the request (see [`ResourceCheck`](crate::ResourceCheck)).
    ResourceMismatch = "resource_mismatch",
    /// `response_body_failed`
    ResponseBodyFailed = "response_body_failed",
    /// `service_unavailable`
    ServiceUnavailable = "service_unavailable",
    /// `settlement_outcome_unknown`
    SettlementOutcomeUnknown = "settlement_outcome_unknown",
    /// `settlement_pending`
    SettlementPending = "settlement_pending",
    /// `smart_wallet_deployment_failed`
    SmartWalletDeploymentFailed = "smart_wallet_deployment_failed",
    /// `unexpected_settle_error`
    UnexpectedSettleError = "unexpected_settle_error",
    /// `unexpected_verify_error`
    UnexpectedVerifyError = "unexpected_verify_error",
    /// `unsupported_payload_type`
    UnsupportedPayloadType = "unsupported_payload_type",
    /// `unsupported_scheme`
    UnsupportedScheme = "unsupported_scheme",
    /// `upto_facilitator_mismatch`
    UptoFacilitatorMismatch = "upto_facilitator_mismatch",
    // Solana `exact` (the `@x402/svm` 2.27 facilitator's codes, issue #20).
    /// `duplicate_settlement`
    DuplicateSettlement = "duplicate_settlement",
    /// `invalid_exact_svm_unsupported_scheme`
    InvalidExactSvmUnsupportedScheme = "invalid_exact_svm_unsupported_scheme",
    /// `invalid_exact_svm_network_mismatch`
    InvalidExactSvmNetworkMismatch = "invalid_exact_svm_network_mismatch",
    /// `invalid_exact_svm_payload_missing_fee_payer`
    InvalidExactSvmPayloadMissingFeePayer = "invalid_exact_svm_payload_missing_fee_payer",
    /// `invalid_exact_svm_fee_payer_not_managed_by_facilitator`
    InvalidExactSvmFeePayerNotManagedByFacilitator = "invalid_exact_svm_fee_payer_not_managed_by_facilitator",
    /// `invalid_exact_svm_payload_transaction_could_not_be_decoded`
    InvalidExactSvmPayloadTransactionCouldNotBeDecoded = "invalid_exact_svm_payload_transaction_could_not_be_decoded",
    /// `invalid_exact_svm_payload_signature_invalid`
    InvalidExactSvmPayloadSignatureInvalid = "invalid_exact_svm_payload_signature_invalid",
    /// `invalid_exact_svm_payload_excessive_signers`
    InvalidExactSvmPayloadExcessiveSigners = "invalid_exact_svm_payload_excessive_signers",
    /// `invalid_exact_svm_fee_payer_mismatch`
    InvalidExactSvmFeePayerMismatch = "invalid_exact_svm_fee_payer_mismatch",
    /// `invalid_exact_svm_smart_wallet_alt_resolution_not_available`
    InvalidExactSvmSmartWalletAltResolutionNotAvailable = "invalid_exact_svm_smart_wallet_alt_resolution_not_available",
    /// `invalid_exact_svm_payload_transaction_instructions_length`
    InvalidExactSvmPayloadTransactionInstructionsLength = "invalid_exact_svm_payload_transaction_instructions_length",
    /// `invalid_exact_svm_payload_transaction_instructions_compute_limit_instruction`
    InvalidExactSvmPayloadTransactionInstructionsComputeLimitInstruction = "invalid_exact_svm_payload_transaction_instructions_compute_limit_instruction",
    /// `invalid_exact_svm_payload_transaction_instructions_compute_limit_instruction_too_high`
    InvalidExactSvmPayloadTransactionInstructionsComputeLimitInstructionTooHigh = "invalid_exact_svm_payload_transaction_instructions_compute_limit_instruction_too_high",
    /// `invalid_exact_svm_payload_transaction_instructions_compute_price_instruction`
    InvalidExactSvmPayloadTransactionInstructionsComputePriceInstruction = "invalid_exact_svm_payload_transaction_instructions_compute_price_instruction",
    /// `invalid_exact_svm_payload_transaction_instructions_compute_price_instruction_too_high`
    InvalidExactSvmPayloadTransactionInstructionsComputePriceInstructionTooHigh = "invalid_exact_svm_payload_transaction_instructions_compute_price_instruction_too_high",
    /// `invalid_exact_svm_payload_no_transfer_instruction`
    InvalidExactSvmPayloadNoTransferInstruction = "invalid_exact_svm_payload_no_transfer_instruction",
    /// `invalid_exact_svm_payload_transaction_fee_payer_transferring_funds`
    InvalidExactSvmPayloadTransactionFeePayerTransferringFunds = "invalid_exact_svm_payload_transaction_fee_payer_transferring_funds",
    /// `invalid_exact_svm_smart_wallet_fee_payer_not_isolated`
    InvalidExactSvmSmartWalletFeePayerNotIsolated = "invalid_exact_svm_smart_wallet_fee_payer_not_isolated",
    /// `invalid_exact_svm_payload_mint_mismatch`
    InvalidExactSvmPayloadMintMismatch = "invalid_exact_svm_payload_mint_mismatch",
    /// `invalid_exact_svm_payload_recipient_mismatch`
    InvalidExactSvmPayloadRecipientMismatch = "invalid_exact_svm_payload_recipient_mismatch",
    /// `invalid_exact_svm_payload_amount_mismatch`
    InvalidExactSvmPayloadAmountMismatch = "invalid_exact_svm_payload_amount_mismatch",
    /// `invalid_exact_svm_payload_unknown_fourth_instruction`
    InvalidExactSvmPayloadUnknownFourthInstruction = "invalid_exact_svm_payload_unknown_fourth_instruction",
    /// `invalid_exact_svm_payload_unknown_fifth_instruction`
    InvalidExactSvmPayloadUnknownFifthInstruction = "invalid_exact_svm_payload_unknown_fifth_instruction",
    /// `invalid_exact_svm_payload_unknown_sixth_instruction`
    InvalidExactSvmPayloadUnknownSixthInstruction = "invalid_exact_svm_payload_unknown_sixth_instruction",
    /// `invalid_exact_svm_payload_unknown_seventh_instruction`
    InvalidExactSvmPayloadUnknownSeventhInstruction = "invalid_exact_svm_payload_unknown_seventh_instruction",
    /// `invalid_exact_svm_payload_memo_count`
    InvalidExactSvmPayloadMemoCount = "invalid_exact_svm_payload_memo_count",
    /// `invalid_exact_svm_payload_memo_mismatch`
    InvalidExactSvmPayloadMemoMismatch = "invalid_exact_svm_payload_memo_mismatch",
    /// `invalid_exact_svm_transaction_failed`
    InvalidExactSvmTransactionFailed = "invalid_exact_svm_transaction_failed",
    /// `invalid_exact_svm_transaction_simulation_failed`
    InvalidExactSvmTransactionSimulationFailed = "invalid_exact_svm_transaction_simulation_failed",
    // Payment channels (`batch-settlement`, issue #19): the reference's codes.
    /// `invalid_batch_settlement_evm_scheme`
    BatchSettlementScheme = "invalid_batch_settlement_evm_scheme",
    /// `invalid_batch_settlement_evm_network_mismatch`
    BatchSettlementNetworkMismatch = "invalid_batch_settlement_evm_network_mismatch",
    /// `invalid_batch_settlement_evm_payload_type`
    BatchSettlementPayloadType = "invalid_batch_settlement_evm_payload_type",
    /// `invalid_batch_settlement_evm_voucher_payload`
    BatchSettlementVoucherPayload = "invalid_batch_settlement_evm_voucher_payload",
    /// `invalid_batch_settlement_evm_deposit_payload`
    BatchSettlementDepositPayload = "invalid_batch_settlement_evm_deposit_payload",
    /// `invalid_batch_settlement_evm_refund_payload`
    BatchSettlementRefundPayload = "invalid_batch_settlement_evm_refund_payload",
    /// `invalid_batch_settlement_evm_missing_eip712_domain`
    BatchSettlementMissingEip712Domain = "invalid_batch_settlement_evm_missing_eip712_domain",
    /// `invalid_batch_settlement_evm_channel_id_mismatch`
    BatchSettlementChannelIdMismatch = "invalid_batch_settlement_evm_channel_id_mismatch",
    /// `invalid_batch_settlement_evm_receiver_mismatch`
    BatchSettlementReceiverMismatch = "invalid_batch_settlement_evm_receiver_mismatch",
    /// `invalid_batch_settlement_evm_receiver_authorizer_mismatch`
    BatchSettlementReceiverAuthorizerMismatch = "invalid_batch_settlement_evm_receiver_authorizer_mismatch",
    /// `invalid_batch_settlement_evm_token_mismatch`
    BatchSettlementTokenMismatch = "invalid_batch_settlement_evm_token_mismatch",
    /// `invalid_batch_settlement_evm_withdraw_delay_mismatch`
    BatchSettlementWithdrawDelayMismatch = "invalid_batch_settlement_evm_withdraw_delay_mismatch",
    /// `invalid_batch_settlement_evm_withdraw_delay_out_of_range`
    BatchSettlementWithdrawDelayOutOfRange = "invalid_batch_settlement_evm_withdraw_delay_out_of_range",
    /// `invalid_batch_settlement_evm_voucher_signature`
    BatchSettlementVoucherSignature = "invalid_batch_settlement_evm_voucher_signature",
    /// `invalid_batch_settlement_evm_erc3009_authorization_required`
    BatchSettlementErc3009AuthorizationRequired = "invalid_batch_settlement_evm_erc3009_authorization_required",
    /// `invalid_batch_settlement_evm_payload_authorization_valid_before`
    BatchSettlementValidBefore = "invalid_batch_settlement_evm_payload_authorization_valid_before",
    /// `invalid_batch_settlement_evm_payload_authorization_valid_after`
    BatchSettlementValidAfter = "invalid_batch_settlement_evm_payload_authorization_valid_after",
    /// `invalid_batch_settlement_evm_receive_authorization_signature`
    BatchSettlementReceiveAuthorizationSignature = "invalid_batch_settlement_evm_receive_authorization_signature",
    /// `invalid_batch_settlement_evm_cumulative_amount_mismatch`
    BatchSettlementCumulativeAmountMismatch = "invalid_batch_settlement_evm_cumulative_amount_mismatch",
    /// `invalid_batch_settlement_evm_cumulative_below_claimed`
    BatchSettlementCumulativeBelowClaimed = "invalid_batch_settlement_evm_cumulative_below_claimed",
    /// `invalid_batch_settlement_evm_cumulative_exceeds_balance`
    BatchSettlementCumulativeExceedsBalance = "invalid_batch_settlement_evm_cumulative_exceeds_balance",
    /// `invalid_batch_settlement_evm_missing_channel`
    BatchSettlementMissingChannel = "invalid_batch_settlement_evm_missing_channel",
    /// `invalid_batch_settlement_evm_channel_not_found`
    BatchSettlementChannelNotFound = "invalid_batch_settlement_evm_channel_not_found",
    /// `invalid_batch_settlement_evm_refund_amount_invalid`
    BatchSettlementRefundAmountInvalid = "invalid_batch_settlement_evm_refund_amount_invalid",
    /// `invalid_batch_settlement_evm_refund_no_balance`
    BatchSettlementRefundNoBalance = "invalid_batch_settlement_evm_refund_no_balance",
    /// `invalid_batch_settlement_evm_charge_exceeds_signed_cumulative`
    BatchSettlementChargeExceedsSignedCumulative = "invalid_batch_settlement_evm_charge_exceeds_signed_cumulative",
    /// `invalid_batch_settlement_evm_channel_busy`
    BatchSettlementChannelBusy = "invalid_batch_settlement_evm_channel_busy",
    // Payment channels: Permit2 deposits (issue #19).
    /// `invalid_batch_settlement_evm_permit2_invalid_spender`
    BatchSettlementPermit2InvalidSpender = "invalid_batch_settlement_evm_permit2_invalid_spender",
    /// `invalid_batch_settlement_evm_permit2_amount_mismatch`
    BatchSettlementPermit2AmountMismatch = "invalid_batch_settlement_evm_permit2_amount_mismatch",
    /// `invalid_batch_settlement_evm_permit2_deadline_expired`
    BatchSettlementPermit2DeadlineExpired = "invalid_batch_settlement_evm_permit2_deadline_expired",
    /// `invalid_batch_settlement_evm_permit2_invalid_signature`
    BatchSettlementPermit2InvalidSignature = "invalid_batch_settlement_evm_permit2_invalid_signature",
    /// `invalid_batch_settlement_evm_permit2_allowance_required`
    BatchSettlementPermit2AllowanceRequired = "invalid_batch_settlement_evm_permit2_allowance_required",
}

impl Reason {
    /// A server-chosen code, e.g. for a policy refusal from a custom verifier.
    pub fn custom(code: impl Into<Cow<'static, str>>) -> Self {
        Self::Custom(code.into())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<Reason> for str {
    fn eq(&self, other: &Reason) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Reason> for &str {
    fn eq(&self, other: &Reason) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Reason> for String {
    fn eq(&self, other: &Reason) -> bool {
        self.as_str() == other.as_str()
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

// Names for the codes the layer emits itself (the rows of the table in `crate::rejection`).

/// The payment header could not be decoded.
pub const INVALID_PAYLOAD: Reason = Reason::InvalidPayload;

/// The protocol version is wrong for the header or not served by this route.
pub const INVALID_X402_VERSION: Reason = Reason::InvalidX402Version;

/// The route offers no requirement with this scheme.
pub const UNSUPPORTED_SCHEME: Reason = Reason::UnsupportedScheme;

/// The route offers no requirement on this network.
pub const INVALID_NETWORK: Reason = Reason::InvalidNetwork;

/// The echoed requirement (asset, payTo, amount) is not one the route offers.
pub const INVALID_PAYMENT_REQUIREMENTS: Reason = Reason::InvalidPaymentRequirements;

/// Bound challenges: the echoed challenge id is missing, malformed, tampered, made with an
/// unknown key, or issued for another resource, method or price.
pub const INVALID_CHALLENGE: Reason = Reason::InvalidChallenge;

/// A v2 proof's echoed `resource.url` names another resource than the request.
pub const RESOURCE_MISMATCH: Reason = Reason::ResourceMismatch;

/// Bound challenges: the echoed challenge id is authentic but expired.
pub const CHALLENGE_EXPIRED: Reason = Reason::ChallengeExpired;

/// The proof was already used, or is being used by a concurrent request.
pub const NONCE_ALREADY_USED: Reason = Reason::InvalidExactEvmNonceAlreadyUsed;

/// A Solana proof (its transaction) was already used, or is being used by a concurrent
/// request: the `@x402/svm` facilitator's code for the same refusal as [`NONCE_ALREADY_USED`].
pub const DUPLICATE_SETTLEMENT: Reason = Reason::DuplicateSettlement;

/// A dependency (nonce store, verifier, settler) is down: retry later.
pub const SERVICE_UNAVAILABLE: Reason = Reason::ServiceUnavailable;

/// A dependency (facilitator, RPC) rate-limits the server: retry after `Retry-After`.
pub const RATE_LIMITED: Reason = Reason::RateLimited;

/// The settlement was sent but its outcome is not known yet: the payment may have gone
/// through. Do **not** pay again; retry the same proof after `Retry-After`.
pub const SETTLEMENT_OUTCOME_UNKNOWN: Reason = Reason::SettlementOutcomeUnknown;

/// A [hook](crate::hooks) answered in place of the handler.
pub const REFUSED_BY_HOOK: Reason = Reason::RefusedByHook;

/// Too many payments are being verified at once: retry after `Retry-After`.
pub const OVERLOADED: Reason = Reason::Overloaded;

/// A request with the same payment identifier and proof is still being served: retry
/// after `Retry-After` to get its response.
pub const PAYMENT_IN_PROGRESS: Reason = Reason::PaymentInProgress;

/// The payment identifier is already bound to another proof or request.
pub const PAYMENT_IDENTIFIER_CONFLICT: Reason = Reason::PaymentIdentifierConflict;

/// The route requires a `payment-identifier` id and the payload has none.
pub const PAYMENT_IDENTIFIER_REQUIRED: Reason = Reason::PaymentIdentifierRequired;

/// The `payment-identifier` id is malformed.
pub const INVALID_PAYMENT_IDENTIFIER: Reason = Reason::InvalidPaymentIdentifier;

/// A facilitator refusal whose reason this crate does not know.
pub const FACILITATOR_REJECTED: Reason = Reason::FacilitatorRejected;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert_eq!(Reason::from_wire(r.as_str()).as_ref(), Some(r));
            assert!(seen.insert(r.as_str()), "{r} twice");
        }
        assert_eq!(Reason::from_wire("made_up"), None);
        assert_eq!(Reason::custom("policy_denied").as_str(), "policy_denied");
    }
}
