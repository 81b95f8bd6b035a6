//! RunPod: GPU pods (containers with SSH) through RunPod's GraphQL API (offers, create) and REST
//! API (get, list, delete). Pods share no private network, so the default is standalone mode.
//!
//! Offers: one GraphQL call (`gpuTypes` with the lowest price for the configured cloud type),
//! one offer per GPU count. Create: `podRentInterruptable` (spot, with a bid per GPU) or
//! `podFindAndDeployOnDemand`; with `global_networking` the REST `POST /pods`. The pool's public
//! key goes in `PUBLIC_KEY`; the start command installs it and runs sshd.

use crate::http::{self, Api, Auth, ErrorClass, ErrorResponse, Idempotent, Reply};
use crate::machines::{Cloud, CloudProvider, Machine, MachineRequest, MachineSettings, MachineState, SshEndpoint, dead_man_switch};
use crate::offers::{Architecture, Billing, InstanceType, Offer, OfferAccelerator};
use crate::{PoolContext, ProviderError, Secret};
use futures::future::BoxFuture;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

const NAME: &str = "runpod";

/// Secure (dedicated) or community (peer-hosted) cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudType {
    /// Secure Cloud.
    Secure,
    /// Community Cloud.
    Community,
}

/// RunPod settings (the seed's parameters).
#[derive(Debug, Clone)]
pub struct RunPod {
    /// API key; `RUNPOD_API_KEY` when `None`.
    pub api_key: Option<Secret<String>>,
    /// Secure or community cloud.
    pub cloud_type: CloudType,
    /// Ubuntu of the default image: `20.04`, `22.04`, `24.04` or `newest`.
    pub ubuntu: String,
    /// Image override (must run bash; sshd is installed when missing).
    pub image: Option<String>,
    /// Container disk, GB.
    pub container_disk_gb: u32,
    /// Persistent volume, GB.
    pub volume_gb: u32,
    /// Volume mount path.
    pub volume_mount_path: String,
    /// Preferred data centers; empty: global.
    pub data_center_ids: Vec<String>,
    /// Port mappings (`22/tcp` is always included).
    pub ports: Vec<String>,
    /// How long a pod may take to run with a public SSH port.
    pub provision_timeout: Duration,
    /// How long the worker's bootstrap may take.
    pub bootstrap_timeout: Duration,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// Coordinator silence after which a machine ends itself (armed at boot, before the worker).
    pub instance_timeout: Duration,
    /// Multiplier on the minimum bid for spot pods.
    pub bid_multiplier: f64,
    /// Container registry credential id, if the image is private.
    pub registry_auth: Option<String>,
    /// Create through REST with global networking (pods of the pool reach each other).
    pub global_networking: bool,
    /// CPU clock tier for CPU pods (`3c` or `5c`); GPU offers ignore it.
    pub cpu_clock: String,
    /// GraphQL endpoint (tests point it at a mock).
    pub graphql_url: String,
    /// REST endpoint.
    pub rest_url: String,
}

impl Default for RunPod {
    fn default() -> Self {
        Self {
            api_key: None,
            cloud_type: CloudType::Secure,
            ubuntu: "newest".into(),
            image: None,
            container_disk_gb: 50,
            volume_gb: 20,
            volume_mount_path: "/workspace".into(),
            data_center_ids: Vec::new(),
            ports: vec!["22/tcp".into()],
            provision_timeout: Duration::from_secs(300),
            bootstrap_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
            instance_timeout: Duration::from_secs(300),
            bid_multiplier: 1.0,
            registry_auth: None,
            global_networking: false,
            cpu_clock: "3c".into(),
            graphql_url: "https://api.runpod.io/graphql".into(),
            rest_url: "https://rest.runpod.io/v1".into(),
        }
    }
}

/// A RunPod API client for one configuration.
#[derive(Debug, Clone)]
pub struct RunPodCloud {
    config: RunPod,
    graphql: Api,
    rest: Api,
    image: String,
}

