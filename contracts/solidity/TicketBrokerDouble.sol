// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title Test double of the Livepeer TicketBroker (Arbitrum One), for Anvil.
/// @notice Keeps, byte for byte, what our Python payer depends on (ticketbroker.md §7):
///         - the Ticket struct and every TicketBroker function name and parameter type, so the
///           selectors match: redeemWinningTicket 0xec8b3cb6, batchRedeemWinningTickets
///           0xd01b808e, fundDeposit 0x6caa736b, fundReserve 0x6f9c3c8f, fundDepositAndReserve
///           0x511f4073, fundDepositAndReserveFor 0x989f789c, getSenderInfo 0xe1a589da,
///           getReserveInfo 0x5b6333eb, claimableReserve 0x81779f38, claimedReserve 0x4ac826da,
///           getTicketHash 0xb03fa864, usedTickets 0x59a515ba, unlock, cancelUnlock, withdraw,
///           isUnlockInProgress, ticketValidityPeriod, unlockPeriod, controller;
///         - the events with the same signatures and indexed flags (same topic0);
///         - the ticket hash, the signature check (65 bytes, low s, v 27/28, EIP-191 prefix,
///           signer == sender), the recipientRand check, the strict `<` winning check, the order
///           of the checks and their revert strings, usedTickets marked before paying, the
///           deposit-then-reserve arithmetic, and the batch's swallowed per-ticket self-calls
///           with no array-length check.
///
///         Simplified (§7 "Simplify or drop"):
///         - Controller: `controller()` returns this contract, and so does
///           `getContract(keccak256("RoundsManager" | "BondingManager"))`, so the real discovery
///           path (TicketBroker.controller() → Controller.getContract(id)) works unchanged. Pausing
///           is one owner-set flag (`paused()`, as on the Controller).
///         - RoundsManager: the current round, its "initialized" flag and the per-round block
///           hashes are storage the owner sets (setRound, setBlockHash), and anyone may call
///           initializeRound() as on the real one; the views keep the real names (currentRound,
///           currentRoundInitialized, lastInitializedRound, blockHashForRound).
///         - BondingManager and Minter: the ETH stays here; a winning amount is added to
///           `credited[recipient]` (also readable as pendingFees) and the recipient can take it
///           out with withdrawFees(to, amount). Registered and active recipients are owner-set;
///           an unregistered recipient reverts with "transcoder must be registered", a registered
///           but inactive one with panic 0x12, as the real updateTranscoderWithFees does. The
///           transcoder pool size, for reserve claims, is the number of active recipients.
contract TicketBrokerDouble {
    // -- the real structs, field order and types included ---------------------------------

    struct Ticket {
        address recipient;
        address sender;
        uint256 faceValue;
        uint256 winProb;
        uint256 senderNonce;
        bytes32 recipientRandHash;
        bytes auxData;
    }

    struct Sender {
        uint256 deposit;
        uint256 withdrawRound;
    }

    struct ReserveInfo {
        uint256 fundsRemaining;
        uint256 claimedInCurrentRound;
    }

    struct Reserve {
        uint256 funds;
        mapping(uint256 => uint256) claimedForRound;
        mapping(uint256 => mapping(address => uint256)) claimedByAddress;
    }

    // -- constants ------------------------------------------------------------------------

    uint256 private constant SIGNATURE_LENGTH = 65;
    uint256 private constant AUX_DATA_LENGTH = 64;
    // secp256k1n / 2: OpenZeppelin's ECDSA (v4.4.1) refuses signatures with a larger s.
    uint256 private constant MAX_LOW_S = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
    uint256 private constant DEFAULT_PERIOD_ROUNDS = 2;
    bytes32 private constant ROUNDS_MANAGER_ID = keccak256("RoundsManager");
    bytes32 private constant BONDING_MANAGER_ID = keccak256("BondingManager");

    // -- TicketBroker state ---------------------------------------------------------------

    uint256 public ticketValidityPeriod;
    uint256 public unlockPeriod;
    mapping(bytes32 => bool) public usedTickets;
    mapping(address => Sender) internal senders;
    mapping(address => Reserve) internal reserves;

    // -- mocked Controller, RoundsManager and BondingManager state --------------------------

    address public owner;
    bool public paused;
    uint256 public currentRound;
    bool public currentRoundInitialized;
    uint256 public lastInitializedRound;
    mapping(uint256 => bytes32) public blockHashForRound;
    mapping(address => bool) public isRegisteredTranscoder;
    mapping(address => bool) public isActiveTranscoder;
    uint256 private activeTranscoders;
    mapping(address => uint256) public credited;

    // -- the real events ------------------------------------------------------------------

    event DepositFunded(address indexed sender, uint256 amount);
    event ReserveFunded(address indexed reserveHolder, uint256 amount);
    event ReserveClaimed(address indexed reserveHolder, address claimant, uint256 amount);
    event WinningTicketRedeemed(
        address indexed sender,
        address indexed recipient,
        uint256 faceValue,
        uint256 winProb,
        uint256 senderNonce,
        uint256 recipientRand,
        bytes auxData
    );
    event WinningTicketTransfer(address indexed sender, address indexed recipient, uint256 amount);
    event Unlock(address indexed sender, uint256 startRound, uint256 endRound);
    event UnlockCancelled(address indexed sender);
    event Withdrawal(address indexed sender, uint256 deposit, uint256 reserve);
    event WithdrawFees(address indexed delegator, address recipient, uint256 amount);

    constructor() {
        owner = msg.sender;
        ticketValidityPeriod = DEFAULT_PERIOD_ROUNDS;
        unlockPeriod = DEFAULT_PERIOD_ROUNDS;
    }

    modifier onlyOwner() {
        require(msg.sender == owner, "caller is not the owner");
        _;
    }

    modifier whenSystemNotPaused() {
        require(!paused, "system is paused");
        _;
    }

    modifier whenCurrentRoundInitialized() {
        require(currentRoundInitialized, "current round is not initialized");
        _;
    }

    // -- owner controls for tests (not part of the real ABI) --------------------------------

    /// @notice Set the mocked current round; `_initialized` also records it as the last
    ///         initialized round.
    function setRound(uint256 _round, bool _initialized) external onlyOwner {
        currentRound = _round;
        currentRoundInitialized = _initialized;
        if (_initialized) {
            lastInitializedRound = _round;
        }
    }

    function setBlockHash(uint256 _round, bytes32 _blockHash) external onlyOwner {
        blockHashForRound[_round] = _blockHash;
    }

    /// @notice RoundsManager.initializeRound, open to anyone as on the real one: mark the
    ///         current round initialized and record the previous block's hash for it.
    function initializeRound() external whenSystemNotPaused {
        require(!currentRoundInitialized, "round already initialized");
        currentRoundInitialized = true;
        lastInitializedRound = currentRound;
        blockHashForRound[currentRound] = blockhash(block.number - 1);
    }

    /// @notice Set the registered and active flags of `_transcoders`. A recipient can be paid
    ///         only when both are true (see creditRecipient).
    function setTranscoders(address[] calldata _transcoders, bool _registered, bool _active)
        external
        onlyOwner
    {
        for (uint256 i = 0; i < _transcoders.length; i++) {
            address transcoder = _transcoders[i];
            isRegisteredTranscoder[transcoder] = _registered;
            if (isActiveTranscoder[transcoder] != _active) {
                isActiveTranscoder[transcoder] = _active;
                activeTranscoders = _active ? activeTranscoders + 1 : activeTranscoders - 1;
            }
        }
    }

    function setPaused(bool _paused) external onlyOwner {
        paused = _paused;
    }

    function setTicketValidityPeriod(uint256 _ticketValidityPeriod) external onlyOwner {
        require(_ticketValidityPeriod > 0, "ticketValidityPeriod must be greater than 0");
        ticketValidityPeriod = _ticketValidityPeriod;
    }

    // -- Controller discovery ------------------------------------------------------------

    /// @notice The real TicketBroker's controller; here the double plays every role itself.
    function controller() external view returns (address) {
        return address(this);
    }

    /// @notice Controller.getContract: this contract for the RoundsManager and BondingManager
    ///         ids, address(0) for any other id (as for an unregistered id on the real one).
    function getContract(bytes32 _id) external view returns (address) {
        if (_id == ROUNDS_MANAGER_ID || _id == BONDING_MANAGER_ID) {
            return address(this);
        }
        return address(0);
    }

    // -- BondingManager stand-ins --------------------------------------------------------

    function getTranscoderPoolSize() public view returns (uint256) {
        return activeTranscoders;
    }

    function pendingFees(address _delegator, uint256) external view returns (uint256) {
        return credited[_delegator];
    }

    /// @notice Send `_amount` of the caller's credited fees to `_recipient`.
    function withdrawFees(address payable _recipient, uint256 _amount) external whenSystemNotPaused {
        require(credited[msg.sender] >= _amount, "insufficient fees to withdraw");
        credited[msg.sender] -= _amount;
        (bool sent, ) = _recipient.call{value: _amount}("");
        require(sent, "fee transfer failed");
        emit WithdrawFees(msg.sender, _recipient, _amount);
    }

    // -- funding --------------------------------------------------------------------------

    function fundDeposit() external payable whenSystemNotPaused {
        addDeposit(msg.sender, msg.value, true);
    }

    function fundReserve() external payable whenSystemNotPaused {
        addReserve(msg.sender, msg.value);
        cancelUnlockIfInProgress(msg.sender);
    }

    function fundDepositAndReserve(uint256 _depositAmount, uint256 _reserveAmount) external payable {
        fundDepositAndReserveFor(msg.sender, _depositAmount, _reserveAmount);
    }

    /// @notice Fund `_addr`; only an address funding itself cancels its pending unlock.
    function fundDepositAndReserveFor(address _addr, uint256 _depositAmount, uint256 _reserveAmount)
        public
        payable
        whenSystemNotPaused
    {
        require(
            msg.value == _depositAmount + _reserveAmount,
            "msg.value does not equal sum of deposit amount and reserve amount"
        );
        addDeposit(_addr, _depositAmount, _addr == msg.sender);
        addReserve(_addr, _reserveAmount);
    }

    function addDeposit(address _sender, uint256 _amount, bool _cancelUnlock) internal {
        senders[_sender].deposit += _amount;
        if (_cancelUnlock) {
            cancelUnlockIfInProgress(_sender);
        }
        emit DepositFunded(_sender, _amount);
    }

    function addReserve(address _holder, uint256 _amount) internal {
        reserves[_holder].funds += _amount;
        emit ReserveFunded(_holder, _amount);
    }

    // -- redemption -----------------------------------------------------------------------

    function redeemWinningTicket(Ticket memory _ticket, bytes memory _sig, uint256 _recipientRand)
        public
        whenSystemNotPaused
        whenCurrentRoundInitialized
    {
        bytes32 ticketHash = getTicketHash(_ticket);
        requireValidWinningTicket(_ticket, ticketHash, _sig, _recipientRand);

        Sender storage sender = senders[_ticket.sender];
        require(isLocked(sender), "sender is unlocked");
        require(sender.deposit > 0 || reserves[_ticket.sender].funds > 0, "sender deposit and reserve are zero");

        // Marked used before any payment, so a ticket paid only in part is never paid again.
        usedTickets[ticketHash] = true;

        uint256 amount = takeFunds(sender, _ticket);
        if (amount > 0) {
            creditRecipient(_ticket.recipient, amount);
            emit WinningTicketTransfer(_ticket.sender, _ticket.recipient, amount);
        }
        emitRedeemed(_ticket, _recipientRand);
    }

    /// @notice Redeem each ticket through an external self-call and ignore its result, as the
    ///         real MixinWrappers does: a failing ticket never reverts the batch. The arrays'
    ///         lengths are not compared (a short `_sigs` or `_recipientRands` panics with 0x32).
    function batchRedeemWinningTickets(
        Ticket[] memory _tickets,
        bytes[] memory _sigs,
        uint256[] memory _recipientRands
    ) public whenSystemNotPaused whenCurrentRoundInitialized {
        for (uint256 i = 0; i < _tickets.length; i++) {
            redeemWinningTicketNoRevert(_tickets[i], _sigs[i], _recipientRands[i]);
        }
    }

    function redeemWinningTicketNoRevert(Ticket memory _ticket, bytes memory _sig, uint256 _recipientRand)
        internal
        returns (bool success)
    {
        bytes memory data = abi.encodeWithSelector(
            this.redeemWinningTicket.selector,
            _ticket,
            _sig,
            _recipientRand
        );
        (success, ) = address(this).call(data);
    }

    function getTicketHash(Ticket memory _ticket) public pure returns (bytes32) {
        return
            keccak256(
                abi.encodePacked(
                    _ticket.recipient,
                    _ticket.sender,
                    _ticket.faceValue,
                    _ticket.winProb,
                    _ticket.senderNonce,
                    _ticket.recipientRandHash,
                    _ticket.auxData
                )
            );
    }

    /// @dev The real checks in the real order; the first failing one decides the revert string.
    function requireValidWinningTicket(
        Ticket memory _ticket,
        bytes32 _ticketHash,
        bytes memory _sig,
        uint256 _recipientRand
    ) internal view {
        require(_ticket.recipient != address(0), "ticket recipient is null address");
        require(_ticket.sender != address(0), "ticket sender is null address");
        requireValidTicketAuxData(_ticket.auxData);
        require(
            keccak256(abi.encodePacked(_recipientRand)) == _ticket.recipientRandHash,
            "recipientRand does not match recipientRandHash"
        );
        require(!usedTickets[_ticketHash], "ticket is used");
        require(isValidTicketSig(_ticket.sender, _sig, _ticketHash), "invalid signature over ticket hash");
        require(
            uint256(keccak256(abi.encodePacked(_sig, _recipientRand))) < _ticket.winProb,
            "ticket did not win"
        );
    }

    function requireValidTicketAuxData(bytes memory _auxData) internal view {
        (uint256 creationRound, bytes32 creationRoundBlockHash) = creationRoundAndBlockHash(_auxData);
        bytes32 blockHash = blockHashForRound[creationRound];
        require(blockHash != bytes32(0), "ticket creationRound does not have a block hash");
        require(creationRoundBlockHash == blockHash, "ticket creationRoundBlockHash invalid for creationRound");
        require(creationRound + ticketValidityPeriod > currentRound, "ticket is expired");
    }

    function creationRoundAndBlockHash(bytes memory _auxData)
        internal
        pure
        returns (uint256 creationRound, bytes32 creationRoundBlockHash)
    {
        require(_auxData.length == AUX_DATA_LENGTH, "invalid length for ticket auxData: must be 64 bytes");
        assembly {
            creationRound := mload(add(_auxData, 32))
            creationRoundBlockHash := mload(add(_auxData, 64))
        }
    }

    function isValidTicketSig(address _sender, bytes memory _sig, bytes32 _ticketHash)
        internal
        pure
        returns (bool)
    {
        require(_sig.length == SIGNATURE_LENGTH, "INVALID_SIGNATURE_LENGTH");
        address signer = recoverSigner(toEthSignedMessageHash(_ticketHash), _sig);
        return signer != address(0) && _sender == signer;
    }

    /// @dev OpenZeppelin ECDSA v4.4.1's recover for a 65-byte r‖s‖v signature, with its messages.
    function recoverSigner(bytes32 _digest, bytes memory _sig) internal pure returns (address) {
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := mload(add(_sig, 32))
            s := mload(add(_sig, 64))
            v := byte(0, mload(add(_sig, 96)))
        }
        require(uint256(s) <= MAX_LOW_S, "ECDSA: invalid signature 's' value");
        require(v == 27 || v == 28, "ECDSA: invalid signature 'v' value");
        address signer = ecrecover(_digest, v, r, s);
        require(signer != address(0), "ECDSA: invalid signature");
        return signer;
    }

    /// @dev EIP-191: keccak256("\x19Ethereum Signed Message:\n32" ‖ hash).
    function toEthSignedMessageHash(bytes32 _hash) internal pure returns (bytes32) {
        return keccak256(abi.encodePacked("\x19Ethereum Signed Message:\n32", _hash));
    }

    /// @dev min(faceValue, deposit) from the deposit; any remainder is claimed from the reserve,
    ///      up to the recipient's claimable share.
    function takeFunds(Sender storage _sender, Ticket memory _ticket) internal returns (uint256) {
        uint256 deposit = _sender.deposit;
        if (_ticket.faceValue <= deposit) {
            _sender.deposit = deposit - _ticket.faceValue;
            return _ticket.faceValue;
        }
        _sender.deposit = 0;
        return deposit + claimFromReserve(_ticket.sender, _ticket.recipient, _ticket.faceValue - deposit);
    }

    /// @dev BondingManager.updateTranscoderWithFees, reduced to its checks and a credit.
    function creditRecipient(address _recipient, uint256 _amount) internal {
        require(isRegisteredTranscoder[_recipient], "transcoder must be registered");
        // The real one divides by the recipient's earnings-pool stake, which is zero for a
        // registered but inactive transcoder: the same panic 0x12 (division by zero).
        uint256 stake = isActiveTranscoder[_recipient] ? 1 : 0;
        credited[_recipient] += (_amount * stake) / stake;
    }

    function emitRedeemed(Ticket memory _ticket, uint256 _recipientRand) internal {
        emit WinningTicketRedeemed(
            _ticket.sender,
            _ticket.recipient,
            _ticket.faceValue,
            _ticket.winProb,
            _ticket.senderNonce,
            _recipientRand,
            _ticket.auxData
        );
    }

    // -- reserve --------------------------------------------------------------------------

    function getReserveInfo(address _reserveHolder) public view returns (ReserveInfo memory info) {
        info.fundsRemaining = reserves[_reserveHolder].funds;
        info.claimedInCurrentRound = reserves[_reserveHolder].claimedForRound[currentRound];
    }

    /// @notice (funds + claimed this round) / pool size − already claimed by `_claimant` this
    ///         round; zero for a claimant that is not active, or with an empty pool.
    function claimableReserve(address _reserveHolder, address _claimant) public view returns (uint256) {
        if (!isActiveTranscoder[_claimant] || activeTranscoders == 0) {
            return 0;
        }
        Reserve storage reserve = reserves[_reserveHolder];
        uint256 totalClaimable = reserve.funds + reserve.claimedForRound[currentRound];
        return totalClaimable / activeTranscoders - reserve.claimedByAddress[currentRound][_claimant];
    }

    function claimedReserve(address _reserveHolder, address _claimant) public view returns (uint256) {
        return reserves[_reserveHolder].claimedByAddress[currentRound][_claimant];
    }

    function claimFromReserve(address _reserveHolder, address _claimant, uint256 _amount)
        internal
        returns (uint256 claimed)
    {
        uint256 claimable = claimableReserve(_reserveHolder, _claimant);
        claimed = _amount > claimable ? claimable : _amount;
        if (claimed > 0) {
            Reserve storage reserve = reserves[_reserveHolder];
            reserve.claimedForRound[currentRound] += claimed;
            reserve.claimedByAddress[currentRound][_claimant] += claimed;
            reserve.funds -= claimed;
            emit ReserveClaimed(_reserveHolder, _claimant, claimed);
        }
    }

    // -- sender info, unlock and withdraw ---------------------------------------------------

    function getSenderInfo(address _sender)
        public
        view
        returns (Sender memory sender, ReserveInfo memory reserve)
    {
        sender = senders[_sender];
        reserve = getReserveInfo(_sender);
    }

    function isUnlockInProgress(address _sender) public view returns (bool) {
        return senders[_sender].withdrawRound > 0;
    }

    function unlock() external whenSystemNotPaused {
        Sender storage sender = senders[msg.sender];
        require(sender.deposit > 0 || reserves[msg.sender].funds > 0, "sender deposit and reserve are zero");
        require(sender.withdrawRound == 0, "unlock already initiated");
        sender.withdrawRound = currentRound + unlockPeriod;
        emit Unlock(msg.sender, currentRound, sender.withdrawRound);
    }

    function cancelUnlock() external whenSystemNotPaused {
        require(isUnlockInProgress(msg.sender), "no unlock request in progress");
        cancelUnlockIfInProgress(msg.sender);
    }

    function withdraw() external whenSystemNotPaused {
        Sender storage sender = senders[msg.sender];
        uint256 deposit = sender.deposit;
        uint256 reserve = reserves[msg.sender].funds;
        require(deposit > 0 || reserve > 0, "sender deposit and reserve are zero");
        require(sender.withdrawRound > 0, "no unlock request in progress");
        require(!isLocked(sender), "account is locked");
        sender.deposit = 0;
        reserves[msg.sender].funds = 0;
        (bool sent, ) = payable(msg.sender).call{value: deposit + reserve}("");
        require(sent, "withdrawal transfer failed");
        emit Withdrawal(msg.sender, deposit, reserve);
    }

    function cancelUnlockIfInProgress(address _sender) internal {
        if (senders[_sender].withdrawRound > 0) {
            senders[_sender].withdrawRound = 0;
            emit UnlockCancelled(_sender);
        }
    }

    /// @dev Tickets stay redeemable until the unlock period is over.
    function isLocked(Sender storage _sender) internal view returns (bool) {
        return _sender.withdrawRound == 0 || currentRound < _sender.withdrawRound;
    }
}
