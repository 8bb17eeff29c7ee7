//! An Azure behaviour proxy for tests: sits in front of Azurite (which finishes
//! every copy at once and never throttles) and makes it behave like Azure under
//! load. It can hold copies `pending` with advancing `x-ms-copy-progress` for a
//! while (and honour Abort Copy by reporting `aborted`), answer a share of
//! requests with 503 ServerBusy (with or without Retry-After) or 500
//! OperationTimedOut, reset connections, and add latency spikes. Faults are drawn
//! from a seeded generator. Reads that carry a SAS (the service fetching a copy
//! source) are passed through untouched. Scripted [`ProxyRule`]s hit chosen
//! requests: swallow one (never forwarded, never answered), lose its answer
//! (forwarded, the answer never comes back) or answer it with a given error.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;

/// A scripted fault for the requests that match it.
#[derive(Debug, Clone)]
pub struct ProxyRule {
    /// HTTP method, e.g. `PUT`; any when `None`.
    pub method: Option<&'static str>,
    /// The request path contains this.
    pub path_contains: String,
    /// The query string contains this, when set.
    pub query_contains: Option<String>,
    /// The request carries this header, when set (e.g. `x-ms-copy-source`).
    pub header: Option<&'static str>,
    /// What happens to a matching request.
    pub action: ProxyAction,
    /// How many requests it hits.
    pub times: u32,
}

impl ProxyRule {
    /// A rule for `times` requests of `method` whose path contains `path`.
    pub fn new(method: &'static str, path: &str, action: ProxyAction, times: u32) -> Self {
        Self {
            method: Some(method),
            path_contains: path.to_owned(),
            query_contains: None,
            header: None,
            action,
            times,
        }
    }

    fn matches(
        &self,
        method: &hyper::Method,
        path: &str,
        query: &str,
        headers: &hyper::HeaderMap,
    ) -> bool {
        self.method.is_none_or(|m| m == method.as_str())
            && path.contains(&self.path_contains)
            && self
                .query_contains
                .as_deref()
                .is_none_or(|q| query.contains(q))
            && self.header.is_none_or(|h| headers.contains_key(h))
    }
}

/// What a [`ProxyRule`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyAction {
    /// Hold the request forever without forwarding it: nothing happens upstream.
    Swallow,
    /// Forward the request, then never answer: it happened, the caller cannot know.
    LoseAnswer,
    /// Answer at once with this status and error code, without forwarding.
    Answer(u16, &'static str),
    /// Wait this long, then forward it as usual (a slow service).
    Delay(Duration),
    /// Answer at once with 503 ServerBusy carrying `Retry-After` of this many
    /// seconds, without forwarding.
    Busy(u64),
}

/// What the proxy does to traffic.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where requests go, e.g. `http://127.0.0.1:10000`.
    pub upstream: String,
    /// Seed of the fault generator.
    pub seed: u64,
    /// Copies stay `pending` this long after they start (progress advances linearly).
    pub hold_copies: Option<Duration>,
    /// Share of requests answered 503 ServerBusy.
    pub busy_rate: f64,
    /// Share of those 503s that carry `Retry-After: 1`.
    pub retry_after_share: f64,
    /// Share of requests answered 500 OperationTimedOut.
    pub timeout_rate: f64,
    /// Share of requests whose connection is reset without an answer.
    pub reset_rate: f64,
    /// Share of requests delayed by `spike`.
    pub spike_rate: f64,
    /// The added latency of a spike.
    pub spike: Duration,
    /// Scripted faults, tried in order; the first live match applies.
    pub rules: Vec<ProxyRule>,
    /// Shared keys of the accounts the proxy performs Put Page From URL for
    /// (Azurite answers it with 416): the proxy reads the source range through
    /// its SAS and writes the page itself, signed with the destination's key.
    pub signers: HashMap<String, crate::azure::auth::SharedKey>,
}

