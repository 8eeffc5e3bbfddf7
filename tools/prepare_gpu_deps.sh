#!/usr/bin/env bash
# Prepares .deps/: the Debian 12 build dependencies that a bare GPU machine lacks, unpacked into a relocatable
# prefix that travels with the working tree to the device machine (carry [".deps"]) and is used there by
# tools/gpu_check.sh. Runs HERE, on the Debian 12 dev machine (network for apt, no GPU needed); root only for
# `apt-get update` when the package lists are missing.
#
#   tools/prepare_gpu_deps.sh            download (cached), unpack, prune, fix up; print the size; write .deps/COMMIT
#   tools/prepare_gpu_deps.sh --verify   also configure a CUDA build that may use only .deps (CMake told to ignore
#                                        the /usr and / prefixes) and check every dependency resolved into .deps
#   tools/prepare_gpu_deps.sh --force    unpack again even when .deps is up to date
#
# What .deps holds (kept under 40 MiB; the device tool carries 64 MiB with the working tree):
#   root/usr/...    dpkg -x of the packages below, pruned (docs, static libs other than GoogleTest's, LAPACK, ...),
#                   lib/ merged into usr/lib/, absolute symlinks made relative, multiarch OpenSSL headers merged
#                   into include/openssl, .pc files relocatable through ${pcfiledir}, slim cairo.pc and
#                   fontconfig.pc (cairo's Requires.private would pull X11, glib and friends' -dev packages),
#                   a fonts.conf that finds the carried DejaVu Sans relative to itself.
#                   OpenBLAS (36 MB) is stored gzipped; env.sh expands it into a build folder on first use.
#   bin/pkg-config  wrapper around the carried pkgconf (bare images often lack pkg-config)
#   env.sh          `source .deps/env.sh` sets PATH, PKG_CONFIG_*, CMAKE_PREFIX_PATH, FONTCONFIG_FILE,
#                   LD_LIBRARY_PATH (only the carried libraries whose soname the host lacks) and the array
#                   DPO_DEPS_CMAKE_ARGS; set DPO_DEPS_LIBDIR first (where OpenBLAS is expanded; default /tmp).
#   MANIFEST        package=version and sha256 of each .deb;  COMMIT  git HEAD and dirty state at preparation
# Not carried: Open MPI (optional in CMake; gpu_check.sh configures with MPI disabled), the CUDA toolkit, cuDNN
# and NCCL (the device image has them; gpu_check.sh looks for cuDNN/NCCL in the toolkit and in PyTorch's wheels).
# The downloaded .debs are cached in $DPO_DEPS_CACHE (default ~/.cache/dpo-gpu-debs), outside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEPS=$REPO/.deps
ROOT=$DEPS/root
CACHE=${DPO_DEPS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dpo-gpu-debs}
MA=x86_64-linux-gnu
MAX_MIB=40
LAYOUT_VERSION=3   # bump when the unpack/prune/fix-up steps change

force=0 verify=0
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    --verify) verify=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "prepare_gpu_deps: unknown argument '$a'" >&2; exit 2 ;;
  esac
done

# -dev packages for what CMakeLists.txt finds, and the runtime libraries they need that are not part of a C++
# toolchain (libc6, libstdc++6, libgcc-s1, libgomp1 come with gcc and are never carried).
PKGS=(
  libyaml-cpp-dev libyaml-cpp0.7                       # find_package(yaml-cpp)
  nlohmann-json3-dev                                   # find_package(nlohmann_json)
  libcli11-dev                                         # find_package(CLI11)
  libgtest-dev                                         # find_package(GTest): static libgtest.a, headers
  libopenblas-openmp-dev libopenblas0-openmp           # CBLAS (OpenMP build), DPO_OPENBLAS_LIB
  libgfortran5 libquadmath0                            #   OpenBLAS's own needs
  libssl-dev libssl3                                   # find_package(OpenSSL COMPONENTS Crypto)
  libcairo2-dev libcairo2 libfontconfig-dev libfontconfig1 fonts-dejavu-core   # pkg_check_modules(cairo fontconfig)
  libpixman-1-0 libpng16-16 libfreetype6 libbrotli1 libexpat1 zlib1g           #   cairo's and fontconfig's needs
  libxcb1 libxcb-render0 libxcb-shm0 libx11-6 libxext6 libxrender1 libxau6 libxdmcp6 libbsd0 libmd0
  libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3   # pkg_check_modules(libpcre2-8)
  libutf8proc-dev libutf8proc2                         # pkg_check_modules(libutf8proc)
  pkgconf-bin libpkgconf3                              # pkg-config itself (find_package(PkgConfig REQUIRED))
)
# Sonames a C++ toolchain always provides; anything else a carried library needs must be carried too.
BASE_SONAMES='^(libc\.so\.6|libm\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|ld-linux-x86-64\.so\.2|libstdc\+\+\.so\.6|libgcc_s\.so\.1|libgomp\.so\.1)$'

