//! What a captured outbound connection speaks, told from its first bytes,
//! which are only peeked (whoever takes the connection reads them again):
//! a TLS ClientHello (and the server name it asks for), HTTP, or anything
//! else. A client that says nothing within the detection timeout is taken
//! for a server-first protocol (MySQL, SMTP, ...) and never waits longer.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Debug, PartialEq, Eq)]
pub enum Detected {
    Http,
    /// TLS, with the ClientHello's server name when it has one.
    Tls(Option<String>),
    /// Neither, or silence: opaque bytes.
    Opaque,
    /// The client went away before saying anything.
    Closed,
}

/// How long a ClientHello that has begun may take to arrive whole when no
/// detection timeout bounds it.
const HELLO_WITHIN: Duration = Duration::from_secs(1);

/// Looks at the first bytes of `tcp`; `within: None` waits for the client
/// however long it takes.
pub async fn detect(tcp: &TcpStream, within: Option<Duration>) -> Detected {
    let deadline = within.map(|d| Instant::now() + d);
    let mut first = [0u8; 1];
    let peeked = match deadline {
        Some(at) => match tokio::time::timeout_at(at, tcp.peek(&mut first)).await {
            Ok(r) => r,
            Err(_) => return Detected::Opaque,
        },
        None => tcp.peek(&mut first).await,
    };
    match (peeked, first[0]) {
        (Ok(0) | Err(_), _) => Detected::Closed,
        // A TLS handshake record.
        (Ok(_), 0x16) => Detected::Tls(server_name(tcp, deadline).await),
        // Every HTTP/1 method, and HTTP/2's preface (`PRI * HTTP/2.0`),
        // starts with an upper-case letter.
        (Ok(_), b'A'..=b'Z') => Detected::Http,
        _ => Detected::Opaque,
    }
}

/// The server name of the ClientHello `tcp` starts with, waiting (until
/// `deadline`, else [`HELLO_WITHIN`]) for a hello split across segments.
/// `None` when it names none, is not a ClientHello, or does not arrive.
pub async fn server_name(tcp: &TcpStream, deadline: Option<Instant>) -> Option<String> {
    let deadline = deadline.unwrap_or_else(|| Instant::now() + HELLO_WITHIN);
    // A ClientHello fits one TLS record: at most 16 KiB and its header.
    let mut buf = vec![0u8; 16 * 1024 + 5];
    let mut seen = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n > seen {
            seen = n;
            match parse_hello(&buf[..n]) {
                Hello::Complete(name) => return name,
                Hello::NotTls => return None,
                Hello::Partial if n == buf.len() => return None,
                Hello::Partial => {}
            }
        }
        // `peek` returns at once while anything is buffered: wait a little
        // for the rest of the hello rather than spin.
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

enum Hello {
    Complete(Option<String>),
    Partial,
    NotTls,
}

fn parse_hello(bytes: &[u8]) -> Hello {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    if acceptor.read_tls(&mut reader).is_err() {
        return Hello::NotTls;
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Hello::Complete(
            accepted
                .client_hello()
                .server_name()
                .map(str::to_ascii_lowercase),
        ),
        Ok(None) => Hello::Partial,
        Err(_) => Hello::NotTls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connection whose client wrote `first` (nothing when empty).
    async fn pair(first: &[u8]) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        if !first.is_empty() {
            client.write_all(first).await.unwrap();
        }
        let (server, _) = listener.accept().await.unwrap();
        (server, client)
    }

    /// A real ClientHello for `name`, as rustls writes it.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    use std::sync::Arc;

    #[tokio::test]
    async fn tells_tls_with_its_server_name_http_and_opaque_bytes_apart() {
        let within = Some(Duration::from_millis(500));
        let hello = client_hello("DB.Example.com");
        let (s, _c) = pair(&hello).await;
        assert_eq!(
            detect(&s, within).await,
            Detected::Tls(Some("db.example.com".into()))
        );
        let (s, _c) = pair(b"GET / HTTP/1.1\r\n").await;
        assert_eq!(detect(&s, within).await, Detected::Http);
        let (s, _c) = pair(b"PRI * HTTP/2.0\r\n").await;
        assert_eq!(detect(&s, within).await, Detected::Http);
        let (s, _c) = pair(b"\x00\x01binary").await;
        assert_eq!(detect(&s, within).await, Detected::Opaque);
        // Peeked, not read: the bytes are still there for whoever takes it.
        let mut again = [0u8; 3];
        s.peek(&mut again).await.unwrap();
        assert_eq!(&again, b"\x00\x01b");
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_once_the_timeout_passes() {
        let (s, _c) = pair(b"").await;
        let started = Instant::now();
        assert_eq!(
            detect(&s, Some(Duration::from_millis(50))).await,
            Detected::Opaque
        );
        assert!(started.elapsed() < Duration::from_millis(500));
        let (s, c) = pair(b"").await;
        drop(c);
        assert_eq!(detect(&s, None).await, Detected::Closed);
    }

    #[tokio::test]
    async fn a_hello_split_across_writes_is_read_whole() {
        let hello = client_hello("split.example.com");
        let (s, mut c) = pair(&hello[..20]).await;
        let rest = hello[20..].to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            c.write_all(&rest).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        assert_eq!(
            detect(&s, Some(Duration::from_millis(500))).await,
            Detected::Tls(Some("split.example.com".into()))
        );
    }
}
