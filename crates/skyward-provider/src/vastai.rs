//! VastAI: a GPU marketplace of Docker hosts. Offers come from one search (`POST
//! /api/v0/bundles/`) filtered by reliability, verification, CUDA and geolocation; a machine is
//! an accepted ask (`PUT /api/v0/asks/{id}/`), spot when it carries a bid. Instances share no
//! private network: standalone mode by default.
//!
//! The pool's SSH key is registered on the account in `prepare` (VastAI adds account keys to new
//! instances) and removed in `cleanup` when this pool added it.

use crate::http::{self, Api, Auth, ErrorClass, ErrorResponse, Idempotent, Reply};
use crate::machines::{Cloud, CloudProvider, Machine, MachineRequest, MachineSettings, MachineState, SshEndpoint, dead_man_switch};
use crate::offers::{Architecture, Billing, InstanceType, Offer, OfferAccelerator};
use crate::{PoolContext, ProviderError, Secret};
use futures::future::BoxFuture;
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const NAME: &str = "vastai";

/// VastAI settings (the seed's parameters).
#[derive(Debug, Clone)]
pub struct VastAi {
    /// API key; `VAST_API_KEY` when `None`.
    pub api_key: Option<Secret<String>>,
    /// Lowest host reliability accepted (0..1).
    pub min_reliability: f64,
    /// Only verified hosts.
    pub verified_only: bool,
    /// Lowest CUDA version the host driver must support.
    pub min_cuda: f64,
    /// Country or region code (`US`, `DE`, ...).
    pub geolocation: Option<String>,
    /// Multiplier on the minimum bid for spot machines.
    pub bid_multiplier: f64,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// Coordinator silence after which a machine ends itself (armed at boot, before the worker).
    pub instance_timeout: Duration,
    /// Image; a CUDA runtime image when `None`.
    pub docker_image: Option<String>,
    /// Disk per machine, GB.
    pub disk_gb: u32,
    /// Overlay networks between machines of one physical cluster (cluster mode only).
    pub use_overlay: bool,
    /// Timeout of overlay operations.
    pub overlay_timeout: Duration,
    /// Only hosts with direct (not proxied) ports; SSH then goes straight to the host.
    pub require_direct_port: bool,
    /// API base (tests point it at a mock).
    pub endpoint: String,
}

impl Default for VastAi {
    fn default() -> Self {
        Self {
            api_key: None,
            min_reliability: 0.95,
            verified_only: true,
            min_cuda: 12.0,
            geolocation: None,
            bid_multiplier: 1.2,
            request_timeout: Duration::from_secs(30),
            instance_timeout: Duration::from_secs(300),
            docker_image: None,
            disk_gb: 100,
            use_overlay: true,
            overlay_timeout: Duration::from_secs(120),
            require_direct_port: false,
            endpoint: "https://console.vast.ai".into(),
        }
    }
}

/// A VastAI API client for one configuration.
#[derive(Debug)]
pub struct VastAiCloud {
    config: VastAi,
    api: Api,
    image: String,
    /// Account key ids this value registered, per pool (removed by `cleanup`).
    registered: Mutex<HashMap<String, u64>>,
}

fn classify(e: &ErrorResponse) -> Option<ErrorClass> {
    if e.status >= 500 {
        // Server trouble, whatever the body says: retried or reported as an API error.
        return None;
    }
    let t = e.body.to_ascii_lowercase();
    if t.contains("no_such_ask") || t.contains("is not available") {
        Some(ErrorClass::Capacity)
    } else if t.contains("insufficient credit") || t.contains("balance") || t.contains("insufficient_credit") {
        Some(ErrorClass::Quota)
    } else {
        None
    }
}

fn invalid(message: String) -> ProviderError {
    ProviderError::Invalid { provider: NAME, message }
}

impl VastAi {
    /// The provider: this API client plus SSH bootstrap of each instance.
    pub fn provider(self) -> Result<CloudProvider, ProviderError> {
        let settings = MachineSettings { instance_timeout: self.instance_timeout, ..MachineSettings::default() };
        Ok(CloudProvider::new(self.connect()?, settings))
    }

