//! Access logs: one line per request, in Istio's default text format or as
//! JSON, for the sides and requests the workload's Telemetry selects (a
//! CEL filter over Envoy's attribute names). Lines go through a bounded
//! queue to a writer thread: when the output cannot keep up, lines are
//! dropped and counted (`mesh_proxy_access_log_lines_dropped_total`), and
//! requests never wait.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use mesh_proto::resources as pb;

/// Lines waiting for the writer; beyond this they are dropped.
const QUEUE: usize = 8192;

/// How one side of the workload's traffic is logged.
pub struct Rule {
    pub json: bool,
    filter: Option<cel::Program>,
    /// The filter as written, for errors.
    expression: String,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("json", &self.json)
            .field("filter", &self.expression)
            .finish()
    }
}

/// The workload's access-log rules: for requests it sends (client) and
/// requests it serves (server).
#[derive(Debug, Default)]
pub struct Rules {
    pub client: Option<Arc<Rule>>,
    pub server: Option<Arc<Rule>>,
}

impl Rules {
    /// The first entry for each side wins. A filter that does not compile
    /// is an error naming it (pilot checks filters, so only a different
    /// pilot could send one).
    pub fn compile(logs: &[pb::AccessLog]) -> Result<Self, String> {
        let mut rules = Rules::default();
        for l in logs {
            let filter = match l.filter.as_str() {
                "" => None,
                f => {
                    Some(mesh_proto::filter::compile(f).map_err(|e| format!("filter {f:?}: {e}"))?)
                }
            };
            let rule = Arc::new(Rule {
                json: l.encoding == pb::access_log::Encoding::Json as i32,
                filter,
                expression: l.filter.clone(),
            });
            let side = pb::TrafficSide::try_from(l.side).unwrap_or_default();
            if side != pb::TrafficSide::Server && rules.client.is_none() {
                rules.client = Some(rule.clone());
            }
            if side != pb::TrafficSide::Client && rules.server.is_none() {
                rules.server = Some(rule);
            }
        }
        Ok(rules)
    }
}

/// What is known of a request when it arrives: kept only when something
/// (an access log, a tap) will want it.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub time: SystemTime,
    pub method: http::Method,
    /// Path and query, as the client sent them.
    pub path: String,
    pub protocol: &'static str,
    pub authority: String,
    pub headers: HeaderMap,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
}

impl Arrival {
    pub fn of<B>(
        req: &http::Request<B>,
        downstream_remote: Option<SocketAddr>,
        downstream_local: Option<SocketAddr>,
    ) -> Self {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Self {
            time: SystemTime::now(),
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            protocol: protocol_name(req.version()),
            authority,
            headers: req.headers().clone(),
            downstream_remote,
            downstream_local,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }
}

/// A finished request, as logs and taps describe it.
#[derive(Debug)]
pub struct Entry<'a> {
    pub arrival: &'a Arrival,
    pub code: u16,
    pub flags: &'a str,
    /// Envoy's response code details: `via_upstream` when the upstream
    /// answered, else why the proxy did.
    pub details: &'a str,
    pub grpc_status: Option<u32>,
    /// Body bytes received from the client and sent back to it.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_host: Option<String>,
    pub upstream_cluster: Option<String>,
    pub source_principal: Option<String>,
    pub destination_principal: Option<String>,
    pub mtls: bool,
    /// From sending the request upstream to its response's headers
    /// (Envoy's `x-envoy-upstream-service-time`), when one came.
    pub upstream_service_time: Option<Duration>,
    /// The route that took the request (Envoy's `%ROUTE_NAME%`).
    pub route_name: Option<&'a str>,
    /// The server name the client asked for in its TLS handshake
    /// (`%REQUESTED_SERVER_NAME%`): on the serving side, the calling
    /// sidecar's `outbound_.<port>_.<subset>_.<host>`.
    pub requested_server_name: Option<&'a str>,
}

fn dash(v: Option<&str>) -> &str {
    v.filter(|v| !v.is_empty()).unwrap_or("-")
}

fn addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "-".to_string(), |a| a.to_string())
}

