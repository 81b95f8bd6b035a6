//! AWS: EC2 instances bought through EC2 Fleet (instant), one machine per request, spot with a
//! fall back to on-demand when the spec allows it; the Ubuntu AMI found through its public SSM
//! parameter; a security group, key pair and launch template per pool; tags on everything.
//!
//! Behind the `aws` feature of `skyward` (aws-sdk-ec2 costs minutes of build). The SDK's own
//! retries are off: throttling (`RequestLimitExceeded`, 429/503, `Retry-After` honoured) and
//! server errors of idempotent calls are retried here, bounded, like every other provider.
//!
//! Machines shut down by their worker (silence) or by the boot-time timer terminate, because
//! the launch template sets `InstanceInitiatedShutdownBehavior=terminate`.

pub use aws_sdk_ec2;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, FleetLaunchTemplateConfigRequest, FleetLaunchTemplateOverridesRequest,
    FleetLaunchTemplateSpecificationRequest, FleetOnDemandAllocationStrategy, FleetType, InstanceStateName, IpPermission, IpRange,
    LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest, LaunchTemplateHttpTokensState,
    LaunchTemplateIamInstanceProfileSpecificationRequest, LaunchTemplateInstanceMetadataOptionsRequest, OnDemandOptionsRequest,
    RequestLaunchTemplateData, ResourceType, ShutdownBehavior, SpotAllocationStrategy, SpotOptionsRequest, Tag, TagSpecification,
    TargetCapacitySpecificationRequest, UserIdGroupPair, VolumeType,
};
use base64::Engine;
use futures::future::BoxFuture;
use skyward_provider::machines::{
    Cloud, CloudProvider, Machine, MachineRequest, MachineSettings, MachineState, SshEndpoint, dead_man_switch,
};
use skyward_provider::offers::{Architecture, Billing, InstanceType, Offer, OfferAccelerator};
use skyward_provider::select::Allocation;
use skyward_provider::{PoolContext, ProviderError, Secret};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const NAME: &str = "aws";
const POOL_TAG: &str = "skyward:pool";
const NODE_TAG: &str = "skyward:node";
const MANAGED_TAG: &str = "skyward:managed";

/// AWS settings (the seed's parameters).
#[derive(Debug, Clone)]
pub struct Aws {
    /// Region.
    pub region: String,
    /// AMI; the Ubuntu `ubuntu_version` AMI of the offer's architecture (SSM) when `None`.
    pub ami: Option<String>,
    /// Ubuntu LTS for the resolved AMI.
    pub ubuntu_version: String,
    /// Subnet; the default VPC's subnets when `None`.
    pub subnet_id: Option<String>,
    /// Security group; one per pool (SSH in, everything within the group) when `None`.
    pub security_group_id: Option<String>,
    /// IAM instance profile for the machines.
    pub instance_profile_arn: Option<String>,
    /// SSH user; `root` (the boot script installs the pool key for it) when `None`.
    pub username: Option<String>,
    /// Coordinator silence after which a machine ends itself (armed at boot).
    pub instance_timeout: Duration,
    /// Timeout of one API request.
    pub request_timeout: Duration,
    /// EC2 Fleet spot allocation strategy.
    pub allocation_strategy: String,
    /// Leave burstable types (t2, t3, t3a, t4g) out of the offers.
    pub exclude_burstable: bool,
    /// Access key id and secret; the environment, then the shared profile, then the instance
    /// role when `None`.
    pub credentials: Option<(String, Secret<String>)>,
    /// EC2 and SSM endpoint (tests point it at an emulator).
    pub endpoint_url: Option<String>,
}

impl Default for Aws {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            ami: None,
            ubuntu_version: "24.04".into(),
            subnet_id: None,
            security_group_id: None,
            instance_profile_arn: None,
            username: None,
            instance_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
            allocation_strategy: "price-capacity-optimized".into(),
            exclude_burstable: false,
            credentials: None,
            endpoint_url: None,
        }
    }
}

const STRATEGIES: [&str; 5] =
    ["price-capacity-optimized", "capacity-optimized", "lowest-price", "diversified", "capacity-optimized-prioritized"];

fn invalid(message: String) -> ProviderError {
    ProviderError::Invalid { provider: NAME, message }
}

