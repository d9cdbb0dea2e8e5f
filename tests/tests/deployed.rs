//! The sidecar binary as deployed (`cargo build-sidecar`, which CI runs
//! before the tests): linked statically, with the functions it runs laid
//! out first, so a sidecar maps little code it does not use.

use std::process::Command;

use mesh_tests::bench::{self, Layout};

#[test]
fn the_deployed_sidecar_is_static_with_the_code_it_runs_first() {
    let exe = bench::target_dir().join("sidecar/mesh-proxy");
    if !exe.is_file() {
        eprintln!(
            "SKIPPED: {} is not built; `cargo build-sidecar` builds it (CI does)",
            exe.display()
        );
        return;
    }
    let headers = Command::new("readelf")
        .args(["--program-headers", "--wide"])
        .arg(&exe)
        .output()
        .expect("readelf (binutils) runs");
    assert!(
        headers.status.success(),
        "readelf failed on {}",
        exe.display()
    );
    let headers = String::from_utf8_lossy(&headers.stdout);
    assert!(
        !headers.contains("INTERP"),
        "the deployed sidecar is linked dynamically (it names a program interpreter):\n{headers}"
    );

    let layout = Layout::of(&exe).expect("the sidecar's symbols and proxy/sidecar.order read");
    assert!(
        !layout.stale(),
        "only {} of the {} functions in proxy/sidecar.order are in the sidecar: the list is \
         stale; `cargo run --release -p mesh-tests --bin bench-dataplane -- --layout` writes \
         it afresh",
        layout.found,
        layout.listed
    );
    assert!(
        layout.span * 2 < layout.text,
        "the functions proxy/sidecar.order lists are spread over {} of the sidecar's {} bytes \
         of code, not laid out first",
        layout.span,
        layout.text
    );

    let help = Command::new(&exe)
        .arg("--help")
        .output()
        .expect("the sidecar runs");
    assert!(
        help.status.success(),
        "mesh-proxy --help failed: {}",
        String::from_utf8_lossy(&help.stderr)
    );
}
