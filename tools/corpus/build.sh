#!/bin/sh
# Builds the tokenizer parity corpus in spec/fixtures/tokenizer/corpus/ from
# text the project did not write: Debian 12 man pages in many languages,
# gettext catalogs (iso-codes, coreutils), Perl modules and C headers, plus
# the edge cases of tools/corpus/edge_cases.lua. Deterministic for a given
# set of package versions (recorded in SOURCES.txt).
#
#   tools/corpus/build.sh [OUTDIR]
set -eu
out=${1:-spec/fixtures/tokenizer/corpus}
here=$(cd "$(dirname "$0")" && pwd)
command -v msgunfmt >/dev/null || { echo "corpus: needs gettext (msgunfmt)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pkgs="manpages-ja manpages-zh manpages-ru manpages-el manpages-uk manpages-vi manpages-de manpages-fr
manpages-pl manpages-tr iso-codes coreutils perl-modules-5.36 libpcre2-dev liblua5.4-dev"
(cd "$tmp" && apt-get download $pkgs >/dev/null 2>&1) || { echo "corpus: apt-get download failed (apt-get update?)" >&2; exit 1; }
for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$tmp/root"; done
rm -rf "$out"
mkdir -p "$out"
ls "$tmp"/*.deb | xargs -n1 basename | sort > "$out/SOURCES.txt"

# Takes whole files in sorted order until about $2 bytes: never cuts a file,
# so every document is real, complete text.
take() {
  name=$1 limit=$2
  shift 2
  : > "$out/$name.txt"
  for f in "$@"; do
    [ -f "$f" ] || continue
    size=$(wc -c < "$out/$name.txt")
    [ "$size" -ge "$limit" ] && break
    # skip single files that would overshoot the share by far
    case "$f" in *.gz) fsize=$(zcat "$f" | wc -c) ;; *) fsize=$(wc -c < "$f") ;; esac
    [ "$fsize" -gt "$limit" ] && continue
    case "$f" in
      *.gz) zcat "$f" >> "$out/$name.txt" ;;
      *.mo) msgunfmt "$f" 2>/dev/null | sed -n 's/^msgstr "\(.*\)"$/\1/p' | { grep -v '^$' || true; } >> "$out/$name.txt" ;;
      *) cat "$f" >> "$out/$name.txt" ;;
    esac
  done
}

man() { lang=$1; ls "$tmp"/root/usr/share/man/$lang/man*/*.gz 2>/dev/null | LC_ALL=C sort; }
take man-ja 120000 $(man ja)
take man-zh 120000 $(man zh_CN) $(man zh_TW)
take man-ru 120000 $(man ru)
take man-el 80000 $(man el)
take man-uk 80000 $(man uk)
take man-vi 80000 $(man vi)
take man-de 80000 $(man de)
take man-fr 80000 $(man fr)
take man-pl 60000 $(man pl)
take man-tr 60000 $(man tr)

mo() { ls "$tmp"/root/usr/share/locale/$1/LC_MESSAGES/*.mo 2>/dev/null | LC_ALL=C sort; }
for lang in ar hi ko th he ja zh_CN zh_TW el ru bn ta am ka hy fa ur my km si te ml gu pa mr ne lo bo; do
  take "po-$lang" 60000 $(mo "$lang")
done

take code-c 80000 $(ls "$tmp"/root/usr/include/*.h "$tmp"/root/usr/include/lua5.4/*.h 2>/dev/null | LC_ALL=C sort)
take code-perl 120000 $(find "$tmp"/root/usr/share/perl -name '*.pm' | LC_ALL=C sort | head -400)

# drop catalogs that turned out empty in this Debian release
for f in "$out"/*.txt; do [ -s "$f" ] || rm -f "$f"; done

lua5.4 "$here/edge_cases.lua" > "$out/edge-cases.txt"
du -b "$out" | tail -1
