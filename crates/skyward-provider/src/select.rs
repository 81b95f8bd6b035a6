//! Specs and offer selection: which offers satisfy a spec, in which order they are tried, and
//! the record of every attempt when a start falls back from one offer (or provider) to the next.
//!
//! Selection is pure (offers in, ranked candidates out) so it is tested and benchmarked without
//! any provider. Requirements are minimums (vcpus, memory); the accelerator count is exact; a
//! memory variant, when asked, must match within 10%.

use crate::catalog::Accelerator;
use crate::offers::{Architecture, Offer, fmt_count};
use crate::{Provider, ProviderError};
use std::fmt;
use std::sync::Arc;

/// Which price a spec is willing to pay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Allocation {
    /// Spot (interruptible) only.
    Spot,
    /// On-demand only.
    OnDemand,
    /// Spot where the offer has a spot price, else on-demand.
    #[default]
    SpotIfAvailable,
    /// Whichever of the two is cheaper.
    Cheapest,
}

impl Allocation {
    /// Parse `spot`, `on-demand`, `spot-if-available`, `cheapest`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "spot" => Ok(Self::Spot),
            "on-demand" | "ondemand" => Ok(Self::OnDemand),
            "spot-if-available" => Ok(Self::SpotIfAvailable),
            "cheapest" => Ok(Self::Cheapest),
            _ => Err(format!("unknown allocation {s:?} (hint: one of spot, on-demand, spot-if-available, cheapest)")),
        }
    }

    /// The price this allocation pays for `offer`, and whether it is spot; `None` when the offer
    /// is not sold that way.
    pub fn price(self, offer: &Offer) -> Option<(f64, bool)> {
        let spot = offer.spot_price.map(|p| (p, true));
        let od = offer.on_demand_price.map(|p| (p, false));
        match self {
            Self::Spot => spot,
            Self::OnDemand => od,
            Self::SpotIfAvailable => spot.or(od),
            Self::Cheapest => match (spot, od) {
                (Some(s), Some(o)) => Some(if s.0 <= o.0 { s } else { o }),
                (s, o) => s.or(o),
            },
        }
    }
}

/// How candidates from several specs are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Selection {
    /// Cheapest pool (price per node-hour x nodes) first, across all specs.
    #[default]
    Cheapest,
    /// Specs in the order given; within a spec, cheapest first.
    First,
}

/// What one spec requires of an offer (the provider-independent part of a `Spec`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Requirements {
    /// Accelerator model, memory variant and count per node; `None` accepts any offer.
    pub accelerator: Option<Accelerator>,
    /// Nodes.
    pub nodes: u32,
    /// Minimum vCPUs per node.
    pub vcpus: Option<f64>,
    /// Minimum memory per node, GB.
    pub memory_gb: Option<f64>,
    /// CPU architecture.
    pub architecture: Option<Architecture>,
    /// Region (exact, any case).
    pub region: Option<String>,
    /// Spot, on-demand, ...
    pub allocation: Allocation,
    /// Highest price per node-hour, USD.
    pub max_hourly_cost: Option<f64>,
}

/// One spec: a provider and what is wanted from it.
#[derive(Clone)]
pub struct Spec {
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// What the offers must satisfy.
    pub requirements: Requirements,
    /// Boot disk per node, GB; `None`: the provider's default (providers whose plan fixes the
    /// disk ignore it).
    pub disk_gb: Option<u32>,
}

impl fmt::Debug for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spec")
            .field("provider", &self.provider.name())
            .field("requirements", &self.requirements)
            .field("disk_gb", &self.disk_gb)
            .finish()
    }
}

impl Spec {
    /// One node from `provider`, any offer, spot if available.
    pub fn new(provider: impl Provider) -> Self {
        Self::shared(Arc::new(provider))
    }

    /// Like `new` for a provider already shared.
    pub fn shared(provider: Arc<dyn Provider>) -> Self {
        Self { provider, requirements: Requirements { nodes: 1, ..Default::default() }, disk_gb: None }
    }

    /// Accelerator model and count per node (`accelerators::h100().count(4)`).
    pub fn accelerator(mut self, accelerator: Accelerator) -> Self {
        self.requirements.accelerator = Some(accelerator);
        self
    }

