#!/usr/bin/env bash
# System packages from Debian: the default corpus (fortunes), chromium for the browser tests, and
# postgresql for the annotation tests' PostgreSQL runs (scripts/with-postgres.sh starts a server).
# Usage: scripts/system-deps.sh [corpus] [browser] [postgres]
set -euo pipefail
need=()
for what in "$@"; do
  case "$what" in
    corpus)  [ -d /usr/share/games/fortunes ] || [ -n "${ALIGNLOOP_FORTUNES_DIR:-}" ] || need+=(fortunes) ;;
    browser) [ -x /usr/bin/chromium ] || need+=(chromium) ;;
    postgres) compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql) ;;
  esac
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" >/dev/null
elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
  sudo apt-get update -qq >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "warning: please install ${need[*]} (Debian/Ubuntu: apt-get install ${need[*]})," \
       "or point ALIGNLOOP_FORTUNES_DIR at a corpus directory" >&2
fi
