//! A mock of RunPod's API: GraphQL (`gpuTypes`, `podRentInterruptable`,
//! `podFindAndDeployOnDemand`, `podTerminate`) and REST `/v1/pods`, with the real field names,
//! `desiredStatus` values, errors as HTTP 200 with an `errors` array, and 404 on a second delete.

use crate::mock::{Answer, Handler, MockServer};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One pod in the mock.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Name.
    pub name: String,
    /// GPU type id.
    pub gpu: String,
    /// GPUs.
    pub count: u64,
    /// `RUNNING`, `EXITED`, `TERMINATED`.
    pub status: String,
    /// GETs answered so far.
    pub polls: u32,
    /// Spot bid per GPU, if spot.
    pub bid: Option<f64>,
    /// The create input as received.
    pub input: Value,
    /// With container-backed pods: the container and its sshd's port on 127.0.0.1.
    pub container: Option<(String, u16)>,
}

#[derive(Debug, Default)]
struct State {
    pods: BTreeMap<String, Pod>,
    next: u64,
    polls_to_running: u32,
}

/// The RunPod mock's handler.
#[derive(Debug)]
pub struct RunPodApi {
    key: String,
    state: Mutex<State>,
    /// Image of the containers that back pods (`None`: pods are records only).
    containers: Option<String>,
}

/// Label on the containers that back mock pods.
const POD_LABEL: &str = "skyward.test.mockpod";

