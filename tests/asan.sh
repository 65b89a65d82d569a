#!/usr/bin/env bash
# The C data path under AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   tests/asan.sh [pytest arguments]
#
# Copies the checkout (tracked and new files, nothing ignored: no build output) to a
# temporary directory, builds tftpd/_datapath there with
# -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
# (TFTPD_SANITIZE, read by _ext/build_datapath.py), and runs the tests that drive C
# (test_datapath, test_pump, test_starts, test_twins; or the pytest arguments given)
# with the ASan runtime preloaded into Python (and only Python: see sitecustomize
# below). Any report ends the process that made it (halt_on_error), so it fails the
# test; leak detection is off (CPython's own allocations are not leaks of ours). The
# checkout's own build is left alone.
# Needs gcc with libasan and libubsan (Debian: gcc). Not run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

libasan=$(gcc -print-file-name=libasan.so)
[ -e "$libasan" ] || { echo "no libasan.so for gcc ($libasan)" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/tftpd-asan.XXXXXX")
trap 'rm -rf "$work"' EXIT
git ls-files -z --cached --others --exclude-standard \
    | xargs -0 cp --parents --no-dereference -t "$work" 2>/dev/null || true
cd "$work"

echo "building the sanitized extension in $work" >&2
TFTPD_SANITIZE=address,undefined python3 _ext/build_datapath.py >build.log 2>&1 \
    || { cat build.log >&2; exit 2; }
grep -q -- "-fsanitize=address,undefined" build.log \
    || { echo "the build did not use the sanitizers" >&2; exit 2; }

# The runtime goes into Python processes only (this one and the daemons the tests start
# with sys.executable): another program started with libasan preloaded may deadlock at
# start-up (pgrep did, in glibc's locale lock), so LD_PRELOAD is dropped for them.
cat >"$work/sitecustomize.py" <<'PY'
"""tests/asan.sh: the ASan runtime for Python children only."""
import os
import subprocess
import sys

_execute_child = subprocess.Popen._execute_child


def _child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, *rest):
    prog = executable or (args if isinstance(args, (str, bytes)) else args[0])
    if os.fsdecode(prog) != sys.executable:
        env = {k: v for k, v in (os.environ if env is None else env).items()
               if k != "LD_PRELOAD"}
    return _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                          *rest)


subprocess.Popen._execute_child = _child
PY

export PYTHONPATH="$work"
export TFTPD_REQUIRE_EXT=1
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=1:detect_leaks=0:print_summary=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# The daemons the tests start inherit the runtime and the options: a report in a worker
# kills it, and the test that needed it fails.
export LD_PRELOAD="$libasan"
python3 -c 'import tftpd.datapath as d; assert d.ext_error() is None, d.ext_error()' \
    || { unset LD_PRELOAD; echo "the sanitized extension does not load" >&2; exit 2; }

# The sanitizer is really on: an overread through the extension must be reported and
# must end the process.
if canary=$(python3 -c '
from tftpd import _datapath as m
buf = m.ffi.new("char[]", 16)
m.lib.tftpd_hash(buf, 64)  # reads 48 bytes past the buffer
' 2>&1); then
    unset LD_PRELOAD; echo "an overread went unreported: the sanitizer is not on" >&2; exit 2
fi
grep -q "AddressSanitizer: heap-buffer-overflow" <<<"$canary" \
    || { unset LD_PRELOAD; echo "unexpected canary output: $canary" >&2; exit 2; }
echo "sanitizer check: an overread is reported and fatal" >&2

if [ "$#" -eq 0 ]; then
    set -- tests/test_datapath.py tests/test_pump.py tests/test_starts.py tests/test_twins.py
fi
status=0
python3 -m pytest -q -p no:cacheprovider "$@" || status=$?
unset LD_PRELOAD
exit "$status"