impl ProxyConfig {
    /// A transparent proxy to `upstream`.
    pub fn transparent(upstream: &str) -> Self {
        Self {
            upstream: upstream.trim_end_matches('/').to_owned(),
            seed: 1,
            hold_copies: None,
            busy_rate: 0.0,
            retry_after_share: 0.0,
            timeout_rate: 0.0,
            reset_rate: 0.0,
            spike_rate: 0.0,
            spike: Duration::ZERO,
            rules: Vec::new(),
            signers: HashMap::new(),
        }
    }
}

/// What the proxy has seen and done.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Requests received.
    pub requests: AtomicU64,
    /// 503s injected.
    pub busy: AtomicU64,
    /// 503s injected with Retry-After.
    pub busy_with_retry_after: AtomicU64,
    /// 500s injected.
    pub timeouts: AtomicU64,
    /// Connections reset.
    pub resets: AtomicU64,
    /// Latency spikes added.
    pub spikes: AtomicU64,
    /// Copies held pending.
    pub held: AtomicU64,
    /// Pending copies aborted.
    pub aborted: AtomicU64,
    /// Status answers rewritten to pending.
    pub pending_answers: AtomicU64,
    /// Requests hit by a scripted rule.
    pub rule_hits: AtomicU64,
}

impl ProxyStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
struct Held {
    copy_id: String,
    started: Instant,
    aborted: bool,
}

struct Shared {
    cfg: ProxyConfig,
    /// Hits left of each rule of `cfg.rules`.
    rules_left: Mutex<Vec<u32>>,
    /// Every request that reached the proxy: method, path and query.
    seen: Mutex<Vec<String>>,
    seen_at: Mutex<Vec<Instant>>,
    /// Every Start Copy's destination path and `x-ms-copy-source`, in order.
    copy_sources: Mutex<Vec<(String, String)>>,
    starts: Mutex<HashMap<String, u32>>,
    /// Every Put Page From URL the proxy performed: destination path and range.
    page_writes: Mutex<Vec<(String, String)>>,
    rng: Mutex<StdRng>,
    held: Mutex<HashMap<String, Held>>,
    stats: Arc<ProxyStats>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A running proxy.
pub struct Proxy {
    /// Its address.
    pub addr: SocketAddr,
    /// Its counters.
    pub stats: Arc<ProxyStats>,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("addr", &self.addr).finish()
    }
}

impl Proxy {
    /// Starts a proxy on a free loopback port.
    pub async fn start(cfg: ProxyConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ProxyStats::default());
        let shared = Arc::new(Shared {
            rules_left: Mutex::new(cfg.rules.iter().map(|r| r.times).collect()),
            seen: Mutex::new(Vec::new()),
            seen_at: Mutex::new(Vec::new()),
            copy_sources: Mutex::new(Vec::new()),
            starts: Mutex::new(HashMap::new()),
            page_writes: Mutex::new(Vec::new()),
            rng: Mutex::new(StdRng::seed_from_u64(cfg.seed)),
            cfg,
            held: Mutex::new(HashMap::new()),
            stats: stats.clone(),
            // hyper's client keeps the Host header it is given (reqwest replaces it).
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let shared_for_stats = shared.clone();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(x) => x, Err(_) => continue },
                    _ = token.cancelled() => return,
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            stats,
            shared: shared_for_stats,
            stop,
        })
    }

    /// Start Copy requests forwarded upstream, by destination path (counted when
    /// they arrive, so a request whose client died mid-way still counts).
    pub fn copy_starts(&self) -> HashMap<String, u32> {
        self.shared.starts.lock().expect("starts lock").clone()
    }

    /// Every request that reached the proxy, as `METHOD path?query`, in order
    /// (SAS signatures included: tests look for them in what the daemon writes).
    pub fn seen(&self) -> Vec<String> {
        self.shared.seen.lock().expect("seen lock").clone()
    }

    /// [`Proxy::seen`] with the time each request arrived.
    pub fn seen_timed(&self) -> Vec<(Instant, String)> {
        let seen = self.shared.seen.lock().expect("seen lock");
        let at = self.shared.seen_at.lock().expect("seen lock").clone();
        let seen = seen.clone();
        at.into_iter().zip(seen).collect()
    }

    /// Every Put Page From URL the proxy performed, in order: destination path
    /// and range (`bytes=<first>-<last>`).
    pub fn page_writes(&self) -> Vec<(String, String)> {
        self.shared
            .page_writes
            .lock()
            .expect("page writes lock")
            .clone()
    }

    /// Every Start Copy that reached the proxy (forwarded or not): destination
    /// path and the `x-ms-copy-source` it carried, SAS included.
    pub fn copy_sources(&self) -> Vec<(String, String)> {
        self.shared
            .copy_sources
            .lock()
            .expect("sources lock")
            .clone()
    }

    /// The proxy's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected connection reset")
    }
}

