//! The accelerator catalog: every GPU, TPU and AI ASIC Skyward knows, as data.
//!
//! Providers report the same device under many spellings ("NVIDIA H100 80GB HBM3", "H100 SXM",
//! "nvidia-h100-80gb", "H100-80G-SXM5"). [`normalize`] maps such a raw name, and the VRAM the
//! provider reports, onto one [`AcceleratorSpec`] (one memory variant of one model) plus the form
//! factor the name states. Users ask for accelerators with [`Accelerator::parse`] or the typed
//! constructors in [`accelerators`].
//!
//! Matching works on a key: the name lower-cased, split on anything that is not a letter or a
//! digit, with vendor words (nvidia, tesla, geforce, amd, instinct, ...), form words (sxm4, pcie,
//! ...), memory sizes (80gb, 80g, "80 GB") and filler words (hbm3, generation, mega, ...)
//! removed, and the rest joined without separators. Form and size are recorded on the way. Keys
//! are computed once for every catalog name and alias; an unknown key gives `None`, never a guess.

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

/// Who makes an accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Vendor {
    /// NVIDIA.
    Nvidia,
    /// AMD.
    Amd,
    /// Amazon Web Services (Trainium, Inferentia).
    Aws,
    /// Habana Labs, an Intel company (Gaudi).
    Habana,
    /// Google (TPU).
    Google,
    /// Intel (Data Center GPU Max).
    Intel,
}

/// How an accelerator is packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum FormFactor {
    /// NVIDIA SXM module on an HGX/DGX baseboard.
    Sxm,
    /// PCIe card.
    Pcie,
    /// NVL: a PCIe card sold in NVLink-bridged pairs (H100 NVL, H200 NVL).
    Nvl,
    /// OCP Accelerator Module (AMD Instinct, Intel Max).
    Oam,
    /// Consumer (GeForce, Radeon RX) card.
    Consumer,
    /// Workstation (RTX Ax000, RTX Ada, RTX PRO, Quadro) card.
    Workstation,
    /// CPU and GPU on one board or package (GH200, GB200, MI300A).
    Superchip,
    /// A custom chip: Trainium, Inferentia, Gaudi, TPU.
    Asic,
}

impl FormFactor {
    /// Short display name ("SXM", "PCIe", "NVL", ...); [`Accelerator::parse`] reads it back.
    pub fn as_str(self) -> &'static str {
        match self {
            FormFactor::Sxm => "SXM",
            FormFactor::Pcie => "PCIe",
            FormFactor::Nvl => "NVL",
            FormFactor::Oam => "OAM",
            FormFactor::Consumer => "Consumer",
            FormFactor::Workstation => "Workstation",
            FormFactor::Superchip => "Superchip",
            FormFactor::Asic => "ASIC",
        }
    }
}

impl fmt::Display for FormFactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Vendor::Nvidia => "NVIDIA",
            Vendor::Amd => "AMD",
            Vendor::Aws => "AWS",
            Vendor::Habana => "Habana",
            Vendor::Google => "Google",
            Vendor::Intel => "Intel",
        })
    }
}

/// One catalog entry: one memory variant of one accelerator model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AcceleratorSpec {
    /// Canonical display name of the model, shared by all its memory variants ("H100", "RTX 4090").
    pub name: &'static str,
    /// Who makes it.
    pub vendor: Vendor,
    /// Memory per device, in GB.
    pub memory_gb: u32,
    /// Oldest and newest CUDA versions that support it; `None` for non-NVIDIA devices.
    pub cuda: Option<(&'static str, &'static str)>,
    /// Typical form factor of this entry.
    pub form: FormFactor,
    /// Other spellings providers report (any case; matching is normalised).
    pub aliases: &'static [&'static str],
}

// CUDA ranges by architecture: the first toolkit with the compute capability, the last that
// still builds for it (CUDA 12.0 dropped Kepler, CUDA 13.0 dropped Maxwell, Pascal and Volta).
const KEPLER: (&str, &str) = ("6.5", "11.4");
const MAXWELL: (&str, &str) = ("7.5", "12.9");
const PASCAL: (&str, &str) = ("8.0", "12.9");
const VOLTA: (&str, &str) = ("9.0", "12.9");
const TURING: (&str, &str) = ("10.0", "13.0");
const AMPERE_GA100: (&str, &str) = ("11.0", "13.0");
const AMPERE: (&str, &str) = ("11.1", "13.0");
const ADA: (&str, &str) = ("11.8", "13.0");
const HOPPER: (&str, &str) = ("11.8", "13.0");
const HOPPER_LATE: (&str, &str) = ("12.0", "13.0");
const BLACKWELL: (&str, &str) = ("12.8", "13.0");
const BLACKWELL_ULTRA: (&str, &str) = ("12.9", "13.0");

const fn nv(
    name: &'static str,
    memory_gb: u32,
    cuda: (&'static str, &'static str),
    form: FormFactor,
    aliases: &'static [&'static str],
) -> AcceleratorSpec {
    AcceleratorSpec { name, vendor: Vendor::Nvidia, memory_gb, cuda: Some(cuda), form, aliases }
}

