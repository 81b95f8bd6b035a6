//! Offer selection over a large catalog: 10,000 offers from 3 providers (a cloud with many
//! instance types and regions, two marketplaces), three specs, cheapest first. Measures
//! `select` alone, reading the three cached catalogs from disk plus `select` (what a start
//! does when the cache is fresh), and normalising 10,000 provider GPU names onto the catalog.
//!
//! `cargo bench --bench selection` (300 runs each) or `-- --test` (3 runs, as `.ci/run` does).
#![allow(clippy::print_stdout)]

use skyward::providers::catalog;
use skyward::providers::offers::{Architecture, Billing, InstanceType, Offer, OfferAccelerator, OfferCache};
use skyward::providers::select::{self, Allocation, Requirements, Selection};
use std::time::{Duration, Instant};

const GPUS: &[(&str, f64)] = &[
    ("NVIDIA H100 80GB HBM3", 2.5),
    ("NVIDIA A100-SXM4-80GB", 1.6),
    ("NVIDIA A100-SXM4-40GB", 1.2),
    ("NVIDIA GeForce RTX 4090", 0.4),
    ("NVIDIA L40S", 0.9),
    ("NVIDIA RTX A6000", 0.5),
    ("NVIDIA L4", 0.45),
    ("Tesla T4", 0.3),
    ("NVIDIA H200", 3.5),
    ("RTX 3090", 0.25),
];

/// A deterministic pseudo-random sequence (no dependency, same catalog every run).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn unit(&mut self) -> f64 {
        (self.next() % 10_000) as f64 / 10_000.0
    }
}

fn catalog_for(provider: &str, n: usize, rng: &mut Lcg) -> Vec<Offer> {
    let regions = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-south-1", "US", "DE", "CA", "EU-RO-1", ""];
    (0..n)
        .map(|i| {
            let (gpu, base) = GPUS[(rng.next() as usize) % GPUS.len()];
            let count = [1.0, 2.0, 4.0, 8.0][(rng.next() as usize) % 4];
            let cpu_only = provider == "aws" && i % 5 == 0;
            let od = base * count * (0.8 + 0.6 * rng.unit());
            Offer {
                id: format!("{provider}-{i}"),
                provider: provider.into(),
                region: regions[(rng.next() as usize) % regions.len()].into(),
                instance_type: InstanceType {
                    name: format!("{gpu}-{i}"),
                    accelerator: if cpu_only { None } else { OfferAccelerator::from_provider(gpu, None, count) },
                    vcpus: 8.0 * count,
                    memory_gb: 32.0 * count,
                    architecture: if i % 17 == 0 { Architecture::Arm64 } else { Architecture::X86_64 },
                },
                spot_price: (!rng.next().is_multiple_of(3)).then(|| od * (0.3 + 0.3 * rng.unit())),
                on_demand_price: (provider != "vastai" || !rng.next().is_multiple_of(5)).then_some(od),
                billing: Billing::Second,
                specific: serde_json::Value::Null,
            }
        })
        .collect()
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort_unstable();
    let p99 = v[((v.len() * 99) / 100).min(v.len() - 1)];
    (v[v.len() / 2], p99, v[0])
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let runs = if quick { 3 } else { 300 };
    let mut rng = Lcg(42);
    let catalogs = [
        ("aws", catalog_for("aws", 4000, &mut rng)),
        ("runpod", catalog_for("runpod", 3000, &mut rng)),
        ("vastai", catalog_for("vastai", 3000, &mut rng)),
    ];
    let total: usize = catalogs.iter().map(|c| c.1.len()).sum();
    let reqs = [
        Requirements {
            accelerator: Some(catalog::accelerators::h100().count(8)),
            nodes: 2,
            vcpus: Some(32.0),
            allocation: Allocation::SpotIfAvailable,
            ..Default::default()
        },
        Requirements {
            accelerator: Some(catalog::accelerators::a100().memory(80).count(4)),
            nodes: 2,
            max_hourly_cost: Some(9.0),
            ..Default::default()
        },
        Requirements {
            accelerator: Some(catalog::accelerators::rtx_4090()),
            nodes: 4,
            allocation: Allocation::Cheapest,
            ..Default::default()
        },
    ];

    // 1. select() alone.
    let mut times = Vec::with_capacity(runs);
    let mut found = 0;
    for _ in 0..runs {
        let view: Vec<(&Requirements, &str, &[Offer])> = reqs.iter().zip(&catalogs).map(|(r, (p, o))| (r, *p, o.as_slice())).collect();
        let t = Instant::now();
        let c = select::select(&view, Selection::Cheapest, 5).expect("candidates");
        times.push(t.elapsed());
        found = c.len();
    }
    let (p50, p99, min) = stats(times);
    println!("select over {total} offers, 3 specs: p50 {p50:?}  p99 {p99:?}  min {min:?}  ({found} candidates)");

    // 2. cached catalogs read from disk, then select().
    let dir = std::env::temp_dir().join(format!("skyward-bench-selection-{}", std::process::id()));
    let cache = OfferCache::new(&dir);
    for (p, offers) in &catalogs {
        cache.store(p, offers).expect("store");
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let loaded: Vec<Vec<Offer>> = catalogs.iter().map(|(p, _)| cache.load(p, Duration::from_secs(3600)).expect("fresh").0).collect();
        let view: Vec<(&Requirements, &str, &[Offer])> =
            reqs.iter().zip(&catalogs).zip(&loaded).map(|((r, (p, _)), o)| (r, *p, o.as_slice())).collect();
        let _ = select::select(&view, Selection::Cheapest, 5).expect("candidates");
        times.push(t.elapsed());
    }
    let (p50, p99, min) = stats(times);
    println!("read 3 cached catalogs + select: p50 {p50:?}  p99 {p99:?}  min {min:?}");
    std::fs::remove_dir_all(&dir).ok();

    // 3. normalising provider names (done once per catalog fetch).
    let names: Vec<&str> = (0..10_000).map(|i| GPUS[i % GPUS.len()].0).collect();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.min(50) {
        let t = Instant::now();
        let n = names.iter().filter(|n| catalog::normalize(n, None).is_some()).count();
        times.push(t.elapsed());
        assert_eq!(n, names.len());
    }
    let (p50, p99, min) = stats(times);
    println!("normalise 10000 GPU names: p50 {p50:?}  p99 {p99:?}  min {min:?}");
}
