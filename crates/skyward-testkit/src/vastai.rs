//! A mock of VastAI's API (`/api/v0`, trailing slashes): offer search, SSH keys, accepting an ask,
//! instances (`{"instances": obj|null}` for one, a list for all), destroy, with the real field
//! names, `actual_status` values and `{"success": false, "error", "msg"}` error bodies.

use crate::mock::{Answer, Handler, MockServer};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One instance in the mock.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Label.
    pub label: String,
    /// Ask it was made from.
    pub ask: u64,
    /// `null` (as `None`), `loading`, `running`, `stopped`, `exited`.
    pub status: Option<String>,
    /// Destroyed.
    pub destroyed: bool,
    /// GETs so far.
    pub polls: u32,
    /// Bid, if spot.
    pub price: Option<f64>,
    /// The create body as received.
    pub body: Value,
}

#[derive(Debug, Default)]
struct State {
    instances: BTreeMap<u64, Instance>,
    keys: BTreeMap<u64, String>,
    next: u64,
    polls_to_running: u32,
}

/// An ask: id, gpu_name, num_gpus, gpu_ram (MB), dph_total, min_bid, reliability, cuda_max_good,
/// verified, geolocation.
#[derive(Debug, Clone, Copy)]
pub struct Ask(pub u64, pub &'static str, pub u32, pub u32, pub f64, pub f64, pub f64, pub f64, pub bool, pub &'static str);

/// Asks the mock sells.
pub const ASKS: &[Ask] = &[
    Ask(1001, "RTX 4090", 1, 24564, 0.40, 0.22, 0.99, 12.8, true, "US"),
    Ask(1002, "RTX 4090", 2, 24564, 0.78, 0.40, 0.98, 12.4, true, "DE"),
    Ask(1003, "H100 SXM", 8, 81559, 19.20, 12.0, 0.995, 12.8, true, "US"),
    Ask(1004, "H100 PCIE", 1, 81559, 2.10, 1.30, 0.97, 12.6, true, "US"),
    Ask(1005, "A100 PCIE", 1, 40960, 0.80, 0.45, 0.99, 12.2, true, "CA"),
    Ask(1006, "RTX A6000", 1, 49140, 0.45, 0.25, 0.99, 12.4, true, "US"),
    // Filtered by the client: old CUDA (the server ignores the CUDA filter), low reliability,
    // and a GPU no catalog knows.
    Ask(1007, "RTX 3090", 1, 24576, 0.20, 0.10, 0.99, 11.8, true, "US"),
    Ask(1008, "RTX 4090", 1, 24564, 0.25, 0.12, 0.80, 12.8, true, "US"),
    Ask(1009, "GTX Mystery", 1, 8192, 0.05, 0.02, 0.99, 12.8, true, "US"),
];

/// The VastAI mock's handler.
#[derive(Debug)]
pub struct VastAiApi {
    key: String,
    state: Mutex<State>,
}

fn fail(status: u16, error: &str, msg: &str) -> Answer {
    Answer::status(status, json!({"success": false, "error": error, "msg": msg}))
}

fn matches(filter: &Value, value: &Value) -> bool {
    let Some(obj) = filter.as_object() else { return true };
    obj.iter().all(|(op, want)| match op.as_str() {
        "eq" => value == want,
        "neq" => value != want,
        "gt" => value.as_f64().zip(want.as_f64()).is_some_and(|(v, w)| v > w),
        "gte" => value.as_f64().zip(want.as_f64()).is_some_and(|(v, w)| v >= w),
        "lt" => value.as_f64().zip(want.as_f64()).is_some_and(|(v, w)| v < w),
        "lte" => value.as_f64().zip(want.as_f64()).is_some_and(|(v, w)| v <= w),
        "in" => want.as_array().is_some_and(|a| a.contains(value)),
        _ => true,
    })
}

impl VastAiApi {
    fn ask_json(a: &Ask) -> Value {
        json!({"id": a.0, "ask_contract_id": a.0, "machine_id": a.0 + 5000, "gpu_name": a.1, "num_gpus": a.2, "gpu_ram": a.3,
            "dph_total": a.4, "min_bid": a.5, "reliability": a.6, "cuda_max_good": a.7, "verified": a.8, "geolocation": a.9,
            "cpu_cores_effective": 8.0 * a.2 as f64, "cpu_ram": 32768 * a.2, "disk_space": 500.0, "rentable": true, "rented": false,
            "direct_port_count": 20, "external": false, "inet_down": 900.0, "inet_up": 800.0})
    }

    fn search(&self, q: &Value) -> Answer {
        let offers: Vec<Value> = ASKS
            .iter()
            .map(Self::ask_json)
            .filter(|o| {
                // The CUDA filter is not applied server-side (as on the real API).
                ["verified", "rentable", "rented", "external", "num_gpus", "reliability", "geolocation", "direct_port_count"]
                    .iter()
                    .all(|k| q.get(*k).is_none_or(|f| matches(f, &o[*k])))
            })
            .collect();
        Answer::json(json!({"offers": offers}))
    }