const fn dev(vendor: Vendor, name: &'static str, memory_gb: u32, form: FormFactor, aliases: &'static [&'static str]) -> AcceleratorSpec {
    AcceleratorSpec { name, vendor, memory_gb, cuda: None, form, aliases }
}

use FormFactor::{Asic, Consumer, Nvl, Oam, Pcie, Superchip, Sxm, Workstation};
use Vendor::{Amd, Aws, Google, Habana, Intel};

/// Every known accelerator, one entry per memory variant. The first variant of a model is its
/// default.
pub static CATALOG: &[AcceleratorSpec] = &[
    // NVIDIA data centre.
    nv(
        "B300",
        288,
        BLACKWELL_ULTRA,
        Sxm,
        &["NVIDIA B300", "NVIDIA B300 SXM6 AC", "B300 SXM6", "HGX B300", "nvidia-b300", "Blackwell Ultra"],
    ),
    nv("GB300", 288, BLACKWELL_ULTRA, Superchip, &["NVIDIA GB300", "GB300 NVL72", "nvidia-gb300"]),
    nv("B200", 180, BLACKWELL, Sxm, &["NVIDIA B200", "nvidia-b200", "B200 SXM6", "HGX B200", "DGX B200", "B200 192GB"]),
    nv(
        "GB200",
        186,
        BLACKWELL,
        Superchip,
        &["NVIDIA GB200", "GB200 NVL72", "GB200 NVL4", "nvidia-gb200", "GB200 Grace Blackwell Superchip"],
    ),
    nv(
        "GH200",
        96,
        HOPPER_LATE,
        Superchip,
        &["NVIDIA GH200 480GB", "GH200 Grace Hopper Superchip", "GH200 SXM", "nvidia-gh200", "GH200 96GB"],
    ),
    nv("GH200", 144, HOPPER_LATE, Superchip, &["NVIDIA GH200 144G HBM3e", "GH200 144GB"]),
    nv(
        "H200",
        141,
        HOPPER_LATE,
        Sxm,
        &["NVIDIA H200", "H200 SXM", "H200 SXM5", "H200 NVL", "NVIDIA H200 NVL", "nvidia-h200-141gb", "HGX H200", "H200 141GB HBM3e"],
    ),
    nv(
        "H100",
        80,
        HOPPER,
        Sxm,
        &[
            "NVIDIA H100 80GB HBM3",
            "NVIDIA H100 PCIe",
            "H100 SXM",
            "H100 SXM5",
            "H100 PCIE",
            "H100-80G-PCIe",
            "H100-80G-PCIe-NVLink",
            "H100-80G-SXM5",
            "nvidia-h100-80gb",
            "nvidia-h100-mega-80gb",
            "NVIDIA_H100",
            "HGX H100",
            "H100 80GB",
        ],
    ),
    nv("H100", 94, HOPPER, Nvl, &["H100 NVL", "NVIDIA H100 NVL", "H100-NVL", "H100 NVL 94GB"]),
    nv("H800", 80, HOPPER, Sxm, &["NVIDIA H800", "H800 SXM5", "H800 PCIe"]),
    nv("H20", 96, HOPPER_LATE, Sxm, &["NVIDIA H20", "HGX H20"]),
    nv(
        "A100",
        40,
        AMPERE_GA100,
        Sxm,
        &[
            "NVIDIA A100-SXM4-40GB",
            "NVIDIA A100-PCIE-40GB",
            "nvidia-tesla-a100",
            "A100 SXM4",
            "A100 PCIE",
            "A100-40GB",
            "a100_pcie_40gb",
            "NVIDIA_A100",
        ],
    ),
    nv(
        "A100",
        80,
        AMPERE_GA100,
        Sxm,
        &[
            "NVIDIA A100-SXM4-80GB",
            "NVIDIA A100 80GB PCIe",
            "nvidia-a100-80gb",
            "A100-80G-PCIe",
            "A100-80G-PCIe-NVLink",
            "A100 SXM4 80GB",
            "A100-80GB",
            "A100X",
        ],
    ),
    nv("A800", 40, AMPERE_GA100, Pcie, &["NVIDIA A800 40GB Active", "NVIDIA A800-PCIE-40GB"]),
    nv("A800", 80, AMPERE_GA100, Sxm, &["NVIDIA A800-SXM4-80GB", "NVIDIA A800 80GB PCIe"]),
    nv("A40", 48, AMPERE, Pcie, &["NVIDIA A40", "NVIDIA_A40"]),
    nv("A30", 24, AMPERE_GA100, Pcie, &["NVIDIA A30", "NVIDIA_A30"]),
    nv("A16", 16, AMPERE, Pcie, &["NVIDIA A16", "NVIDIA_A16"]),
    nv("A10", 24, AMPERE, Pcie, &["NVIDIA A10", "A10 PCIe", "NVIDIA_A10"]),
    nv("A10G", 24, AMPERE, Pcie, &["NVIDIA A10G"]),
    nv("A2", 16, AMPERE, Pcie, &["NVIDIA A2"]),
    nv("L40S", 48, ADA, Pcie, &["NVIDIA L40S", "NVIDIA_L40S", "L40S-48G"]),
    nv("L40", 48, ADA, Pcie, &["NVIDIA L40", "NVIDIA_L40", "L40-48G"]),
    nv("L20", 48, ADA, Pcie, &["NVIDIA L20"]),
    nv("L4", 24, ADA, Pcie, &["NVIDIA L4", "nvidia-l4", "NVIDIA_L4"]),
    nv("T4", 16, TURING, Pcie, &["Tesla T4", "nvidia-tesla-t4", "NVIDIA T4"]),
    nv("T4G", 16, TURING, Pcie, &["NVIDIA T4G", "T4g"]),
    nv(
        "V100",
        16,
        VOLTA,
        Sxm,
        &["Tesla V100-SXM2-16GB", "Tesla V100-PCIE-16GB", "Tesla V100-FHHL-16GB", "Tesla V100", "nvidia-tesla-v100", "V100 SXM2"],
    ),
    nv("V100", 32, VOLTA, Sxm, &["Tesla V100-SXM2-32GB", "Tesla V100-PCIE-32GB", "Tesla V100-SXM3-32GB", "Tesla V100S-PCIE-32GB", "V100S"]),
    nv("P100", 16, PASCAL, Pcie, &["Tesla P100-PCIE-16GB", "Tesla P100-SXM2-16GB", "Tesla P100", "nvidia-tesla-p100"]),
    nv("P100", 12, PASCAL, Pcie, &["Tesla P100-PCIE-12GB"]),
    nv("P40", 24, PASCAL, Pcie, &["Tesla P40"]),
    nv("P4", 8, PASCAL, Pcie, &["Tesla P4", "nvidia-tesla-p4"]),
    nv("M60", 8, MAXWELL, Pcie, &["Tesla M60"]),
    nv("K80", 12, KEPLER, Pcie, &["Tesla K80", "nvidia-tesla-k80"]),
    // NVIDIA workstation.
    nv(
        "RTX PRO 6000",
        96,
        BLACKWELL,
        Workstation,
        &[
            "RTX PRO 6000 Blackwell",
            "NVIDIA RTX PRO 6000 Blackwell Server Edition",
            "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
            "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition",
            "RTX PRO 6000 S",
            "RTX PRO 6000 WS",
            "RTX PRO 6000 Blackwell 96GB",
            "nvidia-rtx-pro-6000",
        ],
    ),
    nv(
        "RTX 6000 Ada",
        48,
        ADA,
        Workstation,
        &["NVIDIA RTX 6000 Ada Generation", "RTX 6000Ada", "RTX 6000 Ada Generation", "RTX6000 Ada", "6000 Ada"],
    ),
    nv("RTX 5000 Ada", 32, ADA, Workstation, &["NVIDIA RTX 5000 Ada Generation", "RTX 5000Ada"]),
    nv(
        "RTX 4000 Ada",
        20,
        ADA,
        Workstation,
        &["NVIDIA RTX 4000 Ada Generation", "RTX 4000Ada", "NVIDIA RTX 4000 SFF Ada Generation", "RTX 4000 SFF Ada", "RTX 4000SFF Ada"],
    ),
    nv("RTX 2000 Ada", 16, ADA, Workstation, &["NVIDIA RTX 2000 Ada Generation", "RTX 2000Ada"]),
    nv("RTX A6000", 48, AMPERE, Workstation, &["NVIDIA RTX A6000", "RTX-A6000", "A6000"]),
    nv("RTX A5000", 24, AMPERE, Workstation, &["NVIDIA RTX A5000", "RTX-A5000", "A5000"]),
    nv("RTX A4500", 20, AMPERE, Workstation, &["NVIDIA RTX A4500", "A4500"]),
    nv("RTX A4000", 16, AMPERE, Workstation, &["NVIDIA RTX A4000", "RTX-A4000", "A4000"]),
    nv("RTX A2000", 6, AMPERE, Workstation, &["NVIDIA RTX A2000", "A2000"]),
    nv("RTX A2000", 12, AMPERE, Workstation, &["NVIDIA RTX A2000 12GB"]),
    nv("Quadro RTX 8000", 48, TURING, Workstation, &["Q RTX 8000", "RTX 8000", "Quadro RTX 8000"]),
    nv("Quadro RTX 6000", 24, TURING, Workstation, &["Q RTX 6000", "RTX 6000", "Quadro RTX 6000"]),
    // NVIDIA consumer.
    nv("RTX 5090", 32, BLACKWELL, Consumer, &["NVIDIA GeForce RTX 5090"]),
    nv("RTX 5080", 16, BLACKWELL, Consumer, &["NVIDIA GeForce RTX 5080"]),
    nv("RTX 5070 Ti", 16, BLACKWELL, Consumer, &["NVIDIA GeForce RTX 5070 Ti"]),
    nv("RTX 5070", 12, BLACKWELL, Consumer, &["NVIDIA GeForce RTX 5070"]),
    nv("RTX 4090", 24, ADA, Consumer, &["NVIDIA GeForce RTX 4090"]),
    nv("RTX 4080", 16, ADA, Consumer, &["NVIDIA GeForce RTX 4080", "RTX 4080 SUPER", "NVIDIA GeForce RTX 4080 SUPER"]),
    nv("RTX 4070 Ti Super", 16, ADA, Consumer, &["NVIDIA GeForce RTX 4070 Ti SUPER"]),
    nv("RTX 4070 Ti", 12, ADA, Consumer, &["NVIDIA GeForce RTX 4070 Ti"]),
    nv("RTX 4070", 12, ADA, Consumer, &["NVIDIA GeForce RTX 4070", "RTX 4070 SUPER", "NVIDIA GeForce RTX 4070 SUPER"]),
    nv("RTX 4060 Ti", 8, ADA, Consumer, &["NVIDIA GeForce RTX 4060 Ti"]),
    nv("RTX 4060 Ti", 16, ADA, Consumer, &["NVIDIA GeForce RTX 4060 Ti 16GB"]),
    nv("RTX 4060", 8, ADA, Consumer, &["NVIDIA GeForce RTX 4060"]),
    nv("RTX 3090 Ti", 24, AMPERE, Consumer, &["NVIDIA GeForce RTX 3090 Ti"]),
    nv("RTX 3090", 24, AMPERE, Consumer, &["NVIDIA GeForce RTX 3090"]),
    nv("RTX 3080 Ti", 12, AMPERE, Consumer, &["NVIDIA GeForce RTX 3080 Ti"]),
    nv("RTX 3080", 10, AMPERE, Consumer, &["NVIDIA GeForce RTX 3080"]),
    nv("RTX 3080", 12, AMPERE, Consumer, &["NVIDIA GeForce RTX 3080 12GB"]),
    nv("RTX 3070 Ti", 8, AMPERE, Consumer, &["NVIDIA GeForce RTX 3070 Ti"]),
    nv("RTX 3070", 8, AMPERE, Consumer, &["NVIDIA GeForce RTX 3070"]),
    nv("RTX 3060 Ti", 8, AMPERE, Consumer, &["NVIDIA GeForce RTX 3060 Ti"]),
    nv("RTX 3060", 12, AMPERE, Consumer, &["NVIDIA GeForce RTX 3060"]),
    nv("RTX 3060", 8, AMPERE, Consumer, &["NVIDIA GeForce RTX 3060 8GB"]),
    nv("RTX 2080 Ti", 11, TURING, Consumer, &["NVIDIA GeForce RTX 2080 Ti"]),
    nv("Titan RTX", 24, TURING, Consumer, &["NVIDIA TITAN RTX"]),
    nv("Titan V", 12, VOLTA, Consumer, &["NVIDIA TITAN V"]),
    nv("GTX 1080 Ti", 11, PASCAL, Consumer, &["NVIDIA GeForce GTX 1080 Ti"]),
    // AMD.
    dev(Amd, "MI355X", 288, Oam, &["AMD Instinct MI355X", "AMD_MI355X"]),
    dev(Amd, "MI350X", 288, Oam, &["AMD Instinct MI350X"]),
    dev(Amd, "MI325X", 256, Oam, &["AMD Instinct MI325X", "AMD_MI325X"]),
    dev(Amd, "MI300X", 192, Oam, &["AMD Instinct MI300X", "AMD Instinct MI300X OAM", "AMD_MI300X", "MI300X OAM"]),
    dev(Amd, "MI300A", 128, Superchip, &["AMD Instinct MI300A"]),
    dev(Amd, "MI250X", 128, Oam, &["AMD Instinct MI250X", "AMD Instinct MI250X/MI250"]),
    dev(Amd, "MI250", 128, Oam, &["AMD Instinct MI250"]),
    dev(Amd, "MI210", 64, Pcie, &["AMD Instinct MI210"]),
    dev(Amd, "MI100", 32, Pcie, &["AMD Instinct MI100"]),
    dev(Amd, "Radeon Pro V520", 8, Pcie, &["AMD Radeon Pro V520"]),
    dev(Amd, "Radeon PRO W7900", 48, Workstation, &["AMD Radeon PRO W7900"]),
    dev(Amd, "Radeon RX 7900 XTX", 24, Consumer, &["AMD Radeon RX 7900 XTX"]),
    // AWS.
    dev(Aws, "Trainium", 32, Asic, &["AWS Trainium", "Trainium1", "trn1", "trn1n"]),
    dev(Aws, "Trainium2", 96, Asic, &["AWS Trainium2", "trn2"]),
    dev(Aws, "Trainium3", 144, Asic, &["AWS Trainium3", "trn3"]),
    dev(Aws, "Inferentia", 8, Asic, &["AWS Inferentia", "Inferentia1", "inf1"]),
    dev(Aws, "Inferentia2", 32, Asic, &["AWS Inferentia2", "inf2"]),
    // Habana.
    dev(Habana, "Gaudi", 32, Asic, &["Gaudi HL-205", "HL-205", "Habana Gaudi", "Gaudi1"]),
    dev(Habana, "Gaudi 2", 96, Asic, &["Gaudi2", "HL-225", "HL-225H", "Intel Gaudi 2", "Habana Gaudi2"]),
    dev(Habana, "Gaudi 3", 128, Asic, &["Gaudi3", "HL-325", "HL-325L", "Intel Gaudi 3"]),
    // Google TPU (memory per chip).
    dev(Google, "TPU v7", 192, Asic, &["TPU7x", "tpu-v7", "Ironwood", "v7"]),
    dev(Google, "TPU v6e", 32, Asic, &["v6e", "tpu-v6e-slice", "Trillium", "TPU v6 lite"]),
    dev(Google, "TPU v5p", 95, Asic, &["v5p", "tpu-v5p-slice"]),
    dev(Google, "TPU v5e", 16, Asic, &["v5e", "v5litepod", "tpu-v5-lite-podslice", "tpu-v5-lite-device", "TPU v5 lite"]),
    dev(Google, "TPU v4", 32, Asic, &["v4", "tpu-v4-podslice"]),
    dev(Google, "TPU v3", 32, Asic, &["v3", "tpu-v3-device", "tpu-v3-slice"]),
    // Intel.
    dev(Intel, "Max 1550", 128, Oam, &["Intel Data Center GPU Max 1550", "GPU Max 1550"]),
    dev(Intel, "Max 1100", 48, Pcie, &["Intel Data Center GPU Max 1100", "GPU Max 1100"]),
];

/// Whether a token is a vendor or brand word, or a word that says nothing about which model it
/// is: both are removed from keys wherever they appear. "Quadro" and its "Q" abbreviation are
/// safe to drop: Quadro RTX 6000 keeps the key "rtx6000", which neither "RTX 6000 Ada"
/// ("rtx6000ada") nor "RTX PRO 6000" ("rtxpro6000") shares.
fn ignored_word(token: &str) -> bool {
    matches!(
        token,
        // Vendors and brands.
        "nvidia" | "geforce" | "tesla" | "amd" | "instinct" | "radeon" | "google" | "aws" | "amazon" | "habana" | "intel" | "quadro" | "q"
        // Memory technology and filler.
        | "hbm" | "hbm2" | "hbm2e" | "hbm3" | "hbm3e" | "gddr6" | "gddr6x" | "gddr7" | "generation" | "gen" | "mega" | "nvlink" | "gpu"
        | "tensor" | "core" | "accelerator"
    )
}

/// A form word's form factor.
fn form_word(token: &str) -> Option<FormFactor> {
    Some(match token {
        "sxm" | "sxm2" | "sxm3" | "sxm4" | "sxm5" | "sxm6" | "hgx" | "dgx" => Sxm,
        "pcie" | "fhhl" => Pcie,
        "oam" => Oam,
        "superchip" => Superchip,
        "workstation" => Workstation,
        "consumer" => Consumer,
        "asic" => Asic,
        _ => return None,
    })
}

/// A memory token's size in GB: "80gb", "80g", "80gib".
fn memory_token(token: &str) -> Option<u32> {
    let digits = token.strip_suffix("gib").or_else(|| token.strip_suffix("gb")).or_else(|| token.strip_suffix('g'))?;
    all_digits(digits).then(|| digits.parse().ok()).flatten()
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// What a name says, taken apart.
#[derive(Debug, Default)]
struct Analysis {
    /// Remaining tokens joined, "nvl" included.
    key: String,
    /// The same without "nvl" tokens, when there were any.
    key_without_nvl: Option<String>,
    /// Byte length of the last token of `key` when it is all digits (a TPU slice size), else 0.
    trailing_digits: usize,
    /// The first memory size in the name.
    size: Option<u32>,
    /// The form factor the name states ("nvl" wins over the others).
    form: Option<FormFactor>,
}

fn analyse(raw: &str) -> Analysis {
    let lower = if raw.is_ascii() { raw.to_ascii_lowercase() } else { raw.to_lowercase() };
    let mut tokens = lower.split(|c: char| !c.is_alphanumeric()).filter(|t| !t.is_empty()).peekable();
    let mut a = Analysis { key: String::with_capacity(lower.len()), ..Analysis::default() };
    // Where "nvl" tokens sit in `key`, to build the key without them only when it is needed.
    let mut nvl_at: Vec<usize> = Vec::new();
    while let Some(token) = tokens.next() {
        if ignored_word(token) {
            continue;
        }
        if let Some(gb) = memory_token(token) {
            a.size.get_or_insert(gb);
            continue;
        }
        if all_digits(token) && matches!(tokens.peek(), Some(&("gb" | "gib"))) {
            tokens.next();
            if let Ok(gb) = token.parse() {
                a.size.get_or_insert(gb);
            }
            continue;
        }
        if token == "pci" {
            if matches!(tokens.peek(), Some(&("e" | "express"))) {
                tokens.next();
            }
            a.form.get_or_insert(Pcie);
            continue;
        }
        if token == "nvl" {
            a.form = Some(Nvl);
            nvl_at.push(a.key.len());
            a.key.push_str(token);
            a.trailing_digits = 0;
            continue;
        }
        // Rack-scale system names ("GB200 NVL72") say nothing about the device.
        if token.strip_prefix("nvl").is_some_and(all_digits) {
            continue;
        }
        if let Some(form) = form_word(token) {
            a.form.get_or_insert(form);
            continue;
        }
        a.key.push_str(token);
        a.trailing_digits = if all_digits(token) { token.len() } else { 0 };
    }
    if !nvl_at.is_empty() {
        let mut without = a.key.clone();
        for &at in nvl_at.iter().rev() {
            without.replace_range(at..at + 3, "");
        }
        a.key_without_nvl = Some(without);
    }
    a
}

/// Catalog indices by key, in catalog order, from every entry's name and aliases.
static KEYS: LazyLock<HashMap<String, Vec<usize>>> = LazyLock::new(|| {
    let mut keys: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, spec) in CATALOG.iter().enumerate() {
        for name in std::iter::once(spec.name).chain(spec.aliases.iter().copied()) {
            let list = keys.entry(analyse(name).key).or_default();
            if list.last() != Some(&i) {
                list.push(i);
            }
        }
    }
    keys
});

/// The entries a name may mean, and the form to prefer among them.
#[derive(Debug, Clone, Copy)]
struct Candidates {
    indices: &'static [usize],
    prefer: Option<FormFactor>,
}

impl Candidates {
    fn iter(self) -> impl Iterator<Item = &'static AcceleratorSpec> {
        let prefer = self.prefer.filter(|f| self.indices.iter().any(|&i| CATALOG[i].form == *f));
        self.indices.iter().map(|&i| &CATALOG[i]).filter(move |s| prefer.is_none_or(|f| s.form == f))
    }

    fn first(self) -> &'static AcceleratorSpec {
        self.iter().next().expect("keys map to at least one entry")
    }
}

