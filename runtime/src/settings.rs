//! One config layer: what the user asked for ([`Asked`], `None` = flag not given), the target
//! profile in use (detected, or named by `--target`) and the built-in defaults settle into the
//! settings a pipeline is built with. Every setting records where it came from ([`Applied`]), so
//! `glimpse ask --json` can say what was applied and why.

use serde::Serialize;

use crate::backend::{self, BackendOptions};
use crate::error::{Error, Result};
use crate::folder::{Dtype, ModelFolder, Part};
use crate::select::{self, Budget};
use glimpse_targets::Profile;

/// Where a setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A command-line flag (or the library caller).
    Flag,
    /// The target profile in use.
    Profile,
    /// Glimpse's built-in default.
    Default,
    /// Detected on this machine.
    Detected,
}

/// A settled value, where it came from, and a note when something was skipped or does not
/// apply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice<T> {
    pub value: T,
    pub from: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl<T> Choice<T> {
    fn new(value: T, from: Source) -> Self {
        Choice { value, from, note: None }
    }

    fn noted(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// What the user asked for; `None` leaves the choice to the profile or the default.
#[derive(Debug, Clone, Default)]
pub struct Asked {
    /// `--target`: a built-in profile name.
    pub target: Option<String>,
    /// `--backend`.
    pub backend: Option<String>,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--prune`.
    pub prune: Option<String>,
    /// `--keep`.
    pub keep: Option<Budget>,
    /// `--ep`: ONNX Runtime execution providers (empty: the profile's).
    pub execution_providers: Vec<String>,
    /// `--fast` (`None`: the profile's default).
    pub fast: Option<bool>,
    /// `--max-memory` in bytes (`None`: the profile's `[memory]` share, else what is free).
    pub max_memory: Option<u64>,
}

/// The settled choices.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Applied {
    /// The target profile in use.
    pub profile: Choice<String>,
    pub backend: Choice<String>,
    /// Intra-op threads.
    pub threads: Choice<usize>,
    /// Selection method.
    pub prune: Choice<String>,
    /// Keep budget (`1` keeps everything).
    pub keep: Choice<String>,
    /// ONNX Runtime execution providers, in priority order.
    pub execution_providers: Choice<Vec<String>>,
    /// The `--fast` preset (from the profile: only where the folder has stages).
    pub fast: Choice<bool>,
    /// The memory budget checked before loading (`None`: what the machine has free, read when
    /// the pipeline loads).
    pub max_memory: Choice<Option<crate::memory::MemoryLimit>>,
}

impl Applied {
    /// The preset as pipeline options take it.
    pub fn fast_mode(&self) -> crate::pipeline::Fast {
        match (self.fast.value, self.fast.from) {
            (false, _) => crate::pipeline::Fast::Off,
            (true, Source::Flag) => crate::pipeline::Fast::On,
            (true, _) => crate::pipeline::Fast::WhereStaged,
        }
    }
}

/// The profile named by `target`, or the one detected for this machine.
pub fn profile(target: Option<&str>) -> Result<(&'static Profile, Source)> {
    match target {
        Some(name) => {
            Profile::by_name(name).map(|p| (p, Source::Flag)).map_err(|e| Error::invalid("target", name, e.to_string()))
        }
        None => Ok((glimpse_targets::detect().choose_profile(), Source::Detected)),
    }
}

/// Settles the choices of `asked` against the profile in use. Without `--backend`, the first of
/// the profile's backends that this build has and that starts (ONNX Runtime needs its library)
/// is used; the ones skipped are noted.
pub fn settle(asked: &Asked, opts: &BackendOptions) -> Result<(Applied, BackendOptions)> {
    let (profile, profile_from) = profile(asked.target.as_deref())?;
    let name = profile.name.clone();
    let mut opts = opts.clone();
    let execution_providers = if asked.execution_providers.is_empty() {
        Choice::new(profile.execution_providers.iter().map(|p| p.name().to_string()).collect(), Source::Profile)
    } else {
        Choice::new(asked.execution_providers.clone(), Source::Flag)
    };
    opts.execution_providers = execution_providers.value.clone();
    let threads = match asked.threads {
        Some(n) => {
            let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            if n > cpus {
                return Err(Error::invalid(
                    "threads",
                    n,
                    format!("this machine has {cpus} logical CPUs; more threads than that only slow inference down (0 = the backend's default)"),
                ));
            }
            Choice::new(n, Source::Flag)
        }
        None => Choice::new(profile.threads.resolve(), Source::Profile),
    };
    opts.threads = threads.value;
    let backend = match &asked.backend {
        Some(b) => Choice::new(b.clone(), Source::Flag),
        None => profile_backend(profile, &|b| backend::can_start(b, &opts))?,
    };
    let (prune, method_from_profile) = match &asked.prune {
        Some(m) => (Choice::new(m.clone(), Source::Flag), false),
        None => (Choice::new(profile.pruning.method.clone(), Source::Profile), true),
    };
    select::method_spec(&prune.value).map_err(|e| match prune.from {
        Source::Profile => Error::invalid("target profile pruning.method", &name, e.to_string()),
        _ => e,
    })?;
    let profile_keep = profile.pruning.keep_ratio;
    let profile_fast = profile.pruning.fast;
    let keep = match (asked.keep, method_from_profile) {
        (Some(k), _) => Choice::new(k.to_string(), Source::Flag),
        (None, true) => Choice::new(profile_keep.to_string(), Source::Profile),
        (None, false) if prune.value == select::NONE.name => Choice::new("1".to_string(), Source::Default),
        // a method without a budget: the profile's budget when it prunes, else nothing to do
        (None, false) if profile_keep < 1.0 => Choice::new(profile_keep.to_string(), Source::Profile)
            .noted(format!("the budget of profile {name}; --keep sets another")),
        (None, false) => {
            return Err(Error::invalid(
                "prune",
                &prune.value,
                "needs a budget below 1 to do anything: add --keep (a ratio such as 0.25, or a token count)",
            ))
        }
    };
    if prune.value == select::NONE.name && keep.from == Source::Flag && !keep_is_full(&keep.value) {
        return Err(Error::invalid(
            "keep",
            &keep.value,
            "has no effect with method `none`, which keeps every token: add --prune METHOD (see --help)",
        ));
    }
    let fast = match asked.fast {
        Some(f) => Choice::new(f, Source::Flag),
        None => Choice::new(profile_fast, Source::Profile),
    };
    let max_memory = match (asked.max_memory, profile.memory) {
        (Some(bytes), _) => {
            Choice::new(Some(crate::memory::MemoryLimit { bytes, from: "--max-memory".into() }), Source::Flag)
        }
        (None, Some(share)) => Choice::new(profile_memory(&name, share), Source::Profile),
        (None, None) => Choice::new(None, Source::Default),
    };
    let profile = Choice::new(name, profile_from);
    Ok((Applied { profile, backend, threads, prune, keep, execution_providers, fast, max_memory }, opts))
}

/// Profile `name`'s `[memory]` share of this machine's memory, or what is free when that is
/// less (the OS and other processes may hold more than the profile leaves them); `None` when
/// the machine's memory cannot be read.
fn profile_memory(name: &str, share: glimpse_targets::MemoryShare) -> Option<crate::memory::MemoryLimit> {
    use crate::memory::MemoryLimit;
    let (total, of) = crate::memory::total()?;
    let limit = MemoryLimit {
        bytes: share.of(total),
        from: format!("target profile {name} (memory.share {} of {of}, {:.1} GB)", share.share, total as f64 / 1e9),
    };
    match crate::memory::available() {
        Some((free, from)) if free < limit.bytes => Some(MemoryLimit { bytes: free, from: from.to_string() }),
        _ => Some(limit),
    }
}

fn keep_is_full(keep: &str) -> bool {
    keep.parse::<Budget>().is_ok_and(|b| b.is_full())
}

/// Checks a sweep of methods × keep budgets (`eval`, `profile`) for settings that would do
/// nothing: budgets below 1 with only `none` to apply them to, or methods with only full budgets.
pub fn check_sweep(methods: &[String], keeps: &[Budget]) -> Result<()> {
    if methods.iter().any(|m| m != select::NONE.name) && keeps.iter().all(|k| k.is_full()) {
        return Err(Error::invalid(
            "prune",
            methods.join(","),
            "with only keep 1 every method keeps every token: add --keep with a budget below 1 (e.g. 1.0,0.25)",
        ));
    }
    if methods.iter().all(|m| m == select::NONE.name) && keeps.iter().any(|k| !k.is_full()) {
        let list: Vec<String> = keeps.iter().map(|k| k.to_string()).collect();
        return Err(Error::invalid(
            "keep",
            list.join(","),
            "budgets below 1 have no effect with method `none` alone: add --prune METHOD[,METHOD...]",
        ));
    }
    Ok(())
}

/// The first of the profile's backends that is compiled in and for which `start` succeeds.
fn profile_backend(profile: &Profile, start: &dyn Fn(&str) -> Result<()>) -> Result<Choice<String>> {
    let mut skipped = Vec::new();
    for b in &profile.backends {
        let spec = backend::spec(b).ok_or_else(|| {
            Error::invalid(
                "target profile backends",
                format!("{} lists {b}", profile.name),
                format!(
                    "registered backends: {}",
                    backend::BACKENDS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        if !spec.compiled {
            skipped.push(format!("{b}: not in this build"));
            continue;
        }
        match start(b) {
            Ok(_) => {
                let c = Choice::new(b.clone(), Source::Profile);
                return Ok(if skipped.is_empty() { c } else { c.noted(format!("skipped {}", skipped.join("; "))) });
            }
            Err(e) => skipped.push(format!("{b}: {e}")),
        }
    }
    Err(Error::invalid(
        "backend",
        profile.name.clone(),
        format!("no backend of the profile starts ({})", skipped.join("; ")),
    ))
}

/// `--dtype`: one default for every part (a dtype, or `auto` for the profile's pick among the
/// files present) and per-part overrides: `int8`, `auto`, `decoder=int8`,
/// `decoder=int8,vision_encoder=fp32` (the rest fp32), `auto,decoder=q4`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtypeRequest {
    /// `None`: `auto`.
    pub default: Option<Dtype>,
    pub parts: Vec<(Part, Dtype)>,
}

impl Default for DtypeRequest {
    fn default() -> Self {
        DtypeRequest { default: Some(Dtype::Fp32), parts: Vec::new() }
    }
}

impl std::str::FromStr for DtypeRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut default = None;
        let mut parts: Vec<(Part, Dtype)> = Vec::new();
        let mut saw_default = false;
        for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            match item.split_once('=') {
                Some((part, dtype)) => {
                    let part: Part = part.trim().parse().map_err(|e: String| Error::invalid("dtype", s, e))?;
                    if parts.iter().any(|(p, _)| *p == part) {
                        return Err(Error::invalid("dtype", s, format!("{part} given twice")));
                    }
                    parts.push((part, dtype.trim().parse()?));
                }
                None if saw_default => {
                    return Err(Error::invalid("dtype", s, "one default dtype at most (the rest are PART=DTYPE)"))
                }
                None => {
                    saw_default = true;
                    default = if item == "auto" { None } else { Some(item.parse()?) };
                }
            }
        }
        if !saw_default {
            default = Some(Dtype::Fp32);
        }
        Ok(DtypeRequest { default, parts })
    }
}

impl std::fmt::Display for DtypeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut items = vec![self.default.map_or("auto".to_string(), |d| d.name().to_string())];
        items.extend(self.parts.iter().map(|(p, d)| format!("{}={d}", p.role())));
        f.write_str(&items.join(","))
    }
}

/// The dtype of every part for a request: explicit per-part choices, else the default, else
/// (`auto`) the profile's pick among the files present. Returns the default and the per-part list.
pub fn resolve_dtypes(
    req: &DtypeRequest,
    folder: &ModelFolder,
    profile: &Profile,
    backend: &str,
) -> Result<(Dtype, Vec<(Part, Dtype)>)> {
    match req.default {
        Some(d) => Ok((d, req.parts.clone())),
        None => {
            let mut out = req.parts.clone();
            let skip: Vec<Part> = req.parts.iter().map(|(p, _)| *p).collect();
            out.extend(auto_dtypes_except(folder, profile, backend, &skip)?);
            Ok((Dtype::Fp32, out))
        }
    }
}

/// Per-part dtypes a profile picks among the variants present in a model folder (`--dtype auto`).
pub fn auto_dtypes(folder: &ModelFolder, profile: &Profile, backend: &str) -> Result<Vec<(Part, Dtype)>> {
    auto_dtypes_except(folder, profile, backend, &[])
}

fn auto_dtypes_except(
    folder: &ModelFolder,
    profile: &Profile,
    backend: &str,
    skip: &[Part],
) -> Result<Vec<(Part, Dtype)>> {
    let mut out = Vec::new();
    for entry in folder.manifest.parts.iter().filter(|e| !skip.contains(&e.role)) {
        let part = entry.role;
        let present: Vec<&str> = folder.variants(part).iter().map(|d| d.name()).collect();
        let chosen = profile.choose_dtype(part, backend, &present).ok_or_else(|| {
            Error::invalid(
                "dtype auto",
                format!("{part}"),
                format!(
                    "target {} prefers {:?} with {backend} but the folder has only {present:?}",
                    profile.name,
                    profile.dtypes_for(backend).for_part(part),
                ),
            )
        })?;
        out.push((part, chosen.parse()?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_would_do_nothing_are_errors() {
        let asked = Asked { keep: Some(Budget::Ratio(0.5)), prune: Some("none".into()), ..Default::default() };
        let e = settle(&asked, &BackendOptions::default()).unwrap_err().to_string();
        assert!(e.contains("--prune"), "{e}");
        let asked = Asked { threads: Some(100_000), ..Default::default() };
        let e = settle(&asked, &BackendOptions::default()).unwrap_err().to_string();
        assert!(e.contains("100000") && e.contains("logical CPUs"), "{e}");
        assert!(check_sweep(&["none".into()], &[Budget::Ratio(1.0), Budget::Ratio(0.5)]).is_err());
        assert!(check_sweep(&["none".into(), "dart".into()], &[Budget::Ratio(0.5)]).is_ok());
        assert!(check_sweep(&["dart".into()], &[Budget::Ratio(1.0)]).is_err(), "a method at keep 1 only");
        assert!(check_sweep(&["none".into()], &[Budget::Ratio(1.0)]).is_ok());
    }

    #[test]
    fn dtype_requests_parse_defaults_and_parts() {
        let r: DtypeRequest = "int8".parse().unwrap();
        assert_eq!((r.default, r.parts.len()), (Some(Dtype::Int8), 0));
        let r: DtypeRequest = "decoder=int8,vision_encoder=fp32".parse().unwrap();
        assert_eq!(r.default, Some(Dtype::Fp32));
        assert_eq!(r.parts, vec![(Part::Decoder, Dtype::Int8), (Part::VisionEncoder, Dtype::Fp32)]);
        let r: DtypeRequest = "auto,decoder_model_merged=q4".parse().unwrap();
        assert_eq!((r.default, r.to_string().as_str()), (None, "auto,decoder=q4"));
        for bad in ["int8,fp16", "decoder=int8,decoder=q4", "tokenizer=int8", "decoder=int9"] {
            let e = bad.parse::<DtypeRequest>().unwrap_err().to_string();
            assert!(e.contains("dtype") || e.contains("int9"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_builtin_profile_names_registered_backends_and_methods() {
        for p in glimpse_targets::profiles() {
            for b in &p.backends {
                assert!(backend::spec(b).is_some(), "{}: backend {b}", p.name);
            }
            assert!(select::method_spec(&p.pruning.method).is_ok(), "{}: method {}", p.name, p.pruning.method);
        }
    }

    #[test]
    fn flags_override_the_profile_and_the_profile_fills_the_rest() {
        let asked =
            Asked { target: Some("raspberry-pi-5".into()), backend: Some("tract".into()), ..Default::default() };
        let (a, opts) = settle(&asked, &BackendOptions::default()).unwrap();
        assert_eq!((a.profile.value.as_str(), a.profile.from), ("raspberry-pi-5", Source::Flag));
        assert_eq!((a.backend.value.as_str(), a.backend.from), ("tract", Source::Flag));
        assert_eq!((a.threads.value, a.threads.from), (4, Source::Profile));
        assert_eq!(opts.threads, 4);
        assert_eq!((a.prune.value.as_str(), a.keep.value.as_str()), ("dart", "0.25"));
        assert_eq!(a.prune.from, Source::Profile);
        assert_eq!(opts.execution_providers, vec!["XNNPACK", "CPU"]);
        // the profile's memory share of this machine, or what is free when that is less
        let (total, _) = crate::memory::total().unwrap();
        let m = a.max_memory.value.clone().unwrap();
        assert_eq!(a.max_memory.from, Source::Profile);
        assert!(m.bytes <= (total as f64 * 0.6) as u64 && m.bytes > 0, "{m:?} of {total}");
        assert!(m.from.contains("raspberry-pi-5") || m.from.contains("MemAvailable") || m.from.contains("cgroup"));
        let flag = Asked { max_memory: Some(123), ..asked.clone() };
        let (a, _) = settle(&flag, &BackendOptions::default()).unwrap();
        assert_eq!(a.max_memory.value.map(|m| (m.bytes, m.from)), Some((123, "--max-memory".to_string())));
        let generic = Asked { target: Some("generic".into()), ..Default::default() };
        let (a, _) = settle(&generic, &BackendOptions::default()).unwrap();
        assert_eq!((a.max_memory.value, a.max_memory.from), (None, Source::Default), "generic: what is free");
        let asked = Asked { prune: Some("divprune".into()), threads: Some(1), ..asked };
        let (a, _) = settle(&asked, &BackendOptions::default()).unwrap();
        assert_eq!((a.prune.from, a.keep.value.as_str(), a.keep.from), (Source::Flag, "0.25", Source::Profile));
        assert_eq!(a.threads.from, Source::Flag);
        // a method without a budget on a profile that does not prune has nothing to do
        let asked = Asked { target: Some("generic".into()), prune: Some("dart".into()), ..Default::default() };
        let e = settle(&asked, &BackendOptions::default()).unwrap_err().to_string();
        assert!(e.contains("--keep"), "{e}");
    }

    #[test]
    fn a_profile_backend_that_cannot_start_is_skipped_with_a_note() {
        let pi = Profile::by_name("raspberry-pi-5").unwrap();
        assert_eq!(pi.backends, vec!["ort", "tract"]);
        let no_ort = |b: &str| if b == "ort" { Err(Error::invalid("backend", b, "library missing")) } else { Ok(()) };
        let c = profile_backend(pi, &no_ort).unwrap();
        assert_eq!((c.value.as_str(), c.from), ("tract", Source::Profile));
        assert!(c.note.as_deref().is_some_and(|n| n.contains("ort") && n.contains("library missing")), "{c:?}");
        let nothing = |b: &str| Err(Error::invalid("backend", b, "broken"));
        let e = profile_backend(pi, &nothing).unwrap_err().to_string();
        assert!(e.contains("raspberry-pi-5") && e.contains("broken"), "{e}");
        let opts = BackendOptions::default();
        assert!(settle(&Asked { target: Some("nope".into()), ..Default::default() }, &opts).is_err());
    }
}
