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
    assert!(stdout.contains("[8/8]"), "{stdout}");
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
    // No sidecar or app of this demo (on 127.0.10.x; other tests use other
    // blocks) outlives it.
    let pids = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok());
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_meshctl")).unwrap();
    let proxy = exe.with_file_name("mesh-proxy");
    let leftovers: Vec<u32> = pids
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe || p == proxy)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("127.0.10."))
        })
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
    let run = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["demo", "--transparent", "--requests", "20", "--prometheus"])
        .arg("--run-dir")
        .arg(run.path())
        .output()
        .expect("meshctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("[8/8]") && stdout.contains("20 succeeded, 0 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("20 x client -> productpage"), "{stdout}");
    // The scrape config names each pod's merged metrics on its own address,
    // and Prometheus ran in the node's namespace when it is installed.
    let scrape = std::fs::read_to_string(run.path().join("prometheus.yml")).unwrap();
    assert!(scrape.contains("- targets: ['10.244."), "{scrape}");
    assert_eq!(scrape.matches(":15020']").count(), 8, "{scrape}");
    if meshctl::prometheus::find().is_some() {
        assert!(
            stdout.contains("Prometheus: http://10.244.0.1:9090"),
            "{stdout}"
        );
    } else {
        eprintln!("Prometheus is not installed: only its scrape config was checked");
    }
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
    // So are the hosts files that gave its pods cluster names.
    let pods: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.path().join("pods.json")).unwrap()).unwrap();
    let sleep = pods["pods"]["sleep"]
        .as_str()
        .expect("the sleep pod was recorded");
    assert!(!std::path::Path::new("/etc/netns").join(sleep).exists());
}

