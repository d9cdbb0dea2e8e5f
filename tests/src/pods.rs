//! Pods as Kubernetes builds them, on one node: each pod a network
//! namespace with its own veth and IP, joined by a bridge in the node's
//! namespace. Everything is deleted (processes by PID first) on drop.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// The node's bridge address; pods get addresses in its /24.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

/// Why pod tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (network namespaces, veth, iptables)".into());
    }
    for tool in ["ip", "iptables", "setpriv", "curl"] {
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

fn sh(script: &str) -> anyhow::Result<()> {
    let out = Command::new("sh").args(["-ec", script]).output()?;
    if !out.status.success() {
        bail!("{script}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub struct Node {
    tag: String,
    pods: Vec<String>,
    children: Vec<Child>,
}

impl Node {
    /// Creates the node namespace and its bridge.
    pub fn new() -> anyhow::Result<Self> {
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let node = Self {
            tag,
            pods: vec![],
            children: vec![],
        };
        let ns = node.namespace();
        sh(&format!(
            "ip netns add {ns}; ip -n {ns} link set lo up; ip -n {ns} link add br0 type bridge; \
             ip -n {ns} addr add {NODE_IP}/24 dev br0; ip -n {ns} link set br0 up"
        ))?;
        Ok(node)
    }

    /// The node's namespace (the bridge, and where the control plane runs).
    pub fn namespace(&self) -> String {
        format!("mt-{}-node", self.tag)
    }

    pub fn pod_namespace(&self, pod: &str) -> String {
        format!("mt-{}-{pod}", self.tag)
    }

    /// Creates a pod: a namespace with `eth0` at `ip` on the node's bridge.
    pub fn add_pod(&mut self, pod: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
        let (ns, node) = (self.pod_namespace(pod), self.namespace());
        let i = self.pods.len();
        let (host, peer) = (format!("mh{}{i}", self.tag), format!("mp{}{i}", self.tag));
        // Registered first, so that a half-made pod is deleted too.
        self.pods.push(ns.clone());
        sh(&format!(
            "ip netns add {ns}; ip link add {host} type veth peer name {peer}; \
             ip link set {host} netns {node}; ip link set {peer} netns {ns}; \
             ip -n {node} link set {host} master br0; ip -n {node} link set {host} up; \
             ip -n {ns} link set {peer} name eth0; ip -n {ns} addr add {ip}/24 dev eth0; \
             ip -n {ns} link set eth0 up; ip -n {ns} link set lo up; \
             ip -n {ns} route add default via {NODE_IP}"
        ))
        .with_context(|| format!("creating pod {pod}"))
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
        let node = self.namespace();
        for ns in self.pods.drain(..).chain([node]) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

/// Moves the calling thread (only) into a named network namespace.
pub fn enter(namespace: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{namespace}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    Ok(())
}