    /// Check the settings and build the client.
    pub fn connect(self) -> Result<VastAiCloud, ProviderError> {
        let key = http::credential(NAME, self.api_key.as_ref(), "VAST_API_KEY")?;
        if !(0.0..=1.0).contains(&self.min_reliability) {
            return Err(invalid(format!("min_reliability must be within 0..1, got {}", self.min_reliability)));
        }
        if !(self.bid_multiplier.is_finite() && self.bid_multiplier > 0.0) {
            return Err(invalid(format!("bid_multiplier must be positive, got {}", self.bid_multiplier)));
        }
        if let Some(g) = &self.geolocation
            && (g.len() < 2 || !g.chars().all(|c| c.is_ascii_alphabetic()))
        {
            return Err(invalid(format!("geolocation {g:?} is not a country or region code (hint: \"US\", \"DE\", \"EU\")")));
        }
        let api = Api::new(
            NAME,
            format!("{}/api/v0", self.endpoint.trim_end_matches('/')),
            Auth::Bearer(key),
            "VAST_API_KEY",
            self.request_timeout,
            classify,
        )?;
        let image = self.docker_image.clone().unwrap_or_else(|| "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04".into());
        Ok(VastAiCloud { config: self, api, image, registered: Mutex::new(HashMap::new()) })
    }
}

impl VastAiCloud {
    fn search_body(&self) -> Value {
        let mut q = json!({
            "rentable": {"eq": true},
            "rented": {"eq": false},
            "external": {"eq": false},
            "num_gpus": {"gte": 1},
            "reliability": {"gt": self.config.min_reliability},
            "cuda_max_good": {"gte": self.config.min_cuda},
            "type": "on-demand",
            "order": [["dph_total", "asc"]],
            "limit": 5000,
            "allocated_storage": self.config.disk_gb,
        });
        if self.config.verified_only {
            q["verified"] = json!({"eq": true});
        }
        if self.config.require_direct_port {
            q["direct_port_count"] = json!({"gte": 1});
        }
        if let Some(g) = &self.config.geolocation {
            q["geolocation"] = json!({"eq": g});
        }
        q
    }

    fn parse_offer(&self, o: &Value) -> Result<Option<Offer>, ProviderError> {
        let id = http::num_field(NAME, "offer", o, "id")? as u64;
        let gpu = http::str_field(NAME, "offer", o, "gpu_name")?;
        let count = http::num_field(NAME, "offer", o, "num_gpus")?;
        // The server does not filter CUDA reliably: check here.
        let cuda = o.get("cuda_max_good").and_then(http::as_f64).unwrap_or(0.0);
        let reliability = o.get("reliability").and_then(http::as_f64).unwrap_or(0.0);
        if cuda < self.config.min_cuda || reliability < self.config.min_reliability {
            return Ok(None);
        }
        if self.config.verified_only && o.get("verified").and_then(Value::as_bool) == Some(false) {
            return Ok(None);
        }
        let vram = o.get("gpu_ram").and_then(http::as_f64).map(|mb| mb / 1024.0);
        let Some(acc) = OfferAccelerator::from_provider(gpu, vram, count) else {
            tracing::debug!(gpu, "vastai: GPU not in the catalog; skipped");
            return Ok(None);
        };
        let od = http::num_field(NAME, "offer", o, "dph_total")?;
        let min_bid = o.get("min_bid").and_then(http::as_f64).filter(|p| *p > 0.0);
        Ok(Some(Offer {
            id: id.to_string(),
            provider: NAME.into(),
            region: o.get("geolocation").and_then(Value::as_str).unwrap_or_default().to_string(),
            instance_type: InstanceType {
                name: gpu.to_string(),
                accelerator: Some(acc),
                vcpus: o.get("cpu_cores_effective").or(o.get("cpu_cores")).and_then(http::as_f64).unwrap_or(0.0),
                memory_gb: o.get("cpu_ram").and_then(http::as_f64).map(|mb| mb / 1024.0).unwrap_or(0.0),
                architecture: Architecture::X86_64,
            },
            spot_price: min_bid.map(|b| b * self.config.bid_multiplier),
            on_demand_price: Some(od),
            billing: Billing::Minute,
            specific: json!({ "ask": id, "min_bid": min_bid, "cuda_max_good": cuda, "reliability": reliability }),
        }))
    }

    async fn list(&self) -> Result<Vec<Machine>, ProviderError> {
        let v = self.api.json("listing instances", Method::GET, "/instances/?owner=me", None, Idempotent::Yes).await?;
        let list = http::field(NAME, "instance list", &v, "instances")?
            .as_array()
            .ok_or_else(|| http::malformed(NAME, "instance list", "instances", "not a list"))?;
        list.iter().map(instance_machine).collect()
    }
}

