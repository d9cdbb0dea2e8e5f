//! The container images as a cluster runs them. `images/build` makes them
//! (buildah, on a distroless Debian base); umoci, an OCI implementation of
//! its own, unpacks them; and what is inside runs from the unpacked root
//! filesystems as a container runtime would start it (chroot, private
//! /dev and /proc, the container's user, the root filesystem read-only
//! as its securityContext says but for emptyDir mounts, the image's
//! environment):
//! - the control-plane image's three containers with the commands
//!   `meshctl install`'s Deployment gives them (minus `--kubernetes`: no
//!   API server runs here), the CA material where its Secret is mounted;
//! - the proxy image's entrypoint with the environment and files the
//!   injector gives the sidecar, carrying a request;
//! - the injected init container's `mesh-iptables` as root in a network
//!   namespace of its own, leaving the capture rules.
//!
//! All of it runs in a network namespace the test makes, as a pod's own.
//! The binaries are the dev profile's, as the workspace's test run built
//! them (the image build is the same for release, which takes minutes
//! more to compile).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use mesh_injector::{NamespacePolicy, Outcome};
use mesh_tests::bench::{target_dir, workspace};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn skip_reason() -> Option<String> {
    if !meshctl::pods::is_root() {
        return Some("needs root (debootstrap, buildah's chroot, network namespaces)".into());
    }
    let tools = [
        "debootstrap",
        "buildah",
        "umoci",
        "unshare",
        "ip",
        "strip",
        "curl",
    ];
    meshctl::pods::missing_tool(&tools).map(|why| format!("{why} (.ci/run installs it)"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An unpacked image: its root filesystem and its OCI runtime config.
struct Unpacked {
    rootfs: PathBuf,
    config: Value,
}

impl Unpacked {
    /// `OUT/NAME.oci.tar` unpacked by umoci into `dir/NAME`.
    fn new(out: &Path, name: &str, dir: &Path) -> Self {
        let layout = dir.join(format!("{name}-layout"));
        std::fs::create_dir_all(&layout).unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(out.join(format!("{name}.oci.tar")))
            .arg("-C")
            .arg(&layout));
        let bundle = dir.join(name);
        run(Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:mesh/{name}:{VERSION}", layout.display()))
            .arg(&bundle));
        let config: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        let rootfs = bundle.join("rootfs");
        // Where a runtime mounts /dev and /proc.
        for d in ["dev", "proc"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        Self { rootfs, config }
    }

    fn user(&self) -> (u64, u64) {
        let u = &self.config["process"]["user"];
        (u["uid"].as_u64().unwrap(), u["gid"].as_u64().unwrap())
    }

    fn env(&self) -> Vec<(String, String)> {
        self.config["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn entrypoint(&self) -> Vec<String> {
        self.config["process"]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    }

    /// `path` inside the image, as seen from outside: links are followed
    /// within the root filesystem (Debian's /var/run is a link to /run,
    /// which from outside would be this machine's own /run).
    fn inside(&self, path: &str) -> PathBuf {
        let mut at = self.rootfs.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let next = at.join(part);
            at = match std::fs::read_link(&next) {
                Ok(target) if target.is_absolute() => self.inside(target.to_str().unwrap()),
                Ok(target) => at.join(target),
                Err(_) => next,
            };
        }
        at
    }

    /// Writes `text` at `path` inside the image (a mounted Secret,
    /// ConfigMap or token), readable by the image's user.
    fn mount_file(&self, path: &str, text: &str) {
        let file = self.inside(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }

    /// The files of Secret volume `volume` of `pod` where its container
    /// mounts it, as kubelet writes them: root's, with the volume's
    /// `defaultMode` (0644 when unset); under the pod's fsGroup, of that
    /// group and readable by it.
    fn mount_secret(&self, pod: &PodSpec, volume: &str, files: &[(&str, &str)]) {
        use std::os::unix::fs::PermissionsExt;
        let secret = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .and_then(|v| v.secret.as_ref())
            .unwrap_or_else(|| panic!("no Secret volume {volume}"));
        let mount = pod
            .containers
            .iter()
            .flat_map(|c| c.volume_mounts.iter().flatten())
            .find(|m| m.name == volume)
            .unwrap_or_else(|| panic!("nothing mounts {volume}"));
        let fs_group = pod.security_context.as_ref().and_then(|s| s.fs_group);
        let mut mode = secret.default_mode.unwrap_or(0o644) as u32;
        if fs_group.is_some() {
            mode |= 0o440;
        }
        for (name, text) in files {
            self.mount_file(&format!("{}/{name}", mount.mount_path), text);
            let file = self.inside(&format!("{}/{name}", mount.mount_path));
            std::os::unix::fs::chown(&file, Some(0), Some(fs_group.unwrap_or(0) as u32)).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }

    /// `argv` run from the image as a runtime runs `container` of `pod`:
    /// its own mount namespace with /dev and /proc, the root filesystem
    /// read-only when the container's securityContext says so (but for
    /// its emptyDir mounts), chrooted, as the container's user (else the
    /// image's), with the image's environment plus `env`; in network
    /// namespace `netns` when given.
    fn command(
        &self,
        argv: &[String],
        container: &Container,
        pod: &PodSpec,
        env: &[(String, String)],
        netns: Option<&str>,
    ) -> Command {
        let security = container.security_context.as_ref();
        let (uid, gid) = match security.and_then(|s| s.run_as_user) {
            Some(u) => (
                u as u64,
                security.and_then(|s| s.run_as_group).unwrap_or(u) as u64,
            ),
            None => self.user(),
        };
        let read_only = security
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false);
        let writable: Vec<String> = container
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.read_only != Some(true))
            .filter(|m| {
                pod.volumes
                    .iter()
                    .flatten()
                    .any(|v| v.name == m.name && v.empty_dir.is_some())
            })
            .map(|m| self.inside(&m.mount_path).display().to_string())
            .collect();
        for w in &writable {
            std::fs::create_dir_all(w).unwrap();
        }
        let mut c = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        c.env_clear()
            .envs(self.env())
            .envs(env.iter().cloned())
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                r#"set -e; r=$1; u=$2; ro=$3; rw=$4; shift 4
IFS=:; for w in $rw; do mount --bind "$w" "$w"; done; unset IFS
if [ "$ro" = true ]; then mount --rbind "$r" "$r"; mount -o remount,bind,ro "$r"; fi
mount --rbind /dev "$r/dev"; mount -t proc proc "$r/proc"
exec chroot --userspec="$u" "$r" "$@""#,
            )
            .arg("sh")
            .arg(&self.rootfs)
            .arg(format!("{uid}:{gid}"))
            .arg(read_only.to_string())
            .arg(writable.join(":"))
            .args(argv);
        c
    }
}

/// Children and a network namespace, ended when the test ends, by PID.
struct Cleanup {
    children: Vec<Child>,
    netns: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn spawn(cleanup: &mut Cleanup, mut cmd: Command, log: &Path) {
    let log = std::fs::File::create(log).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    cleanup.children.push(child);
}

/// The Deployment's pod, as `meshctl install -o yaml` prints it.
fn control_plane_pod(certs: &meshctl::install::Certs) -> PodSpec {
    let manifests = meshctl::install::manifests(&meshctl::install::Options::default(), certs);
    let deployment = manifests
        .iter()
        .find(|m| m["kind"] == "Deployment")
        .expect("a Deployment");
    serde_json::from_value(deployment["spec"]["template"]["spec"].clone()).unwrap()
}

/// The pod after injection, as the API server would store it.
fn injected_pod() -> Pod {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app-0", "namespace": "default"},
        "spec": {"serviceAccountName": "app", "containers": [{"name": "app", "image": "app:1"}]},
    }))
    .unwrap();
    match mesh_injector::inject(
        &pod,
        "default",
        &NamespacePolicy::Enabled,
        &mesh_injector::Config::default(),
    )
    .unwrap()
    {
        Outcome::Injected(p) => *p,
        Outcome::Skipped(why) => panic!("not injected: {why}"),
    }
}