impl Aws {
    /// Check the settings and build the clients (no call is made).
    pub fn connect(self) -> Result<AwsCloud, ProviderError> {
        if self.region.is_empty()
            || !self.region.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            || !self.region.contains('-')
        {
            return Err(invalid(format!("region {:?} is not an AWS region name (hint: \"us-east-1\")", self.region)));
        }
        if !STRATEGIES.contains(&self.allocation_strategy.as_str()) {
            return Err(invalid(format!("allocation_strategy {:?} is not one of {}", self.allocation_strategy, STRATEGIES.join(", "))));
        }
        if !matches!(self.ubuntu_version.as_str(), "22.04" | "24.04") {
            return Err(invalid(format!("ubuntu_version {:?} is not 22.04 or 24.04", self.ubuntu_version)));
        }
        if let Some(ami) = &self.ami
            && !ami.starts_with("ami-")
        {
            return Err(invalid(format!("ami {ami:?} is not an AMI id (ami-...)")));
        }
        let (credentials, secret) = match &self.credentials {
            Some((key, secret)) => {
                for (what, v) in [("access key id", key.as_str()), ("secret access key", secret.expose().as_str())] {
                    if v.trim().is_empty() {
                        return Err(ProviderError::Auth {
                            provider: NAME,
                            message: format!("the {what} is empty (hint: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"),
                        });
                    }
                    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(ProviderError::Auth {
                            provider: NAME,
                            message: format!("the {what} is malformed: it contains whitespace or control characters"),
                        });
                    }
                }
                let c = aws_sdk_ec2::config::Credentials::new(key, secret.expose(), None, None, "skyward");
                (aws_sdk_ec2::config::SharedCredentialsProvider::new(c), Some((key.clone(), secret.clone())))
            }
            None => {
                let chain = aws_config::meta::credentials::CredentialsProviderChain::first_try(
                    "Environment",
                    aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
                )
                .or_else("Profile", aws_config::profile::ProfileFileCredentialsProvider::builder().build())
                .or_else("InstanceRole", aws_config::imds::credentials::ImdsCredentialsProvider::builder().build());
                (aws_sdk_ec2::config::SharedCredentialsProvider::new(chain), None)
            }
        };
        let region = aws_sdk_ec2::config::Region::new(self.region.clone());
        let timeouts = aws_sdk_ec2::config::timeout::TimeoutConfig::builder().operation_timeout(self.request_timeout).build();
        let mut ec2 = aws_sdk_ec2::config::Builder::new()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(region.clone())
            .credentials_provider(credentials.clone())
            .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
            .timeout_config(timeouts.clone());
        let mut ssm = aws_sdk_ssm::config::Builder::new()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .region(region)
            .credentials_provider(credentials)
            .retry_config(aws_sdk_ssm::config::retry::RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(url) = &self.endpoint_url {
            ec2 = ec2.endpoint_url(url);
            ssm = ssm.endpoint_url(url);
        }
        Ok(AwsCloud {
            ec2: aws_sdk_ec2::Client::from_conf(ec2.build()),
            ssm: aws_sdk_ssm::Client::from_conf(ssm.build()),
            secret,
            config: self,
            pools: Mutex::new(HashMap::new()),
            created: Mutex::new(HashMap::new()),
        })
    }

    /// The provider: these API clients plus SSH bootstrap of each machine.
    pub fn provider(self) -> Result<CloudProvider, ProviderError> {
        let settings = MachineSettings { instance_timeout: self.instance_timeout, ..MachineSettings::default() };
        Ok(CloudProvider::new(self.connect()?, settings))
    }
}

/// What `prepare` made for a pool (removed by `cleanup`).
#[derive(Debug, Clone, Default)]
struct PoolResources {
    template_id: Option<String>,
    key_name: Option<String>,
    group_id: Option<String>,
    created_group: bool,
    subnets: Vec<String>,
}

/// The AWS API half.
pub struct AwsCloud {
    config: Aws,
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
    /// Explicit credentials, scrubbed from every message.
    secret: Option<(String, Secret<String>)>,
    pools: Mutex<HashMap<String, PoolResources>>,
    /// Instances created lately: EC2 is eventually consistent, so "not found" just after the
    /// fleet answered means "not visible yet".
    created: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for AwsCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCloud").field("region", &self.config.region).field("endpoint", &self.config.endpoint_url).finish_non_exhaustive()
    }
}

/// The error kinds EC2 answers with, as fallback sees them.
fn classify(code: &str) -> Option<fn(String) -> ProviderError> {
    Some(match code {
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "MissingAuthenticationToken"
        | "ExpiredToken"
        | "UnrecognizedClientException" => |m| ProviderError::Auth {
            provider: NAME,
            message: format!("{m} (hint: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile)"),
        },
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "Unsupported"
        | "UnfulfillableCapacity"
        | "MaxSpotFleetRequestCountExceeded" => |m| ProviderError::NoCapacity { provider: NAME, message: m },
        "VcpuLimitExceeded" | "MaxSpotInstanceCountExceeded" | "InstanceLimitExceeded" | "PendingVerification" => {
            |m| ProviderError::Quota { provider: NAME, message: m }
        }
        "SpotMaxPriceTooLow" => |m| ProviderError::PriceCap { provider: NAME, message: m },
        "InvalidParameterValue"
        | "InvalidParameterCombination"
        | "InvalidAMIID.NotFound"
        | "InvalidAMIID.Malformed"
        | "InvalidSubnetID.NotFound"
        | "InvalidGroup.NotFound"
        | "ParameterNotFound"
        | "ValidationError" => |m| ProviderError::Invalid { provider: NAME, message: m },
        _ => return None,
    })
}