fn instance_machine(i: &Value) -> Result<Machine, ProviderError> {
    let id = http::num_field(NAME, "instance", i, "id")? as u64;
    let name = i.get("label").and_then(Value::as_str).unwrap_or_default().to_string();
    let status = i.get("actual_status").and_then(Value::as_str).unwrap_or("");
    let direct = i.pointer("/ports/22~1tcp/0/HostPort").and_then(http::as_f64);
    let public = i.get("public_ipaddr").and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty());
    let ssh = match (public, direct) {
        (Some(host), Some(port)) => {
            u16::try_from(port as u64).ok().map(|port| SshEndpoint { host: host.to_string(), port, user: "root".into() })
        }
        _ => {
            let host = i.get("ssh_host").and_then(Value::as_str).filter(|s| !s.is_empty());
            let port = i.get("ssh_port").and_then(http::as_f64).and_then(|p| u16::try_from(p as u64).ok());
            host.zip(port).map(|(h, p)| SshEndpoint { host: h.to_string(), port: p, user: "root".into() })
        }
    };
    let state = match status {
        "running" if ssh.is_some() => MachineState::Running,
        "exited" | "unknown" | "offline" | "destroyed" | "error" => MachineState::Gone,
        "stopped" | "frozen" => MachineState::Stopped,
        _ => MachineState::Pending,
    };
    Ok(Machine { id: id.to_string(), name, state, ssh, private_ip: None })
}

impl Cloud for VastAiCloud {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cluster_by_default(&self) -> bool {
        false
    }

    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ProviderError>> {
        Box::pin(async move {
            let v = self.api.json("searching offers", Method::POST, "/bundles/", Some(&self.search_body()), Idempotent::Yes).await?;
            let list = http::field(NAME, "offer search", &v, "offers")?
                .as_array()
                .ok_or_else(|| http::malformed(NAME, "offer search", "offers", "not a list"))?;
            let mut offers = Vec::with_capacity(list.len());
            for o in list {
                if let Some(offer) = self.parse_offer(o)? {
                    offers.push(offer);
                }
            }
            Ok(offers)
        })
    }

    fn offer_cache_key(&self) -> String {
        let c = &self.config;
        format!(
            "vastai-r{}-v{}-c{}-g{}-d{}-x{}",
            c.min_reliability,
            c.verified_only,
            c.min_cuda,
            c.geolocation.as_deref().unwrap_or("any"),
            c.require_direct_port,
            c.bid_multiplier
        )
    }

    fn offer_ttl(&self) -> Duration {
        // A marketplace: asks come and go within minutes.
        Duration::from_secs(300)
    }

