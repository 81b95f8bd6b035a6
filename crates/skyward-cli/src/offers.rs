//! `skyward offers`: every configured provider's catalog (cached), filtered with the same
//! requirements a `Spec` uses, cheapest first.

use skyward_provider::catalog::Accelerator;
use skyward_provider::select::{self, Allocation, Requirements};
use skyward_provider::{Offer, OfferCache, Provider};
use std::process::ExitCode;
use std::sync::Arc;

/// Parsed command line.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Args {
    pub(crate) providers: Option<Vec<String>>,
    pub(crate) accelerator: Option<String>,
    pub(crate) count: Option<u32>,
    pub(crate) max_price: Option<f64>,
    pub(crate) allocation: Option<Allocation>,
    pub(crate) region: Option<String>,
    pub(crate) limit: usize,
    pub(crate) refresh: bool,
    pub(crate) json: bool,
}

pub(crate) fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args { limit: 30, ..Default::default() };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--provider" | "-p" => a.providers = Some(value("--provider")?.split(',').map(|s| s.trim().to_ascii_lowercase()).collect()),
            "--accelerator" | "-a" => a.accelerator = Some(value("--accelerator")?),
            "--count" | "-c" => {
                let v = value("--count")?;
                a.count = Some(v.parse().ok().filter(|n| *n > 0).ok_or_else(|| format!("--count {v:?} is not a positive whole number"))?);
            }
            "--max-price" => {
                let v = value("--max-price")?;
                a.max_price = Some(
                    v.parse()
                        .ok()
                        .filter(|p: &f64| p.is_finite() && *p >= 0.0)
                        .ok_or_else(|| format!("--max-price {v:?} is not a price in USD per hour"))?,
                );
            }
            "--spot" => a.allocation = Some(Allocation::Spot),
            "--on-demand" => a.allocation = Some(Allocation::OnDemand),
            "--region" => a.region = Some(value("--region")?),
            "--limit" | "-n" => {
                let v = value("--limit")?;
                a.limit = v.parse().map_err(|_| format!("--limit {v:?} is not a number"))?;
            }
            "--refresh" => a.refresh = true,
            "--json" => a.json = true,
            other => return Err(format!("offers: unknown option {other:?}")),
        }
    }
    Ok(a)
}

/// The requirements the flags describe.
pub(crate) fn requirements(a: &Args) -> Result<Requirements, String> {
    let mut accelerator = match &a.accelerator {
        Some(s) => Some(Accelerator::parse(s)?),
        None => None,
    };
    if let Some(n) = a.count {
        let acc = accelerator.take().ok_or("--count needs --accelerator")?;
        accelerator = Some(acc.count(n));
    }
    Ok(Requirements {
        accelerator,
        nodes: 1,
        region: a.region.clone(),
        allocation: a.allocation.unwrap_or(Allocation::Cheapest),
        max_hourly_cost: a.max_price,
        ..Default::default()
    })
}

/// Providers built, and the problems of those that could not be (missing credentials).
pub(crate) type Configured = (Vec<Arc<dyn Provider>>, Vec<String>);

