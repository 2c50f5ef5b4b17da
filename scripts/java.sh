#!/usr/bin/env bash
# Spark (`batch_score`) needs a Java 17+ runtime. `make setup` runs this script:
#   * a Java 17+ is found (JAVA_HOME, else `java` on PATH): nothing to do;
#   * none, run as root on a system with apt-get: installs the distribution's headless JRE once
#     (Debian 12 / Ubuntu 22.04+: OpenJDK 17 or newer), the way scripts/server.sh installs PostgreSQL;
#   * none otherwise: prints exactly what to install and exits 0, since every step but batch_score
#     runs without Java.
# E2E_JAVA_REQUIRED=1 turns "none" into exit 1 (for CI machines that must run batch_score).
set -euo pipefail

MIN_MAJOR=17
say() { echo "java.sh: $*" >&2; }

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then echo "$JAVA_HOME/bin/java"; return; fi
  command -v java || true
}

# `openjdk version "17.0.15"` -> 17; `java version "1.8.0_402"` -> 8.
major() {
  local v
  v="$("$1" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)"
  v="${v#1.}"
  echo "${v%%[.+_-]*}"
}

ok() {
  local bin m
  bin="$(java_bin)"
  [[ -n "$bin" ]] || return 1
  m="$(major "$bin")"
  [[ "$m" =~ ^[0-9]+$ && "$m" -ge "$MIN_MAJOR" ]] || { say "$bin is Java ${m:-?}; Spark 4 needs $MIN_MAJOR+"; return 1; }
  say "Java $m at $bin"
}

missing() {
  say "$1; batch_score (Spark) needs Java $MIN_MAJOR+: install it with 'sudo apt-get install -y default-jre-headless' (Debian 12, Ubuntu 22.04+) or 'sudo apt-get install -y openjdk-17-jre-headless', 'brew install openjdk@17' (macOS), or point JAVA_HOME at a Java $MIN_MAJOR+ runtime; then run make setup again"
  [[ "${E2E_JAVA_REQUIRED:-0}" == 1 ]] && exit 1
  exit 0
}

ok && exit 0
[[ "$(id -u)" == 0 ]] || missing "no Java $MIN_MAJOR+ runtime found and installing one needs root"
command -v apt-get >/dev/null || missing "no Java $MIN_MAJOR+ runtime found and this system has no apt-get"
log="$(mktemp -t java-apt.XXXXXX.log)"
say "installing the distribution's headless JRE with apt-get (once; log: $log)"
for pkg in default-jre-headless openjdk-17-jre-headless; do
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >>"$log" 2>&1 \
     || { DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1 \
          && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >>"$log" 2>&1; }; then
    hash -r
    ok && exit 0
  fi
done
tail -n 20 "$log" >&2
missing "apt-get could not install a Java $MIN_MAJOR+ runtime (log: $log)"
