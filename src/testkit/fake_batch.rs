//! A fake Azure Batch data plane for the pool-stage tests (feature
//! `testkit`): there is no emulator for Batch, so this follows the published
//! REST API 2025-06-01 as far as the daemon uses it (Pool - Add, Pool - Get,
//! Pool - Resize). HTTPS with the test CA's certificate, a bearer token
//! required on every request, the API version checked, every body checked
//! against the published definitions (`BatchPoolCreateOptions`,
//! `BatchPoolResizeOptions`). A pool allocates over time at a set rate; a
//! node quota stops it short with Batch's `resizeErrors`; 409 `PoolExists`,
//! 409 while resizing, and 429 or 5xx with Retry-After are answered on demand.

use super::server::{json_reply, serve, Reply, Serving};
use crate::handoff::BATCH_API_VERSION;
use hyper::{body::Incoming, Request};
use serde_json::{json, Value};
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeBatchConfig {
    /// The bearer token every request must carry.
    pub token: String,
    /// Certificate chain and key (PEM files) to serve HTTPS; plain HTTP when `None`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Nodes a resizing pool gains (or loses) per second.
    pub nodes_per_second: f64,
    /// Dedicated nodes the account's quota allows; a pool stops there with
    /// `AccountCoreQuotaReached`.
    pub quota: Option<u32>,
}

/// An answer given instead of the real one to the next matching request.
#[derive(Debug, Clone)]
pub struct BatchFault {
    /// Method it applies to (`None`: any).
    pub method: Option<&'static str>,
    /// Part of the path it applies to.
    pub path_contains: String,
    /// HTTP status.
    pub status: u16,
    /// Batch error code.
    pub code: String,
    /// Retry-After seconds, if any.
    pub retry_after: Option<u64>,
}

/// A request the fake saw.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// JSON body (`Null` when none).
    pub body: Value,
    /// Whether it carried the right token.
    pub authorized: bool,
    /// The status answered.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

#[derive(Debug)]
struct Pool {
    body: Value,
    target: u32,
    /// Nodes when the current resize started, and when it started.
    from: u32,
    since: Instant,
    auto_scale: bool,
}

impl Pool {
    /// Current nodes, whether allocation is done, and its errors.
    fn allocation(&self, cfg: &FakeBatchConfig) -> (u32, bool, Vec<Value>) {
        let moved = (self.since.elapsed().as_secs_f64() * cfg.nodes_per_second) as u32;
        let reach = match cfg.quota {
            Some(q) => self.target.min(q),
            None => self.target,
        };
        let current = if reach >= self.from {
            (self.from + moved).min(reach)
        } else {
            self.from.saturating_sub(moved).max(reach)
        };
        let errors = if current == reach && reach < self.target {
            vec![
                json!({"code": "AccountCoreQuotaReached", "message": "The specified account has reached VM core quota.", "values": []}),
            ]
        } else {
            Vec::new()
        };
        (current, current == reach, errors)
    }
}

#[derive(Debug, Default)]
struct World {
    pools: BTreeMap<String, Pool>,
    seen: Vec<BatchRequest>,
    faults: VecDeque<BatchFault>,
}

struct Shared {
    cfg: FakeBatchConfig,
    world: Mutex<World>,
}

/// The fake, serving on a loopback port until dropped.
pub struct FakeBatch {
    /// Stops serving when dropped.
    serving: Serving,
    shared: Arc<Shared>,
}

impl FakeBatch {
    /// Starts the fake on a free loopback port.
    pub async fn start(cfg: FakeBatchConfig) -> std::io::Result<Self> {
        let tls = cfg.tls.clone();
        let shared = Arc::new(Shared {
            cfg,
            world: Mutex::default(),
        });
        let s = shared.clone();
        let serving = serve(tls.as_ref(), move |req| handle(s.clone(), req)).await?;
        Ok(Self { serving, shared })
    }

