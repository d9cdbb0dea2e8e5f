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

/// mimalloc's arenas are aligned for 2 MiB pages; where the kernel's
/// transparent huge pages are "always" on, one such page would be more
/// than a sidecar's whole heap. `main.rs` opts the process out before its
/// first allocation.
#[cfg(target_os = "linux")]
#[test]
fn the_sidecar_opts_out_of_transparent_huge_pages() {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    if own.lines().any(|l| l == "THP_enabled:\t0") {
        println!(
            "SKIPPED: huge pages are already off for the tests (inherited), so the sidecar's opt-out cannot show"
        );
        return;
    }
    // A health port that never answers keeps `wait` running.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let health = silent.local_addr().unwrap().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["wait", "--health", &health, "--timeout", "30s"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Until the child has exec'd, its status is the test's own.
    let path = format!("/proc/{}/status", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let line = loop {
        let status = std::fs::read_to_string(&path).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("THP_enabled:"))
            .map(str::to_owned);
        if line.as_deref() != Some("THP_enabled:\t1") || std::time::Instant::now() > deadline {
            break line;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let Some(line) = line else {
        println!("SKIPPED: this kernel's /proc/PID/status has no THP_enabled line");
        return;
    };
    assert_eq!(
        line.split_whitespace().nth(1),
        Some("0"),
        "the sidecar left transparent huge pages on: {line}"
    );
}
