//! Target profiles: per-device defaults (backend, execution providers, dtype per model part,
//! threads, pruning budget) kept as TOML files under `targets/profiles/` and embedded in the binary.
//!
//! Adding a profile = one TOML file + one line in the `BUILTIN` registry in this file.

use std::fmt;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::ProfileError;
use crate::part::Part;

/// The registry: file name and embedded text of every built-in profile, in display order
/// (most specific devices first, `generic` last).
const BUILTIN: &[(&str, &str)] = &[
    ("jetson-orin-nano.toml", include_str!("../profiles/jetson-orin-nano.toml")),
    ("jetson-agx-orin.toml", include_str!("../profiles/jetson-agx-orin.toml")),
    ("raspberry-pi-5.toml", include_str!("../profiles/raspberry-pi-5.toml")),
    ("x86-avx512.toml", include_str!("../profiles/x86-avx512.toml")),
    ("x86-avx2.toml", include_str!("../profiles/x86-avx2.toml")),
    ("generic-aarch64.toml", include_str!("../profiles/generic-aarch64.toml")),
    ("generic.toml", include_str!("../profiles/generic.toml")),
];

/// Dtype names a profile may list: the onnx-community file suffixes (`model_<dtype>.onnx`,
/// `fp32` = no suffix). Same spelling as `glimpse --dtype`.
pub const DTYPES: [&str; 7] = ["fp32", "fp16", "int8", "uint8", "quantized", "q4", "q4f16"];

/// CPU feature names a profile may require, spelled as Rust target features (see
/// [`crate::detect::Detected::cpu_features`]).
pub const KNOWN_CPU_FEATURES: [&str; 19] = [
    "sse4.1",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512vnni",
    "avxvnni",
    "avx512bf16",
    "avx512fp16",
    "neon",
    "fp16",
    "dotprod",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
];

/// An ONNX Runtime execution provider, spelled as ONNX Runtime names it (without the
/// `ExecutionProvider` suffix). tract ignores these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExecutionProvider {
    /// NVIDIA TensorRT (Jetson, discrete NVIDIA GPUs).
    TensorRT,
    /// NVIDIA CUDA.
    #[serde(rename = "CUDA")]
    Cuda,
    /// XNNPACK: optimised ARM/x86 CPU kernels.
    #[serde(rename = "XNNPACK")]
    Xnnpack,
    /// Arm Compute Library (ARM CPUs; community-maintained ONNX Runtime builds).
    #[serde(rename = "ACL")]
    Acl,
    /// The default CPU provider.
    #[serde(rename = "CPU")]
    Cpu,
}

impl ExecutionProvider {
    /// Name as written in profiles (`TensorRT`, `CUDA`, `XNNPACK`, `CPU`).
    pub fn name(self) -> &'static str {
        match self {
            ExecutionProvider::TensorRT => "TensorRT",
            ExecutionProvider::Cuda => "CUDA",
            ExecutionProvider::Xnnpack => "XNNPACK",
            ExecutionProvider::Acl => "ACL",
            ExecutionProvider::Cpu => "CPU",
        }
    }
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Thread count: `"auto"` (all available cores) or a fixed positive number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Use [`std::thread::available_parallelism`].
    Auto,
    /// Exactly this many threads.
    Fixed(NonZeroUsize),
}

impl Threads {
    /// The concrete thread count on this machine (`Auto` falls back to 1 when unknown).
    pub fn resolve(self) -> usize {
        match self {
            Threads::Auto => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            Threads::Fixed(n) => n.get(),
        }
    }
}