/// Start a detached container with sshd that authorises `key` for root; its name and the
/// 127.0.0.1 port its sshd is published on.
fn run_pod_container(image: &str, id: &str, key: &str) -> Result<(String, u16), String> {
    let name = format!("skyward-mockpod-{id}-{}", std::process::id());
    let key_env = format!("SKYWARD_AUTHORIZED_KEY={key}");
    let out = std::process::Command::new("docker")
        .args([
            "run",
            "-d",
            "--rm",
            "--name",
            &name,
            "--label",
            POD_LABEL,
            "-p",
            "127.0.0.1::22",
            "-e",
            &key_env,
            "-e",
            "SKYWARD_SSH_USER=root",
            image,
        ])
        .output()
        .map_err(|e| format!("docker run: {e}"))?;
    if !out.status.success() {
        return Err(format!("docker run: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let port = std::process::Command::new("docker").args(["port", &name, "22/tcp"]).output().map_err(|e| format!("docker port: {e}"))?;
    let text = String::from_utf8_lossy(&port.stdout);
    let port = text
        .lines()
        .find_map(|l| l.strip_prefix("127.0.0.1:"))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("no published port: {text}"))?;
    Ok((name, port))
}

fn remove_container(name: &str) {
    let _ = std::process::Command::new("docker").args(["rm", "-f", name]).output();
}

/// A GPU type the mock sells.
#[derive(Debug, Clone, Copy)]
pub struct GpuType(
    /// Id.
    pub &'static str,
    /// Display name.
    pub &'static str,
    /// GB.
    pub u32,
    /// Most GPUs per pod.
    pub u32,
    /// Spot (minimum bid) per GPU.
    pub Option<f64>,
    /// On-demand per GPU.
    pub Option<f64>,
);

/// GPU types the mock sells.
pub const GPU_TYPES: &[GpuType] = &[
    GpuType("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 8, Some(2.19), Some(2.99)),
    GpuType("NVIDIA H100 PCIe", "H100 PCIe", 80, 4, Some(1.79), Some(2.39)),
    GpuType("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 8, Some(0.89), Some(1.64)),
    GpuType("NVIDIA A100-SXM4-80GB", "A100 SXM", 80, 8, None, Some(1.89)),
    GpuType("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 8, Some(0.29), Some(0.69)),
    GpuType("NVIDIA RTX A6000", "RTX A6000", 48, 8, Some(0.25), Some(0.49)),
    GpuType("NVIDIA L40S", "L40S", 48, 8, Some(0.53), Some(0.86)),
    // Not in any catalog: the client must skip it, not guess.
    GpuType("NVIDIA Mystery 9000", "Mystery", 12, 1, Some(0.1), Some(0.2)),
];

impl RunPodApi {
    fn authorized_key(&self, headers: &hyper::HeaderMap, path: &str) -> bool {
        let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::to_string);
        let query = path.split_once('?').and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("api_key=")).map(str::to_string));
        bearer.or(query).is_some_and(|k| k == self.key)
    }

    fn gpu_types(&self, secure: bool) -> Value {
        let types: Vec<Value> = GPU_TYPES
            .iter()
            .map(|GpuType(id, display, gb, max, spot, od)| {
                json!({
                    "id": id, "displayName": display, "memoryInGb": gb, "secureCloud": true, "communityCloud": !secure || *gb < 80,
                    "maxGpuCount": max, "maxGpuCountSecureCloud": max, "maxGpuCountCommunityCloud": max,
                    "lowestPrice": {"minimumBidPrice": spot, "uninterruptablePrice": od, "stockStatus": "High", "minVcpu": 8, "minMemory": 31}
                })
            })
            .collect();
        json!({"data": {"gpuTypes": types}})
    }

    fn create(&self, field: &str, input: &Value) -> Answer {
        let err = |m: &str| {
            Answer::json(json!({"errors": [{"message": m, "path": [field], "extensions": {"code": "BAD_REQUEST"}}], "data": {field: null}}))
        };
        for required in ["name", "imageName", "gpuTypeId", "gpuCount", "cloudType", "ports", "env", "dockerArgs"] {
            if input.get(required).is_none_or(Value::is_null) {
                return err(&format!("Field \"{required}\" of required type was not provided."));
            }
        }
        if !matches!(input["cloudType"].as_str(), Some("SECURE" | "COMMUNITY" | "ALL")) {
            return err("cloudType must be SECURE, COMMUNITY or ALL");
        }
        if !input["ports"].is_string() {
            return err("ports must be a comma-separated string");
        }
        let has_key = input["env"]
            .as_array()
            .is_some_and(|env| env.iter().any(|e| e["key"] == "PUBLIC_KEY" && e["value"].as_str().is_some_and(|v| v.starts_with("ssh-"))));
        if !has_key {
            return err("env must carry PUBLIC_KEY");
        }
        let gpu = input["gpuTypeId"].as_str().unwrap_or_default().to_string();
        let Some(t) = GPU_TYPES.iter().find(|t| t.0 == gpu) else { return err(&format!("unknown gpuTypeId {gpu}")) };
        let count = input["gpuCount"].as_u64().unwrap_or(0);
        if count == 0 || count > t.3 as u64 {
            return err("There are no longer any instances available with the requested specifications. Please refresh and try again.");
        }
        let bid = input.get("bidPerGpu").and_then(Value::as_f64);
        if field == "podRentInterruptable" {
            match (bid, t.4) {
                (None, _) => return err("Field \"bidPerGpu\" of required type \"Float!\" was not provided."),
                (Some(_), None) => {
                    return err(
                        "There are no longer any instances available with the requested specifications. Please refresh and try again.",
                    );
                }
                (Some(b), Some(min)) if b + 1e-9 < min => return err(&format!("bid {b} is below the minimum {min}")),
                _ => {}
            }
        }
        let mut s = self.state.lock().expect("runpod state");
        s.next += 1;
        let id = format!("pod{:08x}", s.next);
        let container = match &self.containers {
            Some(image) => {
                let key = input["env"]
                    .as_array()
                    .and_then(|env| env.iter().find(|e| e["key"] == "PUBLIC_KEY"))
                    .and_then(|e| e["value"].as_str())
                    .unwrap_or_default();
                match run_pod_container(image, &id, key) {
                    Ok(c) => Some(c),
                    Err(e) => return err(&format!("Something went wrong. Please try again later or contact support. ({e})")),
                }
            }
            None => None,
        };
        s.pods.insert(
            id.clone(),
            Pod {
                name: input["name"].as_str().unwrap_or_default().into(),
                gpu: gpu.clone(),
                count,
                status: "RUNNING".into(),
                polls: 0,
                bid,
                input: input.clone(),
                container,
            },
        );
        Answer::json(
            json!({"data": {field: {"id": id, "desiredStatus": "RUNNING", "imageName": input["imageName"], "costPerHr": 0.0, "gpuCount": count,
            "machine": {"dataCenterId": "EU-RO-1", "gpuDisplayName": t.1}}}}),
        )
    }

    fn pod_json(id: &str, p: &Pod, running: bool) -> Value {
        let last = p.container.as_ref().map_or(40000 + id.bytes().last().unwrap_or(0) as u16, |c| c.1);
        json!({
            "id": id, "name": p.name, "desiredStatus": p.status, "image": p.input["imageName"],
            "publicIp": if running { json!("127.0.0.1") } else { json!("") },
            "portMappings": if running { json!({"22": last}) } else { json!({}) },
            "ports": ["22/tcp"], "costPerHr": "0.74", "interruptible": p.bid.is_some(),
            "gpu": {"id": p.gpu, "count": p.count}, "machine": {"dataCenterId": "EU-RO-1"}
        })
    }
}

impl Handler for RunPodApi {
    fn route(&self, method: &str, path: &str, body: &str) -> String {
        let p = path.split('?').next().unwrap_or("");
        if p == "/graphql" {
            let q = serde_json::from_str::<Value>(body).ok().and_then(|v| v["query"].as_str().map(str::to_string)).unwrap_or_default();
            return if q.contains("gpuTypes") {
                "offers"
            } else if q.contains("podRentInterruptable") || q.contains("podFindAndDeployOnDemand") {
                "create"
            } else if q.contains("podTerminate") {
                "delete"
            } else {
                "graphql"
            }
            .into();
        }
        match (method, p) {
            ("GET", "/v1/pods") => "list",
            ("POST", "/v1/pods") => "create",
            ("GET", _) if p.starts_with("/v1/pods/") => "get",
            ("DELETE", _) if p.starts_with("/v1/pods/") => "delete",
            _ => "unknown",
        }
        .into()
    }

    fn authorized(&self, headers: &hyper::HeaderMap, path: &str) -> bool {
        self.authorized_key(headers, path)
    }

    fn handle(&self, op: &str, method: &str, path: &str, body: &str) -> Answer {
        let p = path.split('?').next().unwrap_or("");
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        match op {
            "offers" => Answer::json(self.gpu_types(v["variables"]["secureCloud"].as_bool().unwrap_or(true))),
            "create" if p == "/graphql" => {
                let q = v["query"].as_str().unwrap_or_default();
                let field = if q.contains("podRentInterruptable") { "podRentInterruptable" } else { "podFindAndDeployOnDemand" };
                self.create(field, &v["variables"]["input"])
            }
            "create" => {
                // REST create: map onto the GraphQL path's checks.
                let mut input = v.clone();
                input["gpuTypeId"] = v["gpuTypeIds"][0].clone();
                input["ports"] = json!(
                    v["ports"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(",")).unwrap_or_default()
                );
                input["env"] = json!([{"key": "PUBLIC_KEY", "value": v["env"]["PUBLIC_KEY"]}]);
                input["dockerArgs"] = json!("rest");
                let field = "podFindAndDeployOnDemand";
                let a = self.create(field, &input);
                let parsed: Value = serde_json::from_str(&a.body).unwrap_or(Value::Null);
                match parsed["data"][field]["id"].as_str() {
                    Some(id) => {
                        let s = self.state.lock().expect("runpod state");
                        Answer::json(Self::pod_json(id, &s.pods[id], false))
                    }
                    None => Answer::status(400, json!({"error": parsed["errors"][0]["message"]})),
                }
            }
            "get" => {
                let id = p.trim_start_matches("/v1/pods/");
                let mut s = self.state.lock().expect("runpod state");
                let threshold = s.polls_to_running;
                match s.pods.get_mut(id) {
                    Some(pod) if pod.status != "TERMINATED" => {
                        pod.polls += 1;
                        let running = pod.status == "RUNNING" && pod.polls > threshold;
                        Answer::json(Self::pod_json(id, pod, running))
                    }
                    _ => Answer::status(404, json!({"error": "pod not found"})),
                }
            }
            "list" => {
                let s = self.state.lock().expect("runpod state");
                let name = path
                    .split_once('?')
                    .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("name=")))
                    .map(|n| n.replace("%2D", "-"));
                let pods: Vec<Value> = s
                    .pods
                    .iter()
                    .filter(|(_, p)| p.status != "TERMINATED" && name.as_ref().is_none_or(|n| &p.name == n))
                    .map(|(id, p)| Self::pod_json(id, p, p.status == "RUNNING" && p.polls > s.polls_to_running))
                    .collect();
                Answer::json(Value::Array(pods))
            }
            "delete" if method == "DELETE" => {
                let id = p.trim_start_matches("/v1/pods/");
                let mut s = self.state.lock().expect("runpod state");
                match s.pods.get_mut(id) {
                    Some(pod) if pod.status != "TERMINATED" => {
                        pod.status = "TERMINATED".into();
                        if let Some((name, _)) = pod.container.take() {
                            remove_container(&name);
                        }
                        Answer { status: 204, body: String::new() }
                    }
                    _ => Answer::status(404, json!({"error": "pod not found"})),
                }
            }
            _ => Answer::status(400, json!({"errors": [{"message": format!("mock: unsupported {method} {path}")}]})),
        }
    }
}

