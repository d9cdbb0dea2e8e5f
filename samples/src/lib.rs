//! A bookinfo-style application: productpage calls details and reviews;
//! reviews v1 shows no ratings, v2 and v3 call ratings (v2 black stars, v3
//! red). The apps know nothing of the mesh: they call each other by service
//! name through `HTTP_PROXY` (their sidecar in local mode), and each reports
//! who called it, as its sidecar told it (`x-forwarded-client-cert`), so the
//! demo can show every hop's identities. Every service also answers, as
//! httpbin does, `/health`, `/delay/<ms>` (after that many milliseconds, at
//! most 10 s), `/status/<code>`, `/echo` (the request's method, path and
//! headers as the app received them), `/flaky/<n>/<key>` (503 for the
//! first n calls with that key, then 200: a failure a retry can mend) and
//! `/fail-on/<version>` (503 from that version only: a bad endpoint).
//! `/metrics` is the app's own Prometheus text (`bookinfo_requests_total`).
//! Like Istio's bookinfo, the apps copy the trace headers of the request
//! they serve onto the calls they make (see [`PROPAGATED`]).
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

/// The port every sample service listens on, as in Istio's bookinfo.
pub const PORT: u16 = 9080;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Productpage,
    Details,
    Reviews,
    Ratings,
}

impl FromStr for Service {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "productpage" => Self::Productpage,
            "details" => Self::Details,
            "reviews" => Self::Reviews,
            "ratings" => Self::Ratings,
            other => return Err(format!("unknown sample service {other:?}")),
        })
    }
}

#[derive(Clone)]
struct App {
    service: Service,
    version: String,
    http: reqwest::Client,
    /// Calls so far per `/flaky/<n>/<key>` key.
    flaky: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    /// Requests served, for the app's own `/metrics`.
    served: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Serves one sample service on `listen` until `shutdown`. Outgoing calls go
/// through `proxy` (the sidecar's outbound address), if given.
pub async fn serve(
    service: Service,
    version: &str,
    listen: SocketAddr,
    proxy: Option<&str>,
    resolve: &[(String, std::net::IpAddr)],
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy();
    for (name, ip) in resolve {
        http = http.resolve(name, SocketAddr::new(*ip, PORT));
    }
    if let Some(p) = proxy {
        let p = reqwest::Proxy::http(p).map_err(std::io::Error::other)?;
        http = http.proxy(p);
    }
    let app = App {
        service,
        version: version.to_string(),
        http: http.build().map_err(std::io::Error::other)?,
        flaky: Default::default(),
        served: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => a?,
            _ = &mut shutdown => return Ok(()),
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// The headers an app copies from the request it serves onto the calls it
/// makes, so that the mesh can join them into one trace (the list Istio's
/// bookinfo propagates).
pub const PROPAGATED: [&str; 9] = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

fn propagated(h: &http::HeaderMap) -> http::HeaderMap {
    PROPAGATED
        .iter()
        .filter_map(|name| Some((http::HeaderName::from_static(name), h.get(*name)?.clone())))
        .collect()
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

impl App {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/ws" {
            return self.websocket(&mut req);
        }
        let caller = req
            .headers()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let hop = json!({
            "service": format!("{:?}", self.service).to_lowercase(),
            "version": self.version,
            "xfcc": caller,
            "xff": header("x-forwarded-for"),
            "xfp": header("x-forwarded-proto"),
        });
        let path = req.uri().path();
        let pass = propagated(req.headers());
        if path == "/metrics" {
            return self.metrics();
        }
        self.served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = match (self.service, path) {
            (_, "/health") => Ok(json!({"status": "ok"})),
            (_, p) if p.starts_with("/delay/") => {
                // Like httpbin's /delay: answers after the given milliseconds (at most 10 s).
                let ms: u64 = p["/delay/".len()..].parse().unwrap_or(0).min(10_000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(json!({"delayed_ms": ms, "hops": [hop]}))
            }
            (_, p) if p.starts_with("/status/") => {
                let code = p["/status/".len()..]
                    .parse()
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .unwrap_or(StatusCode::BAD_REQUEST);
                return reply(code, &json!({"status": code.as_u16(), "hops": [hop]}));
            }
            (_, "/echo") => {
                let headers: serde_json::Map<String, Value> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("?"))))
                    .collect();
                Ok(json!({
                    "method": req.method().as_str(),
                    "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
                    "headers": headers,
                    "hops": [hop],
                }))
            }
            (_, p) if p.starts_with("/fail-on/") => {
                let status = if p["/fail-on/".len()..] == *self.version {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                return reply(status, &json!({"hops": [hop]}));
            }
            (_, p) if p.starts_with("/flaky/") => {
                let mut it = p["/flaky/".len()..].splitn(2, '/');
                let fail: u32 = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let key = it.next().unwrap_or("").to_string();
                let calls = {
                    let mut m = self.flaky.lock().unwrap();
                    let c = m.entry(key).or_default();
                    *c += 1;
                    *c
                };
                let status = if calls <= fail {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                return reply(status, &json!({"calls": calls, "hops": [hop]}));
            }
            (Service::Productpage, "/productpage") => self.productpage(hop.clone(), &pass).await,
            (Service::Details, p) if p.starts_with("/details/") => Ok(json!({
                "id": 0, "author": "William Shakespeare", "year": 1595,
                "type": "paperback", "pages": 200, "publisher": "PublisherA",
                "hops": [hop],
            })),
            (Service::Reviews, p) if p.starts_with("/reviews/") => {
                self.reviews(hop.clone(), &pass).await
            }
            (Service::Ratings, p) if p.starts_with("/ratings/") => Ok(json!({
                "id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4},
                "hops": [hop],
            })),
            _ => {
                return reply(
                    StatusCode::NOT_FOUND,
                    &json!({"error": format!("no such page {path}")}),
                );
            }
        };
        match result {
            Ok(v) => reply(StatusCode::OK, &v),
            Err(e) => reply(StatusCode::BAD_GATEWAY, &json!({"error": e, "hops": [hop]})),
        }
    }

    /// `/ws`: a WebSocket whose every text message comes back prefixed
    /// with the service and version that answered (`reviews v2: hello`).
    fn websocket(&self, req: &mut Request<Incoming>) -> Response<Full<Bytes>> {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{
            Message, handshake::derive_accept_key, protocol::Role,
        };
        let key = req.headers().get("sec-websocket-key").cloned();
        let asks = req
            .headers()
            .get(http::header::UPGRADE)
            .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let Some(key) = key.filter(|_| asks) else {
            return reply(
                StatusCode::BAD_REQUEST,
                &json!({"error": "/ws takes a WebSocket handshake"}),
            );
        };
        let tag = format!("{:?} {}", self.service, self.version).to_lowercase();
        let upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let Ok(io) = upgrade.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(io),
                Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Text(t) => Message::text(format!("{tag}: {t}")),
                    Message::Close(_) => return,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    return;
                }
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(Full::new(Bytes::new()))
            .expect("valid response")
    }

    /// The app's own Prometheus metrics: requests it served.
    fn metrics(&self) -> Response<Full<Bytes>> {
        let text = format!(
            "# HELP bookinfo_requests Requests the app served (not counting /metrics).\n# TYPE bookinfo_requests counter\nbookinfo_requests_total{{service=\"{}\",version=\"{}\"}} {}\n",
            format!("{:?}", self.service).to_lowercase(),
            self.version,
            self.served.load(std::sync::atomic::Ordering::Relaxed)
        );
        Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(text)))
            .expect("valid response")
    }

    async fn call(&self, url: &str, pass: &http::HeaderMap) -> Result<Value, String> {
        let resp = self
            .http
            .get(url)
            .headers(pass.clone())
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
        if !status.is_success() {
            return Err(format!("{url}: {status}: {}", body.trim()));
        }
        serde_json::from_str(&body).map_err(|e| format!("{url}: not JSON: {e}"))
    }

    async fn productpage(&self, hop: Value, pass: &http::HeaderMap) -> Result<Value, String> {
        let details_url = format!("http://details:{PORT}/details/0");
        let reviews_url = format!("http://reviews:{PORT}/reviews/0");
        let (details, reviews) =
            tokio::join!(self.call(&details_url, pass), self.call(&reviews_url, pass));
        let (details, reviews) = (details?, reviews?);
        let mut hops = vec![hop];
        for part in [&details, &reviews] {
            if let Some(h) = part["hops"].as_array() {
                hops.extend(h.iter().cloned());
            }
        }
        Ok(json!({
            "product": {"id": 0, "title": "The Comedy of Errors"},
            "details": details,
            "reviews": reviews,
            "reviews_version": reviews["version"],
            "hops": hops,
        }))
    }

    async fn reviews(&self, hop: Value, pass: &http::HeaderMap) -> Result<Value, String> {
        let mut reviews = json!([
            {"reviewer": "Reviewer1", "text": "An extremely entertaining play by Shakespeare."},
            {"reviewer": "Reviewer2", "text": "Absolutely fun and entertaining."},
        ]);
        let mut hops = vec![hop];
        if self.version != "v1" {
            let ratings = self
                .call(&format!("http://ratings:{PORT}/ratings/0"), pass)
                .await?;
            let color = if self.version == "v2" { "black" } else { "red" };
            for r in reviews.as_array_mut().expect("array") {
                let who = r["reviewer"].as_str().unwrap_or_default().to_string();
                r["rating"] = json!({"stars": ratings["ratings"][&who], "color": color});
            }
            if let Some(h) = ratings["hops"].as_array() {
                hops.extend(h.iter().cloned());
            }
        }
        Ok(json!({"id": 0, "version": self.version, "reviews": reviews, "hops": hops}))
    }
}