fn resolve(a: &Analysis) -> Option<Candidates> {
    let keys = &*KEYS;
    if a.key.is_empty() {
        return None;
    }
    if let Some(list) = keys.get(&a.key) {
        return Some(Candidates { indices: list, prefer: None });
    }
    // "X NVL" where only "X" is known: the NVL variant of X if there is one.
    if let Some(list) = a.key_without_nvl.as_ref().and_then(|k| keys.get(k)) {
        return Some(Candidates { indices: list, prefer: Some(Nvl) });
    }
    // TPU slice names carry a chip count: "v5litepod-8", "v4-32".
    if a.trailing_digits > 0 && a.trailing_digits < a.key.len() {
        let list = keys.get(&a.key[..a.key.len() - a.trailing_digits])?;
        if list.iter().all(|&i| CATALOG[i].vendor == Google) {
            return Some(Candidates { indices: list, prefer: None });
        }
    }
    None
}

fn closest(c: Candidates, gb: f64) -> &'static AcceleratorSpec {
    c.iter()
        .min_by(|x, y| (f64::from(x.memory_gb) - gb).abs().total_cmp(&(f64::from(y.memory_gb) - gb).abs()))
        .expect("keys map to at least one entry")
}

fn all_variants(name: &str) -> Vec<&'static AcceleratorSpec> {
    CATALOG.iter().filter(|s| s.name == name).collect()
}

