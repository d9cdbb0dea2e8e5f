//! Pods as Kubernetes builds them: each pod a network namespace with its
//! own veth and IP, joined by a bridge in its node's namespace; node N
//! bridges 10.244.N.0/24, and nodes are routed to each other through node 0
//! like an L3 CNI. A pod lands on the node its address names. Everything is
//! deleted (processes by PID first) on drop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// Node 0's bridge address (where the control plane listens); node N's is
/// 10.244.N.1, and its pods get addresses in 10.244.N.0/24.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

fn node_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n, 1)
}

/// Why pod tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces, veth, iptables)".into());
    }
    missing_tool(&["ip", "iptables", "setpriv", "curl"])
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// `needs <tool>` for the first of `tools` not on the PATH.
pub fn missing_tool(tools: &[&str]) -> Option<String> {
    tools.iter().find_map(|tool| {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        (!found).then(|| format!("needs {tool}"))
    })
}

/// Set for a meshctl re-run as root of its own user, network and mount
/// namespaces ([`reexec_rootless`]): pods then tell the sidecar's traffic
/// by its socket mark, since no other UID than root is mapped there.
pub const ROOTLESS_ENV: &str = "MESH_ROOTLESS";
/// The socket mark rootless sidecars carry and their capture rules exempt.
pub const PROXY_MARK: u32 = 1337;

/// Whether this process is the rootless re-run.
pub fn rootless() -> bool {
    std::env::var_os(ROOTLESS_ENV).is_some()
}

