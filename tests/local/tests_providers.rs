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