/// Every entry (memory variant) of the model `name` (matched after normalisation, aliases
/// included), in catalog order. Sizes and forms in `name` are ignored; empty when unknown.
pub fn variants(name: &str) -> Vec<&'static AcceleratorSpec> {
    resolve(&analyse(name)).map(|c| all_variants(c.first().name)).unwrap_or_default()
}

/// Result of normalising a provider's GPU name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalized {
    /// The catalog entry (model and memory variant).
    pub spec: &'static AcceleratorSpec,
    /// The form factor the name states, else the entry's.
    pub form: FormFactor,
}

/// Map a provider's raw GPU name (and the VRAM it reports in GB, if any) onto the catalog.
///
/// Picks the memory variant from a size in the name ("A100-80GB", "A100 SXM4 40GB",
/// "a100_pcie_40gb") first, when one variant is within 15% of it (so "GH200 480GB", which names
/// its CPU memory, does not count), else from `vram_gb` (closest variant), else the model's
/// default (its first variant in catalog order). `form` comes from the name when it says so
/// (SXM/SXM4/SXM5 -> Sxm, PCIe -> Pcie, NVL -> Nvl), else the entry's form. `None` for names
/// not in the catalog.
pub fn normalize(raw: &str, vram_gb: Option<f64>) -> Option<Normalized> {
    let a = analyse(raw);
    let c = resolve(&a)?;
    let by_name = a.size.and_then(|gb| {
        let spec = closest(c, f64::from(gb));
        (u64::from(spec.memory_gb.abs_diff(gb)) * 100 <= u64::from(gb) * 15).then_some(spec)
    });
    let spec = match (by_name, vram_gb.filter(|v| v.is_finite() && *v > 0.0)) {
        (Some(spec), _) => spec,
        (None, Some(gb)) => closest(c, gb),
        (None, None) => c.first(),
    };
    Some(Normalized { spec, form: a.form.unwrap_or(spec.form) })
}

/// What a user asks for: a model, optionally a memory variant, a count per node.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Accelerator {
    /// Canonical model name, as in [`AcceleratorSpec::name`].
    pub name: String,
    /// The memory variant, or `None` for any.
    pub memory_gb: Option<u32>,
    /// Devices per node; below 1 for a fractional GPU.
    pub count: f64,
    /// The form factor, or `None` for any.
    pub form: Option<FormFactor>,
}

