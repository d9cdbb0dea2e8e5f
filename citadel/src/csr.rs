//! What citadel accepts as a certificate signing request: one well-formed
//! PEM PKCS#10 request, no larger than [`MAX_CSR_BYTES`], whose
//! self-signature verifies, over an ECDSA P-256/P-384 or RSA ≥ 2048-bit
//! key, asking for exactly one SAN: a SPIFFE URI.

use mesh_identity::SpiffeId;
use rcgen::CertificateSigningRequestParams;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// A CSR is a few hundred bytes; an RSA-4096 one under 2 KiB.
pub const MAX_CSR_BYTES: usize = 8 * 1024;
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("csr is {0} bytes; at most {MAX_CSR_BYTES} are accepted")]
    TooLarge(usize),
    #[error("csr is not PEM ('-----BEGIN CERTIFICATE REQUEST-----'): {0}")]
    NotPem(String),
    #[error("csr is not a valid PKCS#10 request: {0}")]
    Malformed(String),
    #[error("csr's self-signature does not verify: it was not signed by the key it carries")]
    BadSignature,
    #[error("csr's key is {0}; use ECDSA P-256 or P-384, or RSA of at least {MIN_RSA_BITS} bits")]
    WeakKey(String),
    #[error(
        "csr has no subject alternative name; put the workload's SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>) in a URI SAN"
    )]
    NoSan,
    #[error("csr has {0} subject alternative names; exactly one SPIFFE URI SAN is allowed")]
    ManySans(usize),
    #[error("csr's subject alternative name is {0}, not a SPIFFE URI")]
    NotUri(String),
    #[error("csr's URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(String),
    #[error("csr asks for an extension citadel does not sign ({0}); send only the URI SAN")]
    Extension(String),
}

/// A CSR that passed every check.
pub struct CheckedCsr {
    pub identity: SpiffeId,
    pub params: CertificateSigningRequestParams,
}

pub fn check(pem: &str) -> Result<CheckedCsr, CsrError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(pem.len()));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::NotPem(e.to_string()))?;
    check_der(&der)
}

/// [`check`] for a request already out of its PEM armour.
pub fn check_der(der: &CertificateSigningRequestDer<'_>) -> Result<CheckedCsr, CsrError> {
    if der.as_ref().len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.as_ref().len()));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    check_key(&csr)?;
    let identity = one_spiffe_san(&csr)?;
    // rcgen verifies the self-signature and takes the key out.
    let params = CertificateSigningRequestParams::from_der(der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
        rcgen::Error::UnsupportedExtension => {
            CsrError::Extension("an extension other than SAN, key usage, basic constraints".into())
        }
        other => CsrError::Malformed(other.to_string()),
    })?;
    Ok(CheckedCsr { identity, params })
}

fn check_key(csr: &X509CertificationRequest<'_>) -> Result<(), CsrError> {
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => Ok(()),
            Some(c) => Err(CsrError::WeakKey(format!("ECDSA on curve {c}"))),
            None => Err(CsrError::WeakKey("ECDSA without a named curve".into())),
        };
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        return match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= MIN_RSA_BITS => Ok(()),
            Ok(PublicKey::RSA(rsa)) => Err(CsrError::WeakKey(format!("RSA-{}", rsa.key_size()))),
            _ => Err(CsrError::Malformed("unreadable RSA key".into())),
        };
    }
    Err(CsrError::WeakKey(format!("of algorithm {alg}")))
}

fn one_spiffe_san(csr: &X509CertificationRequest<'_>) -> Result<SpiffeId, CsrError> {
    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            names.extend(san.general_names.iter());
        }
    }
    match names.as_slice() {
        [] => Err(CsrError::NoSan),
        [GeneralName::URI(uri)] => uri
            .parse()
            .map_err(|e: mesh_identity::ParseError| CsrError::NotSpiffe(e.to_string())),
        [other] => Err(CsrError::NotUri(other.to_string())),
        many => Err(CsrError::ManySans(many.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

    fn csr_with(alg: &'static rcgen::SignatureAlgorithm, sans: Vec<SanType>) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = sans;
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn spiffe(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    const ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

    #[test]
    fn accepts_p256_and_p384_with_one_spiffe_san() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let c = check(&csr_with(alg, vec![spiffe(ID)])).unwrap();
            assert_eq!(c.identity.to_string(), ID);
        }
    }

    #[test]
    fn refuses_what_is_not_one_spiffe_uri() {
        let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
        assert_eq!(check(&csr_with(alg, vec![])).err(), Some(CsrError::NoSan));
        assert_eq!(
            check(&csr_with(alg, vec![spiffe(ID), spiffe(ID)])).err(),
            Some(CsrError::ManySans(2))
        );
        assert!(matches!(
            check(&csr_with(
                alg,
                vec![SanType::DnsName("a.b".try_into().unwrap())]
            )),
            Err(CsrError::NotUri(_))
        ));
        assert!(matches!(
            check(&csr_with(alg, vec![spiffe("https://example.com/x")])),
            Err(CsrError::NotSpiffe(_))
        ));
    }

    #[test]
    fn refuses_garbage_oversize_and_tampering() {
        assert!(matches!(check("hello"), Err(CsrError::NotPem(_))));
        assert!(matches!(
            check(&"x".repeat(MAX_CSR_BYTES + 1)),
            Err(CsrError::TooLarge(_))
        ));
        // Flip a byte inside the signed part: the self-signature breaks.
        let pem = csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, vec![spiffe(ID)]);
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // Ask for another identity without re-signing: same length, new name.
        let at = der.windows(7).position(|w| w == b"reviews").unwrap();
        der[at..at + 7].copy_from_slice(b"ratings");
        let tampered = crate::material::pem_block("CERTIFICATE REQUEST", &der);
        assert_eq!(check(&tampered).err(), Some(CsrError::BadSignature));
    }
}
