//! Link options for the sidecar binary (`mesh-proxy`) on Linux with glibc.
//!
//! - Packed relative relocations (DT_RELR, glibc 2.36 and later, as in the
//!   bookworm image): the ~650 KiB table of relative relocations the loader
//!   reads at every start shrinks to ~7 KiB, so each sidecar's resident set
//!   is that much smaller. Older GNU ld warns about the option and ignores it.
//! - On x86-64, where rustc links with its own lld: the functions named in
//!   `sidecar.order` first, in that order. They are the ones a sidecar runs
//!   (at start-up and serving), as `bench-dataplane --layout` records them.
//!   The kernel maps code in 64 KiB windows around each page touched, so
//!   with hot and cold functions interleaved nearly the whole text became
//!   resident; packed together, little more than what runs is. Names the
//!   build does not have (another toolchain, other dependency versions) are
//!   skipped without a word; the file then only helps less. A build that
//!   names its own linker (or turns lld off) goes without the layout.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=mesh-proxy=-Wl,-z,pack-relative-relocs");
        // lld only (GNU ld has no such option): not when the build names a
        // linker of its own or turns rustc's lld off.
        let own_linker = std::env::var_os("RUSTC_LINKER").is_some()
            || std::env::var("CARGO_ENCODED_RUSTFLAGS").is_ok_and(|f| f.contains("linker"));
        if arch == "x86_64" && !own_linker {
            let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it");
            println!(
                "cargo:rustc-link-arg-bin=mesh-proxy=-Wl,--symbol-ordering-file={dir}/sidecar.order"
            );
            println!("cargo:rustc-link-arg-bin=mesh-proxy=-Wl,--no-warn-symbol-ordering");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=sidecar.order");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
}
