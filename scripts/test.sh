#!/usr/bin/env bash
# The whole test suite: Rust unit + integration tests (parity with diffusers via committed
# fixtures, loader errors, the CLI as a real process). Python is never needed here; the fixtures
# under tests/fixtures are regenerated only by tools/reference/make_fixtures.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo test --locked --all-targets "$@"