impl Entry<'_> {
    /// Istio's default text format (`%START_TIME%` … `%ROUTE_NAME%`).
    pub fn text(&self) -> String {
        let a = self.arrival;
        format!(
            "[{}] \"{} {} {}\" {} {} {} - \"-\" {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} - {} {} {} {}\n",
            humantime::format_rfc3339_millis(a.time),
            a.method,
            a.path,
            a.protocol,
            self.code,
            self.flags,
            self.details,
            self.bytes_received,
            self.bytes_sent,
            self.duration.as_millis(),
            self.upstream_service_time
                .map_or_else(|| "-".to_string(), |t| t.as_millis().to_string()),
            dash(a.header("x-forwarded-for")),
            dash(a.header("user-agent")),
            dash(a.header("x-request-id")),
            dash(Some(&a.authority)),
            dash(self.upstream_host.as_deref()),
            dash(self.upstream_cluster.as_deref()),
            addr(a.downstream_local),
            addr(a.downstream_remote),
            dash(self.requested_server_name),
            dash(self.route_name),
        )
    }

    /// The same fields as JSON, with the keys Istio's JSON encoding uses.
    pub fn json(&self) -> String {
        let a = self.arrival;
        let opt = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_string);
        let mut line = serde_json::json!({
            "start_time": humantime::format_rfc3339_millis(a.time).to_string(),
            "method": a.method.as_str(),
            "path": a.path,
            "protocol": a.protocol,
            "response_code": self.code,
            "response_flags": self.flags,
            "response_code_details": self.details,
            "grpc_status": self.grpc_status,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "duration": self.duration.as_millis() as u64,
            "upstream_service_time": self.upstream_service_time.map(|t| t.as_millis() as u64),
            "x_forwarded_for": opt(a.header("x-forwarded-for")),
            "user_agent": opt(a.header("user-agent")),
            "request_id": opt(a.header("x-request-id")),
            "authority": opt(Some(&a.authority)),
            "upstream_host": self.upstream_host,
            "upstream_cluster": self.upstream_cluster,
            "downstream_local_address": a.downstream_local.map(|a| a.to_string()),
            "downstream_remote_address": a.downstream_remote.map(|a| a.to_string()),
            "source_principal": self.source_principal,
            "destination_principal": self.destination_principal,
            "route_name": self.route_name,
            "requested_server_name": self.requested_server_name,
        })
        .to_string();
        line.push('\n');
        line
    }

    /// Whether `rule`'s filter selects this request. A filter that fails
    /// to evaluate (a header it indexes is absent, say) selects nothing,
    /// as in Envoy.
    pub fn selected_by(&self, rule: &Rule) -> bool {
        let Some(program) = &rule.filter else {
            return true;
        };
        let a = self.arrival;
        let headers = |h: &HeaderMap| -> HashMap<String, String> {
            h.iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect()
        };
        let url_path = a.path.split('?').next().unwrap_or_default().to_string();
        let mut ctx = cel::Context::default();
        let mut request: HashMap<&str, cel::Value> = HashMap::from([
            ("method", a.method.as_str().into()),
            ("path", a.path.clone().into()),
            ("url_path", url_path.into()),
            ("host", a.authority.clone().into()),
            ("scheme", "http".into()),
            ("protocol", a.protocol.into()),
            ("headers", headers(&a.headers).into()),
            ("size", (self.bytes_received as i64).into()),
        ]);
        if let Some(id) = a.header("x-request-id") {
            request.insert("id", id.into());
        }
        if let Some(ua) = a.header("user-agent") {
            request.insert("useragent", ua.into());
        }
        ctx.add_variable_from_value("request", request);
        let mut response: HashMap<&str, cel::Value> = HashMap::from([
            ("code", i64::from(self.code).into()),
            ("size", (self.bytes_sent as i64).into()),
        ]);
        if let Some(g) = self.grpc_status {
            response.insert("grpc_status", i64::from(g).into());
        }
        ctx.add_variable_from_value("response", response);
        ctx.add_variable_from_value(
            "connection",
            HashMap::from([("mtls", cel::Value::from(self.mtls))]),
        );
        let peer = |addr: Option<SocketAddr>, principal: &Option<String>| {
            let mut m: HashMap<&str, cel::Value> = HashMap::new();
            if let Some(a) = addr {
                m.insert("address", a.ip().to_string().into());
                m.insert("port", i64::from(a.port()).into());
            }
            if let Some(p) = principal {
                m.insert("principal", p.clone().into());
            }
            m
        };
        ctx.add_variable_from_value("source", peer(a.downstream_remote, &self.source_principal));
        ctx.add_variable_from_value(
            "destination",
            peer(a.downstream_local, &self.destination_principal),
        );
        let mut upstream: HashMap<&str, cel::Value> = HashMap::new();
        if let Some(h) = &self.upstream_host {
            upstream.insert("address", h.clone().into());
        }
        if let Some(c) = &self.upstream_cluster {
            upstream.insert("cluster", c.clone().into());
        }
        ctx.add_variable_from_value("upstream", upstream);
        matches!(program.execute(&ctx), Ok(cel::Value::Bool(true)))
    }
}

/// Where lines go: a file (appended), or the proxy's stdout.
pub struct Writer {
    path: Option<PathBuf>,
    queue: OnceLock<SyncSender<String>>,
    pub dropped: AtomicU64,
}