fn classify(e: &ErrorResponse) -> Option<ErrorClass> {
    if e.status >= 500 { None } else { classify_message(&e.body) }
}

fn classify_message(text: &str) -> Option<ErrorClass> {
    let t = text.to_ascii_lowercase();
    if t.contains("no longer any instances available")
        || t.contains("supply_constraint")
        || t.contains("not enough") && t.contains("available")
    {
        Some(ErrorClass::Capacity)
    } else if t.contains("balance") || t.contains("insufficient funds") || t.contains("quota") || t.contains("spend limit") {
        Some(ErrorClass::Quota)
    } else if t.contains("unauthorized") || t.contains("unauthenticated") || t.contains("invalid api key") {
        Some(ErrorClass::Auth)
    } else {
        None
    }
}

impl RunPod {
    /// The provider: this API client plus SSH bootstrap of each pod.
    pub fn provider(self) -> Result<CloudProvider, ProviderError> {
        let settings = MachineSettings {
            provision_timeout: self.provision_timeout,
            ssh_timeout: self.bootstrap_timeout.min(Duration::from_secs(300)),
            instance_timeout: self.instance_timeout,
            ..MachineSettings::default()
        };
        Ok(CloudProvider::new(self.connect()?, settings))
    }

    /// Check the settings and build the client.
    pub fn connect(self) -> Result<RunPodCloud, ProviderError> {
        let key = http::credential(NAME, self.api_key.as_ref(), "RUNPOD_API_KEY")?;
        let image = match &self.image {
            Some(i) => i.clone(),
            None => default_image(&self.ubuntu)?,
        };
        if !(self.bid_multiplier.is_finite() && self.bid_multiplier > 0.0) {
            return Err(invalid(format!("bid_multiplier must be positive, got {}", self.bid_multiplier)));
        }
        if !matches!(self.cpu_clock.as_str(), "3c" | "5c") {
            return Err(invalid(format!("cpu_clock must be \"3c\" or \"5c\", got {:?}", self.cpu_clock)));
        }
        for p in &self.ports {
            let ok = p.split_once('/').is_some_and(|(n, proto)| n.parse::<u16>().is_ok() && matches!(proto, "tcp" | "http" | "udp"));
            if !ok {
                return Err(invalid(format!("port {p:?} is not <number>/<tcp|http|udp> (hint: \"22/tcp\")")));
            }
        }
        let graphql = Api::new(NAME, &self.graphql_url, Auth::Bearer(key.clone()), "RUNPOD_API_KEY", self.request_timeout, classify)?;
        let rest = Api::new(NAME, &self.rest_url, Auth::Bearer(key), "RUNPOD_API_KEY", self.request_timeout, classify)?;
        Ok(RunPodCloud { config: self, graphql, rest, image })
    }
}

fn default_image(ubuntu: &str) -> Result<String, ProviderError> {
    Ok(match ubuntu {
        "newest" | "24.04" => "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04",
        "22.04" => "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04",
        "20.04" => "nvidia/cuda:12.4.1-cudnn-runtime-ubuntu20.04",
        other => return Err(invalid(format!("ubuntu {other:?} is not one of 20.04, 22.04, 24.04, newest"))),
    }
    .to_string())
}

fn invalid(message: String) -> ProviderError {
    ProviderError::Invalid { provider: NAME, message }
}

const GPU_TYPES: &str = "query GpuTypes($secureCloud: Boolean) { gpuTypes { id displayName memoryInGb secureCloud communityCloud \
maxGpuCount maxGpuCountSecureCloud maxGpuCountCommunityCloud lowestPrice(input: {gpuCount: 1, secureCloud: $secureCloud}) \
{ minimumBidPrice uninterruptablePrice stockStatus minVcpu minMemory } } }";

const POD_FIELDS: &str = "id desiredStatus imageName costPerHr gpuCount machine { dataCenterId gpuDisplayName }";

