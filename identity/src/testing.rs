//! Credentials for tests: a CA of the test's own and leaves it issues.
//! Nothing here runs in the mesh; citadel issues the real ones.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

use crate::{Credentials, SpiffeId};

/// Credentials for each of `ids`, issued by one new CA, each trusting it.
pub fn credentials<const N: usize>(ids: [&SpiffeId; N]) -> [Credentials; N] {
    let ca_key = KeyPair::generate().expect("a P-256 key");
    let mut params = CertificateParams::new(vec![]).expect("no names");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).expect("a self-signed CA");
    let issuer = Issuer::new(params, ca_key);
    ids.map(|id| {
        let key = KeyPair::generate().expect("a P-256 key");
        let mut leaf = CertificateParams::new(vec![]).expect("no names");
        leaf.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .expect("a SPIFFE ID is an IA5 string"),
        )];
        let cert = leaf.signed_by(&key, &issuer).expect("a leaf");
        Credentials::from_pem(&cert.pem(), &key.serialize_pem(), &ca.pem())
            .expect("the PEM just written")
    })
}
