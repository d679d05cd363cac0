#!/usr/bin/env python3
"""Pay an x402-protected URL on Solana with the official Python SDK (pip `x402[svm]` 2.25:
ExactSvmScheme, x402ClientSync + wrapRequestsWithPayment) and print ONE JSON line (read by
tests/svm_chain.rs):
  {client, url, status, body, paymentResponse, paymentHeaderName, paymentHeader,
   replayStatus, replayBody, replayError, error}

usage: pay_svm.py --url URL --rpc RPC_URL --key HEX64 [--replay] [--timeout 30]
  --rpc  the Solana JSON-RPC the client builds its transaction against (mint, blockhash)
  --key  the payer's 64-byte keypair (seed then public key), hex
--replay: afterwards, re-send the exact payment header the client sent with a plain request,
  to check that the server refuses a replayed proof.
Exit status: 0 iff the paid request ended with HTTP 200; 1 otherwise; 2 on usage errors.

Re-executes itself in $X402_TEST_DEPS/venv, like pay.py.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEPS = os.path.abspath(os.environ.get("X402_TEST_DEPS") or os.path.join(HERE, "..", "..", "target", "test-deps"))
VENV = os.path.join(DEPS, "venv")
BODY_LIMIT = 4000
PAYMENT_HEADERS = ("PAYMENT-SIGNATURE", "X-PAYMENT")


def reexec_in_venv() -> None:
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        print(f"pay.py: clients not installed in {VENV} (run scripts/install-test-deps.sh)", file=sys.stderr)
        sys.exit(2)
    os.execv(py, [py, os.path.abspath(__file__), *sys.argv[1:]])


def decode_b64_json(value):
    """base64 (standard alphabet) JSON header value -> object, or None."""
    if not value:
        return None
    try:
        return json.loads(base64.b64decode(value + "=" * (-len(value) % 4)).decode("utf-8"))
    except Exception:  # noqa: BLE001 - a bad header is reported as null, not a crash
        return None


def cut(text: str) -> str:
    return text if len(text) <= BODY_LIMIT else text[:BODY_LIMIT] + "...(truncated)"


def challenge_error(headers, text: str):
    """The `error` of a 402: v2 PAYMENT-REQUIRED header first, then a v1 JSON body."""
    challenge = decode_b64_json(headers.get("payment-required"))
    if challenge is None:
        try:
            challenge = json.loads(text)
        except ValueError:
            challenge = None
    return str(challenge["error"]) if isinstance(challenge, dict) and challenge.get("error") else None


def record(out: dict, headers) -> None:
    """Remember the payment header of a request going on the wire (the last one wins)."""
    for name in PAYMENT_HEADERS:
        value = headers.get(name)
        if value:
            out["paymentHeaderName"], out["paymentHeader"] = name, value


def fill(out: dict, status: int, headers, text: str, replay: bool = False) -> None:
    keys = ("replayStatus", "replayBody", "replayError") if replay else ("status", "body", "error")
    out[keys[0]], out[keys[1]] = status, cut(text)
    if status == 402:
        out[keys[2]] = challenge_error(headers, text)


def run(args, out: dict) -> None:
    import requests
    from x402 import x402ClientSync
    from x402.http.clients.requests import wrapRequestsWithPayment
    from x402.mechanisms.svm.exact.register import register_exact_svm_client
    from x402.mechanisms.svm.signers import KeypairSigner

    client = x402ClientSync()
    register_exact_svm_client(client, KeypairSigner.from_bytes(bytes.fromhex(args.key)), rpc_url=args.rpc)
    with wrapRequestsWithPayment(requests.Session(), client) as session:
        # As pay.py: the adapter's add_headers() hook sees each request's wire headers.
        adapter = session.get_adapter(args.url)
        inner_add_headers = adapter.add_headers

        def add_headers(request, **kwargs):
            record(out, request.headers)
            return inner_add_headers(request, **kwargs)

        adapter.add_headers = add_headers
        r = session.get(args.url, timeout=args.timeout)
        fill(out, r.status_code, r.headers, r.text)
        out["paymentResponse"] = decode_b64_json(
            r.headers.get("payment-response") or r.headers.get("x-payment-response"))
    if args.replay and out["paymentHeader"]:
        r = requests.get(args.url, headers={out["paymentHeaderName"]: out["paymentHeader"]}, timeout=args.timeout)
        fill(out, r.status_code, r.headers, r.text, replay=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--rpc", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--replay", action="store_true")
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()
    reexec_in_venv()

    out = {"client": "py-svm-requests", "url": args.url, "status": None, "body": None,
           "paymentResponse": None, "paymentHeaderName": None, "paymentHeader": None,
           "replayStatus": None, "replayBody": None, "replayError": None, "error": None}
    try:
        run(args, out)
        if args.replay and not out["paymentHeader"]:
            raise RuntimeError("--replay: the client sent no payment header")
    except Exception as e:  # noqa: BLE001 - reported in the JSON line
        out["error"] = f"{type(e).__name__}: {e}"[:1000]
    sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0 if out["status"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