impl std::error::Error for Reset {}

fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    retry_after: bool,
) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .header("x-ms-error-code", code);
    if retry_after {
        b = b.header("retry-after", "1");
    }
    b.body(Full::new(Bytes::from(body)))
        .expect("static response builds")
}

fn query_has(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// What the proxy needs to know of a request.
struct Seen {
    method: hyper::Method,
    path: String,
    query: String,
}

impl Seen {
    fn comp(&self) -> Option<String> {
        query_has(&self.query, "comp")
    }

    /// The service fetching a copy source (a read that carries a SAS): passed
    /// through untouched.
    fn is_service_read(&self) -> bool {
        self.query.contains("sig=")
            && (self.method == hyper::Method::GET || self.method == hyper::Method::HEAD)
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Reset> {
    let seen = record(&shared, &req);
    let scripted = scripted_fault(&shared, &seen, req.headers());
    match scripted {
        Some(ProxyAction::Swallow) => std::future::pending::<()>().await,
        Some(ProxyAction::Answer(status, code)) => {
            return Ok(error_response(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                code,
                "injected by the behaviour proxy",
                false,
            ))
        }
        Some(ProxyAction::Busy(after)) => {
            let mut rsp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServerBusy",
                "injected by the behaviour proxy",
                false,
            );
            rsp.headers_mut()
                .insert("retry-after", hyper::header::HeaderValue::from(after));
            return Ok(rsp);
        }
        Some(ProxyAction::Delay(d)) => tokio::time::sleep(d).await,
        Some(ProxyAction::LoseAnswer) | None => {}
    }
    if !seen.is_service_read() {
        if let Some(faulted) = random_fault(&shared).await {
            return faulted;
        }
    }
    if let Some(aborted) = abort_held(&shared, &seen, req.headers()) {
        return Ok(aborted);
    }
    let is_start_copy = seen.method == hyper::Method::PUT
        && req.headers().contains_key("x-ms-copy-source")
        && seen.comp().is_none();
    if is_start_copy {
        *shared
            .starts
            .lock()
            .expect("starts lock")
            .entry(seen.path.clone())
            .or_default() += 1;
    }
    let is_page_from_url = seen.method == hyper::Method::PUT
        && seen.comp().as_deref() == Some("page")
        && req.headers().contains_key("x-ms-copy-source");
    let (status, mut headers, bytes) = if is_page_from_url {
        put_page_from_url(&shared, &seen, req.headers()).await?
    } else {
        forward(&shared, &seen, req).await?
    };
    if scripted == Some(ProxyAction::LoseAnswer) {
        std::future::pending::<()>().await;
    }
    if seen.method == hyper::Method::DELETE && seen.comp().is_none() && status.is_success() {
        shared.held.lock().expect("held lock").remove(&seen.path);
    }
    if is_start_copy && status == StatusCode::ACCEPTED {
        hold_started_copy(&shared, &seen.path, &mut headers);
    }
    let is_status = (seen.method == hyper::Method::HEAD || seen.method == hyper::Method::GET)
        && seen.comp().is_none();
    if is_status && status.is_success() && !seen.is_service_read() {
        show_held_copy(&shared, &seen.path, &mut headers);
    }
    let mut out = Response::builder().status(status);
    for (name, value) in headers.iter() {
        if name != hyper::header::TRANSFER_ENCODING && name != hyper::header::CONNECTION {
            out = out.header(name, value);
        }
    }
    Ok(out.body(Full::new(bytes)).expect("response builds"))
}

/// Counts and logs a request (and the copy source of a Start Copy).
fn record(shared: &Shared, req: &Request<Incoming>) -> Seen {
    ProxyStats::bump(&shared.stats.requests);
    let seen = Seen {
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or("").to_owned(),
    };
    {
        // Both lists under the first's lock, so their entries stay paired.
        let mut all = shared.seen.lock().expect("seen lock");
        all.push(format!("{} {}?{}", seen.method, seen.path, seen.query));
        shared
            .seen_at
            .lock()
            .expect("seen lock")
            .push(Instant::now());
    }
    if let Some(source) = req
        .headers()
        .get("x-ms-copy-source")
        .and_then(|v| v.to_str().ok())
    {
        shared
            .copy_sources
            .lock()
            .expect("sources lock")
            .push((seen.path.clone(), source.to_owned()));
    }
    seen
}

/// The first scripted rule with hits left that matches the request, spending one.
fn scripted_fault(shared: &Shared, seen: &Seen, headers: &hyper::HeaderMap) -> Option<ProxyAction> {
    let mut left = shared.rules_left.lock().expect("rules lock");
    let action = shared
        .cfg
        .rules
        .iter()
        .zip(left.iter_mut())
        .find(|(r, n)| **n > 0 && r.matches(&seen.method, &seen.path, &seen.query, headers))
        .map(|(r, n)| {
            *n -= 1;
            r.action
        });
    if action.is_some() {
        ProxyStats::bump(&shared.stats.rule_hits);
    }
    action
}

/// A seeded random fault: a latency spike (then on), a reset, a 503 (with or
/// without Retry-After) or a 500 OperationTimedOut.
async fn random_fault(shared: &Shared) -> Option<Result<Response<Full<Bytes>>, Reset>> {
    let stats = &shared.stats;
    let (reset, busy, retry_after, timeout, spike) = {
        let mut rng = shared.rng.lock().expect("rng lock");
        let cfg = &shared.cfg;
        (
            rng.random::<f64>() < cfg.reset_rate,
            rng.random::<f64>() < cfg.busy_rate,
            rng.random::<f64>() < cfg.retry_after_share,
            rng.random::<f64>() < cfg.timeout_rate,
            rng.random::<f64>() < cfg.spike_rate,
        )
    };
    if spike {
        ProxyStats::bump(&stats.spikes);
        tokio::time::sleep(shared.cfg.spike).await;
    }
    if reset {
        ProxyStats::bump(&stats.resets);
        return Some(Err(Reset));
    }
    if busy {
        ProxyStats::bump(&stats.busy);
        if retry_after {
            ProxyStats::bump(&stats.busy_with_retry_after);
        }
        return Some(Ok(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServerBusy",
            "Operations per second is over the account limit.",
            retry_after,
        )));
    }
    if timeout {
        ProxyStats::bump(&stats.timeouts);
        return Some(Ok(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "OperationTimedOut",
            "Operation could not be completed within the specified time.",
            false,
        )));
    }
    None
}

