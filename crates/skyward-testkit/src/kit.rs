//! The generic provider kit: the cases every cloud provider plus its mock must pass, written
//! once against the `Cloud` trait and the `CloudUnderTest` description of the mock.
//!
//! Every case runs under a tracing subscriber that records everything down to TRACE, and fails
//! if the credential appears in any log line or error.

use crate::mock::{Fault, MockServer};
use futures::future::BoxFuture;
use skyward_provider::machines::{self, Cloud, MachineRequest, MachineState};
use skyward_provider::select::{self, Requirements};
use skyward_provider::{FailureKind, Offer, Placement, PoolContext, ProviderError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A cloud and its running mock.
pub trait CloudUnderTest: Send + Sync {
    /// Provider name.
    fn name(&self) -> &'static str;
    /// The mock server.
    fn server(&self) -> &MockServer;
    /// The credential the mock accepts.
    fn key(&self) -> &str;
    /// What must never be shown: the key itself, or the secret that goes with it (AWS: the
    /// secret access key; the access key id is an identifier).
    fn secret(&self) -> &str {
        self.key()
    }
    /// A fresh client with `key`.
    fn cloud(&self, key: &str) -> Result<Box<dyn Cloud>, ProviderError>;
    /// The body of a no-capacity answer to a create, and its status.
    fn capacity(&self) -> Fault;
    /// A quota or balance answer to a create.
    fn quota(&self) -> Fault;
    /// Names of machines the mock still runs.
    fn live(&self) -> BoxFuture<'_, Vec<String>>;
    /// Create a machine named `name` behind the client's back; its id.
    fn plant<'a>(&'a self, name: &'a str) -> BoxFuture<'a, String>;
    /// Stop or end machine `id` behind the client's back (preemption).
    fn preempt<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;
    /// A 200 list answer whose entries lack their ids.
    fn list_without_ids(&self) -> String;
    /// A 400 error body in the API's shape carrying `message`.
    fn error_body(&self, message: &str) -> String {
        format!("{{\"error\": \"{message}\"}}")
    }
    /// Per-pool resources left on the account (keys, groups), for the teardown check.
    fn pool_resources(&self) -> BoxFuture<'_, usize> {
        Box::pin(async { 0 })
    }
}

/// The cases, by name.
pub const CASES: &[&str] = &[
    "offers_normalised",
    "lifecycle",
    "teardown_removes_everything",
    "list_tagged_finds_leak",
    "capacity_is_typed",
    "quota_is_typed",
    "bad_key_is_auth",
    "throttle_honours_retry_after",
    "throttle_forever_is_typed",
    "server_error_retried_for_reads",
    "create_error_that_left_a_machine",
    "preempted_before_running",
    "malformed_response_names_field",
    "secret_never_shown",
];