/// Providers to ask: the named ones (their credentials must be set), else every provider whose
/// credentials are in the environment. Endpoints can be redirected (`SKYWARD_RUNPOD_GRAPHQL_URL`,
/// `SKYWARD_RUNPOD_REST_URL`, `SKYWARD_VASTAI_URL`), e.g. to a proxy.
pub(crate) fn providers(named: Option<&[String]>, env: &dyn Fn(&str) -> Option<String>) -> Result<Configured, String> {
    let mut known: Vec<(&str, &str)> = vec![("runpod", "RUNPOD_API_KEY"), ("vastai", "VAST_API_KEY")];
    if cfg!(feature = "aws") {
        known.push(("aws", "AWS_ACCESS_KEY_ID"));
    }
    let wanted: Vec<&str> = match named {
        Some(list) => {
            for n in list {
                if !known.iter().any(|(k, _)| k == n) {
                    let names: Vec<&str> = known.iter().map(|k| k.0).collect();
                    let aws = if cfg!(feature = "aws") { "" } else { "; aws needs a build with --features aws" };
                    return Err(format!("unknown provider {n:?} (hint: one of {}{aws})", names.join(", ")));
                }
            }
            list.iter().map(String::as_str).collect()
        }
        None => {
            known.iter().filter(|(k, var)| env(var).is_some() || (*k == "aws" && env("AWS_PROFILE").is_some())).map(|(k, _)| *k).collect()
        }
    };
    if wanted.is_empty() {
        let vars: Vec<&str> = known.iter().map(|k| k.1).collect();
        return Err(format!("no provider is configured (hint: set {}, or pass --provider)", vars.join(" or ")));
    }
    let mut out: Vec<Arc<dyn Provider>> = Vec::new();
    let mut problems = Vec::new();
    for name in wanted {
        let made = match name {
            "runpod" => {
                let mut c = skyward_provider::runpod::RunPod {
                    api_key: env("RUNPOD_API_KEY").map(skyward_provider::Secret::new),
                    ..Default::default()
                };
                if let Some(u) = env("SKYWARD_RUNPOD_GRAPHQL_URL") {
                    c.graphql_url = u;
                }
                if let Some(u) = env("SKYWARD_RUNPOD_REST_URL") {
                    c.rest_url = u;
                }
                c.provider().map(|p| Arc::new(p) as Arc<dyn Provider>)
            }
            #[cfg(feature = "aws")]
            "aws" => {
                let region = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")).unwrap_or_else(|| "us-east-1".into());
                skyward_aws::Aws { region, endpoint_url: env("SKYWARD_AWS_ENDPOINT"), ..Default::default() }
                    .provider()
                    .map(|p| Arc::new(p) as Arc<dyn Provider>)
            }
            _ => {
                let mut c = skyward_provider::vastai::VastAi {
                    api_key: env("VAST_API_KEY").map(skyward_provider::Secret::new),
                    ..Default::default()
                };
                if let Some(u) = env("SKYWARD_VASTAI_URL") {
                    c.endpoint = u;
                }
                c.provider().map(|p| Arc::new(p) as Arc<dyn Provider>)
            }
        };
        match made {
            Ok(p) => out.push(p),
            Err(e) => problems.push(e.to_string()),
        }
    }
    Ok((out, problems))
}