fn throttled(code: &str, status: Option<u16>) -> bool {
    matches!(code, "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "TooManyRequestsException") || status == Some(429)
}

impl AwsCloud {
    fn scrub(&self, text: String) -> String {
        match &self.secret {
            Some((key, secret)) => text.replace(secret.expose().as_str(), "<redacted>").replace(key.as_str(), "<redacted>"),
            None => text,
        }
    }

    /// Run one API call with the provider's retry policy: throttling waits (`Retry-After` when
    /// given), server errors of idempotent calls retry, everything else is typed.
    async fn call<T, E, F, Fut>(&self, operation: &'static str, idempotent: bool, f: F) -> Result<T, ProviderError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let started = Instant::now();
            let e = match f().await {
                Ok(v) => {
                    tracing::debug!(provider = NAME, operation, elapsed = ?started.elapsed(), "api call");
                    return Ok(v);
                }
                Err(e) => e,
            };
            let status = e.raw_response().map(|r| r.status().as_u16());
            let retry_after =
                e.raw_response().and_then(|r| r.headers().get("retry-after")).and_then(skyward_provider::http::parse_retry_after);
            let code = e.code().unwrap_or_default().to_string();
            let message = self.scrub(match e.message() {
                Some(m) => format!("{operation}: {code}: {m}"),
                None => format!("{operation}: {}", aws_sdk_ec2::error::DisplayErrorContext(&e)),
            });
            tracing::debug!(provider = NAME, operation, ?status, code = %code, attempt, "api call failed");
            if throttled(&code, status) {
                if attempt <= 4 {
                    let wait = retry_after.unwrap_or_else(|| backoff(attempt)).min(Duration::from_secs(30));
                    tracing::info!(provider = NAME, operation, ?wait, "throttled; waiting");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                return Err(ProviderError::RateLimited {
                    provider: NAME,
                    operation,
                    message: format!("after {attempt} attempts: {message}"),
                });
            }
            if let Some(make) = classify(&code) {
                return Err(make(message));
            }
            if matches!(status, Some(401 | 403)) {
                return Err(ProviderError::Auth {
                    provider: NAME,
                    message: format!("{message} (hint: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"),
                });
            }
            if matches!(e, aws_sdk_ec2::error::SdkError::ResponseError(_)) || (status.is_some_and(|s| s < 300) && e.code().is_none()) {
                return Err(ProviderError::Failed { provider: NAME, operation, message: format!("malformed response: {message}") });
            }
            let server = status.is_none_or(|s| s >= 500);
            if server && idempotent && attempt <= 4 {
                tokio::time::sleep(retry_after.unwrap_or_else(|| backoff(attempt)).min(Duration::from_secs(30))).await;
                continue;
            }
            if status.is_none() && message.to_ascii_lowercase().contains("credential") {
                return Err(ProviderError::Auth {
                    provider: NAME,
                    message: format!("{message} (hint: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or configure a profile)"),
                });
            }
            return Err(ProviderError::Failed { provider: NAME, operation, message });
        }
    }

    fn tags(pairs: &[(&str, &str)]) -> Vec<Tag> {
        pairs.iter().map(|(k, v)| Tag::builder().key(*k).value(*v).build()).collect()
    }

    fn tag_spec(resource: ResourceType, pairs: &[(&str, &str)]) -> TagSpecification {
        TagSpecification::builder().resource_type(resource).set_tags(Some(Self::tags(pairs))).build()
    }

    async fn resolve_ami(&self, arch: Architecture) -> Result<String, ProviderError> {
        if let Some(ami) = &self.config.ami {
            return Ok(ami.clone());
        }
        let arch = match arch {
            Architecture::X86_64 => "amd64",
            Architecture::Arm64 => "arm64",
        };
        let disk = if self.config.ubuntu_version.as_str() >= "24.04" { "ebs-gp3" } else { "ebs-gp2" };
        let name = format!("/aws/service/canonical/ubuntu/server/{}/stable/current/{arch}/hvm/{disk}/ami-id", self.config.ubuntu_version);
        let out = self.call("resolving the AMI", true, || self.ssm.get_parameter().name(&name).send()).await?;
        out.parameter()
            .and_then(|p| p.value())
            .map(str::to_string)
            .ok_or_else(|| skyward_provider::http::malformed(NAME, "GetParameter response", "Parameter.Value", "missing"))
    }

    async fn subnets(&self) -> Result<Vec<String>, ProviderError> {
        if let Some(s) = &self.config.subnet_id {
            return Ok(vec![s.clone()]);
        }
        let filter = aws_sdk_ec2::types::Filter::builder().name("is-default").values("true").build();
        let vpcs = self.call("finding the default VPC", true, || self.ec2.describe_vpcs().filters(filter.clone()).send()).await?;
        let vpc = vpcs.vpcs().first().and_then(|v| v.vpc_id()).map(str::to_string).ok_or_else(|| {
            invalid(format!(
                "region {} has no default VPC (hint: set subnet_id to a subnet with a route to the internet)",
                self.config.region
            ))
        })?;
        let filter = aws_sdk_ec2::types::Filter::builder().name("vpc-id").values(&vpc).build();
        let subnets = self.call("listing subnets", true, || self.ec2.describe_subnets().filters(filter.clone()).send()).await?;
        let ids: Vec<String> = subnets.subnets().iter().filter_map(|s| s.subnet_id()).map(str::to_string).collect();
        if ids.is_empty() {
            return Err(invalid(format!("the default VPC {vpc} has no subnet (hint: set subnet_id)")));
        }
        Ok(ids)
    }

    async fn vpc_of(&self, subnet: &str) -> Result<Option<String>, ProviderError> {
        let out = self.call("reading the subnet", true, || self.ec2.describe_subnets().subnet_ids(subnet).send()).await?;
        Ok(out.subnets().first().and_then(|s| s.vpc_id()).map(str::to_string))
    }

    fn user_data(&self, instance_timeout: u64) -> String {
        // The pool key is installed for the login user by EC2; copy it to root so the worker can
        // power the machine off, and arm the timer that ends a machine no worker ever owned.
        let script = format!(
            "#!/bin/bash\n{}\nfor h in /home/*/.ssh/authorized_keys; do [ -f \"$h\" ] && mkdir -p /root/.ssh && cp \"$h\" /root/.ssh/authorized_keys; done\n\
             chmod 700 /root/.ssh; chmod 600 /root/.ssh/authorized_keys\n\
             sed -i 's/^#\\?PermitRootLogin.*/PermitRootLogin prohibit-password/' /etc/ssh/sshd_config && (systemctl reload ssh || systemctl reload sshd || true)\n",
            dead_man_switch(instance_timeout)
        );
        base64::engine::general_purpose::STANDARD.encode(script)
    }

    fn machine(&self, i: &aws_sdk_ec2::types::Instance) -> Result<Machine, ProviderError> {
        let id = i.instance_id().ok_or_else(|| skyward_provider::http::malformed(NAME, "instance", "instanceId", "missing"))?.to_string();
        let tag = |k: &str| i.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value()).map(str::to_string);
        // The public address when the subnet gives one; else the private one (a coordinator
        // inside the VPC reaches it; one outside fails to connect, with the address named).
        let address = i.public_ip_address().or(i.private_ip_address()).map(str::to_string);
        let user = self.config.username.clone().unwrap_or_else(|| "root".into());
        let state = match i.state().and_then(|s| s.name()) {
            Some(InstanceStateName::Running) if address.is_some() => MachineState::Running,
            Some(InstanceStateName::Stopping | InstanceStateName::Stopped) => MachineState::Stopped,
            Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated) => MachineState::Gone,
            _ => MachineState::Pending,
        };
        Ok(Machine {
            id,
            name: tag("Name").unwrap_or_default(),
            state,
            ssh: address.map(|host| SshEndpoint { host, port: 22, user }),
            private_ip: i.private_ip_address().map(str::to_string),
        })
    }

    async fn describe(&self, filters: Vec<aws_sdk_ec2::types::Filter>) -> Result<Vec<Machine>, ProviderError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call("listing instances", true, || {
                    self.ec2.describe_instances().set_filters(Some(filters.clone())).set_next_token(token.clone()).send()
                })
                .await?;
            for r in page.reservations() {
                for i in r.instances() {
                    out.push(self.machine(i)?);
                }
            }
            token = page.next_token().filter(|t| !t.is_empty()).map(str::to_string);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    async fn fleet(&self, pool: &PoolContext, request: &MachineRequest, res: &PoolResources, spot: bool) -> Result<String, ProviderError> {
        let placement = pool.placement.as_ref().ok_or_else(|| invalid("no offer was chosen for this pool".into()))?;
        let template = res.template_id.clone().ok_or_else(|| invalid(format!("pool {} was not prepared", pool.pool_id)))?;
        let instance_type = aws_sdk_ec2::types::InstanceType::from(placement.offer.instance_type.name.as_str());
        let overrides: Vec<FleetLaunchTemplateOverridesRequest> = res
            .subnets
            .iter()
            .map(|s| FleetLaunchTemplateOverridesRequest::builder().instance_type(instance_type.clone()).subnet_id(s).build())
            .collect();
        let config = FleetLaunchTemplateConfigRequest::builder()
            .launch_template_specification(
                FleetLaunchTemplateSpecificationRequest::builder().launch_template_id(&template).version("$Latest").build(),
            )
            .set_overrides(Some(overrides))
            .build();
        let capacity = TargetCapacitySpecificationRequest::builder()
            .total_target_capacity(1)
            .default_target_capacity_type(if spot { DefaultTargetCapacityType::Spot } else { DefaultTargetCapacityType::OnDemand })
            .build();
        let tags = [
            ("Name", request.name.as_str()),
            (POOL_TAG, pool.pool_id.as_str()),
            (NODE_TAG, request.node_id.as_str()),
            (MANAGED_TAG, "true"),
        ];
        let out = self
            .call("creating a fleet", false, || {
                self.ec2
                    .create_fleet()
                    .r#type(FleetType::Instant)
                    .launch_template_configs(config.clone())
                    .target_capacity_specification(capacity.clone())
                    .spot_options(
                        SpotOptionsRequest::builder()
                            .allocation_strategy(SpotAllocationStrategy::from(self.config.allocation_strategy.as_str()))
                            .build(),
                    )
                    .on_demand_options(
                        OnDemandOptionsRequest::builder().allocation_strategy(FleetOnDemandAllocationStrategy::LowestPrice).build(),
                    )
                    .tag_specifications(Self::tag_spec(ResourceType::Instance, &tags))
                    .tag_specifications(Self::tag_spec(ResourceType::Volume, &tags))
                    .send()
            })
            .await?;
        if let Some(id) = out.instances().iter().flat_map(|i| i.instance_ids()).next() {
            self.created.lock().expect("aws created").insert(id.clone(), Instant::now());
            return Ok(id.clone());
        }
        // An instant fleet reports capacity and quota problems as errors in a 200 answer.
        let first = out.errors().first();
        let code = first.and_then(|e| e.error_code()).unwrap_or("NoInstances").to_string();
        let message = self.scrub(format!(
            "creating a fleet: {code}: {}",
            first.and_then(|e| e.error_message()).unwrap_or("the fleet launched no instance")
        ));
        Err(match classify(&code) {
            Some(make) => make(message),
            None => ProviderError::NoCapacity { provider: NAME, message },
        })
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.min(6)))
}