impl Drop for RunPodMock {
    fn drop(&mut self) {
        let names: Vec<String> = self
            .api
            .state
            .lock()
            .map(|mut s| s.pods.values_mut().filter_map(|p| p.container.take()).map(|c| c.0).collect())
            .unwrap_or_default();
        for n in names {
            remove_container(&n);
        }
    }
}

/// A running RunPod mock.
#[derive(Debug)]
pub struct RunPodMock {
    /// The server (faults, log).
    pub server: MockServer,
    api: Arc<RunPodApi>,
    key: String,
}

impl RunPodMock {
    /// Start a mock that accepts `key`.
    pub async fn start(key: &str) -> std::io::Result<Self> {
        Self::start_inner(key, None).await
    }

    /// A mock whose pods are real containers of `image` (sshd authorising the pod's
    /// `PUBLIC_KEY` for root, published on 127.0.0.1): a pool can start on it end to end.
    /// Containers are removed with their pods, and with the mock.
    pub async fn start_with_containers(key: &str, image: &str) -> std::io::Result<Self> {
        Self::start_inner(key, Some(image.to_string())).await
    }

    async fn start_inner(key: &str, containers: Option<String>) -> std::io::Result<Self> {
        let api =
            Arc::new(RunPodApi { key: key.into(), state: Mutex::new(State { polls_to_running: 1, ..Default::default() }), containers });
        let server = MockServer::start(Arc::clone(&api) as Arc<dyn Handler>).await?;
        Ok(Self { server, api, key: key.into() })
    }