    fn instance_json(id: u64, i: &Instance) -> Value {
        let running = i.status.as_deref() == Some("running");
        json!({"id": id, "machine_id": i.ask + 5000, "actual_status": i.status, "intended_status": "running", "label": i.label,
            "public_ipaddr": if running { "127.0.0.1" } else { "" },
            "ports": if running { json!({"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": format!("{}", 41000 + id % 1000)}]}) } else { json!({}) },
            "ssh_host": "ssh4.vast.ai", "ssh_port": 31000 + id % 1000, "image_runtype": i.body["runtype"], "is_bid": i.price.is_some(),
            "dph_total": 0.4, "num_gpus": 1})
    }

    fn create(&self, ask: u64, body: &Value) -> Answer {
        if body["client_id"] != "me" {
            return fail(400, "invalid_args", "client_id must be \"me\"");
        }
        for f in ["image", "disk", "label", "runtype"] {
            if body.get(f).is_none_or(Value::is_null) {
                return fail(400, "invalid_args", &format!("missing {f}"));
            }
        }
        let runtype = body["runtype"].as_str().unwrap_or_default();
        if !["ssh", "jupyter", "args", "ssh_proxy", "ssh_direct", "ssh_direc", "jupyter_proxy", "jupyter_direct"].contains(&runtype) {
            return fail(400, "invalid_args", &format!("unknown runtype {runtype}"));
        }
        let Some(a) = ASKS.iter().find(|a| a.0 == ask) else {
            return fail(400, "no_such_ask", &format!("Instance type by id {ask} is not available."));
        };
        let mut s = self.state.lock().expect("vast state");
        if s.instances.values().any(|i| i.ask == ask && !i.destroyed) {
            return fail(400, "no_such_ask", &format!("Instance type by id {ask} is not available."));
        }
        let price = body.get("price").and_then(Value::as_f64);
        if let Some(p) = price
            && p + 1e-9 < a.5
        {
            return fail(400, "invalid_args", &format!("bid {p} is below the minimum {}", a.5));
        }
        s.next += 1;
        let id = 7_000_000 + s.next;
        s.instances.insert(
            id,
            Instance {
                label: body["label"].as_str().unwrap_or_default().into(),
                ask,
                status: None,
                destroyed: false,
                polls: 0,
                price,
                body: body.clone(),
            },
        );
        Answer::json(json!({"success": true, "new_contract": id}))
    }
}

impl Handler for VastAiApi {
    fn route(&self, method: &str, path: &str, _body: &str) -> String {
        let p = path.split('?').next().unwrap_or("");
        let Some(rest) = p.strip_prefix("/api/v0/") else { return "unknown".into() };
        if !rest.ends_with('/') {
            return "unknown".into();
        }
        let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            ("POST", ["bundles"]) => "offers",
            ("GET", ["ssh"]) => "keys",
            ("POST", ["ssh"]) => "add_key",
            ("DELETE", ["ssh", _]) => "delete_key",
            ("PUT", ["asks", _]) => "create",
            ("GET", ["instances"]) => "list",
            ("GET", ["instances", _]) => "get",
            ("DELETE", ["instances", _]) => "delete",
            _ => "unknown",
        }
        .into()
    }

    fn authorized(&self, headers: &hyper::HeaderMap, _path: &str) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|k| k == self.key)
    }

    fn handle(&self, op: &str, _method: &str, path: &str, body: &str) -> Answer {
        let p = path.split('?').next().unwrap_or("");
        let id_at = |i: usize| p.trim_end_matches('/').split('/').nth(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        match op {
            "offers" => self.search(&v),
            "keys" => {
                let s = self.state.lock().expect("vast state");
                Answer::json(Value::Array(s.keys.iter().map(|(id, k)| json!({"id": id, "public_key": k})).collect()))
            }
            "add_key" => {
                let Some(k) = v["ssh_key"].as_str().filter(|k| k.starts_with("ssh-")) else {
                    return fail(400, "invalid_args", "ssh_key is not a public key");
                };
                let mut s = self.state.lock().expect("vast state");
                s.next += 1;
                let id = s.next;
                s.keys.insert(id, k.to_string());
                Answer::json(json!({"success": true, "key": {"id": id, "public_key": k}}))
            }
            "delete_key" => match self.state.lock().expect("vast state").keys.remove(&id_at(4)) {
                Some(_) => Answer::json(json!({"success": true})),
                None => fail(404, "no_such_key", "no such key"),
            },
            "create" => self.create(id_at(4), &v),
            "get" => {
                let mut s = self.state.lock().expect("vast state");
                let threshold = s.polls_to_running;
                match s.instances.get_mut(&id_at(4)) {
                    Some(i) if !i.destroyed => {
                        i.polls += 1;
                        if i.status.as_deref() != Some("stopped") {
                            i.status = Some(if i.polls > threshold { "running" } else { "loading" }.into());
                        }
                        Answer::json(json!({"instances": Self::instance_json(id_at(4), i)}))
                    }
                    _ => Answer::json(json!({"instances": null})),
                }
            }
            "list" => {
                let s = self.state.lock().expect("vast state");
                Answer::json(
                    json!({"instances": s.instances.iter().filter(|(_, i)| !i.destroyed).map(|(id, i)| Self::instance_json(*id, i)).collect::<Vec<_>>()}),
                )
            }
            "delete" => {
                let mut s = self.state.lock().expect("vast state");
                match s.instances.get_mut(&id_at(4)) {
                    Some(i) if !i.destroyed => {
                        i.destroyed = true;
                        Answer::json(json!({"success": true}))
                    }
                    _ => fail(404, "no_such_instance", "no such instance"),
                }
            }
            _ => Answer { status: 404, body: "<html>not found</html>".into() },
        }
    }
}