impl fmt::Display for Threads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threads::Auto => f.write_str("auto"),
            Threads::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Threads {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Threads::Auto => s.serialize_str("auto"),
            Threads::Fixed(n) => s.serialize_u64(n.get() as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Threads {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Threads;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"auto\" or a positive integer")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Threads, E> {
                if v == "auto" {
                    Ok(Threads::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Threads, E> {
                usize::try_from(v)
                    .ok()
                    .and_then(NonZeroUsize::new)
                    .map(Threads::Fixed)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Threads, E> {
                usize::try_from(v)
                    .ok()
                    .and_then(NonZeroUsize::new)
                    .map(Threads::Fixed)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// Ordered dtype preferences per model part (first = most preferred).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DtypePreference {
    /// For `vision_encoder`.
    pub vision_encoder: Vec<String>,
    /// For `embed_tokens`.
    pub embed_tokens: Vec<String>,
    /// For `decoder_model_merged`.
    pub decoder_model_merged: Vec<String>,
}

impl DtypePreference {
    /// The list for one part.
    pub fn for_part(&self, part: Part) -> &[String] {
        match part {
            Part::VisionEncoder => &self.vision_encoder,
            Part::EmbedTokens => &self.embed_tokens,
            Part::Decoder => &self.decoder_model_merged,
        }
    }
}

/// Default visual-token pruning budget: a selection method name (as registered in
/// `glimpse-runtime`'s `select` module, `none` = keep all) and the fraction of image tokens kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pruning {
    /// Method name (`dart`, `none`, ...).
    pub method: String,
    /// Fraction of visual tokens kept, in (0, 1]; 1.0 with method `none`.
    pub keep_ratio: f32,
    /// Whether `--fast` (region skipping and merging inside the encoder, the preset measured in
    /// docs/pruning.md) is on by default, on folders that have a staged encoder.
    #[serde(default)]
    pub fast: bool,
}

/// How detection recognises the machine a profile is for (the `[detect]` table). A board
/// matches when its device name (device tree, or cpuinfo's `Model:`) contains every string of
/// `device_all` and none of `device_none`, and, with `jetson`, the machine runs Jetson Linux or
/// calls itself a Jetson. Without a board match, the first profile marked `default_for_arch`
/// whose `arch` fits is the starting point. A new board is one TOML file with this table.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectRules {
    #[serde(default)]
    pub device_all: Vec<String>,
    #[serde(default)]
    pub device_none: Vec<String>,
    #[serde(default)]
    pub jetson: bool,
    #[serde(default)]
    pub default_for_arch: bool,
}

impl DetectRules {
    /// Whether a board with this device name (and Jetson Linux or not) is this profile's.
    pub fn matches_board(&self, device: &str, jetson_linux: bool) -> bool {
        !self.device_all.is_empty()
            && self.device_all.iter().all(|s| device.contains(s.as_str()))
            && !self.device_none.iter().any(|s| device.contains(s.as_str()))
            && (!self.jetson || jetson_linux || device.contains("Jetson"))
    }
}

/// A device profile: the defaults Glimpse uses on one class of machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Registry name, equal to the file stem (`raspberry-pi-5`).
    pub name: String,
    /// One-line human description.
    pub description: String,
    /// `aarch64`, `x86_64` or `any`.
    pub arch: String,
    /// Profile to try when this one's CPU requirements are not met (none for `generic`).
    #[serde(default)]
    pub fallback: Option<String>,
    /// Backends in order of preference, by their registered names (`glimpse-runtime`'s backend
    /// registry checks them when the profile is applied).
    pub backends: Vec<String>,
    /// ONNX Runtime execution providers in order of preference.
    pub execution_providers: Vec<ExecutionProvider>,
    /// Worker threads.
    pub threads: Threads,
    /// CPU features the profile's kernels and dtypes assume (Rust target-feature names).
    pub required_cpu_features: Vec<String>,
    /// Dtype preference per model part (for ONNX Runtime, and for tract unless `tract_dtypes`
    /// is given).
    pub dtypes: DtypePreference,
    /// Dtype preference when the backend is tract, where its kernels rank dtypes differently
    /// (on x86 tract runs ONNX Runtime's dynamic int8, MatMulInteger, far slower than fp32).
    #[serde(default)]
    pub tract_dtypes: Option<DtypePreference>,
    /// Default pruning budget.
    pub pruning: Pruning,
    /// How much of the machine's memory a model may use by default (none: what is free).
    #[serde(default)]
    pub memory: Option<MemoryShare>,
    /// How detection recognises this profile's machines (none: only by `--target` or fallback).
    #[serde(default)]
    pub detect: Option<DetectRules>,
}

/// The `[memory]` table: the default memory budget on a profile's boards, as a share of the
/// machine's physical memory (or of its cgroup limit when lower), so that the OS, the robot's
/// own processes and (on Jetson) the GPU keep the rest. `--max-memory` replaces it; a model
/// estimated above it is refused before anything loads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryShare {
    /// Fraction of physical memory, in (0, 1].
    pub share: f64,
}

impl MemoryShare {
    /// The budget in bytes on a machine with `total` bytes of memory.
    pub fn of(&self, total: u64) -> u64 {
        (total as f64 * self.share) as u64
    }
}

/// Dtype variants `--dtype auto` never picks for tract, whatever a profile ranks: ONNX Runtime's
/// dynamic quantization (`DynamicQuantizeLinear` + `MatMulInteger`), which tract runs 59x slower
/// than fp32 on prefill and 359x on encode on x86 (docs/targets.md, real-size SmolVLM-256M); on
/// ARM its speed is unmeasured (qemu cannot time it), so it is not offered there either. Asking
/// for it by name (`--dtype int8`) still runs it.
pub const TRACT_NEVER_AUTO: [&str; 3] = ["int8", "uint8", "quantized"];

impl Profile {
    /// Every built-in profile, in registry order.
    pub fn all() -> &'static [Profile] {
        profiles()
    }

    /// The built-in profile called `name`.
    pub fn by_name(name: &str) -> Result<&'static Profile, ProfileError> {
        profiles()
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ProfileError::Unknown { name: name.to_string(), available: profile_names().join(", ") })
    }

    /// Parses and validates a profile from TOML text; `file` names the source in errors.
    pub fn from_toml_str(file: &str, text: &str) -> Result<Profile, ProfileError> {
        let profile: Profile = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
        profile.validate(file)?;
        Ok(profile)
    }

    /// Reads a user-supplied profile file (same format as the built-in ones).
    pub fn from_file(path: &Path) -> Result<Profile, ProfileError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ProfileError::Io { path: path.to_path_buf(), source })?;
        Profile::from_toml_str(&path.display().to_string(), &text)
    }

    /// The first dtype of this profile's preference for `part` that appears in `available`
    /// (case-insensitive), returned as the caller's string; `None` if none matches.
    /// This is `--dtype auto`: pass the dtypes whose files exist in the model folder.
    /// With tract the dynamically quantized variants ([`TRACT_NEVER_AUTO`]) are never picked.
    pub fn choose_dtype<'a>(&self, part: Part, backend: &str, available: &[&'a str]) -> Option<&'a str> {
        self.dtypes_for(backend)
            .for_part(part)
            .iter()
            .filter(|want| backend != "tract" || !TRACT_NEVER_AUTO.iter().any(|d| want.eq_ignore_ascii_case(d)))
            .find_map(|want| available.iter().copied().find(|have| have.eq_ignore_ascii_case(want)))
    }

    /// The dtype preference that applies to `backend`.
    pub fn dtypes_for(&self, backend: &str) -> &DtypePreference {
        match (backend, &self.tract_dtypes) {
            ("tract", Some(t)) => t,
            _ => &self.dtypes,
        }
    }

    /// Whether this profile can run on a CPU of `arch` with `features`.
    pub fn supports(&self, arch: &str, features: &[String]) -> bool {
        (self.arch == "any" || self.arch == arch) && self.missing_cpu_features(features).is_empty()
    }

    /// Required features absent from `features`.
    pub fn missing_cpu_features<'s>(&'s self, features: &[String]) -> Vec<&'s str> {
        self.required_cpu_features.iter().filter(|f| !features.contains(f)).map(String::as_str).collect()
    }

    fn validate(&self, file: &str) -> Result<(), ProfileError> {
        let bad = |field: &str, message: String| ProfileError::Invalid {
            file: file.to_string(),
            field: Some(field.to_string()),
            line: None,
            message,
        };
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(bad("name", format!("`{}` must be non-empty lowercase letters, digits and '-'", self.name)));
        }
        if !matches!(self.arch.as_str(), "aarch64" | "x86_64" | "any") {
            return Err(bad("arch", format!("`{}` is not one of aarch64, x86_64, any", self.arch)));
        }
        if self.fallback.as_deref() == Some(self.name.as_str()) {
            return Err(bad("fallback", "a profile cannot fall back to itself".into()));
        }
        if self.backends.is_empty() {
            return Err(bad("backends", "must list at least one backend".into()));
        }
        for b in &self.backends {
            if b.is_empty() || !b.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
                return Err(bad("backends", format!("`{b}` is not a backend name (tract, ort, ...)")));
            }
        }
        if self.execution_providers.is_empty() {
            return Err(bad("execution_providers", "must list at least one provider (e.g. \"CPU\")".into()));
        }
        for f in &self.required_cpu_features {
            if !KNOWN_CPU_FEATURES.contains(&f.as_str()) {
                return Err(bad(
                    "required_cpu_features",
                    format!("unknown CPU feature `{f}` (known: {})", KNOWN_CPU_FEATURES.join(", ")),
                ));
            }
        }
        let tables =
            std::iter::once(("dtypes", &self.dtypes)).chain(self.tract_dtypes.iter().map(|t| ("tract_dtypes", t)));
        for (table, prefs) in tables {
            for part in Part::ALL {
                let list = prefs.for_part(part);
                let field = format!("{table}.{}", part.stem());
                if list.is_empty() {
                    return Err(bad(&field, "must list at least one dtype".into()));
                }
                for (i, d) in list.iter().enumerate() {
                    if !DTYPES.contains(&d.as_str()) {
                        return Err(bad(&field, format!("unknown dtype `{d}` (known: {})", DTYPES.join(", "))));
                    }
                    if list[..i].contains(d) {
                        return Err(bad(&field, format!("dtype `{d}` listed twice")));
                    }
                }
            }
        }
        let r = self.pruning.keep_ratio;
        if !(r > 0.0 && r <= 1.0) {
            return Err(bad("pruning.keep_ratio", format!("{r} is not in (0, 1]")));
        }
        if let Some(d) = &self.detect {
            if d.device_all.is_empty() && (d.jetson || !d.device_none.is_empty()) {
                return Err(bad("detect.device_all", "board rules need at least one device string".into()));
            }
            if d.device_all.iter().chain(&d.device_none).any(String::is_empty) {
                return Err(bad("detect", "device strings must not be empty".into()));
            }
        }
        if let Some(m) = &self.memory {
            if !(m.share > 0.0 && m.share <= 1.0) {
                return Err(bad("memory.share", format!("{} is not in (0, 1]", m.share)));
            }
        }
        if self.pruning.method.is_empty() {
            return Err(bad("pruning.method", "must not be empty (use \"none\")".into()));
        }
        if self.pruning.method == "none" && r != 1.0 {
            return Err(bad(
                "pruning.keep_ratio",
                format!("method `none` keeps every token, so keep_ratio must be 1.0, not {r}"),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Profile {
    /// Multi-line human summary, as `glimpse targets --profile NAME` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn join<T: fmt::Display>(items: &[T]) -> String {
            items.iter().map(T::to_string).collect::<Vec<_>>().join(", ")
        }
        writeln!(f, "{}: {}", self.name, self.description)?;
        writeln!(f, "  arch:        {}", self.arch)?;
        writeln!(f, "  backends:    {}", join(&self.backends))?;
        writeln!(f, "  providers:   {}", join(&self.execution_providers))?;
        writeln!(f, "  threads:     {}", self.threads)?;
        for part in Part::ALL {
            writeln!(f, "  {:<20} {}", format!("{part}:"), join(self.dtypes.for_part(part)))?;
        }
        if let Some(t) = &self.tract_dtypes {
            for part in Part::ALL {
                writeln!(f, "  {:<20} {}", format!("{part} (tract):"), join(t.for_part(part)))?;
            }
        }
        writeln!(f, "  pruning:     {} (keep {})", self.pruning.method, self.pruning.keep_ratio)?;
        if let Some(m) = &self.memory {
            writeln!(f, "  memory:      {:.0}% of physical memory by default", m.share * 100.0)?;
        }
        write!(
            f,
            "  requires:    {}",
            if self.required_cpu_features.is_empty() { "-".into() } else { join(&self.required_cpu_features) }
        )?;
        if let Some(fb) = &self.fallback {
            write!(f, "\n  fallback:    {fb}")?;
        }
        Ok(())
    }
}

/// Every built-in profile, parsed once, in registry order.
///
/// # Panics
/// Only if a file embedded from `targets/profiles/` is invalid, which the crate's tests rule out.
pub fn profiles() -> &'static [Profile] {
    static PROFILES: OnceLock<Vec<Profile>> = OnceLock::new();
    PROFILES.get_or_init(|| {
        BUILTIN
            .iter()
            .map(|(file, text)| match Profile::from_toml_str(file, text) {
                Ok(p) => p,
                Err(e) => panic!("built-in profile is invalid: {e}"),
            })
            .collect()
    })
}

