//! RequestAuthentication: JWTs checked on the inbound side, as Istio does.
//!
//! A request without a token passes (AuthorizationPolicy decides whether a
//! request principal is required). A token is looked for where the rules
//! say (by default `Authorization: Bearer …` and the `access_token` query
//! parameter); if one is found, it must be signed by a key of the JWKS of
//! the rule for its issuer, unexpired (60 s leeway), not before its `nbf`,
//! and for one of the rule's audiences if it names any. Otherwise the
//! request is refused with 401. A valid token gives the request principal
//! `<iss>/<sub>` and its claims for AuthorizationPolicy conditions.

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use mesh_proto::resources as pb;
use serde_json::Value;

/// What a valid token tells the authorization policies.
#[derive(Clone, Debug, Default)]
pub struct Verified {
    /// `<iss>/<sub>`.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub claims: Value,
}

#[derive(Debug)]
pub enum Outcome {
    /// No token where the rules look.
    Absent,
    Valid(Verified),
    /// A token, refused; the reason is for logs.
    Invalid(String),
}

enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
}

struct Rule {
    source: String,
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<(Option<String>, DecodingKey)>,
    locations: Vec<Location>,
    forward: bool,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, String)>,
}

/// The JWT rules for one workload, compiled (JWKS parsed).
#[derive(Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.rules.iter().map(|r| &r.issuer))
            .finish()
    }
}

impl Rules {
    pub fn compile(rules: &[pb::JwtRule]) -> Result<Self, String> {
        let mut out = Vec::new();
        for r in rules {
            let at = |e: String| {
                format!(
                    "RequestAuthentication {} issuer {}: {e}",
                    r.source, r.issuer
                )
            };
            let keys = if r.jwks.is_empty() {
                // Not fetched (yet): every token of this issuer is refused.
                Vec::new()
            } else {
                let set: JwkSet = serde_json::from_str(&r.jwks)
                    .map_err(|e| at(format!("jwks is not a JWKS document: {e}")))?;
                set.keys
                    .iter()
                    .map(|k| {
                        DecodingKey::from_jwk(k)
                            .map(|d| (k.common.key_id.clone(), d))
                            .map_err(|e| at(format!("jwks key {:?}: {e}", k.common.key_id)))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            };
            let mut locations = Vec::new();
            for h in &r.from_headers {
                let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                    at(format!(
                        "fromHeaders name {:?} is not a header name",
                        h.name
                    ))
                })?;
                locations.push(Location::Header {
                    name,
                    prefix: h.prefix.clone(),
                });
            }
            locations.extend(r.from_params.iter().cloned().map(Location::Param));
            if locations.is_empty() {
                locations.push(Location::Header {
                    name: http::header::AUTHORIZATION,
                    prefix: "Bearer ".into(),
                });
                locations.push(Location::Param("access_token".into()));
            }
            let header = |h: &str| {
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| at(format!("{h:?} is not a header name")))
            };
            out.push(Rule {
                source: r.source.clone(),
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                keys,
                locations,
                forward: r.forward_original_token,
                payload_header: (!r.output_payload_to_header.is_empty())
                    .then(|| header(&r.output_payload_to_header))
                    .transpose()?,
                claim_headers: r
                    .output_claim_to_headers
                    .iter()
                    .map(|c| Ok((header(&c.header)?, c.claim.clone())))
                    .collect::<Result<_, String>>()?,
            });
        }
        Ok(Self { rules: out })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Checks the token of a request, and on success applies the rule's
    /// header outputs (and removes the token unless it is forwarded).
    pub fn check(&self, uri: &Uri, headers: &mut HeaderMap) -> Outcome {
        let Some(token) = self.find_token(uri, headers) else {
            return Outcome::Absent;
        };
        let Some(iss) = unverified_issuer(&token) else {
            return Outcome::Invalid("the token is not a JWT".into());
        };
        let Some(rule) = self.rules.iter().find(|r| r.issuer == iss) else {
            return Outcome::Invalid(format!("no RequestAuthentication accepts issuer {iss:?}"));
        };
        let verified = match rule.verify(&token) {
            Ok(v) => v,
            Err(e) => return Outcome::Invalid(format!("{} ({})", e, rule.source)),
        };
        if !rule.forward {
            for loc in &rule.locations {
                if let Location::Header { name, .. } = loc {
                    headers.remove(name);
                }
            }
        }
        if let Some(h) = &rule.payload_header {
            let payload = token.split('.').nth(1).unwrap_or_default();
            if let Ok(v) = HeaderValue::from_str(payload) {
                headers.insert(h.clone(), v);
            }
        }
        for (h, claim) in &rule.claim_headers {
            let v = match verified.claims.get(claim) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Bool(b)) => Some(b.to_string()),
                _ => None,
            };
            if let Some(v) = v.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(h.clone(), v);
            }
        }
        Outcome::Valid(verified)
    }

    fn find_token(&self, uri: &Uri, headers: &HeaderMap) -> Option<String> {
        let param = |name: &str| crate::wire::query_param(uri.query(), name).map(str::to_string);
        for r in &self.rules {
            for loc in &r.locations {
                let found = match loc {
                    Location::Header { name, prefix } => headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix(prefix.as_str()))
                        .map(|t| t.trim().to_string()),
                    Location::Param(p) => param(p),
                };
                if let Some(t) = found.filter(|t| !t.is_empty()) {
                    return Some(t);
                }
            }
        }
        None
    }
}

impl Rule {
    fn verify(&self, token: &str) -> Result<Verified, String> {
        if self.keys.is_empty() {
            return Err("no key for this issuer (its JWKS could not be fetched)".into());
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("bad JWT header: {e}"))?;
        let candidates: Vec<&DecodingKey> = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|(k, _)| k.as_deref() == Some(kid.as_str()))
                .map(|(_, d)| d)
                .collect(),
            None => self.keys.iter().map(|(_, d)| d).collect(),
        };
        if candidates.is_empty() {
            return Err(format!("no JWKS key with kid {:?}", header.kid));
        }
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims.clear();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
        }
        let mut last = String::new();
        for key in candidates {
            match jsonwebtoken::decode::<Value>(token, key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    let sub = claims
                        .get("sub")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let audiences = match claims.get("aud") {
                        Some(Value::String(a)) => vec![a.clone()],
                        Some(Value::Array(a)) => a
                            .iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect(),
                        _ => vec![],
                    };
                    return Ok(Verified {
                        principal: format!("{}/{sub}", self.issuer),
                        audiences,
                        presenter: claims
                            .get("azp")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        claims,
                    });
                }
                Err(e) => last = describe(&e),
            }
        }
        Err(last)
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidSignature => "the token's signature does not verify".into(),
        K::InvalidAudience => "the token is not for an accepted audience".into(),
        K::InvalidIssuer => "the token's issuer is not accepted".into(),
        K::InvalidAlgorithm => "the token's algorithm does not fit the key".into(),
        other => format!("the token is invalid: {other:?}"),
    }
}

/// The `iss` claim, read without verifying (to pick the rule that will).
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_string)
}