/// `meshctl demo --cert-ttl 4s --duration 12s` on a block of its own, with
/// `meshctl ca rotate` and `meshctl ca status -o json` run against it from
/// another process while requests flow: every certificate rotates a few
/// times, the root once, and no request fails.
#[test]
fn certificates_and_the_root_rotate_while_the_demo_serves() {
    let state = tempfile::tempdir().unwrap();
    let meshctl = env!("CARGO_BIN_EXE_meshctl");
    let (mut demo, lines, mut stdout) = demo_on_block(
        11,
        state.path(),
        &["--cert-ttl", "4s", "--duration", "12s"],
        "sending requests",
    );
    assert!(stdout.contains("certificates live 4s"), "{stdout}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let ca = |args: &[&str]| {
        let out = Command::new(meshctl)
            .arg("ca")
            .args(args)
            .args(["--ca-addr", "127.0.11.254:15011", "--state-dir"])
            .arg(state.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "meshctl ca {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let rotated = ca(&["rotate", "--timeout", "20s"]);
    assert!(
        rotated.contains("prepare:") && rotated.contains("switch:") && rotated.contains("commit:"),
        "{rotated}"
    );
    let status: serde_json::Value = serde_json::from_str(&ca(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["phase"], "steady");
    assert_eq!(status["roots"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["roots"][0]["role"], "signing");
    // 8 sidecars and pilot watch the bundle, all on the new root.
    let new_root = status["roots"][0]["sha256"].as_str().unwrap();
    let workloads = status["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 9, "{status}");
    assert!(
        workloads.iter().all(|w| w["cert_root_sha256"] == new_root),
        "{status}"
    );
    assert!(status["issued_total"].as_u64().unwrap() >= 10, "{status}");
    for line in lines {
        stdout.push_str(&line.unwrap());
        stdout.push('\n');
    }
    let exit = demo.wait().unwrap();
    assert!(exit.success(), "demo failed:\n{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    // Over 12 s with 4 s certificates, each of the 10 holders renews about
    // every 2 s: several rotations each (plus one for the root).
    let issued: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("certificates issued while requests ran: "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no issued count in:\n{stdout}"));
    assert!(
        issued >= 10 * 4,
        "only {issued} certificates issued:\n{stdout}"
    );
}

/// `meshctl demo --transparent` as a normal user: the pods are made inside
/// a user namespace of the demo's own, and sidecars are told apart by their
/// socket mark. Run here as `nobody` (CI runs tests as root).
#[test]
fn transparent_demo_runs_without_root() {
    let root = nix::unistd::Uid::effective().is_root();
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_meshctl"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_meshctl"))
    };
    // The same checks the demo makes, as the user it will run as.
    let probe = Command::new(if root { "setpriv" } else { "true" })
        .args(if root {
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "unshare",
                "--user",
                "--map-root-user",
                "--net",
                "--mount",
                "true",
            ][..]
        } else {
            &[][..]
        })
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: unprivileged user namespaces are not available here");
        return;
    }
    for tool in ["unshare", "ip", "iptables", "curl"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            eprintln!("SKIPPED: needs {tool}");
            return;
        }
    }
    let out = cmd
        .args(["demo", "--transparent", "--requests", "10"])
        .current_dir(std::env::temp_dir())
        .env("HOME", std::env::temp_dir())
        .env("TMPDIR", std::env::temp_dir())
        .output()
        .expect("meshctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rootless demo failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("inside a user namespace"), "{stdout}");
    assert!(stdout.contains("marking its sockets 0x539"), "{stdout}");
    assert!(
        stdout.contains("[8/8]") && stdout.contains("10 succeeded, 0 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("10 x client -> productpage"), "{stdout}");
}

/// Istio's request-routing task, step by step on the local mesh: a command
/// run as `sleep` reaches reviews by its short name through the sidecar;
/// `meshctl apply -f` routes every request to v3 within a second;
/// `meshctl delete -f` undoes it; a bad file changes nothing.
#[test]
fn apply_delete_and_exec_on_the_running_demo() {
    use std::time::{Duration, Instant};
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIPPED: curl is not installed (CI installs it)");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let meshctl = env!("CARGO_BIN_EXE_meshctl");
    let (mut demo, _lines, stdout) = demo_on_block(12, state.path(), &[], "running;");
    assert!(stdout.contains("mesh ready"), "{stdout}");
    let run = |args: &[&str]| {
        Command::new(meshctl)
            .args(args)
            .env("MESH_STATE_DIR", state.path())
            .output()
            .unwrap()
    };
    // The reviews version that answers, asked as sleep would ask it.
    let version = || {
        let out = run(&[
            "exec",
            "sleep",
            "--",
            "curl",
            "-s",
            "http://reviews:9080/reviews/0",
        ]);
        assert!(out.status.success(), "{out:?}");
        let body: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        body["version"].as_str().unwrap().to_string()
    };
    let seen: std::collections::BTreeSet<String> = (0..20).map(|_| version()).collect();
    assert!(seen.len() > 1, "the sample splits reviews: {seen:?}");
    // The command's own exit status comes back.
    assert_eq!(
        run(&["exec", "sleep", "--", "false"]).status.code(),
        Some(1)
    );

    let all_v3 = state.path().join("virtual-service-reviews-v3.yaml");
    std::fs::write(
        &all_v3,
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v3}
",
    )
    .unwrap();
    let applied = run(&["apply", "-f", all_v3.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&applied.stdout),
        "virtualservice.networking.istio.io/reviews configured\n",
        "{applied:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while version() != "v3" {
        assert!(
            Instant::now() < deadline,
            "the route never reached sleep's sidecar"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!((0..10).all(|_| version() == "v3"));

    // A broken file is refused whole and the route stays.
    let bad = state.path().join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&all_v3)
            .unwrap()
            .replace("hosts:", "hostz:"),
    )
    .unwrap();
    let refused = run(&["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("nothing was changed") && err.contains("hostz"),
        "{err}"
    );
    assert_eq!(version(), "v3");

    let deleted = run(&["delete", "-f", all_v3.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&deleted.stdout),
        "virtualservice.networking.istio.io/reviews deleted\n"
    );
    assert_eq!(
        run(&["delete", "-f", all_v3.to_str().unwrap()])
            .status
            .code(),
        Some(1),
        "deleting what is not there fails, as kubectl's does"
    );
    // No VirtualService: reviews is balanced over every version again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "still only {seen:?}");
        seen.insert(version());
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(demo.wait().unwrap().success());
}

/// `meshctl demo` with the sample moved to 127.0.`block`.* and its state in
/// `state`, run until it prints a line starting with `until`: the process,
/// the rest of its output, and what it printed so far.
fn demo_on_block(
    block: u8,
    state: &std::path::Path,
    extra: &[&str],
    until: &str,
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    String,
) {
    use std::io::{BufRead, BufReader};
    let config = state.join("config");
    std::fs::create_dir_all(&config).unwrap();
    for (name, text) in mesh_samples::CONFIG {
        let text = text.replace("127.0.10.", &format!("127.0.{block}."));
        std::fs::write(config.join(name), text).unwrap();
    }
    let mut demo = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .arg("demo")
        .args(extra)
        .args([
            "--control-plane-ip",
            &format!("127.0.{block}.254"),
            "--config",
        ])
        .arg(&config)
        .arg("--state-dir")
        .arg(state)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("meshctl runs");
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut stdout = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        stdout.push_str(&line);
        stdout.push('\n');
        if line.starts_with(until) {
            break;
        }
    }
    (demo, lines, stdout)
}
