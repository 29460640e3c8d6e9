//! Compiles proto/identity.proto with a pure-Rust protobuf compiler (protox), so a
//! fresh machine needs no system `protoc`. Generates both the server and the client
//! (the client backs `meshca certify` and the load generator).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/identity.proto");
    let descriptors = protox::compile(["proto/identity.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
