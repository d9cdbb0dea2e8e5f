//! Distributed tracing. Every HTTP request a sidecar carries joins a trace:
//! the one its headers name (W3C `traceparent`, else B3's single `b3`
//! header, else B3's `x-b3-*` headers) or a new one. The sidecar writes its
//! own span's context back into the request in both W3C and B3 form, so
//! that an app which copies those headers onto its own calls (as Istio asks
//! apps to) links the next hop under it, and gives the request an
//! `x-request-id` when it has none.
//!
//! Whether a trace is recorded is decided once, where it starts: an
//! incoming decision is kept; a new trace is sampled at the Telemetry
//! resource's percentage (1 % unless set). Only sampled requests cost more
//! than a few header writes: their spans go, without waiting, into a
//! bounded queue that one task exports to the OTLP/gRPC collector in
//! batches. A full queue (collector slow or stalled) drops the span; a
//! failed export drops its batch; both are counted in the proxy's metrics
//! and logged, and no request ever waits on either.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_proto::resources as pb;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::mpsc;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Spans waiting for export, at most; more are dropped.
pub const QUEUE: usize = 2048;
/// Spans per export call, at most.
const BATCH: usize = 512;
/// How long a batch waits to fill before it goes.
const BATCH_DELAY: Duration = Duration::from_millis(200);
/// An export (its retries included) that takes longer is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A trace-context header the proxy reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    Traceparent = 0,
    B3 = 1,
    XB3 = 2,
}

impl Header {
    pub const ALL: [Header; 3] = [Header::Traceparent, Header::B3, Header::XB3];

    pub fn label(self) -> &'static str {
        match self {
            Header::Traceparent => "traceparent",
            Header::B3 => "b3",
            Header::XB3 => "x-b3",
        }
    }
}

/// The span a request arrived under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
}

/// What a request's headers say of its trace.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    pub parent: Option<Parent>,
    /// The caller's sampling decision, when it made one.
    pub sampled: Option<bool>,
    /// A header present but unreadable (the request then starts afresh
    /// from the next format, or a new trace).
    pub malformed: Option<Header>,
    /// The caller used B3's single header: answered in kind.
    pub single_b3: bool,
}

/// Lowercase hex of exactly `len` (at most 32) digits, as W3C requires;
/// not zero. Read through a table in two 64-bit halves rather than a
/// `u128` shifted a digit at a time: every request carries a trace id and
/// a span id (ARCHITECTURE.md, "Where the instructions go now").
fn hex(s: &str, len: usize) -> Option<u128> {
    if s.len() != len || len > 32 {
        return None;
    }
    let (hi, lo) = s.as_bytes().split_at(len.saturating_sub(16));
    let v = u128::from(hex_word(hi)?) << 64 | u128::from(hex_word(lo)?);
    (v != 0).then_some(v)
}

/// Up to 16 lowercase hex digits.
fn hex_word(digits: &[u8]) -> Option<u64> {
    let (mut v, mut bad) = (0u64, 0u8);
    for &b in digits {
        let d = NIBBLE[usize::from(b)];
        bad |= d;
        v = (v << 4) | u64::from(d & 0xf);
    }
    (bad & NOT_HEX == 0).then_some(v)
}

/// Each byte's value as a lowercase hex digit, or [`NOT_HEX`].
const NIBBLE: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut i = 0;
    while i < 16 {
        t[HEX_DIGITS[i] as usize] = i as u8;
        i += 1;
    }
    t
};
const NOT_HEX: u8 = 0x80;
const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Each byte as two lowercase hex digits.
const HEX_PAIRS: [[u8; 2]; 256] = {
    let mut t = [[0; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX_DIGITS[i >> 4], HEX_DIGITS[i & 0xf]];
        i += 1;
    }
    t
};

/// B3 ids: lowercase hex; a trace id of 16 or 32 digits.
fn b3_trace_id(s: &str) -> Option<u128> {
    hex(s, 32).or_else(|| hex(s, 16))
}

fn b3_span_id(s: &str) -> Option<u64> {
    hex(s, 16).map(|v| v as u64)
}

