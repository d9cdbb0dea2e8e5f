//! The pod's traffic capture, as Istio's init container sets it up: nat
//! rules that send the app's outbound TCP to the sidecar's 15001 and
//! inbound TCP to 15006, never capturing the proxy's own traffic (its UID,
//! or its socket mark where UIDs cannot be mapped). Rules for one address
//! family load in one `iptables-restore`; applying twice equals applying once.

use std::fmt::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// The chains this module owns, in the nat table.
pub const CHAINS: [&str; 4] = [
    "MESH_INBOUND",
    "MESH_IN_REDIRECT",
    "MESH_OUTPUT",
    "MESH_REDIRECT",
];

/// The proxy's UID (Istio's 1337): its traffic is never captured.
pub const PROXY_UID: u32 = 1337;

/// Ports of the sidecar itself that inbound capture leaves alone.
const SIDECAR_PORTS: [u16; 4] = [15020, 15021, 15090, 15000];

/// A CIDR, e.g. `10.0.0.0/8` or `::1/128`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    fn localhost(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
    fn matches(self, c: &Cidr) -> bool {
        c.addr.is_ipv4() == (self == Family::V4)
    }
}

/// What to capture, with Istio's defaults.
#[derive(Clone, Debug, clap::Args)]
pub struct CaptureConfig {
    /// Port outbound traffic is redirected to.
    #[arg(long, default_value_t = mesh_proto::ports::OUTBOUND)]
    pub outbound_port: u16,
    /// Port inbound traffic is redirected to.
    #[arg(long, default_value_t = mesh_proto::ports::INBOUND)]
    pub inbound_port: u16,
    /// The proxy's UID, whose traffic is not captured.
    #[arg(long, default_value_t = PROXY_UID)]
    pub proxy_uid: u32,
    /// Instead of (or besides) the UID: the socket mark the proxy sets on its
    /// own connections (for rootless namespaces where UIDs are not mapped).
    #[arg(long)]
    pub proxy_mark: Option<u32>,
    /// Tell the proxy by `--proxy-mark` alone, with no UID rule: inside a
    /// user namespace where UID 1337 is not mapped, iptables refuses one.
    #[arg(long, requires = "proxy_mark")]
    pub mark_only: bool,
    /// Inbound ports to capture: `*` for all (default), or a comma list.
    #[arg(long, default_value = "*")]
    pub include_inbound_ports: String,
    /// Inbound ports never captured.
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never captured.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations to capture: `*` for all (default), or CIDRs.
    #[arg(long, default_value = "*")]
    pub include_outbound_cidrs: String,
    /// Outbound destinations never captured.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            outbound_port: mesh_proto::ports::OUTBOUND,
            inbound_port: mesh_proto::ports::INBOUND,
            proxy_uid: PROXY_UID,
            proxy_mark: None,
            mark_only: false,
            include_inbound_ports: "*".into(),
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            include_outbound_cidrs: "*".into(),
            exclude_outbound_cidrs: vec![],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("--include-inbound-ports: {0:?} is not '*' or a comma list of ports")]
    InboundPorts(String),
    #[error("--include-outbound-cidrs: {0}")]
    OutboundCidrs(String),
    #[error("cannot run {program}: {source} (is the Debian package iptables installed?)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} refused the rules: {stderr}")]
    Refused { program: String, stderr: String },
}

/// `*` or a comma list, parsed.
fn list<T: std::str::FromStr>(s: &str) -> Option<Option<Vec<T>>> {
    if s.trim() == "*" {
        return Some(None);
    }
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse().ok())
        .collect::<Option<Vec<T>>>()
        .map(Some)
}

