//! Compiles the mesh's .proto files. protoc comes from the protoc-bin-vendored
//! crate unless PROTOC is set, so a fresh machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: the build script is single-threaded here; nothing reads the env concurrently.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let files = [
        "proto/istio/v1/auth/ca.proto",
        "proto/envoy/service/discovery/v3/ads.proto",
        "proto/mesh/v1/resources.proto",
        "proto/mesh/v1/ca.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    // The mesh's own resources serialize to JSON for the admin config dump.
    tonic_prost_build::configure()
        .codec_path("crate::LeanCodec")
        .type_attribute(".mesh.v1", "#[derive(serde::Serialize)]")
        .compile_protos(&files, &["proto"])?;
    Ok(())
}
