//! What an injected pod's kubelet sees: the probes the injector rewrote
//! reach the sidecar's agent port (15020), and the sidecar runs the app's
//! original checks, answering as the app does. `/quitquitquit` ends the
//! sidecar (Jobs in legacy mode), and `mesh-proxy wait` (the legacy
//! postStart hook) says why it is still waiting.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use mesh_injector::{Config as InjectConfig, NamespacePolicy, Outcome};
use mesh_proxy::Config;

const POD_IP: &str = "127.0.10.81";

/// The pod as its Deployment's template would have it.
const POD: &str = "
apiVersion: v1
kind: Pod
metadata: {name: details-v1-0, namespace: default}
spec:
  containers:
    - name: details
      image: bookinfo/details:1.0
      ports: [{name: http, containerPort: 9080}]
      readinessProbe: {httpGet: {path: /health, port: http}}
      livenessProbe: {tcpSocket: {port: 9080}, timeoutSeconds: 2}
      startupProbe: {httpGet: {path: /status/500, port: 9080}}
";

fn injected() -> Pod {
    let pod: Pod = serde_json::from_value(
        serde_json::to_value(serde_saphyr::from_str::<serde_json::Value>(POD).unwrap()).unwrap(),
    )
    .unwrap();
    match mesh_injector::inject(
        &pod,
        "default",
        &NamespacePolicy::Enabled,
        &InjectConfig::default(),
    )
    .unwrap()
    {
        Outcome::Injected(p) => *p,
        Outcome::Skipped(why) => panic!("not injected: {why}"),
    }
}

/// kubelet's view: the URLs the rewritten probes name, on the pod's IP.
fn probe_urls(pod: &Pod) -> [String; 3] {
    let app = &pod.spec.as_ref().unwrap().containers[0];
    let url = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().unwrap().http_get.as_ref().unwrap();
        let port = match &get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
            other => panic!("probe port {other:?}"),
        };
        format!("http://{POD_IP}:{port}{}", get.path.as_deref().unwrap())
    };
    [
        url(&app.readiness_probe),
        url(&app.liveness_probe),
        url(&app.startup_probe),
    ]
}

fn sidecar_env(pod: &Pod, name: &str) -> String {
    let proxy = pod
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.name == "mesh-proxy")
        .unwrap();
    proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .unwrap()
        .value
        .clone()
        .unwrap()
}

