#!/usr/bin/env python3
"""Call a paid MCP tool with the official Python SDK's MCP client (pip `x402[mcp]` 2.25:
`x402.mcp.x402MCPSession` over an `mcp` ClientSession on streamable HTTP) and print ONE JSON
line (read by tests/mcp.rs):
  {paymentMade, isError, content, paymentResponse, replay, error}

usage: mcp_pay.py --url URL --tool NAME [--args JSON] [--key HEX] [--replay] [--timeout 30]
--replay: afterwards, call the tool again with the exact `_meta["x402/payment"]` the client sent
  (captured from the session), to check that the server refuses a replayed proof; its result is
  `replay` = {isError, content, structuredContent}.
Exit status: 0 iff the paid call returned a result without isError; 1 otherwise; 2 on usage errors.

The SDK lives in the venv made by scripts/install-test-deps.sh ($X402_TEST_DEPS/venv); started
with any other interpreter, this script re-executes itself there.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
DEPS = os.path.abspath(os.environ.get("X402_TEST_DEPS") or os.path.join(HERE, "..", "..", "target", "test-deps"))
VENV = os.path.join(DEPS, "venv")
ANVIL_1_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"


def reexec_in_venv() -> None:
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        print(f"mcp_pay.py: clients not installed in {VENV} (run scripts/install-test-deps.sh)", file=sys.stderr)
        sys.exit(2)
    os.execv(py, [py, os.path.abspath(__file__), *sys.argv[1:]])


def dump(value):
    """pydantic objects (content blocks, settle responses) as plain JSON values."""
    if hasattr(value, "model_dump"):
        return value.model_dump(by_alias=True, exclude_none=True, mode="json")
    if isinstance(value, list):
        return [dump(v) for v in value]
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    return value


class Recording:
    """An mcp ClientSession seen through: remembers the last `meta` a call sent."""

    def __init__(self, session):
        self.session = session
        self.last_meta = None

    async def initialize(self):
        return await self.session.initialize()

    async def list_tools(self):
        return await self.session.list_tools()

    async def call_tool(self, name, arguments=None, read_timeout_seconds=None, meta=None):
        if meta is not None:
            self.last_meta = meta
        return await self.session.call_tool(
            name, arguments, read_timeout_seconds=read_timeout_seconds, meta=meta
        )


async def run(args) -> dict:
    from eth_account import Account
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client
    from x402 import x402Client
    from x402.mcp.client import x402MCPSession
    from x402.mechanisms.evm.exact import register_exact_evm_client
    from x402.mechanisms.evm.signers import EthAccountSigner

    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(args.key)))
    out: dict = {"paymentMade": False, "isError": None, "content": None, "paymentResponse": None,
                 "replay": None, "error": None}
    timeout = timedelta(seconds=args.timeout)
    async with streamablehttp_client(args.url) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            recording = Recording(session)
            paying = x402MCPSession(recording, client)
            await paying.initialize()
            result = await paying.call_tool(args.tool, json.loads(args.args), read_timeout_seconds=timeout)
            out["paymentMade"] = result.payment_made
            out["isError"] = bool(result.is_error)
            out["content"] = dump(result.content)
            out["paymentResponse"] = dump(result.payment_response)
            if args.replay and recording.last_meta is not None:
                again = await session.call_tool(
                    args.tool, json.loads(args.args), read_timeout_seconds=timeout, meta=recording.last_meta
                )
                out["replay"] = {
                    "isError": bool(again.isError),
                    "content": dump(again.content),
                    "structuredContent": dump(again.structuredContent),
                }
    return out


def main() -> int:
    reexec_in_venv()
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--tool", required=True)
    p.add_argument("--args", default="{}")
    p.add_argument("--key", default=ANVIL_1_KEY)
    p.add_argument("--replay", action="store_true")
    p.add_argument("--timeout", type=float, default=30)
    args = p.parse_args()
    try:
        out = asyncio.run(run(args))
    except BaseException as e:  # noqa: BLE001 - reported in the JSON line, not a traceback
        errors = getattr(e, "exceptions", None)
        out = {"error": f"{type(e).__name__}: {e}" + (f" {[repr(x) for x in errors]}" if errors else "")}
    print(json.dumps(out))
    return 0 if out.get("isError") is False and not out.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
