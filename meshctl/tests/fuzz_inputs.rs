//! Replays the config fuzz target's seeds (`pilot/fuzz/seeds`) and every input
//! it once crashed on (`pilot/fuzz/regressions`) through the target's own body,
//! so a crash found by fuzzing stays fixed in the default test run.

use std::path::Path;
use std::time::{Duration, Instant};

/// The files in `dir`, relative to the workspace root.
fn inputs(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn fuzz_seeds_and_past_crashes_load_without_panicking_or_hanging() {
    let seeds = inputs("pilot/fuzz/seeds");
    assert!(seeds.len() >= 5, "the seed corpus is gone: {seeds:?}");
    let samples = inputs("samples/config");
    for file in seeds
        .iter()
        .chain(&samples)
        .chain(&inputs("pilot/fuzz/regressions"))
    {
        let data = std::fs::read(file).unwrap();
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(|| meshctl::analyze::fuzz_config(&data));
        assert!(outcome.is_ok(), "{} panicked", file.display());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} took {:?}",
            file.display(),
            started.elapsed()
        );
    }
}

#[test]
fn the_sample_config_serves_whole() {
    // The demo's config seeds the fuzzer too: the target's path must serve
    // it with nothing rejected, or fuzzing would exercise only refusals.
    let mut text = String::new();
    for file in inputs("samples/config") {
        text.push_str("---\n");
        text.push_str(&std::fs::read_to_string(file).unwrap());
    }
    let (snapshot, rejected) = mesh_pilot::serve_text(&text).expect("the demo config serves");
    assert!(rejected.is_empty(), "{rejected:?}");
    assert!(
        snapshot.model.workloads.len() >= 4,
        "{:?}",
        snapshot.model.workloads.keys()
    );
}
