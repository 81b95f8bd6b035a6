//! Offers: what a provider sells (an instance type in a region at a spot and/or on-demand
//! price), and the on-disk cache that keeps provider catalogs between runs.
//!
//! Offers are normalised when a provider builds them: the accelerator name is the catalog's
//! (`catalog::normalize`), prices are USD per node-hour, memory is GB. Selection never parses a
//! provider's spelling.

use crate::catalog::{self, FormFactor, Vendor};
use crate::{Provider, ProviderError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// CPU architecture of an instance type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Architecture {
    /// x86-64.
    X86_64,
    /// 64-bit ARM.
    Arm64,
}

impl Architecture {
    /// Parse `x86_64`/`amd64`/`arm64`/`aarch64` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "x86_64" | "x86-64" | "amd64" | "x64" => Some(Self::X86_64),
            "arm64" | "aarch64" => Some(Self::Arm64),
            _ => None,
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::X86_64 => "x86_64",
            Self::Arm64 => "arm64",
        })
    }
}

/// The unit a provider bills in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Billing {
    /// Per second.
    Second,
    /// Per minute.
    Minute,
    /// Per hour (a started hour is paid in full).
    Hour,
}

/// The accelerators of an instance type, normalised onto the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferAccelerator {
    /// Catalog name ("H100", "RTX 4090").
    pub name: String,
    /// Memory per device, GB.
    pub memory_gb: u32,
    /// Devices per node; fractional for shared GPUs (Vultr vGPU).
    pub count: f64,
    /// Vendor.
    pub vendor: Vendor,
    /// Form factor (SXM, PCIe, ...).
    pub form: FormFactor,
}

impl OfferAccelerator {
    /// Normalise a provider's GPU name: `None` when the catalog does not know it (the offer is
    /// then dropped by the provider, with a debug log, rather than guessed).
    pub fn from_provider(raw: &str, vram_gb: Option<f64>, count: f64) -> Option<Self> {
        let n = catalog::normalize(raw, vram_gb)?;
        Some(Self { name: n.spec.name.to_string(), memory_gb: n.spec.memory_gb, count, vendor: n.spec.vendor, form: n.form })
    }
}

/// A machine shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceType {
    /// The provider's name for it (`p5.48xlarge`, `NVIDIA H100 80GB HBM3`, an ask id).
    pub name: String,
    /// Accelerators, if any.
    pub accelerator: Option<OfferAccelerator>,
    /// Virtual CPUs.
    pub vcpus: f64,
    /// Memory, GB.
    pub memory_gb: f64,
    /// CPU architecture.
    pub architecture: Architecture,
}

/// One purchasable configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Unique within the provider's catalog.
    pub id: String,
    /// Provider name (`aws`, `runpod`, ...).
    pub provider: String,
    /// Region, zone or data center; empty when the provider places machines itself.
    pub region: String,
    /// Machine shape.
    pub instance_type: InstanceType,
    /// Spot (interruptible) price per node-hour, USD; `None` when not sold as spot.
    pub spot_price: Option<f64>,
    /// On-demand price per node-hour, USD; `None` when not sold on demand.
    pub on_demand_price: Option<f64>,
    /// Billing unit.
    pub billing: Billing,
    /// Provider-specific data the provider needs to buy it (ids, cloud type).
    #[serde(default, with = "json_text")]
    pub specific: serde_json::Value,
}

impl Offer {
    /// An offer for machines that cost nothing (local processes, containers).
    pub fn free(provider: &str, instance_type: &str, vcpus: f64, memory_gb: f64) -> Self {
        Self {
            id: instance_type.to_string(),
            provider: provider.to_string(),
            region: "local".into(),
            instance_type: InstanceType {
                name: instance_type.to_string(),
                accelerator: None,
                vcpus,
                memory_gb,
                architecture: if cfg!(target_arch = "aarch64") { Architecture::Arm64 } else { Architecture::X86_64 },
            },
            spot_price: None,
            on_demand_price: Some(0.0),
            billing: Billing::Second,
            specific: serde_json::Value::Null,
        }
    }

    /// A one-line description: `runpod H100 x1 (NVIDIA H100 80GB HBM3) in EU-RO-1`.
    pub fn describe(&self) -> String {
        let what = match &self.instance_type.accelerator {
            Some(a) => format!("{} x{} ({})", a.name, fmt_count(a.count), self.instance_type.name),
            None => self.instance_type.name.clone(),
        };
        if self.region.is_empty() { format!("{} {what}", self.provider) } else { format!("{} {what} in {}", self.provider, self.region) }
    }
}

/// The one free offer of a provider that runs nodes on this machine: its CPUs and memory.
pub fn this_machine(provider: &str, instance_type: &str) -> Offer {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    let memory_gb = if pages > 0 && page > 0 { (pages as f64 * page as f64) / (1u64 << 30) as f64 } else { 0.0 };
    Offer::free(provider, instance_type, cpus, (memory_gb * 10.0).round() / 10.0)
}

/// `4` for 4.0, `0.25` for 0.25.
pub(crate) fn fmt_count(c: f64) -> String {
    if c.fract() == 0.0 { format!("{c:.0}") } else { format!("{c}") }
}

/// How fresh a provider's cached catalog is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Fetched from the provider just now.
    Fetched,
    /// Read from the cache, this old.
    Cached(Duration),
}

