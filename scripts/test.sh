#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite, then (with no arguments, as CI runs it) the GPU check
# on CPU (scripts/gpu_check.sh --device cpu). Extra arguments go to pytest alone, e.g.
#   bash scripts/test.sh -m "not slow"      # the quick subset
# Every Ray process the tests start (and only those) is stopped on exit, failure included.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# The report test opens report.html in Debian's Chromium (playwright drives it; no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test set-up: installing Debian chromium"
    (apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null; }) ||
      { echo "test set-up: could not install chromium (the report test needs it)"; exit 1; }
  else
    echo "test set-up: chromium is missing; install Debian's chromium package (root needed)"; exit 1
  fi
fi
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
# Every Ray instance the tests start lives under this run's own temp dir; on exit only those processes
# are stopped: other people's Ray clusters on this host are left alone.
export RAY_TMPDIR="$(mktemp -d /tmp/caig-tests-ray.XXXXXX)"
cleanup() { .venv/bin/python tests/ray_cleanup.py "$RAY_TMPDIR" || true; rm -rf "$RAY_TMPDIR"; }
trap cleanup EXIT
start=$(date +%s)
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
rc=$?
echo "tests: pytest exited $rc after $(( $(date +%s) - start )) s"
# pytest exits 5 when it collected no test (e.g. a -m/-k filter matched nothing): not a failure.
if [ "$rc" -eq 5 ]; then rc=0; fi
# The whole suite (no arguments, as CI runs it) also runs the GPU check on CPU, so it cannot rot
if [ "$#" -eq 0 ]; then
  CAIG_GPU_CHECK_OUT="$RAY_TMPDIR/gpu_check_cpu.json" bash scripts/gpu_check.sh --device cpu
  gpu_rc=$?
  [ "$rc" -eq 0 ] && rc=$gpu_rc
fi
exit "$rc"
