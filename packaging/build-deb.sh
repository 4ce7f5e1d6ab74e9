#!/usr/bin/env bash
# Build the portico .deb from this checkout.
#
#   packaging/build-deb.sh [OUTDIR]     (default OUTDIR: ./build-deb)
#
# Copies the source tree (the files git tracks plus new files it does not
# ignore, so uncommitted edits are included; or, outside a git checkout,
# the tree as it is minus build products) to a temporary directory, puts
# packaging/debian there as ./debian, and runs dpkg-buildpackage -us -uc -b.
# The .deb, .buildinfo and .changes land in OUTDIR; the last line printed
# is the .deb's path.
#
# Needs dpkg-dev and debhelper (scripts/install-deps.sh installs them) and
# the Build-Depends of packaging/debian/control. DEB_BUILD_OPTIONS is passed
# through: DEB_BUILD_OPTIONS=nocheck skips the unit tests, parallel=N
# builds with N jobs (default: 2).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$SRC/build-deb}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

for tool in dpkg-buildpackage dh dpkg-parsechangelog; do
    if ! command -v "$tool" >/dev/null; then
        echo "build-deb: $tool not found: apt-get install dpkg-dev debhelper" >&2
        exit 1
    fi
done

VERSION=$(dpkg-parsechangelog -l "$SRC/packaging/debian/changelog" -S Version)
AC_VERSION=$(sed -n 's/^AC_INIT(\[portico\], \[\([^]]*\)\].*/\1/p' "$SRC/configure.ac")
if [[ $VERSION != "$AC_VERSION" ]]; then
    echo "build-deb: packaging/debian/changelog says $VERSION but configure.ac says $AC_VERSION" >&2
    exit 1
fi

TMP=$(mktemp -d /tmp/portico-deb.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
TREE=$TMP/portico-$VERSION
mkdir -p "$TREE"

if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Files deleted in the work tree but still in the index are skipped.
    (cd "$SRC" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [[ -e $f || -L $f ]] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -C "$TREE" -xf -
else
    tar -C "$SRC" --exclude=./build --exclude='./build-*' --exclude=./debian \
        --exclude=config.status --exclude=config.log --exclude=Makefile \
        --exclude='*.o' --exclude='*.a' -cf - . | tar -C "$TREE" -xf -
fi
rm -rf "$TREE/debian"
cp -a "$TREE/packaging/debian" "$TREE/debian"

export DEB_BUILD_OPTIONS=${DEB_BUILD_OPTIONS:-parallel=2}
echo "build-deb: building portico $VERSION in $TREE (DEB_BUILD_OPTIONS=$DEB_BUILD_OPTIONS)"
(cd "$TREE" && dpkg-buildpackage -us -uc -b)

shopt -s nullglob
built=("$TMP"/portico_"$VERSION"_*.deb)
if [[ ${#built[@]} -ne 1 ]]; then
    echo "build-deb: expected one portico_${VERSION}_*.deb, found ${#built[@]}" >&2
    exit 1
fi
cp "$TMP"/portico_"$VERSION"_*.{deb,buildinfo,changes} "$OUT"/
echo "$OUT/$(basename "${built[0]}")"
