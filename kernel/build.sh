#!/usr/bin/env bash
# Builds the Airlock guest kernel from Debian's linux-source-6.1 with kernel/config applied on
# top of tinyconfig, and caches it by the config's hash:
#   ${XDG_CACHE_HOME:-~/.cache}/airlock/kernel/<sha256(config)[:16]>/vmlinux
# Prints the path of the cached vmlinux. Idempotent: a cached kernel is reused.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
config="$here/config"
hash=$(sha256sum "$config" | cut -c1-16)
cache="${AIRLOCK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/airlock}/kernel/$hash"

if [ -s "$cache/vmlinux" ]; then
  echo "$cache/vmlinux"
  exit 0
fi

need=()
for p in linux-source-6.1 flex bison bc libelf-dev libssl-dev make gcc xz-utils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "kernel/build.sh: missing packages: ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "kernel/build.sh: installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2
fi

tarball=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1)
[ -n "$tarball" ] || { echo "kernel/build.sh: no /usr/src/linux-source-6.1.tar.*" >&2; exit 1; }

mkdir -p "$(dirname "$cache")"
work=$(mktemp -d "$(dirname "$cache")/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "kernel/build.sh: building $hash from $tarball (a few minutes)" >&2
tar -C "$work" -xf "$tarball"
src=$(echo "$work"/linux-source-6.1)
cd "$src"
make -s ARCH=x86_64 tinyconfig >&2
scripts/kconfig/merge_config.sh -m -O . .config "$config" >/dev/null
make -s ARCH=x86_64 olddefconfig >&2

# Every line of the fragment must have survived olddefconfig; a typo or a missing dependency
# would otherwise silently produce a kernel without the feature.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qx "$line" .config ;;
    "# CONFIG_"*" is not set") ! grep -q "^$(echo "$line" | cut -d' ' -f2)=" .config ;;
    *) continue ;;
  esac || { echo "kernel/build.sh: '$line' did not stick (check its dependencies)" >&2; missing=1; }
done < "$config"
[ "$missing" = 0 ] || exit 1

make -s ARCH=x86_64 -j"$(nproc)" vmlinux >&2
mkdir -p "$cache.tmp"
cp vmlinux "$cache.tmp/vmlinux"
cp .config "$cache.tmp/config"
dpkg-query -W -f='${Version}\n' linux-source-6.1 > "$cache.tmp/source-version"
rm -rf "$cache"
mv "$cache.tmp" "$cache"
echo "$cache/vmlinux"