say() { echo "prepare_gpu_deps: $*"; }
die() { echo "prepare_gpu_deps: error: $*" >&2; exit 1; }

if ! command -v dpkg-deb >/dev/null || ! command -v apt-get >/dev/null; then die "needs dpkg-deb and apt-get (Debian 12)"; fi
[ "$(dpkg --print-architecture)" = amd64 ] || die "this machine is $(dpkg --print-architecture); the GPU machine is amd64"

# The cached .deb of package $1 at version $2 (apt-get download writes an epoch's ':' as %3a), or nothing.
deb_file() {
  local f
  for f in "$CACHE/${1}_${2//:/%3a}_"*.deb; do [ -f "$f" ] && echo "$f" && return 0; done
  return 0
}

# --- resolve versions ---------------------------------------------------------------------------------------------
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/{print $2; exit}'; }
if [ -z "$(candidate libyaml-cpp-dev)" ] || [ "$(candidate libyaml-cpp-dev)" = "(none)" ]; then
  [ "$(id -u)" -eq 0 ] || die "apt package lists are missing; run as root (apt-get update)"
  say "apt-get update"
  apt-get update -qq
fi
manifest=""
for p in "${PKGS[@]}"; do
  v=$(candidate "$p")
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then die "no candidate version for package $p"; fi
  manifest+="$p=$v"$'\n'
done
stamp=$(printf '%s\nlayout=%s\n%s' "$manifest" "$LAYOUT_VERSION" "$(sha256sum "$0" | cut -c1-16)" | sha256sum | cut -c1-32)

# --- download, unpack, prune, fix up (skipped when the stamp matches) ---------------------------------------------
if [ "$force" = 0 ] && [ -f "$ROOT/.stamp" ] && [ "$(cat "$ROOT/.stamp")" = "$stamp" ]; then
  say ".deps is up to date (stamp $stamp)"