impl RunPodCloud {
    /// A GraphQL call: errors in the body (HTTP 200) become typed errors.
    async fn graphql(&self, operation: &'static str, query: &str, variables: Value, idem: Idempotent) -> Result<Value, ProviderError> {
        let body = json!({ "query": query, "variables": variables });
        let v = self.graphql.json(operation, Method::POST, "", Some(&body), idem).await?;
        if let Some(errors) = v.get("errors").and_then(Value::as_array).filter(|e| !e.is_empty()) {
            let message: Vec<String> = errors
                .iter()
                .map(|e| {
                    let m = e.get("message").and_then(Value::as_str).unwrap_or("(no message)");
                    match e.pointer("/extensions/code").and_then(Value::as_str) {
                        Some(code) => format!("{m} [{code}]"),
                        None => m.to_string(),
                    }
                })
                .collect();
            let error = ErrorResponse { status: 200, body: self.graphql.scrub(&message.join("; ")) };
            return Err(match classify_message(&error.body) {
                Some(class) => self.graphql.classified(class, operation, &error),
                None => ProviderError::Failed { provider: NAME, operation, message: error.body },
            });
        }
        v.get("data").cloned().ok_or_else(|| http::malformed(NAME, "GraphQL response", "data", "missing"))
    }

    fn parse_offers(&self, data: &Value) -> Result<Vec<Offer>, ProviderError> {
        let types = http::field(NAME, "gpuTypes response", data, "gpuTypes")?
            .as_array()
            .ok_or_else(|| http::malformed(NAME, "gpuTypes response", "gpuTypes", "not a list"))?;
        let secure = self.config.cloud_type == CloudType::Secure;
        let mut offers = Vec::new();
        for t in types {
            let id = http::str_field(NAME, "gpuType", t, "id")?;
            let sold = t.get(if secure { "secureCloud" } else { "communityCloud" }).and_then(Value::as_bool).unwrap_or(false);
            let Some(price) = t.get("lowestPrice").filter(|p| !p.is_null()) else { continue };
            let spot = price.get("minimumBidPrice").and_then(http::as_f64).filter(|p| *p > 0.0);
            let od = price.get("uninterruptablePrice").and_then(http::as_f64).filter(|p| *p > 0.0);
            if !sold || (spot.is_none() && od.is_none()) {
                continue;
            }
            let vram = t.get("memoryInGb").and_then(http::as_f64);
            let Some(acc) = OfferAccelerator::from_provider(id, vram, 1.0) else {
                tracing::debug!(gpu = id, "runpod: GPU type not in the catalog; skipped");
                continue;
            };
            let max = t
                .get(if secure { "maxGpuCountSecureCloud" } else { "maxGpuCountCommunityCloud" })
                .and_then(Value::as_u64)
                .or_else(|| t.get("maxGpuCount").and_then(Value::as_u64))
                .unwrap_or(1)
                .clamp(1, 16);
            let vcpu = price.get("minVcpu").and_then(http::as_f64).unwrap_or(0.0);
            let mem = price.get("minMemory").and_then(http::as_f64).unwrap_or(0.0);
            for n in 1..=max {
                let count = n as f64;
                let region = if self.config.data_center_ids.len() == 1 { self.config.data_center_ids[0].clone() } else { String::new() };
                offers.push(Offer {
                    id: format!("{id}:{n}"),
                    provider: NAME.into(),
                    region,
                    instance_type: InstanceType {
                        name: id.to_string(),
                        accelerator: Some(OfferAccelerator { count, ..acc.clone() }),
                        vcpus: vcpu * count,
                        memory_gb: mem * count,
                        architecture: Architecture::X86_64,
                    },
                    spot_price: spot.map(|p| p * self.config.bid_multiplier * count),
                    on_demand_price: od.map(|p| p * count),
                    billing: Billing::Second,
                    specific: json!({ "gpuTypeId": id, "gpuCount": n, "minimumBidPrice": spot }),
                });
            }
        }
        Ok(offers)
    }

