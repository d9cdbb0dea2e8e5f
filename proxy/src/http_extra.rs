//! Answers a route gives without an upstream: redirects and CORS.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use mesh_proto::resources as pb;

use crate::pool::Body;
use crate::route::Cors;
use crate::state::split_authority;
use crate::wire;

/// Istio's HTTPRedirect: the request's scheme, host, port and path unless
/// the redirect replaces them.
pub fn redirect(rd: &pb::Redirect, authority: &str, path_and_query: &str) -> Response<Body> {
    let (host, port) = split_authority(authority);
    let host = if rd.authority.is_empty() {
        host
    } else {
        rd.authority.as_str()
    };
    let port = if rd.port != 0 {
        Some(rd.port as u16)
    } else if rd.authority.is_empty() {
        port
    } else {
        None
    };
    let scheme = if rd.scheme.is_empty() {
        "http"
    } else {
        rd.scheme.as_str()
    };
    let path = if rd.uri.is_empty() {
        path_and_query.to_string()
    } else {
        match path_and_query.split_once('?') {
            Some((_, q)) if !rd.uri.contains('?') => format!("{}?{q}", rd.uri),
            _ => rd.uri.clone(),
        }
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let location = match port {
        Some(p) if p != default_port => format!("{scheme}://{host}:{p}{path}"),
        _ => format!("{scheme}://{host}{path}"),
    };
    let status = StatusCode::from_u16(rd.code as u16).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut resp = Response::new(wire::full(""));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The answer to a CORS preflight from an allowed origin.
pub fn cors_preflight(cors: &Cors, origin: &HeaderValue) -> Response<Body> {
    let mut resp = Response::new(wire::full(""));
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if let Some(m) = &cors.methods {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, m.clone());
    }
    if let Some(v) = &cors.headers {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
    }
    if let Some(v) = &cors.max_age {
        h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
    }
    if cors.credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    resp
}

/// CORS headers on the response to an allowed origin's request.
pub fn cors_response(cors: &Cors, origin: HeaderValue, h: &mut HeaderMap) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if let Some(v) = &cors.expose {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
    }
    if cors.credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(rd: pb::Redirect, authority: &str, path: &str) -> (u16, String) {
        let r = redirect(&rd, authority, path);
        (
            r.status().as_u16(),
            r.headers()[header::LOCATION].to_str().unwrap().to_string(),
        )
    }

    #[test]
    fn redirects_keep_what_they_do_not_replace() {
        let rd = |uri: &str, authority: &str, scheme: &str, port: u32, code: u32| pb::Redirect {
            uri: uri.into(),
            authority: authority.into(),
            scheme: scheme.into(),
            port,
            code,
        };
        assert_eq!(
            location(rd("/v2/x", "", "", 0, 301), "reviews:9080", "/v1/x?a=1"),
            (301, "http://reviews:9080/v2/x?a=1".into())
        );
        assert_eq!(
            location(rd("", "new.example", "https", 0, 308), "reviews:9080", "/p"),
            (308, "https://new.example/p".into())
        );
        assert_eq!(
            location(rd("", "", "", 8080, 302), "reviews", "/p"),
            (302, "http://reviews:8080/p".into())
        );
    }
}
