//! Sends requests to productpage through a sidecar and checks, from the
//! identities each app was told by its sidecar (`x-forwarded-client-cert`),
//! that every hop went over mutual TLS between the expected workloads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Who calls whom in the sample.
fn parent(service: &str) -> Option<&'static str> {
    match service {
        "details" | "reviews" => Some("productpage"),
        "ratings" => Some("reviews"),
        _ => None,
    }
}

/// (By, URI) of an XFCC value: the callee's and the caller's SPIFFE IDs.
fn xfcc(v: &Value) -> Option<(String, String)> {
    let s = v.as_str()?;
    let mut by = None;
    let mut uri = None;
    for part in s.split(';') {
        match part.split_once('=') {
            Some(("By", v)) => by = Some(v.to_string()),
            Some(("URI", v)) => uri = Some(v.to_string()),
            _ => {}
        }
    }
    let (by, uri) = (by?, uri?);
    (by.parse::<mesh_identity::SpiffeId>().is_ok()
        && uri.parse::<mesh_identity::SpiffeId>().is_ok())
    .then_some((by, uri))
}

/// One verified hop: caller service, callee service, caller ID, callee ID.
pub type Hop = (String, String, String, String);

/// Checks one productpage answer; returns the reviews version and its hops.
pub fn verify(body: &Value, client_identity: &str) -> Result<(String, Vec<Hop>), String> {
    let hops = body["hops"].as_array().ok_or("answer has no hops")?;
    let mut by_service: BTreeMap<&str, (String, String)> = BTreeMap::new();
    let mut out = Vec::new();
    for h in hops {
        let service = h["service"].as_str().ok_or("hop without service")?;
        let (callee, caller) = xfcc(&h["xfcc"]).ok_or_else(|| {
            format!("{service} was reached without mutual TLS (no client identity)")
        })?;
        let expected_caller = match parent(service) {
            None => client_identity.to_string(),
            Some(p) => by_service
                .get(p)
                .map(|(callee, _)| callee.clone())
                .ok_or_else(|| format!("{service} answered but its caller {p} is missing"))?,
        };
        if caller != expected_caller {
            return Err(format!(
                "{service} saw caller {caller}, expected {expected_caller}"
            ));
        }
        out.push((
            parent(service).unwrap_or("client").to_string(),
            service.to_string(),
            caller.clone(),
            callee.clone(),
        ));
        by_service.insert(service, (callee, caller));
    }
    for s in ["productpage", "details", "reviews"] {
        if !by_service.contains_key(s) {
            return Err(format!("no answer from {s}"));
        }
    }
    let version = body["reviews_version"].as_str().unwrap_or("?").to_string();
    if version != "v1" && !by_service.contains_key("ratings") {
        return Err(format!(
            "reviews {version} answered without calling ratings"
        ));
    }
    Ok((version, out))
}

#[derive(Debug, Default)]
pub struct Summary {
    pub ok: usize,
    pub failed: usize,
    pub errors: BTreeMap<String, usize>,
    pub versions: BTreeMap<String, usize>,
    pub hops: BTreeMap<Hop, usize>,
    pub elapsed: Duration,
}

fn client_via(proxy: SocketAddr) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{proxy}"))?)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// Sends `n` GET /productpage requests through the sidecar at `proxy`.
pub async fn run(proxy: SocketAddr, client_identity: &str, n: usize) -> anyhow::Result<Summary> {
    let http = client_via(proxy)?;
    let mut s = Summary::default();
    let start = Instant::now();
    for _ in 0..n {
        s.record(one(&http, client_identity).await);
    }
    s.elapsed = start.elapsed();
    Ok(s)
}

