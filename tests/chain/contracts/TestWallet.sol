// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

/// @title TestWallet — a minimal ERC-1271 smart wallet for the sign-in tests.
/// @notice One owner key: a signature is valid iff it is 65 bytes and `ecrecover(hash, sig)`
///         is the owner. Deployed only through `TestWalletFactory` (CREATE2), so the tests
///         have both a deployed wallet and a counterfactual one (ERC-6492).
contract TestWallet {
    address public immutable owner;

    constructor(address owner_) {
        owner = owner_;
    }

    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        if (signature.length != 65) return 0xffffffff;
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (v < 27) v += 27;
        address signer = ecrecover(hash, v, r, s);
        return signer != address(0) && signer == owner ? bytes4(0x1626ba7e) : bytes4(0xffffffff);
    }
}

/// @title TestWalletFactory — deploys `TestWallet`s at CREATE2 addresses.
/// @notice Stateless, so it can be placed with `anvil_setCode`. `deploy` of a wallet that
///         exists returns it (ERC-6492 validators may call the factory of a deployed wallet).
contract TestWalletFactory {
    function deploy(address owner, bytes32 salt) external returns (address wallet) {
        wallet = walletAddress(owner, salt);
        if (wallet.code.length == 0) {
            wallet = address(new TestWallet{salt: salt}(owner));
        }
    }

    function walletAddress(address owner, bytes32 salt) public view returns (address) {
        bytes32 init = keccak256(abi.encodePacked(type(TestWallet).creationCode, abi.encode(owner)));
        return address(uint160(uint256(keccak256(abi.encodePacked(bytes1(0xff), address(this), salt, init)))));
    }
}