/// `specific` travels as JSON text, so that compact non-self-describing formats (the cache's
/// postcard) can carry it.
mod json_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &serde_json::Value, s: S) -> Result<S::Ok, S::Error> {
        if v.is_null() { s.serialize_str("") } else { s.serialize_str(&v.to_string()) }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<serde_json::Value, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() { Ok(serde_json::Value::Null) } else { serde_json::from_str(&text).map_err(serde::de::Error::custom) }
    }
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    /// Bumped when `Offer` changes shape: an older file is then a miss.
    version: u32,
    fetched_at_unix: u64,
    offers: Vec<Offer>,
}

#[derive(Serialize)]
struct CacheFileRef<'a> {
    version: u32,
    fetched_at_unix: u64,
    offers: &'a [Offer],
}

const CACHE_VERSION: u32 = 1;

/// Provider catalogs on disk, one postcard file per provider configuration, each with the TTL its
/// provider asks for (`Provider::offer_ttl`: marketplaces minutes, clouds a day).
#[derive(Debug, Clone)]
pub struct OfferCache {
    dir: PathBuf,
}

impl OfferCache {
    /// A cache in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `$SKYWARD_HOME/offers` (`~/.skyward/offers`).
    pub fn default_location() -> Self {
        Self::new(crate::local::skyward_home().join("offers"))
    }

    /// Where the catalog for `key` is kept.
    pub fn path(&self, key: &str) -> PathBuf {
        let safe: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        self.dir.join(format!("{safe}.offers"))
    }

    /// The cached catalog for `key` if it is younger than `ttl`. A missing, stale or unreadable
    /// file is a miss (an unreadable one is logged).
    pub fn load(&self, key: &str, ttl: Duration) -> Option<(Vec<Offer>, Duration)> {
        let path = self.path(key);
        let bytes = std::fs::read(&path).ok()?;
        let file = match postcard::from_bytes::<CacheFile>(&bytes) {
            Ok(f) if f.version == CACHE_VERSION => f,
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable offer cache file");
                return None;
            }
        };
        let age = now_unix().saturating_sub(file.fetched_at_unix);
        let age = Duration::from_secs(age);
        (age < ttl).then_some((file.offers, age))
    }

    /// Replace the cached catalog for `key` (written to a temporary file, then renamed, so a
    /// reader never sees half a file).
    pub fn store(&self, key: &str, offers: &[Offer]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(key);
        let tmp = path.with_extension(format!("offers.{}.tmp", std::process::id()));
        let file = CacheFileRef { version: CACHE_VERSION, fetched_at_unix: now_unix(), offers };
        let body = postcard::to_allocvec(&file).map_err(std::io::Error::other)?;
        write_file(&tmp, &body)?;
        std::fs::rename(&tmp, &path)
    }

    /// The provider's catalog: from the cache while fresh (unless `refresh`), else fetched and
    /// stored. A cache that cannot be written is logged, not fatal.
    pub async fn offers(&self, provider: &dyn Provider, refresh: bool) -> Result<(Vec<Offer>, Freshness), ProviderError> {
        let key = provider.offer_cache_key();
        let ttl = provider.offer_ttl();
        if !refresh && let Some((offers, age)) = self.load(&key, ttl) {
            return Ok((offers, Freshness::Cached(age)));
        }
        let offers = provider.offers().await?;
        // A zero TTL: a catalog computed locally (this machine), never worth a file.
        if !ttl.is_zero()
            && let Err(e) = self.store(&key, &offers)
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the offer cache");
        }
        Ok((offers, Freshness::Fetched))
    }
}

fn write_file(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(body)?;
    f.sync_all()
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(id: &str) -> Offer {
        let mut o = Offer::free("test", id, 8.0, 32.0);
        o.on_demand_price = Some(1.5);
        o
    }

    #[test]
    fn cache_round_trip_and_ttl() {
        let dir = std::env::temp_dir().join(format!("skyward-offer-cache-{}", uuid_like()));
        let cache = OfferCache::new(&dir);
        assert!(cache.load("test", Duration::from_secs(60)).is_none());
        cache.store("test", &[offer("a"), offer("b")]).unwrap();
        let (back, age) = cache.load("test", Duration::from_secs(60)).unwrap();
        assert_eq!(back, vec![offer("a"), offer("b")]);
        assert!(age < Duration::from_secs(5));
        // A zero TTL means always stale.
        assert!(cache.load("test", Duration::ZERO).is_none());
        // A corrupt file is a miss, not an error.
        std::fs::write(cache.path("test"), b"\xff\xff\xff not an offer file").unwrap();
        assert!(cache.load("test", Duration::from_secs(60)).is_none());
        // Keys are made safe as file names.
        assert!(cache.path("vastai/geo=US?x").file_name().unwrap().to_str().unwrap().starts_with("vastai_geo_US_x"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn uuid_like() -> String {
        format!("{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "")
    }

    #[test]
    fn describe_names_provider_accelerator_and_region() {
        let mut o = offer("g");
        o.provider = "runpod".into();
        o.region = "EU-RO-1".into();
        o.instance_type.accelerator = OfferAccelerator::from_provider("NVIDIA H100 80GB HBM3", Some(80.0), 2.0);
        assert_eq!(o.describe(), "runpod H100 x2 (g) in EU-RO-1");
    }
}
