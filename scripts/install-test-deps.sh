#!/usr/bin/env bash
# Install the official x402 clients that tests/interop.rs pays our server with:
#   target/test-deps/node  npm ci of tests/clients/package.json + package-lock.json
#   target/test-deps/venv  python venv with tests/clients/requirements.txt (fully pinned)
# Idempotent: a stamp (hash of the lock files, this script, node and python versions) makes a
# re-run an instant no-op. Exits non-zero if anything cannot be installed, so CI fails loudly
# instead of the interop tests silently skipping.
# Env: X402_TEST_DEPS (install dir, default <repo>/target/test-deps), X402_PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLIENTS="$ROOT/tests/clients"
DEPS="${X402_TEST_DEPS:-$ROOT/target/test-deps}"
mkdir -p "$DEPS"
DEPS="$(cd "$DEPS" && pwd)"
PY="${X402_PYTHON:-python3}"

log() { printf '[install-test-deps] %s\n' "$*" >&2; }
die() { printf '[install-test-deps] ERROR: %s\n' "$*" >&2; exit 1; }
# The browser of the paywall test (tests/paywall.rs reads X402_CHROMIUM too).
CHROMIUM="${X402_CHROMIUM:-/usr/bin/chromium}"

command -v node >/dev/null || die "node (>= 20) is required"
command -v npm >/dev/null || die "npm is required"
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] || die "node >= 20 required (global fetch), found $(node --version)"
command -v "$PY" >/dev/null || die "$PY not found (set X402_PYTHON)"
pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "python >= 3.10 required by the x402 SDK, found $pyver"

# Serialise concurrent runs (two terminals, or scripts/test started twice) on the same dir.
if command -v flock >/dev/null; then
  exec 9>"$DEPS/.install.lock"
  flock 9
fi

stamp_file="$DEPS/.stamp"
want_stamp="$(cat "$CLIENTS/package.json" "$CLIENTS/package-lock.json" "$CLIENTS/requirements.txt" \
  "$ROOT/tests/svm/package.json" "$ROOT/tests/svm/package-lock.json" \
  "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16) node=$(node --version) python=$pyver"

# PostgreSQL for tests/postgres.rs: Debian's binaries live in /usr/lib/postgresql/<major>/bin
# (not on the PATH); tests/common/postgres.rs finds them there, or through $X402_PG_BIN.
pg_installed() {
  if [ -n "${X402_PG_BIN:-}" ]; then [ -x "$X402_PG_BIN/initdb" ] && [ -x "$X402_PG_BIN/postgres" ]; return; fi
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
    || { command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; }
}

installed() {
  [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want_stamp" ] \
    && [ -d "$DEPS/node/node_modules/@x402/fetch" ] && [ -d "$DEPS/node/node_modules/x402-fetch" ] \
    && "$DEPS/venv/bin/python" -c 'import sys' 2>/dev/null \
    && command -v redis-server >/dev/null && pg_installed \
    && command -v "$CHROMIUM" >/dev/null && command -v openssl >/dev/null \
    && [ -d "$DEPS/node/node_modules/playwright-core" ] \
    && [ -f "$DEPS/svm/node_modules/litesvm/package.json" ] \
    && { [ "$(uname -sm)" != "Linux x86_64" ] \
         || [ -x "$DEPS/node/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil" ]; }
}
if installed; then
  log "up to date: $DEPS"
  exit 0
fi
rm -f "$stamp_file" # a half-finished install must never look complete

# apt-get install, once per run (update first: a fresh machine has no package lists).
apt_updated=0
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  if [ "$apt_updated" = 0 ]; then apt-get update -qq >/dev/null && apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

install_node() {
  log "npm ci into $DEPS/node"
  mkdir -p "$DEPS/node"
  cp "$CLIENTS/package.json" "$CLIENTS/package-lock.json" "$DEPS/node/"
  # --ignore-scripts: no package here needs an install script (native add-ons such as keccak and
  # bufferutil have pure-JS fallbacks), and it avoids needing a C toolchain.
  (cd "$DEPS/node" && npm ci --ignore-scripts --no-audit --no-fund --no-update-notifier --loglevel=error)
  (cd "$DEPS/node" && node -e 'for (const m of ["@x402/fetch", "@x402/evm/exact/client", "@x402/core",
    "x402-fetch", "viem", "viem/accounts", "viem/chains", "playwright-core"]) require(m)') \
    || die "installed npm packages do not load"
}

install_python() {
  local venv="$DEPS/venv"
  if ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf "$venv"
    if ! "$PY" -m venv "$venv" >/dev/null 2>&1; then
      # Debian splits venv/ensurepip out of the interpreter package.
      rm -rf "$venv"
      log "'$PY -m venv' failed; installing python$pyver-venv with apt-get"
      apt_install "python$pyver-venv" || apt_install python3-venv \
        || die "'$PY -m venv' failed and python3-venv cannot be installed (needs root + apt-get)"
      "$PY" -m venv "$venv" || die "'$PY -m venv' still fails"
    fi
  fi
  log "pip install -r tests/clients/requirements.txt into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    -r "$CLIENTS/requirements.txt"
  "$venv/bin/python" -c 'import x402, x402.mechanisms.evm.exact, eth_account, requests, httpx' \
    || die "python x402 SDK does not import"
}

