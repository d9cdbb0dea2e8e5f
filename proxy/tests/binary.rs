//! The sidecar binary as linked: what the loader does at every start.

/// Packed relative relocations (see `build.rs`): without them the loader
/// reads a ~650 KiB table at start, which stays resident in every sidecar.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_sidecar_binary_packs_its_relative_relocations() {
    let exe = env!("CARGO_BIN_EXE_mesh-proxy");
    let out = match std::process::Command::new("readelf")
        .args(["--dynamic", "--wide", exe])
        .output()
    {
        Ok(out) if out.status.success() => out,
        Ok(out) => panic!(
            "readelf --dynamic {exe}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            println!("SKIPPED: readelf (binutils) is not runnable here: {e}");
            return;
        }
    };
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic.contains("(RELR)"),
        "{exe} has no DT_RELR entry, so its relative relocations are unpacked:\n{dynamic}"
    );
}