    /// Nodes.
    pub fn nodes(mut self, nodes: u32) -> Self {
        self.requirements.nodes = nodes;
        self
    }

    /// Minimum vCPUs per node.
    pub fn vcpus(mut self, vcpus: f64) -> Self {
        self.requirements.vcpus = Some(vcpus);
        self
    }

    /// Minimum memory per node, GB.
    pub fn memory_gb(mut self, gb: f64) -> Self {
        self.requirements.memory_gb = Some(gb);
        self
    }

    /// Boot disk per node, GB (overrides the provider's default).
    pub fn disk_gb(mut self, gb: u32) -> Self {
        self.disk_gb = Some(gb);
        self
    }

    /// CPU architecture.
    pub fn architecture(mut self, arch: Architecture) -> Self {
        self.requirements.architecture = Some(arch);
        self
    }

    /// Region.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.requirements.region = Some(region.into());
        self
    }

    /// Spot, on-demand, spot-if-available (default) or cheapest.
    pub fn allocation(mut self, allocation: Allocation) -> Self {
        self.requirements.allocation = allocation;
        self
    }

    /// Highest price per node-hour, USD.
    pub fn max_hourly_cost(mut self, usd: f64) -> Self {
        self.requirements.max_hourly_cost = Some(usd);
        self
    }

    /// Check the spec before anything is fetched.
    pub fn validate(&self) -> Result<(), String> {
        let r = &self.requirements;
        let name = self.provider.name();
        if r.nodes == 0 {
            return Err(format!("{name}: nodes must be at least 1"));
        }
        if let Some(a) = &r.accelerator {
            if !(a.count > 0.0 && a.count.is_finite()) {
                return Err(format!("{name}: accelerator count must be positive, got {}", a.count));
            }
            if a.specs().is_empty() {
                return Err(format!("{name}: unknown accelerator {a} (hint: see skyward offers)"));
            }
        }
        for (field, v) in [("vcpus", r.vcpus), ("memory_gb", r.memory_gb), ("max_hourly_cost", r.max_hourly_cost)] {
            if let Some(v) = v
                && !(v >= 0.0 && v.is_finite())
            {
                return Err(format!("{name}: {field} must be a non-negative number, got {v}"));
            }
        }
        Ok(())
    }
}

/// An offer chosen for a spec, with the price it will be bought at.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Index of the spec in the list given to `select`.
    pub spec: usize,
    /// The offer.
    pub offer: Offer,
    /// Whether it is bought as spot.
    pub spot: bool,
    /// Price per node-hour, USD.
    pub node_price: f64,
    /// Price of the whole pool per hour, USD.
    pub pool_price: f64,
}

/// Why offers of one spec were rejected, counted by the first requirement each one failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Funnel {
    /// Provider name.
    pub provider: String,
    /// What was asked, in words.
    pub asked: String,
    /// Offers considered.
    pub total: usize,
    /// Rejections, in requirement order, with their counts (only non-zero ones).
    pub rejected: Vec<(&'static str, usize)>,
    /// Offers that passed.
    pub matched: usize,
    /// Cheapest price per node-hour among those that failed only on the price cap.
    pub cheapest_over_cap: Option<f64>,
    /// When the asked region is in none of the offers: the regions the provider does sell in.
    pub unknown_region: Option<(String, Vec<String>)>,
}

impl fmt::Display for Funnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} offers for {}", self.provider, self.total, self.asked)?;
        for (why, n) in &self.rejected {
            write!(f, "; {n} {why}")?;
        }
        write!(f, "; {} matched", self.matched)?;
        if let Some(p) = self.cheapest_over_cap {
            write!(f, " (the cheapest over the cap costs ${p:.2}/h per node)")?;
        }
        if let Some((asked, known)) = &self.unknown_region {
            let shown: Vec<&str> = known.iter().take(12).map(String::as_str).collect();
            let more = if known.len() > shown.len() { format!(" and {} more", known.len() - shown.len()) } else { String::new() };
            write!(f, "; region {asked:?} is not one {} sells in (hint: one of {}{more})", self.provider, shown.join(", "))?;
        }
        Ok(())
    }
}