/// A running VastAI mock.
#[derive(Debug)]
pub struct VastAiMock {
    /// The server (faults, log).
    pub server: MockServer,
    api: Arc<VastAiApi>,
    key: String,
}

impl VastAiMock {
    /// Start a mock that accepts `key`.
    pub async fn start(key: &str) -> std::io::Result<Self> {
        let api = Arc::new(VastAiApi { key: key.into(), state: Mutex::new(State { polls_to_running: 1, next: 0, ..Default::default() }) });
        let server = MockServer::start(Arc::clone(&api) as Arc<dyn Handler>).await?;
        Ok(Self { server, api, key: key.into() })
    }

    /// Provider settings pointing at this mock.
    pub fn settings(&self, key: &str) -> skyward_provider::vastai::VastAi {
        skyward_provider::vastai::VastAi {
            api_key: Some(skyward_provider::Secret::new(key.into())),
            endpoint: self.server.url(),
            request_timeout: std::time::Duration::from_secs(5),
            ..Default::default()
        }
    }

    /// GETs an instance answers before it runs.
    pub fn set_polls_to_running(&self, n: u32) {
        self.api.state.lock().expect("vast state").polls_to_running = n;
    }

    /// Every instance ever created.
    pub fn instances(&self) -> BTreeMap<u64, Instance> {
        self.api.state.lock().expect("vast state").instances.clone()
    }

    /// SSH keys on the account.
    pub fn keys(&self) -> Vec<String> {
        self.api.state.lock().expect("vast state").keys.values().cloned().collect()
    }

    /// Put an instance labelled `label` in the account directly (a leak from an earlier run).
    pub fn plant(&self, label: &str) -> String {
        let mut s = self.api.state.lock().expect("vast state");
        s.next += 1;
        let id = 7_000_000 + s.next;
        let body = json!({"client_id": "me", "image": "x", "disk": 10, "label": label, "runtype": "ssh"});
        s.instances.insert(
            id,
            Instance { label: label.into(), ask: 0, status: Some("running".into()), destroyed: false, polls: 0, price: None, body },
        );
        id.to_string()
    }

    /// Stop an instance behind the client's back (outbid).
    pub fn preempt(&self, id: &str) {
        let Ok(id) = id.parse::<u64>() else { return };
        if let Some(i) = self.api.state.lock().expect("vast state").instances.get_mut(&id) {
            i.status = Some("stopped".into());
        }
    }
}

impl crate::kit::CloudUnderTest for VastAiMock {
    fn name(&self) -> &'static str {
        "vastai"
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
            status: 400,
            body: json!({"success": false, "error": "no_such_ask", "msg": "Instance type by id 1001 is not available."}).to_string(),
            retry_after: None,
        }
    }
    fn quota(&self) -> crate::Fault {
        crate::Fault::Respond {
            status: 400,
            body: json!({"success": false, "error": "insufficient_credit", "msg": "Insufficient credits"}).to_string(),
            retry_after: None,
        }
    }
    fn live(&self) -> futures::future::BoxFuture<'_, Vec<String>> {
        Box::pin(async { self.instances().values().filter(|i| !i.destroyed).map(|i| i.label.clone()).collect() })
    }
    fn plant<'a>(&'a self, name: &'a str) -> futures::future::BoxFuture<'a, String> {
        Box::pin(async move { VastAiMock::plant(self, name) })
    }
    fn preempt<'a>(&'a self, id: &'a str) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move { VastAiMock::preempt(self, id) })
    }
    fn list_without_ids(&self) -> String {
        json!({"instances": [{"label": "skyward-sky-x-r0-g0", "actual_status": "running"}]}).to_string()
    }
    fn pool_resources(&self) -> futures::future::BoxFuture<'_, usize> {
        Box::pin(async { self.keys().len() })
    }
}
