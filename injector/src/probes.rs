//! Kubelet probes through the proxy. Under STRICT mutual TLS kubelet (no
//! mesh certificate) cannot reach the app's port, and under capture a TCP
//! probe would only test the proxy's listener; so HTTP(S), TCP and gRPC
//! probes are rewritten to HTTP GETs on the proxy's agent port, and the
//! proxy runs the original check against the app (`mesh_proto::probers`),
//! as Istio does. Exec probes run in the app's container and are left as
//! they are.

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_proto::probers::{Grpc, Header, HttpGet, Prober, Probers, TcpSocket};

use crate::{AGENT_PORT, InjectError};

/// Rewrites every app container's HTTP and TCP probes; returns the
/// originals keyed by the path kubelet will ask.
pub fn rewrite(containers: &mut [Container]) -> Result<Probers, InjectError> {
    let mut probers = Probers::new();
    for c in containers {
        let ports = c.ports.clone().unwrap_or_default();
        let name = c.name.clone();
        for (field, kind, probe) in [
            ("livenessProbe", "livez", &mut c.liveness_probe),
            ("readinessProbe", "readyz", &mut c.readiness_probe),
            ("startupProbe", "startupz", &mut c.startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            let path = format!("/app-health/{name}/{kind}");
            let resolve = |port: &IntOrString, at: &str| {
                resolve_port(port, &ports).ok_or_else(|| {
                    InjectError::Probe(format!(
                        "container {name}: {field}.{at}.port {} names no port of the container",
                        show(port)
                    ))
                })
            };
            let original = if let Some(get) = &probe.http_get {
                let https = match get.scheme.as_deref().map(str::to_ascii_uppercase) {
                    None => false,
                    Some(s) if s == "HTTP" => false,
                    Some(s) if s == "HTTPS" => true,
                    Some(other) => {
                        return Err(InjectError::Probe(format!(
                            "container {name}: {field}.httpGet.scheme {other:?} is neither HTTP nor HTTPS"
                        )));
                    }
                };
                Prober {
                    http_get: Some(HttpGet {
                        path: get.path.clone().unwrap_or_else(|| "/".into()),
                        port: resolve(&get.port, "httpGet")?,
                        https,
                        host: get.host.clone(),
                        http_headers: get
                            .http_headers
                            .iter()
                            .flatten()
                            .map(|h| Header {
                                name: h.name.clone(),
                                value: h.value.clone(),
                            })
                            .collect(),
                    }),
                    tcp_socket: None,
                    grpc: None,
                    timeout_seconds: timeout(probe),
                }
            } else if let Some(tcp) = &probe.tcp_socket {
                Prober {
                    http_get: None,
                    tcp_socket: Some(TcpSocket {
                        port: resolve(&tcp.port, "tcpSocket")?,
                    }),
                    grpc: None,
                    timeout_seconds: timeout(probe),
                }
            } else if let Some(g) = &probe.grpc {
                Prober {
                    http_get: None,
                    tcp_socket: None,
                    grpc: Some(Grpc {
                        port: resolve(&IntOrString::Int(g.port), "grpc")?,
                        service: g.service.clone().filter(|s| !s.is_empty()),
                    }),
                    timeout_seconds: timeout(probe),
                }
            } else {
                continue;
            };
            probe.tcp_socket = None;
            probe.grpc = None;
            probe.http_get = Some(HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::Int(AGENT_PORT),
                scheme: Some("HTTP".into()),
                ..Default::default()
            });
            probers.insert(path, original);
        }
    }
    Ok(probers)
}

fn timeout(probe: &Probe) -> u32 {
    probe
        .timeout_seconds
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(1)
}

fn show(port: &IntOrString) -> String {
    match port {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => format!("{s:?}"),
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve_port(
    port: &IntOrString,
    ports: &[k8s_openapi::api::core::v1::ContainerPort],
) -> Option<u16> {
    let n = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(s) => match s.parse::<i32>() {
            Ok(n) => n,
            Err(_) => {
                ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(s))?
                    .container_port
            }
        },
    };
    u16::try_from(n).ok().filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_tcp_probes_move_to_the_agent_port() {
        let mut cs: Vec<Container> = serde_saphyr::from_str(
            "
- name: web
  ports: [{name: http, containerPort: 8080}]
  livenessProbe: {httpGet: {path: /live, port: http, httpHeaders: [{name: X-Probe, value: k}]}, timeoutSeconds: 3, periodSeconds: 7}
  readinessProbe: {tcpSocket: {port: 8080}}
  startupProbe: {exec: {command: [cat, /ready]}}
- name: tls
  readinessProbe: {httpGet: {port: 8443, scheme: HTTPS}}
- name: grpc
  livenessProbe: {grpc: {port: 9090, service: app}}
",
        )
        .unwrap();
        let probers = rewrite(&mut cs).unwrap();
        let live = cs[0].liveness_probe.as_ref().unwrap();
        let get = live.http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some("/app-health/web/livez"));
        assert_eq!(get.port, IntOrString::Int(15020));
        assert_eq!(get.http_headers, None);
        assert_eq!(live.period_seconds, Some(7), "other probe settings kept");
        let ready = cs[0].readiness_probe.as_ref().unwrap();
        assert!(ready.tcp_socket.is_none());
        assert_eq!(
            ready.http_get.as_ref().unwrap().path.as_deref(),
            Some("/app-health/web/readyz")
        );
        assert!(
            cs[0].startup_probe.as_ref().unwrap().exec.is_some(),
            "exec stays"
        );
        let tls = cs[1]
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(
            (tls.port.clone(), tls.scheme.as_deref()),
            (IntOrString::Int(15020), Some("HTTP"))
        );
        let grpc = cs[2].liveness_probe.as_ref().unwrap();
        assert!(grpc.grpc.is_none());
        assert_eq!(
            grpc.http_get.as_ref().unwrap().path.as_deref(),
            Some("/app-health/grpc/livez")
        );
        assert_eq!(
            serde_json::to_value(&probers).unwrap(),
            serde_json::json!({
                "/app-health/web/livez": {"httpGet": {"path": "/live", "port": 8080,
                    "httpHeaders": [{"name": "X-Probe", "value": "k"}]}, "timeoutSeconds": 3},
                "/app-health/web/readyz": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
                "/app-health/tls/readyz": {"httpGet": {"path": "/", "port": 8443, "https": true},
                    "timeoutSeconds": 1},
                "/app-health/grpc/livez": {"grpc": {"port": 9090, "service": "app"}, "timeoutSeconds": 1},
            })
        );
    }

    #[test]
    fn an_unknown_named_port_is_an_error() {
        let mut cs: Vec<Container> =
            serde_saphyr::from_str("[{name: web, readinessProbe: {httpGet: {port: admin}}}]")
                .unwrap();
        assert_eq!(
            rewrite(&mut cs).unwrap_err().to_string(),
            "container web: readinessProbe.httpGet.port \"admin\" names no port of the container"
        );
    }
}
