// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.28;

/// @title Permit2 (signature transfers only): the part of Uniswap's Permit2 that x402 payers sign for.
/// @notice FOR TESTS ONLY. Written for tower-x402 from Permit2's documented `ISignatureTransfer`
/// interface and its EIP-712 definitions (not from its code): the same function selectors,
/// custom errors, typehashes and domain, so a `PermitWitnessTransferFrom` or `PermitTransferFrom`
/// signed for the canonical Permit2 verifies here byte for byte. The allowance-based half of
/// Permit2 (`AllowanceTransfer`) and the batch transfers are left out: x402 never calls them.
/// @dev The tests put the RUNTIME bytecode at the canonical address
/// 0x000000000022D473030F116dDEE9F6B43aC78BA3 with `anvil_setCode`: no constructor runs, so the
/// domain separator is computed on every call from `block.chainid` and `address(this)`.
///
/// Rebuild the committed `Permit2.runtime.hex` with `contracts/compile.sh`.
contract Permit2 {
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

    /// `block.timestamp > deadline`.
    error SignatureExpired(uint256 signatureDeadline);
    /// The nonce's bit is already set (used or invalidated).
    error InvalidNonce();
    /// `requestedAmount > permitted.amount`.
    error InvalidAmount(uint256 maxAmount);
    /// A signature that is neither 65 bytes nor 64 (EIP-2098 compact).
    error InvalidSignatureLength();
    /// `ecrecover` found no signer.
    error InvalidSignature();
    /// The signature recovers to someone other than `owner`.
    error InvalidSigner();
    /// `owner` is a contract and its ERC-1271 `isValidSignature` did not return the magic value.
    error InvalidContractSignature();
    /// The token's `transferFrom` reverted or returned false.
    error TransferFromFailed();

    event UnorderedNonceInvalidation(address indexed owner, uint256 word, uint256 mask);

    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,uint256 chainId,address verifyingContract)");
    bytes32 private constant NAME_HASH = keccak256("Permit2");
    bytes32 private constant TOKEN_PERMISSIONS_TYPEHASH = keccak256("TokenPermissions(address token,uint256 amount)");
    bytes32 private constant PERMIT_TRANSFER_FROM_TYPEHASH = keccak256(
        "PermitTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline)TokenPermissions(address token,uint256 amount)"
    );
    /// The witness variant's type string is this stub followed by the caller's
    /// `witnessTypeString` (`"<Type> witness)<referenced types, sorted>"`), as EIP-712's
    /// `encodeType` of the whole message spells it.
    string private constant WITNESS_STUB =
        "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,";
    bytes4 private constant ERC1271_MAGIC = 0x1626ba7e;

    /// Unordered nonces: bit `nonce & 0xff` of word `nonce >> 8`, per owner.
    mapping(address => mapping(uint256 => uint256)) public nonceBitmap;

    /// The EIP-712 domain separator of `{name: "Permit2", chainId, verifyingContract}` (no version).
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, NAME_HASH, block.chainid, address(this)));
    }

    /// Transfers `requestedAmount` (<= `permit.permitted.amount`) of the permitted token from
    /// `owner` to `transferDetails.to`; `msg.sender` is the spender the owner signed for.
    function permitTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes calldata signature
    ) external {
        bytes32 structHash = keccak256(
            abi.encode(
                PERMIT_TRANSFER_FROM_TYPEHASH, _hashPermissions(permit.permitted), msg.sender, permit.nonce, permit.deadline
            )
        );
        _transfer(permit, transferDetails, owner, structHash, signature);
    }

    /// As [`permitTransferFrom`], with the caller's witness (an EIP-712 struct hash) bound into
    /// the signed message; `witnessTypeString` completes the message's type string.
    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external {
        bytes32 typeHash = keccak256(abi.encodePacked(WITNESS_STUB, witnessTypeString));
        bytes32 structHash = keccak256(
            abi.encode(typeHash, _hashPermissions(permit.permitted), msg.sender, permit.nonce, permit.deadline, witness)
        );
        _transfer(permit, transferDetails, owner, structHash, signature);
    }

    /// Sets the `mask` bits of `msg.sender`'s nonce word `wordPos`, so those nonces can no longer be used.
    function invalidateUnorderedNonces(uint256 wordPos, uint256 mask) external {
        nonceBitmap[msg.sender][wordPos] |= mask;
        emit UnorderedNonceInvalidation(msg.sender, wordPos, mask);
    }

    function _hashPermissions(TokenPermissions calldata permitted) private pure returns (bytes32) {
        return keccak256(abi.encode(TOKEN_PERMISSIONS_TYPEHASH, permitted.token, permitted.amount));
    }

    /// The checks in Permit2's documented order (deadline, amount, nonce, signature), then the transfer.
    function _transfer(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 structHash,
        bytes calldata signature
    ) private {
        if (block.timestamp > permit.deadline) revert SignatureExpired(permit.deadline);
        uint256 amount = transferDetails.requestedAmount;
        if (amount > permit.permitted.amount) revert InvalidAmount(permit.permitted.amount);
        _useNonce(owner, permit.nonce);
        _verify(keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), structHash)), owner, signature);

        (bool ok, bytes memory ret) = permit.permitted.token.call(
            abi.encodeWithSelector(0x23b872dd, owner, transferDetails.to, amount) // transferFrom(address,address,uint256)
        );
        // Tokens that return nothing (USDT-style) count as success when the call did not revert.
        if (!ok || (ret.length != 0 && (ret.length < 32 || abi.decode(ret, (uint256)) != 1))) {
            revert TransferFromFailed();
        }
    }

    function _useNonce(address owner, uint256 nonce) private {
        uint256 bit = 1 << (nonce & 0xff);
        uint256 word = nonceBitmap[owner][nonce >> 8];
        if (word & bit != 0) revert InvalidNonce();
        nonceBitmap[owner][nonce >> 8] = word | bit;
    }

    /// EOAs: a 65-byte `r || s || v` or 64-byte EIP-2098 `r || vs` secp256k1 signature of `digest`.
    /// Contracts: ERC-1271 `isValidSignature(digest, signature)`.
    function _verify(bytes32 digest, address owner, bytes calldata signature) private view {
        if (owner.code.length != 0) {
            (bool ok, bytes memory ret) =
                owner.staticcall(abi.encodeWithSelector(ERC1271_MAGIC, digest, signature));
            if (!ok || ret.length < 32 || bytes4(abi.decode(ret, (bytes32))) != ERC1271_MAGIC) {
                revert InvalidContractSignature();
            }
            return;
        }
        bytes32 r;
        bytes32 s;
        uint8 v;
        if (signature.length == 65) {
            r = bytes32(signature[0:32]);
            s = bytes32(signature[32:64]);
            v = uint8(signature[64]);
        } else if (signature.length == 64) {
            r = bytes32(signature[0:32]);
            bytes32 vs = bytes32(signature[32:64]);
            s = vs & bytes32(type(uint256).max >> 1);
            v = uint8(uint256(vs) >> 255) + 27;
        } else {
            revert InvalidSignatureLength();
        }
        address signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert InvalidSignature();
        if (signer != owner) revert InvalidSigner();
    }
}
