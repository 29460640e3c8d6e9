# meshca's container image: the binary alone on a distroless base, as user 65532.
#   docker build -t meshca:0.1.0 .
# Build stage: the toolchain the project is tested with; protobuf is compiled in
# Rust (build.rs), so no protoc is needed. Debug info is dropped from the image's
# binary (the release profile keeps line tables for local profiling).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN cargo build --release --locked --bin meshca

# Runtime: glibc and libgcc_s (what the binary links), CA certificates, no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/meshca /meshca
USER 65532:65532
EXPOSE 8080 9990
ENTRYPOINT ["/meshca"]