/// Run case `name` against `t`.
pub async fn run(name: &str, t: &dyn CloudUnderTest) -> Result<(), String> {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(capture.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let result = case(name, t).await;
    let logs = capture.text();
    if logs.contains(t.secret()) {
        return Err(format!("{}: the credential appears in the logs of case {name}", t.name()));
    }
    if let Err(e) = &result
        && e.contains(t.secret())
    {
        return Err(format!("{}: the credential appears in an error of case {name}", t.name()));
    }
    result
}

async fn case(name: &str, t: &dyn CloudUnderTest) -> Result<(), String> {
    match name {
        "offers_normalised" => offers_normalised(t).await,
        "lifecycle" => lifecycle(t).await,
        "teardown_removes_everything" => teardown_removes_everything(t).await,
        "list_tagged_finds_leak" => list_tagged_finds_leak(t).await,
        "capacity_is_typed" => create_fault(t, t.capacity(), FailureKind::Capacity).await,
        "quota_is_typed" => create_fault(t, t.quota(), FailureKind::Quota).await,
        "bad_key_is_auth" => bad_key_is_auth(t).await,
        "throttle_honours_retry_after" => throttle_honours_retry_after(t).await,
        "throttle_forever_is_typed" => throttle_forever_is_typed(t).await,
        "server_error_retried_for_reads" => server_error_retried_for_reads(t).await,
        "create_error_that_left_a_machine" => create_error_that_left_a_machine(t).await,
        "preempted_before_running" => preempted_before_running(t).await,
        "malformed_response_names_field" => malformed_response_names_field(t).await,
        "secret_never_shown" => secret_never_shown(t).await,
        other => Err(format!("no kit case {other}")),
    }
}

/// Log lines, kept for the credential check.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture")).into_owned()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

static POOLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A pool context with the cheapest accelerator offer of the catalog as its placement.
async fn pool_with_offer(cloud: &dyn Cloud) -> Result<PoolContext, String> {
    let offers = cloud.offers().await.map_err(err("offers"))?;
    let with_gpu: Vec<Offer> = offers.into_iter().filter(|o| o.instance_type.accelerator.is_some()).collect();
    let picked = cheapest(cloud, &with_gpu, 1)?;
    let c = &picked[0];
    let n = POOLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pool_id = format!("sky-kit{:03}{}", n, std::process::id() % 1000);
    Ok(PoolContext {
        pool_id: pool_id.clone(),
        state_dir: std::env::temp_dir().join(format!("skyward-kit-{pool_id}")),
        image: None,
        placement: Some(placement_of(c)),
    })
}

/// A candidate as the pool's placement, bought exactly as ranked (spot or on-demand: no
/// provider-side fallback in the kit's cases).
fn placement_of(c: &select::Candidate) -> Placement {
    let allocation = if c.spot { skyward_provider::Allocation::Spot } else { skyward_provider::Allocation::OnDemand };
    Placement { offer: c.offer.clone(), spot: c.spot, allocation, node_price: c.node_price, max_hourly_cost: None, disk_gb: None }
}

/// The `n` cheapest candidates for one node among `offers`.
fn cheapest(cloud: &dyn Cloud, offers: &[Offer], n: usize) -> Result<Vec<select::Candidate>, String> {
    let req = Requirements { nodes: 1, ..Default::default() };
    select::select(&[(&req, cloud.name(), offers)], select::Selection::Cheapest, n).map_err(err("select"))
}

fn request(pool: &PoolContext, rank: u32) -> MachineRequest {
    let node_id = format!("{}-r{rank}-g0", pool.pool_id);
    MachineRequest {
        name: machines::machine_name(&node_id),
        node_id,
        ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA5QqKjCf1alAWrRjanDvfz75BbEj7eb56Eok7m/Px59 skyward-kit".into(),
        instance_timeout_secs: 300,
    }
}

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA5QqKjCf1alAWrRjanDvfz75BbEj7eb56Eok7m/Px59 skyward-kit";

async fn offers_normalised(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    let offers = cloud.offers().await.map_err(err("offers"))?;
    ensure(!offers.is_empty(), || "no offers".into())?;
    let mut ids = std::collections::HashSet::new();
    for o in &offers {
        ensure(o.provider == t.name(), || format!("offer {} names provider {}", o.id, o.provider))?;
        ensure(ids.insert(o.id.clone()), || format!("offer id {} repeats", o.id))?;
        let a = o.instance_type.accelerator.as_ref().ok_or_else(|| format!("offer {} has no accelerator", o.id))?;
        let known = skyward_provider::catalog::variants(&a.name);
        ensure(known.iter().any(|s| s.name == a.name && s.memory_gb == a.memory_gb), || {
            format!("offer {}: {} {} GB is not a catalog entry", o.id, a.name, a.memory_gb)
        })?;
        ensure(a.count > 0.0, || format!("offer {}: count {}", o.id, a.count))?;
        ensure(o.spot_price.is_some() || o.on_demand_price.is_some(), || format!("offer {} has no price", o.id))?;
        for p in [o.spot_price, o.on_demand_price].into_iter().flatten() {
            ensure(p.is_finite() && p > 0.0, || format!("offer {}: price {p}", o.id))?;
        }
    }
    // Names the catalog does not know are skipped, not guessed.
    ensure(!offers.iter().any(|o| o.instance_type.name.to_lowercase().contains("mystery")), || "an unknown GPU became an offer".into())?;
    ensure(t.server().count("offers") == 1, || format!("offers took {} calls, expected 1", t.server().count("offers")))
}

async fn lifecycle(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    let pool = pool_with_offer(&*cloud).await?;
    cloud.prepare(&pool, KEY).await.map_err(err("prepare"))?;
    let req = request(&pool, 0);
    let m = cloud.provision(&pool, &req).await.map_err(err("provision"))?;
    ensure(m.name == req.name, || format!("machine named {:?}, asked {:?}", m.name, req.name))?;
    let running = machines::wait_running(&*cloud, &m.id, Duration::from_secs(20)).await.map_err(err("wait_running"))?;
    let ssh = running.ssh.clone().ok_or("running without an SSH endpoint")?;
    ensure(!ssh.host.is_empty() && ssh.port > 0, || format!("bad SSH endpoint {ssh:?}"))?;
    ensure(running.tags() == Some((pool.pool_id.clone(), req.node_id.clone())), || format!("tags {:?}", running.tags()))?;
    machines::terminate(&*cloud, &m.id, Duration::from_secs(20)).await.map_err(err("terminate"))?;
    let after = cloud.get_instance(&m.id).await.map_err(err("get after terminate"))?;
    ensure(after.is_none_or(|m| m.state == MachineState::Gone), || "still there after a confirmed terminate".into())?;
    ensure(!t.live().await.contains(&req.name), || "the mock still runs it".into())?;
    // A second delete of the same machine is not an error.
    cloud.delete(&m.id).await.map_err(err("second delete"))?;
    machines::teardown(&*cloud, &pool, Duration::from_secs(20)).await.map_err(err("teardown"))
}

async fn teardown_removes_everything(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    let pool = pool_with_offer(&*cloud).await?;
    let before = t.pool_resources().await;
    cloud.prepare(&pool, KEY).await.map_err(err("prepare"))?;
    let mut ids = Vec::new();
    for rank in 0..2 {
        // Different asks on marketplaces: take the next cheapest for the second.
        let mut p = pool.clone();
        if rank == 1 {
            let offers = cloud.offers().await.map_err(err("offers"))?;
            let picked = cheapest(&*cloud, &offers, 2)?;
            let c = picked.last().ok_or("no second offer")?;
            p.placement = Some(placement_of(c));
        }
        ids.push(cloud.provision(&p, &request(&pool, rank)).await.map_err(err("provision"))?.id);
    }
    let other = t.plant(&machines::machine_name("sky-other00001-r0-g0")).await;
    machines::teardown(&*cloud, &pool, Duration::from_secs(20)).await.map_err(err("teardown"))?;
    let left = cloud.list_tagged(Some(&pool.pool_id)).await.map_err(err("list"))?;
    ensure(left.is_empty(), || format!("left after teardown: {left:?}"))?;
    ensure(t.live().await.iter().all(|n| !n.contains(&pool.pool_id)), || "the mock still runs a machine of the pool".into())?;
    ensure(t.live().await.iter().any(|n| n.contains("sky-other00001")), || "teardown removed another pool's machine".into())?;
    let after = t.pool_resources().await;
    ensure(after == before, || format!("{after} per-pool resources left (had {before})"))?;
    cloud.delete(&other).await.map_err(err("cleanup"))
}

async fn list_tagged_finds_leak(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    let leaked = t.plant(&machines::machine_name("sky-leak000001-r2-g1")).await;
    let foreign = t.plant("someone-elses-machine").await;
    let ours = cloud.list_tagged(Some("sky-leak000001")).await.map_err(err("list"))?;
    ensure(ours.len() == 1 && ours[0].id == leaked, || format!("list_tagged(pool) = {ours:?}"))?;
    let all = cloud.list_tagged(None).await.map_err(err("list all"))?;
    ensure(all.iter().any(|m| m.id == leaked) && !all.iter().any(|m| m.id == foreign), || format!("list_tagged(None) = {all:?}"))?;
    let none = cloud.list_tagged(Some("sky-leak0000")).await.map_err(err("list prefix"))?;
    ensure(none.is_empty(), || "a pool id prefix matched another pool".into())?;
    machines::terminate(&*cloud, &leaked, Duration::from_secs(20)).await.map_err(err("terminate"))?;
    cloud.delete(&foreign).await.map_err(err("delete"))
}

async fn create_fault(t: &dyn CloudUnderTest, fault: Fault, want: FailureKind) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    let pool = pool_with_offer(&*cloud).await?;
    cloud.prepare(&pool, KEY).await.map_err(err("prepare"))?;
    let before = t.server().count("create");
    t.server().inject("create", fault);
    let e = match cloud.provision(&pool, &request(&pool, 0)).await {
        Ok(m) => return Err(format!("provision succeeded: {m:?}")),
        Err(e) => e,
    };
    ensure(FailureKind::of(&e) == want, || format!("expected {want}, got {:?}: {e}", FailureKind::of(&e)))?;
    ensure(want.falls_back(), || "must fall back".into())?;
    ensure(e.to_string().contains(t.name()), || format!("error does not name the provider: {e}"))?;
    ensure(t.server().count("create") == before + 1, || "a refused create was repeated".into())?;
    machines::teardown(&*cloud, &pool, Duration::from_secs(20)).await.map_err(err("teardown"))
}

