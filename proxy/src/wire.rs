//! Small helpers shared by the inbound and outbound request paths.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use crate::pool::Body;

/// Carries the app port a request is for from the outbound sidecar to the
/// inbound one (local mode has no original destination to read it from).
pub const TARGET_PORT: HeaderName = HeaderName::from_static("x-mesh-target-port");
/// Carries the source workload's name, namespace, app and version.
pub const SOURCE: HeaderName = HeaderName::from_static("x-mesh-source");
/// Istio's header telling the app who called it.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Istio's `request_protocol` label for a request: `grpc` for gRPC
/// (content-type `application/grpc...`), else by HTTP version.
pub fn protocol_label<B>(req: &http::Request<B>) -> &'static str {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    match (grpc, req.version()) {
        (true, _) => "grpc",
        (false, http::Version::HTTP_2) => "http2",
        _ => "http",
    }
}

/// The value of query parameter `name` (the first, raw), if present.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Time since the process first asked: a monotonic clock that fits an atomic.
pub fn since_start(t: std::time::Instant) -> std::time::Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    t.saturating_duration_since(*START.get_or_init(std::time::Instant::now))
}

/// `x-forwarded-for` and `x-forwarded-proto`, as a request leaves for the
/// app: `client` (the address the request came from, one value per
/// connection) is appended to the caller's `x-forwarded-for`, so the app
/// learns who called it although its own connection comes from the
/// sidecar; `x-forwarded-proto` is set to `proto` unless a hop before set it.
pub fn forwarded(headers: &mut HeaderMap, client: Option<&HeaderValue>, proto: &'static str) {
    if let Some(client) = client {
        let joined = headers.get(&XFF).and_then(|prior| {
            let mut v = prior.as_bytes().to_vec();
            v.extend_from_slice(b", ");
            v.extend_from_slice(client.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        });
        headers.insert(XFF, joined.unwrap_or_else(|| client.clone()));
    }
    if !headers.contains_key(&XFP) {
        headers.insert(XFP, HeaderValue::from_static(proto));
    }
}

pub const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Hop-by-hop headers (besides those a `Connection` header names).
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Marks a response's `Date` for an HTTP/2 caller as never indexed. The
/// value changes each second: indexed, each new one would join a chain in
/// the caller's HPACK table that h2 walks, comparing values, for every
/// response until the stale ones are evicted (a minute's worth, ~60, when
/// nothing else is inserted; h2 decodes a never-indexed value as an
/// ordinary one, so each HTTP/2 hop marks it again).
pub fn unindexed_date(headers: &mut HeaderMap) {
    if let Some(d) = headers.get_mut(header::DATE) {
        d.set_sensitive(true);
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names finds that, where
    // removing each by name would hash it.
    if !headers.keys().any(|n| HOP_BY_HOP.contains(n)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
}

/// A short plain-text response made by the proxy itself.
pub fn local_reply(status: http::StatusCode, msg: impl Into<String>) -> http::Response<Body> {
    let mut body = msg.into();
    body.push('\n');
    http::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(body))
        .expect("static parts are valid")
}

/// A gRPC trailers-only answer made by the proxy itself.
pub fn grpc_reply(code: u32, msg: &str) -> http::Response<Body> {
    let mut resp = http::Response::new(full(""));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", header::HeaderValue::from(code));
    if let Ok(m) = header::HeaderValue::from_str(msg) {
        h.insert("grpc-message", m);
    }
    resp
}

pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A workload as metrics name it; sent by the outbound sidecar as
/// `k=v;k=v` (values are label-like, no `;` or `=`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PeerMeta {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl PeerMeta {
    /// From a workload's labels, as Istio derives its metric labels:
    /// the canonical service is `service.istio.io/canonical-name`, else
    /// `app.kubernetes.io/name`, else `app`, else the workload's name; the
    /// canonical revision likewise from `.../canonical-revision`,
    /// `app.kubernetes.io/version`, `version`, else `latest`.
    pub fn from_labels(
        workload: &str,
        namespace: &str,
        labels: &std::collections::HashMap<String, String>,
        cluster: &str,
    ) -> Self {
        let first = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()))
                .cloned()
        };
        let app = first(&["app", "app.kubernetes.io/name"]).unwrap_or_default();
        let version = first(&["version", "app.kubernetes.io/version"]).unwrap_or_default();
        Self {
            workload: workload.to_string(),
            namespace: namespace.to_string(),
            canonical_service: first(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| workload.to_string()),
            canonical_revision: first(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".to_string()),
            cluster: cluster.to_string(),
            app,
            version,
        }
    }

    pub fn encode(&self) -> String {
        format!(
            "workload={};namespace={};app={};version={};csvc={};crev={};cluster={}",
            self.workload,
            self.namespace,
            self.app,
            self.version,
            self.canonical_service,
            self.canonical_revision,
            self.cluster
        )
    }

    pub fn decode(s: &str) -> Self {
        let mut m = Self::default();
        for kv in s.split(';') {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let field = match k {
                "workload" => &mut m.workload,
                "namespace" => &mut m.namespace,
                "app" => &mut m.app,
                "version" => &mut m.version,
                "csvc" => &mut m.canonical_service,
                "crev" => &mut m.canonical_revision,
                "cluster" => &mut m.cluster,
                _ => continue,
            };
            *field = v.to_string();
        }
        m
    }
}