impl Accelerator {
    fn model(name: &str, memory_gb: Option<u32>) -> Self {
        Accelerator { name: name.to_string(), memory_gb, count: 1.0, form: None }
    }

    /// Parse a user string: "h100", "H100:4", "a100-40gb", "A100 80GB:8", "rtx4090", "mi300x",
    /// "A16:0.25", and the [`Display`](fmt::Display) form ("A100 40GB x8"). The error names the
    /// input and, for an unknown name, lists close names.
    pub fn parse(s: &str) -> Result<Accelerator, String> {
        let input = s.trim();
        let (name_part, count) = split_count(input)?;
        let a = analyse(name_part);
        let Some(c) = resolve(&a) else { return Err(unknown(input, &a.key)) };
        let name = c.first().name;
        let memory_gb = match a.size {
            Some(gb) if c.iter().any(|s| s.memory_gb == gb) => Some(gb),
            Some(gb) => {
                let known: Vec<String> = c.iter().map(|s| format!("{} GB", s.memory_gb)).collect();
                return Err(format!("accelerator `{input}`: {name} has no {gb} GB variant (known: {})", known.join(", ")));
            }
            // A name that singles out one variant ("H100 NVL") pins it.
            None => {
                let mut picked = c.iter();
                match (picked.next(), picked.next()) {
                    (Some(only), None) if all_variants(name).len() > 1 => Some(only.memory_gb),
                    _ => None,
                }
            }
        };
        Ok(Accelerator { name: name.to_string(), memory_gb, count, form: a.form })
    }

    /// Devices per node.
    pub fn count(mut self, n: u32) -> Self {
        self.count = f64::from(n);
        self
    }

    /// A fractional GPU (Vultr vGPU): sets the count to `f`.
    pub fn fraction(mut self, f: f64) -> Self {
        self.count = f;
        self
    }

    /// Pick a memory variant.
    pub fn memory(mut self, gb: u32) -> Self {
        self.memory_gb = Some(gb);
        self
    }

    /// Pick a form factor.
    pub fn form(mut self, f: FormFactor) -> Self {
        self.form = Some(f);
        self
    }

    /// The catalog entries this request accepts (all memory variants when `memory_gb` is
    /// `None`). A form narrows them only when some of them have that form (H100 + NVL: the
    /// 94 GB entry; A100 + PCIe: both, the A100 entries do not record PCIe).
    pub fn specs(&self) -> Vec<&'static AcceleratorSpec> {
        let mut specs = variants(&self.name);
        specs.retain(|s| self.memory_gb.is_none_or(|gb| s.memory_gb == gb));
        if let Some(form) = self.form
            && specs.iter().any(|s| s.form == form)
        {
            specs.retain(|s| s.form == form);
        }
        specs
    }

    /// Whether a normalised offer satisfies this request: its entry is one of
    /// [`specs`](Self::specs) and its form is the one asked for, if any.
    pub fn accepts(&self, offer: &Normalized) -> bool {
        self.specs().iter().any(|s| std::ptr::eq(*s, offer.spec)) && self.form.is_none_or(|f| f == offer.form)
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(gb) = self.memory_gb {
            write!(f, " {gb}GB")?;
        }
        if let Some(form) = self.form {
            write!(f, " {form}")?;
        }
        write!(f, " x{}", self.count)
    }
}

/// Split "NAME:COUNT" or "NAME xCOUNT" into name and count (1 when absent).
fn split_count(input: &str) -> Result<(&str, f64), String> {
    let count = |n: &str| -> Result<f64, String> {
        match n.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
            _ => Err(format!("accelerator `{input}`: count `{}` is not a positive number", n.trim())),
        }
    };
    if let Some((name, n)) = input.rsplit_once(':') {
        return Ok((name.trim(), count(n)?));
    }
    if let Some((name, last)) = input.rsplit_once(char::is_whitespace)
        && let Some(n) = last.strip_prefix(['x', 'X', '×'])
        && n.parse::<f64>().is_ok()
    {
        return Ok((name.trim(), count(n)?));
    }
    Ok((input, 1.0))
}

/// The error for an unknown name, with the closest model names as a hint.
fn unknown(input: &str, key: &str) -> String {
    let mut message = format!("unknown accelerator `{input}`");
    if key.is_empty() {
        return message;
    }
    let limit = match key.len() {
        0..=4 => 1,
        5..=8 => 2,
        _ => 3,
    };
    // Per model: (distance, not a prefix, reversed common prefix length, catalog position, name).
    let mut close: Vec<(usize, bool, std::cmp::Reverse<usize>, usize, &str)> = Vec::new();
    for (i, spec) in CATALOG.iter().enumerate() {
        if close.iter().any(|c| c.4 == spec.name) {
            continue;
        }
        let keys: Vec<String> = all_variants(spec.name)
            .iter()
            .flat_map(|s| std::iter::once(s.name).chain(s.aliases.iter().copied()))
            .map(|n| analyse(n).key)
            .collect();
        let Some(distance) = keys.iter().map(|k| edit_distance(key, k)).min() else { continue };
        let prefix = key.len() >= 2 && keys.iter().any(|k| k.starts_with(key));
        let common = keys.iter().map(|k| k.bytes().zip(key.bytes()).take_while(|(x, y)| x == y).count()).max().unwrap_or(0);
        if distance <= limit || prefix {
            close.push((distance, !prefix, std::cmp::Reverse(common), i, spec.name));
        }
    }
    close.sort();
    if !close.is_empty() {
        let names: Vec<&str> = close.iter().take(6).map(|c| c.4).collect();
        message.push_str(&format!("; hint: did you mean {}?", names.join(", ")));
    }
    message
}

/// Levenshtein distance over bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &x) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &y) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(x != y);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Typed constructors, one per catalog model (lower snake case of the model name), plus `_NN`
/// variants that pin a memory size. Each asks for one device, any form.
pub mod accelerators {
    use super::Accelerator;

    macro_rules! constructors {
        ($($f:ident => $name:literal $(@ $gb:literal)?;)*) => {
            $(
                #[doc = concat!("One ", $name, $(" ", stringify!($gb), " GB",)? ".")]
                pub fn $f() -> Accelerator {
                    Accelerator::model($name, constructors!(@memory $($gb)?))
                }
            )*
            /// Every constructor, by function name.
            #[cfg(test)]
            pub(super) const ALL: &[(&str, fn() -> Accelerator)] = &[$((stringify!($f), $f as fn() -> Accelerator)),*];
        };
        (@memory) => { None };
        (@memory $gb:literal) => { Some($gb) };
    }