impl CaptureConfig {
    /// The `iptables-restore --noflush` input for one family. Declaring our
    /// chains empties them, so loading twice leaves one copy; `jumps_present`
    /// says whether the builtin chains already jump to ours.
    pub fn rules(&self, family: Family, jumps_present: bool) -> Result<String, CaptureError> {
        let inbound: Option<Vec<u16>> = list(&self.include_inbound_ports)
            .ok_or_else(|| CaptureError::InboundPorts(self.include_inbound_ports.clone()))?;
        let include_cidrs: Option<Vec<Cidr>> = match list::<String>(&self.include_outbound_cidrs) {
            None => {
                return Err(CaptureError::OutboundCidrs(
                    self.include_outbound_cidrs.clone(),
                ));
            }
            Some(None) => None,
            Some(Some(v)) => Some(
                v.iter()
                    .map(|c| c.parse())
                    .collect::<Result<_, _>>()
                    .map_err(CaptureError::OutboundCidrs)?,
            ),
        };
        let mut r = String::from("*nat\n");
        for c in CHAINS {
            let _ = writeln!(r, ":{c} - [0:0]");
        }
        if !jumps_present {
            r.push_str("-A PREROUTING -p tcp -j MESH_INBOUND\n-A OUTPUT -p tcp -j MESH_OUTPUT\n");
        }
        let _ = writeln!(
            r,
            "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        );
        let _ = writeln!(
            r,
            "-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        );
        // Inbound: the sidecar's own ports are left alone.
        let mut excluded_in: Vec<u16> = SIDECAR_PORTS.to_vec();
        excluded_in.push(self.inbound_port);
        excluded_in.extend(&self.exclude_inbound_ports);
        match &inbound {
            None => {
                for p in &excluded_in {
                    let _ = writeln!(r, "-A MESH_INBOUND -p tcp --dport {p} -j RETURN");
                }
                r.push_str("-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT\n");
            }
            Some(ports) => {
                for p in ports.iter().filter(|p| !excluded_in.contains(p)) {
                    let _ = writeln!(r, "-A MESH_INBOUND -p tcp --dport {p} -j MESH_IN_REDIRECT");
                }
            }
        }
        // Outbound: never the proxy's own traffic.
        let own = match (self.mark_only, self.proxy_mark) {
            (true, Some(mark)) => format!("-m mark --mark {mark:#x}"),
            _ => format!("-m owner --uid-owner {}", self.proxy_uid),
        };
        if let (false, Some(mark)) = (self.mark_only, self.proxy_mark) {
            let _ = writeln!(r, "-A MESH_OUTPUT -m mark --mark {mark:#x} -j RETURN");
        }
        // The proxy calling its own pod's address over lo is inbound traffic.
        let _ = writeln!(
            r,
            "-A MESH_OUTPUT -o lo ! -d {} {own} -j MESH_IN_REDIRECT",
            family.localhost()
        );
        let _ = writeln!(r, "-A MESH_OUTPUT {own} -j RETURN");
        let _ = writeln!(r, "-A MESH_OUTPUT -d {} -j RETURN", family.localhost());
        for p in &self.exclude_outbound_ports {
            let _ = writeln!(r, "-A MESH_OUTPUT -p tcp --dport {p} -j RETURN");
        }
        for c in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| family.matches(c))
        {
            let _ = writeln!(r, "-A MESH_OUTPUT -d {c} -j RETURN");
        }
        match &include_cidrs {
            None => r.push_str("-A MESH_OUTPUT -j MESH_REDIRECT\n"),
            Some(cidrs) => {
                for c in cidrs.iter().filter(|c| family.matches(c)) {
                    let _ = writeln!(r, "-A MESH_OUTPUT -d {c} -j MESH_REDIRECT");
                }
            }
        }
        r.push_str("COMMIT\n");
        Ok(r)
    }
}

fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<std::process::Output, CaptureError> {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CaptureError::Spawn {
            program: program.into(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(text.as_bytes());
    }
    child
        .wait_with_output()
        .map_err(|source| CaptureError::Spawn {
            program: program.into(),
            source,
        })
}

/// Whether the builtin chains already jump to ours (from an earlier apply).
fn jumps_present(family: Family) -> Result<bool, CaptureError> {
    let out = run(
        family.iptables(),
        &[
            "-t",
            "nat",
            "-C",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "MESH_OUTPUT",
        ],
        None,
    )?;
    Ok(out.status.success())
}

/// Loads the rules for `family` in one `iptables-restore`.
pub fn apply(cfg: &CaptureConfig, family: Family) -> Result<(), CaptureError> {
    let rules = cfg.rules(family, jumps_present(family)?)?;
    let out = run(family.restore(), &["--noflush"], Some(&rules))?;
    if !out.status.success() {
        return Err(CaptureError::Refused {
            program: family.restore().into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Removes the jumps and our chains; harmless when nothing is there.
pub fn cleanup(family: Family) -> Result<(), CaptureError> {
    let ipt = family.iptables();
    for (chain, target) in [("PREROUTING", "MESH_INBOUND"), ("OUTPUT", "MESH_OUTPUT")] {
        while run(
            ipt,
            &["-t", "nat", "-D", chain, "-p", "tcp", "-j", target],
            None,
        )?
        .status
        .success()
        {}
    }
    for c in CHAINS {
        let _ = run(ipt, &["-t", "nat", "-F", c], None)?;
    }
    for c in CHAINS {
        let _ = run(ipt, &["-t", "nat", "-X", c], None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_capture_everything_but_the_proxy_and_its_ports() {
        let r = CaptureConfig::default().rules(Family::V4, false).unwrap();
        assert!(r.starts_with("*nat\n:MESH_INBOUND - [0:0]\n"));
        assert!(r.contains("-A OUTPUT -p tcp -j MESH_OUTPUT\n"));
        assert!(r.contains("-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n"));
        assert!(r.contains("-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n"));
        assert!(r.contains("-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN\n"));
        assert!(r.contains("-A MESH_INBOUND -p tcp --dport 15021 -j RETURN\n"));
        assert!(
            r.trim_end()
                .ends_with("-A MESH_OUTPUT -j MESH_REDIRECT\nCOMMIT")
        );
        // Re-applying must not add a second jump.
        assert!(
            !CaptureConfig::default()
                .rules(Family::V4, true)
                .unwrap()
                .contains("-A OUTPUT")
        );
    }

    #[test]
    fn include_and_exclude_lists_and_families() {
        let cfg = CaptureConfig {
            include_inbound_ports: "9080, 15021".into(),
            exclude_outbound_ports: vec![5432],
            include_outbound_cidrs: "10.96.0.0/12,fd00::/8".into(),
            exclude_outbound_cidrs: vec!["10.96.0.1".parse().unwrap()],
            proxy_mark: Some(1337),
            ..Default::default()
        };
        let v4 = cfg.rules(Family::V4, false).unwrap();
        assert!(v4.contains("-A MESH_INBOUND -p tcp --dport 9080 -j MESH_IN_REDIRECT\n"));
        assert!(
            !v4.contains("--dport 15021 -j MESH_IN_REDIRECT"),
            "a sidecar port is never captured"
        );
        assert!(v4.contains("-A MESH_OUTPUT -p tcp --dport 5432 -j RETURN\n"));
        assert!(v4.contains("-A MESH_OUTPUT -d 10.96.0.1/32 -j RETURN\n"));
        assert!(v4.contains("-A MESH_OUTPUT -d 10.96.0.0/12 -j MESH_REDIRECT\n"));
        assert!(!v4.contains("fd00::/8"));
        assert!(v4.contains("-m mark --mark 0x539 -j RETURN"));
        let v6 = cfg.rules(Family::V6, false).unwrap();
        assert!(
            v6.contains("-A MESH_OUTPUT -d fd00::/8 -j MESH_REDIRECT\n")
                && v6.contains("! -d ::1/128")
        );
        assert!(!v6.contains("10.96.0.0/12"));
    }

    #[test]
    fn mark_only_rules_name_no_uid() {
        let cfg = CaptureConfig {
            proxy_mark: Some(1337),
            mark_only: true,
            ..Default::default()
        };
        let v4 = cfg.rules(Family::V4, false).unwrap();
        assert!(!v4.contains("--uid-owner"), "{v4}");
        assert!(
            v4.contains("-A MESH_OUTPUT -m mark --mark 0x539 -j RETURN\n"),
            "{v4}"
        );
        assert!(
            v4.contains(
                "-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -m mark --mark 0x539 -j MESH_IN_REDIRECT"
            ),
            "{v4}"
        );
    }

    #[test]
    fn bad_lists_are_refused_by_flag() {
        let bad = CaptureConfig {
            include_inbound_ports: "80,http".into(),
            ..Default::default()
        };
        assert!(
            bad.rules(Family::V4, false)
                .unwrap_err()
                .to_string()
                .contains("--include-inbound-ports")
        );
        let bad = CaptureConfig {
            include_outbound_cidrs: "10.0.0.0/40".into(),
            ..Default::default()
        };
        assert!(
            bad.rules(Family::V4, false)
                .unwrap_err()
                .to_string()
                .contains("prefix must be")
        );
    }
}