async fn bad_key_is_auth(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud("wrong-key-000").map_err(err("client"))?;
    let e = cloud.offers().await.err().ok_or("offers with a wrong key succeeded")?;
    ensure(FailureKind::of(&e) == FailureKind::Auth, || format!("expected auth, got {e}"))?;
    ensure(e.to_string().contains("hint:"), || format!("no hint: {e}"))?;
    ensure(!e.to_string().contains("wrong-key-000"), || format!("the key is in the error: {e}"))?;
    ensure(t.server().log().iter().filter(|l| l.status == 401).count() == 1, || "a refused credential was retried".into())?;
    let e = t.cloud("").err().ok_or("an empty key was accepted")?;
    ensure(FailureKind::of(&e) == FailureKind::Auth && e.to_string().contains("hint:"), || format!("empty key: {e}"))?;
    let e = t.cloud("abc\ndef").err().ok_or("a key with a newline was accepted")?;
    ensure(e.to_string().contains("malformed") && !e.to_string().contains("abc"), || format!("malformed key: {e}"))
}

async fn throttle_honours_retry_after(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    t.server().inject("offers", Fault::Respond { status: 429, body: "API requests too frequent".into(), retry_after: Some("1".into()) });
    let started = Instant::now();
    cloud.offers().await.map_err(err("offers after a 429"))?;
    let waited = started.elapsed();
    ensure(waited >= Duration::from_millis(950), || format!("retried after {waited:?}, Retry-After said 1 s"))?;
    ensure(t.server().count("offers") == 2, || format!("{} offer calls", t.server().count("offers")))
}