/// `version-traceid-parentid-flags`, per W3C Trace Context level 1: a
/// later version may append fields after a dash; version ff is invalid.
fn traceparent(v: &str) -> Option<(Parent, bool)> {
    let b = v.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = v.get(0..2)?;
    if version == "ff" || (version == "00" && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    // Version and flags may be zero, so not through `hex`.
    let lower_hex = |s: &str| {
        s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    let flags = v.get(53..55)?;
    if !lower_hex(version) || !lower_hex(flags) {
        return None;
    }
    let trace_id = hex(v.get(3..35)?, 32)?;
    let span_id = hex(v.get(36..52)?, 16)? as u64;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((Parent { trace_id, span_id }, flags & 1 == 1))
}

fn b3_sampling(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// `b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]`, or a bare
/// sampling decision.
fn b3_single(v: &str) -> Option<(Option<Parent>, Option<bool>)> {
    let parts: Vec<&str> = v.split('-').collect();
    match parts.as_slice() {
        [s] => Some((None, Some(b3_sampling(s)?))),
        [t, s, rest @ ..] if rest.len() <= 2 => {
            let parent = Parent {
                trace_id: b3_trace_id(t)?,
                span_id: b3_span_id(s)?,
            };
            let sampled = match rest.first() {
                Some(x) => Some(b3_sampling(x)?),
                None => None,
            };
            if let Some(p) = rest.get(1) {
                b3_span_id(p)?;
            }
            Some((Some(parent), sampled))
        }
        _ => None,
    }
}

fn text<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<Result<&'a str, ()>> {
    h.get(name).map(|v| v.to_str().map_err(|_| ()))
}

/// Reads a request's trace context: `traceparent` first, then `b3`, then
/// `x-b3-*`. An unreadable header is noted and the next format tried.
pub fn extract(h: &HeaderMap) -> Extracted {
    let mut out = Extracted::default();
    if let Some(v) = text(h, &TRACEPARENT) {
        match v.ok().and_then(traceparent) {
            Some((p, sampled)) => {
                out.parent = Some(p);
                out.sampled = Some(sampled);
                // The form a caller used travels with the context.
                out.single_b3 = h.contains_key(&B3);
                return out;
            }
            None => out.malformed = Some(Header::Traceparent),
        }
    }
    if let Some(v) = text(h, &B3) {
        out.single_b3 = true;
        match v.ok().and_then(b3_single) {
            Some((parent, sampled)) => {
                out.parent = parent;
                out.sampled = sampled;
                return out;
            }
            None => {
                out.malformed.get_or_insert(Header::B3);
            }
        }
    }
    let trace = text(h, &X_B3_TRACEID);
    let span = text(h, &X_B3_SPANID);
    let sampled = text(h, &X_B3_SAMPLED);
    let debug = text(h, &X_B3_FLAGS).is_some_and(|f| f == Ok("1"));
    if trace.is_none() && span.is_none() && sampled.is_none() && !debug {
        return out;
    }
    let parent = match (trace, span) {
        (None, None) => Ok(None),
        (Some(Ok(t)), Some(Ok(s))) => match (b3_trace_id(t), b3_span_id(s)) {
            (Some(trace_id), Some(span_id)) => Ok(Some(Parent { trace_id, span_id })),
            _ => Err(()),
        },
        _ => Err(()),
    };
    let sampled = match sampled {
        None => Ok(None),
        Some(s) => s.ok().and_then(b3_sampling).map(Some).ok_or(()),
    };
    match (parent, sampled) {
        (Ok(parent), Ok(sampled)) => {
            out.parent = parent;
            out.sampled = if debug { Some(true) } else { sampled };
        }
        _ => {
            out.malformed.get_or_insert(Header::XB3);
        }
    }
    out
}

/// A random id that is not zero (zero means "no id" in both formats).
fn nonzero<T: PartialEq + Default>(mut f: impl FnMut() -> T) -> T {
    loop {
        let v = f();
        if v != T::default() {
            return v;
        }
    }
}

/// A fresh `x-request-id`: a version 4 UUID, as Envoy makes them.
pub fn request_id() -> HeaderValue {
    let r: u128 = rand::random();
    let r = (r & !(0xf << 76)) | (0x4 << 76);
    let r = (r & !(0x3 << 62)) | (0x2 << 62);
    Hex::<36>::default()
        .hex(r >> 96, 8)
        .text("-")
        .hex(r >> 80, 4)
        .text("-")
        .hex(r >> 64, 4)
        .text("-")
        .hex(r >> 48, 4)
        .text("-")
        .hex(r, 12)
        .value()
}

/// Lets a connection's first request carry its `traceparent` and
/// `x-request-id` indexable, so that the next hop's HPACK table holds an
/// entry of each name. Every later request on the connection sends its
/// values as literals never indexed ([`Hex::value`]), but with the name as
/// an index into that table: not coded again for each request on one side
/// and decoded (and allocated) on the other. One entry of each, made once:
/// the table does not churn.
pub fn indexable(headers: &mut http::HeaderMap) {
    for name in [TRACEPARENT, X_REQUEST_ID] {
        if let Some(v) = headers.get_mut(name) {
            v.set_sensitive(false);
        }
    }
}

/// A header value of hex fields and separators, written on the stack: no
/// formatter and no intermediate String, on every request. Its bytes then
/// go to the end of this thread's [`ARENA`]. The value is marked
/// sensitive: it is this request's alone, so in the next hop's HPACK table
/// it would only push out entries that repeat; HTTP/2 sends it as a
/// literal never indexed (its name indexed once [`indexable`] has put
/// one in the table).
#[derive(Clone, Copy)]
struct Hex<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Hex<N> {
    fn default() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Hex<N> {
    fn text(mut self, s: &str) -> Self {
        self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
        self.len += s.len();
        self
    }

    /// Another value's bytes (a field written once, used in several headers).
    fn join<const M: usize>(mut self, other: &Hex<M>) -> Self {
        self.buf[self.len..self.len + other.len].copy_from_slice(&other.buf[..other.len]);
        self.len += other.len;
        self
    }

    /// The low `digits` nibbles of `v` (an even number: whole bytes),
    /// lowercase, zero-padded; two digits a byte from a table.
    fn hex(mut self, v: u128, digits: usize) -> Self {
        assert!(
            digits.is_multiple_of(2) && digits <= 32,
            "{digits} hex digits"
        );
        let bytes = v.to_be_bytes();
        let out = &mut self.buf[self.len..self.len + digits];
        for (pair, &b) in out.chunks_exact_mut(2).zip(&bytes[16 - digits / 2..]) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
        }
        self.len += digits;
        self
    }

    fn value(self) -> HeaderValue {
        let bytes = ARENA.with(|arena| {
            let mut arena = arena.borrow_mut();
            if arena.capacity() < self.len {
                *arena = bytes::BytesMut::with_capacity(ARENA_BLOCK);
            }
            arena.extend_from_slice(&self.buf[..self.len]);
            arena.split().freeze()
        });
        let mut v = HeaderValue::from_maybe_shared(bytes).expect("hex and dashes");
        v.set_sensitive(true);
        v
    }
}

const ARENA_BLOCK: usize = 4096;

thread_local! {
    /// Where this thread's trace header values live: blocks of
    /// [`ARENA_BLOCK`] bytes, each value a shared slice of one. A value
    /// copied into a `HeaderValue` of its own would cost an allocation,
    /// and another the first time the request is cloned (for a retry),
    /// when `bytes` turns a vector-backed value into a shared one; these
    /// are shared from the start, about one allocation per 70 values.
    /// A block is freed when the last request using it is.
    static ARENA: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::with_capacity(ARENA_BLOCK));
}

/// A request's place in its trace as this sidecar passes it on: its trace,
/// this sidecar's span, the caller's span (B3's parent) and the sampling
/// decision. Any `tracestate` travels as it came.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    trace_id: u128,
    span_id: u64,
    parent: Option<u64>,
    sampled: bool,
    /// The caller used B3's single header: it is written back in that form too.
    single_b3: bool,
}

