//! `upto` settlement: the x402 upto Permit2 proxy's `settle`, and the Permit2 reads that
//! [`check`](super::OnchainSettler) needs (allowance, nonce bitmap).

use alloy_primitives::{Address, Bytes, U256};
use alloy_sol_types::{SolCall, SolError, sol};

use crate::proto::upto::Permit2Authorization;
pub(super) use crate::verify::upto::{PERMIT2, UPTO_PROXY};

/// Reasons of `upto` refusals at check or settle time.
pub(super) mod reason {
    use crate::reason::Reason;
    pub(in super::super) use crate::verify::upto::reason::{
        FACILITATOR_MISMATCH, SETTLEMENT_EXCEEDS_AMOUNT,
    };

    /// The payer has not approved Permit2 for enough of the token (the reference's code).
    pub(in super::super) const ALLOWANCE_REQUIRED: Reason = Reason::Permit2AllowanceRequired;
    /// Permit2 refused the nonce (used) — the reference's code.
    pub(in super::super) const INVALID_NONCE: Reason = Reason::Permit2InvalidNonce;
    /// Permit2 refused the deadline.
    pub(in super::super) const DEADLINE_EXPIRED: Reason =
        crate::verify::upto::reason::DEADLINE_EXPIRED;
    /// Permit2 refused the signature.
    pub(in super::super) const SIGNATURE: Reason = crate::verify::upto::reason::SIGNATURE;
    /// The proxy refused: `validAfter` not reached.
    pub(in super::super) const PAYMENT_TOO_EARLY: Reason = Reason::Permit2PaymentTooEarly;
}

sol! {
    interface IErc20Allowance {
        function allowance(address owner, address spender) external view returns (uint256);
    }

    interface IPermit2 {
        function nonceBitmap(address owner, uint256 wordPos) external view returns (uint256);
        error InvalidNonce();
        error SignatureExpired(uint256 signatureDeadline);
        error InvalidSigner();
        error InvalidSignature();
        error InvalidAmount(uint256 maxAmount);
    }

    /// The x402 `upto` Permit2 proxy's ABI (the `upto` spec; the same selectors on every chain).
    interface IUptoProxy {
        struct TokenPermissions { address token; uint256 amount; }
        struct PermitTransferFrom { TokenPermissions permitted; uint256 nonce; uint256 deadline; }
        struct Witness { address to; address facilitator; uint256 validAfter; }
        function settle(
            PermitTransferFrom permit,
            uint256 amount,
            address owner,
            Witness witness,
            bytes signature
        ) external;
        error AmountExceedsPermitted();
        error UnauthorizedFacilitator();
        error PaymentTooEarly();
    }
}

pub(super) fn allowance_call(owner: Address) -> IErc20Allowance::allowanceCall {
    IErc20Allowance::allowanceCall {
        owner,
        spender: PERMIT2,
    }
}

/// Permit2 keeps unordered nonces in 256-bit words: word `nonce >> 8`, bit `nonce & 0xff`.
pub(super) fn nonce_bitmap_call(permit: &Permit2Authorization) -> IPermit2::nonceBitmapCall {
    IPermit2::nonceBitmapCall {
        owner: permit.from,
        wordPos: permit.nonce >> 8,
    }
}

pub(super) fn nonce_used(permit: &Permit2Authorization, bitmap: U256) -> bool {
    let bit = permit.nonce.as_limbs()[0] & 0xff;
    bitmap.bit(bit as usize)
}

/// `settle(permit, amount, owner, witness, signature)` on the upto proxy.
pub(super) fn settle_calldata(
    permit: &Permit2Authorization,
    amount: U256,
    signature: &Bytes,
) -> Bytes {
    IUptoProxy::settleCall {
        permit: IUptoProxy::PermitTransferFrom {
            permitted: IUptoProxy::TokenPermissions {
                token: permit.permitted.token,
                amount: permit.permitted.amount,
            },
            nonce: permit.nonce,
            deadline: permit.deadline,
        },
        amount,
        owner: permit.from,
        witness: IUptoProxy::Witness {
            to: permit.witness.to,
            facilitator: permit.witness.facilitator,
            validAfter: permit.witness.valid_after,
        },
        signature: signature.clone(),
    }
    .abi_encode()
    .into()
}

/// The reason for a Permit2 or proxy custom error, from the revert data's selector.
pub(super) fn custom_error(data: &[u8]) -> Option<crate::reason::Reason> {
    let selector: [u8; 4] = data.get(..4)?.try_into().ok()?;
    Some(match selector {
        IPermit2::InvalidNonce::SELECTOR => reason::INVALID_NONCE,
        IPermit2::SignatureExpired::SELECTOR => reason::DEADLINE_EXPIRED,
        IPermit2::InvalidSigner::SELECTOR | IPermit2::InvalidSignature::SELECTOR => {
            reason::SIGNATURE
        }
        IPermit2::InvalidAmount::SELECTOR | IUptoProxy::AmountExceedsPermitted::SELECTOR => {
            reason::SETTLEMENT_EXCEEDS_AMOUNT
        }
        IUptoProxy::UnauthorizedFacilitator::SELECTOR => reason::FACILITATOR_MISMATCH,
        IUptoProxy::PaymentTooEarly::SELECTOR => reason::PAYMENT_TOO_EARLY,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use alloy_primitives::hex;

    use super::*;

    #[test]
    fn selectors_are_the_contracts() {
        // `cast sig` values of the Permit2 and proxy errors.
        assert_eq!(IPermit2::InvalidNonce::SELECTOR, hex!("756688fe"));
        assert_eq!(IPermit2::InvalidSigner::SELECTOR, hex!("815e1d64"));
        assert_eq!(IUptoProxy::settleCall::SELECTOR.len(), 4);
        assert_eq!(custom_error(&hex!("756688fe")), Some(reason::INVALID_NONCE));
        assert_eq!(custom_error(&hex!("00000000")), None);
        assert_eq!(custom_error(&[]), None);
    }
}
