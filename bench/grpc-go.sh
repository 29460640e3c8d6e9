#!/usr/bin/env bash
# Builds the grpc-go load client (bench/go/src/meshcagrpcload) and prints its path.
#
#   bench/grpc-go.sh        → target/bench-go/meshcagrpcload
#
# Offline, in GOPATH mode, against the grpc-go that Debian ships (no module
# downloads), as tests/transparency.rs builds its Go verifier. bench/run.sh calls it,
# then gives the client the requests `meshca-load --write-requests FILE` wrote.
set -euo pipefail
cd "$(dirname "$0")/.."

grpc=/usr/share/gocode/src/google.golang.org/grpc
if ! command -v go >/dev/null || [ ! -d "$grpc" ]; then
  echo "bench/grpc-go.sh: needs Go and Debian's grpc-go sources ($grpc):" >&2
  echo "  apt-get install -y golang-go golang-google-grpc-dev" >&2
  exit 1
fi
out=target/bench-go
mkdir -p "$out"
GOPATH="$PWD/bench/go:/usr/share/gocode" GO111MODULE=off GOFLAGS= GOCACHE="$PWD/$out/cache" \
  go build -o "$out/meshcagrpcload" meshcagrpcload
echo "$PWD/$out/meshcagrpcload"
