//! Model folders as users have them: transformers v5 processor files, Hugging Face cache
//! snapshots (symlinks into `blobs/`, external data), per-part dtype choices. Each case answers
//! with the committed transformers tokens, or fails with a message naming what is wrong.

mod common;

use std::path::Path;

use common::*;
use glimpse::runtime::folder::Part;
use glimpse::runtime::{Dtype, Error, GenerationOptions, Pipeline, PipelineOptions};

fn first_case_tokens(dir: &Path, fixtures_of: &str) -> (Vec<i64>, Vec<i64>) {
    let p = Pipeline::load(dir, &PipelineOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let case = &cases(&model(fixtures_of)).1[0];
    let gen = GenerationOptions {
        max_new_tokens: case.json["max_new_tokens"].as_u64().expect("max_new_tokens") as usize,
        ..Default::default()
    };
    let a = p.ask(Some(&case.image()), case.prompt(), &gen, &mut |_| {}).expect("ask");
    (a.token_ids, case.ints("generated_ids"))
}

/// transformers v5 `processor.save_pretrained` nests the image processor in
/// `processor_config.json` and writes no `preprocessor_config.json`.
#[test]
fn image_processor_settings_nested_in_processor_config_are_read() {
    let tmp = temp_copy(&model("tiny-smolvlm"));
    let pre_path = tmp.path().join("preprocessor_config.json");
    let pre: serde_json::Value = serde_json::from_slice(&std::fs::read(&pre_path).unwrap()).unwrap();
    let proc_path = tmp.path().join("processor_config.json");
    let mut proc: serde_json::Value = serde_json::from_slice(&std::fs::read(&proc_path).unwrap()).unwrap();
    proc["image_processor"] = pre;
    std::fs::write(&proc_path, serde_json::to_vec_pretty(&proc).unwrap()).unwrap();
    std::fs::remove_file(&pre_path).unwrap();
    let (got, want) = first_case_tokens(tmp.path(), "tiny-smolvlm");
    assert_eq!(got, want);
}

#[test]
fn a_folder_with_neither_processor_file_names_both() {
    let tmp = temp_copy(&model("tiny-llava"));
    std::fs::remove_file(tmp.path().join("preprocessor_config.json")).unwrap();
    // tiny-llava's processor_config.json nests the settings too (transformers v5): still loads
    Pipeline::load(tmp.path(), &PipelineOptions::default()).expect("settings from processor_config.json");
    let proc_path = tmp.path().join("processor_config.json");
    let mut proc: serde_json::Value = serde_json::from_slice(&std::fs::read(&proc_path).unwrap()).unwrap();
    proc.as_object_mut().unwrap().remove("image_processor");
    std::fs::write(&proc_path, serde_json::to_vec(&proc).unwrap()).unwrap();
    let e = Pipeline::load(tmp.path(), &PipelineOptions::default()).expect_err("no image processor");
    let s = e.to_string();
    assert!(matches!(e, Error::MissingFile { .. }), "{e:?}");
    assert!(s.contains("preprocessor_config.json") && s.contains("processor_config.json"), "{s}");
    assert!(s.contains("image_processor"), "{s}");
}

/// Moves the largest initializer of an ONNX file into `location` (external data).
fn externalise(onnx: &Path, location: &str, data_file: &Path) {
    use prost::Message;
    use tract_onnx::pb;
    let mut proto = pb::ModelProto::decode(std::fs::read(onnx).unwrap().as_slice()).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let init = graph.initializer.iter_mut().max_by_key(|t| t.raw_data.len()).unwrap();
    let data = std::mem::take(&mut init.raw_data);
    init.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
    init.external_data = vec![
        pb::StringStringEntryProto { key: "location".into(), value: location.into() },
        pb::StringStringEntryProto { key: "offset".into(), value: "0".into() },
        pb::StringStringEntryProto { key: "length".into(), value: data.len().to_string() },
    ];
    std::fs::write(data_file, &data).unwrap();
    std::fs::write(onnx, proto.encode_to_vec()).unwrap();
}

/// Lays a model folder out as the Hugging Face cache does: every file a symlink from
/// `models--org--name/snapshots/<rev>/` into `blobs/`, the embed part with external data.
fn hf_cache_snapshot(from: &Path, cache: &Path) -> std::path::PathBuf {
    let repo = cache.join("models--glimpse--tiny-llava");
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&blobs).unwrap();
    let staging = cache.join("staging");
    copy_dir(from, &staging);
    externalise(
        &staging.join("onnx/embed_tokens.onnx"),
        "embed_tokens.onnx_data",
        &staging.join("onnx/embed_tokens.onnx_data"),
    );
    let mut n = 0;
    let link_all = |dir: &Path, rel: &Path, n: &mut usize| {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                *n += 1;
                let blob = blobs.join(format!("blob{n:04}"));
                std::fs::rename(e.path(), &blob).unwrap();
                let link = snap.join(rel).join(e.file_name());
                std::fs::create_dir_all(link.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(&blob, &link).unwrap();
            }
        }
    };
    link_all(&staging, Path::new(""), &mut n);
    link_all(&staging.join("onnx"), Path::new("onnx"), &mut n);
    link_all(&staging.join("fixtures"), Path::new("fixtures"), &mut n);
    snap
}