/// The sample's config directory, embedded so the demo runs from anywhere.
pub const CONFIG: [(&str, &str); 4] = [
    (
        "peer-authentication.yaml",
        include_str!("../config/peer-authentication.yaml"),
    ),
    ("services.yaml", include_str!("../config/services.yaml")),
    ("workloads.yaml", include_str!("../config/workloads.yaml")),
    (
        "reviews-routing.yaml",
        include_str!("../config/reviews-routing.yaml"),
    ),
];

/// The sample's flags, shared by the `bookinfo` binary and `meshctl`.
#[derive(clap::Args, Clone, Debug)]
pub struct AppArgs {
    /// productpage, details, reviews or ratings.
    #[arg(long)]
    pub service: Service,
    #[arg(long, default_value = "v1")]
    pub version: String,
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where outgoing calls go (the sidecar's outbound address).
    #[arg(long, env = "HTTP_PROXY")]
    pub proxy: Option<String>,
    /// NAME=IP: what a service name resolves to (as cluster DNS would
    /// answer with its VIP), for apps whose traffic is captured.
    #[arg(long, value_parser = parse_resolve)]
    pub resolve: Vec<(String, std::net::IpAddr)>,
}

fn parse_resolve(s: &str) -> Result<(String, std::net::IpAddr), String> {
    let (name, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: want NAME=IP"))?;
    Ok((
        name.to_string(),
        ip.parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?,
    ))
}

impl AppArgs {
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        serve(
            self.service,
            &self.version,
            self.listen,
            self.proxy.as_deref(),
            &self.resolve,
            shutdown,
        )
        .await
    }
}