    /// Its base URL (`pool_stage.batch_url`).
    pub fn endpoint(&self) -> &str {
        &self.serving.base
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.serving.addr
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<BatchRequest> {
        self.world().seen.clone()
    }

    /// The requests of `method` whose path ends with `suffix`.
    pub fn count(&self, method: &str, suffix: &str) -> usize {
        self.world()
            .seen
            .iter()
            .filter(|r| r.method == method && r.path.ends_with(suffix) && r.status < 300)
            .count()
    }

    /// The pool as Pool - Get shows it.
    pub fn pool(&self, id: &str) -> Option<Value> {
        let w = self.world();
        w.pools.get(id).map(|p| view(id, p, &self.shared.cfg))
    }

    /// Makes a pool as someone else would (Pool - Add `body`), fully allocated.
    pub fn put_pool(&self, body: Value) {
        let id = body["id"].as_str().expect("a pool id").to_owned();
        let target = body["targetDedicatedNodes"].as_u64().unwrap_or(0) as u32;
        let auto_scale = body["enableAutoScale"].as_bool().unwrap_or(false);
        self.world().pools.insert(
            id,
            Pool {
                body,
                target,
                from: target,
                since: Instant::now(),
                auto_scale,
            },
        );
    }

    /// Changes a pool's target as an operator's resize or an autoscale
    /// evaluation would.
    pub fn set_target(&self, id: &str, target: u32) {
        let cfg = self.shared.cfg.clone();
        let mut w = self.world();
        let p = w.pools.get_mut(id).expect("the pool exists");
        let (current, _, _) = p.allocation(&cfg);
        p.from = current;
        p.since = Instant::now();
        p.target = target;
    }

    /// Answers the next matching request with `fault`.
    pub fn fault(&self, fault: BatchFault) {
        self.world().faults.push_back(fault);
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.shared.world.lock().expect("fake lock")
    }
}

/// A pool as Pool - Get answers it.
fn view(id: &str, p: &Pool, cfg: &FakeBatchConfig) -> Value {
    let (current, steady, errors) = p.allocation(cfg);
    let mut v = p.body.clone();
    let o = v.as_object_mut().expect("pools are objects");
    o.insert("id".into(), json!(id));
    o.insert("state".into(), json!("active"));
    o.insert(
        "allocationState".into(),
        json!(if steady { "steady" } else { "resizing" }),
    );
    o.insert("targetDedicatedNodes".into(), json!(p.target));
    o.insert("currentDedicatedNodes".into(), json!(current));
    o.insert("enableAutoScale".into(), json!(p.auto_scale));
    if !errors.is_empty() {
        o.insert("resizeErrors".into(), json!(errors));
    }
    v
}

type Answer = (u16, Vec<(&'static str, String)>, Value);

fn error(status: u16, code: &str, message: &str) -> Answer {
    (
        status,
        vec![],
        json!({"code": code, "message": {"lang": "en-US", "value": message}}),
    )
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Reply {
    let super::server::Received {
        method,
        path,
        query,
        authorized,
        body,
    } = super::server::read(req, &shared.cfg.token).await;
    let (status, headers, answer) = {
        let mut w = shared.world.lock().expect("fake lock");
        let answer = answer(
            &shared.cfg,
            &mut w,
            &method,
            &path,
            &query,
            &body,
            authorized,
        );
        w.seen.push(BatchRequest {
            method,
            path,
            body,
            authorized,
            status: answer.0,
            at: Instant::now(),
        });
        answer
    };
    json_reply(status, headers, &answer)
}

fn answer(
    cfg: &FakeBatchConfig,
    w: &mut World,
    method: &str,
    path: &str,
    query: &str,
    body: &Value,
    authorized: bool,
) -> Answer {
    if !authorized {
        return error(401, "AuthenticationFailed", "Server failed to authenticate the request. Make sure the value of Authorization header is formed correctly.");
    }
    if !query
        .split('&')
        .any(|p| p == format!("api-version={BATCH_API_VERSION}"))
    {
        return error(400, "InvalidQueryParameterValue", "Value for one of the query parameters specified in the request URI is invalid: api-version.");
    }
    if let Some(i) = w
        .faults
        .iter()
        .position(|f| f.method.is_none_or(|m| m == method) && path.contains(&f.path_contains))
    {
        let f = w.faults.remove(i).expect("found");
        let mut a = error(f.status, &f.code, "injected");
        if let Some(s) = f.retry_after {
            a.1.push(("retry-after", s.to_string()));
        }
        return a;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("POST", ["pools"]) => add(w, body),
        ("GET", ["pools", id]) => match w.pools.get(*id) {
            Some(p) => (200, vec![], view(id, p, cfg)),
            None => error(404, "PoolNotFound", "The specified pool does not exist."),
        },
        ("POST", ["pools", id, "resize"]) => resize(cfg, w, id, body),
        _ => error(
            400,
            "InvalidUri",
            "The requested URI does not represent any resource on the server.",
        ),
    }
}

fn add(w: &mut World, body: &Value) -> Answer {
    if let Err(e) = check_pool_add(body) {
        return error(400, "InvalidRequestBody", &e);
    }
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    if w.pools.contains_key(&id) {
        return error(409, "PoolExists", "The specified pool already exists.");
    }
    w.pools.insert(
        id,
        Pool {
            body: body.clone(),
            target: body["targetDedicatedNodes"].as_u64().unwrap_or(0) as u32,
            from: 0,
            since: Instant::now(),
            auto_scale: body["enableAutoScale"].as_bool().unwrap_or(false),
        },
    );
    (201, vec![], Value::Null)
}

fn resize(cfg: &FakeBatchConfig, w: &mut World, id: &str, body: &Value) -> Answer {
    const RESIZE: [&str; 4] = [
        "targetDedicatedNodes",
        "targetLowPriorityNodes",
        "resizeTimeout",
        "nodeDeallocationOption",
    ];
    let Some(o) = body.as_object() else {
        return error(400, "InvalidRequestBody", "not a JSON object");
    };
    if let Some(k) = o.keys().find(|k| !RESIZE.contains(&k.as_str())) {
        return error(
            400,
            "InvalidRequestBody",
            &format!("BatchPoolResizeOptions.{k} is not a property"),
        );
    }
    let Some(p) = w.pools.get_mut(id) else {
        return error(404, "PoolNotFound", "The specified pool does not exist.");
    };
    if p.auto_scale {
        return error(
            409,
            "AutoScalingEnabled",
            "The specified pool has automatic scaling enabled; resize it by its formula.",
        );
    }
    let (current, steady, _) = p.allocation(cfg);
    if !steady {
        return error(
            409,
            "PoolBeingResized",
            "The specified pool is already being resized.",
        );
    }
    p.from = current;
    p.since = Instant::now();
    p.target = o
        .get("targetDedicatedNodes")
        .and_then(Value::as_u64)
        .unwrap_or(0) as u32;
    (202, vec![], Value::Null)
}

/// Checks a body against `BatchPoolCreateOptions` of Batch REST API
/// 2025-06-01 (azure-rest-api-specs, specification/batch/data-plane/
/// Azure.Batch/stable/2025-06-01.21.0/BatchService.json, and its example
/// `Pools_CreatePool_OSDisk.json`), as far as this body goes: known and
/// required properties, a gallery image version for `virtualMachineImageId`,
/// an ISO 8601 `resizeTimeout` of at least 15 minutes per 1,000 nodes.
pub fn check_pool_add(body: &Value) -> Result<(), String> {
    let pool = body.as_object().ok_or("not an object")?;
    const POOL: [&str; 22] = [
        "id",
        "displayName",
        "vmSize",
        "virtualMachineConfiguration",
        "resizeTimeout",
        "resourceTags",
        "targetDedicatedNodes",
        "targetLowPriorityNodes",
        "enableAutoScale",
        "autoScaleFormula",
        "autoScaleEvaluationInterval",
        "enableInterNodeCommunication",
        "networkConfiguration",
        "startTask",
        "applicationPackageReferences",
        "taskSlotsPerNode",
        "taskSchedulingPolicy",
        "userAccounts",
        "metadata",
        "mountConfiguration",
        "targetNodeCommunicationMode",
        "upgradePolicy",
    ];
    if let Some(k) = pool.keys().find(|k| !POOL.contains(&k.as_str())) {
        return Err(format!("BatchPoolCreateOptions.{k} is not a property"));
    }
    for r in ["id", "vmSize"] {
        if pool
            .get(r)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(format!("BatchPoolCreateOptions.{r} is required"));
        }
    }
    let vm = pool["virtualMachineConfiguration"]
        .as_object()
        .ok_or("virtualMachineConfiguration is missing")?;
    for r in ["imageReference", "nodeAgentSKUId"] {
        if vm.get(r).is_none_or(Value::is_null) {
            return Err(format!("VirtualMachineConfiguration.{r} is required"));
        }
    }
    if vm.contains_key("osDisk") && vm["osDisk"].get("imageUris").is_some() {
        return Err("osDisk.imageUris was removed in 2017-09-01.6.0".into());
    }
    let image = vm["imageReference"]
        .as_object()
        .ok_or("imageReference is not an object")?;
    const IMAGE: [&str; 7] = [
        "publisher",
        "offer",
        "sku",
        "version",
        "virtualMachineImageId",
        "sharedGalleryImageId",
        "communityGalleryImageId",
    ];
    if let Some(k) = image.keys().find(|k| !IMAGE.contains(&k.as_str())) {
        return Err(format!("BatchVmImageReference.{k} is not a property"));
    }
    let id = image
        .get("virtualMachineImageId")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let parts: Vec<&str> = id.split('/').collect();
    let gallery_version = parts.len() == 13
        && parts[1] == "subscriptions"
        && parts[3] == "resourceGroups"
        && parts[5] == "providers"
        && parts[6] == "Microsoft.Compute"
        && parts[7] == "galleries"
        && parts[9] == "images"
        && parts[11] == "versions";
    if !gallery_version {
        return Err(format!(
            "virtualMachineImageId {id:?} is not a gallery image version id"
        ));
    }
    let nodes = pool["targetDedicatedNodes"]
        .as_u64()
        .ok_or("targetDedicatedNodes must be an int32")?;
    let minutes = pool["resizeTimeout"]
        .as_str()
        .and_then(|t| t.strip_prefix("PT")?.strip_suffix('M')?.parse::<u64>().ok())
        .ok_or("resizeTimeout must be an ISO 8601 duration in minutes")?;
    if minutes < 15 * nodes.div_ceil(1000).max(1) {
        return Err(format!(
            "resizeTimeout of {minutes} minutes is short for {nodes} nodes"
        ));
    }
    Ok(())
}
