//! `meshctl demo --requests 100`, run as a user runs it: the real binary,
//! each sidecar and app a child process on 127.0.10.x.

use std::process::Command;

#[test]
fn demo_with_requests_succeeds_over_mtls_and_cleans_up() {
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["demo", "--requests", "100", "--state-dir"])
        .arg(state.path())
        .output()
        .expect("meshctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("[7/7]"), "{stdout}");
    assert!(stdout.contains("100 requests in"), "{stdout}");
    assert!(stdout.contains("100 succeeded, 0 failed"), "{stdout}");
    for hop in [
        "client -> productpage",
        "productpage -> details",
        "productpage -> reviews",
        "reviews -> ratings",
    ] {
        assert!(stdout.contains(hop), "no {hop} hop in:\n{stdout}");
    }
    // Every version of reviews got traffic (40/30/30 split, 100 requests).
    for v in ["v1:", "v2:", "v3:"] {
        assert!(stdout.contains(v), "reviews {v} got nothing:\n{stdout}");
    }
    // No sidecar or app outlives the demo.
    let pids = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok());
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_meshctl")).unwrap();
    let leftovers: Vec<u32> = pids
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect();
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
}

#[test]
fn transparent_demo_with_requests_succeeds_and_leaves_nothing_behind() {
    if let Some(why) = meshctl::pods::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let netns_before = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap()
        .stdout;
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["demo", "--transparent", "--requests", "20"])
        .output()
        .expect("meshctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("[7/7]") && stdout.contains("20 succeeded, 0 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("20 x client -> productpage"), "{stdout}");
    // Its pods (network namespaces) are gone.
    let netns_after = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(
        String::from_utf8_lossy(&netns_after),
        String::from_utf8_lossy(&netns_before)
    );
}