# ---------------------------------------------------------------------------------------------
# SERVICES: what the tests start themselves (each test runs its own instance on a free port).
#   - redis-server from Debian (>= 7.0) for tests/redis.rs: install_redis;
#   - anvil (npm "@foundry-rs/anvil-linux-amd64" 1.7.1) for tests/onchain.rs: install_anvil;
#   - PostgreSQL from Debian (initdb + postgres; each test makes its own cluster in a temp dir
#     and runs it as `nobody` when root) for tests/postgres.rs: install_postgres;
#   - openssl (the command) for tests/redis_cluster.rs's TLS certificates: install_openssl;
#   - Chromium from Debian for tests/paywall.rs (driven by the pinned playwright-core, which
#     never downloads a browser of its own): install_chromium.
# Extend this function and installed() together, so the stamp covers what is added.

install_redis() {
  command -v redis-server >/dev/null && return 0
  log "apt-get install redis-server"
  apt_install redis-server || die "redis-server is missing and cannot be installed (needs root + apt-get)"
}

# anvil for tests/onchain.rs: the pinned npm build of foundry's anvil, added next to the clients
# in $DEPS/node (--no-save: the clients' package.json and lock file stay untouched). The tests find
# it at $X402_TEST_DEPS/node/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil. Only published
# for Linux x86_64: elsewhere it is skipped (the on-chain tests then SKIP, or fail under CI=true).
ANVIL_NPM="@foundry-rs/anvil-linux-amd64@1.7.1"
ANVIL_BIN="$DEPS/node/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
# (installed() above checks the binary; the stamp covers this script, so the pinned version.)
install_anvil() {
  if [ "$(uname -sm)" != "Linux x86_64" ]; then
    log "anvil: no npm build for $(uname -sm); on-chain tests will be skipped"
    return 0
  fi
  log "npm install $ANVIL_NPM into $DEPS/node"
  (cd "$DEPS/node" && npm install --no-save --ignore-scripts --no-audit --no-fund \
    --no-update-notifier --loglevel=error "$ANVIL_NPM")
  "$ANVIL_BIN" --version 2>/dev/null | grep -qF "${ANVIL_NPM##*@}" \
    || die "anvil ${ANVIL_NPM##*@} does not run: $ANVIL_BIN"
}

install_postgres() {
  pg_installed && return 0
  log "apt-get install postgresql"
  # No `main` cluster: the tests make their own; nothing should listen on 5432.
  if [ "$(id -u)" = 0 ]; then
    mkdir -p /etc/postgresql-common/createcluster.d
    printf 'create_main_cluster = false\n' >/etc/postgresql-common/createcluster.d/x402-no-main.conf
  fi
  apt_install postgresql || die "PostgreSQL is missing and cannot be installed (needs root + apt-get)"
  pg_installed || die "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
}

install_openssl() {
  command -v openssl >/dev/null && return 0
  log "apt-get install openssl"
  apt_install openssl || die "openssl is missing and cannot be installed (needs root + apt-get)"
}

install_chromium() {
  command -v "$CHROMIUM" >/dev/null && return 0
  log "apt-get install chromium"
  apt_install chromium || die "chromium is missing and cannot be installed (needs root + apt-get)"
}

install_services() {
  install_anvil
  install_redis
  install_postgres
  install_openssl
  install_chromium
}
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# SVM (Solana, issue #20): the official @x402/svm client and litesvm (an in-process Solana VM,
# prebuilt for linux-x64 in its npm optional dependency) for tests/svm/chain.mjs, in their own
# $DEPS/svm so the EVM clients' lock file stays as it is.
install_svm() {
  log "npm ci tests/svm into $DEPS/svm"
  mkdir -p "$DEPS/svm"
  cp "$ROOT/tests/svm/package.json" "$ROOT/tests/svm/package-lock.json" "$DEPS/svm/"
  # `npm install` on the lock, not `npm ci`: litesvm's other platforms' binaries (optional
  # dependencies) are not all in the registry this project reaches, and `ci` refuses a lock
  # without them. The versions are still the lock's.
  (cd "$DEPS/svm" && npm install --ignore-scripts --no-audit --no-fund --no-update-notifier --loglevel=error)
  (cd "$DEPS/svm" && node -e 'for (const m of ["litesvm", "@x402/fetch", "@x402/svm/exact/client", "@solana/kit",
    "@solana-program/token"]) require(m)') || die "installed SVM npm packages do not load"
}
# The Python SDK's Solana client (x402[svm], in requirements.txt) for tests/clients/pay_svm.py;
# checked once the venv is installed.
check_svm_python() {
  "$DEPS/venv/bin/python" -c 'import x402.mechanisms.svm.exact, solders, solana' \
    || die "x402[svm] is not importable in $DEPS/venv"
}
# ---------------------------------------------------------------------------------------------

t0=$(date +%s)
install_node
install_svm
install_python
check_svm_python
install_services
printf '%s\n' "$want_stamp" >"$stamp_file"
log "installed in $(($(date +%s) - t0))s: $DEPS"