impl Context {
    fn flag(&self) -> &'static str {
        if self.sampled { "1" } else { "0" }
    }

    /// The form sidecars carry between them: `traceparent` (and `b3` when
    /// the caller used it, so the far side writes that form too).
    fn write_traceparent(&self, h: &mut HeaderMap, trace: &Hex<32>, span: &Hex<16>) {
        h.insert(
            TRACEPARENT,
            Hex::<55>::default()
                .text("00-")
                .join(trace)
                .text("-")
                .join(span)
                .text("-0")
                .text(self.flag())
                .value(),
        );
        if self.single_b3 {
            h.insert(
                B3,
                Hex::<51>::default()
                    .join(trace)
                    .text("-")
                    .join(span)
                    .text("-")
                    .text(self.flag())
                    .value(),
            );
        }
    }

    /// B3's multi-header form, for a request leaving the mesh: to the app
    /// (the inbound side) or to a destination without a sidecar.
    pub fn write_b3(&self, h: &mut HeaderMap) {
        self.write_b3_from(h, &self.trace_hex(), &self.span_hex());
    }

    fn write_b3_from(&self, h: &mut HeaderMap, trace: &Hex<32>, span: &Hex<16>) {
        h.insert(X_B3_TRACEID, trace.value());
        h.insert(X_B3_SPANID, span.value());
        match self.parent {
            Some(p) => h.insert(
                X_B3_PARENTSPANID,
                Hex::<16>::default().hex(p.into(), 16).value(),
            ),
            None => h.remove(X_B3_PARENTSPANID),
        };
        h.insert(X_B3_SAMPLED, HeaderValue::from_static(self.flag()));
        h.remove(X_B3_FLAGS);
    }

    fn trace_hex(&self) -> Hex<32> {
        Hex::<32>::default().hex(self.trace_id, 32)
    }

    fn span_hex(&self) -> Hex<16> {
        Hex::<16>::default().hex(self.span_id.into(), 16)
    }
}

/// Which side of a hop a span stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The calling app's sidecar.
    Client,
    /// The called app's sidecar.
    Server,
}

/// A workload's tracing settings (from its Telemetry), compiled.
#[derive(Debug)]
pub struct Settings {
    /// Chance of sampling a new trace, 0 to 1.
    chance: f64,
    client: bool,
    server: bool,
    /// Where spans go; `None`: context is propagated, no spans are made.
    pub collector: Option<Arc<str>>,
    literal_tags: Vec<(String, String)>,
    header_tags: Vec<(String, HeaderName)>,
}

impl Default for Settings {
    fn default() -> Self {
        Self::compile(None)
    }
}