/// An HTTP upgrade (WebSocket and the like) in flight: the protocol the app
/// asked to switch to. Between sidecars it travels as HTTP/2 extended
/// CONNECT (RFC 8441, `:protocol`); to and from the apps as HTTP/1.1's
/// `Connection: upgrade` and `101 Switching Protocols`. Carried in request
/// extensions to the code that picks the wire form.
#[derive(Clone, Debug)]
pub struct Upgrade(pub HeaderValue);

/// The protocol an HTTP/1.1 request asks to switch to, if it asks.
pub fn upgrade_asked(version: http::Version, headers: &HeaderMap) -> Option<Upgrade> {
    if version != http::Version::HTTP_11 {
        return None;
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let proto = headers.get(header::UPGRADE)?;
    asks.then(|| Upgrade(proto.clone()))
}

impl Upgrade {
    /// As HTTP/2 extended CONNECT, for a peer sidecar.
    pub fn to_connect<B>(&self, req: &mut http::Request<B>) {
        *req.method_mut() = http::Method::CONNECT;
        let proto = self.0.to_str().unwrap_or("websocket");
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from(proto));
    }

    /// As HTTP/1.1's upgrade request, for an app.
    pub fn to_h1<B>(&self, req: &mut http::Request<B>) {
        *req.method_mut() = http::Method::GET;
        *req.version_mut() = http::Version::HTTP_11;
        let headers = req.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.0.clone());
    }

    /// The extended CONNECT a peer sidecar received, as an upgrade request
    /// (method GET, as the app sent it), or `None` for a plain CONNECT.
    pub fn from_connect<B>(req: &mut http::Request<B>) -> Option<Self> {
        let proto = req.extensions_mut().remove::<hyper::ext::Protocol>()?;
        let value = HeaderValue::from_str(proto.as_str()).ok()?;
        *req.method_mut() = http::Method::GET;
        Some(Upgrade(value))
    }

    /// The app's `101` to the app that asked: its headers (WebSocket's
    /// accept key among them) with the upgrade's own.
    pub fn switched(&self, from: &HeaderMap) -> http::Response<Body> {
        let mut resp = http::Response::new(empty());
        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        let headers = resp.headers_mut();
        headers.clone_from(from);
        strip_hop_by_hop(headers);
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.0.clone());
        resp
    }

    /// The `200` a peer sidecar's extended CONNECT gets once the app
    /// switched: the app's headers, without the hop-by-hop ones.
    pub fn accepted(from: &HeaderMap) -> http::Response<Body> {
        let mut resp = http::Response::new(empty());
        let headers = resp.headers_mut();
        headers.clone_from(from);
        strip_hop_by_hop(headers);
        headers.remove(header::CONTENT_LENGTH);
        resp
    }
}

/// Joins two switched connections and copies bytes both ways until
/// either side is done.
pub async fn splice_upgraded(a: hyper::upgrade::OnUpgrade, b: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(a, b) {
        Ok((a, b)) => {
            let mut a = hyper_util::rt::TokioIo::new(a);
            let mut b = hyper_util::rt::TokioIo::new(b);
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        }
        Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        v.sort();
        v
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go_and_nothing_else() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("host", "reviews:9080"),
            ("x-keep", "1"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["host", "x-keep"]);
    }

    #[test]
    fn a_hop_by_hop_header_goes_without_a_connection_header() {
        for n in ["keep-alive", "proxy-connection", "te", "upgrade"] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(n), HeaderValue::from_static("x"));
            h.insert(header::HOST, HeaderValue::from_static("reviews"));
            strip_hop_by_hop(&mut h);
            assert_eq!(names(&h), ["host"], "{n}");
        }
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_keeps_them_all() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("reviews"));
        h.insert(header::USER_AGENT, HeaderValue::from_static("curl"));
        h.insert(
            HeaderName::from_static("x-b3-traceid"),
            HeaderValue::from_static("1"),
        );
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }
}
