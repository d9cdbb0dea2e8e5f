//! The app's own kubelet probes, run by the proxy when kubelet asks the
//! agent port (the injector moved them there: under STRICT mutual TLS
//! kubelet cannot reach the app, and under capture a TCP probe would only
//! reach the proxy). Answers 200 when the app passes, the app's status when
//! it answers 400 or more, and 503 naming why when it cannot be reached in
//! the probe's time.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use mesh_proto::probers::Prober;

use crate::Shared;
use crate::pool::Body;
use crate::wire::{empty, local_reply};

pub async fn run(shared: &Shared, prober: &Prober) -> Response<Body> {
    let limit = Duration::from_secs(prober.timeout_seconds.max(1).into());
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why);
    let check = async {
        if let Some(get) = &prober.http_get {
            let addr = shared.cfg.app_addr(get.port);
            let mut req = Request::get(format!("http://{addr}{}", get.path))
                .header(http::header::USER_AGENT, "kube-probe")
                // A new connection each time, as kubelet's: a pooled one
                // could outlive the app's listener.
                .header(http::header::CONNECTION, "close");
            if let Some(host) = &get.host {
                req = req.header(http::header::HOST, host);
            }
            for h in &get.http_headers {
                req = req.header(&h.name, &h.value);
            }
            let req = req
                .body(empty())
                .map_err(|e| unavailable(format!("the probe's request is not valid: {e}")))?;
            match shared.app_h1.request(req).await {
                Ok(resp) if resp.status().as_u16() < 400 => Ok(()),
                Ok(resp) => Err((resp.status(), format!("the app answered {}", resp.status()))),
                Err(e) => Err(unavailable(format!("cannot reach the app on {addr}: {e}"))),
            }
        } else if let Some(tcp) = &prober.tcp_socket {
            let addr = shared.cfg.app_addr(tcp.port);
            mesh_identity::grpc::dial(addr, shared.cfg.socket_mark)
                .await
                .map(drop)
                .map_err(|e| unavailable(format!("cannot connect to the app on {addr}: {e}")))
        } else {
            Err(unavailable("the probe names no check".into()))
        }
    };
    match tokio::time::timeout(limit, check).await {
        Ok(Ok(())) => local_reply(StatusCode::OK, "ok"),
        Ok(Err((status, why))) => local_reply(status, why),
        Err(_) => local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the app did not answer within {}s", limit.as_secs()),
        ),
    }
}