/// Sends GET /productpage requests through the sidecar at `proxy` for
/// `duration`, from `concurrency` loops at once.
pub async fn run_for(
    proxy: SocketAddr,
    client_identity: &str,
    duration: Duration,
    concurrency: usize,
) -> anyhow::Result<Summary> {
    let http = client_via(proxy)?;
    let start = Instant::now();
    let loops = (0..concurrency.max(1)).map(|_| {
        let (http, id) = (http.clone(), client_identity.to_string());
        tokio::spawn(async move {
            let mut s = Summary::default();
            while start.elapsed() < duration {
                s.record(one(&http, &id).await);
            }
            s
        })
    });
    let mut total = Summary::default();
    for l in loops.collect::<Vec<_>>() {
        total.merge(l.await?);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

/// One request to productpage, verified.
pub async fn one(
    http: &reqwest::Client,
    client_identity: &str,
) -> Result<(String, Vec<Hop>), String> {
    let url = format!("http://productpage:{}/productpage", mesh_samples::PORT);
    let resp = http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("reading answer: {e}"))?;
    if !status.is_success() {
        return Err(format!("{status}: {}", text.trim()));
    }
    let body: Value =
        serde_json::from_str(&text).map_err(|e| format!("answer is not JSON: {e}"))?;
    verify(&body, client_identity)
}

impl Summary {
    /// Counts one verified request's outcome.
    pub fn record(&mut self, result: Result<(String, Vec<Hop>), String>) {
        match result {
            Ok((version, hops)) => {
                self.ok += 1;
                *self.versions.entry(version).or_default() += 1;
                for h in hops {
                    *self.hops.entry(h).or_default() += 1;
                }
            }
            Err(e) => {
                self.failed += 1;
                *self.errors.entry(e).or_default() += 1;
            }
        }
    }

    pub fn merge(&mut self, other: Summary) {
        self.ok += other.ok;
        self.failed += other.failed;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        for (k, n) in other.versions {
            *self.versions.entry(k).or_default() += n;
        }
        for (k, n) in other.hops {
            *self.hops.entry(k).or_default() += n;
        }
    }

    pub fn print(&self) {
        let total = self.ok + self.failed;
        println!();
        println!(
            "{total} requests in {:.2}s: {} succeeded, {} failed",
            self.elapsed.as_secs_f64(),
            self.ok,
            self.failed
        );
        for (e, n) in &self.errors {
            println!("  {n:>5} x {e}");
        }
        println!("reviews versions:");
        for (v, n) in &self.versions {
            println!("  {v}: {n}");
        }
        println!("hops (caller -> callee, both identities proven by mutual TLS):");
        for ((from, to, caller, callee), n) in &self.hops {
            println!("  {n:>5} x {from} -> {to}: {caller} -> {callee}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
    const PP: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
    const RV: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews";

    fn hop(service: &str, by: &str, uri: &str) -> Value {
        json!({"service": service, "xfcc": format!("By={by};URI={uri}")})
    }

    #[test]
    fn accepts_a_full_mtls_chain() {
        let body = json!({"reviews_version": "v2", "hops": [
            hop("productpage", PP, CLIENT), hop("details", "spiffe://cluster.local/ns/default/sa/d", PP),
            hop("reviews", RV, PP), hop("ratings", "spiffe://cluster.local/ns/default/sa/r", RV),
        ]});
        let (v, hops) = verify(&body, CLIENT).unwrap();
        assert_eq!(v, "v2");
        assert_eq!(hops.len(), 4);
    }

    #[test]
    fn refuses_a_plaintext_hop_or_a_wrong_caller() {
        let plain = json!({"reviews_version": "v1", "hops": [
            hop("productpage", PP, CLIENT), {"service": "details", "xfcc": null}, hop("reviews", RV, PP),
        ]});
        assert!(
            verify(&plain, CLIENT)
                .unwrap_err()
                .contains("without mutual TLS")
        );
        let wrong = json!({"reviews_version": "v1", "hops": [
            hop("productpage", PP, CLIENT), hop("details", PP, RV), hop("reviews", RV, PP),
        ]});
        assert!(verify(&wrong, CLIENT).unwrap_err().contains("expected"));
        let v3_without_ratings = json!({"reviews_version": "v3", "hops": [
            hop("productpage", PP, CLIENT), hop("details", RV, PP), hop("reviews", RV, PP),
        ]});
        assert!(verify(&v3_without_ratings, CLIENT).is_err());
    }
}
