#!/usr/bin/env bash
# The README's first command: install what building needs, build in the
# checkout, and run Portico in the foreground with the default config
# (conf/portico.json). Stop it with Ctrl-C.
#
# An in-tree build: tests/run-all.sh builds out of tree and cleans this one
# (make distclean) first, because autotools refuses both at once.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh --runtime
autoreconf -fi
./configure
make -j"$(nproc)"
exec ./src/portico -c conf/portico.json