    /// Provider settings pointing at this mock.
    pub fn settings(&self, key: &str) -> skyward_provider::runpod::RunPod {
        skyward_provider::runpod::RunPod {
            api_key: Some(skyward_provider::Secret::new(key.into())),
            graphql_url: format!("{}/graphql", self.server.url()),
            rest_url: format!("{}/v1", self.server.url()),
            request_timeout: std::time::Duration::from_secs(5),
            ..Default::default()
        }
    }

    /// GETs a pod answers before it runs with a public IP.
    pub fn set_polls_to_running(&self, n: u32) {
        self.api.state.lock().expect("runpod state").polls_to_running = n;
    }

    /// Every pod ever created, by id.
    pub fn pods(&self) -> BTreeMap<String, Pod> {
        self.api.state.lock().expect("runpod state").pods.clone()
    }

    /// Put a pod named `name` in the account directly (a leak from an earlier run).
    pub fn plant(&self, name: &str) -> String {
        let input = json!({"name": name, "imageName": "x", "gpuTypeId": GPU_TYPES[4].0, "gpuCount": 1, "cloudType": "SECURE", "ports": "22/tcp",
            "env": [{"key": "PUBLIC_KEY", "value": "ssh-ed25519 AAAA"}], "dockerArgs": "x"});
        let a = self.api.create("podFindAndDeployOnDemand", &input);
        let v: Value = serde_json::from_str(&a.body).unwrap_or(Value::Null);
        v["data"]["podFindAndDeployOnDemand"]["id"].as_str().unwrap_or_default().to_string()
    }

    /// End a pod behind the client's back (a preemption).
    pub fn preempt(&self, id: &str) {
        if let Some(p) = self.api.state.lock().expect("runpod state").pods.get_mut(id) {
            p.status = "EXITED".into();
        }
    }
}

impl crate::kit::CloudUnderTest for RunPodMock {
    fn name(&self) -> &'static str {
        "runpod"
    }
    fn server(&self) -> &MockServer {
        &self.server
    }
    fn key(&self) -> &str {
        &self.key
    }
    fn cloud(&self, key: &str) -> Result<Box<dyn skyward_provider::machines::Cloud>, skyward_provider::ProviderError> {
        Ok(Box::new(self.settings(key).connect()?))
    }
    fn capacity(&self) -> crate::Fault {
        crate::Fault::Respond {
            status: 200,
            body: json!({"errors": [{"message": "There are no longer any instances available with the requested specifications. Please refresh and try again.",
                "path": ["podRentInterruptable"], "extensions": {"code": "RUNPOD"}}], "data": {"podRentInterruptable": null}})
            .to_string(),
            retry_after: None,
        }
    }
    fn quota(&self) -> crate::Fault {
        crate::Fault::Respond {
            status: 200,
            body: json!({"errors": [{"message": "Your account balance is too low to deploy this pod.", "extensions": {"code": "RUNPOD"}}]})
                .to_string(),
            retry_after: None,
        }
    }
    fn live(&self) -> futures::future::BoxFuture<'_, Vec<String>> {
        Box::pin(async { self.pods().values().filter(|p| p.status != "TERMINATED").map(|p| p.name.clone()).collect() })
    }
    fn plant<'a>(&'a self, name: &'a str) -> futures::future::BoxFuture<'a, String> {
        Box::pin(async move { RunPodMock::plant(self, name) })
    }
    fn preempt<'a>(&'a self, id: &'a str) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move { RunPodMock::preempt(self, id) })
    }
    fn list_without_ids(&self) -> String {
        json!([{"name": "skyward-sky-x-r0-g0", "desiredStatus": "RUNNING"}]).to_string()
    }
}
