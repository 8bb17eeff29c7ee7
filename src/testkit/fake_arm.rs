//! A fake Azure Resource Manager for the gallery tests (feature `testkit`):
//! there is no emulator for ARM, so this follows the documented protocol of
//! the Compute gallery API (2025-03-03) as far as the daemon uses it. HTTPS
//! with a given certificate, a bearer token required on every request, the API
//! version checked. PUT answers 201 with `Azure-AsyncOperation`; PATCH and
//! DELETE 202 with `Azure-AsyncOperation` and `Location`; the operation goes
//! InProgress → Succeeded (or Failed) over a set number of polls while the
//! version's `replicationStatus` advances; 429 with Retry-After and 409
//! Conflict are answered on demand; bodies are checked as the service does.

use super::server::{json_reply, serve, Reply, Serving};
use hyper::{body::Incoming, Request};
use serde_json::{json, Value};
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeArmConfig {
    /// The bearer token every request must carry.
    pub token: String,
    /// Certificate chain and key (PEM files) to serve HTTPS; plain HTTP when `None`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Polls of an operation before it ends.
    pub polls: u32,
    /// Retry-After (seconds) on operation answers.
    pub retry_after: u64,
}

/// An answer given instead of the real one to the next matching request.
#[derive(Debug, Clone)]
pub struct ArmFault {
    /// Method it applies to (`None`: any).
    pub method: Option<&'static str>,
    /// Part of the path it applies to.
    pub path_contains: String,
    /// HTTP status.
    pub status: u16,
    /// ARM error code.
    pub code: String,
    /// Retry-After seconds, if any.
    pub retry_after: Option<u64>,
}

/// A request the fake saw.
#[derive(Debug, Clone)]
pub struct ArmRequest {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query string.
    pub query: String,
    /// JSON body (`Null` when none).
    pub body: Value,
    /// Whether it carried the right token.
    pub authorized: bool,
    /// The status answered.
    pub status: u16,
    /// When it arrived.
    pub at: std::time::Instant,
}

#[derive(Debug)]
struct Op {
    resource: String,
    polls_left: u32,
    polls: u32,
    delete: bool,
    fail: Option<String>,
}

#[derive(Debug, Default)]
struct World {
    resources: BTreeMap<String, Value>,
    ops: HashMap<String, Op>,
    seen: Vec<ArmRequest>,
    faults: VecDeque<ArmFault>,
    fail_replication: VecDeque<String>,
    next_op: u64,
}

struct Shared {
    cfg: FakeArmConfig,
    /// Known once the port is bound; operation URLs name it.
    base: std::sync::OnceLock<String>,
    world: Mutex<World>,
}

/// The fake, serving on a loopback port until dropped.
pub struct FakeArm {
    /// Stops serving when dropped.
    serving: Serving,
    shared: Arc<Shared>,
}

impl FakeArm {
    /// Starts the fake on a free loopback port.
    pub async fn start(cfg: FakeArmConfig) -> std::io::Result<Self> {
        let tls = cfg.tls.clone();
        let shared = Arc::new(Shared {
            cfg,
            base: std::sync::OnceLock::new(),
            world: Mutex::default(),
        });
        let s = shared.clone();
        let serving = serve(tls.as_ref(), move |req| handle(s.clone(), req)).await?;
        let _ = shared.base.set(serving.base.clone());
        Ok(Self { serving, shared })
    }

