//! What the proxy asks of the operating system about a connection, behind
//! a trait so tests can stand in for it.

use std::net::SocketAddr;

use tokio::net::TcpStream;

pub trait Sockets: Send + Sync + 'static {
    /// Where the client meant to connect before interception redirected it
    /// here, or `None` if the connection was not redirected.
    fn original_dst(&self, tcp: &TcpStream) -> Option<SocketAddr>;
}

/// Linux: `SO_ORIGINAL_DST` (IPv4) / `IP6T_SO_ORIGINAL_DST` (IPv6), as set
/// by an iptables REDIRECT.
pub struct Linux;

impl Sockets for Linux {
    fn original_dst(&self, tcp: &TcpStream) -> Option<SocketAddr> {
        let local = tcp.local_addr().ok()?;
        let sock = socket2::SockRef::from(tcp);
        let dst = if local.is_ipv4() {
            sock.original_dst_v4()
        } else {
            sock.original_dst_v6()
        };
        dst.ok()
            .and_then(|a| a.as_socket())
            .filter(|dst| *dst != local)
    }
}

/// hyper's connector for plain HTTP (to the app, passthrough, endpoints
/// without a sidecar) and under originated TLS: dials the URI's address
/// within `timeout` (a DestinationRule's connectTimeout, or
/// [`DIAL_TIMEOUT`]), marking the socket if the proxy is configured to.
#[derive(Clone, Copy, Debug)]
pub struct Dialer {
    pub mark: Option<u32>,
    pub timeout: std::time::Duration,
}

/// How long a plain connect may take: Istio's default `connectTimeout`.
pub const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Dialer {
    pub fn new(mark: Option<u32>, timeout: Option<std::time::Duration>) -> Self {
        Self {
            mark,
            timeout: timeout.unwrap_or(DIAL_TIMEOUT),
        }
    }

    /// A pooling plaintext client over this dialer, speaking HTTP/2 only
    /// (prior knowledge) or HTTP/1.1.
    pub fn client<B>(self, h2: bool) -> hyper_util::client::legacy::Client<Self, B>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
    {
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(h2)
            .build(self)
    }
}

/// A dialed plain connection. hyper-util's own TCP connection reports
/// its addresses (`HttpInfo`), which its client then copies into every
/// response's extensions: three allocations a request that nothing here
/// reads. This one reports nothing.
pub struct Plain(hyper_util::rt::TokioIo<TcpStream>);

impl hyper_util::client::legacy::connect::Connection for Plain {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl hyper::rt::Read for Plain {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Plain {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

impl tower::Service<http::Uri> for Dialer {
    type Response = Plain;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let Dialer { mark, timeout } = *self;
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let ip: std::net::IpAddr = host.parse().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{host:?} is not an IP address"),
                )
            })?;
            let addr = SocketAddr::new(ip, uri.port_u16().unwrap_or(80));
            let tcp = tokio::time::timeout(timeout, mesh_identity::grpc::dial(addr, mark))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect to {addr} timed out after {timeout:?}"),
                    )
                })??;
            tcp.set_nodelay(true)?;
            Ok(Plain(hyper_util::rt::TokioIo::new(tcp)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(Linux.original_dst(&server), None);
    }
}

/// Through a real iptables REDIRECT, in a network namespace of this test's
/// own thread (it disappears when the thread ends).
#[cfg(test)]
mod redirect_tests {
    use super::*;

    fn skip_reason() -> Option<String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Some("needs root (network namespace and iptables)".into());
        }
        if std::process::Command::new("iptables")
            .arg("--version")
            .output()
            .is_err()
        {
            return Some("needs the iptables binary (Debian package iptables)".into());
        }
        None
    }

    fn run(cmd: &[&str]) {
        let out = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_redirected_connection_reports_where_it_was_going() {
        if let Some(why) = skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
        std::thread::spawn(|| {
            // Only this thread (and what it starts) enters the new namespace.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            run(&["ip", "link", "set", "lo", "up"]);
            run(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                "127.0.0.1",
                "--dport",
                "9080",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ]);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:15001")
                    .await
                    .unwrap();
                let _client = TcpStream::connect("127.0.0.1:9080").await.unwrap();
                let (server, _) = listener.accept().await.unwrap();
                assert_eq!(server.local_addr().unwrap().port(), 15001);
                assert_eq!(
                    Linux.original_dst(&server),
                    Some("127.0.0.1:9080".parse().unwrap())
                );
            });
        })
        .join()
        .unwrap();
    }
}
