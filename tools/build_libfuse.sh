#!/usr/bin/env bash
# Build libfuse >= 3.16 (FUSE passthrough) from Debian trixie's fuse3 source package: the
# library only, no utilities, examples or tests. Debian 12 ships libfuse 3.14, which cannot
# pass a file through. `./dev setup` runs this into .venv/libfuse; the image's builder
# stage runs it too (Dockerfile).
#
#   tools/build_libfuse.sh [OUT]      (default OUT: /tmp/coldbrew-libfuse)
#
# Leaves OUT/libfuse3.so.4 (give it to mfusepy as FUSE_LIBRARY_PATH) and prints its path.
# Does nothing when that file is already there. On failure: exit 1, one line on stderr
# saying why, the details in OUT/build.log.
#
# Needs a C compiler, patch(1), Python 3 with venv, and HTTP to a Debian mirror and to PyPI
# (meson and ninja, in a throwaway venv). No dpkg-dev, apt or xz: the sources are fetched
# and checked against the pinned SHA-256 below, unpacked with tar and Python, and Debian's
# patches applied in the order of their series file (as dpkg-source -x would).
#   COLDBREW_DEBIAN_MIRROR  Debian archive to fetch from (default http://deb.debian.org/debian;
#                           a snapshot.debian.org URL still has these files once trixie moves on)
set -euo pipefail

# Debian trixie's fuse3 (Debian's patches included). Another revision: its .dsc lists the
# SHA-256 of both files.
VERSION=3.17.2
DEBIAN_REVISION=3
ORIG_SHA256=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
DEBIAN_SHA256=eaf7a177761ae8bf99ea97619f2cccf83f169b4f000e17b6106834e69456b5a2

OUT=${1:-/tmp/coldbrew-libfuse}
MIRROR=${COLDBREW_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PYTHON:-python3}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LIB=$OUT/libfuse3.so.4
if [ -f "$LIB" ]; then
  echo "$LIB"
  exit 0
fi

LOG=$OUT/build.log
: > "$LOG"
fail() { echo "build_libfuse: $*" >&2; exit 1; }
# Run a step with its output in the log; on failure name the step (and keep the log).
step() {
  local what=$1; shift
  echo "+ $*" >> "$LOG"
  "$@" >> "$LOG" 2>&1 || fail "$what failed: $(tail -n 1 "$LOG" | cut -c1-160); log: $LOG"
}

command -v "${CC:-cc}" >/dev/null 2>&1 || fail "no C compiler (${CC:-cc})"
command -v patch >/dev/null 2>&1 || fail "no patch(1) to apply Debian's patches"
command -v "$PY" >/dev/null 2>&1 || fail "no $PY"
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # it is run after cd

WORK=$(mktemp -d "${TMPDIR:-/tmp}/coldbrew-libfuse-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# Fetch and check both tarballs, then unpack Debian's patches (a .tar.xz: Python reads it, so
# xz-utils is not needed).
step "downloading fuse3 $VERSION-$DEBIAN_REVISION from $MIRROR" "$PY" - "$MIRROR/pool/main/f/fuse3" \
  "fuse3_$VERSION.orig.tar.gz" "$ORIG_SHA256" \
  "fuse3_$VERSION-$DEBIAN_REVISION.debian.tar.xz" "$DEBIAN_SHA256" <<'PYEOF'
import hashlib, sys, tarfile, urllib.request
base, files = sys.argv[1], sys.argv[2:]
for name, want in zip(files[::2], files[1::2]):
    url = f"{base}/{name}"
    with urllib.request.urlopen(url, timeout=30) as r:
        data = r.read()
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        sys.exit(f"{url}: sha256 {got}, expected {want}")
    with open(name, "wb") as f:
        f.write(data)
with tarfile.open(name) as t:  # the .debian.tar.xz: only debian/patches is used
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    t.extractall(".", [m for m in t.getmembers()
                       if m.name.startswith("debian/patches/") and (m.isfile() or m.isdir())], **safe)
PYEOF
step "unpacking fuse3_$VERSION.orig.tar.gz" tar -xzf "fuse3_$VERSION.orig.tar.gz"
SRC=$WORK/fuse-$VERSION
[ -d "$SRC" ] || fail "fuse3_$VERSION.orig.tar.gz has no fuse-$VERSION/"
while read -r p _; do
  case $p in ''|'#'*) continue ;; esac
  step "applying Debian's $p" patch -d "$SRC" -p1 --forward --batch -i "$WORK/debian/patches/$p" </dev/null
done < debian/patches/series

step "creating a venv for meson" "$PY" -m venv "$WORK/venv"
step "installing meson and ninja from PyPI" "$WORK/venv/bin/python" -m pip install -q \
  --disable-pip-version-check --retries 1 --timeout 30 meson ninja
export PATH="$WORK/venv/bin:$PATH"
# --prefix=/usr: the library looks for fusermount3 in <prefix>/bin first, where Debian has it.
step "meson setup" meson setup "$WORK/build" "$SRC" --prefix=/usr \
  -Dexamples=false -Dutils=false -Dtests=false
step "compiling libfuse" ninja -C "$WORK/build"

cp -L "$WORK/build/lib/libfuse3.so.4" "$OUT/.libfuse3.so.4.tmp"
mv "$OUT/.libfuse3.so.4.tmp" "$LIB"
echo "$LIB"
