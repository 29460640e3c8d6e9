#!/usr/bin/env bash
# The whole test suite from a fresh Debian machine that has only the Rust toolchain:
# installs what the tests need, builds the Windows binary the Wine test runs, runs
# clippy (warnings are errors), then `cargo test --locked`. Run from anywhere:
#
#     bash tests/run.sh
#
# Debian packages are installed with apt-get (through sudo when not root), the PyPI
# package with pip for the current user's python3, the Rust target with rustup.
# Everything already present is left alone, so a second run goes straight to cargo.
# Extra arguments go to `cargo test` (e.g. `bash tests/run.sh --test cli`).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'tests/run.sh: %s\n' "$*" >&2; }

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { say "not root and no sudo: install the packages below by hand"; exit 1; }
    sudo=(sudo)
fi

# Debian packages, by the command each test calls:
#   openssl, curl                  independent verifier and HTTP client (tests/interop.rs, tests/cli.rs, ...)
#   certtool (gnutls-bin)          GnuTLS verifier (tests/windows_profile.rs)
#   vfychain, certutil (libnss3-tools)  NSS verifier (tests/windows_profile.rs)
#   prlimit (util-linux)           a lowered file size limit (tests/faults.rs, tests/file_size_limit.rs)
#   python3-pip                    to install kubernetes-validate
#   x86_64-w64-mingw32-gcc (gcc-mingw-w64-x86-64)  links the Windows binary (tests/wine.rs)
#   wine64                         runs it (tests/wine.rs): the 64-bit loader only, no recommends
#   go (golang-go), golang-golang-x-mod-dev  Go's sumdb/note and sumdb/tlog, the independent
#                                  checker of the audit log's checkpoints and proofs (tests/transparency.rs)
#   softhsm2                       a real PKCS#11 token for issuer keys that stay in it (tests/token.rs)
#   golang-google-grpc-dev         grpc-go, the benchmark's second client (bench/go; tests/grpc_go.rs)
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have openssl || need+=(openssl)
have curl || need+=(curl)
have certtool || need+=(gnutls-bin)
{ have vfychain && have certutil; } || need+=(libnss3-tools)
have prlimit || need+=(util-linux)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
have x86_64-w64-mingw32-gcc || need+=(gcc-mingw-w64-x86-64)
{ [ -x /usr/lib/wine/wine64 ] || have wine64; } || need+=(wine64)
have go || need+=(golang-go)
[ -d /usr/share/gocode/src/golang.org/x/mod/sumdb/tlog ] || need+=(golang-golang-x-mod-dev)
{ have softhsm2-util && [ -f /usr/lib/softhsm/libsofthsm2.so ]; } || need+=(softhsm2)
[ -d /usr/share/gocode/src/google.golang.org/grpc ] || need+=(golang-google-grpc-dev)
if [ "${#need[@]}" -gt 0 ]; then
    say "installing Debian packages: ${need[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# tests/deploy.rs: kubectl renders the kustomize trees in deploy/; kubernetes-validate
# checks them against the Kubernetes schemas, offline. Debian's kubernetes-client
# (1.20, kustomize v2) cannot render the overlays, so kubectl is the one prerequisite
# this script cannot install.
if ! have kubectl; then
    say "kubectl is not installed, and Debian's kubernetes-client (1.20) is too old for deploy/'s overlays: install kubectl v1.27 or later (https://kubernetes.io/docs/tasks/tools/) and run again"
    exit 1
fi
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
    say "installing the PyPI package kubernetes-validate"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'kubernetes-validate==1.37.0' \
        || python3 -m pip install --quiet --disable-pip-version-check --user --break-system-packages 'kubernetes-validate==1.37.0'
fi

# tests/wine.rs: the Windows binary, built exactly as docs/agent.md tells operators
# to build it (the `dist` profile: stripped, no debug info), and next to it the
# test-only stand-in for bcryptprimitives.dll that Wine 8 lacks (Windows has it).
windows_target=x86_64-pc-windows-gnu
if ! rustup target list --installed | grep -qx "$windows_target"; then
    say "adding the Rust target $windows_target"
    rustup target add "$windows_target"
fi

# Lints are part of the build: warnings fail.
cargo clippy --locked --workspace --all-targets -- -D warnings

cargo build --locked --profile dist --target "$windows_target" --bin meshca
x86_64-w64-mingw32-gcc -shared -O2 -o "${CARGO_TARGET_DIR:-target}/$windows_target/dist/bcryptprimitives.dll" \
    tests/wine/bcryptprimitives.c -ladvapi32

cargo test --locked "$@"