impl Settings {
    /// From the Telemetry pilot resolved for this workload; unset is
    /// Istio's default (1 %, both sides) with nowhere to send spans.
    pub fn compile(t: Option<&pb::Tracing>) -> Self {
        let Some(t) = t else {
            return Self {
                chance: mesh_proto::DEFAULT_TRACE_SAMPLING_PERCENT / 100.0,
                client: true,
                server: true,
                collector: None,
                literal_tags: Vec::new(),
                header_tags: Vec::new(),
            };
        };
        let side = pb::TrafficSide::try_from(t.side).unwrap_or_default();
        let reporting = !t.disable_span_reporting;
        Self {
            chance: (t.sampling_percent / 100.0).clamp(0.0, 1.0),
            client: reporting && side != pb::TrafficSide::Server,
            server: reporting && side != pb::TrafficSide::Client,
            collector: (!t.collector.is_empty()).then(|| Arc::from(t.collector.as_str())),
            literal_tags: t
                .literal_tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            header_tags: t
                .header_tags
                .iter()
                .filter_map(|(k, h)| Some((k.clone(), HeaderName::try_from(h.as_str()).ok()?)))
                .collect(),
        }
    }

    /// Places a request in its trace as it arrives: reads its context,
    /// decides sampling, gives it an `x-request-id` if it has none and
    /// writes this sidecar's span into its headers: as `traceparent` on the
    /// calling side, where the next hop is a sidecar that reads nothing
    /// else, and B3's headers too on the called side, for the app. The
    /// context comes back for a request that leaves the mesh elsewhere
    /// ([`Context::write_b3`]); a span to finish only when the trace is
    /// sampled and this side reports spans.
    pub fn begin<B>(
        &self,
        tracer: &Tracer,
        side: Side,
        req: &mut http::Request<B>,
        peer: Option<std::net::SocketAddr>,
    ) -> (Context, Option<Box<Pending>>) {
        let ex = extract(req.headers());
        if let Some(m) = ex.malformed {
            tracer.stats.malformed[m as usize].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                header = m.label(),
                "unreadable trace context; starting afresh"
            );
        }
        let headers = req.headers_mut();
        if let Some(id) = headers.get_mut(&X_REQUEST_ID) {
            // One request's alone, as ours are (`Hex::value`).
            id.set_sensitive(true);
        } else {
            headers.insert(X_REQUEST_ID, request_id());
        }
        let sampled = ex
            .sampled
            .unwrap_or_else(|| self.chance > 0.0 && rand::random::<f64>() < self.chance);
        let trace_id = ex
            .parent
            .map_or_else(|| nonzero(rand::random::<u128>), |p| p.trace_id);
        let span_id = nonzero(rand::random::<u64>);
        let parent = ex.parent.map(|p| p.span_id);
        let context = Context {
            trace_id,
            span_id,
            parent,
            sampled,
            single_b3: ex.single_b3,
        };
        let (trace, span) = (context.trace_hex(), context.span_hex());
        context.write_traceparent(headers, &trace, &span);
        match side {
            Side::Server => context.write_b3_from(headers, &trace, &span),
            // The caller's B3 headers name its span, not ours; where the
            // request leaves the mesh ours are written instead.
            Side::Client if headers.keys().any(|k| k.as_str().starts_with("x-b3-")) => {
                for h in [
                    X_B3_TRACEID,
                    X_B3_SPANID,
                    X_B3_PARENTSPANID,
                    X_B3_SAMPLED,
                    X_B3_FLAGS,
                ] {
                    headers.remove(h);
                }
            }
            Side::Client => {}
        }
        let reports = match side {
            Side::Client => self.client,
            Side::Server => self.server,
        };
        if !(sampled && reports && self.collector.is_some()) {
            return (context, None);
        }
        let header = |n: &HeaderName| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| header(&http::header::HOST));
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut attributes = vec![
            KeyValue::new("component", "proxy"),
            KeyValue::new("http.method", req.method().as_str().to_string()),
            KeyValue::new("http.url", format!("http://{authority}{path}")),
            KeyValue::new(
                "http.protocol",
                crate::accesslog::protocol_name(req.version()),
            ),
            KeyValue::new("user_agent", header(&http::header::USER_AGENT)),
            KeyValue::new("guid:x-request-id", header(&X_REQUEST_ID)),
            KeyValue::new("downstream_cluster", "-"),
        ];
        if let Some(p) = peer {
            attributes.push(KeyValue::new("peer.address", p.ip().to_string()));
        }
        for (k, v) in &self.literal_tags {
            attributes.push(KeyValue::new(k.clone(), v.clone()));
        }
        for (k, h) in &self.header_tags {
            attributes.push(KeyValue::new(k.clone(), header(h)));
        }
        let pending = Box::new(Pending {
            trace_id,
            span_id,
            parent,
            side,
            start: SystemTime::now(),
            tracestate: req
                .headers()
                .get(&TRACESTATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
            authority,
            attributes,
        });
        (context, Some(pending))
    }
}

/// What made every span: the sidecar.
static SCOPE: std::sync::LazyLock<InstrumentationScope> =
    std::sync::LazyLock::new(|| InstrumentationScope::builder("mesh-proxy").build());