    fn start_command(&self, request: &MachineRequest) -> String {
        format!(
            "{} if ! command -v sshd >/dev/null 2>&1; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null; fi; \
             mkdir -p ~/.ssh /run/sshd && echo \"$PUBLIC_KEY\" >> ~/.ssh/authorized_keys && chmod 700 ~/.ssh && chmod 600 ~/.ssh/authorized_keys; \
             ssh-keygen -A >/dev/null 2>&1; /usr/sbin/sshd; sleep infinity",
            dead_man_switch(request.instance_timeout_secs)
        )
    }

    fn ports(&self) -> Vec<String> {
        let mut ports = self.config.ports.clone();
        if !ports.iter().any(|p| p == "22/tcp") {
            ports.insert(0, "22/tcp".into());
        }
        ports
    }

    async fn create_graphql(
        &self,
        pool: &PoolContext,
        request: &MachineRequest,
        gpu: &str,
        count: u64,
        bid: Option<f64>,
    ) -> Result<String, ProviderError> {
        let placement = pool.placement.as_ref();
        let mut input = json!({
            "name": request.name,
            "imageName": self.image,
            "gpuTypeId": gpu,
            "gpuCount": count,
            "cloudType": if self.config.cloud_type == CloudType::Secure { "SECURE" } else { "COMMUNITY" },
            "containerDiskInGb": placement.and_then(|p| p.disk_gb).unwrap_or(self.config.container_disk_gb),
            "volumeInGb": self.config.volume_gb,
            "volumeMountPath": self.config.volume_mount_path,
            "ports": self.ports().join(","),
            "supportPublicIp": true,
            "startSsh": true,
            "dockerArgs": format!("bash -c '{}'", self.start_command(request).replace('\'', "'\\''")),
            "env": [{"key": "PUBLIC_KEY", "value": request.ssh_public_key}, {"key": "SKYWARD_POOL", "value": pool.pool_id}],
        });
        if let Some(dc) = self.config.data_center_ids.first() {
            input["dataCenterId"] = json!(dc);
        }
        if let Some(auth) = &self.config.registry_auth {
            input["containerRegistryAuthId"] = json!(auth);
        }
        let (mutation, field) = match bid {
            Some(b) => {
                input["bidPerGpu"] = json!((b * 1000.0).round() / 1000.0);
                (
                    "mutation Deploy($input: PodRentInterruptableInput!) { podRentInterruptable(input: $input) { FIELDS } }",
                    "podRentInterruptable",
                )
            }
            None => (
                "mutation Deploy($input: PodFindAndDeployOnDemandInput) { podFindAndDeployOnDemand(input: $input) { FIELDS } }",
                "podFindAndDeployOnDemand",
            ),
        };
        let query = mutation.replace("FIELDS", POD_FIELDS);
        let data = self.graphql("creating a pod", &query, json!({ "input": input }), Idempotent::No).await?;
        let pod = data.get(field).filter(|p| !p.is_null()).ok_or_else(|| ProviderError::NoCapacity {
            provider: NAME,
            message: format!("{field} returned no pod (no machine with {count} x {gpu})"),
        })?;
        Ok(http::str_field(NAME, "Pod", pod, "id")?.to_string())
    }

    async fn create_rest(
        &self,
        pool: &PoolContext,
        request: &MachineRequest,
        gpu: &str,
        count: u64,
        spot: bool,
    ) -> Result<String, ProviderError> {
        let placement = pool.placement.as_ref();
        let mut body = json!({
            "name": request.name,
            "imageName": self.image,
            "gpuTypeIds": [gpu],
            "gpuCount": count,
            "cloudType": if self.config.cloud_type == CloudType::Secure { "SECURE" } else { "COMMUNITY" },
            "computeType": "GPU",
            "containerDiskInGb": placement.and_then(|p| p.disk_gb).unwrap_or(self.config.container_disk_gb),
            "volumeInGb": self.config.volume_gb,
            "volumeMountPath": self.config.volume_mount_path,
            "ports": self.ports(),
            "env": {"PUBLIC_KEY": request.ssh_public_key, "SKYWARD_POOL": pool.pool_id},
            "dockerStartCmd": ["bash", "-c", self.start_command(request)],
            "interruptible": spot,
            "supportPublicIp": true,
            "globalNetworking": true,
        });
        if !self.config.data_center_ids.is_empty() {
            body["dataCenterIds"] = json!(self.config.data_center_ids);
        }
        if let Some(auth) = &self.config.registry_auth {
            body["containerRegistryAuthId"] = json!(auth);
        }
        let pod = self.rest.json("creating a pod", Method::POST, "/pods", Some(&body), Idempotent::No).await?;
        Ok(http::str_field(NAME, "Pod", &pod, "id")?.to_string())
    }

