//! Choosing a route and a destination for a request: first matching route
//! wins, then a weighted pick among its clusters.

use http::HeaderMap;
use mesh_proto::resources as pb;
use rand::Rng;

pub fn matches(m: &pb::HttpMatch, path: &str, headers: &HeaderMap) -> bool {
    use pb::header_match::Value;
    use pb::http_match::Path;
    let path_ok = match &m.path {
        None => true,
        Some(Path::Exact(p)) => path == p,
        Some(Path::Prefix(p)) => path.starts_with(p.as_str()),
    };
    path_ok
        && m.headers.iter().all(|h| {
            let Some(v) = headers.get(&h.name).and_then(|v| v.to_str().ok()) else {
                return false;
            };
            match &h.value {
                None => true,
                Some(Value::Exact(e)) => v == e,
                Some(Value::Prefix(p)) => v.starts_with(p.as_str()),
            }
        })
}

/// The first route of `rc` that matches the request.
pub fn select<'a>(
    rc: &'a pb::RouteConfig,
    path: &str,
    headers: &HeaderMap,
) -> Option<&'a pb::HttpRoute> {
    rc.routes
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| matches(m, path, headers)))
}

/// A weighted random pick among a route's clusters.
pub fn pick_cluster(route: &pb::HttpRoute) -> Option<&str> {
    let total: u32 = route.clusters.iter().map(|c| c.weight).sum();
    if total == 0 {
        return route.clusters.first().map(|c| c.cluster.as_str());
    }
    let mut n = rand::rng().random_range(0..total);
    for c in &route.clusters {
        if n < c.weight {
            return Some(&c.cluster);
        }
        n -= c.weight;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, m: Vec<pb::HttpMatch>) -> pb::HttpRoute {
        pb::HttpRoute {
            name: name.into(),
            matches: m,
            clusters: vec![],
        }
    }

    #[test]
    fn first_match_wins() {
        let rc = pb::RouteConfig {
            routes: vec![
                route(
                    "jason",
                    vec![pb::HttpMatch {
                        path: None,
                        headers: vec![pb::HeaderMatch {
                            name: "end-user".into(),
                            value: Some(pb::header_match::Value::Exact("jason".into())),
                        }],
                    }],
                ),
                route(
                    "prefix",
                    vec![pb::HttpMatch {
                        path: Some(pb::http_match::Path::Prefix("/api".into())),
                        headers: vec![],
                    }],
                ),
                route("rest", vec![]),
            ],
            ..Default::default()
        };
        let mut h = HeaderMap::new();
        assert_eq!(select(&rc, "/api/x", &h).unwrap().name, "prefix");
        assert_eq!(select(&rc, "/other", &h).unwrap().name, "rest");
        h.insert("end-user", "jason".parse().unwrap());
        assert_eq!(select(&rc, "/api/x", &h).unwrap().name, "jason");
    }

    #[test]
    fn weights_split_traffic() {
        let r = pb::HttpRoute {
            clusters: vec![
                pb::WeightedCluster {
                    cluster: "a".into(),
                    weight: 80,
                },
                pb::WeightedCluster {
                    cluster: "b".into(),
                    weight: 20,
                },
                pb::WeightedCluster {
                    cluster: "never".into(),
                    weight: 0,
                },
            ],
            ..Default::default()
        };
        let a = (0..10_000)
            .filter(|_| pick_cluster(&r) == Some("a"))
            .count();
        assert!((7_600..8_400).contains(&a), "{a} of 10000 went to a");
    }
}