/// A sampled request's span, until its response ends.
#[derive(Debug)]
pub struct Pending {
    trace_id: u128,
    span_id: u64,
    parent: Option<u64>,
    side: Side,
    start: SystemTime,
    tracestate: opentelemetry::trace::TraceState,
    /// The authority the request named, for the span's name.
    pub authority: String,
    attributes: Vec<KeyValue>,
}

/// How a traced exchange ended.
pub struct Ended<'a> {
    pub code: u16,
    pub flags: &'a str,
    /// Istio's cluster name (`outbound|9080|v1|reviews...`, `inbound|9080||`).
    pub upstream_cluster: Option<&'a str>,
    /// The service the span is named for (`reviews.default.svc.cluster.local:9080`).
    pub service: Option<String>,
    pub request_size: u64,
    pub response_size: u64,
}

impl Pending {
    /// The finished span, with Istio's tags for this workload (`own`, the
    /// sidecar at `ip` named `proxy_id`) added.
    pub fn end(
        self,
        own: &crate::wire::PeerMeta,
        ip: std::net::IpAddr,
        proxy_id: &str,
        e: &Ended<'_>,
    ) -> SpanData {
        let mut attributes = self.attributes;
        attributes.extend([
            KeyValue::new(
                "node_id",
                format!(
                    "sidecar~{ip}~{proxy_id}~{}.svc.cluster.local",
                    own.namespace
                ),
            ),
            KeyValue::new("istio.namespace", own.namespace.clone()),
            KeyValue::new("istio.canonical_service", own.canonical_service.clone()),
            KeyValue::new("istio.canonical_revision", own.canonical_revision.clone()),
            KeyValue::new("istio.mesh_id", crate::MESH_ID),
            KeyValue::new("istio.cluster_id", own.cluster.clone()),
            KeyValue::new("http.status_code", e.code.to_string()),
            KeyValue::new("response_flags", e.flags.to_string()),
            KeyValue::new("request_size", e.request_size.to_string()),
            KeyValue::new("response_size", e.response_size.to_string()),
        ]);
        if let Some(c) = e.upstream_cluster {
            attributes.push(KeyValue::new("upstream_cluster", c.to_string()));
            attributes.push(KeyValue::new("upstream_cluster.name", c.to_string()));
        }
        let status = if e.code >= 500 || e.flags != "-" {
            attributes.push(KeyValue::new("error", "true"));
            Status::error(format!("{} {}", e.code, e.flags))
        } else {
            Status::Unset
        };
        let name = match &e.service {
            Some(s) => format!("{s}/*"),
            None => format!("{}/*", self.authority),
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(self.trace_id),
                SpanId::from(self.span_id),
                TraceFlags::SAMPLED,
                false,
                self.tracestate,
            ),
            parent_span_id: SpanId::from(self.parent.unwrap_or(0)),
            parent_span_is_remote: self.parent.is_some(),
            span_kind: match self.side {
                Side::Client => SpanKind::Client,
                Side::Server => SpanKind::Server,
            },
            name: name.into(),
            start_time: self.start,
            end_time: SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: SCOPE.clone(),
        }
    }
}

/// What the tracer did, read by the metrics at each scrape.
#[derive(Debug, Default)]
pub struct Stats {
    pub exported: AtomicU64,
    /// Spans dropped because the export queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Spans whose export failed (collector unreachable, refused, timed out).
    pub dropped_export_failed: AtomicU64,
    /// Unreadable trace-context headers, by [`Header`].
    pub malformed: [AtomicU64; 3],
    /// Set while exports fail, so that a failure streak logs once.
    failing: AtomicBool,
    /// Set while the queue is full, likewise.
    full: AtomicBool,
}

/// The exporter in use: its collector and the queue its task reads.
struct Export {
    collector: Arc<str>,
    service: String,
    tx: mpsc::Sender<SpanData>,
}

/// Sends finished spans to the collector, never blocking the caller.
pub struct Tracer {
    queue: usize,
    export: Mutex<Option<Export>>,
    pub stats: Arc<Stats>,
}

impl Default for Tracer {
    fn default() -> Self {
        Self::new(QUEUE)
    }
}

impl Tracer {
    /// A tracer holding at most `queue` spans for export.
    pub fn new(queue: usize) -> Self {
        Self {
            queue: queue.max(1),
            export: Mutex::new(None),
            stats: Arc::default(),
        }
    }

    /// Queues `span` for `collector`, under the service name `service`.
    /// The first span for a collector (or after it changes) starts its
    /// exporter; the previous one sends what it holds and stops.
    pub fn record(&self, collector: &Arc<str>, service: &str, span: SpanData) {
        let tx = {
            let mut export = self.export.lock().unwrap();
            let current = export
                .as_ref()
                .is_some_and(|e| e.collector == *collector && e.service == service);
            if !current {
                *export = self.start(collector, service);
            }
            match export.as_ref() {
                Some(e) => e.tx.clone(),
                None => {
                    self.stats
                        .dropped_export_failed
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        };
        match tx.try_send(span) {
            Ok(()) => {
                if self.stats.full.swap(false, Ordering::Relaxed) {
                    tracing::info!(%collector, "span export queue has room again");
                }
            }
            Err(_) => {
                self.stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                if !self.stats.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%collector, queue = self.queue, "span export queue full (collector slow or unreachable); dropping spans");
                }
            }
        }
    }

