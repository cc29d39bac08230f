"""The public streaming-contract harness (third-party layers use it too)."""

from streamzoo.testing.contract import ALL_CHECKS, StreamContractError, assert_stream_contract

__all__ = ["ALL_CHECKS", "StreamContractError", "assert_stream_contract"]