/// Why pods cannot be made without root here, or `None` if they can: a
/// normal user needs unprivileged user namespaces, iproute2, iptables and
/// curl.
pub fn rootless_skip_reason() -> Option<String> {
    if let Some(missing) = missing_tool(&["unshare", "ip", "iptables", "curl"]) {
        return Some(missing);
    }
    let userns = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--mount", "true"])
        .output();
    match userns {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "cannot create a user namespace ({}); enable unprivileged user namespaces or run as root",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

/// Runs this program again with `args`, as root of new user, network and
/// mount namespaces with a private tmpfs on /run (where `ip netns` keeps
/// its namespaces): everything it creates vanishes with it.
pub fn reexec_rootless(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> anyhow::Result<std::process::ExitStatus> {
    let exe = std::env::current_exe()?;
    Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--net",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-ec",
            "mount -t tmpfs tmpfs /run; exec \"$@\"",
            "sh",
        ])
        .arg(exe)
        .args(args)
        .env(ROOTLESS_ENV, "1")
        .status()
        .context("running unshare")
}

fn sh(script: &str) -> anyhow::Result<()> {
    let out = Command::new("sh").args(["-ec", script]).output()?;
    if !out.status.success() {
        bail!("{script}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub struct Node {
    tag: String,
    /// Nodes made so far (node 0 always).
    nodes: Vec<u8>,
    pods: Vec<String>,
    /// veth pairs made so far: names are never reused, since a deleted
    /// pod's veth vanishes asynchronously and may still hold its name.
    links: usize,
    children: Vec<Child>,
    /// What each pod's `/etc/hosts` says (see [`Node::set_hosts`]).
    hosts: Option<String>,
    /// `/etc/netns/<pod>` directories made, removed on drop.
    etc: Vec<PathBuf>,
}

/// How old a namespace of ours with no process in it must be before it is
/// taken for a crashed run's leftover (a younger one may be a run still
/// setting up its pods).
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The prefix of every namespace this module makes.
pub const PREFIX: &str = "mt-";

/// Deletes network namespaces whose names start with `prefix` (`PREFIX`
/// or narrower), that no process uses and that are older than
/// `older_than`; returns their names. Namespaces some process still uses
/// belong to a live run and are left alone.
pub fn remove_stale(prefix: &str, older_than: std::time::Duration) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Ok(removed);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with(prefix) {
            continue;
        }
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_none_or(|a| a < older_than) {
            continue;
        }
        let pids = Command::new("ip").args(["netns", "pids", &name]).output()?;
        if !String::from_utf8_lossy(&pids.stdout).trim().is_empty() {
            continue;
        }
        sh(&format!("ip netns del {name}"))?;
        removed.push(name);
    }
    Ok(removed)
}

impl Node {
    /// Creates node 0's namespace and bridge, first deleting (and naming)
    /// namespaces a crashed run left behind.
    pub fn new() -> anyhow::Result<Self> {
        for ns in remove_stale(PREFIX, STALE_AFTER)? {
            eprintln!(
                "removed network namespace {ns}, left behind by an earlier run that did not finish"
            );
        }
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let mut node = Self {
            tag,
            nodes: vec![],
            pods: vec![],
            links: 0,
            children: vec![],
            hosts: None,
            etc: vec![],
        };
        node.add_node(0)?;
        Ok(node)
    }

    /// Node 0's namespace (where the control plane runs).
    pub fn namespace(&self) -> String {
        self.node_namespace(0)
    }

    pub fn node_namespace(&self, n: u8) -> String {
        if n == 0 {
            format!("mt-{}-node", self.tag)
        } else {
            format!("mt-{}-node{n}", self.tag)
        }
    }

    /// Creates node `n`: its namespace and bridge, and for n > 0 a link to
    /// node 0 (10.245.n.1 <-> 10.245.n.2) with routes both ways.
    fn add_node(&mut self, n: u8) -> anyhow::Result<()> {
        let ns = self.node_namespace(n);
        let ip = node_ip(n);
        // Registered first, so that a half-made node is deleted too.
        self.nodes.push(n);
        sh(&format!(
            "ip netns add {ns}; ip -n {ns} link set lo up; ip -n {ns} link add br0 type bridge; \
             ip -n {ns} addr add {ip}/24 dev br0; ip -n {ns} link set br0 up; \
             ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1"
        ))?;
        if n > 0 {
            let (zero, tag) = (self.namespace(), &self.tag);
            sh(&format!(
                "ip link add mn{tag}{n}a type veth peer name mn{tag}{n}b; \
                 ip link set mn{tag}{n}a netns {zero}; ip link set mn{tag}{n}b netns {ns}; \
                 ip -n {zero} addr add 10.245.{n}.1/24 dev mn{tag}{n}a; ip -n {zero} link set mn{tag}{n}a up; \
                 ip -n {ns} addr add 10.245.{n}.2/24 dev mn{tag}{n}b; ip -n {ns} link set mn{tag}{n}b up; \
                 ip -n {zero} route add 10.244.{n}.0/24 via 10.245.{n}.2; \
                 ip -n {ns} route add default via 10.245.{n}.1"
            ))
            .with_context(|| format!("linking node {n} to node 0"))?;
        }
        Ok(())
    }

    pub fn pod_namespace(&self, pod: &str) -> String {
        format!("mt-{}-{pod}", self.tag)
    }

    /// Creates a pod: a namespace with `eth0` at `ip` on the bridge of the
    /// node its address names (10.244.N.x is on node N, made if needed).
    pub fn add_pod(&mut self, pod: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
        let [a, b, n, _] = ip.octets();
        if (a, b) != (10, 244) {
            bail!("pod {pod}: address {ip} is not in 10.244.0.0/16");
        }
        if !self.nodes.contains(&n) {
            self.add_node(n)?;
        }
        let gateway = node_ip(n);
        let (ns, node) = (self.pod_namespace(pod), self.node_namespace(n));
        let i = self.links;
        self.links += 1;
        let (host, peer) = (format!("mh{}{i}", self.tag), format!("mp{}{i}", self.tag));
        // Registered first, so that a half-made pod is deleted too.
        self.pods.push(ns.clone());
        sh(&format!(
            "ip netns add {ns}; ip link add {host} type veth peer name {peer}; \
             ip link set {host} netns {node}; ip link set {peer} netns {ns}; \
             ip -n {node} link set {host} master br0; ip -n {node} link set {host} up; \
             ip -n {ns} link set {peer} name eth0; ip -n {ns} addr add {ip}/24 dev eth0; \
             ip -n {ns} link set eth0 up; ip -n {ns} link set lo up; \
             ip -n {ns} route add default via {gateway}"
        ))
        .with_context(|| format!("creating pod {pod}"))?;
        self.write_hosts(&ns)
    }

    /// Names every pod made from now on resolves, as cluster DNS would:
    /// written to `/etc/netns/<pod>/hosts`, which `ip netns exec` shows a
    /// command in the pod as `/etc/hosts` (so `meshctl exec sleep -- curl
    /// http://reviews:9080/` works). Only as root: a run without root
    /// cannot write `/etc`, and its pods resolve nothing.
    pub fn set_hosts(&mut self, hosts: String) {
        self.hosts = Some(hosts);
    }

    fn write_hosts(&mut self, ns: &str) -> anyhow::Result<()> {
        let Some(hosts) = &self.hosts else {
            return Ok(());
        };
        if rootless() {
            return Ok(());
        }
        let dir = Path::new("/etc/netns").join(ns);
        self.etc.push(dir.clone());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), hosts)
            .with_context(|| format!("writing {}/hosts", dir.display()))
    }

    /// Deletes a pod's namespace (its veth goes with it).
    pub fn delete_pod(&mut self, pod: &str) -> anyhow::Result<()> {
        let ns = self.pod_namespace(pod);
        sh(&format!("ip netns del {ns}"))?;
        self.pods.retain(|p| *p != ns);
        Ok(())
    }

    /// Runs `argv` inside a pod to completion.
    pub fn run(&self, pod: &str, argv: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.pod_namespace(pod)])
            .args(argv)
            .output()?)
    }

    /// Starts `argv` inside a pod; its output goes to `log`. Stopped on drop.
    pub fn spawn(&mut self, pod: &str, argv: &[&str], log: &Path) -> anyhow::Result<()> {
        let out = std::fs::File::create(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.pod_namespace(pod)])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {argv:?} in {pod}"))?;
        self.children.push(child);
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .rev()
            .map(|n| self.node_namespace(*n))
            .collect();
        for ns in self.pods.drain(..).chain(nodes) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        for dir in self.etc.drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Moves the calling thread (only) into a named network namespace.
