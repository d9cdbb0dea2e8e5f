//! JWKS documents that RequestAuthentication rules name by `jwksUri`:
//! pilot fetches them (as istiod does), keeps the last good copy, and
//! hands it to the proxies inline; a rule whose keys have not been fetched
//! yet goes out without keys, so its tokens are refused rather than
//! trusted.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

fn cache() -> &'static Mutex<HashMap<String, String>> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// The last JWKS fetched from `uri`, if any.
pub fn cached(uri: &str) -> Option<String> {
    cache().lock().unwrap().get(uri).cloned()
}

/// Records a fetched JWKS; returns whether it differs from the copy held.
pub fn store(uri: &str, jwks: String) -> bool {
    cache()
        .lock()
        .unwrap()
        .insert(uri.to_string(), jwks.clone())
        != Some(jwks)
}