fn init_container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    pod.spec
        .as_ref()
        .unwrap()
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no init container {name}"))
}

fn read_logs(logs: &[&Path]) -> String {
    logs.iter()
        .map(|l| {
            let text = std::fs::read_to_string(l).unwrap_or_default();
            format!("{}:\n{text}\n", l.display())
        })
        .collect()
}

async fn until_ok(http: &reqwest::Client, url: &str, what: &str, logs: &[&Path]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = http.get(url).send().await;
        if let Ok(r) = answer
            && r.status() == 200
        {
            return r.text().await.unwrap();
        }
        if Instant::now() > deadline {
            panic!("{what} ({url}) never answered 200\n{}", read_logs(logs));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deletes a network namespace when the test ends.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn the_images_run_the_control_plane_and_the_injected_sidecar_as_deployed() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    // The Debian base is kept between runs under target/ (debootstrap
    // once); everything else is built anew.
    let target = target_dir();
    let out = target.join("images-dev");
    // The binaries are the ones `cargo nextest run --workspace` built for
    // their own packages' tests; building them here would compile the
    // dependencies again with other features, for minutes, beside tests
    // that measure time.
    let bins = target.join("debug");
    let missing: Vec<&str> = [
        "mesh-citadel",
        "mesh-pilot",
        "mesh-injector",
        "mesh-proxy",
        "mesh-iptables",
    ]
    .into_iter()
    .filter(|b| !bins.join(b).is_file())
    .collect();
    let mut build = Command::new(workspace().join("images/build"));
    build.args(["--profile", "dev", "--out"]).arg(&out);
    if missing.is_empty() {
        build.arg("--no-build");
    } else {
        eprintln!("{missing:?} not built yet: images/build builds them (slow)");
    }
    run(&mut build);
    // The rest runs in a network namespace of its own, as a pod's: the
    // captured sidecar listens on every address there.
    let ns = Netns(format!("mesh-images-{}", std::process::id()));
    run(Command::new("ip").args(["netns", "add", &ns.0]));
    run(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]));
    let name = ns.0.clone();
    let outcome = std::thread::spawn(move || {
        meshctl::pods::enter(&name).unwrap();
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(as_deployed(out));
    })
    .join();
    drop(ns);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn as_deployed(out: PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cp = Unpacked::new(&out, "control-plane", dir.path());
    let proxy = Unpacked::new(&out, "proxy", dir.path());
    assert_eq!(cp.user(), (1337, 1337), "the control plane runs as 1337");
    assert_eq!(proxy.user(), (1337, 1337), "the sidecar runs as 1337");
    assert_eq!(proxy.entrypoint(), ["/usr/local/bin/mesh-proxy"]);

    // A loopback block of this test's own, as the other end-to-end tests.
    let (a, b) = mesh_tests::loopback_block();
    let ip = |last: u8| IpAddr::V4(Ipv4Addr::new(127, a, b, last));
    let cp_ip = ip(254);
    let mut cleanup = Cleanup {
        children: vec![],
        netns: None,
    };

    // The control plane: the Deployment's containers, each with its
    // command, its mounted Secrets and token, listening on this test's
    // loopback address instead of every address.
    let certs = meshctl::install::Certs::new(None, "cluster.local").unwrap();
    let pod_spec = control_plane_pod(&certs);
    let cacerts: Vec<(&str, &str)> = certs
        .cacerts
        .iter()
        .map(|(f, pem)| (f.as_str(), pem.as_str()))
        .collect();
    cp.mount_secret(&pod_spec, "cacerts", &cacerts);
    cp.mount_secret(
        &pod_spec,
        "injector-tls",
        &[
            ("tls.crt", &certs.webhook_chain),
            ("tls.key", &certs.webhook_key),
        ],
    );
    // The state emptyDir: writable by all.
    {
        use std::os::unix::fs::PermissionsExt;
        let state = cp.inside("/var/run/mesh");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    cp.mount_file(
        "/etc/mesh/config/app.yaml",
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: app-0, namespace: default}}
spec: {{address: "{pod_ip}", labels: {{app: app}}, serviceAccount: app}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: upstream, namespace: default}}
spec:
  hosts: [upstream.example]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: "{upstream_ip}"}}]