/// Approximate us-east-1 on-demand list prices (USD per hour) of common accelerator types; the
/// catalog has no price API call (the Pricing API is another service and region). Types not
/// listed carry only their spot price.
const ON_DEMAND: &[(&str, f64)] = &[
    ("p5.48xlarge", 98.32),
    ("p5e.48xlarge", 108.0),
    ("p4d.24xlarge", 32.77),
    ("p4de.24xlarge", 40.97),
    ("p3.2xlarge", 3.06),
    ("p3.8xlarge", 12.24),
    ("p3.16xlarge", 24.48),
    ("p3dn.24xlarge", 31.21),
    ("g6.xlarge", 0.805),
    ("g6.2xlarge", 0.978),
    ("g6.4xlarge", 1.323),
    ("g6.8xlarge", 2.014),
    ("g6.12xlarge", 4.602),
    ("g6.16xlarge", 3.397),
    ("g6.24xlarge", 6.675),
    ("g6.48xlarge", 13.35),
    ("g6e.xlarge", 1.861),
    ("g6e.2xlarge", 2.242),
    ("g6e.4xlarge", 3.004),
    ("g6e.8xlarge", 4.529),
    ("g6e.12xlarge", 10.493),
    ("g6e.16xlarge", 7.577),
    ("g6e.24xlarge", 15.066),
    ("g6e.48xlarge", 30.131),
    ("g5.xlarge", 1.006),
    ("g5.2xlarge", 1.212),
    ("g5.4xlarge", 1.624),
    ("g5.8xlarge", 2.448),
    ("g5.12xlarge", 5.672),
    ("g5.16xlarge", 4.096),
    ("g5.24xlarge", 8.144),
    ("g5.48xlarge", 16.288),
    ("g5g.xlarge", 0.42),
    ("g5g.2xlarge", 0.556),
    ("g4dn.xlarge", 0.526),
    ("g4dn.2xlarge", 0.752),
    ("g4dn.4xlarge", 1.204),
    ("g4dn.8xlarge", 2.176),
    ("g4dn.12xlarge", 3.912),
    ("g4dn.16xlarge", 4.352),
    ("trn1.2xlarge", 1.3438),
    ("trn1.32xlarge", 21.50),
    ("inf2.xlarge", 0.7582),
    ("inf2.8xlarge", 1.9679),
    ("inf2.24xlarge", 6.4906),
    ("inf2.48xlarge", 12.9813),
    ("inf1.xlarge", 0.228),
    ("inf1.2xlarge", 0.362),
    ("inf1.6xlarge", 1.18),
    ("inf1.24xlarge", 4.721),
];