/// Abort Copy of a copy held pending (Azurite finished it long ago): answered
/// here, and the copy shows `aborted` from then on.
fn abort_held(
    shared: &Shared,
    seen: &Seen,
    headers: &hyper::HeaderMap,
) -> Option<Response<Full<Bytes>>> {
    let is_abort = seen.method == hyper::Method::PUT
        && seen.comp().as_deref() == Some("copy")
        && headers
            .get("x-ms-copy-action")
            .and_then(|v| v.to_str().ok())
            == Some("abort");
    if !is_abort {
        return None;
    }
    let copy_id = query_has(&seen.query, "copyid").unwrap_or_default();
    let mut held = shared.held.lock().expect("held lock");
    let h = held
        .get_mut(&seen.path)
        .filter(|h| h.copy_id == copy_id && !h.aborted)?;
    let pending = shared
        .cfg
        .hold_copies
        .is_some_and(|hold| h.started.elapsed() < hold);
    if !pending {
        return None;
    }
    h.aborted = true;
    ProxyStats::bump(&shared.stats.aborted);
    Some(
        Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::new(Bytes::new()))
            .expect("static response builds"),
    )
}

/// Sends the request upstream (its Host header along: Azurite checks that a
/// copy source is on "its" host) and reads the whole answer.
async fn forward(
    shared: &Shared,
    seen: &Seen,
    req: Request<Incoming>,
) -> Result<(StatusCode, hyper::HeaderMap, Bytes), Reset> {
    let url = if seen.query.is_empty() {
        format!("{}{}", shared.cfg.upstream, seen.path)
    } else {
        format!("{}{}?{}", shared.cfg.upstream, seen.path, seen.query)
    };
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| Reset)?.to_bytes();
    let mut upstream = Request::builder()
        .method(parts.method.clone())
        .uri(url.as_str());
    for (name, value) in parts.headers.iter() {
        if name != hyper::header::CONNECTION {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = upstream.body(Full::new(body)).map_err(|_| Reset)?;
    let rsp = shared.client.request(upstream).await.map_err(|_| Reset)?;
    let status = rsp.status();
    if std::env::var_os("VHDREP_PROXY_DEBUG").is_some() {
        eprintln!(
            "proxy: {} {}?{} -> {status}",
            seen.method, seen.path, seen.query
        );
    }
    let (parts, body) = rsp.into_parts();
    let bytes = body.collect().await.map_err(|_| Reset)?.to_bytes();
    Ok((status, parts.headers, bytes))
}

/// Performs Put Page From URL as the service would, since Azurite does not:
/// reads the source range through the URL's SAS (upstream), then writes it as
/// a page of the destination, signed with the destination account's key.
async fn put_page_from_url(
    shared: &Shared,
    seen: &Seen,
    headers: &hyper::HeaderMap,
) -> Result<(StatusCode, hyper::HeaderMap, Bytes), Reset> {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let fail = |status: StatusCode, code: &str| {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>put page from URL (behaviour proxy)</Message></Error>"
        );
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/xml"),
        );
        if let Ok(v) = hyper::header::HeaderValue::from_str(code) {
            h.insert("x-ms-error-code", v);
        }
        Ok((status, h, Bytes::from(body)))
    };
    let account = seen
        .path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let Some(key) = shared.cfg.signers.get(&account) else {
        return fail(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "ProxyHasNoKeyForThisAccount",
        );
    };
    // The destination range comes as `x-ms-range` or as the standard `Range`.
    let range = Some(header("x-ms-range"))
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| header("range"));
    let source = header("x-ms-copy-source");
    let Ok(source_url) = url::Url::parse(&source) else {
        return fail(StatusCode::BAD_REQUEST, "InvalidHeaderValue");
    };
    // The source range is read as the service reads it: through the SAS.
    let read_url = format!(
        "{}{}?{}",
        shared.cfg.upstream,
        source_url.path(),
        source_url.query().unwrap_or_default()
    );
    let read = Request::get(read_url.as_str())
        .header("x-ms-range", header("x-ms-source-range"))
        .header("x-ms-version", header("x-ms-version"))
        .body(Full::new(Bytes::new()))
        .map_err(|_| Reset)?;
    let rsp = shared.client.request(read).await.map_err(|_| Reset)?;
    if !rsp.status().is_success() {
        return fail(StatusCode::FORBIDDEN, "CannotVerifyCopySource");
    }
    let data = rsp
        .into_body()
        .collect()
        .await
        .map_err(|_| Reset)?
        .to_bytes();
    let url = url::Url::parse(&format!("{}{}?comp=page", shared.cfg.upstream, seen.path))
        .map_err(|_| Reset)?;
    let date = crate::azure::auth::http_date(time::OffsetDateTime::now_utc());
    let signed = vec![
        ("x-ms-date".to_owned(), date.clone()),
        ("x-ms-page-write".to_owned(), "update".to_owned()),
        ("x-ms-range".to_owned(), range.clone()),
        ("x-ms-version".to_owned(), header("x-ms-version")),
    ];
    let input = crate::azure::auth::SigningInput {
        method: "PUT",
        url: &url,
        headers: signed.clone(),
        content_length: Some(data.len() as u64),
    };
    let signature = key.sign(&crate::azure::auth::string_to_sign(&account, &input));
    let mut write = Request::put(url.as_str())
        .header("authorization", format!("SharedKey {account}:{signature}"))
        .header("content-length", data.len().to_string());
    for (k, v) in &signed {
        write = write.header(k.as_str(), v.as_str());
    }
    let write = write.body(Full::new(data)).map_err(|_| Reset)?;
    let rsp = shared.client.request(write).await.map_err(|_| Reset)?;
    let status = rsp.status();
    let (parts, body) = rsp.into_parts();
    let bytes = body.collect().await.map_err(|_| Reset)?.to_bytes();
    if status.is_success() {
        shared
            .page_writes
            .lock()
            .expect("page writes lock")
            .push((seen.path.clone(), range));
    }
    Ok((status, parts.headers, bytes))
}

