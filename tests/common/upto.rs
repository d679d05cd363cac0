//! x402 `upto` on EVM, client side: the Permit2 `PermitWitnessTransferFrom` message that the
//! official `@x402/evm` `UptoEvmScheme` signs, its EIP-712 digest and signature, the JSON
//! `payload` it sends, and the calldata of `x402UptoPermit2Proxy.settle`.
//!
//! Self-contained (dev-dependencies only: alloy primitives/sol-types/signer, serde_json), so any
//! test can use it, with or without a chain: `tests/chain/mod.rs` mounts it as `chain::upto`;
//! a test without the chain can mount it with `#[path = "common/upto.rs"] mod upto;`.
//!
//! Mirrors `@x402/evm` 2.27.0 `upto/client` (`createUptoPermit2Payload`): domain
//! `{name: "Permit2", chainId, verifyingContract: PERMIT2}` (no version), types
//! `uptoPermit2WitnessTypes`, spender = the upto proxy, witness
//! `{to: payTo, facilitator: extra.facilitatorAddress, validAfter: 0}`,
//! deadline = now + maxTimeoutSeconds, a random 256-bit nonce.
#![allow(dead_code, unreachable_pub)]

use alloy_primitives::{Address, B256, Bytes, U256, address};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use alloy_sol_types::{Eip712Domain, SolCall, SolStruct, eip712_domain, sol};
use serde_json::{Value, json};

/// Canonical Permit2 (same address on every chain).
pub const PERMIT2: Address = address!("0x000000000022D473030F116dDEE9F6B43aC78BA3");
/// The x402 upto Permit2 proxy (`x402UptoPermit2ProxyAddress` in `@x402/evm`): the spender the
/// client signs for; only `witness.facilitator` may call its `settle`.
pub const UPTO_PROXY: Address = address!("0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002");
/// Base Sepolia (`eip155:84532`), the test chain's id.
pub const BASE_SEPOLIA_CHAIN_ID: u64 = 84532;

sol! {
    /// Permit2 `TokenPermissions`: the token and the MAXIMUM the proxy may transfer.
    #[derive(Debug, PartialEq, Eq)]
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    /// The x402 upto witness, bound into the signature (type string of
    /// `x402UptoPermit2Proxy.WITNESS_TYPE_STRING`).
    #[derive(Debug, PartialEq, Eq)]
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    /// The EIP-712 message the payer signs (primary type `PermitWitnessTransferFrom`). Its type
    /// string is Permit2's stub plus the proxy's witness type string, so Permit2 recomputes the
    /// same digest from the proxy's call.
    #[derive(Debug, PartialEq, Eq)]
    struct PermitWitnessTransferFrom {
        TokenPermissions permitted;
        address spender;
        uint256 nonce;
        uint256 deadline;
        Witness witness;
    }

    /// `ISignatureTransfer.PermitTransferFrom`: what `settle` takes (the spender is implicit:
    /// Permit2 uses `msg.sender`, the proxy).
    #[derive(Debug, PartialEq, Eq)]
    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    /// `x402UptoPermit2Proxy.settle`: transfers `amount` (<= `permit.permitted.amount`) from
    /// `owner` to `witness.to`; `msg.sender` must be `witness.facilitator`.
    function settle(
        PermitTransferFrom permit,
        uint256 amount,
        address owner,
        Witness witness,
        bytes signature
    ) external;

    /// Proxy: `amount > permit.permitted.amount`.
    error AmountExceedsPermitted();
    /// Proxy: `msg.sender != witness.facilitator`.
    error UnauthorizedFacilitator();
    /// Proxy: `block.timestamp < witness.validAfter`.
    error PaymentTooEarly();
    /// Permit2: the nonce's bit is already set.
    error InvalidNonce();
    /// Permit2: `block.timestamp > permit.deadline`.
    error SignatureExpired(uint256 signatureDeadline);
    /// Permit2: the signature does not recover to `owner`.
    error InvalidSigner();
    /// Permit2: malformed signature.
    error InvalidSignature();
}

/// The EIP-712 domain Permit2 verifies against on `chain_id` (no `version` field).
pub fn permit2_domain(chain_id: u64) -> Eip712Domain {
    eip712_domain! {
        name: "Permit2",
        chain_id: chain_id,
        verifying_contract: PERMIT2,
    }
}