/// No offer satisfies any spec.
#[derive(Debug, Clone, PartialEq)]
pub struct NoOffers {
    /// One funnel per spec.
    pub funnels: Vec<Funnel>,
}

impl fmt::Display for NoOffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no offer matches the spec")?;
        if self.funnels.len() > 1 {
            write!(f, "s")?;
        }
        for funnel in &self.funnels {
            write!(f, "\n  {funnel}")?;
        }
        write!(f, "\nhint: relax a requirement above, or run `skyward offers` to see what is sold")
    }
}

impl std::error::Error for NoOffers {}

const REASONS: [&str; 8] = [
    "without an accelerator",
    "with another accelerator",
    "with another memory variant or form factor",
    "with another device count",
    "with fewer vCPUs or less memory",
    "in another region or architecture",
    "not sold with this allocation",
    "over max_hourly_cost",
];

/// Index into `REASONS` of the first requirement `offer` fails, or the price it would be bought at.
fn check(req: &Requirements, accepted: &[(&str, u32)], offer: &Offer) -> Result<(f64, bool), usize> {
    if let Some(want) = &req.accelerator {
        let Some(have) = &offer.instance_type.accelerator else { return Err(0) };
        let mut name_ok = false;
        let mut variant_ok = false;
        for (name, mem) in accepted {
            if *name == have.name {
                name_ok = true;
                let mem_ok = want.memory_gb.is_none() || (*mem as f64 - have.memory_gb as f64).abs() <= 0.1 * *mem as f64;
                if mem_ok && want.form.is_none_or(|f| f == have.form) {
                    variant_ok = true;
                    break;
                }
            }
        }
        if !name_ok {
            return Err(1);
        }
        if !variant_ok {
            return Err(2);
        }
        if (have.count - want.count).abs() > 1e-9 {
            return Err(3);
        }
    }
    let it = &offer.instance_type;
    if req.vcpus.is_some_and(|v| it.vcpus < v) || req.memory_gb.is_some_and(|m| it.memory_gb < m) {
        return Err(4);
    }
    if req.region.as_deref().is_some_and(|r| !offer.region.eq_ignore_ascii_case(r))
        || req.architecture.is_some_and(|a| a != it.architecture)
    {
        return Err(5);
    }
    let Some((price, spot)) = req.allocation.price(offer) else { return Err(6) };
    if req.max_hourly_cost.is_some_and(|cap| price > cap) {
        return Err(7);
    }
    Ok((price, spot))
}

/// The offers that satisfy `req`, cheapest first, and the funnel of rejections.
pub fn matching(req: &Requirements, provider: &str, offers: &[Offer]) -> (Vec<(usize, f64, bool)>, Funnel) {
    let accepted: Vec<(&str, u32)> =
        req.accelerator.as_ref().map(|a| a.specs().iter().map(|s| (s.name, s.memory_gb)).collect()).unwrap_or_default();
    let mut counts = [0usize; REASONS.len()];
    let mut cheapest_over_cap: Option<f64> = None;
    let mut hits = Vec::new();
    for (i, offer) in offers.iter().enumerate() {
        match check(req, &accepted, offer) {
            Ok((price, spot)) => hits.push((i, price, spot)),
            Err(stage) => {
                counts[stage] += 1;
                if stage == 7
                    && let Some((p, _)) = req.allocation.price(offer)
                {
                    cheapest_over_cap = Some(cheapest_over_cap.map_or(p, |c: f64| c.min(p)));
                }
            }
        }
    }
    hits.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let funnel = Funnel {
        provider: provider.to_string(),
        asked: describe(req),
        total: offers.len(),
        rejected: REASONS.iter().zip(counts).filter(|(_, n)| *n > 0).map(|(r, n)| (*r, n)).collect(),
        matched: hits.len(),
        cheapest_over_cap,
        unknown_region: req.region.as_ref().and_then(|r| {
            if offers.iter().any(|o| o.region.eq_ignore_ascii_case(r)) {
                return None;
            }
            let mut known: Vec<String> = offers.iter().map(|o| o.region.clone()).filter(|r| !r.is_empty()).collect();
            known.sort();
            known.dedup();
            (!known.is_empty()).then(|| (r.clone(), known))
        }),
    };
    (hits, funnel)
}

