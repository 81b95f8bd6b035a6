//! The AWS provider against moto (a third-party EC2/SSM emulator, PyPI `moto[server]`, started
//! here on 127.0.0.1, one server per test) behind the testkit's mock server, which checks the
//! access key, logs every action, scripts faults, and answers what moto lacks: the Ubuntu AMI's
//! SSM parameter. Every generic kit case runs.
//!
//! Needs `moto_server`: `$SKYWARD_MOTO_SERVER`, else `/var/tmp/skyward-moto/bin/moto_server`
//! (`.ci/run` installs it there). Built only with `--features aws`.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Trial};
use skyward_aws::aws_sdk_ec2;
use skyward_provider::Secret;
use skyward_testkit::Fault;
use skyward_testkit::kit::{self, CloudUnderTest};
use skyward_testkit::mock::{Answer, Handler, MockServer};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "AKIAKITTEST7F3A9C2E5";
const SECRET: &str = "kit-secret-0b8d4e6f1a2c3d4e5f6a7b8c9d0e";
/// An AMI moto knows.
const AMI: &str = "ami-12c6146b";

/// A moto server on a free loopback port; killed when dropped.
struct Moto {
    child: std::process::Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    async fn start() -> Result<Self, String> {
        let bin = std::env::var("SKYWARD_MOTO_SERVER").unwrap_or_else(|_| "/var/tmp/skyward-moto/bin/moto_server".into());
        if !std::path::Path::new(&bin).exists() {
            return Err(format!("moto_server not found at {bin} (hint: .ci/run installs it; or set SKYWARD_MOTO_SERVER)"));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let child = std::process::Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {bin}: {e}"))?;
        let moto = Moto { child, url: format!("http://127.0.0.1:{port}") };
        // Ready when it answers; bounded.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(moto);
            }
            if Instant::now() > deadline {
                return Err("moto_server did not listen within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// EC2 actions (and SSM's GetParameter) named as the kit's operations.
struct Ec2Front {
    moto: String,
}

fn form_value<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split('&').find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

impl Handler for Ec2Front {
    fn route(&self, _method: &str, _path: &str, body: &str) -> String {
        if body.trim_start().starts_with('{') {
            return "ami".into();
        }
        match form_value(body, "Action").unwrap_or("") {
            "DescribeInstanceTypes" => "offers".into(),
            "DescribeSpotPriceHistory" => "prices".into(),
            "CreateFleet" => "create".into(),
            "DescribeInstances" if body.contains("InstanceId.1=") => "get".into(),
            "DescribeInstances" => "list".into(),
            "TerminateInstances" => "delete".into(),
            other => other.to_string(),
        }
    }

    fn authorized(&self, headers: &hyper::HeaderMap, _path: &str) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains(&format!("Credential={KEY}/")))
    }

    fn unauthorized_body(&self) -> String {
        "<Response><Errors><Error><Code>AuthFailure</Code><Message>AWS was not able to validate the provided access credentials</Message></Error></Errors><RequestID>kit</RequestID></Response>".into()
    }

    fn forward(&self, op: &str) -> Option<String> {
        (op != "ami").then(|| self.moto.clone())
    }

    fn handle(&self, _op: &str, _method: &str, _path: &str, body: &str) -> Answer {
        // moto has no public parameters for Canonical's AMIs.
        let name =
            serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v["Name"].as_str().map(str::to_string)).unwrap_or_default();
        if !name.starts_with("/aws/service/canonical/ubuntu/server/") {
            return Answer::status(
                400,
                serde_json::json!({"__type": "ParameterNotFound", "message": format!("Parameter {name} not found.")}),
            );
        }
        Answer::json(
            serde_json::json!({"Parameter": {"Name": name, "Type": "String", "Value": AMI, "Version": 1, "DataType": "aws:ec2:image"}}),
        )
    }
}

struct AwsUnderTest {
    _moto: Moto,
    server: MockServer,
    /// Straight to moto (no faults, no key check): the test's own view of the account.
    direct: aws_sdk_ec2::Client,
    admin: skyward_aws::AwsCloud,
}

fn settings(endpoint: &str, key: &str) -> skyward_aws::Aws {
    skyward_aws::Aws {
        credentials: Some((key.to_string(), Secret::new(SECRET.into()))),
        endpoint_url: Some(endpoint.to_string()),
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

impl AwsUnderTest {
    async fn start() -> Result<Self, String> {
        let moto = Moto::start().await?;
        let server = MockServer::start(Arc::new(Ec2Front { moto: moto.url.clone() })).await.map_err(|e| e.to_string())?;
        let conf = aws_sdk_ec2::config::Builder::new()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new("direct", "direct", None, None, "test"))
            .endpoint_url(&moto.url)
            .build();
        let admin = settings(&moto.url, KEY).connect().map_err(|e| e.to_string())?;
        Ok(Self { direct: aws_sdk_ec2::Client::from_conf(conf), _moto: moto, server, admin })
    }
}

impl CloudUnderTest for AwsUnderTest {
    fn name(&self) -> &'static str {
        "aws"
    }
    fn server(&self) -> &MockServer {
        &self.server
    }
    fn key(&self) -> &str {
        KEY
    }
    fn secret(&self) -> &str {
        SECRET
    }
    fn cloud(&self, key: &str) -> Result<Box<dyn skyward_provider::machines::Cloud>, skyward_provider::ProviderError> {
        Ok(Box::new(settings(&self.server.url(), key).connect()?))
    }
    fn capacity(&self) -> Fault {
        // An instant fleet answers 200 and lists the failure.
        Fault::Respond {
            status: 200,
            body: "<CreateFleetResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>kit</requestId><fleetId>fleet-kit</fleetId>\
                   <errorSet><item><lifecycle>spot</lifecycle><errorCode>InsufficientInstanceCapacity</errorCode>\
                   <errorMessage>There is no Spot capacity available that matches your request.</errorMessage></item></errorSet>\
                   <fleetInstanceSet/></CreateFleetResponse>"
                .into(),
            retry_after: None,
        }
    }
    fn quota(&self) -> Fault {
        Fault::Respond {
            status: 400,
            body: self.error_xml("VcpuLimitExceeded", "You have requested more vCPU capacity than your current vCPU limit of 0 allows"),
            retry_after: None,
        }
    }
    fn live(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            let Ok(out) = self.direct.describe_instances().send().await else { return Vec::new() };
            out.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter(|i| {
                    !matches!(
                        i.state().and_then(|s| s.name()),
                        Some(aws_sdk_ec2::types::InstanceStateName::Terminated | aws_sdk_ec2::types::InstanceStateName::ShuttingDown)
                    )
                })
                .filter_map(|i| i.tags().iter().find(|t| t.key() == Some("Name")).and_then(|t| t.value()).map(str::to_string))
                .collect()
        })
    }
    fn plant<'a>(&'a self, name: &'a str) -> BoxFuture<'a, String> {
        Box::pin(async move {
            let mut tags = vec![aws_sdk_ec2::types::Tag::builder().key("Name").value(name).build()];
            if let Some((pool, node)) = skyward_provider::machines::parse_machine_name(name) {
                for (k, v) in [("skyward:managed", "true".to_string()), ("skyward:pool", pool), ("skyward:node", node)] {
                    tags.push(aws_sdk_ec2::types::Tag::builder().key(k).value(v).build());
                }
            }
            let spec = aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .set_tags(Some(tags))
                .build();
            let out = self
                .direct
                .run_instances()
                .image_id(AMI)
                .min_count(1)
                .max_count(1)
                .tag_specifications(spec)
                .send()
                .await
                .expect("run_instances on moto");
            out.instances()[0].instance_id().unwrap_or_default().to_string()
        })
    }
    fn preempt<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = self.direct.stop_instances().instance_ids(id).send().await;
        })
    }
    fn list_without_ids(&self) -> String {
        "<DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>kit</requestId><reservationSet><item>\
         <reservationId>r-kit</reservationId><instancesSet><item><instanceState><code>16</code><name>running</name></instanceState>\
         <tagSet><item><key>Name</key><value>skyward-sky-x-r0-g0</value></item></tagSet></item></instancesSet></item></reservationSet>\
         </DescribeInstancesResponse>"
            .into()
    }
    fn error_body(&self, message: &str) -> String {
        self.error_xml("InvalidParameterValue", message)
    }
    fn pool_resources(&self) -> BoxFuture<'_, usize> {
        Box::pin(async move { self.admin.tagged_resources().await.map(|r| r.len()).unwrap_or(usize::MAX) })
    }
}

