//! Links the sidecar binary with packed relative relocations (DT_RELR,
//! glibc 2.36 and later, as in the bookworm image): the ~650 KiB table of
//! relative relocations the loader reads at every start shrinks to ~7 KiB,
//! so each sidecar's resident set is that much smaller. Older GNU ld warns
//! about the option and ignores it.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=mesh-proxy=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
