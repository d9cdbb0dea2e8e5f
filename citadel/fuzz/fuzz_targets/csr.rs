//! Citadel's CSR checks on arbitrary input: they must refuse with an error,
//! never panic, hang or accept something that is not one SPIFFE URI SAN.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Both ways in: the PEM text a caller sends, and the DER inside it
    // (which lets the fuzzer work on the structure directly).
    if let Ok(text) = std::str::from_utf8(data) {
        check_accepted(mesh_citadel::csr::check(text));
    }
    let der = rustls_pki_types::CertificateSigningRequestDer::from(data);
    check_accepted(mesh_citadel::csr::check_der(&der));
});

fn check_accepted(result: Result<mesh_citadel::csr::CheckedCsr, mesh_citadel::csr::CsrError>) {
    if let Ok(csr) = result {
        // Anything accepted names a SPIFFE identity.
        assert!(csr.identity.to_string().starts_with("spiffe://"));
    }
}