    constructors! {
        b300 => "B300";
        gb300 => "GB300";
        b200 => "B200";
        gb200 => "GB200";
        gh200 => "GH200";
        gh200_96 => "GH200" @ 96;
        gh200_144 => "GH200" @ 144;
        h200 => "H200";
        h100 => "H100";
        h100_nvl => "H100" @ 94;
        h800 => "H800";
        h20 => "H20";
        a100 => "A100";
        a100_40 => "A100" @ 40;
        a100_80 => "A100" @ 80;
        a800 => "A800";
        a800_40 => "A800" @ 40;
        a800_80 => "A800" @ 80;
        a40 => "A40";
        a30 => "A30";
        a16 => "A16";
        a10 => "A10";
        a10g => "A10G";
        a2 => "A2";
        l40s => "L40S";
        l40 => "L40";
        l20 => "L20";
        l4 => "L4";
        t4 => "T4";
        t4g => "T4G";
        v100 => "V100";
        v100_16 => "V100" @ 16;
        v100_32 => "V100" @ 32;
        p100 => "P100";
        p100_12 => "P100" @ 12;
        p100_16 => "P100" @ 16;
        p40 => "P40";
        p4 => "P4";
        m60 => "M60";
        k80 => "K80";
        rtx_pro_6000 => "RTX PRO 6000";
        rtx_6000_ada => "RTX 6000 Ada";
        rtx_5000_ada => "RTX 5000 Ada";
        rtx_4000_ada => "RTX 4000 Ada";
        rtx_2000_ada => "RTX 2000 Ada";
        rtx_a6000 => "RTX A6000";
        rtx_a5000 => "RTX A5000";
        rtx_a4500 => "RTX A4500";
        rtx_a4000 => "RTX A4000";
        rtx_a2000 => "RTX A2000";
        quadro_rtx_8000 => "Quadro RTX 8000";
        quadro_rtx_6000 => "Quadro RTX 6000";
        rtx_5090 => "RTX 5090";
        rtx_5080 => "RTX 5080";
        rtx_5070_ti => "RTX 5070 Ti";
        rtx_5070 => "RTX 5070";
        rtx_4090 => "RTX 4090";
        rtx_4080 => "RTX 4080";
        rtx_4070_ti_super => "RTX 4070 Ti Super";
        rtx_4070_ti => "RTX 4070 Ti";
        rtx_4070 => "RTX 4070";
        rtx_4060_ti => "RTX 4060 Ti";
        rtx_4060_ti_16 => "RTX 4060 Ti" @ 16;
        rtx_4060 => "RTX 4060";
        rtx_3090_ti => "RTX 3090 Ti";
        rtx_3090 => "RTX 3090";
        rtx_3080_ti => "RTX 3080 Ti";
        rtx_3080 => "RTX 3080";
        rtx_3070_ti => "RTX 3070 Ti";
        rtx_3070 => "RTX 3070";
        rtx_3060_ti => "RTX 3060 Ti";
        rtx_3060 => "RTX 3060";
        rtx_2080_ti => "RTX 2080 Ti";
        titan_rtx => "Titan RTX";
        titan_v => "Titan V";
        gtx_1080_ti => "GTX 1080 Ti";
        mi355x => "MI355X";
        mi350x => "MI350X";
        mi325x => "MI325X";
        mi300x => "MI300X";
        mi300a => "MI300A";
        mi250x => "MI250X";
        mi250 => "MI250";
        mi210 => "MI210";
        mi100 => "MI100";
        radeon_pro_v520 => "Radeon Pro V520";
        radeon_pro_w7900 => "Radeon PRO W7900";
        radeon_rx_7900_xtx => "Radeon RX 7900 XTX";
        trainium => "Trainium";
        trainium2 => "Trainium2";
        trainium3 => "Trainium3";
        inferentia => "Inferentia";
        inferentia2 => "Inferentia2";
        gaudi => "Gaudi";
        gaudi2 => "Gaudi 2";
        gaudi3 => "Gaudi 3";
        tpu_v7 => "TPU v7";
        tpu_v6e => "TPU v6e";
        tpu_v5p => "TPU v5p";
        tpu_v5e => "TPU v5e";
        tpu_v4 => "TPU v4";
        tpu_v3 => "TPU v3";
        max_1550 => "Max 1550";
        max_1100 => "Max 1100";
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashSet};

