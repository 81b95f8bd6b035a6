//! The generic provider kit (`skyward_testkit::kit`) against each cloud's mock: one trial per
//! provider and case, each on a fresh mock on 127.0.0.1.

use libtest_mimic::Trial;
use skyward_testkit::kit::{self, CloudUnderTest};

const KEY: &str = "sk-kit-7f3a9c2e51b8d4";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

pub(crate) fn trials() -> Vec<Trial> {
    let mut trials = Vec::new();
    for case in kit::CASES {
        trials.push(Trial::test(format!("providers::runpod::{case}"), move || {
            block_on(async {
                let mock = skyward_testkit::runpod::RunPodMock::start(KEY).await.map_err(|e| e.to_string())?;
                kit::run(case, &mock as &dyn CloudUnderTest).await
            })
            .map_err(Into::into)
        }));
        trials.push(Trial::test(format!("providers::vastai::{case}"), move || {
            block_on(async {
                let mock = skyward_testkit::vastai::VastAiMock::start(KEY).await.map_err(|e| e.to_string())?;
                kit::run(case, &mock as &dyn CloudUnderTest).await
            })
            .map_err(Into::into)
        }));
    }
    trials
}

#[skyward::function]
async fn provider_echo(x: u32) -> u32 {
    x + 1
}

/// Trials that start whole pools across providers (fallback, errors listing every attempt).
pub(crate) fn start_trials() -> Vec<Trial> {
    vec![
        Trial::test("providers::fallback_crosses_providers", || crate::support::block_on(fallback_crosses_providers())),
        Trial::test("providers::all_attempts_failed_lists_each", || crate::support::block_on(all_attempts_failed_lists_each())),
        Trial::test("providers::no_offers_shows_the_funnel", || crate::support::block_on(no_offers_shows_the_funnel())),
    ]
}

/// The mocks' machines never run a worker: any file stands in for the static worker.
fn any_file() -> anyhow::Result<std::path::PathBuf> {
    Ok(std::env::current_exe()?)
}

fn cache_dir(name: &str) -> skyward::OfferCache {
    skyward::OfferCache::new(std::env::temp_dir().join(format!("skyward-test-offers-{name}-{}", std::process::id())))
}

/// RunPod has the first offer but no capacity: the start falls back to another provider, and
/// the pool says what was tried.
async fn fallback_crosses_providers() -> anyhow::Result<()> {
    use skyward::{Compute, Local, Selection, Spec, accelerators};
    use skyward_testkit::kit::CloudUnderTest;
    let mock = skyward_testkit::runpod::RunPodMock::start(KEY).await?;
    mock.server.inject("create", mock.capacity());
    let runpod = mock.settings(KEY).provider()?.worker_binary(any_file()?);
    let pool = Compute::from_specs([Spec::new(runpod).accelerator(accelerators::rtx_4090()), Spec::new(Local::default())])
        .selection(Selection::First)
        .offer_cache(cache_dir("fallback"))
        .options(crate::support::test_options())
        .start()
        .await?;
    let offer = pool.offer().expect("an offer").clone();
    anyhow::ensure!(offer.provider == "local", "started on {}", offer.provider);
    let attempts = pool.start_attempts().to_vec();
    anyhow::ensure!(attempts.len() == 1, "attempts: {attempts:?}");
    anyhow::ensure!(attempts[0].kind == skyward::FailureKind::Capacity, "{:?}", attempts[0]);
    anyhow::ensure!(attempts[0].offer.starts_with("runpod RTX 4090"), "{}", attempts[0].offer);
    anyhow::ensure!(pool.run(provider_echo(41)).await? == 42);
    pool.shutdown().await?;
    let left = mock.live().await;
    anyhow::ensure!(left.is_empty(), "pods left: {left:?}");
    anyhow::ensure!(mock.server.count("create") == 1, "{} creates", mock.server.count("create"));
    Ok(())
}

/// Every offer fails: the error lists each attempt with its reason, a listing failure included.
async fn all_attempts_failed_lists_each() -> anyhow::Result<()> {
    use skyward::{Compute, Spec, StartError, accelerators};
    use skyward_testkit::kit::CloudUnderTest;
    let runpod = skyward_testkit::runpod::RunPodMock::start(KEY).await?;
    for _ in 0..5 {
        runpod.server.inject("create", runpod.capacity());
    }
    let vast = skyward_testkit::vastai::VastAiMock::start(KEY).await?;
    let vast_bad_key = vast.settings("not-the-key").provider()?.worker_binary(any_file()?);
    let error = Compute::from_specs([
        Spec::new(runpod.settings(KEY).provider()?.worker_binary(any_file()?)).accelerator(accelerators::h100()),
        Spec::new(vast_bad_key).accelerator(accelerators::h100()),
    ])
    .max_attempts(2)
    .offer_cache(cache_dir("all-fail"))
    .options(crate::support::test_options())
    .start()
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("the start succeeded"))?;
    let StartError::AllAttemptsFailed { attempts } = &error else { anyhow::bail!("expected AllAttemptsFailed, got {error:?}") };
    anyhow::ensure!(attempts.len() == 3, "{attempts:#?}");
    let text = error.to_string();
    anyhow::ensure!(text.contains("vastai (listing offers): auth") && text.contains("hint: check VAST_API_KEY"), "{text}");
    anyhow::ensure!(text.matches("runpod H100").count() == 2 && text.contains("no capacity"), "{text}");
    anyhow::ensure!(!text.contains(KEY) && !text.contains("not-the-key"), "a credential in: {text}");
    let left = runpod.live().await;
    anyhow::ensure!(left.is_empty(), "pods left: {left:?}");
    Ok(())
}

