#!/usr/bin/env bash
# Rebuilds tests/chain/contracts/*.runtime.hex: {TestUSDC,MiniMulticall3,TestWalletFactory} and the
# vendored x402UptoPermit2Proxy from their .sol sources with the pinned solc-js, and Permit2
# extracted from Uniswap/permit2's DeployPermit2.sol at the pinned commit (see SOURCES.md).
# Maintainers only: the tests etch the committed hex and never compile.
#   tests/chain/contracts/compile.sh           build into a temp dir and say whether it matches the committed hex
#   tests/chain/contracts/compile.sh --write   build and overwrite the committed *.runtime.hex
# solc-js is installed (once) into $X402_TEST_DEPS/solc (default <repo>/target/test-deps/solc);
# viem (keccak for the checks) comes from $X402_TEST_DEPS/node (scripts/install-test-deps.sh).
# DeployPermit2.sol is read from PERMIT2_REPO (a local git clone of Uniswap/permit2) when set,
# else downloaded from raw.githubusercontent.com at the pinned commit.
# Needs node >= 20, npm and git or curl.
set -euo pipefail

SOLC_VERSION=0.8.28
PERMIT2_COMMIT=cc56ad0f3439c502c246fc5cfcc3db92bb8b7219
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
DEPS="${X402_TEST_DEPS:-$ROOT/target/test-deps}"
SOLC_DIR="$DEPS/solc"
VIEM_MODULES="$DEPS/node/node_modules"
if [ ! -f "$VIEM_MODULES/viem/package.json" ]; then
  echo "viem not found in $VIEM_MODULES: run scripts/install-test-deps.sh" >&2
  exit 1
fi

installed_version() {
  node -p "require('$SOLC_DIR/node_modules/solc/package.json').version" 2>/dev/null || true
}
if [ "$(installed_version)" != "$SOLC_VERSION" ]; then
  mkdir -p "$SOLC_DIR"
  [ -f "$SOLC_DIR/package.json" ] || echo '{"private":true}' >"$SOLC_DIR/package.json"
  (cd "$SOLC_DIR" && npm install --save-exact --ignore-scripts --no-audit --no-fund \
    --no-update-notifier --loglevel=error "solc@$SOLC_VERSION")
fi

# build <outdir>: every *.runtime.hex into <outdir>.
build() {
  local out="$1" deploy
  node "$HERE/compile.mjs" "$SOLC_DIR/node_modules" "$out" "$VIEM_MODULES"
  deploy="$(mktemp)"
  if [ -n "${PERMIT2_REPO:-}" ]; then
    git -C "$PERMIT2_REPO" show "$PERMIT2_COMMIT:test/utils/DeployPermit2.sol" >"$deploy"
  else
    curl -fsSL "https://raw.githubusercontent.com/Uniswap/permit2/$PERMIT2_COMMIT/test/utils/DeployPermit2.sol" \
      -o "$deploy"
  fi
  node "$HERE/extract-permit2.mjs" "$deploy" "$out" "$VIEM_MODULES"
  rm -f "$deploy"
}

case "${1:-}" in
  --write)
    build "$HERE"
    ;;
  "")
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    build "$tmp"
    rc=0
    for name in TestUSDC MiniMulticall3 TestWalletFactory x402UptoPermit2Proxy Permit2; do
      if cmp -s "$tmp/$name.runtime.hex" "$HERE/$name.runtime.hex"; then
        echo "$name.runtime.hex: identical to the committed bytecode"
      else
        echo "$name.runtime.hex: DIFFERS from the committed bytecode (tests/chain/contracts/compile.sh --write to update)"
        rc=1
      fi
    done
    exit $rc
    ;;
  *)
    echo "usage: $0 [--write]" >&2
    exit 2
    ;;
esac