    async fn find_by_name(&self, name: &str) -> Result<Option<Machine>, ProviderError> {
        let path = format!("/pods?name={}", urlencode(name));
        Ok(self.list_pods(&path).await?.into_iter().find(|m| m.name == name))
    }

    async fn list_pods(&self, path: &str) -> Result<Vec<Machine>, ProviderError> {
        let v = self.rest.json("listing pods", Method::GET, path, None, Idempotent::Yes).await?;
        let pods = v.as_array().ok_or_else(|| http::malformed(NAME, "pod list", "(body)", "not a list"))?;
        pods.iter().map(pod_machine).collect()
    }
}

/// Percent-encode a query value.
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn pod_machine(pod: &Value) -> Result<Machine, ProviderError> {
    let id = http::str_field(NAME, "Pod", pod, "id")?.to_string();
    let name = pod.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
    let status = pod.get("desiredStatus").and_then(Value::as_str).unwrap_or("");
    let ip = pod.get("publicIp").and_then(Value::as_str).filter(|s| !s.is_empty());
    let port = pod.pointer("/portMappings/22").and_then(http::as_f64).and_then(|p| u16::try_from(p as u64).ok());
    let ssh = ip.zip(port).map(|(host, port)| SshEndpoint { host: host.to_string(), port, user: "root".into() });
    let state = match status {
        "TERMINATED" => MachineState::Gone,
        "EXITED" => MachineState::Stopped,
        "RUNNING" if ssh.is_some() => MachineState::Running,
        "RUNNING" | "CREATED" | "" => MachineState::Pending,
        other => {
            tracing::debug!(pod = %id, status = other, "runpod: unknown desiredStatus; treated as pending");
            MachineState::Pending
        }
    };
    Ok(Machine { id, name, state, ssh, private_ip: None })
}

impl Cloud for RunPodCloud {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cluster_by_default(&self) -> bool {
        false
    }

    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ProviderError>> {
        Box::pin(async move {
            let data = self
                .graphql(
                    "listing GPU types",
                    GPU_TYPES,
                    json!({ "secureCloud": self.config.cloud_type == CloudType::Secure }),
                    Idempotent::Yes,
                )
                .await?;
            self.parse_offers(&data)
        })
    }

    fn offer_cache_key(&self) -> String {
        let cloud = if self.config.cloud_type == CloudType::Secure { "secure" } else { "community" };
        format!("runpod-{cloud}-{}-x{}", self.config.data_center_ids.join("+"), self.config.bid_multiplier)
    }

    fn offer_ttl(&self) -> Duration {
        Duration::from_secs(600)
    }

