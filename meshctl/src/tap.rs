//! `meshctl tap <workload>`: the requests a sidecar handles, live, from its
//! admin port's `/tap` (one JSON object per line). Sensitive headers come
//! redacted unless asked for.

use std::fmt::Write;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use serde_json::Value;

#[derive(Clone, Debug, Default)]
pub struct Options {
    pub method: Option<String>,
    pub authority: Option<String>,
    /// A path prefix.
    pub path: Option<String>,
    pub show_sensitive: bool,
}

impl Options {
    fn query(&self) -> String {
        let mut q = Vec::new();
        for (k, v) in [
            ("method", &self.method),
            ("authority", &self.authority),
            ("path", &self.path),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", encode(v)));
            }
        }
        if self.show_sensitive {
            q.push("show_sensitive=true".into());
        }
        q.join("&")
    }
}

/// Percent-encodes what a query value cannot carry as is.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Streams `admin`'s events to `each` until it returns false or the
/// sidecar goes away. A `{"dropped": n}` line says the reader fell behind.
pub async fn stream(
    admin: SocketAddr,
    opts: &Options,
    mut each: impl FnMut(Value) -> bool,
) -> anyhow::Result<()> {
    let url = format!("http://{admin}/tap?{}", opts.query());
    let http = reqwest::Client::builder().no_proxy().build()?;
    let mut resp = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    if !resp.status().is_success() {
        bail!("{url}: {}", resp.status());
    }
    let mut pending = Vec::new();
    while let Some(chunk) = resp.chunk().await.context("tap stream broke")? {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: Value = serde_json::from_slice(&line)
                .with_context(|| format!("{url} sent a line that is not JSON"))?;
            if !each(event) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One event as a line for people:
/// `TIME DIR STATUS METHOD AUTHORITY PATH LATENCY FLAGS SRC -> DST`.
pub fn render(e: &Value) -> String {
    if let Some(n) = e["dropped"].as_u64() {
        return format!("(tap fell behind: {n} requests not shown)");
    }
    let id = |v: &Value| {
        v.as_str()
            .filter(|s| !s.is_empty())
            .map(|s| s.strip_prefix("spiffe://").unwrap_or(s).to_string())
            .unwrap_or_else(|| "-".into())
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "{} {:<8} {} {} {} {} {:.1}ms {} {} -> {}",
        e["time"].as_str().unwrap_or("?"),
        e["direction"].as_str().unwrap_or("?"),
        e["status"],
        e["method"].as_str().unwrap_or("?"),
        e["authority"].as_str().unwrap_or("?"),
        e["path"].as_str().unwrap_or("?"),
        e["latency_ms"].as_f64().unwrap_or(0.0),
        e["flags"].as_str().unwrap_or("-"),
        id(&e["source"]),
        id(&e["destination"]),
    );
    if let Some(g) = e["grpc_status"].as_u64() {
        let _ = write!(out, " grpc-status={g}");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_an_event_for_people() {
        let e = serde_json::json!({
            "time": "2026-11-21T13:08:42.385Z", "direction": "inbound", "status": 200,
            "method": "GET", "authority": "reviews:9080", "path": "/reviews/0",
            "latency_ms": 1.26, "flags": "-",
            "source": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            "destination": "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
        });
        assert_eq!(
            super::render(&e),
            "2026-11-21T13:08:42.385Z inbound  200 GET reviews:9080 /reviews/0 1.3ms - \
             cluster.local/ns/default/sa/bookinfo-productpage -> cluster.local/ns/default/sa/bookinfo-reviews"
        );
        assert_eq!(
            super::render(&serde_json::json!({"dropped": 3})),
            "(tap fell behind: 3 requests not shown)"
        );
        let q = super::Options {
            path: Some("/a b".into()),
            show_sensitive: true,
            ..Default::default()
        };
        assert_eq!(q.query(), "path=/a%20b&show_sensitive=true");
    }
}
