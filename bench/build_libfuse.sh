#!/usr/bin/env bash
# Build libfuse >= 3.16 (FUSE passthrough) from Debian trixie's source package, for
# bench/probe_passthrough.py. Debian 12 ships libfuse 3.14, which cannot pass a file through.
#
#   bash bench/build_libfuse.sh [OUT]      (default OUT: /tmp/coldbrew-libfuse)
#
# Uses only the Debian archive (apt-get source, with a private sources list and lists dir,
# so the system's apt setup is untouched) and PyPI (meson, ninja in a private venv).
# Prints the path of the built libfuse3.so.4; pass it as FUSE_LIBRARY_PATH.
set -euo pipefail
OUT=${1:-/tmp/coldbrew-libfuse}
mkdir -p "$OUT/apt/lists/partial"
cd "$OUT"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
  > apt/sources.list
APT=(-o Dir::Etc::sourcelist="$OUT/apt/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$OUT/apt/lists")
if [ ! -d src ]; then
  apt-get "${APT[@]}" update -qq
  apt-get "${APT[@]}" source --download-only fuse3 2>/dev/null
  dpkg-source -x fuse3_*.dsc src >/dev/null
fi
[ -x venv/bin/meson ] || { python3 -m venv venv && venv/bin/pip install -q meson ninja; }
cd src
PATH="$OUT/venv/bin:$PATH" meson setup build -Dexamples=false -Dutils=false -Dtests=false >/dev/null
PATH="$OUT/venv/bin:$PATH" ninja -C build >/dev/null
readlink -f build/lib/libfuse3.so.4
