//! Compiles `directory/v1` and `billing/v1` with the pure-Rust `protox` compiler (no system
//! protoc), generates tonic clients and servers from the descriptor set, and writes the encoded
//! descriptor set to OUT_DIR for server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &["directory/v1/directory.proto", "billing/v1/billing.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }

    let fds = protox::Compiler::new([&root])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(PROTOS)?
        .file_descriptor_set();

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