impl AwsUnderTest {
    fn error_xml(&self, code: &str, message: &str) -> String {
        format!(
            "<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>kit</RequestID></Response>"
        )
    }
}

fn block_on<F: std::future::Future<Output = Result<(), String>>>(f: F) -> Result<(), libtest_mimic::Failed> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f).map_err(Into::into)
}

fn main() {
    let args = Arguments::from_args();
    let mut trials: Vec<Trial> = kit::CASES
        .iter()
        .map(|case| {
            Trial::test(format!("aws::{case}"), move || {
                block_on(async {
                    let t = AwsUnderTest::start().await?;
                    kit::run(case, &t).await
                })
            })
        })
        .collect();
    trials.push(Trial::test("aws::api_calls_per_start", || {
        block_on(async {
            let t = AwsUnderTest::start().await?;
            let calls = kit::calls_per_start(&t, 2).await?;
            println!("aws API calls for a 2-machine start and teardown: {calls:?}");
            // The figures in docs/providers.md.
            let want: std::collections::BTreeMap<String, usize> = [
                ("offers", 2),
                ("prices", 2),
                ("ami", 1),
                ("DescribeVpcs", 1),
                ("DescribeSubnets", 2),
                ("CreateSecurityGroup", 1),
                ("AuthorizeSecurityGroupIngress", 1),
                ("ImportKeyPair", 1),
                ("CreateLaunchTemplate", 1),
                ("create", 2),
                ("get", 4),
                ("list", 2),
                ("delete", 2),
                ("DeleteLaunchTemplate", 1),
                ("DeleteKeyPair", 1),
                ("DeleteSecurityGroup", 1),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
            if calls != want {
                return Err(format!("aws calls {calls:?}, documented {want:?}"));
            }
            Ok(())
        })
    }));
    trials.push(Trial::test("aws::spot_falls_back_to_on_demand", || {
        block_on(async {
            let t = AwsUnderTest::start().await?;
            spot_falls_back_to_on_demand(&t).await
        })
    }));
    libtest_mimic::run(&args, trials).exit();
}

/// Spot if available: a fleet without spot capacity is asked again as on-demand.
async fn spot_falls_back_to_on_demand(t: &AwsUnderTest) -> Result<(), String> {
    use skyward_provider::machines;
    let cloud = t.cloud(KEY).map_err(|e| e.to_string())?;
    let offers = cloud.offers().await.map_err(|e| e.to_string())?;
    let offer = offers.iter().find(|o| o.spot_price.is_some() && o.on_demand_price.is_some()).ok_or("no offer with both prices")?.clone();
    let pool = skyward_provider::PoolContext {
        pool_id: "sky-spotfall01".into(),
        state_dir: std::env::temp_dir().join("skyward-aws-spotfall"),
        image: None,
        placement: Some(skyward_provider::Placement {
            offer,
            spot: true,
            allocation: skyward_provider::Allocation::SpotIfAvailable,
            node_price: 1.0,
            max_hourly_cost: None,
            disk_gb: Some(50),
        }),
    };
    cloud
        .prepare(&pool, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA5QqKjCf1alAWrRjanDvfz75BbEj7eb56Eok7m/Px59 kit")
        .await
        .map_err(|e| e.to_string())?;
    t.server.inject("create", t.capacity());
    let req = machines::MachineRequest {
        name: machines::machine_name("sky-spotfall01-r0-g0"),
        node_id: "sky-spotfall01-r0-g0".into(),
        ssh_public_key: String::new(),
        instance_timeout_secs: 300,
    };
    let m = cloud.provision(&pool, &req).await.map_err(|e| format!("provision: {e}"))?;
    let creates: Vec<String> = t.server.log().into_iter().filter(|l| l.op == "create").map(|l| l.body).collect();
    if creates.len() != 2
        || !creates[0].contains("DefaultTargetCapacityType=spot")
        || !creates[1].contains("DefaultTargetCapacityType=on-demand")
    {
        return Err(format!("fleet requests: {creates:?}"));
    }
    if !creates[1].contains("price-capacity-optimized") {
        return Err("the allocation strategy was not sent".into());
    }
    let out = t.direct.describe_instances().instance_ids(&m.id).send().await.map_err(|e| e.to_string())?;
    let i = &out.reservations()[0].instances()[0];
    let tags: Vec<(String, String)> =
        i.tags().iter().map(|t| (t.key().unwrap_or_default().into(), t.value().unwrap_or_default().into())).collect();
    for want in ["Name", "skyward:pool", "skyward:node", "skyward:managed"] {
        if !tags.iter().any(|(k, _)| k == want) {
            return Err(format!("instance lacks tag {want}: {tags:?}"));
        }
    }
    machines::teardown(&*cloud, &pool, Duration::from_secs(30)).await.map_err(|e| e.to_string())
}
