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

mod faults;
mod held;
mod page_from_url;
mod recording;

pub use faults::*;
use held::*;
use page_from_url::*;
pub use recording::*;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use rand::{rngs::StdRng, SeedableRng};
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;

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
