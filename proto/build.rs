//! Compiles the mesh and public API protos. `protoc` comes from the
//! `protoc-bin-vendored` crate so a fresh machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; set_var is only unsafe in edition 2024
    // because of other threads, and there are none here.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    let mesh = "switchboard/mesh/v1/mesh.proto";
    let api = "switchboard/api/v1/messaging.proto";
    for f in [mesh, api] {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure().compile_protos(&[mesh], &["."])?;
    // The public API's descriptors, for server reflection (the mesh's stay
    // out of it: they are not for callers).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("switchboard_api_v1.bin"))
        .compile_protos(&[api], &["."])?;
    Ok(())
}
