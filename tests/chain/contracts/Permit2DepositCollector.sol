// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.28;

/// @title Permit2DepositCollector: tower-x402's own Permit2 deposit collector for `batch-settlement`.
/// @notice FOR TESTS. Written from the x402 spec and the official client's permit2 deposit
/// payload: the payer signs a Permit2 `PermitWitnessTransferFrom` with spender = THIS contract,
/// the deposit amount, and the witness `DepositWitness(bytes32 channelId)`, so the permit can
/// only fund the channel it was signed for. Not the reference contract and not audited.
/// @dev Only the escrow at the canonical address may call `collect`; the tokens go straight from
/// the payer to the escrow (which checks that its balance grew by `amount`). Permit2 checks the
/// deadline, the nonce and the signature; the payer must have approved Permit2 on the token.
contract Permit2DepositCollector {
    /// The canonical x402BatchSettlement address (where the tests etch `BatchSettlement.sol`).
    address public constant BATCH_SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;
    /// The canonical Permit2 (where the tests etch `Permit2.sol`).
    ISignatureTransfer public constant PERMIT2 = ISignatureTransfer(0x000000000022D473030F116dDEE9F6B43aC78BA3);
    /// EIP-712 type of the witness the payer signs.
    bytes32 public constant WITNESS_TYPEHASH = keccak256("DepositWitness(bytes32 channelId)");
    /// What Permit2 appends to its `PermitWitnessTransferFrom(...,` stub: the witness member,
    /// then the referenced types in alphabetical order (EIP-712 `encodeType`).
    string public constant WITNESS_TYPE_STRING =
        "DepositWitness witness)DepositWitness(bytes32 channelId)TokenPermissions(address token,uint256 amount)";

    error OnlyBatchSettlement();
    /// An EIP-2612 permit segment in the collector data: this test collector does not take one.
    error Eip2612Unsupported();

    /// `data` = `abi.encode(uint256 nonce, uint256 deadline, bytes signature, bytes eip2612Permit)`
    /// (the permit part must be empty here).
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external {
        if (msg.sender != BATCH_SETTLEMENT) revert OnlyBatchSettlement();
        (uint256 nonce, uint256 deadline, bytes memory signature, bytes memory eip2612Permit) =
            abi.decode(data, (uint256, uint256, bytes, bytes));
        if (eip2612Permit.length != 0) revert Eip2612Unsupported();
        PERMIT2.permitWitnessTransferFrom(
            ISignatureTransfer.PermitTransferFrom({
                permitted: ISignatureTransfer.TokenPermissions({token: token, amount: amount}),
                nonce: nonce,
                deadline: deadline
            }),
            ISignatureTransfer.SignatureTransferDetails({to: BATCH_SETTLEMENT, requestedAmount: amount}),
            payer,
            keccak256(abi.encode(WITNESS_TYPEHASH, channelId)),
            WITNESS_TYPE_STRING,
            signature
        );
    }
}

/// The one Permit2 call the collector makes (see `Permit2.sol`).
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