    fn start(&self, collector: &Arc<str>, service: &str) -> Option<Export> {
        use opentelemetry_otlp::WithExportConfig;
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let _guard = runtime.enter();
        let built = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(format!("http://{collector}"))
            .with_timeout(EXPORT_TIMEOUT)
            .build();
        let mut exporter = match built {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%collector, error = %e, "cannot export spans to this collector");
                return None;
            }
        };
        exporter.set_resource(
            &opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(service.to_string())
                .build(),
        );
        let (tx, rx) = mpsc::channel(self.queue);
        runtime.spawn(export(exporter, rx, collector.clone(), self.stats.clone()));
        tracing::info!(%collector, service, "exporting spans over OTLP/gRPC");
        Some(Export {
            collector: collector.clone(),
            service: service.to_string(),
            tx,
        })
    }
}

/// Sends queued spans in batches until the queue's sender is gone.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    collector: Arc<str>,
    stats: Arc<Stats>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let fill = tokio::time::sleep(BATCH_DELAY);
        tokio::pin!(fill);
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                _ = &mut fill => break,
            }
        }
        let n = batch.len() as u64;
        let sent =
            tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(std::mem::take(&mut batch))).await;
        match sent {
            Ok(Ok(())) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
                if stats.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(%collector, "span export works again");
                }
            }
            Ok(Err(e)) => failed(&stats, &collector, n, &e.to_string()),
            Err(_) => failed(&stats, &collector, n, "timed out"),
        }
    }
}