fn accelerator_of(t: &aws_sdk_ec2::types::InstanceTypeInfo) -> Option<OfferAccelerator> {
    if let Some(g) = t.gpu_info().and_then(|g| g.gpus().first()) {
        let mib = g.memory_info().and_then(|m| m.size_in_mib()).map(|m| m as f64 / 1024.0);
        // Fractional GPUs (g6f) report a count of 0 and the share as the partition size.
        let count = match g.count()? {
            0 => g.gpu_partition_size().filter(|p| *p > 0.0 && *p < 1.0)?,
            n => n as f64,
        };
        return OfferAccelerator::from_provider(g.name()?, mib, count);
    }
    if let Some(n) = t.neuron_info().and_then(|n| n.neuron_devices().first()) {
        let mib = n.memory_info().and_then(|m| m.size_in_mib()).map(|m| m as f64 / 1024.0);
        return OfferAccelerator::from_provider(n.name()?, mib, n.count()? as f64);
    }
    if let Some(a) = t.inference_accelerator_info().and_then(|i| i.accelerators().first()) {
        let mib = a.memory_info().and_then(|m| m.size_in_mib()).map(|m| m as f64 / 1024.0);
        return OfferAccelerator::from_provider(a.name()?, mib, a.count()? as f64);
    }
    None
}

