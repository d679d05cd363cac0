// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.28;

/// @title ERC3009DepositCollector: tower-x402's own deposit collector for `batch-settlement`.
/// @notice FOR TESTS. Written from the x402 spec and the official client's deposit payload: the
/// payer signs an EIP-3009 `ReceiveWithAuthorization` to THIS contract for the deposit amount,
/// with `nonce = keccak256(abi.encode(channelId, salt))`, so the authorization can only fund the
/// channel it was signed for. Not the reference contract and not audited.
/// @dev Only the escrow at the canonical address may call `collect` (it checks that the tokens
/// arrived); `receiveWithAuthorization` makes the token refuse any other submitter, so a
/// front-runner cannot spend the authorization outside a deposit.
contract ERC3009DepositCollector {
    /// The canonical x402BatchSettlement address (where the tests etch `BatchSettlement.sol`).
    address public constant BATCH_SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;

    error OnlyBatchSettlement();
    error TransferFailed();

    /// `data` = `abi.encode(uint256 validAfter, uint256 validBefore, uint256 salt, bytes signature)`.
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external {
        if (msg.sender != BATCH_SETTLEMENT) revert OnlyBatchSettlement();
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(data, (uint256, uint256, uint256, bytes));
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        IERC3009(token).receiveWithAuthorization(
            payer, address(this), amount, validAfter, validBefore, nonce, signature
        );
        (bool ok, bytes memory ret) =
            token.call(abi.encodeWithSignature("transfer(address,uint256)", BATCH_SETTLEMENT, amount));
        if (!ok || (ret.length != 0 && !abi.decode(ret, (bool)))) revert TransferFailed();
    }
}

interface IERC3009 {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external;
}