/// A Start Copy Azurite finished at once is reported pending and held for
/// `hold_copies`.
fn hold_started_copy(shared: &Shared, path: &str, headers: &mut hyper::HeaderMap) {
    if shared.cfg.hold_copies.is_none() {
        return;
    }
    let Some(id) = headers.get("x-ms-copy-id").and_then(|v| v.to_str().ok()) else {
        return;
    };
    shared.held.lock().expect("held lock").insert(
        path.to_owned(),
        Held {
            copy_id: id.to_owned(),
            started: Instant::now(),
            aborted: false,
        },
    );
    ProxyStats::bump(&shared.stats.held);
    headers.insert(
        "x-ms-copy-status",
        "pending".parse().expect("static header"),
    );
}

/// The status of a held copy as Azure would show it: pending with progress
/// advancing linearly over the hold, or aborted.
fn show_held_copy(shared: &Shared, path: &str, headers: &mut hyper::HeaderMap) {
    let held = shared.held.lock().expect("held lock").get(path).cloned();
    let (Some(h), Some(hold)) = (held, shared.cfg.hold_copies) else {
        return;
    };
    let ours =
        headers.get("x-ms-copy-id").and_then(|v| v.to_str().ok()) == Some(h.copy_id.as_str());
    let total: u64 = headers
        .get("x-ms-copy-progress")
        .and_then(|v| v.to_str().ok())
        .and_then(|p| p.split('/').nth(1))
        .and_then(|t| t.parse().ok())
        .or_else(|| {
            headers
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    if ours && h.aborted {
        headers.insert(
            "x-ms-copy-status",
            "aborted".parse().expect("static header"),
        );
        headers.insert(
            "x-ms-copy-progress",
            format!("0/{total}").parse().expect("ascii"),
        );
    } else if ours && h.started.elapsed() < hold {
        let share = h.started.elapsed().as_secs_f64() / hold.as_secs_f64();
        let copied = (total as f64 * share) as u64;
        headers.insert(
            "x-ms-copy-status",
            "pending".parse().expect("static header"),
        );
        headers.insert(
            "x-ms-copy-progress",
            format!("{copied}/{total}").parse().expect("ascii"),
        );
        ProxyStats::bump(&shared.stats.pending_answers);
    }
}
