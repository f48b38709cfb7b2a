//! Detection against committed `/proc` + `/etc` snapshots of each supported device class.

use std::path::{Path, PathBuf};

use glimpse_targets::{detect_from_root, DetectError, Detected, GpuKind, Part};

fn fixture(name: &str) -> Detected {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    match detect_from_root(&root) {
        Ok(d) => {
            assert!(d.warnings.is_empty(), "{name}: {:?}", d.warnings);
            assert_eq!(d.recommended_profile, d.choose_profile().name);
            d
        }
        Err(e) => panic!("{name}: {e}"),
    }
}

fn features(d: &Detected) -> Vec<&str> {
    d.cpu_features.iter().map(String::as_str).collect()
}

#[test]
fn jetson_orin_nano() {
    let d = fixture("jetson-orin-nano");
    assert_eq!(d.device.as_deref(), Some("NVIDIA Jetson Orin Nano Developer Kit"));
    let j = d.jetson.as_ref().expect("L4T release");
    assert_eq!((j.l4t_major, j.revision.as_str(), j.l4t_version()), (36, "4.3", "36.4.3".to_string()));
    assert_eq!(d.arch, "aarch64");
    assert_eq!(d.cpu_model.as_deref(), Some("Cortex-A78AE"));
    assert_eq!(d.cpu_count, Some(6));
    assert_eq!(features(&d), ["neon", "fp16", "dotprod"]);
    let gpu = d.gpu.as_ref().expect("iGPU");
    assert_eq!((gpu.kind, gpu.compute_capability.as_deref()), (GpuKind::Integrated, Some("8.7")));
    assert_eq!(d.recommended_profile, "jetson-orin-nano");
    let p = d.choose_profile();
    assert_eq!(p.execution_providers[0].name(), "TensorRT");
    let text = d.to_string();
    assert!(text.contains("L4T 36.4.3") && text.contains("profile:   jetson-orin-nano"), "{text}");
    let text = p.to_string();
    assert!(text.contains("TensorRT, CUDA, CPU") && text.contains("q4f16, q4, fp16, fp32"), "{text}");
    assert_eq!(p.choose_dtype(Part::Decoder, "ort", &["fp32", "q4", "q4f16"]), Some("q4f16"));
}

#[test]
fn jetson_agx_orin() {
    let d = fixture("jetson-agx-orin");
    assert_eq!(d.device.as_deref(), Some("NVIDIA Jetson AGX Orin Developer Kit"));
    assert_eq!(d.jetson.as_ref().map(|j| j.l4t_version()), Some("35.5.0".to_string()));
    assert_eq!(d.jetson.as_ref().and_then(|j| j.board.as_deref()), Some("t186ref"));
    assert_eq!(d.cpu_count, Some(12));
    assert!(d.has("dotprod") && !d.has("i8mm"));
    assert_eq!(d.gpu.as_ref().map(|g| g.kind), Some(GpuKind::Integrated));
    assert_eq!(d.recommended_profile, "jetson-agx-orin");
}

#[test]
fn raspberry_pi_5() {
    let d = fixture("raspberry-pi-5");
    assert_eq!(d.device.as_deref(), Some("Raspberry Pi 5 Model B Rev 1.0"));
    assert!(d.jetson.is_none() && d.gpu.is_none());
    assert_eq!(d.cpu_model.as_deref(), Some("Cortex-A76"));
    assert_eq!(d.cpu_count, Some(4));
    assert_eq!(features(&d), ["neon", "fp16", "dotprod"]);
    assert_eq!(d.recommended_profile, "raspberry-pi-5");
    let p = d.choose_profile();
    assert_eq!((p.pruning.method.as_str(), p.pruning.keep_ratio), ("dart", 0.25));
    assert_eq!(p.threads.resolve(), 4);
}

#[test]
fn x86_avx512() {
    let d = fixture("x86-avx512");
    assert_eq!(d.device, None);
    assert_eq!(d.arch, "x86_64");
    assert_eq!(d.cpu_model.as_deref(), Some("Intel(R) Xeon(R) Platinum 8480+"));
    assert_eq!(d.cpu_count, Some(8));
    for f in [
        "sse4.1",
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
    ] {
        assert!(d.has(f), "{f}");
    }
    assert_eq!(d.gpu, None);
    assert_eq!(d.recommended_profile, "x86-avx512");
    assert_eq!(d.choose_profile().pruning.method, "none");
}

#[test]
fn x86_avx2_with_discrete_gpu() {
    let d = fixture("x86-avx2");
    assert_eq!(d.cpu_model.as_deref(), Some("AMD Ryzen 7 5800X 8-Core Processor"));
    assert_eq!(d.cpu_count, Some(16));
    assert!(d.has("avx2") && d.has("fma") && !d.has("avx512f") && !d.has("avxvnni"));
    let gpu = d.gpu.as_ref().expect("discrete GPU");
    assert_eq!((gpu.name.as_str(), gpu.kind), ("NVIDIA GeForce RTX 3060", GpuKind::Discrete));
    // Falls from x86-avx512 down its fallback chain.
    assert_eq!(d.recommended_profile, "x86-avx2");
}

#[test]
fn generic_fallbacks() {
    let d = fixture("generic-aarch64");
    assert_eq!((d.device.as_deref(), d.cpu_model.as_deref()), (None, Some("Neoverse-N1")));
    assert_eq!(d.recommended_profile, "generic-aarch64");

    let d = fixture("x86-sse-only");
    assert!(d.has("sse4.1") && !d.has("avx2"));
    assert_eq!(d.recommended_profile, "generic");

    // A root with none of the files: nothing known, generic profile.
    let d = fixture("x86-avx2/proc/driver");
    assert_eq!((d.arch.as_str(), d.cpu_count, d.recommended_profile), ("unknown", None, "generic"));
}

#[test]
fn board_profile_needs_its_cpu_features() {
    // A "Raspberry Pi 5" whose cpuinfo lacks dotprod (masked by a VM) must not get the Pi profile.
    let mut d = fixture("raspberry-pi-5");
    d.cpu_features.retain(|f| f != "dotprod");
    assert_eq!(d.choose_profile().name, "generic-aarch64");
}

#[test]
fn missing_root_is_an_error() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/does-not-exist");
    assert!(matches!(detect_from_root(&root), Err(DetectError::NotADirectory { .. })));
}
