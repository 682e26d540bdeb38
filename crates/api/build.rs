//! Generates the proxy API from `proto/` with protox, so no system `protoc` is needed.
//!
//! Proto `map`s become `BTreeMap`s: they then encode in key order, so equal
//! messages encode to equal bytes (what `Config::content_hash` hashes). The
//! descriptor set is kept for the tests that walk every field.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/trellis/proxy/v1/proxy.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("proxy_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .btree_map(".")
        // Small initial stream buffers: see src/codec.rs.
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