async fn throttle_forever_is_typed(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    for _ in 0..10 {
        t.server()
            .inject("offers", Fault::Respond { status: 429, body: "API requests too frequent".into(), retry_after: Some("0".into()) });
    }
    let e = cloud.offers().await.err().ok_or("offers succeeded under constant throttling")?;
    ensure(matches!(e, ProviderError::RateLimited { .. }), || format!("expected RateLimited, got {e}"))?;
    ensure(FailureKind::of(&e).falls_back(), || "rate limiting must fall back".into())?;
    let calls = t.server().count("offers");
    ensure((2..=10).contains(&calls), || format!("{calls} calls: retries must be bounded"))
}

async fn server_error_retried_for_reads(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    t.server().inject("list", Fault::Respond { status: 503, body: "upstream unavailable".into(), retry_after: None });
    t.server().inject("list", Fault::Respond { status: 500, body: "oops".into(), retry_after: None });
    cloud.list_tagged(None).await.map_err(err("list after two 5xx"))?;
    ensure(t.server().count("list") == 3, || format!("{} list calls", t.server().count("list")))
}

async fn create_error_that_left_a_machine(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    let pool = pool_with_offer(&*cloud).await?;
    cloud.prepare(&pool, KEY).await.map_err(err("prepare"))?;
    t.server().inject("create", Fault::AfterEffect { status: 502, body: "bad gateway".into() });
    let req = request(&pool, 0);
    let m = cloud.provision(&pool, &req).await.map_err(err("provision after a 502 that created the machine"))?;
    ensure(m.name == req.name, || format!("adopted {m:?}"))?;
    let named: Vec<String> = t.live().await.into_iter().filter(|n| n == &req.name).collect();
    ensure(named.len() == 1, || format!("{} machines named {}", named.len(), req.name))?;
    machines::teardown(&*cloud, &pool, Duration::from_secs(20)).await.map_err(err("teardown"))?;
    ensure(!t.live().await.contains(&req.name), || "leaked".into())
}

