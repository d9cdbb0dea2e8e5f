//! Istio's own resource shapes (networking.istio.io), as users write them.
//! Only what the mesh acts on is typed here; other fields are accepted and
//! ignored until their issue types them.

use std::collections::BTreeMap;

use serde::Deserialize;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target_port: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub address: String,
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub service_account: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct VirtualService {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct HttpMatchRequest {
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
}

/// Istio's StringMatch: exactly one of exact, prefix, regex.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Destination {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct DestinationRule {
    pub host: String,
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

/// security.istio.io PeerAuthentication: what a workload's inbound side
/// accepts. `selector` picks workloads by label; without one it covers its
/// namespace (or, in the root namespace, the whole mesh).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    #[serde(default)]
    pub selector: Option<MatchLabels>,
    #[serde(default)]
    pub mtls: Option<PeerMtls>,
    /// Keyed by port number (YAML keys arrive as text).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, PeerMtls>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MatchLabels {
    #[serde(default)]
    pub match_labels: Labels,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct PeerMtls {
    /// UNSET (inherit), DISABLE, PERMISSIVE or STRICT.
    #[serde(default)]
    pub mode: Option<String>,
}

/// security.istio.io AuthorizationPolicy. Unknown fields are refused (a
/// misspelt field in a security policy must not be silently dropped).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub selector: Option<MatchLabels>,
    #[serde(default)]
    pub target_ref: Option<serde_json::Value>,
    #[serde(default)]
    pub target_refs: Vec<serde_json::Value>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub provider: Option<serde_json::Value>,
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    #[serde(default)]
    pub from: Vec<AuthzFrom>,
    #[serde(default)]
    pub to: Vec<AuthzTo>,
    #[serde(default)]
    pub when: Vec<AuthzCondition>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthzFrom {
    #[serde(default)]
    pub source: AuthzSource,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthzTo {
    #[serde(default)]
    pub operation: AuthzOperation,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzSource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzOperation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzCondition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// security.istio.io RequestAuthentication: JWT rules for the workloads
/// it selects. Unknown fields are refused.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthentication {
    #[serde(default)]
    pub selector: Option<MatchLabels>,
    #[serde(default)]
    pub target_ref: Option<serde_json::Value>,
    #[serde(default)]
    pub target_refs: Vec<serde_json::Value>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtHeader {
    pub name: String,
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}
