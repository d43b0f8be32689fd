#!/usr/bin/env bash
# Runs every test of colo-blk: installs what the tests need, then the Rust unit and
# integration tests, then the peer-interop and guest tests.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*"; }

log "installing test dependencies"
./integration/install-deps.sh

# The workspace (Cargo.toml): the library, cli/ (the binary and its
# integration tests) and testkit/. Its default members are all three, so
# --workspace only says so.
log "cargo fmt / clippy / rustdoc"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

log "unit tests in a debug build (overflow checks on: guest input must never wrap)"
cargo test --workspace --lib --bins --quiet

log "cargo test (unit + integration, real binary through libblkio)"
cargo test --workspace --release --all-targets 2>&1 | tee target/cargo-test.log

fuzz_secs=${FUZZ_SECONDS:-60}
log "fuzz targets, ${fuzz_secs} s each, no crash allowed (fuzz/; README, Hardening: Fuzzing)"
(
  cd fuzz
  # cargo-fuzz passes -Z flags: the stable compiler takes them with this.
  # AddressSanitizer's runtime ships only with nightly, hence --sanitizer none.
  export RUSTC_BOOTSTRAP=1
  fuzz_flags=(--sanitizer none -O -a)
  cargo fuzz build "${fuzz_flags[@]}"
  for t in $(cargo fuzz list); do
    mkdir -p "target/corpus/$t"
    cargo fuzz run "${fuzz_flags[@]}" "$t" "target/corpus/$t" "corpus/$t" -- \
      -max_total_time="$fuzz_secs" -print_final_stats=1 > "target/fuzz-$t.log" 2>&1 || {
      tail -n 40 "target/fuzz-$t.log"
      exit 1
    }
    printf '%s: %s execs, %s\n' "$t" \
      "$(sed -n 's/^stat::number_of_executed_units: *//p' "target/fuzz-$t.log")" \
      "$(grep -o 'cov: [0-9]*' "target/fuzz-$t.log" | tail -n 1)"
  done
)

log "colo-blk demo (the README's main job: a COLO pair end to end)"
cargo build --release --quiet --bin colo-blk
./target/release/colo-blk demo

log "control socket driven by the stock qemu.qmp client"
python3 integration/qmp/test_qmp_client.py

log "OCF resource agent: ocf-tester, then a one-node Pacemaker cluster (integration/ocf)"
./integration/ocf/test-ocf-tester.sh target/release/colo-blk
# Exit 77: Pacemaker could not come up here; the reason is printed, and the
# run says SKIPPED, never passed.
rc=0
./integration/ocf/test-pacemaker.sh target/release/colo-blk || rc=$?
if [ "$rc" -eq 77 ]; then
  log "SKIPPED: one-node Pacemaker test (see the reason above)"
elif [ "$rc" -ne 0 ]; then
  exit "$rc"
fi

log "guest tests (Linux guests on colo-blk under QEMU TCG: integration/guest)"
cargo build --release --quiet --bin colo-blk
python3 integration/guest/run.py
