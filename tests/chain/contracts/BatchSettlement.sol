// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.28;

/// @title BatchSettlement: tower-x402's own escrow for the x402 `batch-settlement` scheme.
/// @notice FOR TESTS. Written from the x402 spec (`specs/schemes/batch-settlement/
/// scheme_batch_settlement_evm.md`): same EIP-712 domain ("x402 Batch Settlement", "1"), types,
/// functions and views as the canonical `x402BatchSettlement` the official client talks to, so
/// etched at the canonical address it is indistinguishable to that client. Not the reference
/// contract and not audited.
/// @dev Etched with `anvil_setCode`: no constructor runs, so nothing lives in immutables and the
/// domain separator is computed per call. Accounting per channel: `balance` (deposited minus
/// withdrawn and refunded) and `totalClaimed` (claimed by the receiver, never decreasing);
/// unclaimed escrow is `balance - totalClaimed`. Claims only move accounting; `settle` sweeps
/// a receiver's claimed-but-unsettled total per token in one transfer.
contract BatchSettlement {
    struct ChannelConfig {
        address payer;
        address payerAuthorizer;
        address receiver;
        address receiverAuthorizer;
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    /// One row of a claim: the payer's voucher, its signature, and the new cumulative
    /// `totalClaimed` the receiver takes (at most the voucher's ceiling).
    struct VoucherClaim {
        Voucher voucher;
        bytes signature;
        uint128 totalClaimed;
    }

    struct Channel {
        uint128 balance;
        uint128 totalClaimed;
    }

    struct Withdrawal {
        uint128 amount;
        uint40 initiatedAt;
    }

    struct ReceiverTotals {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    uint40 public constant MIN_WITHDRAW_DELAY = 15 minutes;
    uint40 public constant MAX_WITHDRAW_DELAY = 30 days;

    bytes32 public constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 public constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 public constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 public constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );
    bytes32 private constant EIP712_DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    /// secp256k1 n/2: larger `s` values are malleable and refused.
    uint256 private constant HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
    bytes4 private constant ERC1271_MAGIC = 0x1626ba7e;
    /// Transient slot of the reentrancy guard (EIP-1153: cleared after every transaction).
    bytes32 private constant GUARD_SLOT = keccak256("tower-x402.BatchSettlement.guard");

    mapping(bytes32 => Channel) public channels;
    mapping(bytes32 => Withdrawal) public pendingWithdrawals;
    mapping(bytes32 => uint256) public refundNonce;
    mapping(address => mapping(address => ReceiverTotals)) public receivers;

    event ChannelCreated(bytes32 indexed channelId, ChannelConfig config);
    event ChannelClosed(bytes32 indexed channelId, ChannelConfig config);
    event Deposited(bytes32 indexed channelId, address indexed sender, uint128 amount, uint128 balance);
    event Claimed(bytes32 indexed channelId, uint128 claimedAmount, uint128 totalClaimed);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint40 finalizeAfter);
    event WithdrawFinalized(bytes32 indexed channelId, uint128 amount);
    event Refunded(bytes32 indexed channelId, uint128 amount, uint256 nonce);

    error InvalidConfig();
    error ZeroAmount();
    error DepositShortfall();
    error NotAuthorized();
    error InvalidSignature();
    error ClaimAboveVoucher();
    error ClaimAboveBalance();
    error MixedAuthorizers();
    error EmptyClaims();
    error AmountExceedsUnclaimed();
    error NoPendingWithdrawal();
    error WithdrawDelayNotElapsed();
    error WrongRefundNonce();
    error TransferFailed();
    error Reentrancy();

    modifier nonReentrant() {
        bytes32 slot = GUARD_SLOT;
        uint256 entered;
        assembly {
            entered := tload(slot)
        }
        if (entered != 0) revert Reentrancy();
        assembly {
            tstore(slot, 1)
        }
        _;
        assembly {
            tstore(slot, 0)
        }
    }

    // ------------------------------------------------------------------ EIP-712

    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(
            abi.encode(
                EIP712_DOMAIN_TYPEHASH,
                keccak256("x402 Batch Settlement"),
                keccak256("1"),
                block.chainid,
                address(this)
            )
        );
    }

    /// The channel's identity: the EIP-712 hash of its config, bound to chain and contract.
    function getChannelId(ChannelConfig calldata config) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(CHANNEL_CONFIG_TYPEHASH, config)));
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) public view returns (bytes32) {
        bytes32[] memory entries = new bytes32[](voucherClaims.length);
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            VoucherClaim calldata c = voucherClaims[i];
            entries[i] = keccak256(
                abi.encode(
                    CLAIM_ENTRY_TYPEHASH, getChannelId(c.voucher.channel), c.voucher.maxClaimableAmount, c.totalClaimed
                )
            );
        }
        return _digest(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }

    // ------------------------------------------------------------------ deposits

    /// Credits `amount` to the channel of `config`, pulled by `collector` (which must deliver
    /// the tokens to this contract: the balance increase is checked, so a collector cannot
    /// credit what it did not pay).
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        nonReentrant
    {
        _checkConfig(config);
        if (amount == 0) revert ZeroAmount();
        bytes32 channelId = getChannelId(config);
        uint256 before = _balanceOf(config.token, address(this));
        IDepositCollector(collector).collect(config.payer, config.token, amount, channelId, collectorData);
        if (_balanceOf(config.token, address(this)) < before + amount) revert DepositShortfall();
        Channel storage ch = channels[channelId];
        if (ch.balance == 0 && ch.totalClaimed == 0) emit ChannelCreated(channelId, config);
        ch.balance += amount;
        emit Deposited(channelId, msg.sender, amount, ch.balance);
    }

    // ------------------------------------------------------------------ claims and settle

    /// Claims by the receiver (or its authorizer) itself: no authorizer signature needed.
    function claim(VoucherClaim[] calldata voucherClaims) external nonReentrant {
        if (voucherClaims.length == 0) revert EmptyClaims();
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            ChannelConfig calldata c = voucherClaims[i].voucher.channel;
            if (msg.sender != c.receiver && msg.sender != c.receiverAuthorizer) revert NotAuthorized();
            _claim(voucherClaims[i]);
        }
    }

    /// Claims relayed by anyone, authorized by one `ClaimBatch` signature of the rows' common
    /// receiver authorizer.
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        nonReentrant
    {
        if (voucherClaims.length == 0) revert EmptyClaims();
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        for (uint256 i = 1; i < voucherClaims.length; i++) {
            if (voucherClaims[i].voucher.channel.receiverAuthorizer != authorizer) revert MixedAuthorizers();
        }
        if (!_isValidSignature(authorizer, getClaimBatchDigest(voucherClaims), authorizerSignature)) {
            revert InvalidSignature();
        }
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            _claim(voucherClaims[i]);
        }
    }

    /// Sends everything claimed and not yet settled for (`receiver`, `token`) to `receiver`.
    /// Permissionless: the money can only go to the receiver. Nothing to settle is a no-op.
    function settle(address receiver, address token) external nonReentrant {
        ReceiverTotals storage r = receivers[receiver][token];
        uint128 amount = r.totalClaimed - r.totalSettled;
        if (amount == 0) return;
        r.totalSettled = r.totalClaimed;
        _transfer(token, receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    // ------------------------------------------------------------------ withdrawals and refunds

    /// Starts the payer's escape hatch: after `withdrawDelay`, `finalizeWithdraw` returns up to
    /// `amount` of what is still unclaimed then. The receiver claims its vouchers meanwhile.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (msg.sender != config.payer && msg.sender != config.payerAuthorizer) revert NotAuthorized();
        if (amount == 0) revert ZeroAmount();
        bytes32 channelId = getChannelId(config);
        Channel storage ch = channels[channelId];
        if (amount > ch.balance - ch.totalClaimed) revert AmountExceedsUnclaimed();
        uint40 now_ = uint40(block.timestamp);
        pendingWithdrawals[channelId] = Withdrawal(amount, now_);
        emit WithdrawInitiated(channelId, amount, now_ + config.withdrawDelay);
    }

    function finalizeWithdraw(ChannelConfig calldata config) external nonReentrant {
        if (msg.sender != config.payer && msg.sender != config.payerAuthorizer) revert NotAuthorized();
        bytes32 channelId = getChannelId(config);
        Withdrawal memory w = pendingWithdrawals[channelId];
        if (w.initiatedAt == 0) revert NoPendingWithdrawal();
        if (block.timestamp < uint256(w.initiatedAt) + config.withdrawDelay) revert WithdrawDelayNotElapsed();
        delete pendingWithdrawals[channelId];
        Channel storage ch = channels[channelId];
        uint128 unclaimed = ch.balance - ch.totalClaimed;
        uint128 amount = w.amount < unclaimed ? w.amount : unclaimed;
        ch.balance -= amount;
        if (amount > 0) _transfer(config.token, config.payer, amount);
        emit WithdrawFinalized(channelId, amount);
        if (amount > 0 && ch.balance == ch.totalClaimed && ch.totalClaimed == 0) emit ChannelClosed(channelId, config);
    }

    /// Cooperative refund by the receiver (or its authorizer).
    function refund(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (msg.sender != config.receiver && msg.sender != config.receiverAuthorizer) revert NotAuthorized();
        _refund(config, getChannelId(config), amount);
    }

    /// Cooperative refund relayed by anyone with the receiver authorizer's `Refund` signature
    /// for the channel's current refund nonce.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external nonReentrant {
        bytes32 channelId = getChannelId(config);
        if (nonce != refundNonce[channelId]) revert WrongRefundNonce();
        if (!_isValidSignature(
                config.receiverAuthorizer, getRefundDigest(channelId, nonce, amount), receiverAuthorizerSignature
            )) revert InvalidSignature();
        _refund(config, channelId, amount);
    }

    /// Batches calls to this contract (e.g. a claim then a refund) in one transaction.
    function multicall(bytes[] calldata data) external returns (bytes[] memory results) {
        results = new bytes[](data.length);
        for (uint256 i = 0; i < data.length; i++) {
            (bool ok, bytes memory ret) = address(this).delegatecall(data[i]);
            if (!ok) {
                assembly {
                    revert(add(ret, 0x20), mload(ret))
                }
            }
            results[i] = ret;
        }
    }

    // ------------------------------------------------------------------ internals

    function _claim(VoucherClaim calldata c) private {
        ChannelConfig calldata config = c.voucher.channel;
        bytes32 channelId = getChannelId(config);
        uint128 ceiling = c.voucher.maxClaimableAmount;
        address signer = config.payerAuthorizer == address(0) ? config.payer : config.payerAuthorizer;
        bytes32 digest = getVoucherDigest(channelId, ceiling);
        // A committed payer authorizer is an EOA: ECDSA only (the spec's fast path).
        bool valid = config.payerAuthorizer == address(0)
            ? _isValidSignature(signer, digest, c.signature)
            : _recover(digest, c.signature) == signer;
        if (!valid) revert InvalidSignature();
        if (c.totalClaimed > ceiling) revert ClaimAboveVoucher();
        Channel storage ch = channels[channelId];
        // Vouchers are cumulative: an older or equal total is already covered.
        if (c.totalClaimed <= ch.totalClaimed) return;
        if (c.totalClaimed > ch.balance) revert ClaimAboveBalance();
        uint128 delta = c.totalClaimed - ch.totalClaimed;
        ch.totalClaimed = c.totalClaimed;
        receivers[config.receiver][config.token].totalClaimed += delta;
        emit Claimed(channelId, delta, c.totalClaimed);
    }

    function _refund(ChannelConfig calldata config, bytes32 channelId, uint128 amount) private {
        if (amount == 0) revert ZeroAmount();
        // The nonce moves first, so any refund (even one that moves nothing) spends it.
        uint256 nonce = refundNonce[channelId]++;
        Channel storage ch = channels[channelId];
        uint128 unclaimed = ch.balance - ch.totalClaimed;
        uint128 paid = amount < unclaimed ? amount : unclaimed;
        if (paid == 0) return;
        ch.balance -= paid;
        Withdrawal storage w = pendingWithdrawals[channelId];
        if (w.initiatedAt != 0) {
            if (paid >= w.amount) delete pendingWithdrawals[channelId];
            else w.amount -= paid;
        }
        _transfer(config.token, config.payer, paid);
        emit Refunded(channelId, paid, nonce);
        if (ch.balance == ch.totalClaimed && ch.totalClaimed == 0) emit ChannelClosed(channelId, config);
    }

    function _checkConfig(ChannelConfig calldata config) private pure {
        if (
            config.payer == address(0) || config.receiver == address(0) || config.receiverAuthorizer == address(0)
                || config.token == address(0) || config.withdrawDelay < MIN_WITHDRAW_DELAY
                || config.withdrawDelay > MAX_WITHDRAW_DELAY
        ) revert InvalidConfig();
    }

    function _digest(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked(hex"1901", DOMAIN_SEPARATOR(), structHash));
    }

    /// ERC-1271 when `signer` has code, ECDSA otherwise.
    function _isValidSignature(address signer, bytes32 digest, bytes calldata signature) private view returns (bool) {
        if (signer.code.length == 0) return signer != address(0) && _recover(digest, signature) == signer;
        (bool ok, bytes memory ret) = signer.staticcall(abi.encodeWithSelector(ERC1271_MAGIC, digest, signature));
        return ok && ret.length >= 32 && abi.decode(ret, (bytes32)) == bytes32(ERC1271_MAGIC);
    }

    /// 65-byte `r ‖ s ‖ v`, low s, v in {27, 28}; address(0) for anything else.
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address) {
        if (signature.length != 65) return address(0);
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > HALF_N || (v != 27 && v != 28)) return address(0);
        return ecrecover(digest, v, r, s);
    }

    function _balanceOf(address token, address who) private view returns (uint256) {
        (bool ok, bytes memory ret) = token.staticcall(abi.encodeWithSignature("balanceOf(address)", who));
        if (!ok || ret.length < 32) revert TransferFailed();
        return abi.decode(ret, (uint256));
    }

    function _transfer(address token, address to, uint256 amount) private {
        (bool ok, bytes memory ret) = token.call(abi.encodeWithSignature("transfer(address,uint256)", to, amount));
        if (!ok || (ret.length != 0 && !abi.decode(ret, (bool)))) revert TransferFailed();
    }
}

/// What `deposit` asks of a collector: move `amount` of `token` from `payer` to the caller
/// (the escrow), authorized by `data`, for the channel `channelId`.
interface IDepositCollector {
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external;
}