    /// (raw name, reported VRAM, expected model, expected memory, expected form).
    const CASES: &[(&str, Option<f64>, &str, u32, FormFactor)] = &[
        // RunPod.
        ("NVIDIA GeForce RTX 4090", Some(24.0), "RTX 4090", 24, Consumer),
        ("NVIDIA H100 80GB HBM3", None, "H100", 80, Sxm),
        ("NVIDIA H100 PCIe", Some(80.0), "H100", 80, Pcie),
        ("NVIDIA H100 NVL", None, "H100", 94, Nvl),
        ("NVIDIA A100 80GB PCIe", None, "A100", 80, Pcie),
        ("NVIDIA A100-SXM4-80GB", None, "A100", 80, Sxm),
        ("NVIDIA RTX A6000", None, "RTX A6000", 48, Workstation),
        ("NVIDIA RTX 6000 Ada Generation", None, "RTX 6000 Ada", 48, Workstation),
        ("NVIDIA L40S", None, "L40S", 48, Pcie),
        ("Tesla V100-SXM2-16GB", None, "V100", 16, Sxm),
        ("Tesla V100S-PCIE-32GB", None, "V100", 32, Pcie),
        ("NVIDIA H200", None, "H200", 141, Sxm),
        ("NVIDIA H200 NVL", Some(141.0), "H200", 141, Nvl),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", None, "RTX PRO 6000", 96, Workstation),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", Some(96.0), "RTX PRO 6000", 96, Workstation),
        ("NVIDIA GeForce RTX 4080 SUPER", None, "RTX 4080", 16, Consumer),
        ("NVIDIA GeForce RTX 3090 Ti", None, "RTX 3090 Ti", 24, Consumer),
        ("NVIDIA GeForce RTX 3090", None, "RTX 3090", 24, Consumer),
        ("AMD Instinct MI300X OAM", None, "MI300X", 192, Oam),
        ("NVIDIA RTX 4000 SFF Ada Generation", None, "RTX 4000 Ada", 20, Workstation),
        // Vast.ai (VRAM reported as measured).
        ("RTX 4090", Some(24.0), "RTX 4090", 24, Consumer),
        ("H100 SXM", Some(79.6), "H100", 80, Sxm),
        ("H100 PCIE", Some(81.5), "H100", 80, Pcie),
        ("H100 NVL", Some(93.6), "H100", 94, Nvl),
        ("A100 SXM4", Some(39.4), "A100", 40, Sxm),
        ("A100 PCIE", Some(79.2), "A100", 80, Pcie),
        ("RTX A6000", Some(48.0), "RTX A6000", 48, Workstation),
        ("RTX 6000Ada", Some(47.5), "RTX 6000 Ada", 48, Workstation),
        ("Q RTX 8000", None, "Quadro RTX 8000", 48, Workstation),
        ("Tesla V100", Some(32.0), "V100", 32, Sxm),
        ("L40S", None, "L40S", 48, Pcie),
        ("RTX 3080", Some(12.0), "RTX 3080", 12, Consumer),
        ("GH200 SXM", Some(96.0), "GH200", 96, Sxm),
        // AWS.
        ("H100", Some(80.0), "H100", 80, Sxm),
        ("A100", Some(80.0), "A100", 80, Sxm),
        ("A10G", Some(22.0), "A10G", 24, Pcie),
        ("T4", Some(16.0), "T4", 16, Pcie),
        ("T4g", None, "T4G", 16, Pcie),
        ("L4", None, "L4", 24, Pcie),
        ("Trainium", None, "Trainium", 32, Asic),
        ("Trainium2", None, "Trainium2", 96, Asic),
        ("Inferentia", None, "Inferentia", 8, Asic),
        ("Inferentia2", None, "Inferentia2", 32, Asic),
        ("Gaudi HL-205", None, "Gaudi", 32, Asic),
        ("V100", Some(16.0), "V100", 16, Sxm),
        ("K80", Some(12.0), "K80", 12, Pcie),
        ("M60", None, "M60", 8, Pcie),
        ("Radeon Pro V520", None, "Radeon Pro V520", 8, Pcie),
        // GCP.
        ("nvidia-tesla-t4", None, "T4", 16, Pcie),
        ("nvidia-tesla-v100", None, "V100", 16, Sxm),
        ("nvidia-tesla-a100", None, "A100", 40, Sxm),
        ("nvidia-a100-80gb", None, "A100", 80, Sxm),
        ("nvidia-h100-80gb", None, "H100", 80, Sxm),
        ("nvidia-h100-mega-80gb", None, "H100", 80, Sxm),
        ("nvidia-l4", None, "L4", 24, Pcie),
        ("nvidia-h200-141gb", None, "H200", 141, Sxm),
        ("nvidia-tesla-p100", None, "P100", 16, Pcie),
        ("nvidia-tesla-p4", None, "P4", 8, Pcie),
        ("nvidia-b200", None, "B200", 180, Sxm),
        ("v5litepod-8", None, "TPU v5e", 16, Asic),
        ("tpu-v6e-slice", None, "TPU v6e", 32, Asic),
        ("v4-32", None, "TPU v4", 32, Asic),
        ("v5p", None, "TPU v5p", 95, Asic),
        // Vultr.
        ("NVIDIA_A16", Some(2.0), "A16", 16, Pcie),
        ("NVIDIA_A40", None, "A40", 48, Pcie),
        ("NVIDIA_A100", Some(80.0), "A100", 80, Sxm),
        ("NVIDIA_L40S", None, "L40S", 48, Pcie),
        ("NVIDIA_H100", None, "H100", 80, Sxm),
        ("AMD_MI300X", None, "MI300X", 192, Oam),
        // Hyperstack.
        ("A100-80G-PCIe", None, "A100", 80, Pcie),
        ("H100-80G-PCIe", None, "H100", 80, Pcie),
        ("H100-80G-PCIe-NVLink", None, "H100", 80, Pcie),
        ("H100-80G-SXM5", None, "H100", 80, Sxm),
        ("RTX-A6000", None, "RTX A6000", 48, Workstation),
        ("L40", None, "L40", 48, Pcie),
        // Sizes and separators in the name.
        ("A100 SXM4 40GB", None, "A100", 40, Sxm),
        ("a100_pcie_40gb", Some(80.0), "A100", 40, Pcie),
        ("A100-80GB", None, "A100", 80, Sxm),
        ("A100 (80 GB PCIe)", None, "A100", 80, Pcie),
        ("A100 80 GB", Some(40.0), "A100", 80, Sxm),
        ("rtx4090", None, "RTX 4090", 24, Consumer),
        ("NVIDIA_GeForce_RTX_4090", None, "RTX 4090", 24, Consumer),
        ("NVIDIA GH200 480GB", None, "GH200", 96, Superchip),
        ("NVIDIA GH200 480GB", Some(144.0), "GH200", 144, Superchip),
        ("NVIDIA GH200 144G HBM3e", None, "GH200", 144, Superchip),
        ("B200 192GB", None, "B200", 180, Sxm),
        ("GB200 NVL72", None, "GB200", 186, Superchip),
        ("NVL H100", None, "H100", 94, Nvl),
        // Near misses that must not collide.
        ("A10", None, "A10", 24, Pcie),
        ("NVIDIA A10", Some(24.0), "A10", 24, Pcie),
        ("Quadro RTX 6000", None, "Quadro RTX 6000", 24, Workstation),
        ("RTX 6000", None, "Quadro RTX 6000", 24, Workstation),
        ("RTX 6000 Ada", None, "RTX 6000 Ada", 48, Workstation),
        ("RTX PRO 6000", None, "RTX PRO 6000", 96, Workstation),
        ("MI250", None, "MI250", 128, Oam),
        ("AMD Instinct MI250X", None, "MI250X", 128, Oam),
        ("Gaudi 2", None, "Gaudi 2", 96, Asic),
        ("Intel Gaudi 3", None, "Gaudi 3", 128, Asic),
        ("H20", None, "H20", 96, Sxm),
        ("Tesla P100-PCIE-12GB", None, "P100", 12, Pcie),
    ];

    #[test]
    fn provider_names_normalise() {
        assert!(CASES.len() >= 40);
        for &(raw, vram, name, memory, form) in CASES {
            let n = normalize(raw, vram).unwrap_or_else(|| panic!("{raw:?} did not normalise"));
            assert_eq!((n.spec.name, n.spec.memory_gb, n.form), (name, memory, form), "{raw:?} with {vram:?} GB");
        }
    }

    #[test]
    fn unknown_names_give_none() {
        for raw in ["", "NVIDIA", "InstMI300X", "RTX 9090", "A1000", "H100 MIG 1g.10gb", "Tesla", "80GB", "v5e-lite", "GTX 970", "A100 8"] {
            assert_eq!(normalize(raw, Some(80.0)), None, "{raw:?}");
        }
    }

    #[test]
    fn near_misses_do_not_collide() {
        let name = |raw| normalize(raw, None).map(|n| n.spec.name);
        assert_eq!(name("A10"), Some("A10"));
        assert_eq!(name("A100"), Some("A100"));
        assert_eq!(name("A10G"), Some("A10G"));
        assert_eq!(name("L40"), Some("L40"));
        assert_eq!(name("L40S"), Some("L40S"));
        assert_eq!(name("T4"), Some("T4"));
        assert_eq!(name("T4G"), Some("T4G"));
        assert_eq!(name("RTX A6000"), Some("RTX A6000"));
        assert_eq!(name("RTX 6000 Ada Generation"), Some("RTX 6000 Ada"));
        assert_eq!(name("H200"), Some("H200"));
        assert_eq!(name("H20"), Some("H20"));
        assert_eq!(name("MI300X"), Some("MI300X"));
        assert_eq!(name("MI300A"), Some("MI300A"));
    }

    #[test]
    fn every_entry_normalises_onto_itself() {
        for spec in CATALOG {
            let sized = format!("{} {}GB", spec.name, spec.memory_gb);
            for raw in [spec.name, sized.as_str()] {
                let n = normalize(raw, Some(f64::from(spec.memory_gb))).unwrap();
                assert!(std::ptr::eq(n.spec, spec), "{raw:?} -> {:?}", n.spec);
            }
            let n = normalize(&sized, None).unwrap();
            assert!(std::ptr::eq(n.spec, spec), "{sized:?} -> {:?}", n.spec);
            for alias in spec.aliases {
                let n = normalize(alias, Some(f64::from(spec.memory_gb))).unwrap_or_else(|| panic!("alias {alias:?}"));
                assert!(std::ptr::eq(n.spec, spec), "alias {alias:?} -> {:?}", n.spec);
            }
        }
    }

    #[test]
    fn keys_are_unambiguous() {
        let mut seen: HashMap<(String, u32), &str> = HashMap::new();
        for (i, spec) in CATALOG.iter().enumerate() {
            for name in std::iter::once(spec.name).chain(spec.aliases.iter().copied()) {
                let key = analyse(name).key;
                assert!(!key.is_empty(), "{name:?} has an empty key");
                if let Some(other) = seen.insert((key.clone(), spec.memory_gb), spec.name) {
                    // The same entry may list equivalent spellings; another entry may not.
                    let twin = CATALOG.iter().position(|s| s.name == other && s.memory_gb == spec.memory_gb);
                    assert_eq!(twin, Some(i), "{key:?} {} GB is both {other} and {}", spec.memory_gb, spec.name);
                }
            }
        }
        for (key, list) in KEYS.iter() {
            let names: BTreeSet<&str> = list.iter().map(|&i| CATALOG[i].name).collect();
            assert_eq!(names.len(), 1, "key {key:?} means {names:?}");
        }
        let entries: HashSet<(&str, u32)> = CATALOG.iter().map(|s| (s.name, s.memory_gb)).collect();
        assert_eq!(entries.len(), CATALOG.len(), "duplicate (name, memory) entry");
    }

    #[test]
    fn catalog_data_is_sane() {
        for spec in CATALOG {
            assert!(spec.memory_gb > 0, "{}", spec.name);
            assert_eq!(spec.cuda.is_some(), spec.vendor == Vendor::Nvidia, "{}", spec.name);
            if let Some((min, max)) = spec.cuda {
                let v = |s: &str| -> (u32, u32) {
                    let (a, b) = s.split_once('.').unwrap();
                    (a.parse().unwrap(), b.parse().unwrap())
                };
                assert!(v(min) <= v(max), "{}", spec.name);
            }
        }
        assert_eq!(normalize("K80", None).unwrap().spec.cuda, Some(("6.5", "11.4")));
        assert_eq!(normalize("H100", None).unwrap().spec.cuda.unwrap().1, "13.0");
    }

    #[test]
    fn variants_lists_memory_sizes() {
        let gb = |name| variants(name).iter().map(|s| s.memory_gb).collect::<Vec<_>>();
        assert_eq!(gb("a100"), [40, 80]);
        assert_eq!(gb("A100-80GB"), [40, 80]);
        assert_eq!(gb("nvidia-tesla-v100"), [16, 32]);
        assert_eq!(gb("H100 NVL"), [80, 94]);
        assert_eq!(gb("rtx4090"), [24]);
        assert!(variants("nope").is_empty());
    }

    #[test]
    fn parse_accepts_user_spellings() {
        let p = |s| Accelerator::parse(s).unwrap();
        assert_eq!(p("h100"), accelerators::h100());
        assert_eq!(p("H100:4"), accelerators::h100().count(4));
        assert_eq!(p("a100-40gb"), accelerators::a100_40());
        assert_eq!(p("A100 80GB:8"), accelerators::a100_80().count(8));
        assert_eq!(p("rtx4090"), accelerators::rtx_4090());
        assert_eq!(p("mi300x"), accelerators::mi300x());
        assert_eq!(p("A16:0.25"), accelerators::a16().fraction(0.25));
        assert_eq!(p(" RTX 6000 Ada : 2 "), accelerators::rtx_6000_ada().count(2));
        assert_eq!(p("h100 sxm:8"), accelerators::h100().count(8).form(Sxm));
        assert_eq!(p("h100 nvl"), accelerators::h100_nvl().form(Nvl));
        assert_eq!(p("h200 nvl"), accelerators::h200().form(Nvl));
        assert_eq!(p("gaudi2"), accelerators::gaudi2());
        assert_eq!(p("tpu v5e:8"), accelerators::tpu_v5e().count(8));
    }

    #[test]
    fn display_round_trips() {
        assert_eq!(accelerators::h100().count(4).to_string(), "H100 x4");
        assert_eq!(accelerators::a100_40().to_string(), "A100 40GB x1");
        assert_eq!(accelerators::a16().fraction(0.25).to_string(), "A16 x0.25");
        for a in [
            accelerators::h100().count(4),
            accelerators::a100_40(),
            accelerators::a16().fraction(0.25),
            accelerators::h100_nvl().form(Nvl),
            accelerators::h100().form(Pcie).count(2),
            accelerators::rtx_pro_6000().form(Workstation),
            accelerators::tpu_v5p().form(Asic).count(4),
        ] {
            assert_eq!(Accelerator::parse(&a.to_string()), Ok(a.clone()), "{a}");
        }
    }

    #[test]
    fn parse_errors_name_input_and_hint() {
        let e = Accelerator::parse("h10").unwrap_err();
        assert!(e.contains("`h10`") && e.contains("hint: did you mean H100"), "{e}");
        let e = Accelerator::parse("rtx 4900").unwrap_err();
        assert!(e.contains("`rtx 4900`") && e.contains("RTX 4090"), "{e}");
        let e = Accelerator::parse("mi300").unwrap_err();
        assert!(e.contains("MI300X"), "{e}");
        let e = Accelerator::parse("l40x").unwrap_err();
        assert!(e.contains("L40S") && e.contains("L40"), "{e}");
        let e = Accelerator::parse("zzzzzzzz").unwrap_err();
        assert!(e.contains("`zzzzzzzz`") && !e.contains("hint"), "{e}");
        let e = Accelerator::parse("").unwrap_err();
        assert!(e.contains("unknown accelerator ``"), "{e}");
        let e = Accelerator::parse("a100 48gb").unwrap_err();
        assert!(e.contains("`a100 48gb`") && e.contains("40 GB, 80 GB"), "{e}");
        for bad in ["h100:0", "h100:-1", "h100:x", "h100:inf", "h100:NaN"] {
            let e = Accelerator::parse(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")) && e.contains("count"), "{e}");
        }
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("h10", "h100"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn constructors_cover_the_catalog() {
        let mut models: BTreeSet<&str> = CATALOG.iter().map(|s| s.name).collect();
        for (f, ctor) in accelerators::ALL {
            let a = ctor();
            assert_eq!((a.count, a.form), (1.0, None), "{f}");
            let specs = a.specs();
            assert!(!specs.is_empty(), "{f}() matches no entry");
            if let Some(gb) = a.memory_gb {
                assert_eq!(specs.len(), 1, "{f}");
                assert_eq!(specs[0].memory_gb, gb, "{f}");
            } else {
                assert_eq!(specs.len(), variants(&a.name).len(), "{f}");
                // Unpinned constructors are named after the model.
                let snake: String = a.name.to_lowercase().split(' ').collect::<Vec<_>>().join("_");
                assert!(snake == *f || snake.replace('_', "") == *f, "{f} for {}", a.name);
            }
            models.remove(a.name.as_str());
        }
        assert!(models.is_empty(), "no constructor for {models:?}");
        for f in
            ["h100", "h200", "b200", "b300", "gb200", "gh200", "a100", "a100_40", "a100_80", "t4g", "v100_16", "rtx_pro_6000", "tpu_v6e"]
        {
            assert!(accelerators::ALL.iter().any(|(n, _)| *n == f), "{f}");
        }
    }

    #[test]
    fn specs_and_accepts() {
        let gb = |a: &Accelerator| a.specs().iter().map(|s| s.memory_gb).collect::<Vec<_>>();
        assert_eq!(gb(&accelerators::a100()), [40, 80]);
        assert_eq!(gb(&accelerators::a100().memory(80)), [80]);
        assert_eq!(gb(&accelerators::h100().form(Nvl)), [94]);
        assert_eq!(gb(&accelerators::h100().form(Sxm)), [80]);
        assert_eq!(gb(&accelerators::a100().form(Pcie)), [40, 80]);
        assert!(accelerators::a100().memory(48).specs().is_empty());

        let offer = normalize("NVIDIA A100 80GB PCIe", None).unwrap();
        assert!(accelerators::a100().accepts(&offer));
        assert!(accelerators::a100_80().form(Pcie).accepts(&offer));
        assert!(!accelerators::a100_40().accepts(&offer));
        assert!(!accelerators::a100().form(Sxm).accepts(&offer));
        assert!(!accelerators::a10().accepts(&offer));
    }

    #[test]
    fn accelerator_serde_shape() {
        // serde derives compile and the fields carry the expected types.
        fn is_serde<T: serde::Serialize + serde::de::DeserializeOwned>() {}
        is_serde::<Accelerator>();
        is_serde::<Vendor>();
        is_serde::<FormFactor>();
    }

    #[test]
    #[ignore = "timing; run with --release -- --ignored"]
    fn normalise_is_fast() {
        let names: Vec<&str> = CATALOG.iter().flat_map(|s| s.aliases.iter().copied()).collect();
        let _ = normalize("warm up", None);
        let start = std::time::Instant::now();
        let mut found = 0;
        for i in 0..10_000 {
            found += usize::from(normalize(names[i % names.len()], Some(24.0)).is_some());
        }
        let elapsed = start.elapsed();
        eprintln!("10k normalisations: {elapsed:?}");
        assert_eq!(found, 10_000);
    }
}