/// `2 nodes of H100 x4, >= 16 vCPUs, spot-if-available, <= $20.00/h`.
pub fn describe(req: &Requirements) -> String {
    let mut s = format!("{} node{}", req.nodes, if req.nodes == 1 { "" } else { "s" });
    match &req.accelerator {
        Some(a) => s.push_str(&format!(" of {a}")),
        None => s.push_str(" (any machine)"),
    }
    if let Some(v) = req.vcpus {
        s.push_str(&format!(", >= {} vCPUs", fmt_count(v)));
    }
    if let Some(m) = req.memory_gb {
        s.push_str(&format!(", >= {} GB memory", fmt_count(m)));
    }
    if let Some(a) = req.architecture {
        s.push_str(&format!(", {a}"));
    }
    if let Some(r) = &req.region {
        s.push_str(&format!(", region {r}"));
    }
    s.push_str(match req.allocation {
        Allocation::Spot => ", spot",
        Allocation::OnDemand => ", on-demand",
        Allocation::SpotIfAvailable => ", spot if available",
        Allocation::Cheapest => ", cheapest of spot and on-demand",
    });
    if let Some(c) = req.max_hourly_cost {
        s.push_str(&format!(", <= ${c:.2}/h per node"));
    }
    s
}

/// Rank the offers of every spec: `specs[i]` pairs spec i's requirements and provider name with
/// its provider's offers. At most `limit` candidates come back (the start tries them in order).
pub fn select(specs: &[(&Requirements, &str, &[Offer])], selection: Selection, limit: usize) -> Result<Vec<Candidate>, NoOffers> {
    let mut ranked: Vec<(usize, usize, f64, f64, bool)> = Vec::new(); // spec, offer, pool price, node price, spot
    let mut funnels = Vec::with_capacity(specs.len());
    for (s, (req, provider, offers)) in specs.iter().enumerate() {
        let (hits, funnel) = matching(req, provider, offers);
        funnels.push(funnel);
        ranked.extend(hits.into_iter().map(|(i, price, spot)| (s, i, price * req.nodes as f64, price, spot)));
    }
    if ranked.is_empty() {
        return Err(NoOffers { funnels });
    }
    match selection {
        // Stable: equal prices keep spec order, then offer order.
        Selection::Cheapest => ranked.sort_by(|a, b| a.2.total_cmp(&b.2)),
        // Already grouped by spec, cheapest first within each.
        Selection::First => {}
    }
    ranked.truncate(limit.max(1));
    Ok(ranked
        .into_iter()
        .map(|(spec, i, pool_price, node_price, spot)| Candidate { spec, offer: specs[spec].2[i].clone(), spot, node_price, pool_price })
        .collect())
}

/// Why one attempt to start on a candidate failed, as far as fallback is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The provider has no machines of that kind now.
    Capacity,
    /// An account limit or balance.
    Quota,
    /// Credentials missing, malformed or refused.
    Auth,
    /// The live price is above the spec's cap.
    PriceCap,
    /// The provider's API failed or throttled past the retries.
    Api,
    /// The request itself is wrong (it would fail anywhere).
    Invalid,
    /// The machine came up but could not be made a worker.
    Bootstrap,
}

impl FailureKind {
    /// The kind of a provider error.
    pub fn of(e: &ProviderError) -> Self {
        match e {
            ProviderError::NoCapacity { .. } => Self::Capacity,
            ProviderError::Quota { .. } => Self::Quota,
            ProviderError::Auth { .. } => Self::Auth,
            ProviderError::PriceCap { .. } => Self::PriceCap,
            ProviderError::Invalid { .. } => Self::Invalid,
            ProviderError::Bootstrap { .. } => Self::Bootstrap,
            ProviderError::Failed { .. } | ProviderError::RateLimited { .. } | ProviderError::Leaked { .. } => Self::Api,
        }
    }

    /// Whether the next candidate is worth trying. A bootstrap failure or an invalid request
    /// would fail the same way elsewhere (same image, same spec), so the start stops there.
    pub fn falls_back(self) -> bool {
        !matches!(self, Self::Invalid | Self::Bootstrap)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Capacity => "no capacity",
            Self::Quota => "quota",
            Self::Auth => "auth",
            Self::PriceCap => "price cap",
            Self::Api => "API error",
            Self::Invalid => "invalid request",
            Self::Bootstrap => "bootstrap",
        })
    }
}

