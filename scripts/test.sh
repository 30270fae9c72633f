#!/usr/bin/env bash
# The whole test suite, on a fresh machine:
#  1. Rust unit + integration tests: parity with diffusers (committed fixtures), loader errors,
#     the CLI as a real process, the committed OpenAPI document.
#  2. The official `openai` Python SDK against a real `candela serve` on an ephemeral loopback
#     port (tests/sdk), in a virtualenv under target/ built from tests/sdk/requirements.txt,
#     plus Swagger UI rendered by headless Chromium (installed with apt-get when missing).
# Python never produces reference data here; tools/reference/ does that, by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A clean CI build gains nothing from incremental caches, and they cost gigabytes of disk.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi

echo "== cargo test"
cargo test --locked --all-targets "$@"

echo "== SDK tests (openai Python package against a real server)"
cargo build --locked --bin candela
venv=target/sdk-venv
stamp="$venv/.requirements"
if [ ! -x "$venv/bin/python" ] || ! cmp -s tests/sdk/requirements.txt "$stamp"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
    cp tests/sdk/requirements.txt "$stamp"
fi
if ! command -v chromium >/dev/null 2>&1; then
    echo "installing chromium for the Swagger UI test"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
target_dir="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
CANDELA_BIN="$target_dir/debug/candela" "$venv/bin/python" -m pytest tests/sdk -q -p no:cacheprovider
