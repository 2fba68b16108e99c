#!/bin/sh
# Fetches a current Neovim (0.10+) beside Debian 12's 0.7.2, so that the
# Neovim specs run on both: Debian's own `neovim` package of its current
# stable release (13, trixie; 0.10.4), or of another SUITE (sid: 0.12.4 in
# December 2026), and its dependency closure, fetched by
# package name with a private apt state (the system's sources and packages
# are untouched) and unpacked into DIR (default build/nvim-current). trixie's
# glibc comes with it: the binary is pointed at the loader and libraries
# under DIR (patchelf), so it runs here as it would on Debian 13, and finds
# its runtime under DIR/usr/share/nvim. Libraries DIR lacks (PCRE2, cJSON,
# which the gptoss module links) come from the system. Prints DIR/usr/bin/nvim,
# absolute.
#   tools/fetch_nvim.sh [DIR] [SUITE]
set -eu
DIR=${1:-build/nvim-current}
SUITE=${2:-trixie}
NVIM="$DIR/usr/bin/nvim"
if [ -x "$NVIM" ] && "$NVIM" --version >/dev/null 2>&1; then echo "$(cd "$(dirname "$NVIM")" && pwd)/nvim"; exit 0; fi
command -v patchelf >/dev/null || { echo "fetch_nvim: patchelf is missing (tools/install_deps.sh installs it)" >&2; exit 1; }
APT=$(mktemp -d)
PART=""
trap 'rm -rf "$APT" ${PART:+"$PART"}' EXIT
trap 'exit 130' INT TERM
mkdir -p "$(dirname "$DIR")" "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
ABS="$(cd "$(dirname "$DIR")" && pwd)/$(basename "$DIR")"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" > "$APT/sources.list"
# a status file of nothing installed: the closure is resolved whole, libc included
set -- -o Dir::Etc::sourcelist="$APT/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::lists="$APT/lists" \
  -o Dir::Cache="$APT/cache" -o Dir::State::status=/dev/null -o APT::Architecture=amd64 -o APT::Sandbox::User=root
apt-get "$@" -qq update >&2 || { echo "fetch_nvim: apt-get update of Debian $SUITE failed" >&2; exit 1; }
pkgs=$(apt-cache "$@" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
  --no-enhances neovim | grep -v '^ ' | grep -v '^<' | sort -u)
[ -n "$pkgs" ] || { echo "fetch_nvim: Debian $SUITE has no neovim" >&2; exit 1; }
# shellcheck disable=SC2086
(cd "$APT/debs" && apt-get "$@" -qq download $pkgs) >&2 || { echo "fetch_nvim: downloading $pkgs failed" >&2; exit 1; }
# unpacked beside DIR (a directory of this run's own), then moved in place:
# an interrupted fetch, or two at once, leave no half of it
PART=$(mktemp -d "$ABS.part.XXXXXX")
for d in "$APT"/debs/*.deb; do dpkg-deb -x "$d" "$PART"; done
# the whole closure finds trixie's libraries first (DT_RPATH reaches
# indirect dependencies too), then the system's, as the loader's default;
# the paths are where DIR will be once moved in place
L="$ABS/usr/lib/x86_64-linux-gnu"
patchelf --set-interpreter "$L/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$L" "$PART/usr/bin/nvim"
chmod 755 "$PART"
if [ -x "$NVIM" ] && "$NVIM" --version >/dev/null 2>&1; then echo "$ABS/usr/bin/nvim"; exit 0; fi   # another run won
rm -rf "$DIR"
mv "$PART" "$DIR"
PART=""
"$NVIM" --version >/dev/null || { echo "fetch_nvim: $NVIM does not run" >&2; exit 1; }
echo "$ABS/usr/bin/nvim"
