//! Identity for every part of the mesh: SPIFFE IDs, the credentials a
//! workload holds, and rustls configs whose verifiers check the peer's SPIFFE
//! ID, not a DNS name.
#![forbid(unsafe_code)]

pub mod backoff;
mod cert;
pub mod grpc;
pub mod renew;
mod spiffe;
mod tls;
pub mod workload;

pub use cert::{Credentials, CredentialsError, identity_of, not_after, root_store, sha256_hex};
pub use spiffe::{DEFAULT_TRUST_DOMAIN, ParseError, SpiffeId};
pub use tls::{PeerIdentity, client_config, peer_identity, server_config};

/// The ring provider, the only one the mesh compiles in.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
