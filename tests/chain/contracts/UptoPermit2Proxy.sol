// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.28;

/// The two Permit2 calls the proxy makes (see `Permit2.sol`).
interface ISignatureTransfer {
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    struct SignatureTransferDetails {
        address to;
        uint256 requestedAmount;
    }

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external;
}

/// EIP-2612 `permit` on the token, for `settleWithPermit`.
interface IERC2612 {
    function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external;
}

/// @title UptoPermit2Proxy: the x402 `upto` scheme's Permit2 spender.
/// @notice FOR TESTS ONLY. Written for tower-x402 from the x402 `upto` EVM spec
/// (`specs/schemes/upto/scheme_upto_evm.md`) and the proxy ABI that the official x402 EVM
/// client and facilitator use: the same selectors, witness type and custom errors as the canonical
/// `x402UptoPermit2Proxy` at 0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002, so payloads signed for
/// it settle here unchanged. The payer signs a Permit2 `PermitWitnessTransferFrom` with this
/// proxy as spender, a MAXIMUM amount, and the witness `{to, facilitator, validAfter}`; only
/// `witness.facilitator` may then settle, for any amount up to that maximum, once (Permit2's nonce).
/// @dev The tests put the RUNTIME bytecode at the canonical address with `anvil_setCode`: no
/// constructor runs, so Permit2's address is a constant, and the reentrancy flag (slot 0) starts
/// at 0, which counts as "not entered" (`tests/chain/mod.rs` writes 1, what a deployment would
/// leave, so the gas of a first settle is a steady-state one).
///
/// Rebuild the committed `UptoPermit2Proxy.runtime.hex` with `contracts/compile.sh`.
contract UptoPermit2Proxy {
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    /// The EIP-2612 permit that lets Permit2 spend the owner's token (gas-sponsored approval).
    struct EIP2612Permit {
        uint256 value;
        uint256 deadline;
        bytes32 r;
        bytes32 s;
        uint8 v;
    }

    /// The canonical Permit2 (same address on every chain).
    ISignatureTransfer public constant PERMIT2 = ISignatureTransfer(0x000000000022D473030F116dDEE9F6B43aC78BA3);

    /// What Permit2 appends to its `PermitWitnessTransferFrom(...,` stub: the EIP-712 type string
    /// of the message the client signs (`Witness` and `TokenPermissions`, sorted).
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";
    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,address facilitator,uint256 validAfter)");

    /// `amount > permit.permitted.amount`.
    error AmountExceedsPermitted();
    /// `msg.sender != witness.facilitator`.
    error UnauthorizedFacilitator();
    /// `block.timestamp < witness.validAfter`.
    error PaymentTooEarly();
    /// `owner` is the zero address.
    error InvalidOwner();
    /// `witness.to` is the zero address.
    error InvalidDestination();
    /// The EIP-2612 permit's value is not the Permit2 permit's maximum.
    error Permit2612AmountMismatch();
    /// A settle re-entered through the token.
    error ReentrancyGuardReentrantCall();

    event Settled();
    event SettledWithPermit();

    uint256 private constant NOT_ENTERED = 1;
    uint256 private constant ENTERED = 2;
    /// Slot 0; anything but ENTERED means "not entered" (0 before the harness writes 1).
    uint256 private _status;

    modifier nonReentrant() {
        if (_status == ENTERED) revert ReentrancyGuardReentrantCall();
        _status = ENTERED;
        _;
        _status = NOT_ENTERED;
    }

    /// Transfers `amount` (<= the signed maximum) from `owner` to `witness.to` through Permit2.
    function settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        _settle(permit, amount, owner, witness, signature);
        emit Settled();
    }

    /// As `settle`, after submitting the owner's EIP-2612 permit for Permit2 to the token. A
    /// failing `permit` is ignored (it may have been submitted already by someone else): Permit2's
    /// transfer then fails on its own if the allowance is missing.
    function settleWithPermit(
        EIP2612Permit calldata permit2612,
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        if (permit2612.value != permit.permitted.amount) revert Permit2612AmountMismatch();
        try IERC2612(permit.permitted.token).permit(
            owner, address(PERMIT2), permit2612.value, permit2612.deadline, permit2612.v, permit2612.r, permit2612.s
        ) {} catch {}
        _settle(permit, amount, owner, witness, signature);
        emit SettledWithPermit();
    }

    function _settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) private {
        if (amount > permit.permitted.amount) revert AmountExceedsPermitted();
        if (msg.sender != witness.facilitator) revert UnauthorizedFacilitator();
        if (block.timestamp < witness.validAfter) revert PaymentTooEarly();
        if (owner == address(0)) revert InvalidOwner();
        if (witness.to == address(0)) revert InvalidDestination();

        // The witness struct hash; Permit2 binds it into the digest with WITNESS_TYPE_STRING.
        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter));
        PERMIT2.permitWitnessTransferFrom(
            permit,
            ISignatureTransfer.SignatureTransferDetails({to: witness.to, requestedAmount: amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
    }
}
