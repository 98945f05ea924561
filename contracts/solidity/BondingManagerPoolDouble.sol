// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title Test double of the Livepeer BondingManager's transcoder pool view.
/// @notice Keeps the real contract's function names, parameter types and return types, so the
///         selectors match (getFirstTranscoderInPool 0x88a6c749, getNextTranscoderInPool
///         0x235c9603, getTranscoderPoolSize 0x2a4e0d55, isRegisteredTranscoder 0x68ba170c,
///         isActiveTranscoder 0x08802374). The pool is an ordered list the owner sets with
///         `setPool`, first entry first (the real pool is sorted by stake, descending).
///         Like the real sorted list, `getNextTranscoderInPool` answers address(0) past the tail
///         and for an address outside the pool. Every pool member counts as registered and
///         active; nothing else does.
contract BondingManagerPoolDouble {
    address public owner;

    address[] private pool;
    // Position in `pool` plus one; zero means "not in the pool".
    mapping(address => uint256) private positionPlusOne;

    event PoolSet(uint256 size);

    constructor() {
        owner = msg.sender;
    }

    modifier onlyOwner() {
        require(msg.sender == owner, "caller is not the owner");
        _;
    }

    /// @notice Replace the pool with `_transcoders`, in that order.
    function setPool(address[] calldata _transcoders) external onlyOwner {
        for (uint256 i = 0; i < pool.length; i++) {
            delete positionPlusOne[pool[i]];
        }
        delete pool;
        for (uint256 i = 0; i < _transcoders.length; i++) {
            address transcoder = _transcoders[i];
            require(transcoder != address(0), "transcoder is null address");
            require(positionPlusOne[transcoder] == 0, "transcoder listed twice");
            pool.push(transcoder);
            positionPlusOne[transcoder] = i + 1;
        }
        emit PoolSet(_transcoders.length);
    }

    function getTranscoderPoolSize() public view returns (uint256) {
        return pool.length;
    }

    function getFirstTranscoderInPool() public view returns (address) {
        return pool.length == 0 ? address(0) : pool[0];
    }

    function getNextTranscoderInPool(address _transcoder) public view returns (address) {
        uint256 position = positionPlusOne[_transcoder];
        if (position == 0 || position >= pool.length) {
            return address(0);
        }
        return pool[position];
    }

    function isRegisteredTranscoder(address _transcoder) public view returns (bool) {
        return positionPlusOne[_transcoder] != 0;
    }

    function isActiveTranscoder(address _transcoder) public view returns (bool) {
        return positionPlusOne[_transcoder] != 0;
    }
}