else
  mkdir -p "$CACHE"
  debs=()
  need=()
  for line in $manifest; do
    p=${line%%=*} v=${line#*=}
    if [ -z "$(deb_file "$p" "$v")" ]; then need+=("$p=$v"); fi
  done
  if [ ${#need[@]} -gt 0 ]; then
    say "downloading ${#need[@]} packages into $CACHE"
    (cd "$CACHE"; apt-get download -qq "${need[@]}" 2>&1 | grep -v "unsandboxed as root") || true
  fi
  for line in $manifest; do
    p=${line%%=*} v=${line#*=}
    f=$(deb_file "$p" "$v")
    [ -n "$f" ] || die "download of $p=$v failed"
    debs+=("$f")
  done

  tmp=$DEPS/root.new
  rm -rf "$tmp"
  mkdir -p "$tmp"
  for f in "${debs[@]}"; do dpkg-deb -x "$f" "$tmp"; done

  # Debian 12 still ships some libraries in /lib: merge into usr/lib so there is one library folder.
  if [ -d "$tmp/lib" ]; then
    cp -a "$tmp/lib/." "$tmp/usr/lib/"
    rm -rf "${tmp:?}/lib"
  fi
  L=$tmp/usr/lib/$MA
  # Prune what neither the build nor the tests read.
  rm -rf "$tmp/usr/share/doc" "$tmp/usr/share/doc-base" "$tmp/usr/share/man" "$tmp/usr/share/lintian" \
         "$tmp/usr/share/aclocal" "$tmp/usr/share/bug" "$tmp/usr/share/xml" "$tmp/usr/share/fontconfig" \
         "${tmp:?}/etc" "$L/engines-3" "$L/ossl-modules"
  find "$tmp" -name '*.a' ! -name 'libgtest.a' ! -name 'libgtest_main.a' -delete
  rm -f "$L/openblas-openmp/liblapack.so"* "$L/openblas-openmp/libblas.so"* \
        "$L/openblas-openmp/pkgconfig/lapack-openblas.pc" "$L/openblas-openmp/pkgconfig/blas-openblas.pc" \
        "$tmp/usr/include/$MA/openblas-openmp/f77blas.h"
  rm -rf "$L/libcairo-gobject"* "$L/libcairo-script-interpreter"* "$L"/libexpatw.so*
  find "$tmp/usr/share/fonts" -type f ! -name 'DejaVuSans.ttf' ! -name 'DejaVuSans-Bold.ttf' -delete
  # OpenSSL's multiarch headers (configuration.h, opensslconf.h) live in include/x86_64-linux-gnu/openssl, which
  # only the system compiler searches: merge them into include/openssl so -I.deps/root/usr/include suffices.
  if [ -d "$tmp/usr/include/$MA/openssl" ]; then
    cp -a "$tmp/usr/include/$MA/openssl/." "$tmp/usr/include/openssl/"
    rm -rf "$tmp/usr/include/$MA/openssl"
  fi
  # Absolute symlinks (/usr/..., /lib/...) would point at the host: make them relative inside the tree.
  while IFS= read -r -d '' link; do
    target=$(readlink "$link")
    target=${target#/}
    case "$target" in lib/*) target="usr/$target" ;; esac
    rel=$(realpath -m --relative-to="$(dirname "$link")" "$tmp/$target")
    ln -sfn "$rel" "$link"
  done < <(find "$tmp" -type l -lname '/*' -print0)
  # Symlinks left dangling by the pruning (libcairo-gobject.so, libblas.so, ...).
  find "$tmp" -xtype l -delete
  find "$tmp" -type d -empty -delete

  # pkg-config files: relocatable prefix; slim cairo and fontconfig (no private requirements: we link the shared
  # libraries and include neither cairo-ft.h, cairo-xlib.h nor fcfreetype.h, so freetype/X11 headers are not needed).
  PC=$L/pkgconfig
  for pc in "$PC"/*.pc "$tmp"/usr/share/pkgconfig/*.pc "$L"/openblas-openmp/pkgconfig/*.pc; do
    [ -f "$pc" ] || continue
    depth=$(realpath -m --relative-to="$(dirname "$pc")" "$tmp/usr")
    sed -i -E "s#(^|-I|-L|[^A-Za-z0-9_.])/usr(/|\$|[[:space:]])#\1\${pcfiledir}/$depth\2#g" "$pc"
  done
  rm -f "$PC"/cairo-*.pc
  cat >"$PC/cairo.pc" <<'EOF'
# Slim cairo.pc for the carried prefix (tools/prepare_gpu_deps.sh): shared library only, no Requires.private.
prefix=${pcfiledir}/../../..
libdir=${prefix}/lib/x86_64-linux-gnu
includedir=${prefix}/include
Name: cairo
Description: Multi-platform 2D graphics library
Version: 1.16.0
Libs: -L${libdir} -lcairo
Cflags: -I${includedir}/cairo
EOF
  cat >"$PC/fontconfig.pc" <<'EOF'
# Slim fontconfig.pc for the carried prefix (tools/prepare_gpu_deps.sh): no freetype2/expat requirements.
prefix=${pcfiledir}/../../..
libdir=${prefix}/lib/x86_64-linux-gnu
includedir=${prefix}/include
Name: Fontconfig
Description: Font configuration and customization library
Version: 2.14.1
Libs: -L${libdir} -lfontconfig
Cflags: -I${includedir}
EOF
  mkdir -p "$tmp/etc/fonts"
  cat >"$tmp/etc/fonts/fonts.conf" <<'EOF'
<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">
<!-- Carried fontconfig configuration (tools/prepare_gpu_deps.sh): only the DejaVu Sans beside it. -->
<fontconfig>
  <dir prefix="relative">../../usr/share/fonts</dir>
  <cachedir prefix="xdg">fontconfig</cachedir>
  <alias><family>sans-serif</family><prefer><family>DejaVu Sans</family></prefer></alias>
</fontconfig>
EOF

  # Every DT_NEEDED of every carried ELF must be carried or be a toolchain library.
  missing=""
  carried=$(find "$tmp" \( -type f -o -type l \) -name 'lib*.so*' -printf '%f\n' | sort -u)
  while IFS= read -r -d '' elf; do
    if ! head -c4 "$elf" | grep -q 'ELF'; then continue; fi
    for n in $(objdump -p "$elf" 2>/dev/null | awk '/NEEDED/{print $2}'); do
      if ! echo "$n" | grep -Eq "$BASE_SONAMES" && ! echo "$carried" | grep -qxF "$n"; then
        missing+="$(basename "$elf") needs $n"$'\n'
      fi
    done
  done < <(find "$tmp" -type f \( -name '*.so*' -o -path '*/usr/bin/*' \) -print0)
  [ -z "$missing" ] || die "carried libraries need sonames that are not carried:"$'\n'"$missing"
  # (objdump fails on the scripts among them, e.g. pcre2-config: that must not end the script)
  glibc=$({ find "$tmp" -type f \( -name '*.so*' -o -path '*/usr/bin/*' \) -exec objdump -T {} + 2>/dev/null || true; } \
          | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -n1)

  # Sonames of the carried shared libraries (env.sh offers the host only those it lacks).
  while IFS= read -r -d '' so; do
    n=$(objdump -p "$so" 2>/dev/null | awk '/SONAME/{print $2}')
    if [ -n "$n" ] && [ -e "$(dirname "$so")/$n" ]; then echo "$n ${so#"$tmp"/}"; fi  # (a failed test must not end the loop's status)
  done < <(find "$tmp/usr/lib" -type f -name 'lib*.so*' ! -name 'libopenblas*' -print0) | sort >"$tmp/SONAMES"

  # OpenBLAS is 36 MB as a file and 10 MB gzipped: store it gzipped (env.sh expands it on the machine that
  # builds). The symlinks to it go; env.sh recreates them next to the expanded copy.
  ob=$L/openblas-openmp
  real=$(basename "$(readlink -f "$ob/libopenblas.so.0")")
  rm -f "$ob/libopenblas.so" "$ob/libopenblas.so.0"
  gzip -n -6 "$ob/$real"
  echo "$real" >"$ob/EXPANDS_TO"

  # pkg-config wrapper and env.sh (both compute their own location: the tree is relocatable).
  mkdir -p "$DEPS/bin"
  cat >"$DEPS/bin/pkg-config" <<'EOF'
#!/bin/sh
# pkg-config for the carried prefix: the carried pkgconf, searching only the carried .pc files.
d=$(cd "$(dirname "$0")/.." && pwd)
: "${PKG_CONFIG_LIBDIR:=$d/root/usr/lib/x86_64-linux-gnu/pkgconfig:$d/root/usr/share/pkgconfig}"
export PKG_CONFIG_LIBDIR
LD_LIBRARY_PATH="$d/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/root/usr/bin/pkgconf" "$@"
EOF
  chmod +x "$DEPS/bin/pkg-config"
  rm -rf "$ROOT"
  mv "$tmp" "$ROOT"
  printf '%s' "$manifest" | while IFS='=' read -r p v; do
    f=$(deb_file "$p" "$v")
    echo "$p=$v $(sha256sum "$f" | cut -c1-16)"
  done >"$DEPS/MANIFEST"
  echo "max GLIBC symbol version needed: $glibc" >>"$DEPS/MANIFEST"
  echo "$stamp" >"$ROOT/.stamp"
  say "unpacked ${#PKGS[@]} packages into .deps/root (carried ELF files need at most $glibc)"
fi

# env.sh is rewritten every time (cheap; keeps it in step with this script).
cat >"$DEPS/env.sh" <<'EOF'
# shellcheck shell=bash disable=SC2034
# Source to build against the carried prefix (.deps/root, made by tools/prepare_gpu_deps.sh).
# In:  DPO_DEPS_LIBDIR  where OpenBLAS is expanded and the host-missing libraries are linked (default
#                       /tmp/dpo-deps-lib); it goes on LD_LIBRARY_PATH.
# Out: DPO_DEPS_ROOT, DPO_DEPS_LIBDIR, DPO_DEPS_SHADOWED (sonames taken from .deps because the host lacks them),
#      DPO_DEPS_CMAKE_ARGS (array) and the exported PATH, PKG_CONFIG, PKG_CONFIG_LIBDIR, CMAKE_PREFIX_PATH,
#      FONTCONFIG_FILE, LD_LIBRARY_PATH. Returns non-zero with a message if the tree is incomplete.
_dpo_deps=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DPO_DEPS_ROOT=$_dpo_deps/root
DPO_DEPS_LIBDIR=${DPO_DEPS_LIBDIR:-/tmp/dpo-deps-lib}
_dpo_l=$DPO_DEPS_ROOT/usr/lib/x86_64-linux-gnu
if [ ! -f "$DPO_DEPS_ROOT/.stamp" ] || [ ! -f "$DPO_DEPS_ROOT/SONAMES" ] || [ ! -f "$_dpo_l/openblas-openmp/EXPANDS_TO" ]; then
  echo "env.sh: $DPO_DEPS_ROOT is incomplete; run tools/prepare_gpu_deps.sh" >&2
  return 1
fi
mkdir -p "$DPO_DEPS_LIBDIR"
# A copy that lost the executable bits (some transfers do) still works.
[ -x "$_dpo_deps/bin/pkg-config" ] || chmod +x "$_dpo_deps/bin/pkg-config" "$DPO_DEPS_ROOT/usr/bin/pkgconf"
_dpo_ob=$(cat "$_dpo_l/openblas-openmp/EXPANDS_TO")
if [ ! -s "$DPO_DEPS_LIBDIR/$_dpo_ob" ] || [ "$_dpo_l/openblas-openmp/$_dpo_ob.gz" -nt "$DPO_DEPS_LIBDIR/$_dpo_ob" ]; then
  gzip -dc "$_dpo_l/openblas-openmp/$_dpo_ob.gz" >"$DPO_DEPS_LIBDIR/$_dpo_ob.tmp" &&
    mv "$DPO_DEPS_LIBDIR/$_dpo_ob.tmp" "$DPO_DEPS_LIBDIR/$_dpo_ob" || return 1
fi
ln -sfn "$_dpo_ob" "$DPO_DEPS_LIBDIR/libopenblas.so.0"
ln -sfn "$_dpo_ob" "$DPO_DEPS_LIBDIR/libopenblas.so"
# Runtime libraries: link into DPO_DEPS_LIBDIR only those whose soname the host's loader does not know, so that
# host programs started under this LD_LIBRARY_PATH keep their own (usually newer) zlib, expat, OpenSSL, ...
DPO_DEPS_SHADOWED=""
_dpo_ldc=$(command -v ldconfig || echo /sbin/ldconfig)
_dpo_known=$("$_dpo_ldc" -p 2>/dev/null | awk '/=>/{print $1}' | sort -u)
while read -r _dpo_n _dpo_f; do
  if ! printf '%s\n' "$_dpo_known" | grep -qxF "$_dpo_n"; then
    ln -sfn "$DPO_DEPS_ROOT/$_dpo_f" "$DPO_DEPS_LIBDIR/$_dpo_n"
    DPO_DEPS_SHADOWED+="$_dpo_n "
  fi
done <"$DPO_DEPS_ROOT/SONAMES"
export PATH="$_dpo_deps/bin:$PATH"
export PKG_CONFIG="$_dpo_deps/bin/pkg-config"
export PKG_CONFIG_LIBDIR="$_dpo_l/pkgconfig:$DPO_DEPS_ROOT/usr/share/pkgconfig"
unset PKG_CONFIG_PATH
export CMAKE_PREFIX_PATH="$DPO_DEPS_ROOT/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export FONTCONFIG_FILE="$DPO_DEPS_ROOT/etc/fonts/fonts.conf"
export LD_LIBRARY_PATH="$DPO_DEPS_LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DPO_DEPS_CMAKE_ARGS=(
  "-DDPO_OPENBLAS_LIB=$DPO_DEPS_LIBDIR/$_dpo_ob"
  "-DCBLAS_INCLUDE_DIR=$DPO_DEPS_ROOT/usr/include/x86_64-linux-gnu/openblas-openmp"
  "-DPKG_CONFIG_EXECUTABLE=$_dpo_deps/bin/pkg-config"
  "-DOPENSSL_ROOT_DIR=$DPO_DEPS_ROOT/usr"
)
unset _dpo_deps _dpo_l _dpo_ob _dpo_ldc _dpo_known _dpo_f _dpo_n
EOF

# COMMIT: the device machine gets a copy of the working tree without .git; gpu_check.sh reads this instead.
if command -v git >/dev/null && git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
  head=$(git -C "$REPO" rev-parse HEAD)
  changed=$(git -C "$REPO" status --porcelain --untracked-files=normal | grep -vc '^?? \.deps/' || true)
  diffsum=$( (git -C "$REPO" diff HEAD; git -C "$REPO" ls-files --others --exclude-standard -z | xargs -0 -r cat) \
             2>/dev/null | sha256sum | cut -c1-12)
  if [ "$changed" -gt 0 ]; then
    echo "$head + $changed uncommitted paths (content sha256 $diffsum), prepared $(date -u +%Y-%m-%dT%H:%MZ)" >"$DEPS/COMMIT"
  else
    echo "$head (clean), prepared $(date -u +%Y-%m-%dT%H:%MZ)" >"$DEPS/COMMIT"
  fi
  say "COMMIT: $(cat "$DEPS/COMMIT")"
fi

size_kib=$(du -sk "$DEPS" | cut -f1)
size_mib=$(( (size_kib + 1023) / 1024 ))
say ".deps is $size_mib MiB ($size_kib KiB), $(find "$DEPS" -type f | wc -l) files"
[ "$size_mib" -le "$MAX_MIB" ] || die ".deps is over $MAX_MIB MiB; the device tool carries 64 MiB in all"

# --- optional: prove that CMake resolves every dependency inside .deps ---------------------------------------------
if [ "$verify" = 1 ]; then
  vb=$REPO/build-depsverify
  rm -rf "$vb"
  mkdir -p "$vb"
  vlog=$vb/verify-configure.log
  export DPO_DEPS_LIBDIR=$vb/deps-lib
  # shellcheck source=/dev/null
  source "$DEPS/env.sh"
  say "verify: pkg-config --cflags --libs cairo fontconfig -> $(pkg-config --cflags --libs cairo fontconfig)"
  say "verify: configuring $vb with CMAKE_IGNORE_PREFIX_PATH=/usr;/ (system copies invisible to find_*)"
  cmake -S "$REPO" -B "$vb" -G Ninja -DDPO_ENABLE_CUDA=ON -DDPO_CUDA_ARCHITECTURES=90 \
        -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON "${DPO_DEPS_CMAKE_ARGS[@]}" \
        "-DCMAKE_IGNORE_PREFIX_PATH=/usr;/" "-DCMAKE_SYSTEM_IGNORE_PREFIX_PATH=/usr;/" >"$vlog" 2>&1 \
    || { tail -n 30 "$vlog"; die "verify: configure failed (log $vlog)"; }
  bad=0
  for key in yaml-cpp_DIR nlohmann_json_DIR CLI11_DIR GTest_DIR OPENSSL_INCLUDE_DIR OPENSSL_CRYPTO_LIBRARY \
             DPO_OPENBLAS_LIB CBLAS_INCLUDE_DIR PKG_CONFIG_EXECUTABLE pkgcfg_lib_CAIRO_cairo pkgcfg_lib_CAIRO_fontconfig \
             pkgcfg_lib_PCRE2_pcre2-8 pkgcfg_lib_UTF8PROC_utf8proc; do
    val=$(grep -E "^$key(:[A-Z]+)?=" "$vb/CMakeCache.txt" | head -n1 | cut -d= -f2-)
    case "$val" in
      "$DEPS"/*|"$DPO_DEPS_LIBDIR"/*) printf '  %-26s %s\n' "$key" "${val#"$REPO"/}" ;;
      "") printf '  %-26s (not in cache)\n' "$key" ;;
      *) printf '  %-26s %s   <-- OUTSIDE .deps\n' "$key" "$val"; bad=1 ;;
    esac
  done
  grep -E 'dpo: (BLAS|CUDA)' "$vlog" | sed 's/^/  /'
  [ "$bad" = 0 ] || die "verify: some dependencies resolved outside .deps"
  say "verify: every dependency resolved inside .deps (configure log $vlog)"
fi