impl Writer {
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            queue: OnceLock::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Logs `entry` under `rule`, if its filter selects it.
    pub fn log(&self, rule: &Rule, entry: &Entry<'_>) {
        if !entry.selected_by(rule) {
            return;
        }
        let line = if rule.json {
            entry.json()
        } else {
            entry.text()
        };
        let queue = self.queue.get_or_init(|| self.start());
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = queue.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The writer thread: blocking writes belong off the runtime.
    fn start(&self) -> SyncSender<String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUE);
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let out: Box<dyn Write> = match &path {
                    Some(p) => match std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                    {
                        Ok(f) => Box::new(f),
                        Err(e) => {
                            tracing::error!(path = %p.display(), error = %e, "cannot open the access log; lines will be dropped");
                            return;
                        }
                    },
                    None => Box::new(std::io::stdout()),
                };
                let mut out = std::io::BufWriter::new(out);
                while let Ok(line) = rx.recv() {
                    let mut ok = out.write_all(line.as_bytes()).is_ok();
                    // Flush whenever the queue runs dry, so lines are not held back.
                    while let Ok(more) = rx.try_recv() {
                        ok &= out.write_all(more.as_bytes()).is_ok();
                    }
                    if !(ok && out.flush().is_ok()) {
                        tracing::warn!("writing the access log failed");
                    }
                }
            })
            .expect("spawning the access-log thread");
        tx
    }
}

/// An HTTP version as access logs and spans write it.
pub fn protocol_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival() -> Arrival {
        let req = http::Request::builder()
            .uri("/status/418?x=1")
            .header("host", "httpbin:8000")
            .header("user-agent", "curl/8.5.0")
            .header("x-request-id", "84961386-6d84-929d-98bd-c5aee93b5c88")
            .body(())
            .unwrap();
        let mut a = Arrival::of(
            &req,
            Some("10.44.1.23:46520".parse().unwrap()),
            Some("10.0.45.184:8000".parse().unwrap()),
        );
        a.time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_606_339_578_409);
        a
    }

    fn entry(a: &Arrival) -> Entry<'_> {
        Entry {
            arrival: a,
            code: 418,
            flags: "-",
            details: "via_upstream",
            grpc_status: None,
            bytes_received: 0,
            bytes_sent: 135,
            duration: Duration::from_millis(4),
            upstream_host: Some("10.44.1.27:80".into()),
            upstream_cluster: Some("outbound|8000||httpbin.foo.svc.cluster.local".into()),
            source_principal: None,
            destination_principal: None,
            mtls: true,
            upstream_service_time: Some(Duration::from_millis(3)),
            route_name: Some("default"),
            requested_server_name: None,
        }
    }

    #[test]
    fn the_serving_side_logs_the_server_name_the_caller_asked_for() {
        let a = arrival();
        let sni = "outbound_.8000_._.httpbin.foo.svc.cluster.local";
        let e = Entry {
            requested_server_name: Some(sni),
            ..entry(&a)
        };
        assert!(
            e.text().ends_with(&format!(" {sni} default\n")),
            "{}",
            e.text()
        );
        let v: serde_json::Value = serde_json::from_str(&e.json()).unwrap();
        assert_eq!(v["requested_server_name"], sni);
    }

    #[test]
    fn text_is_istios_default_format() {
        let a = arrival();
        assert_eq!(
            entry(&a).text(),
            "[2020-11-25T21:26:18.409Z] \"GET /status/418?x=1 HTTP/1.1\" 418 - via_upstream - \"-\" 0 135 4 3 \"-\" \"curl/8.5.0\" \"84961386-6d84-929d-98bd-c5aee93b5c88\" \"httpbin:8000\" \"10.44.1.27:80\" outbound|8000||httpbin.foo.svc.cluster.local - 10.0.45.184:8000 10.44.1.23:46520 - default\n"
        );
    }

    #[test]
    fn json_carries_the_same_fields() {
        let a = arrival();
        let v: serde_json::Value = serde_json::from_str(&entry(&a).json()).unwrap();
        assert_eq!(v["start_time"], "2020-11-25T21:26:18.409Z");
        assert_eq!(v["response_code"], 418);
        assert_eq!(v["path"], "/status/418?x=1");
        assert_eq!(v["authority"], "httpbin:8000");
        assert_eq!(
            v["upstream_cluster"],
            "outbound|8000||httpbin.foo.svc.cluster.local"
        );
        assert_eq!(v["x_forwarded_for"], serde_json::Value::Null);
        assert_eq!(v["upstream_service_time"], 3);
        assert_eq!(v["route_name"], "default");
    }

    #[test]
    fn filters_select_by_cel_over_envoy_attributes() {
        let a = arrival();
        let e = entry(&a);
        let rule = |f: &str| {
            let logs = [pb::AccessLog {
                filter: f.into(),
                ..Default::default()
            }];
            Rules::compile(&logs).unwrap().client.unwrap()
        };
        for (filter, selected) in [
            ("response.code >= 400", true),
            ("response.code >= 500", false),
            (
                "request.url_path == '/status/418' && request.method == 'GET'",
                true,
            ),
            ("request.headers['user-agent'].startsWith('curl')", true),
            ("request.headers['x-absent'] == 'x'", false),
            ("connection.mtls && source.address == '10.44.1.23'", true),
            ("upstream.cluster.contains('httpbin')", true),
        ] {
            assert_eq!(e.selected_by(&rule(filter)), selected, "{filter}");
        }
    }
}