/// Nothing matches: the error shows, per spec, how many offers each requirement rejected.
async fn no_offers_shows_the_funnel() -> anyhow::Result<()> {
    use skyward::{Compute, Local, Spec, StartError, accelerators};
    let error = Compute::from_specs([Spec::new(Local::default()).accelerator(accelerators::h100().count(8))])
        .offer_cache(cache_dir("none"))
        .start()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a Local pool with 8 H100s started"))?;
    anyhow::ensure!(matches!(error, StartError::NoOffers(_)), "{error:?}");
    let text = error.to_string();
    anyhow::ensure!(
        text.contains("local: 1 offers for 1 node of H100 x8, spot if available; 1 without an accelerator; 0 matched"),
        "{text}"
    );
    anyhow::ensure!(text.contains("hint:"), "{text}");
    Ok(())
}

/// API calls of one start and teardown of 2 machines (the figures in docs/providers.md; the
/// catalog is fetched twice here: once cold, once more by the test for a second ask).
pub(crate) fn call_trials() -> Vec<Trial> {
    vec![Trial::test("providers::api_calls_per_start", || {
        block_on(async {
            let runpod = skyward_testkit::runpod::RunPodMock::start(KEY).await.map_err(|e| e.to_string())?;
            let calls = kit::calls_per_start(&runpod, 2).await?;
            let want: std::collections::BTreeMap<String, usize> =
                [("offers", 2), ("create", 2), ("get", 6), ("delete", 2), ("list", 2)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
            if calls != want {
                return Err(format!("runpod calls {calls:?}, documented {want:?}"));
            }
            let vast = skyward_testkit::vastai::VastAiMock::start(KEY).await.map_err(|e| e.to_string())?;
            let calls = kit::calls_per_start(&vast, 2).await?;
            let want: std::collections::BTreeMap<String, usize> =
                [("offers", 2), ("keys", 1), ("add_key", 1), ("create", 2), ("get", 6), ("delete", 2), ("list", 2), ("delete_key", 1)]
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect();
            if calls != want {
                return Err(format!("vastai calls {calls:?}, documented {want:?}"));
            }
            Ok(())
        })
        .map_err(Into::into)
    })]
}

/// A whole pool on "RunPod": the mock's pods are containers with sshd, so the cloud path runs
/// end to end (offers, create, poll until running with a public port, SSH with the pool key,
/// worker bootstrap, standalone tunnel, tasks, teardown confirmed, nothing left).
pub(crate) fn cloud_pool_trials() -> Vec<Trial> {
    vec![Trial::test("providers::runpod_pool_end_to_end", || crate::support::block_on(runpod_pool_end_to_end()))]
}

fn base_image() -> anyhow::Result<String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-base-image.sh");
    let out = std::process::Command::new("bash").arg(&script).stdin(std::process::Stdio::null()).output()?;
    anyhow::ensure!(out.status.success(), "{}: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn runpod_pool_end_to_end() -> anyhow::Result<()> {
    use skyward::{Compute, Spec, accelerators};
    let image = base_image()?;
    let mock = skyward_testkit::runpod::RunPodMock::start_with_containers(KEY, &image).await?;
    let provider = mock.settings(KEY).provider()?;
    let pool = Compute::from_specs([Spec::new(provider).accelerator(accelerators::rtx_4090()).nodes(2)])
        .offer_cache(cache_dir("runpod-e2e"))
        .refresh_offers(true)
        .options(crate::support::test_options())
        .start()
        .await?;
    let offer = pool.offer().expect("an offer").clone();
    anyhow::ensure!(offer.provider == "runpod" && offer.instance_type.name == "NVIDIA GeForce RTX 4090", "{offer:?}");
    anyhow::ensure!(pool.price() == Some((true, 0.29)), "spot if available buys spot at the minimum bid: {:?}", pool.price());
    let results = pool.broadcast(provider_echo(1)).await?;
    anyhow::ensure!(results == vec![2, 2], "{results:?}");
    let pods = mock.pods();
    anyhow::ensure!(pods.len() == 2, "{} pods", pods.len());
    for p in pods.values() {
        anyhow::ensure!(p.input["cloudType"] == "SECURE" && p.bid == Some(0.29), "{:?}", p.input);
        anyhow::ensure!(p.name.starts_with(&format!("skyward-{}", pool.pool_id())), "pod name {}", p.name);
    }
    pool.shutdown().await?;
    let left = mock.live().await;
    anyhow::ensure!(left.is_empty(), "pods left: {left:?}");
    let containers = std::process::Command::new("docker").args(["ps", "-q", "--filter", "label=skyward.test.mockpod"]).output()?;
    let mine: Vec<String> = mock.pods().values().filter_map(|p| p.container.as_ref().map(|c| c.0.clone())).collect();
    anyhow::ensure!(
        mine.is_empty(),
        "containers of terminated pods: {mine:?} (docker ps: {})",
        String::from_utf8_lossy(&containers.stdout)
    );
    Ok(())
}