/// Starts the sidecar the injector gave `pod` (its app probes; no control
/// plane: probes need none) on `ip`, and waits until kubelet's `ready`
/// probe passes through it.
async fn sidecar_until_ready(
    pod: &Pod,
    proxy_id: &str,
    ip: IpAddr,
    ready: &str,
) -> (
    tokio::task::JoinHandle<Result<(), mesh_proxy::ProxyError>>,
    reqwest::Client,
) {
    let cfg = Config {
        app_probers: serde_json::from_str(&sidecar_env(pod, "MESH_APP_PROBERS")).unwrap(),
        ..Config::new(
            proxy_id,
            mesh_identity::SpiffeId::new("cluster.local", "default", "default"),
            ip,
            "127.0.0.1:9".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
        )
    };
    let proxy = tokio::spawn(mesh_proxy::run(cfg, std::future::pending()));
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = http.get(ready).send().await;
        if answer.as_ref().is_ok_and(|r| r.status() == 200) {
            return (proxy, http);
        }
        assert!(
            Instant::now() < deadline,
            "the readiness probe {ready} never passed: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, String) {
    let r = http.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn kubelet_probes_reach_the_app_through_the_sidecar() {
    let pod = injected();
    let [ready, live, startup] = probe_urls(&pod);
    assert_eq!(
        ready,
        format!("http://{POD_IP}:15020/app-health/details/readyz")
    );
    let ip: IpAddr = POD_IP.parse().unwrap();

    // The app, and the sidecar with what the injector gave it. No control
    // plane runs: probes do not need one.
    let (app_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = tokio::spawn(mesh_samples::serve(
        mesh_samples::Service::Details,
        "v1",
        SocketAddr::new(ip, mesh_samples::PORT),
        None,
        &[],
        async move {
            let _ = stopped.await;
        },
    ));
    let (proxy, http) = sidecar_until_ready(&pod, "details-v1-0.default", ip, &ready).await;
    assert_eq!(get(&http, &live).await.0, 200);
    // The app's own failure comes through as its status.
    assert_eq!(
        get(&http, &startup).await,
        (500, "the app answered 500 Internal Server Error\n".into())
    );
    assert_eq!(
        get(
            &http,
            &format!("http://{POD_IP}:15020/app-health/other/readyz")
        )
        .await
        .0,
        404
    );

    // The app goes away: both probes fail, saying why.
    app_stop.send(()).unwrap();
    app.await.unwrap().unwrap();
    let (status, why) = get(&http, &live).await;
    assert_eq!(status, 503);
    assert!(
        why.starts_with(&format!("cannot connect to the app on {POD_IP}:9080")),
        "{why}"
    );
    let (status, why) = get(&http, &ready).await;
    assert_eq!(status, 503);
    assert!(
        why.starts_with(&format!("cannot reach the app on {POD_IP}:9080")),
        "{why}"
    );

    // The legacy postStart hook waits, and says what it waited for.
    let health: SocketAddr = format!("{POD_IP}:15021").parse().unwrap();
    let err = tokio::task::spawn_blocking(move || {
        mesh_proxy::cli::wait_ready(health, Duration::from_secs(1))
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(
        err,
        "the proxy was not ready within 1s: no certificate from citadel yet"
    );

    // A Job's last container is done: /quitquitquit ends the sidecar.
    let r = http
        .post(format!("http://{POD_IP}:15020/quitquitquit"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), proxy)
        .await
        .expect("the sidecar did not exit after /quitquitquit")
        .unwrap()
        .unwrap();
}

/// An app whose probes are HTTPS and gRPC, as kubelet would run them.
const SECURE_POD: &str = "
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: default}
spec:
  containers:
    - name: api
      image: example/api:1.0
      readinessProbe: {httpGet: {path: /healthz, port: 8443, scheme: HTTPS}}
      livenessProbe: {grpc: {port: 9090}}
";

/// A TLS server on `addr` with a self-signed certificate, answering
/// `/healthz` 200 and everything else 404.
async fn https_app(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["api.example".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let acceptor = mesh_tests::tls_acceptor(&cert, &key);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let status = if req.uri().path() == "/healthz" {
                            200
                        } else {
                            404
                        };
                        let mut resp = hyper::Response::new(http_body_util::Empty::<
                            hyper::body::Bytes,
                        >::new());
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    })
}

/// HTTPS and gRPC probes are moved onto the agent port too, as Istio
/// moves them: the sidecar runs an HTTPS GET taking any certificate (as
/// kubelet does) and the gRPC health check, answering as the app does.
#[tokio::test]
async fn https_and_grpc_probes_reach_the_app_through_the_sidecar() {
    const IP: &str = "127.0.10.82";
    let pod: Pod = serde_json::from_value(serde_saphyr::from_str(SECURE_POD).unwrap()).unwrap();
    let Outcome::Injected(pod) = mesh_injector::inject(
        &pod,
        "default",
        &NamespacePolicy::Enabled,
        &InjectConfig::default(),
    )
    .unwrap() else {
        panic!("not injected");
    };
    let app = &pod.spec.as_ref().unwrap().containers[0];
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().unwrap().http_get.as_ref().unwrap();
        format!("http://{IP}:15020{}", get.path.as_deref().unwrap())
    };
    let (ready, live) = (path(&app.readiness_probe), path(&app.liveness_probe));
    assert!(app.liveness_probe.as_ref().unwrap().grpc.is_none(), "moved");

    let ip: IpAddr = IP.parse().unwrap();
    let https = https_app(SocketAddr::new(ip, 8443)).await;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve(SocketAddr::new(ip, 9090)),
    );
    let (_proxy, http) = sidecar_until_ready(&pod, "api-0.default", ip, &ready).await;
    assert_eq!(get(&http, &live).await, (200, "ok\n".into()));

    // The app says it is not serving: the liveness probe fails, saying so.
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    assert_eq!(
        get(&http, &live).await,
        (503, "the app's gRPC health is NOT_SERVING\n".into())
    );
    // The HTTPS server goes away: the readiness probe fails.
    https.abort();
    let _ = https.await;
    let (status, why) = get(&http, &ready).await;
    assert_eq!(status, 503, "{why}");
    grpc.abort();
}
