//! Compiles the `.proto` contracts with the pure-Rust `protox` compiler (no
//! `protoc` on the machine), then generates prost messages and tonic servers
//! and clients from the resulting descriptor set. The encoded descriptor set is
//! also written to `OUT_DIR` for server reflection.

use std::{env, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "igny8/billing/v1/billing.proto",
    "igny8/settings/v1/settings.proto",
];

fn strip_json_names(msg: &mut prost_types::DescriptorProto) {
    for field in &mut msg.field {
        field.json_name = None;
    }
    for nested in &mut msg.nested_type {
        strip_json_names(nested);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let mut served = fds.clone();
    for file in &mut served.file {
        for msg in &mut file.message_type {
            strip_json_names(msg);
        }
    }
    std::fs::write(out.join("igny8_descriptor.bin"), served.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
