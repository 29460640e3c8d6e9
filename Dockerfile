# meshca's container image: the binary alone on a distroless base, as user 65532.
#   docker build -t meshca:0.1.0 .
# Build stage: the toolchain the project is tested with; protobuf is compiled in
# Rust (build.rs), so no protoc is needed. The `dist` profile is release without
# debug info, stripped (the release profile keeps line tables for local profiling).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --profile dist --locked --bin meshca

# Runtime: glibc and libgcc_s (what the binary links), CA certificates, no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/dist/meshca /meshca
USER 65532:65532
EXPOSE 8080 9990
ENTRYPOINT ["/meshca"]