impl Cloud for AwsCloud {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cluster_by_default(&self) -> bool {
        true
    }

    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ProviderError>> {
        Box::pin(async move {
            let families = aws_sdk_ec2::types::Filter::builder()
                .name("instance-type")
                .set_values(Some(["p*", "g*", "trn*", "inf*", "dl*"].map(String::from).to_vec()))
                .build();
            let mut infos = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let page = self
                    .call("listing instance types", true, || {
                        self.ec2.describe_instance_types().filters(families.clone()).max_results(100).set_next_token(token.clone()).send()
                    })
                    .await?;
                infos.extend(page.instance_types().iter().cloned());
                token = page.next_token().filter(|t| !t.is_empty()).map(str::to_string);
                if token.is_none() {
                    break;
                }
            }
            let burstable = |n: &str| ["t2.", "t3.", "t3a.", "t4g."].iter().any(|p| n.starts_with(p));
            let mut shapes = Vec::new();
            for t in &infos {
                let Some(name) = t.instance_type().map(|n| n.as_str().to_string()) else { continue };
                if self.config.exclude_burstable && burstable(&name) {
                    continue;
                }
                let Some(acc) = accelerator_of(t) else { continue };
                let arch = if t.processor_info().is_some_and(|p| p.supported_architectures().iter().any(|a| a.as_str() == "x86_64")) {
                    Architecture::X86_64
                } else {
                    Architecture::Arm64
                };
                shapes.push(InstanceType {
                    name,
                    accelerator: Some(acc),
                    vcpus: t.v_cpu_info().and_then(|v| v.default_v_cpus()).unwrap_or(0) as f64,
                    memory_gb: t.memory_info().and_then(|m| m.size_in_mib()).unwrap_or(0) as f64 / 1024.0,
                    architecture: arch,
                });
            }
            // Latest spot price per type (the lowest across zones).
            let mut spot: HashMap<String, f64> = HashMap::new();
            let types: Vec<aws_sdk_ec2::types::InstanceType> =
                shapes.iter().map(|s| aws_sdk_ec2::types::InstanceType::from(s.name.as_str())).collect();
            let mut token: Option<String> = None;
            for chunk in types.chunks(100) {
                loop {
                    let page = self
                        .call("reading spot prices", true, || {
                            self.ec2
                                .describe_spot_price_history()
                                .product_descriptions("Linux/UNIX")
                                .set_instance_types(Some(chunk.to_vec()))
                                .start_time(aws_sdk_ec2::primitives::DateTime::from(std::time::SystemTime::now()))
                                .set_next_token(token.clone())
                                .send()
                        })
                        .await?;
                    for p in page.spot_price_history() {
                        if let (Some(t), Some(price)) = (p.instance_type(), p.spot_price().and_then(|s| s.parse::<f64>().ok())) {
                            let e = spot.entry(t.as_str().to_string()).or_insert(price);
                            *e = e.min(price);
                        }
                    }
                    token = page.next_token().filter(|t| !t.is_empty()).map(str::to_string);
                    if token.is_none() {
                        break;
                    }
                }
            }
            Ok(shapes
                .into_iter()
                .filter_map(|it| {
                    let od = ON_DEMAND.iter().find(|(n, _)| *n == it.name).map(|(_, p)| *p);
                    let sp = spot.get(&it.name).copied().filter(|p| *p > 0.0);
                    (od.is_some() || sp.is_some()).then(|| Offer {
                        id: format!("{}:{}", self.config.region, it.name),
                        provider: NAME.into(),
                        region: self.config.region.clone(),
                        instance_type: it,
                        spot_price: sp,
                        on_demand_price: od,
                        billing: Billing::Second,
                        specific: serde_json::Value::Null,
                    })
                })
                .collect())
        })
    }

    fn offer_cache_key(&self) -> String {
        format!("aws-{}-b{}", self.config.region, self.config.exclude_burstable)
    }

    fn prepare<'a>(&'a self, pool: &'a PoolContext, ssh_public_key: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let placement = pool.placement.as_ref().ok_or_else(|| invalid("no offer was chosen for this pool".into()))?;
            let ami = self.resolve_ami(placement.offer.instance_type.architecture).await?;
            let subnets = self.subnets().await?;
            let mut res = PoolResources { subnets: subnets.clone(), ..Default::default() };
            let pool_tags: [(&str, String); 3] =
                [("Name", format!("skyward-{}", pool.pool_id)), (POOL_TAG, pool.pool_id.clone()), (MANAGED_TAG, "true".into())];
            let pool_tags: Vec<(&str, &str)> = pool_tags.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let result = async {
                res.group_id = match &self.config.security_group_id {
                    Some(g) => Some(g.clone()),
                    None => {
                        let vpc = self.vpc_of(&subnets[0]).await?;
                        let name = format!("skyward-{}", pool.pool_id);
                        let out = self
                            .call("creating the security group", false, || {
                                self.ec2
                                    .create_security_group()
                                    .group_name(&name)
                                    .description("Skyward pool: SSH in, everything between the pool's machines")
                                    .set_vpc_id(vpc.clone())
                                    .tag_specifications(Self::tag_spec(ResourceType::SecurityGroup, &pool_tags))
                                    .send()
                            })
                            .await?;
                        let id = out
                            .group_id()
                            .map(str::to_string)
                            .ok_or_else(|| skyward_provider::http::malformed(NAME, "CreateSecurityGroup", "groupId", "missing"))?;
                        res.group_id = Some(id.clone());
                        res.created_group = true;
                        let ssh = IpPermission::builder()
                            .ip_protocol("tcp")
                            .from_port(22)
                            .to_port(22)
                            .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").description("SSH").build())
                            .build();
                        let pool_peers = IpPermission::builder()
                            .ip_protocol("-1")
                            .user_id_group_pairs(UserIdGroupPair::builder().group_id(&id).build())
                            .build();
                        self.call("opening SSH and the pool's own traffic", false, || {
                            self.ec2
                                .authorize_security_group_ingress()
                                .group_id(&id)
                                .ip_permissions(ssh.clone())
                                .ip_permissions(pool_peers.clone())
                                .send()
                        })
                        .await?;
                        Some(id)
                    }
                };
                let key_name = format!("skyward-{}", pool.pool_id);
                self.call("importing the pool key", false, || {
                    self.ec2
                        .import_key_pair()
                        .key_name(&key_name)
                        .public_key_material(aws_sdk_ec2::primitives::Blob::new(ssh_public_key.trim().as_bytes()))
                        .tag_specifications(Self::tag_spec(ResourceType::KeyPair, &pool_tags))
                        .send()
                })
                .await?;
                res.key_name = Some(key_name.clone());
                let disk = placement.disk_gb.unwrap_or(100) as i32;
                let mut data = RequestLaunchTemplateData::builder()
                    .image_id(&ami)
                    .key_name(&key_name)
                    .set_security_group_ids(res.group_id.clone().map(|g| vec![g]))
                    .user_data(self.user_data(self.config.instance_timeout.as_secs().max(60)))
                    .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
                    .block_device_mappings(
                        LaunchTemplateBlockDeviceMappingRequest::builder()
                            .device_name("/dev/sda1")
                            .ebs(
                                LaunchTemplateEbsBlockDeviceRequest::builder()
                                    .volume_size(disk)
                                    .volume_type(VolumeType::Gp3)
                                    .delete_on_termination(true)
                                    .build(),
                            )
                            .build(),
                    )
                    .metadata_options(
                        LaunchTemplateInstanceMetadataOptionsRequest::builder()
                            .http_tokens(LaunchTemplateHttpTokensState::Required)
                            .build(),
                    );
                if let Some(arn) = &self.config.instance_profile_arn {
                    data = data.iam_instance_profile(LaunchTemplateIamInstanceProfileSpecificationRequest::builder().arn(arn).build());
                }
                let data = data.build();
                let out = self
                    .call("creating the launch template", false, || {
                        self.ec2
                            .create_launch_template()
                            .launch_template_name(format!("skyward-{}", pool.pool_id))
                            .launch_template_data(data.clone())
                            .tag_specifications(Self::tag_spec(ResourceType::LaunchTemplate, &pool_tags))
                            .send()
                    })
                    .await?;
                res.template_id = out.launch_template().and_then(|t| t.launch_template_id()).map(str::to_string);
                if res.template_id.is_none() {
                    return Err(skyward_provider::http::malformed(NAME, "CreateLaunchTemplate", "launchTemplateId", "missing"));
                }
                Ok(())
            }
            .await;
            // Record what exists even when a later step failed, so cleanup removes it.
            self.pools.lock().expect("aws pools").insert(pool.pool_id.clone(), res);
            result
        })
    }

    fn provision<'a>(&'a self, pool: &'a PoolContext, request: &'a MachineRequest) -> BoxFuture<'a, Result<Machine, ProviderError>> {
        Box::pin(async move {
            let res = self
                .pools
                .lock()
                .expect("aws pools")
                .get(&pool.pool_id)
                .cloned()
                .ok_or_else(|| invalid(format!("pool {} was not prepared", pool.pool_id)))?;
            let placement = pool.placement.as_ref().ok_or_else(|| invalid("no offer was chosen for this pool".into()))?;
            let first = self.fleet(pool, request, &res, placement.spot).await;
            let id = match first {
                Ok(id) => id,
                // A create that failed on the server's side may still have launched the machine:
                // adopt it by its name tag rather than leak it.
                Err(e @ (ProviderError::Failed { .. } | ProviderError::RateLimited { .. })) => {
                    let f = aws_sdk_ec2::types::Filter::builder().name("tag:Name").values(&request.name).build();
                    let alive = aws_sdk_ec2::types::Filter::builder()
                        .name("instance-state-name")
                        .set_values(Some(vec!["pending".into(), "running".into()]))
                        .build();
                    match self.describe(vec![f, alive]).await {
                        Ok(found) if !found.is_empty() => {
                            tracing::warn!(instance = %found[0].id, error = %e, "aws: create reported an error but the instance exists; using it");
                            return Ok(found.into_iter().next().expect("one"));
                        }
                        _ => return Err(e),
                    }
                }
                // Spot if available: no spot capacity buys on-demand.
                Err(ProviderError::NoCapacity { message, .. })
                    if placement.spot
                        && placement.allocation == Allocation::SpotIfAvailable
                        && placement.offer.on_demand_price.is_some() =>
                {
                    tracing::info!(provider = NAME, %message, "no spot capacity; asking for on-demand");
                    self.fleet(pool, request, &res, false).await?
                }
                Err(e) => return Err(e),
            };
            Ok(Machine { id, name: request.name.clone(), state: MachineState::Pending, ssh: None, private_ip: None })
        })
    }

    fn get_instance<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Machine>, ProviderError>> {
        Box::pin(async move {
            match self.call("reading an instance", true, || self.ec2.describe_instances().instance_ids(id).send()).await {
                Ok(out) => Ok(out.reservations().iter().flat_map(|r| r.instances()).next().map(|i| self.machine(i)).transpose()?),
                Err(ProviderError::Failed { message, .. }) if message.contains("InvalidInstanceID.NotFound") => {
                    let recent = self.created.lock().expect("aws created").get(id).is_some_and(|t| t.elapsed() < Duration::from_secs(60));
                    Ok(recent.then(|| Machine {
                        id: id.to_string(),
                        name: String::new(),
                        state: MachineState::Pending,
                        ssh: None,
                        private_ip: None,
                    }))
                }
                Err(e) => Err(e),
            }
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            match self.call("terminating an instance", true, || self.ec2.terminate_instances().instance_ids(id).send()).await {
                Ok(_) => Ok(()),
                Err(ProviderError::Failed { message, .. }) if message.contains("InvalidInstanceID.NotFound") => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn list_tagged<'a>(&'a self, pool_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Machine>, ProviderError>> {
        Box::pin(async move {
            let f = |name: &str, values: &[&str]| {
                aws_sdk_ec2::types::Filter::builder().name(name).set_values(Some(values.iter().map(|v| v.to_string()).collect())).build()
            };
            let mut filters = vec![
                f(&format!("tag:{MANAGED_TAG}"), &["true"]),
                f("instance-state-name", &["pending", "running", "stopping", "stopped", "shutting-down"]),
            ];
            if let Some(p) = pool_id {
                filters.push(f(&format!("tag:{POOL_TAG}"), &[p]));
            }
            let machines = self.describe(filters).await?;
            Ok(machines.into_iter().filter(|m| m.tags().is_some_and(|(p, _)| pool_id.is_none_or(|w| w == p))).collect())
        })
    }

    fn cleanup<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let res = self.pools.lock().expect("aws pools").remove(&pool.pool_id).unwrap_or_default();
            let mut first_error = None;
            if let Some(t) = &res.template_id
                && let Err(e) =
                    self.call("deleting the launch template", true, || self.ec2.delete_launch_template().launch_template_id(t).send()).await
            {
                first_error.get_or_insert(e);
            }
            if let Some(k) = &res.key_name
                && let Err(e) = self.call("deleting the key pair", true, || self.ec2.delete_key_pair().key_name(k).send()).await
            {
                first_error.get_or_insert(e);
            }
            if let (Some(g), true) = (&res.group_id, res.created_group) {
                // A group is in use until its instances are gone: retry for a while.
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    match self.call("deleting the security group", true, || self.ec2.delete_security_group().group_id(g).send()).await {
                        Ok(_) => break,
                        Err(e) if e.to_string().contains("DependencyViolation") && Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_secs(5)).await
                        }
                        Err(e) => {
                            first_error.get_or_insert(e);
                            break;
                        }
                    }
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }
}

impl AwsCloud {
    /// Names of the security groups, key pairs and launch templates tagged with any pool.
    pub async fn tagged_resources(&self) -> Result<Vec<String>, ProviderError> {
        let f = aws_sdk_ec2::types::Filter::builder().name(format!("tag:{MANAGED_TAG}")).values("true").build();
        let mut names = HashSet::new();
        let groups = self.call("listing security groups", true, || self.ec2.describe_security_groups().filters(f.clone()).send()).await?;
        names.extend(groups.security_groups().iter().filter_map(|g| g.group_name()).map(|n| format!("sg:{n}")));
        let keys = self.call("listing key pairs", true, || self.ec2.describe_key_pairs().filters(f.clone()).send()).await?;
        names.extend(keys.key_pairs().iter().filter_map(|k| k.key_name()).map(|n| format!("key:{n}")));
        let templates =
            self.call("listing launch templates", true, || self.ec2.describe_launch_templates().filters(f.clone()).send()).await?;
        names.extend(templates.launch_templates().iter().filter_map(|t| t.launch_template_name()).map(|n| format!("lt:{n}")));
        let mut v: Vec<String> = names.into_iter().collect();
        v.sort();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_name_the_field() {
        let e = Aws { region: "Mars".into(), ..Default::default() }.connect().unwrap_err().to_string();
        assert!(e.contains("aws") && e.contains("region \"Mars\"") && e.contains("hint"), "{e}");
        let e = Aws { allocation_strategy: "random".into(), ..Default::default() }.connect().unwrap_err().to_string();
        assert!(e.contains("allocation_strategy"), "{e}");
        let e = Aws { ami: Some("ubuntu".into()), ..Default::default() }.connect().unwrap_err().to_string();
        assert!(e.contains("ami"), "{e}");
        let e = Aws { credentials: Some(("AKIA".into(), Secret::new("sec ret".into()))), ..Default::default() }
            .connect()
            .unwrap_err()
            .to_string();
        assert!(e.contains("malformed") && !e.contains("sec ret"), "{e}");
    }

    #[test]
    fn error_codes_are_typed() {
        assert!(matches!(classify("InsufficientInstanceCapacity").unwrap()("x".into()), ProviderError::NoCapacity { .. }));
        assert!(matches!(classify("VcpuLimitExceeded").unwrap()("x".into()), ProviderError::Quota { .. }));
        assert!(matches!(classify("AuthFailure").unwrap()("x".into()), ProviderError::Auth { .. }));
        assert!(matches!(classify("SpotMaxPriceTooLow").unwrap()("x".into()), ProviderError::PriceCap { .. }));
        assert!(classify("InternalError").is_none());
        assert!(throttled("RequestLimitExceeded", Some(503)) && throttled("", Some(429)) && !throttled("", Some(500)));
    }
}