/// Fetch, filter and rank. Returns the rows (offer, price, spot), the per-provider problems,
/// and the rejection report when nothing matched.
pub(crate) async fn collect(
    providers: &[Arc<dyn Provider>],
    req: &Requirements,
    cache: &OfferCache,
    refresh: bool,
) -> (Vec<(Offer, f64, bool)>, Vec<String>, Option<String>) {
    let fetched = futures::future::join_all(providers.iter().map(|p| cache.offers(&**p, refresh))).await;
    let mut problems = Vec::new();
    let mut rows = Vec::new();
    let mut funnels = Vec::new();
    for (p, result) in providers.iter().zip(fetched) {
        match result {
            Ok((offers, _)) => {
                let (hits, funnel) = select::matching(req, p.name(), &offers);
                rows.extend(hits.into_iter().map(|(i, price, spot)| (offers[i].clone(), price, spot)));
                funnels.push(funnel);
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    rows.sort_by(|a, b| a.1.total_cmp(&b.1));
    let report = (rows.is_empty() && !funnels.is_empty()).then(|| select::NoOffers { funnels }.to_string());
    (rows, problems, report)
}

fn price(p: Option<f64>) -> String {
    p.map_or_else(|| "-".into(), |p| format!("{p:.3}"))
}

/// The table, cheapest first.
pub(crate) fn table(rows: &[(Offer, f64, bool)], limit: usize) -> String {
    let mut out = format!(
        "{:<8} {:<12} {:<16} {:>5} {:>6} {:>6} {:>8} {:>9} {:>9}  {}\n",
        "PROVIDER", "REGION", "ACCELERATOR", "COUNT", "VRAM", "VCPUS", "MEM GB", "SPOT $/h", "OD $/h", "INSTANCE TYPE"
    );
    for (o, _, _) in rows.iter().take(limit) {
        let (name, count, vram) = match &o.instance_type.accelerator {
            Some(a) => {
                use skyward_provider::catalog::FormFactor;
                let name = match a.form {
                    FormFactor::Sxm | FormFactor::Pcie | FormFactor::Nvl | FormFactor::Oam => format!("{} {}", a.name, a.form),
                    _ => a.name.clone(),
                };
                (name, a.count, format!("{}G", a.memory_gb))
            }
            None => ("-".into(), 0.0, "-".into()),
        };
        out.push_str(&format!(
            "{:<8} {:<12} {:<16} {:>5} {:>6} {:>6.0} {:>8.0} {:>9} {:>9}  {}\n",
            o.provider,
            if o.region.is_empty() { "any" } else { &o.region },
            name,
            count,
            vram,
            o.instance_type.vcpus,
            o.instance_type.memory_gb,
            price(o.spot_price),
            price(o.on_demand_price),
            o.instance_type.name
        ));
    }
    if rows.len() > limit {
        out.push_str(&format!("... {} more (--limit)\n", rows.len() - limit));
    }
    out
}

pub(crate) fn main(args: &[String]) -> ExitCode {
    let a = match parse(args) {
        Ok(a) => a,
        Err(e) => return crate::usage_error(&e),
    };
    let req = match requirements(&a) {
        Ok(r) => r,
        Err(e) => return crate::usage_error(&e),
    };
    let env = |k: &str| std::env::var(k).ok();
    let (providers, mut problems) = match providers(a.providers.as_deref(), &env) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (rows, fetch_problems, report) = rt.block_on(collect(&providers, &req, &OfferCache::default_location(), a.refresh));
    problems.extend(fetch_problems);
    for p in &problems {
        eprintln!("warning: {p}");
    }
    if a.json {
        let list: Vec<&Offer> = rows.iter().take(a.limit).map(|(o, _, _)| o).collect();
        match serde_json::to_string_pretty(&list) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else if let Some(r) = &report {
        eprintln!("{r}");
    } else if !rows.is_empty() {
        print!("{}", table(&rows, a.limit));
    }
    if rows.is_empty() { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn flags_become_requirements() {
        let a = parse(&args("--accelerator h100 --count 4 --max-price 20 --spot --region us")).unwrap();
        let r = requirements(&a).unwrap();
        assert_eq!(r.accelerator.as_ref().unwrap().count, 4.0);
        assert_eq!(r.allocation, Allocation::Spot);
        assert_eq!(r.max_hourly_cost, Some(20.0));
        assert!(parse(&args("--count 0")).unwrap_err().contains("--count"));
        assert!(parse(&args("--max-price cheap")).unwrap_err().contains("--max-price"));
        assert!(parse(&args("--bogus")).unwrap_err().contains("--bogus"));
        assert!(requirements(&parse(&args("--count 2")).unwrap()).unwrap_err().contains("--accelerator"));
        assert!(requirements(&parse(&args("--accelerator h10")).unwrap()).unwrap_err().contains("hint"));
    }

    #[test]
    fn providers_come_from_credentials() {
        let none = |_: &str| None;
        assert!(providers(None, &none).err().unwrap().contains("hint: set RUNPOD_API_KEY or VAST_API_KEY"));
        let named = vec!["aws2".to_string()];
        assert!(providers(Some(&named), &none).err().unwrap().contains("unknown provider"));
        let vast_only = |k: &str| (k == "VAST_API_KEY").then(|| "k".to_string());
        let (p, problems) = providers(None, &vast_only).unwrap();
        assert_eq!(p.iter().map(|p| p.name()).collect::<Vec<_>>(), ["vastai"]);
        assert!(problems.is_empty());
        // Named without a credential: a problem that says which variable to set.
        let named = vec!["runpod".to_string()];
        let (p, problems) = providers(Some(&named), &none).unwrap();
        assert!(p.is_empty() && problems[0].contains("RUNPOD_API_KEY"), "{problems:?}");
    }

    #[test]
    fn table_against_both_mocks_cheapest_first() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let runpod = skyward_testkit::runpod::RunPodMock::start("k1").await.unwrap();
            let vast = skyward_testkit::vastai::VastAiMock::start("k2").await.unwrap();
            let env = |k: &str| match k {
                "RUNPOD_API_KEY" => Some("k1".to_string()),
                "VAST_API_KEY" => Some("k2".to_string()),
                "SKYWARD_RUNPOD_GRAPHQL_URL" => Some(format!("{}/graphql", runpod.server.url())),
                "SKYWARD_RUNPOD_REST_URL" => Some(format!("{}/v1", runpod.server.url())),
                "SKYWARD_VASTAI_URL" => Some(vast.server.url()),
                _ => None,
            };
            let (p, problems) = providers(None, &env).unwrap();
            assert!(problems.is_empty());
            let dir = std::env::temp_dir().join(format!("skyward-cli-offers-{}", std::process::id()));
            let cache = OfferCache::new(&dir);
            let req = requirements(&parse(&args("--accelerator rtx4090 --count 1")).unwrap()).unwrap();
            let (rows, problems, report) = collect(&p, &req, &cache, true).await;
            assert!(problems.is_empty() && report.is_none(), "{problems:?} {report:?}");
            let providers: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.0.provider.as_str()).collect();
            assert_eq!(providers.into_iter().collect::<Vec<_>>(), ["runpod", "vastai"]);
            assert!(rows.windows(2).all(|w| w[0].1 <= w[1].1), "not cheapest first");
            assert!(rows.iter().all(|r| r.0.instance_type.accelerator.as_ref().unwrap().name == "RTX 4090"));
            let text = table(&rows, 1);
            assert!(text.starts_with("PROVIDER") && text.contains("RTX 4090") && text.contains("more (--limit)"), "{text}");
            // Second run: from the cache, no new calls.
            let calls = runpod.server.count("offers") + vast.server.count("offers");
            let _ = collect(&p, &req, &cache, false).await;
            assert_eq!(runpod.server.count("offers") + vast.server.count("offers"), calls, "the cache was not used");
            // Nothing matches: the report says why, per provider.
            let req = requirements(&parse(&args("--accelerator h100 --count 16")).unwrap()).unwrap();
            let (rows, _, report) = collect(&p, &req, &cache, false).await;
            assert!(rows.is_empty());
            let report = report.unwrap();
            assert!(report.contains("runpod:") && report.contains("vastai:") && report.contains("another device count"), "{report}");
            std::fs::remove_dir_all(&dir).ok();
        });
    }
}

/// What `skyward cleanup --cloud` found and did, per machine: (provider, machine id, name,
/// pool, outcome).
pub(crate) type SweepRow = (String, String, String, String, Result<bool, String>);

/// Terminate the machines tagged by a pool on `providers`: those of `pool`, or with `force`
/// every Skyward machine (without either, nothing is removed: a machine's coordinator may still
/// run elsewhere). `Ok(true)`: removed (or would be, with `dry_run`); `Ok(false)`: kept.
pub(crate) async fn sweep(
    providers: &[Arc<dyn Provider>],
    pool: Option<&str>,
    force: bool,
    dry_run: bool,
) -> Result<Vec<SweepRow>, String> {
    let mut rows = Vec::new();
    for p in providers {
        let found = p.list_tagged(pool).await.map_err(|e| e.to_string())?;
        for i in found {
            let remove = pool.is_some() || force;
            let outcome = if !remove || dry_run {
                Ok(remove)
            } else {
                let ctx = skyward_provider::PoolContext {
                    pool_id: i.pool_id.clone(),
                    state_dir: std::env::temp_dir().join(format!("skyward-cleanup-{}", i.pool_id)),
                    image: None,
                    placement: None,
                };
                p.terminate(&ctx, &i.id).await.map(|()| true).map_err(|e| e.to_string())
            };
            rows.push((p.name().to_string(), i.id, i.node_id, i.pool_id, outcome));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod sweep_tests {
    use super::*;

    #[test]
    fn sweep_removes_a_pool_or_everything_with_force_only() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mock = skyward_testkit::runpod::RunPodMock::start("k1").await.unwrap();
            let a = mock.plant("skyward-sky-deadpool01-r0-g0");
            let b = mock.plant("skyward-sky-otherpool1-r0-g0");
            let foreign = mock.plant("my-own-pod");
            let env = |k: &str| match k {
                "RUNPOD_API_KEY" => Some("k1".to_string()),
                "SKYWARD_RUNPOD_GRAPHQL_URL" => Some(format!("{}/graphql", mock.server.url())),
                "SKYWARD_RUNPOD_REST_URL" => Some(format!("{}/v1", mock.server.url())),
                _ => None,
            };
            let (p, _) = providers(None, &env).unwrap();
            // Without --pool or --force: listed, kept.
            let rows = sweep(&p, None, false, false).await.unwrap();
            assert_eq!(rows.len(), 2, "{rows:?}");
            assert!(rows.iter().all(|r| r.4 == Ok(false)));
            // One pool.
            let rows = sweep(&p, Some("sky-deadpool01"), false, false).await.unwrap();
            assert_eq!(rows.iter().map(|r| (r.1.as_str(), r.4.clone())).collect::<Vec<_>>(), [(a.as_str(), Ok(true))]);
            // Everything with --force; the dry run first removes nothing.
            assert_eq!(sweep(&p, None, true, true).await.unwrap().len(), 1);
            let rows = sweep(&p, None, true, false).await.unwrap();
            assert_eq!(rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), [b.as_str()]);
            let live: Vec<String> = mock.pods().iter().filter(|(_, p)| p.status != "TERMINATED").map(|(id, _)| id.clone()).collect();
            assert_eq!(live, vec![foreign], "only the pod that is not Skyward's stays");
        });
    }
}
