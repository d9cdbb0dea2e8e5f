//! The capture rules loaded with the real iptables into a network namespace
//! owned by the test's thread (gone when the thread ends), and traffic sent
//! through them.

use std::process::Command;
use std::time::Duration;

use mesh_proxy::capture::{self, CaptureConfig, Family};
use mesh_proxy::platform::{Linux, Sockets};

fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (network namespace and iptables)".into());
    }
    for tool in ["iptables", "ip6tables", "ip", "setpriv", "timeout", "bash"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("needs {tool}"));
        }
    }
    None
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A connection attempt as the proxy's UID: says `connected` only if
/// something answered (the sidecar would, were it captured).
const AS_PROXY: [&str; 8] = [
    "--reuid=1337",
    "--regid=1337",
    "--clear-groups",
    "timeout",
    "1",
    "bash",
    "-c",
    "exec 3<>/dev/tcp/192.0.2.2/8080 && echo connected",
];

#[test]
fn capture_redirects_the_app_but_not_the_proxy_and_cleans_up() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        // A non-loopback destination that exists only in this namespace.
        sh("ip link set lo up && ip link add v0 type veth peer name v1 && ip addr add 192.0.2.1/24 dev v0 && ip link set v0 up && ip link set v1 up");
        let cfg = CaptureConfig::default();
        // Twice: the second load must not duplicate anything.
        capture::apply(&cfg, Family::V4).unwrap();
        capture::apply(&cfg, Family::V4).unwrap();
        let rules = sh("iptables -t nat -S");
        assert_eq!(rules.matches("-A OUTPUT -p tcp -j MESH_OUTPUT").count(), 1, "{rules}");
        assert_eq!(rules.matches("-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001").count(), 1, "{rules}");

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let sidecar = tokio::net::TcpListener::bind("0.0.0.0:15001").await.unwrap();
            // The app (root here, not UID 1337) is captured, and the sidecar
            // learns where it was going.
            let _app = tokio::net::TcpStream::connect("192.0.2.2:8080").await.unwrap();
            let (conn, _) = tokio::time::timeout(Duration::from_secs(2), sidecar.accept())
                .await
                .expect("the app's connection is captured")
                .unwrap();
            assert_eq!(Linux.original_dst(&conn), Some("192.0.2.2:8080".parse().unwrap()));
            // The proxy's own traffic (UID 1337) goes where it was sent.
            let proxy = tokio::process::Command::new("setpriv").args(AS_PROXY).output().await.unwrap();
            let said = String::from_utf8_lossy(&proxy.stdout).to_string();
            assert!(!said.contains("connected") && !proxy.status.success(), "UID 1337 was captured: {said}");
            let seen = tokio::time::timeout(Duration::from_millis(300), sidecar.accept()).await;
            assert!(seen.is_err(), "the sidecar saw the proxy's own connection");
        });

        capture::cleanup(Family::V4).unwrap();
        let rules = sh("iptables -t nat -S");
        assert!(!rules.contains("MESH_"), "left behind:\n{rules}");
        capture::cleanup(Family::V4).expect("cleaning up twice is harmless");
    })
    .join()
    .unwrap();
}

#[test]
fn ipv6_capture_and_a_marked_proxy_socket() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        sh("ip link set lo up && ip link add v0 type veth peer name v1 && ip -6 addr add 2001:db8::1/64 dev v0 nodad && ip link set v0 up && ip link set v1 up");
        // Rootless pods tell the proxy by its socket mark alone.
        let cfg = CaptureConfig {
            proxy_mark: Some(1337),
            mark_only: true,
            ..Default::default()
        };
        capture::apply(&cfg, Family::V6).unwrap();
        let rules = sh("ip6tables -t nat -S");
        assert!(rules.contains("-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001"), "{rules}");
        assert!(!rules.contains("uid-owner"), "{rules}");

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let sidecar = tokio::net::TcpListener::bind("[::]:15001").await.unwrap();
            let dst: std::net::SocketAddr = "[2001:db8::2]:8080".parse().unwrap();
            let _app = tokio::net::TcpStream::connect(dst).await.unwrap();
            let (conn, _) = tokio::time::timeout(Duration::from_secs(2), sidecar.accept())
                .await
                .expect("the app's IPv6 connection is captured")
                .unwrap();
            assert_eq!(Linux.original_dst(&conn), Some(dst));
            // The proxy's own socket, marked, goes where it was sent (nowhere
            // here: no one answers on 2001:db8::2).
            let marked = tokio::time::timeout(
                Duration::from_millis(500),
                mesh_identity::grpc::dial(dst, Some(1337)),
            )
            .await;
            assert!(!matches!(marked, Ok(Ok(_))), "the marked connection was captured");
            let seen = tokio::time::timeout(Duration::from_millis(300), sidecar.accept()).await;
            assert!(seen.is_err(), "the sidecar saw the proxy's marked connection");
        });
        capture::cleanup(Family::V6).unwrap();
        assert!(!sh("ip6tables -t nat -S").contains("MESH_"));
    })
    .join()
    .unwrap();
}