pub fn enter(namespace: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{namespace}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// The sample's 127.0.10.N addresses as pod addresses on two nodes:
/// reviews-v3 (.6) and ratings (.7) on node 1 (10.244.1.1N), the rest on
/// node 0 (10.244.0.1N), so that some hops cross nodes.
pub fn pod_config(text: &str) -> String {
    text.replace("127.0.10.6", "10.244.1.16")
        .replace("127.0.10.7", "10.244.1.17")
        .replace("127.0.10.", "10.244.0.1")
}

/// `/etc/hosts` for a pod: each service's first VIP under the names a pod
/// in its namespace would resolve through cluster DNS (`reviews`,
/// `reviews.default`, `reviews.default.svc`, the full name), or under its
/// host alone for a host outside `.svc.cluster.local`.
fn hosts_file(model: &mesh_pilot::model::Model) -> String {
    let mut out = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for s in model.services.values() {
        let Some(vip) = s.vips.first() else { continue };
        match s.host.strip_suffix(".svc.cluster.local") {
            Some(name_ns) => {
                let short = name_ns.split('.').next().unwrap_or(name_ns);
                out.push_str(&format!(
                    "{vip} {short} {name_ns} {name_ns}.svc {}\n",
                    s.host
                ));
            }
            None => out.push_str(&format!("{vip} {}\n", s.host)),
        }
    }
    out
}

/// A mesh whose workloads are pods with captured traffic. `exe` runs what
/// a pod runs (`capture`, `proxy`, `app` subcommands: meshctl itself or
/// the tests' mesh-pod); sidecars run `proxy_exe` when given.
pub struct PodMesh {
    pub node: Node,
    pub cp: crate::controlplane::ControlPlane,
    pub specs: Vec<crate::workloads::WorkloadSpec>,
    pub logs: std::path::PathBuf,
}

impl PodMesh {
    /// Starts the control plane, then every workload in its own pod. Call
    /// it on a thread inside the node's namespace ([`enter`]): the control
    /// plane listens on the node's bridge address.
    pub async fn start(
        mut node: Node,
        state_dir: &Path,
        config_dir: &Path,
        exe: &Path,
        proxy_exe: Option<&Path>,
    ) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        // Sidecars run as UID 1337 and read their files from here.
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o755))?;
        let specs = crate::workloads::from_config(config_dir)?;
        let set = mesh_pilot::store::load_dir(config_dir)?;
        let model = mesh_pilot::model::Model::build(&set, mesh_identity::DEFAULT_TRUST_DOMAIN)
            .map_err(|e| anyhow::anyhow!("config is invalid: {}", e.join("; ")))?;
        // Cluster DNS, as the apps see it: a service's short name is its VIP.
        let resolve: Vec<String> = model
            .services
            .values()
            .filter_map(|s| {
                Some(format!(
                    "--resolve={}={}",
                    s.host.split('.').next()?,
                    s.vips.first()?
                ))
            })
            .collect();
        node.set_hosts(hosts_file(&model));
        let cp = crate::controlplane::ControlPlane::start(
            state_dir,
            config_dir,
            std::net::IpAddr::V4(NODE_IP),
        )
        .await?;
        let logs = state_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let exe_s = exe.to_string_lossy().to_string();
        for w in &specs {
            let std::net::IpAddr::V4(ip) = w.address else {
                bail!("{}: pods need an IPv4 WorkloadEntry address", w.name);
            };
            node.add_pod(&w.name, ip)?;
            let mark = format!("--proxy-mark={PROXY_MARK}");
            let capture: &[&str] = if rootless() {
                &[&exe_s, "capture", &mark, "--mark-only"]
            } else {
                &[&exe_s, "capture"]
            };
            let out = node.run(&w.name, capture)?;
            if !out.status.success() {
                bail!(
                    "capture set-up in {}: {}",
                    w.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let id = mesh_identity::SpiffeId::new(
                cp.citadel.trust_domain(),
                &w.namespace,
                &w.service_account,
            );
            let token = state_dir.join(format!("{}.token", w.name));
            std::fs::write(&token, cp.token_for(&id))?;
            // As root, the sidecar runs as UID 1337, which the capture rules
            // exempt; rootless, only root is mapped, so it marks its sockets.
            let mut args: Vec<String> = Vec::new();
            if !rootless() {
                std::os::unix::fs::chown(
                    &token,
                    Some(mesh_proxy::capture::PROXY_UID),
                    Some(mesh_proxy::capture::PROXY_UID),
                )?;
                args.extend([
                    "setpriv".into(),
                    format!("--reuid={}", mesh_proxy::capture::PROXY_UID),
                    format!("--regid={}", mesh_proxy::capture::PROXY_UID),
                    "--clear-groups".into(),
                ]);
            }
            match proxy_exe {
                Some(p) => args.push(p.to_string_lossy().to_string()),
                None => args.extend([exe_s.clone(), "proxy".into()]),
            }
            args.extend([
                format!("--workload={}", w.name),
                format!("--namespace={}", w.namespace),
                format!("--service-account={}", w.service_account),
                format!("--pod-ip={ip}"),
                format!("--pilot-addr={}", cp.pilot_addr),
                format!("--ca-addr={}", cp.ca_addr),
                format!("--ca-root-file={}", cp.root_file.display()),
                format!("--token-file={}", token.display()),
                "--capture".into(),
            ]);
            if rootless() {
                args.push(format!("--proxy-mark={PROXY_MARK}"));
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            node.spawn(&w.name, &argv, &logs.join(format!("{}-proxy.log", w.name)))?;
            if let Some((svc, version)) = &w.app {
                let mut app = vec![
                    exe_s.clone(),
                    "app".into(),
                    format!("--service={}", format!("{svc:?}").to_lowercase()),
                    format!("--version={version}"),
                    format!("--listen=0.0.0.0:{}", mesh_samples::PORT),
                ];
                app.extend(resolve.iter().cloned());
                let argv: Vec<&str> = app.iter().map(String::as_str).collect();
                node.spawn(&w.name, &argv, &logs.join(format!("{}-app.log", w.name)))?;
            }
        }
        Ok(Self {
            node,
            cp,
            specs,
            logs,
        })
    }

    /// Waits until every sidecar is ready (15021 is never captured).
    pub async fn wait_ready(
        &self,
        timeout: std::time::Duration,
        mut progress: impl FnMut(&crate::workloads::WorkloadSpec, usize, usize),
    ) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(1))
            .build()?;
        let deadline = std::time::Instant::now() + timeout;
        for (i, w) in self.specs.iter().enumerate() {
            let url = format!(
                "http://{}:{}/healthz/ready",
                w.address,
                mesh_proto::ports::HEALTH
            );
            while !http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                if std::time::Instant::now() > deadline {
                    bail!(
                        "{} not ready after {timeout:?}; see {}",
                        w.name,
                        self.logs.display()
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            progress(w, i + 1, self.specs.len());
        }
        Ok(())
    }

    /// The curl command a user runs in the client pod to reach productpage.
    pub fn productpage_curl(&self, extra: &[&str]) -> Vec<String> {
        let vip = "240.240.0.2";
        let mut c: Vec<String> = vec!["curl".into(), "-sS".into(), "-m".into(), "5".into()];
        c.extend(extra.iter().map(|s| s.to_string()));
        c.extend([
            "--resolve".into(),
            format!("productpage:{}:{vip}", mesh_samples::PORT),
            format!("http://productpage:{}/productpage", mesh_samples::PORT),
        ]);
        c
    }

    /// One request by curl in the client pod, verified hop by hop.
    pub fn request(&self, extra: &[&str]) -> Result<(String, Vec<crate::traffic::Hop>), String> {
        let client = self
            .specs
            .iter()
            .find(|w| w.name == crate::demo::CLIENT_WORKLOAD)
            .ok_or("no client workload")?;
        let id = mesh_identity::SpiffeId::new(
            self.cp.citadel.trust_domain(),
            &client.namespace,
            &client.service_account,
        );
        let curl = self.productpage_curl(extra);
        let argv: Vec<&str> = curl.iter().map(String::as_str).collect();
        let out = self
            .node
            .run(&client.name, &argv)
            .map_err(|e| e.to_string())?;
        let body: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("curl: {e}: {}", String::from_utf8_lossy(&out.stderr).trim()))?;
        crate::traffic::verify(&body, &id.to_string())
    }

    /// Stops every pod (processes by PID, then namespaces), then the control plane.
    pub async fn stop(self) {
        drop(self.node);
        self.cp.stop().await;
    }
}