"#,
            pod_ip = ip(20),
            upstream_ip = ip(30)
        ),
    );
    let localize = |cmd: &[String]| -> Vec<String> {
        cmd.iter()
            .filter(|a| *a != "--kubernetes")
            .map(|a| {
                a.replace("0.0.0.0:", &format!("{cp_ip}:"))
                    .replace("127.0.0.1:", &format!("{cp_ip}:"))
            })
            .collect()
    };
    let container =
        |name: &str| -> &Container { pod_spec.containers.iter().find(|c| c.name == name).unwrap() };
    let command = |name: &str| -> Vec<String> {
        let c = container(name);
        let cmd = c.command.clone().unwrap();
        assert!(
            cp.rootfs.join("usr/local/bin").join(&cmd[0]).exists(),
            "the Deployment's {name} runs {}, which the image lacks",
            cmd[0]
        );
        localize(&cmd)
    };
    let citadel = command("citadel");
    // A token for pilot, minted by the image's citadel from the same state
    // (the cluster's would come from the API server).
    let state_args: Vec<String> = citadel
        .iter()
        .take_while(|a| *a != "serve")
        .cloned()
        .collect();
    let mint = |identity: String| -> String {
        let mut argv = state_args.clone();
        argv.extend(["mint-token".into(), "--identity".into(), identity]);
        run(&mut cp.command(&argv, container("citadel"), &pod_spec, &[], None))
            .trim()
            .to_string()
    };
    let pilot_token = mint(mesh_pilot::identity("cluster.local").to_string());
    cp.mount_file("/var/run/secrets/tokens/mesh-token", &pilot_token);
    let logs = dir.path();
    spawn(
        &mut cleanup,
        cp.command(&citadel, container("citadel"), &pod_spec, &[], None),
        &logs.join("citadel.log"),
    );
    let pilot = command("pilot");
    spawn(
        &mut cleanup,
        cp.command(&pilot, container("pilot"), &pod_spec, &[], None),
        &logs.join("pilot.log"),
    );
    let mut injector = command("injector");
    injector.extend(["--listen".into(), format!("{cp_ip}:15017")]);
    spawn(
        &mut cleanup,
        cp.command(&injector, container("injector"), &pod_spec, &[], None),
        &logs.join("injector.log"),
    );

    // The sidecar: the proxy image's entrypoint, with the injected
    // container's environment (field references as the kubelet resolves
    // them; the control plane's Service addresses as this test's), its
    // root certificate and token where the injected volumes mount them.
    let pod = injected_pod();
    let injected_spec = pod.spec.as_ref().unwrap();
    let sidecar = init_container(&pod, "mesh-proxy");
    assert!(
        sidecar.command.is_none() && sidecar.args.is_none(),
        "the injected sidecar relies on the image's entrypoint"
    );
    let pod_ip = ip(20);
    let mut env = vec![];
    for e in sidecar.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().unwrap().field_path.as_str() {
                "metadata.name" => "app-0".into(),
                "metadata.namespace" => "default".into(),
                "spec.serviceAccountName" => "app".into(),
                "status.podIP" => pod_ip.to_string(),
                other => panic!("field {other}"),
            },
            _ => panic!("env {} has no value", e.name),
        };
        let value = match e.name.as_str() {
            "PILOT_ADDR" => format!("{cp_ip}:15012"),
            "CA_ADDR" => format!("{cp_ip}:15011"),
            _ => value,
        };
        env.push((e.name.clone(), value));
    }
    let env_of = |name: &str| env.iter().find(|(k, _)| k == name).unwrap().1.clone();
    proxy.mount_file(&env_of("CA_ROOT_FILE"), certs.root_pem());
    proxy.mount_file(
        &env_of("CA_TOKEN_FILE"),
        &mint("spiffe://cluster.local/ns/default/sa/app".into()),
    );
    // The mesh's one upstream, outside the mesh.
    mesh_tests::bench::upstream(SocketAddr::new(ip(30), 8080))
        .await
        .unwrap();
    let sidecar_log = logs.join("sidecar.log");
    spawn(
        &mut cleanup,
        proxy.command(&proxy.entrypoint(), sidecar, injected_spec, &env, None),
        &sidecar_log,
    );

    let all_logs = [
        logs.join("citadel.log"),
        logs.join("pilot.log"),
        logs.join("injector.log"),
        sidecar_log.clone(),
    ];
    let all_logs: Vec<&Path> = all_logs.iter().map(|p| p.as_path()).collect();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // The injector serves its readiness over TLS with the certificate its
    // Secret holds, for the Service's name (curl checks it against the root).
    let root_file = dir.path().join("root-cert.pem");
    std::fs::write(&root_file, certs.root_pem()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut curl = Command::new("curl");
    curl.args(["-sf", "--max-time", "5", "--cacert"])
        .arg(&root_file)
        .arg("--resolve")
        .arg(format!("mesh-control-plane.mesh-system.svc:15017:{cp_ip}"))
        .arg("https://mesh-control-plane.mesh-system.svc:15017/healthz/ready");
    while !curl.status().unwrap().success() {
        assert!(
            Instant::now() < deadline,
            "the injector from the control-plane image never became ready over TLS\n{}",
            read_logs(&all_logs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ready means certificate from citadel and config from pilot, both
    // run from the control-plane image.
    until_ok(
        &http,
        &format!("http://{pod_ip}:15021/healthz/ready"),
        "the sidecar from the proxy image",
        &all_logs,
    )
    .await;
    let answer = http
        .get(format!("http://{pod_ip}:15001/"))
        .header("host", "upstream.example:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer.status(),
        200,
        "a request through the image's sidecar"
    );
    assert_eq!(answer.bytes().await.unwrap().len(), 1024);

    // The capture set-up: the injected init container's command, as root
    // (its securityContext), in a network namespace of its own.
    let init = init_container(&pod, "mesh-init");
    let ns = format!("mesh-image-{}", std::process::id());
    run(Command::new("ip").args(["netns", "add", &ns]));
    cleanup.netns = Some(ns.clone());
    let mut argv = init.command.clone().unwrap();
    argv.extend(init.args.clone().unwrap_or_default());
    run(&mut proxy.command(&argv, init, injected_spec, &[], Some(&ns)));
    let rules = run(&mut proxy.command(
        &["iptables-save".into(), "-t".into(), "nat".into()],
        init,
        injected_spec,
        &[],
        Some(&ns),
    ));
    for want in ["--to-ports 15001", "--to-ports 15006", "--uid-owner 1337"] {
        assert!(rules.contains(want), "no {want} in the rules:\n{rules}");
    }
}