fn failed(stats: &Stats, collector: &str, n: u64, why: &str) {
    stats.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
    if !stats.failing.swap(true, Ordering::Relaxed) {
        tracing::warn!(%collector, spans = n, error = why, "span export failed; dropping spans until it works");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::try_from(*k).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn reads_w3c_traceparent_and_its_sampled_flag() {
        let ex = extract(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-01"),
        )]));
        assert_eq!(
            ex.parent,
            Some(Parent {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                span_id: 0x00f067aa0ba902b7
            })
        );
        assert_eq!(ex.sampled, Some(true));
        assert_eq!(ex.malformed, None);
        let ex = extract(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-00"),
        )]));
        assert_eq!(ex.sampled, Some(false));
        // A later version may carry more fields.
        let ex = extract(&headers(&[(
            "traceparent",
            &format!("01-{TRACE}-{SPAN}-01-what-next"),
        )]));
        assert!(ex.parent.is_some());
    }

    #[test]
    fn malformed_traceparents_are_noted_and_ignored() {
        for bad in [
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-0g"),
            format!("00-{TRACE}-{SPAN}-+1"),
            format!("00-{TRACE}-{SPAN}-0A"),
            format!("00_{TRACE}-{SPAN}-01"),
            "garbage".to_string(),
            String::new(),
        ] {
            let ex = extract(&headers(&[("traceparent", &bad)]));
            assert_eq!(ex.parent, None, "{bad}");
            assert_eq!(ex.malformed, Some(Header::Traceparent), "{bad}");
        }
        // A bad traceparent falls back to B3.
        let ex = extract(&headers(&[
            ("traceparent", "nonsense"),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
        ]));
        assert_eq!(ex.parent.unwrap().span_id, 0x00f067aa0ba902b7);
        assert_eq!(ex.malformed, Some(Header::Traceparent));
    }

    #[test]
    fn reads_b3_single_and_multi_headers() {
        let ex = extract(&headers(&[(
            "b3",
            &format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90"),
        )]));
        assert_eq!(
            ex.parent.unwrap().trace_id,
            0x4bf92f3577b34da6a3ce929d0e0e4736
        );
        assert_eq!(ex.sampled, Some(true));
        assert!(ex.single_b3);
        let ex = extract(&headers(&[("b3", "0")]));
        assert_eq!((ex.parent, ex.sampled), (None, Some(false)));
        // 64-bit trace ids are B3's older form.
        let ex = extract(&headers(&[("b3", &format!("a3ce929d0e0e4736-{SPAN}"))]));
        assert_eq!(ex.parent.unwrap().trace_id, 0xa3ce929d0e0e4736);
        assert_eq!(ex.sampled, None);
        let ex = extract(&headers(&[("b3", "abc-def-1")]));
        assert_eq!(ex.malformed, Some(Header::B3));

        let ex = extract(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
        ]));
        assert_eq!(ex.parent.unwrap().span_id, 0x00f067aa0ba902b7);
        assert_eq!(ex.sampled, Some(false));
        let ex = extract(&headers(&[("x-b3-flags", "1")]));
        assert_eq!(ex.sampled, Some(true), "debug means sampled");
        let ex = extract(&headers(&[("x-b3-traceid", TRACE)]));
        assert_eq!(
            ex.malformed,
            Some(Header::XB3),
            "a trace id needs a span id"
        );
        assert_eq!(ex.parent, None);
    }

    fn request(pairs: &[(&str, &str)]) -> http::Request<()> {
        let mut r = http::Request::builder().uri("http://reviews:9080/reviews/0");
        for (k, v) in pairs {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    /// The trace flags the request carries on.
    fn flags(req: &http::Request<()>) -> &str {
        let tp = req.headers()["traceparent"].to_str().unwrap();
        &tp[tp.len() - 2..]
    }

    fn settings(percent: f64) -> Settings {
        Settings::compile(Some(&pb::Tracing {
            sampling_percent: percent,
            collector: "127.0.0.1:4317".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn a_callers_decision_is_kept_and_the_next_hop_continues_the_trace() {
        let tracer = Tracer::default();
        // Sampled upstream, 0 % here: still sampled.
        let mut req = request(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        let (context, span) = settings(0.0).begin(&tracer, Side::Client, &mut req, None);
        let span = span.expect("the caller sampled it");
        assert_eq!(span.parent, Some(0x00f067aa0ba902b7));
        let tp = req.headers()["traceparent"].to_str().unwrap();
        assert!(tp.starts_with(&format!("00-{TRACE}-")), "{tp}");
        assert!(tp.ends_with("-01"), "{tp}");
        let span_hex = format!("{:016x}", span.span_id);
        assert_eq!(&tp[36..52], span_hex);
        // Toward a sidecar, the traceparent alone.
        assert!(!req.headers().contains_key("x-b3-traceid"));
        assert!(!req.headers().contains_key("b3"));
        // Leaving the mesh, B3's headers say the same.
        let b3 = |req: &http::Request<()>| {
            [
                "x-b3-traceid",
                "x-b3-spanid",
                "x-b3-parentspanid",
                "x-b3-sampled",
            ]
            .map(|h| req.headers()[h].to_str().unwrap().to_string())
        };
        context.write_b3(req.headers_mut());
        assert_eq!(b3(&req), [TRACE, &span_hex, SPAN, "1"]);
        // The called side writes both, for its app.
        let (_, span) = settings(0.0).begin(&tracer, Side::Server, &mut req, None);
        let span = span.expect("sampled");
        assert_eq!(
            span.parent,
            Some(u64::from_str_radix(&span_hex, 16).unwrap())
        );
        let span_hex2 = format!("{:016x}", span.span_id);
        assert_eq!(b3(&req), [TRACE, &span_hex2, &span_hex, "1"]);
        assert!(
            req.headers()["traceparent"]
                .to_str()
                .unwrap()
                .contains(&span_hex2)
        );
        // Not sampled upstream, 100 % here: still not, and said so downstream.
        let mut req = request(&[("b3", &format!("{TRACE}-{SPAN}-0"))]);
        assert!(
            settings(100.0)
                .begin(&tracer, Side::Client, &mut req, None)
                .1
                .is_none()
        );
        assert_eq!(flags(&req), "00");
        assert!(
            req.headers()["b3"].to_str().unwrap().ends_with("-0"),
            "answered in kind"
        );
    }

    #[test]
    fn toward_the_next_sidecar_only_this_sidecars_context_travels() {
        let tracer = Tracer::default();
        let span_of = |req: &http::Request<()>| {
            req.headers()["traceparent"].to_str().unwrap()[36..52].to_string()
        };
        // An app that copies every header of the request it serves.
        let mut req = request(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("b3", &format!("{TRACE}-{SPAN}-1")),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
            ("x-b3-sampled", "1"),
            ("x-b3-flags", "1"),
            ("x-request-id", "the-apps"),
        ]);
        settings(0.0).begin(&tracer, Side::Client, &mut req, None);
        let ours = span_of(&req);
        assert_ne!(ours, SPAN);
        for h in [
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
            "x-b3-flags",
        ] {
            assert!(!req.headers().contains_key(h), "{h} went on");
        }
        // B3's single header, which the app used, is ours now.
        assert_eq!(req.headers()["b3"], format!("{TRACE}-{ours}-1"));
        let id = &req.headers()["x-request-id"];
        assert_eq!(id, "the-apps");
        assert!(
            id.is_sensitive(),
            "indexed, it would push out entries that repeat"
        );
        // The called side answers its app in the same forms, for its span.
        settings(0.0).begin(&tracer, Side::Server, &mut req, None);
        let theirs = span_of(&req);
        assert_eq!(req.headers()["b3"], format!("{TRACE}-{theirs}-1"));
        assert_eq!(req.headers()["x-b3-spanid"], theirs.as_str());
        assert_eq!(req.headers()["x-b3-parentspanid"], ours.as_str());
    }

    #[test]
    fn new_traces_are_sampled_at_the_configured_percentage() {
        let tracer = Tracer::default();
        let s = settings(10.0);
        let n = 20_000;
        let sampled = (0..n)
            .filter(|_| {
                let mut req = request(&[]);
                let (_, span) = s.begin(&tracer, Side::Server, &mut req, None);
                assert_eq!(span.is_some(), flags(&req) == "01");
                span.is_some()
            })
            .count();
        // 10 % of 20,000: 2,000 ± 6 standard deviations (σ ≈ 42).
        assert!((1750..=2250).contains(&sampled), "{sampled}");
        // Without a collector nothing is recorded, but the decision still travels.
        let mut req = request(&[]);
        assert!(
            Settings::compile(Some(&pb::Tracing {
                sampling_percent: 100.0,
                ..Default::default()
            }))
            .begin(&tracer, Side::Client, &mut req, None)
            .1
            .is_none()
        );
        assert_eq!(flags(&req), "01");
    }

    #[test]
    fn hex_reads_lowercase_digits_of_the_exact_length_and_nothing_else() {
        for _ in 0..1000 {
            let v: u128 = rand::random::<u128>() | 1;
            assert_eq!(hex(&format!("{v:032x}"), 32), Some(v));
            let w = v as u64;
            assert_eq!(hex(&format!("{w:016x}"), 16), Some(w.into()));
            assert_eq!(hex(&format!("{w:016x}"), 32), None, "wrong length");
        }
        assert_eq!(hex(&"0".repeat(32), 32), None, "zero is not an id");
        let good = "4bf92f3577b34da6a3ce929d0e0e4736";
        for (i, c) in good.char_indices() {
            for bad in ['A', 'F', 'g', 'x', '-', ' ', '/', ':', '@', '`', '\u{7f}'] {
                let mut s = good.to_string();
                s.replace_range(i..i + c.len_utf8(), &bad.to_string());
                assert_eq!(hex(&s, 32), None, "{s}");
            }
        }
        assert_eq!(hex(&"f".repeat(33), 33), None);
    }

    #[test]
    fn hex_values_read_as_the_formatter_writes_them_and_are_never_indexed() {
        let cases = [(0u128, 0u64), (1, 1), (u128::MAX, u64::MAX)]
            .into_iter()
            .chain((0..1000).map(|_| (rand::random(), rand::random())));
        for (t, s) in cases {
            let v = Hex::<55>::default()
                .text("00-")
                .hex(t, 32)
                .text("-")
                .hex(s.into(), 16)
                .text("-01")
                .value();
            assert_eq!(v.to_str().unwrap(), format!("00-{t:032x}-{s:016x}-01"));
            assert!(v.is_sensitive(), "sent as an HPACK literal never indexed");
        }
    }

    #[test]
    fn request_ids_are_version_4_uuids_and_kept_when_present() {
        let id = request_id();
        let id = id.to_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!("89ab".contains(&id[19..20]), "{id}");
        assert_ne!(request_id(), request_id());
        let mut req = request(&[("x-request-id", "mine")]);
        Settings::default().begin(&Tracer::default(), Side::Client, &mut req, None);
        assert_eq!(req.headers()["x-request-id"], "mine");
    }

    fn span() -> SpanData {
        let mut req = request(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        let p = settings(100.0)
            .begin(&Tracer::default(), Side::Client, &mut req, None)
            .1
            .unwrap();
        p.end(
            &crate::wire::PeerMeta::default(),
            std::net::Ipv4Addr::LOCALHOST.into(),
            "test.default",
            &Ended {
                code: 200,
                flags: "-",
                upstream_cluster: None,
                service: None,
                request_size: 1,
                response_size: 2,
            },
        )
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn an_unreachable_collector_costs_spans_not_requests() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tracer = Tracer::default();
        let collector: Arc<str> = Arc::from(format!("127.0.0.1:{port}"));
        let started = std::time::Instant::now();
        for _ in 0..10 {
            tracer.record(&collector, "productpage.default", span());
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "recording waited"
        );
        let stats = tracer.stats.clone();
        until("the failed export is counted", || {
            stats.dropped_export_failed.load(Ordering::Relaxed) == 10
        })
        .await;
        assert_eq!(stats.exported.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_stalled_collector_fills_the_queue_and_spans_are_dropped_not_waited_for() {
        // Accepts connections and never answers.
        let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = stall.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = stall.accept().await {
                conns.push(c);
            }
        });
        let tracer = Tracer::new(8);
        let collector: Arc<str> = Arc::from(addr.to_string());
        let mut waited = Duration::ZERO;
        for _ in 0..3 {
            let started = std::time::Instant::now();
            for _ in 0..20 {
                tracer.record(&collector, "reviews.default", span());
            }
            waited += started.elapsed();
            // The export task takes a batch, and stalls with it.
            tokio::time::sleep(BATCH_DELAY + Duration::from_millis(100)).await;
        }
        assert!(
            waited < Duration::from_secs(1),
            "recording waited {waited:?}"
        );
        let stats = tracer.stats.clone();
        // 8 queued of the first 20, and then of the next (the first 8 are
        // out with the collector), and none of the last: 12 + 12 + 20.
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 44);
        // The stalled export is given up after its timeout.
        until("the stalled export times out", || {
            stats.dropped_export_failed.load(Ordering::Relaxed) >= 8
        })
        .await;
        assert_eq!(stats.exported.load(Ordering::Relaxed), 0);
        held.abort();
    }
}
