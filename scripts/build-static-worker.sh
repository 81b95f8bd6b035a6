#!/usr/bin/env bash
# Build skyward-worker as a static binary (glibc, +crt-static) and check that it is static.
# The explicit --target keeps the static flag off build scripts and proc-macros.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-dev}"
target=x86_64-unknown-linux-gnu
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" cargo build -p skyward-worker --target "$target" --profile "$profile"
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
bin="${CARGO_TARGET_DIR:-target}/$target/$dir/skyward-worker"
if ldd "$bin" 2>&1 | grep -q -E "not a dynamic executable|statically linked"; then
    echo "static: $bin ($(du -h "$bin" | cut -f1))"
else
    echo "error: $bin is dynamically linked:" >&2
    ldd "$bin" >&2
    exit 1
fi