/// One attempt of a start.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// The offer, in words (`runpod H100 x1 (..) in EU-RO-1, spot $2.10/h`).
    pub offer: String,
    /// Why it failed.
    pub kind: FailureKind,
    /// The provider's message.
    pub message: String,
}

impl Attempt {
    /// The attempt on `candidate` that failed with `error`.
    pub fn failed(candidate: &Candidate, kind: FailureKind, message: impl Into<String>) -> Self {
        Self { offer: describe_candidate(candidate), kind, message: message.into() }
    }
}

/// `runpod H100 x1 (...) in EU-RO-1, spot $2.10/h per node`.
pub fn describe_candidate(c: &Candidate) -> String {
    format!("{}, {} ${:.2}/h per node", c.offer.describe(), if c.spot { "spot" } else { "on-demand" }, c.node_price)
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.offer, self.kind, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::accelerators;
    use crate::offers::{Billing, InstanceType, OfferAccelerator};

    fn gpu_offer(provider: &str, id: &str, gpu: &str, count: f64, spot: Option<f64>, od: Option<f64>) -> Offer {
        Offer {
            id: id.into(),
            provider: provider.into(),
            region: "r1".into(),
            instance_type: InstanceType {
                name: id.into(),
                accelerator: OfferAccelerator::from_provider(gpu, None, count),
                vcpus: 16.0 * count,
                memory_gb: 64.0 * count,
                architecture: Architecture::X86_64,
            },
            spot_price: spot,
            on_demand_price: od,
            billing: Billing::Second,
            specific: serde_json::Value::Null,
        }
    }

    fn req(acc: Accelerator) -> Requirements {
        Requirements { accelerator: Some(acc), nodes: 1, ..Default::default() }
    }

    #[test]
    fn allocation_prices() {
        let o = gpu_offer("p", "a", "H100", 1.0, Some(1.0), Some(3.0));
        assert_eq!(Allocation::Spot.price(&o), Some((1.0, true)));
        assert_eq!(Allocation::OnDemand.price(&o), Some((3.0, false)));
        assert_eq!(Allocation::SpotIfAvailable.price(&o), Some((1.0, true)));
        assert_eq!(Allocation::Cheapest.price(&o), Some((1.0, true)));
        let od_only = gpu_offer("p", "b", "H100", 1.0, None, Some(3.0));
        assert_eq!(Allocation::Spot.price(&od_only), None);
        assert_eq!(Allocation::SpotIfAvailable.price(&od_only), Some((3.0, false)));
        let weird = gpu_offer("p", "c", "H100", 1.0, Some(5.0), Some(3.0));
        assert_eq!(Allocation::Cheapest.price(&weird), Some((3.0, false)));
        assert_eq!(Allocation::SpotIfAvailable.price(&weird), Some((5.0, true)));
        assert!(Allocation::parse("on_demand").is_ok());
        assert!(Allocation::parse("reserved").unwrap_err().contains("hint"));
    }

    #[test]
    fn requirements_are_minimums_and_count_is_exact() {
        let offers = vec![
            gpu_offer("p", "1x", "H100", 1.0, None, Some(2.0)),
            gpu_offer("p", "4x", "H100", 4.0, None, Some(8.0)),
            gpu_offer("p", "8x", "H100", 8.0, None, Some(16.0)),
            gpu_offer("p", "a100", "A100 80GB", 4.0, None, Some(4.0)),
        ];
        let mut r = req(accelerators::h100().count(4));
        r.vcpus = Some(32.0); // 4x has 64: a minimum, not an exact match
        let (hits, funnel) = matching(&r, "p", &offers);
        assert_eq!(hits.iter().map(|h| offers[h.0].id.as_str()).collect::<Vec<_>>(), ["4x"]);
        assert_eq!(funnel.rejected, vec![("with another accelerator", 1), ("with another device count", 2)]);
        r.vcpus = Some(65.0);
        assert!(matching(&r, "p", &offers).0.is_empty());
    }

    #[test]
    fn memory_variant_and_price_cap() {
        let offers = vec![
            gpu_offer("p", "a40g", "NVIDIA A100-SXM4-40GB", 1.0, None, Some(1.0)),
            gpu_offer("p", "a80g", "NVIDIA A100 80GB PCIe", 1.0, None, Some(2.0)),
        ];
        let (hits, _) = matching(&req(accelerators::a100()), "p", &offers);
        assert_eq!(hits.len(), 2, "no memory pinned: both variants");
        let (hits, _) = matching(&req(accelerators::a100().memory(80)), "p", &offers);
        assert_eq!(hits.iter().map(|h| offers[h.0].id.as_str()).collect::<Vec<_>>(), ["a80g"]);
        let mut capped = req(accelerators::a100().memory(80));
        capped.max_hourly_cost = Some(1.5);
        let (hits, funnel) = matching(&capped, "p", &offers);
        assert!(hits.is_empty());
        assert_eq!(funnel.cheapest_over_cap, Some(2.0));
        assert!(funnel.to_string().contains("1 over max_hourly_cost"), "{funnel}");
    }

    #[test]
    fn cheapest_ranks_whole_pools_across_specs_and_first_keeps_spec_order() {
        let a = [gpu_offer("a", "a1", "H100", 1.0, Some(3.0), Some(6.0))];
        let b = [gpu_offer("b", "b1", "H100", 1.0, None, Some(2.5)), gpu_offer("b", "b2", "H100", 1.0, None, Some(2.0))];
        let ra = Requirements { nodes: 2, ..req(accelerators::h100()) };
        let rb = Requirements { nodes: 2, ..req(accelerators::h100()) };
        let specs = [(&ra, "a", &a[..]), (&rb, "b", &b[..])];
        let c = select(&specs, Selection::Cheapest, 10).unwrap();
        assert_eq!(c.iter().map(|c| c.offer.id.as_str()).collect::<Vec<_>>(), ["b2", "b1", "a1"]);
        assert_eq!(c[0].pool_price, 4.0);
        assert!(c[2].spot, "spot if available picks the spot price");
        let c = select(&specs, Selection::First, 10).unwrap();
        assert_eq!(c.iter().map(|c| c.offer.id.as_str()).collect::<Vec<_>>(), ["a1", "b2", "b1"]);
        assert_eq!(select(&specs, Selection::Cheapest, 2).unwrap().len(), 2);
    }

    #[test]
    fn no_offers_shows_every_spec() {
        let a = [gpu_offer("a", "a1", "RTX 4090", 1.0, None, Some(0.5))];
        let ra = req(accelerators::h100());
        let rb = Requirements { allocation: Allocation::Spot, ..req(accelerators::rtx_4090()) };
        let err = select(&[(&ra, "a", &a[..]), (&rb, "b", &a[..])], Selection::Cheapest, 5).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("a: 1 offers for 1 node of H100 x1"), "{text}");
        assert!(text.contains("1 with another accelerator"), "{text}");
        assert!(text.contains("1 not sold with this allocation"), "{text}");
        assert!(text.contains("hint:"), "{text}");
    }

    #[test]
    fn an_unknown_region_lists_the_known_ones() {
        let offers = [gpu_offer("p", "a", "H100", 1.0, None, Some(2.0))];
        let mut r = req(accelerators::h100());
        r.region = Some("mars-1".into());
        let (hits, funnel) = matching(&r, "p", &offers);
        assert!(hits.is_empty());
        let text = funnel.to_string();
        assert!(text.contains("region \"mars-1\" is not one p sells in (hint: one of r1)"), "{text}");
        r.region = Some("R1".into());
        assert_eq!(matching(&r, "p", &offers).0.len(), 1, "regions match in any case");
    }

    #[test]
    fn failure_kinds_decide_fallback() {
        let cap = ProviderError::NoCapacity { provider: "p", message: "none".into() };
        assert!(FailureKind::of(&cap).falls_back());
        let bad = ProviderError::Invalid { provider: "p", message: "bad".into() };
        assert!(!FailureKind::of(&bad).falls_back());
        let auth = ProviderError::Auth { provider: "p", message: "401".into() };
        assert_eq!(FailureKind::of(&auth), FailureKind::Auth);
    }
}