    fn prepare<'a>(&'a self, _pool: &'a PoolContext, _key: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        // No per-pool resources: the key travels with each pod.
        Box::pin(async { Ok(()) })
    }

    fn provision<'a>(&'a self, pool: &'a PoolContext, request: &'a MachineRequest) -> BoxFuture<'a, Result<Machine, ProviderError>> {
        Box::pin(async move {
            let placement = pool.placement.as_ref().ok_or_else(|| invalid("no offer was chosen for this pool".into()))?;
            let gpu = placement
                .offer
                .specific
                .get("gpuTypeId")
                .and_then(Value::as_str)
                .unwrap_or(&placement.offer.instance_type.name)
                .to_string();
            let count = placement.offer.specific.get("gpuCount").and_then(Value::as_u64).unwrap_or(1);
            let bid = placement.spot.then(|| {
                let min = placement.offer.specific.get("minimumBidPrice").and_then(http::as_f64);
                min.unwrap_or(placement.node_price / count as f64) * self.config.bid_multiplier
            });
            let created = if self.config.global_networking {
                self.create_rest(pool, request, &gpu, count, placement.spot).await
            } else {
                self.create_graphql(pool, request, &gpu, count, bid).await
            };
            let id = match created {
                Ok(id) => id,
                // A create that failed on the server's side may still have made a pod: adopt it
                // rather than leak it (it carries our name).
                Err(e @ (ProviderError::Failed { .. } | ProviderError::RateLimited { .. })) => match self.find_by_name(&request.name).await
                {
                    Ok(Some(m)) => {
                        tracing::warn!(pod = %m.id, error = %e, "runpod: create reported an error but the pod exists; using it");
                        return Ok(m);
                    }
                    _ => return Err(e),
                },
                Err(e) => return Err(e),
            };
            Ok(Machine { id, name: request.name.clone(), state: MachineState::Pending, ssh: None, private_ip: None })
        })
    }

    fn get_instance<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Machine>, ProviderError>> {
        Box::pin(async move {
            match self.rest.call("reading a pod", Method::GET, &format!("/pods/{}", urlencode(id)), None, Idempotent::Yes).await? {
                Reply::NotFound => Ok(None),
                Reply::Ok(pod) => pod_machine(&pod).map(Some),
            }
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            self.rest.call("deleting a pod", Method::DELETE, &format!("/pods/{}", urlencode(id)), None, Idempotent::Yes).await?;
            Ok(())
        })
    }

    fn list_tagged<'a>(&'a self, pool_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Machine>, ProviderError>> {
        Box::pin(async move {
            let pods = self.list_pods("/pods").await?;
            Ok(pods.into_iter().filter(|m| m.tags().is_some_and(|(p, _)| pool_id.is_none_or(|want| want == p))).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_and_quota_messages() {
        assert_eq!(
            classify_message(
                "There are no longer any instances available with the requested specifications. Please refresh and try again."
            ),
            Some(ErrorClass::Capacity)
        );
        assert_eq!(classify_message("Your balance is too low"), Some(ErrorClass::Quota));
        assert_eq!(classify_message("Something went wrong"), None);
    }

    #[test]
    fn pods_map_to_machines() {
        let running = json!({"id": "p1", "name": "skyward-sky-1-r0-g0", "desiredStatus": "RUNNING", "publicIp": "203.0.113.5", "portMappings": {"22": 10341}});
        let m = pod_machine(&running).unwrap();
        assert_eq!(m.state, MachineState::Running);
        assert_eq!(m.ssh, Some(SshEndpoint { host: "203.0.113.5".into(), port: 10341, user: "root".into() }));
        let starting = json!({"id": "p2", "desiredStatus": "RUNNING", "publicIp": ""});
        assert_eq!(pod_machine(&starting).unwrap().state, MachineState::Pending);
        assert_eq!(pod_machine(&json!({"id": "p3", "desiredStatus": "EXITED"})).unwrap().state, MachineState::Stopped);
        let e = pod_machine(&json!({"desiredStatus": "RUNNING"})).unwrap_err().to_string();
        assert!(e.contains("runpod") && e.contains("`id`"), "{e}");
    }

    #[test]
    fn bad_settings_name_the_field() {
        let bad = RunPod { api_key: Some(Secret::new("k".into())), ubuntu: "18.04".into(), ..Default::default() };
        assert!(bad.connect().unwrap_err().to_string().contains("ubuntu \"18.04\""));
        let bad = RunPod { api_key: Some(Secret::new("k".into())), ports: vec!["ssh".into()], ..Default::default() };
        assert!(bad.connect().unwrap_err().to_string().contains("hint"));
    }
}