    fn prepare<'a>(&'a self, pool: &'a PoolContext, key: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let listed = self.api.json("listing SSH keys", Method::GET, "/ssh/", None, Idempotent::Yes).await?;
            let keys = listed.as_array().or_else(|| listed.get("keys").and_then(Value::as_array)).cloned().unwrap_or_default();
            let wanted = key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            let known = keys.iter().any(|k| {
                k.get("public_key")
                    .or(k.get("ssh_key"))
                    .and_then(Value::as_str)
                    .is_some_and(|p| p.split_whitespace().take(2).collect::<Vec<_>>().join(" ") == wanted)
            });
            if known {
                return Ok(());
            }
            let made =
                self.api.json("registering the SSH key", Method::POST, "/ssh/", Some(&json!({ "ssh_key": key })), Idempotent::No).await?;
            let id = made.pointer("/key/id").or(made.get("id")).or(made.get("ssh_key_id")).and_then(http::as_f64);
            if let Some(id) = id {
                self.registered.lock().expect("vastai keys").insert(pool.pool_id.clone(), id as u64);
            }
            Ok(())
        })
    }

    fn provision<'a>(&'a self, pool: &'a PoolContext, request: &'a MachineRequest) -> BoxFuture<'a, Result<Machine, ProviderError>> {
        Box::pin(async move {
            let placement = pool.placement.as_ref().ok_or_else(|| invalid("no offer was chosen for this pool".into()))?;
            let ask = placement
                .offer
                .specific
                .get("ask")
                .and_then(http::as_f64)
                .map(|a| a as u64)
                .unwrap_or_else(|| placement.offer.id.parse().unwrap_or(0));
            if ask == 0 {
                return Err(invalid(format!("offer {} carries no ask id", placement.offer.id)));
            }
            let mut body = json!({
                "client_id": "me",
                "image": self.image,
                "disk": placement.disk_gb.unwrap_or(self.config.disk_gb),
                "label": request.name,
                "onstart": format!("#!/bin/bash\n{}\n", dead_man_switch(request.instance_timeout_secs)),
                "runtype": if self.config.require_direct_port { "ssh_direct" } else { "ssh" },
                "env": {},
                "target_state": "running",
                "cancel_unavail": true,
            });
            if placement.spot {
                let min_bid = placement.offer.specific.get("min_bid").and_then(http::as_f64);
                let bid = min_bid.map(|b| b * self.config.bid_multiplier).unwrap_or(placement.node_price);
                if let Some(cap) = placement.max_hourly_cost
                    && bid > cap
                {
                    return Err(ProviderError::PriceCap {
                        provider: NAME,
                        message: format!("bid ${bid:.3}/h for ask {ask} is above ${cap:.2}/h"),
                    });
                }
                body["price"] = json!((bid * 1000.0).round() / 1000.0);
            }
            let created = self.api.json("accepting an ask", Method::PUT, &format!("/asks/{ask}/"), Some(&body), Idempotent::No).await;
            let v = match created {
                Ok(v) => v,
                Err(e @ (ProviderError::Failed { .. } | ProviderError::RateLimited { .. })) => {
                    // The server may have made it anyway: adopt it by label rather than leak it.
                    if let Ok(list) = self.list().await
                        && let Some(m) = list.into_iter().find(|m| m.name == request.name)
                    {
                        tracing::warn!(instance = %m.id, error = %e, "vastai: create reported an error but the instance exists; using it");
                        return Ok(m);
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if v.get("success").and_then(Value::as_bool) == Some(false) {
                let msg = v.get("msg").or(v.get("error")).and_then(Value::as_str).unwrap_or("create refused").to_string();
                let error = ErrorResponse { status: 200, body: self.api.scrub(&msg) };
                return Err(match classify(&error) {
                    Some(class) => self.api.classified(class, "accepting an ask", &error),
                    None => ProviderError::Failed { provider: NAME, operation: "accepting an ask", message: error.body },
                });
            }
            let id = http::num_field(NAME, "create response", &v, "new_contract")? as u64;
            Ok(Machine { id: id.to_string(), name: request.name.clone(), state: MachineState::Pending, ssh: None, private_ip: None })
        })
    }

    fn get_instance<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Machine>, ProviderError>> {
        Box::pin(async move {
            let id: u64 = id.parse().map_err(|_| invalid(format!("instance id {id:?} is not a number")))?;
            match self.api.call("reading an instance", Method::GET, &format!("/instances/{id}/?owner=me"), None, Idempotent::Yes).await? {
                Reply::NotFound => Ok(None),
                Reply::Ok(v) => match v.get("instances") {
                    None | Some(Value::Null) => Ok(None),
                    Some(i) => instance_machine(i).map(Some),
                },
            }
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let id: u64 = id.parse().map_err(|_| invalid(format!("instance id {id:?} is not a number")))?;
            self.api
                .call("destroying an instance", Method::DELETE, &format!("/instances/{id}/"), Some(&json!({})), Idempotent::Yes)
                .await?;
            Ok(())
        })
    }

    fn list_tagged<'a>(&'a self, pool_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Machine>, ProviderError>> {
        Box::pin(async move {
            Ok(self.list().await?.into_iter().filter(|m| m.tags().is_some_and(|(p, _)| pool_id.is_none_or(|w| w == p))).collect())
        })
    }

    fn cleanup<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let id = self.registered.lock().expect("vastai keys").remove(&pool.pool_id);
            if let Some(id) = id {
                self.api.call("removing the SSH key", Method::DELETE, &format!("/ssh/{id}/"), None, Idempotent::Yes).await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_endpoint_direct_then_proxy() {
        let direct = json!({"id": 7, "label": "x", "actual_status": "running", "public_ipaddr": "203.0.113.7",
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41022"}]}, "ssh_host": "ssh4.vast.ai", "ssh_port": 31234});
        let m = instance_machine(&direct).unwrap();
        assert_eq!(m.ssh.unwrap(), SshEndpoint { host: "203.0.113.7".into(), port: 41022, user: "root".into() });
        assert_eq!(m.state, MachineState::Running);
        let proxy = json!({"id": 8, "actual_status": "running", "ssh_host": "ssh4.vast.ai", "ssh_port": 31234});
        assert_eq!(instance_machine(&proxy).unwrap().ssh.unwrap().port, 31234);
        assert_eq!(instance_machine(&json!({"id": 9, "actual_status": null})).unwrap().state, MachineState::Pending);
        assert_eq!(instance_machine(&json!({"id": 9, "actual_status": "stopped"})).unwrap().state, MachineState::Stopped);
        assert_eq!(instance_machine(&json!({"id": 9, "actual_status": "exited"})).unwrap().state, MachineState::Gone);
    }

    #[test]
    fn bad_settings_name_the_field() {
        let k = Some(Secret::new("k".into()));
        let e = VastAi { api_key: k.clone(), min_reliability: 1.5, ..Default::default() }.connect().unwrap_err().to_string();
        assert!(e.contains("vastai") && e.contains("min_reliability"), "{e}");
        let e = VastAi { api_key: k, geolocation: Some("U S".into()), ..Default::default() }.connect().unwrap_err().to_string();
        assert!(e.contains("geolocation") && e.contains("hint"), "{e}");
    }
}