/// Names of the built-in profiles, in registry order.
pub fn profile_names() -> Vec<&'static str> {
    profiles().iter().map(|p| p.name.as_str()).collect()
}

/// Turns a toml/serde error into [`ProfileError::Invalid`], naming the field found at the error span.
fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> ProfileError {
    let message = e.message().trim().to_string();
    let (mut field, line) = match e.span() {
        Some(span) => {
            let at = floor_char_boundary(text, span.start);
            (field_at(text, at), Some(text[..at].matches('\n').count() + 1))
        }
        None => (None, None),
    };
    // "missing field `x`": the span is the enclosing table, so append the missing key.
    if let Some(missing) = message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
        field = Some(match field {
            Some(table) if !table.contains('=') => format!("{table}.{missing}"),
            _ => missing.to_string(),
        });
    }
    ProfileError::Invalid { file: file.to_string(), field, line, message }
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Best-effort dotted key path of the value at byte offset `at`: the last `[table]` header before
/// it, plus the key of the nearest `key = ...` line at or before it within that table.
fn field_at(text: &str, at: usize) -> Option<String> {
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let mut key = None;
    let mut table = None;
    for line in text[..line_end].lines().rev() {
        let t = line.trim();
        if t.starts_with('[') {
            table = Some(t.trim_start_matches('[').trim_end_matches(']').trim().to_string());
            break;
        }
        if key.is_none() && !t.starts_with('#') {
            if let Some((k, _)) = t.split_once('=') {
                key = Some(k.trim().to_string());
            }
        }
    }
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (Some(t), None) => Some(t),
        (None, k) => k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[memory] share` sets a budget as a share of the machine's memory; outside (0, 1] it is
    /// refused naming the field.
    #[test]
    fn memory_share_is_a_fraction_of_the_machine() {
        let pi = Profile::by_name("raspberry-pi-5").unwrap();
        let share = pi.memory.expect("the Pi profile has a [memory] table");
        assert_eq!(share.of(8_000_000_000), 4_800_000_000);
        assert!(Profile::by_name("generic").unwrap().memory.is_none());
        let text = BUILTIN.iter().find(|(f, _)| f.contains("raspberry-pi-5")).unwrap().1;
        for bad in ["0.0", "1.5", "-0.2"] {
            let e = Profile::from_toml_str("pi.toml", &text.replace("share = 0.6", &format!("share = {bad}")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("memory.share") && e.contains("(0, 1]"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_builtin_profile_parses_and_matches_its_file_name() {
        assert_eq!(profiles().len(), BUILTIN.len());
        for ((file, _), p) in BUILTIN.iter().zip(profiles()) {
            assert_eq!(format!("{}.toml", p.name), *file);
            assert!(!p.description.is_empty());
        }
        for name in [
            "jetson-orin-nano",
            "jetson-agx-orin",
            "raspberry-pi-5",
            "x86-avx2",
            "x86-avx512",
            "generic-aarch64",
            "generic",
        ] {
            assert_eq!(Profile::by_name(name).map(|p| p.name.as_str()).ok(), Some(name));
        }
    }

    #[test]
    fn fallback_chains_resolve_and_end_at_generic() {
        for p in profiles() {
            let mut cur = p;
            let mut steps = 0;
            while let Some(next) = &cur.fallback {
                cur = Profile::by_name(next).expect("fallback names a registered profile");
                steps += 1;
                assert!(steps < profiles().len(), "fallback cycle from {}", p.name);
            }
            assert_eq!(cur.name, "generic", "chain from {}", p.name);
        }
        assert!(Profile::by_name("generic").map(|g| g.required_cpu_features.is_empty()).unwrap_or(false));
    }

    #[test]
    fn unknown_name_lists_available() {
        let e = Profile::by_name("jetson-tx1").unwrap_err().to_string();
        assert!(e.contains("jetson-tx1") && e.contains("raspberry-pi-5"), "{e}");
    }

    #[test]
    fn choose_dtype_picks_first_preferred_available() {
        let ort = "ort";
        let jetson = Profile::by_name("jetson-orin-nano").unwrap();
        let avail = ["fp32", "q4", "Q4F16", "int8"];
        assert_eq!(jetson.choose_dtype(Part::Decoder, ort, &avail), Some("Q4F16"));
        assert_eq!(jetson.choose_dtype(Part::VisionEncoder, ort, &avail), Some("fp32"));
        assert_eq!(jetson.choose_dtype(Part::VisionEncoder, ort, &["fp16", "fp32"]), Some("fp16"));
        assert_eq!(jetson.choose_dtype(Part::VisionEncoder, ort, &["bnb4"]), None);
        assert_eq!(jetson.choose_dtype(Part::EmbedTokens, ort, &[]), None);
        let pi = Profile::by_name("raspberry-pi-5").unwrap();
        assert_eq!(pi.choose_dtype(Part::Decoder, ort, &avail), Some("q4"));
        assert_eq!(pi.choose_dtype(Part::VisionEncoder, ort, &avail), Some("int8"));
        let x86 = Profile::by_name("x86-avx512").unwrap();
        assert_eq!(x86.choose_dtype(Part::VisionEncoder, ort, &avail), Some("fp32"));
        assert_eq!(x86.choose_dtype(Part::Decoder, ort, &avail), Some("int8"));
        // tract on x86: fp32 first (its int8 and q4 paths prefill slower there), q4 when only that exists
        for name in ["x86-avx2", "x86-avx512"] {
            let x86 = Profile::by_name(name).unwrap();
            assert_eq!(x86.choose_dtype(Part::Decoder, "tract", &avail), Some("fp32"));
            assert_eq!(x86.choose_dtype(Part::VisionEncoder, "tract", &avail), Some("fp32"));
            assert_eq!(x86.choose_dtype(Part::Decoder, "tract", &["q4", "int8"]), Some("q4"));
        }
        // profiles without a tract table use the same preference for both backends, except
        // that tract never gets the dynamically quantized variants
        assert_eq!(pi.dtypes_for("tract"), pi.dtypes_for(ort));
        assert_eq!(pi.choose_dtype(Part::VisionEncoder, "tract", &avail), Some("fp32"));
        assert_eq!(pi.choose_dtype(Part::VisionEncoder, ort, &avail), Some("int8"));
        for name in ["generic-aarch64", "generic", "raspberry-pi-5", "jetson-orin-nano"] {
            let p = Profile::by_name(name).unwrap();
            for part in Part::ALL {
                let got = p.choose_dtype(part, "tract", &["int8", "uint8", "quantized", "q4", "fp32"]);
                assert!(got.is_some_and(|d| !TRACT_NEVER_AUTO.contains(&d)), "{name} {part}: {got:?}");
            }
        }
        assert_eq!(x86.pruning.method, "none");
        assert_eq!("decoder".parse::<Part>(), Ok(Part::Decoder));
        assert_eq!("decoder_model_merged".parse::<Part>(), Ok(Part::Decoder));
    }

    #[test]
    fn threads_parse_auto_and_numbers() {
        assert_eq!(Profile::by_name("raspberry-pi-5").unwrap().threads.resolve(), 4);
        assert_eq!(Profile::by_name("generic").unwrap().threads, Threads::Auto);
        assert!(Threads::Auto.resolve() >= 1);
    }

    fn bad(replace: &str, with: &str) -> String {
        let text = include_str!("../profiles/raspberry-pi-5.toml");
        assert!(text.contains(replace), "fixture text lacks {replace}");
        Profile::from_toml_str("my-pi.toml", &text.replacen(replace, with, 1)).unwrap_err().to_string()
    }

    #[test]
    fn bad_toml_names_file_and_field() {
        let cases = [
            ("vision_encoder = [\"int8\"", "vision_encoder = [\"fp8\"", "dtypes.vision_encoder", "fp8"),
            ("threads = 4", "threads = 0", "threads", "positive"),
            ("threads = 4", "threads = \"many\"", "threads", "many"),
            ("keep_ratio = 0.25", "keep_ratio = 1.5", "pruning.keep_ratio", "1.5"),
            ("keep_ratio = 0.25", "keep_ratio = \"a lot\"", "pruning.keep_ratio", "expected f32"),
            ("[\"XNNPACK\", \"CPU\"]", "[\"NNAPI\", \"CPU\"]", "execution_providers", "NNAPI"),
            ("backends = [\"ort\", \"tract\"]", "backends = [\"ort\", \"On NX\"]", "backends", "On NX"),
            ("threads = 4\n", "", "threads", "missing field"),
            ("keep_ratio = 0.25\n", "", "pruning.keep_ratio", "missing field"),
            ("[\"neon\", \"dotprod\"]", "[\"neon\", \"dotprd\"]", "required_cpu_features", "dotprd"),
            ("arch = \"aarch64\"", "arch = \"riscv64\"", "arch", "riscv64"),
            ("threads = 4", "threads = 4\nthreds = 4", "threds", "unknown field"),
            ("method = \"dart\"", "method = \"none\"", "pruning.keep_ratio", "none"),
        ];
        for (from, to, field, detail) in cases {
            let e = bad(from, to);
            assert!(e.contains("my-pi.toml"), "{e}");
            assert!(e.contains(&format!("field `{field}`")), "expected field {field}: {e}");
            assert!(e.contains(detail), "expected {detail}: {e}");
        }
        let e = bad("name = ", "name = = ");
        assert!(e.contains("my-pi.toml") && e.contains("line"), "{e}");
    }

    #[test]
    fn detect_rules_match_boards_and_are_validated() {
        let nano = Profile::by_name("jetson-orin-nano").unwrap().detect.clone().unwrap();
        assert!(nano.matches_board("NVIDIA Jetson Orin Nano Developer Kit", false));
        assert!(nano.matches_board("Orin NX", true), "Jetson Linux stands in for the name");
        assert!(!nano.matches_board("Orin NX", false));
        assert!(!nano.matches_board("NVIDIA Jetson AGX Orin", true), "AGX is the other profile");
        let agx = Profile::by_name("jetson-agx-orin").unwrap().detect.clone().unwrap();
        assert!(agx.matches_board("NVIDIA Jetson AGX Orin", true));
        assert!(!DetectRules { default_for_arch: true, ..Default::default() }.matches_board("anything", true));
        let e = bad("[detect]\ndevice_all = [\"Raspberry Pi 5\"]", "[detect]\ndevice_all = []\njetson = true");
        assert!(e.contains("detect.device_all"), "{e}");
        let e = bad("device_all = [\"Raspberry Pi 5\"]", "device_al = [\"Raspberry Pi 5\"]");
        assert!(e.contains("device_al"), "{e}");
    }

    #[test]
    fn from_file_reports_missing_files() {
        let e = Profile::from_file(Path::new("/nonexistent/p.toml")).unwrap_err();
        assert!(matches!(e, ProfileError::Io { .. }));
    }
}