/// The message the official client builds: spender = [`UPTO_PROXY`], `validAfter` = 0.
/// `max_amount` is the requirement's `amount` (the ceiling the server may settle).
pub fn upto_message(
    token: Address,
    max_amount: U256,
    pay_to: Address,
    facilitator: Address,
    nonce: U256,
    deadline: u64,
) -> PermitWitnessTransferFrom {
    PermitWitnessTransferFrom {
        permitted: TokenPermissions {
            token,
            amount: max_amount,
        },
        spender: UPTO_PROXY,
        nonce,
        deadline: U256::from(deadline),
        witness: Witness {
            to: pay_to,
            facilitator,
            validAfter: U256::ZERO,
        },
    }
}

/// The EIP-712 digest of `message` under [`permit2_domain`]`(chain_id)`.
pub fn upto_signing_hash(message: &PermitWitnessTransferFrom, chain_id: u64) -> B256 {
    message.eip712_signing_hash(&permit2_domain(chain_id))
}

/// Signs `message` like viem's `signTypedData`: 65 bytes `r || s || v` with `v` in {27, 28}
/// (RFC 6979 nonces on both sides, so the bytes equal viem's for the same key and message).
pub fn sign_upto_permit(
    signer: &PrivateKeySigner,
    message: &PermitWitnessTransferFrom,
    chain_id: u64,
) -> Bytes {
    let signature = signer
        .sign_hash_sync(&upto_signing_hash(message, chain_id))
        .expect("secp256k1 signing");
    Bytes::copy_from_slice(&signature.as_bytes())
}

/// The scheme `payload` object the official client sends (`{signature, permit2Authorization}`):
/// checksummed addresses, decimal strings for the integers.
pub fn upto_payload_json(
    from: Address,
    message: &PermitWitnessTransferFrom,
    signature: &Bytes,
) -> Value {
    json!({
        "signature": signature.to_string(),
        "permit2Authorization": {
            "from": from.to_checksum(None),
            "permitted": {
                "token": message.permitted.token.to_checksum(None),
                "amount": message.permitted.amount.to_string(),
            },
            "spender": message.spender.to_checksum(None),
            "nonce": message.nonce.to_string(),
            "deadline": message.deadline.to_string(),
            "witness": {
                "to": message.witness.to.to_checksum(None),
                "facilitator": message.witness.facilitator.to_checksum(None),
                "validAfter": message.witness.validAfter.to_string(),
            },
        },
    })
}

/// Parses a `permit2Authorization` object (as [`upto_payload_json`] or the official client
/// writes it) back into `(from, message)`; `None` when a field is missing or malformed.
pub fn upto_message_from_json(auth: &Value) -> Option<(Address, PermitWitnessTransferFrom)> {
    let addr = |v: &Value| v.as_str()?.parse::<Address>().ok();
    let num = |v: &Value| U256::from_str_radix(v.as_str()?, 10).ok();
    let message = PermitWitnessTransferFrom {
        permitted: TokenPermissions {
            token: addr(&auth["permitted"]["token"])?,
            amount: num(&auth["permitted"]["amount"])?,
        },
        spender: addr(&auth["spender"])?,
        nonce: num(&auth["nonce"])?,
        deadline: num(&auth["deadline"])?,
        witness: Witness {
            to: addr(&auth["witness"]["to"])?,
            facilitator: addr(&auth["witness"]["facilitator"])?,
            validAfter: num(&auth["witness"]["validAfter"])?,
        },
    };
    Some((addr(&auth["from"])?, message))
}

/// Calldata of `x402UptoPermit2Proxy.settle(permit, amount, owner, witness, signature)` for a
/// signed `message`, settling `amount`.
pub fn settle_calldata(
    message: &PermitWitnessTransferFrom,
    amount: U256,
    owner: Address,
    signature: &Bytes,
) -> Bytes {
    settleCall {
        permit: PermitTransferFrom {
            permitted: TokenPermissions {
                token: message.permitted.token,
                amount: message.permitted.amount,
            },
            nonce: message.nonce,
            deadline: message.deadline,
        },
        amount,
        owner,
        witness: Witness {
            to: message.witness.to,
            facilitator: message.witness.facilitator,
            validAfter: message.witness.validAfter,
        },
        signature: signature.clone(),
    }
    .abi_encode()
    .into()
}