#[test]
fn a_hugging_face_cache_snapshot_with_external_data_loads() {
    let cache = tempfile::tempdir().unwrap();
    let snap = hf_cache_snapshot(&model("tiny-llava"), cache.path());
    assert!(std::fs::symlink_metadata(snap.join("onnx/embed_tokens.onnx_data")).unwrap().file_type().is_symlink());
    let (got, want) = first_case_tokens(&snap, "tiny-llava");
    assert_eq!(got, want);
}

#[test]
fn a_symlink_out_of_the_folder_and_its_cache_is_refused_and_says_so() {
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("model");
    copy_dir(&model("tiny-llava"), &dir);
    let elsewhere = outer.path().join("elsewhere.bin");
    externalise(&dir.join("onnx/embed_tokens.onnx"), "embed_tokens.onnx_data", &elsewhere);
    std::os::unix::fs::symlink(&elsewhere, dir.join("onnx/embed_tokens.onnx_data")).unwrap();
    let e = Pipeline::load(&dir, &PipelineOptions::default()).expect_err("symlink out of the folder");
    let s = e.to_string();
    assert!(matches!(e, Error::ExternalDataOutside { .. }), "{e:?}");
    assert!(s.contains("symbolic link") && s.contains("elsewhere.bin"), "{s}");
}

/// `--dtype decoder=fp16` loads the fp16 decoder and fp32 for the rest; a missing variant lists
/// what is present and how to choose.
#[test]
fn dtypes_are_chosen_per_part() {
    let opts = PipelineOptions { part_dtypes: vec![(Part::Decoder, Dtype::Fp16)], ..Default::default() };
    let p = Pipeline::load(model("tiny-llava"), &opts).expect("fp16 decoder, fp32 rest");
    assert_eq!(p.part_dtype(Part::Decoder), Dtype::Fp16);
    assert_eq!(p.part_dtype(Part::VisionEncoder), Dtype::Fp32);
    let case = &cases(&model("tiny-llava")).1[0];
    let a = p.ask(Some(&case.image()), case.prompt(), &GenerationOptions::default(), &mut |_| {}).expect("ask");
    assert!(!a.token_ids.is_empty());
    let opts = PipelineOptions { dtype: Dtype::Int8, ..Default::default() };
    let s = Pipeline::load(model("tiny-llava"), &opts).expect_err("no int8 files").to_string();
    assert!(s.contains("int8") && s.contains("fp32, fp16") && s.contains("--dtype auto"), "{s}");
}

/// ONNX Runtime reads the same snapshot (it follows the symlinks itself).
#[cfg(feature = "venv-tests")]
#[test]
fn a_hugging_face_cache_snapshot_loads_on_onnx_runtime_too() {
    use glimpse::runtime::backend::BackendOptions;
    let cache = tempfile::tempdir().unwrap();
    let snap = hf_cache_snapshot(&model("tiny-llava"), cache.path());
    let opts = PipelineOptions {
        backend: "ort".into(),
        backend_options: BackendOptions { ort_library: Some(ort_library()), threads: 1, ..Default::default() },
        ..Default::default()
    };
    let p = Pipeline::load(&snap, &opts).unwrap_or_else(|e| panic!("{e}"));
    let case = &cases(&model("tiny-llava")).1[0];
    let gen = GenerationOptions { max_new_tokens: 20, ..Default::default() };
    let a = p.ask(Some(&case.image()), case.prompt(), &gen, &mut |_| {}).expect("ask");
    assert_eq!(a.token_ids, case.ints("generated_ids"));
}

/// A cache repo whose `blobs` is itself a symlink could name any tree; the exception for cache
/// snapshots does not apply then, so data linked through it is refused.
#[test]
fn a_snapshot_whose_blobs_is_a_symlink_is_refused() {
    let cache = tempfile::tempdir().unwrap();
    let snap = hf_cache_snapshot(&model("tiny-llava"), cache.path());
    let repo = snap.parent().unwrap().parent().unwrap().to_path_buf();
    let elsewhere = cache.path().join("elsewhere");
    std::fs::rename(repo.join("blobs"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, repo.join("blobs")).unwrap();
    let e = Pipeline::load(&snap, &PipelineOptions::default()).expect_err("blobs is a symlink");
    assert!(matches!(e, Error::ExternalDataOutside { .. }), "{e:?}");
}
