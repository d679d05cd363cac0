#!/usr/bin/env bash
# Rebuilds tests/chain/contracts/*.runtime.hex from our .sol sources next to it (the list is in
# compile.mjs; see SOURCES.md) with the pinned solc-js.
# Maintainers only: the tests etch the committed hex and never compile.
#   tests/chain/contracts/compile.sh           build into a temp dir and say whether it matches the committed hex
#   tests/chain/contracts/compile.sh --write   build and overwrite the committed *.runtime.hex
# Either way it then runs selftest.mjs (Permit2 and the upto proxy on anvil) on the committed hex.
# solc-js is installed (once) into $X402_TEST_DEPS/solc (default <repo>/target/test-deps/solc);
# anvil and viem for the self-test come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh).
# Needs node >= 20 and npm.
set -euo pipefail

SOLC_VERSION=0.8.28
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
DEPS="${X402_TEST_DEPS:-$ROOT/target/test-deps}"
SOLC_DIR="$DEPS/solc"

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
  node "$HERE/compile.mjs" "$SOLC_DIR/node_modules" "$1"
}

case "${1:-}" in
  --write)
    build "$HERE"
    node "$HERE/selftest.mjs"
    ;;
  "")
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    build "$tmp"
    rc=0
    for built in "$tmp"/*.runtime.hex; do
      name="$(basename "$built" .runtime.hex)"
      if cmp -s "$tmp/$name.runtime.hex" "$HERE/$name.runtime.hex"; then
        echo "$name.runtime.hex: identical to the committed bytecode"
      else
        echo "$name.runtime.hex: DIFFERS from the committed bytecode (tests/chain/contracts/compile.sh --write to update)"
        rc=1
      fi
    done
    node "$HERE/selftest.mjs" || rc=1
    exit $rc
    ;;
  *)
    echo "usage: $0 [--write]" >&2
    exit 2
    ;;
esac