    /// Its base URL (`gallery.arm_endpoint`).
    pub fn endpoint(&self) -> &str {
        &self.serving.base
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.serving.addr
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<ArmRequest> {
        self.shared.world.lock().expect("fake lock").seen.clone()
    }

    /// The resource at `path` (case-insensitive), as stored.
    pub fn resource(&self, path: &str) -> Option<Value> {
        self.shared
            .world
            .lock()
            .expect("fake lock")
            .resources
            .get(&path.to_lowercase())
            .cloned()
    }

    /// Paths of every stored resource.
    pub fn resources(&self) -> Vec<String> {
        self.shared
            .world
            .lock()
            .expect("fake lock")
            .resources
            .keys()
            .cloned()
            .collect()
    }

    /// Stores a resource as if someone else had made it.
    pub fn put_resource(&self, path: &str, body: Value) {
        self.shared
            .world
            .lock()
            .expect("fake lock")
            .resources
            .insert(path.to_lowercase(), body);
    }

    /// Answers the next matching request with `fault`.
    pub fn fault(&self, fault: ArmFault) {
        self.shared
            .world
            .lock()
            .expect("fake lock")
            .faults
            .push_back(fault);
    }

    /// The next version operation (create or update) fails with this message;
    /// called again, the one after it too.
    pub fn fail_next_replication(&self, message: &str) {
        self.shared
            .world
            .lock()
            .expect("fake lock")
            .fail_replication
            .push_back(message.to_owned());
    }
}

type Answer = (u16, Vec<(&'static str, String)>, Value);

fn error(status: u16, code: &str, message: &str) -> Answer {
    (
        status,
        vec![],
        json!({"error": {"code": code, "message": message}}),
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
        let answer = answer(&shared, &mut w, &method, &path, &query, &body, authorized);
        w.seen.push(ArmRequest {
            method,
            path,
            query,
            body,
            authorized,
            status: answer.0,
            at: std::time::Instant::now(),
        });
        answer
    };
    json_reply(status, headers, &answer)
}

fn answer(
    shared: &Shared,
    w: &mut World,
    method: &str,
    path: &str,
    query: &str,
    body: &Value,
    authorized: bool,
) -> Answer {
    if !authorized {
        return error(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing or has an invalid bearer token.");
    }
    if !query
        .split('&')
        .any(|p| p == format!("api-version={}", crate::gallery::arm::API_VERSION))
    {
        return error(
            400,
            "InvalidApiVersionParameter",
            "The api-version is missing or not supported.",
        );
    }
    if let Some(i) = w
        .faults
        .iter()
        .position(|f| f.method.is_none_or(|m| m == method) && path.contains(&f.path_contains))
    {
        let f = w.faults.remove(i).expect("found");
        // ARM's own words for the usual cases, so the client's reading of
        // them is what is tested.
        let message = match (f.status, f.code.as_str()) {
            (409, "Conflict") => {
                "Another operation on this or dependent resource is in progress.".to_owned()
            }
            (429, _) => "The request is being throttled.".to_owned(),
            (s, c) => format!("injected {s} {c}"),
        };
        let mut a = error(f.status, &f.code, &message);
        if let Some(s) = f.retry_after {
            a.1.push(("retry-after", s.to_string()));
        }
        return a;
    }
    if let Some(id) = path.strip_prefix("/operations/") {
        return poll(shared, w, id);
    }
    let key = path.to_lowercase();
    let is_version = key.contains("/versions/");
    match method {
        "GET" => match w.resources.get(&key) {
            Some(r) => (200, vec![], r.clone()),
            None => error(
                404,
                "ResourceNotFound",
                &format!("The Resource '{path}' was not found."),
            ),
        },
        "PUT" if is_version => put_version(shared, w, &key, body),
        "PUT" => put_image(shared, w, &key, body),
        "PATCH" if is_version => patch_version(shared, w, &key, body),
        "DELETE" if is_version => match w.resources.get_mut(&key) {
            None => (204, vec![], Value::Null),
            Some(r) => {
                r["properties"]["provisioningState"] = "Deleting".into();
                start(shared, w, &key, true, 202)
            }
        },
        _ => error(405, "MethodNotAllowed", "not supported by the fake"),
    }
}

fn start(shared: &Shared, w: &mut World, key: &str, delete: bool, status: u16) -> Answer {
    w.next_op += 1;
    let id = format!("op{}", w.next_op);
    let fail = if key.contains("/versions/") && !delete {
        w.fail_replication.pop_front()
    } else {
        None
    };
    w.ops.insert(
        id.clone(),
        Op {
            resource: key.to_owned(),
            polls_left: shared.cfg.polls,
            polls: shared.cfg.polls.max(1),
            delete,
            fail,
        },
    );
    let url = format!(
        "{}/operations/{id}?api-version={}",
        shared.base.get().map(String::as_str).unwrap_or_default(),
        crate::gallery::arm::API_VERSION
    );
    let mut headers = vec![
        ("azure-asyncoperation", url.clone()),
        ("retry-after", shared.cfg.retry_after.to_string()),
    ];
    if status == 202 {
        headers.push(("location", url));
    }
    let body = w.resources.get(key).cloned().unwrap_or(Value::Null);
    (status, headers, body)
}

fn poll(shared: &Shared, w: &mut World, id: &str) -> Answer {
    let Some(op) = w.ops.get_mut(id) else {
        return error(404, "OperationNotFound", "no such operation");
    };
    let retry = vec![("retry-after", shared.cfg.retry_after.to_string())];
    if op.polls_left > 0 {
        op.polls_left -= 1;
        let progress = 100 * (op.polls - op.polls_left) / op.polls;
        let key = op.resource.clone();
        if let Some(r) = w.resources.get_mut(&key) {
            if let Some(s) = r["properties"]["replicationStatus"]["summary"].get_mut(0) {
                s["progress"] = (progress.min(99)).into();
            }
        }
        return (200, retry, json!({"status": "InProgress", "name": id}));
    }
    let op = w.ops.remove(id).expect("found above");
    if let Some(message) = op.fail {
        if let Some(r) = w.resources.get_mut(&op.resource) {
            r["properties"]["provisioningState"] = "Failed".into();
            r["properties"]["replicationStatus"]["aggregatedState"] = "Failed".into();
        }
        return (
            200,
            vec![],
            json!({"status": "Failed", "name": id, "error": {"code": "ReplicationFailed", "message": message}}),
        );
    }
    if op.delete {
        w.resources.remove(&op.resource);
    } else if let Some(r) = w.resources.get_mut(&op.resource) {
        r["properties"]["provisioningState"] = "Succeeded".into();
        if let Some(s) = r["properties"]["replicationStatus"]["summary"].get_mut(0) {
            s["progress"] = 100.into();
            s["state"] = "Completed".into();
            r["properties"]["replicationStatus"]["aggregatedState"] = "Completed".into();
        }
    }
    (200, vec![], json!({"status": "Succeeded", "name": id}))
}

fn region(v: &Value) -> String {
    v.as_str()
        .unwrap_or_default()
        .to_lowercase()
        .replace(' ', "")
}

fn put_image(shared: &Shared, w: &mut World, key: &str, body: &Value) -> Answer {
    let p = &body["properties"];
    for field in ["osType", "osState"] {
        if p[field].as_str().is_none() {
            return error(
                400,
                "InvalidParameter",
                &format!("Required parameter '{field}' is missing (null)."),
            );
        }
    }
    for field in ["publisher", "offer", "sku"] {
        if p["identifier"][field].as_str().is_none_or(str::is_empty) {
            return error(
                400,
                "InvalidParameter",
                &format!("Required parameter 'identifier.{field}' is missing (null)."),
            );
        }
    }
    if body["location"].as_str().is_none() {
        return error(
            400,
            "LocationRequired",
            "The location property is required for this definition.",
        );
    }
    let mut stored = body.clone();
    stored["properties"]["provisioningState"] = "Creating".into();
    // Since 2025-03-03 a definition defaults to Gen2 and Trusted Launch.
    if stored["properties"]["hyperVGeneration"].is_null() {
        stored["properties"]["hyperVGeneration"] = "V2".into();
    }
    w.resources.insert(key.to_owned(), stored);
    start(shared, w, key, false, 201)
}

fn put_version(shared: &Shared, w: &mut World, key: &str, body: &Value) -> Answer {
    let parent = key
        .split("/versions/")
        .next()
        .unwrap_or_default()
        .to_owned();
    let Some(image) = w.resources.get(&parent) else {
        return error(
            404,
            "ParentResourceNotFound",
            "The image definition does not exist.",
        );
    };
    let p = &body["properties"];
    let location = region(&body["location"]);
    let regions = p["publishingProfile"]["targetRegions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if regions.is_empty() || !regions.iter().any(|r| region(&r["name"]) == location) {
        return error(
            400,
            "InvalidParameter",
            "The source region must be one of the target regions.",
        );
    }
    if regions.iter().any(|r| {
        !r["regionalReplicaCount"]
            .as_u64()
            .is_some_and(|n| (1..=100).contains(&n))
    }) {
        return error(
            400,
            "InvalidParameter",
            "regionalReplicaCount must be between 1 and 100.",
        );
    }
    let source = &p["storageProfile"]["osDiskImage"]["source"];
    let account_id = source["storageAccountId"].as_str().unwrap_or_default();
    let parts: Vec<&str> = account_id.split('/').collect();
    if parts.len() != 9
        || parts[1] != "subscriptions"
        || parts[3] != "resourceGroups"
        || parts[6] != "Microsoft.Storage"
        || parts[7] != "storageAccounts"
    {
        return error(
            400,
            "InvalidParameter",
            "storageProfile.osDiskImage.source.storageAccountId is not a storage account id.",
        );
    }
    if source["uri"].as_str().is_none_or(str::is_empty) {
        return error(
            400,
            "InvalidParameter",
            "storageProfile.osDiskImage.source.uri is required.",
        );
    }
    if image["properties"]["hyperVGeneration"] != "V1" {
        return error(
            400,
            "InvalidParameter",
            "The VHD is generation 1; the image definition is not V1.",
        );
    }
    let mut stored = body.clone();
    stored["properties"]["provisioningState"] = "Creating".into();
    stored["properties"]["replicationStatus"] = json!({
        "aggregatedState": "InProgress",
        "summary": [{"region": body["location"], "state": "Replicating", "details": "", "progress": 0}],
    });
    w.resources.insert(key.to_owned(), stored);
    start(shared, w, key, false, 201)
}

fn patch_version(shared: &Shared, w: &mut World, key: &str, body: &Value) -> Answer {
    let Some(r) = w.resources.get_mut(key) else {
        return error(404, "ResourceNotFound", "The image version does not exist.");
    };
    // A version whose replication failed may be updated again (the usual
    // recovery); one with an operation under way may not.
    let state = r["properties"]["provisioningState"]
        .as_str()
        .unwrap_or_default();
    if matches!(state, "Creating" | "Updating" | "Deleting" | "Migrating") {
        return error(
            409,
            "Conflict",
            "Another operation on this image version is in progress.",
        );
    }
    // GalleryImageVersionUpdate (2025-03-03): properties.storageProfile is
    // required, as in the published Update examples (an empty object, or the
    // version's source unchanged).
    let storage = &body["properties"]["storageProfile"];
    if !storage.is_object() {
        return error(
            400,
            "InvalidParameter",
            "Required parameter 'storageProfile' is missing (null).",
        );
    }
    let sent = &storage["osDiskImage"]["source"];
    if !sent.is_null() && *sent != r["properties"]["storageProfile"]["osDiskImage"]["source"] {
        return error(
            409,
            "PropertyChangeNotAllowed",
            "Changing property 'storageProfile.osDiskImage.source' is not allowed.",
        );
    }
    let regions = &body["properties"]["publishingProfile"]["targetRegions"];
    if !regions.is_null() {
        r["properties"]["publishingProfile"]["targetRegions"] = regions.clone();
    }
    r["properties"]["provisioningState"] = "Updating".into();
    if let Some(s) = r["properties"]["replicationStatus"]["summary"].get_mut(0) {
        s["progress"] = 0.into();
        s["state"] = "Replicating".into();
    }
    start(shared, w, key, false, 202)
}
