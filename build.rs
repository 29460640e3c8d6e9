//! Compiles the protocol files with a pure-Rust protobuf compiler (protox), so a
//! fresh machine needs no system `protoc`: proto/identity.proto (Linkerd's identity
//! protocol, unchanged), proto/istio_ca.proto (Istio's certificate service) and
//! proto/trustbundle.proto (meshca's own `meshca.v1`).
//! Generates both the servers and the clients (the clients back `meshca certify`,
//! the agent and the load generator).

const PROTOS: [&str; 3] = ["proto/identity.proto", "proto/istio_ca.proto", "proto/trustbundle.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    // Every service and client decodes with meshca's codec (`wire::Codec`: a small
    // first buffer, which bounds what a stream that never sends its message holds).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::wire::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