async fn preempted_before_running(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    let pool = pool_with_offer(&*cloud).await?;
    cloud.prepare(&pool, KEY).await.map_err(err("prepare"))?;
    let m = cloud.provision(&pool, &request(&pool, 0)).await.map_err(err("provision"))?;
    t.preempt(&m.id).await;
    let e = machines::wait_running(&*cloud, &m.id, Duration::from_secs(10)).await.err().ok_or("a preempted machine ran")?;
    ensure(FailureKind::of(&e) == FailureKind::Capacity, || format!("expected capacity, got {e}"))?;
    machines::teardown(&*cloud, &pool, Duration::from_secs(20)).await.map_err(err("teardown"))
}

async fn malformed_response_names_field(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    t.server().inject("list", Fault::Respond { status: 200, body: "{\"unexpected\": true".into(), retry_after: None });
    let e = cloud.list_tagged(None).await.err().ok_or("a truncated body was accepted")?;
    ensure(e.to_string().contains(t.name()) && e.to_string().contains("malformed"), || format!("{e}"))?;
    t.server().inject("list", Fault::Respond { status: 200, body: t.list_without_ids(), retry_after: None });
    let e = cloud.list_tagged(None).await.err().ok_or("a list without ids was accepted")?;
    ensure(e.to_string().contains(t.name()) && e.to_string().contains('`'), || format!("no field named: {e}"))
}

async fn secret_never_shown(t: &dyn CloudUnderTest) -> Result<(), String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    // A server that echoes the request (credential included) in its error body.
    let echo = t.error_body(&format!("bad request from Bearer {}", t.key()));
    t.server().inject("list", Fault::Respond { status: 400, body: echo, retry_after: None });
    let e = cloud.list_tagged(None).await.err().ok_or("a 400 was accepted")?;
    let shown = format!("{e} {e:?}");
    ensure(!shown.contains(t.key()), || "the credential echoed by the server reached the error".into())?;
    ensure(shown.contains("<redacted>"), || format!("no redaction marker: {shown}"))?;
    ensure(!format!("{cloud:?}").contains(t.key()), || "Debug of the client shows the credential".into())
}

/// API calls one pool start and teardown of `nodes` machines makes, by operation: offers,
/// prepare, create and poll each machine until it runs (the mock runs a machine at its second
/// poll), then teardown (list, delete and confirm each, list again, per-pool cleanup).
pub async fn calls_per_start(t: &dyn CloudUnderTest, nodes: u32) -> Result<std::collections::BTreeMap<String, usize>, String> {
    let cloud = t.cloud(t.key()).map_err(err("client"))?;
    t.server().clear_log();
    let mut pool = pool_with_offer(&*cloud).await?;
    cloud.prepare(&pool, KEY).await.map_err(err("prepare"))?;
    let offers = cloud.offers().await.map_err(err("offers"))?;
    let picked = cheapest(&*cloud, &offers, nodes as usize)?;
    for rank in 0..nodes {
        // Marketplace asks are single machines: one candidate per node.
        let c = &picked[rank as usize % picked.len()];
        pool.placement = Some(placement_of(c));
        let m = cloud.provision(&pool, &request(&pool, rank)).await.map_err(err("provision"))?;
        machines::wait_running(&*cloud, &m.id, Duration::from_secs(20)).await.map_err(err("wait_running"))?;
    }
    machines::teardown(&*cloud, &pool, Duration::from_secs(20)).await.map_err(err("teardown"))?;
    let mut calls = std::collections::BTreeMap::new();
    for l in t.server().log() {
        *calls.entry(l.op).or_insert(0) += 1;
    }
    Ok(calls)
}
