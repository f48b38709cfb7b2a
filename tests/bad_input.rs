//! Bad input gets a typed error naming the file, field or value: never a panic or a hang.

mod common;

use std::path::Path;

use common::*;
use glimpse::runtime::{Error, GenerationOptions, Pipeline, PipelineOptions};

fn load(dir: &Path) -> Result<Pipeline, Error> {
    Pipeline::load(dir, &PipelineOptions::default())
}

fn msg<T: std::fmt::Debug>(r: Result<T, Error>) -> (Error, String) {
    let e = r.expect_err("expected an error");
    let s = e.to_string();
    (e, s)
}

#[test]
fn missing_config_json_names_the_file() {
    let tmp = temp_copy(&model("tiny-smolvlm"));
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let (e, s) = msg(load(tmp.path()));
    assert!(matches!(e, Error::MissingFile { .. }), "{e:?}");
    assert!(s.contains("config.json"), "{s}");
}

#[test]
fn missing_onnx_part_names_the_file() {
    // every variant removed (with one left, this is MissingVariant: the next test)
    let tmp = temp_copy(&model("tiny-smolvlm"));
    for v in ["", "_fp16"] {
        std::fs::remove_file(tmp.path().join(format!("onnx/decoder_model_merged{v}.onnx"))).unwrap();
    }
    let (e, s) = msg(load(tmp.path()));
    assert!(matches!(e, Error::MissingFile { .. }), "{e:?}");
    assert!(s.contains("decoder_model_merged.onnx"), "{s}");
}

#[test]
fn missing_dtype_variant_lists_what_exists() {
    let opts = PipelineOptions { dtype: "q4".parse().unwrap(), ..Default::default() };
    let (e, s) = msg(Pipeline::load(model("tiny-llava"), &opts));
    assert!(matches!(e, Error::MissingVariant { .. }), "{e:?}");
    assert!(s.contains("q4") && s.contains("fp32"), "{s}");
    assert!("fp64".parse::<glimpse::runtime::Dtype>().is_err());
}

#[test]
fn unknown_model_type_lists_supported_ones() {
    let tmp = temp_copy(&model("tiny-smolvlm"));
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["model_type"] = "florence9".into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let (e, s) = msg(load(tmp.path()));
    assert!(matches!(e, Error::UnknownModelType { .. }), "{e:?}");
    assert!(s.contains("florence9") && s.contains("idefics3") && s.contains("llava"), "{s}");
}

#[test]
fn corrupt_config_json_is_a_json_error() {
    let tmp = temp_copy(&model("tiny-smolvlm"));
    std::fs::write(tmp.path().join("config.json"), "{ not json").unwrap();
    let (e, s) = msg(load(tmp.path()));
    assert!(matches!(e, Error::Json { .. }), "{e:?}");
    assert!(s.contains("config.json"), "{s}");
}

#[test]
fn corrupt_and_truncated_onnx_are_errors() {
    for damage in ["garbage", "truncate"] {
        let tmp = temp_copy(&model("tiny-llava"));
        let path = tmp.path().join("onnx/embed_tokens.onnx");
        let bytes = std::fs::read(&path).unwrap();
        let new: Vec<u8> = match damage {
            "garbage" => (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(),
            _ => bytes[..bytes.len() / 2].to_vec(),
        };
        std::fs::write(&path, new).unwrap();
        let (e, s) = msg(load(tmp.path()));
        assert!(matches!(e, Error::OnnxLoad { .. }), "{damage}: {e:?}");
        assert!(s.contains("embed_tokens.onnx"), "{damage}: {s}");
    }
}

#[test]
fn external_data_outside_the_model_folder_is_refused() {
    use prost::Message;
    use tract_onnx::pb;
    let outer = tempfile::tempdir().unwrap();
    let secret = outer.path().join("secret.bin");
    std::fs::write(&secret, vec![0u8; 1 << 16]).unwrap();
    for location in ["../../secret.bin".to_string(), secret.display().to_string()] {
        let dir = outer.path().join("model");
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&model("tiny-llava"), &dir);
        let path = dir.join("onnx/embed_tokens.onnx");
        let mut proto = pb::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        let init = graph.initializer.iter_mut().max_by_key(|t| t.raw_data.len()).unwrap();
        let len = init.raw_data.len();
        init.raw_data.clear();
        init.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        init.external_data = vec![
            pb::StringStringEntryProto { key: "location".into(), value: location.clone() },
            pb::StringStringEntryProto { key: "offset".into(), value: "0".into() },
            pb::StringStringEntryProto { key: "length".into(), value: len.to_string() },
        ];
        std::fs::write(&path, proto.encode_to_vec()).unwrap();
        let (e, s) = msg(load(&dir));
        assert!(matches!(e, Error::ExternalDataOutside { .. }), "{location}: {e:?}");
        assert!(s.contains(&location) && s.contains("embed_tokens.onnx"), "{s}");
    }
}

#[test]
fn corrupt_truncated_and_oversized_images_are_errors() {
    let p = load(&model("tiny-smolvlm")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let png = std::fs::read(repo().join("models/images/small.png")).unwrap();

    let truncated = tmp.path().join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    let garbage = tmp.path().join("garbage.jpg");
    std::fs::write(&garbage, b"\xff\xd8\xff\xe0 definitely not a jpeg").unwrap();
    let text = tmp.path().join("notes.png");
    std::fs::write(&text, b"hello").unwrap();
    for bad in [&truncated, &garbage, &text] {
        let (e, s) = msg(p.ask(Some(bad), "What is in the image?", &GenerationOptions::default(), &mut |_| {}));
        assert!(matches!(e, Error::Image { .. }), "{}: {e:?}", bad.display());
        assert!(s.contains(bad.file_name().unwrap().to_str().unwrap()), "{s}");
    }

    let missing = tmp.path().join("nope.png");
    let (e, _) = msg(p.ask(Some(&missing), "hi", &GenerationOptions::default(), &mut |_| {}));
    assert!(matches!(e, Error::MissingFile { .. }), "{e:?}");

    // A PNG whose header claims 100000 x 100000 pixels is refused before decoding.
    let mut big = image::RgbImage::new(8, 8);
    big.put_pixel(0, 0, image::Rgb([1, 2, 3]));
    let mut bytes = Vec::new();
    big.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    // IHDR width/height live at bytes 16..24; the CRC no longer matches, which decoders must
    // not reach because the size check comes first.
    bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let huge = tmp.path().join("huge.png");
    std::fs::write(&huge, &bytes).unwrap();
    let (e, s) = msg(p.ask(Some(&huge), "hi", &GenerationOptions::default(), &mut |_| {}));
    assert!(matches!(e, Error::ImageTooLarge { .. } | Error::Image { .. }), "{e:?}");
    assert!(s.contains("huge.png"), "{s}");

    // A real image over a small configured limit.
    let opts = PipelineOptions {
        image_limits: glimpse::runtime::preprocess::ImageLimits { max_pixels: 100, ..Default::default() },
        ..Default::default()
    };
    let small_limit = Pipeline::load(model("tiny-smolvlm"), &opts).unwrap();
    let (e, s) = msg(small_limit.ask(
        Some(&repo().join("models/images/small.png")),
        "hi",
        &GenerationOptions::default(),
        &mut |_| {},
    ));
    assert!(matches!(e, Error::ImageTooLarge { .. }), "{e:?}");
    assert!(s.contains("small.png"), "{s}");
}

#[test]
fn prompt_past_the_context_is_an_error() {
    for name in TINY_MODELS {
        let p = load(&model(name)).unwrap();
        let long = "the red square is left of the blue circle ".repeat(p.context_length() / 4);
        let (e, s) = msg(p.ask(
            Some(&repo().join("models/images/small.png")),
            &long,
            &GenerationOptions::default(),
            &mut |_| {},
        ));
        assert!(matches!(e, Error::ContextOverflow { .. }), "{name}: {e:?}");
        assert!(s.contains(&p.context_length().to_string()), "{s}");
    }
}

#[test]
fn generation_stops_at_the_context_end() {
    let p = load(&model("tiny-llava")).unwrap();
    let opts = GenerationOptions { max_new_tokens: 100_000, ..Default::default() };
    let a = p.ask(None, "hi", &opts, &mut |_| {}).unwrap();
    assert!(a.stats.prompt_tokens + a.stats.new_tokens <= p.context_length());
}

/// A damaged setting: the file, the field the error must name, and the edit of the JSON.
type Damage = (&'static str, &'static str, fn(&mut serde_json::Value));

#[test]
fn bad_anyres_settings_name_file_and_field() {
    // LLaVA-OneVision settings the family cannot honour
    let cases: [Damage; 3] = [
        ("config.json", "vision_aspect_ratio", |c| c["vision_aspect_ratio"] = "anyres".into()),
        ("preprocessor_config.json", "image_grid_pinpoints", |c| {
            c["image_grid_pinpoints"] = serde_json::json!([[32, 0]])
        }),
        ("config.json", "vision_feature_select_strategy", |c| c["vision_feature_select_strategy"] = "default".into()),
    ];
    for (file, field, edit) in cases {
        let tmp = temp_copy(&model("tiny-llava-onevision"));
        let path = tmp.path().join(file);
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
        let (e, s) = msg(load(tmp.path()));
        assert!(matches!(e, Error::Field { .. }), "{field}: {e:?}");
        assert!(s.contains(file) && s.contains(field), "{field}: {s}");
    }
}

#[test]
fn tile_skipping_on_an_untiled_family_is_an_error() {
    use glimpse::runtime::{SkippedTiles, TileBudget, TileSkip};
    for name in ["tiny-llava", "tiny-llava-onevision"] {
        let opts = PipelineOptions {
            tiles: Some(TileSkip { budget: TileBudget::Count(1), skipped: SkippedTiles::Drop, relevance: 0.0 }),
            ..Default::default()
        };
        let (e, s) = msg(Pipeline::load(model(name), &opts));
        assert!(matches!(e, Error::InvalidArgument { .. }), "{name}: {e:?}");
        assert!(s.contains("--tiles") && s.contains("llava"), "{name}: {s}");
    }
}

/// Sets a dotted field of a JSON file in a model folder.
fn set_json(dir: &Path, file: &str, dotted: &str, value: serde_json::Value) {
    let path = dir.join(file);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut cur = &mut v;
    let keys: Vec<&str> = dotted.split('.').collect();
    for k in &keys[..keys.len() - 1] {
        cur = cur.get_mut(*k).unwrap_or_else(|| panic!("{dotted}"));
    }
    cur[keys[keys.len() - 1]] = value;
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Sizes that would allocate terabytes or divide by zero are refused when the folder loads,
/// naming the file and field (they used to abort the process or answer from NaN pixels).
#[test]
fn hostile_preprocessor_values_are_refused_at_load() {
    use serde_json::json;
    let cases = [
        ("tiny-llava", "size.shortest_edge", json!(1_000_000_000u64), "1..=8192"),
        ("tiny-smolvlm", "max_image_size.longest_edge", json!(1_000_000), "1..=8192"),
        ("tiny-smolvlm", "size.longest_edge", json!(1_000_000), "1..=8192"),
        ("tiny-smolvlm", "size.longest_edge", json!(0), "1..=8192"),
        ("tiny-smolvlm", "image_std", json!([0.0, 0.0, 0.0]), "positive"),
        ("tiny-llava-onevision", "image_std", json!([1.0, 0.0, 1.0]), "positive"),
    ];
    for (name, field, value, detail) in cases {
        let tmp = temp_copy(&model(name));
        set_json(tmp.path(), "preprocessor_config.json", field, value.clone());
        let (e, s) = msg(load(tmp.path()));
        assert!(matches!(e, Error::Field { .. }), "{name} {field}={value}: {e:?}");
        assert!(s.contains("preprocessor_config.json") && s.contains(field) && s.contains(detail), "{s}");
    }
}

/// An image that would become more visual tokens than the context holds is refused before
/// the encoder's input is allocated (1025 tiles used to take gigabytes and most of a minute).
#[test]
fn too_many_tiles_for_the_context_is_refused_before_preprocessing() {
    let tmp = temp_copy(&model("tiny-smolvlm"));
    set_json(tmp.path(), "preprocessor_config.json", "size.longest_edge", serde_json::json!(8192));
    let p = load(tmp.path()).expect("8192 is a legal size");
    let (e, s) =
        msg(p.ask(Some(&repo().join("models/images/wide.png")), "hi", &GenerationOptions::default(), &mut |_| {}));
    assert!(matches!(e, Error::ContextOverflow { .. }), "{e:?}");
    assert!(s.contains("context"), "{s}");
}

/// The token count the family plans before preprocessing is the one preprocessing produces.
#[test]
fn planned_visual_tokens_equal_the_preprocessed_ones() {
    for name in ["tiny-smolvlm", "testbed-smolvlm"] {
        let p = load(&model(name)).unwrap();
        for img in ["small.png", "wide.png", "strip.png", "scene.png", "scene-small.png"] {
            let image = p.load_image(&repo().join("models/images").join(img)).unwrap();
            let planned = p.family.planned_tokens(image.width(), image.height()).expect("idefics3 plans");
            assert_eq!(planned, p.preprocess(&image).unwrap().total_tokens(), "{name} {img}");
        }
    }
}

/// Paths that are not regular files, files over the size limit and files that do not start
/// like an image are refused before they are read; a JPEG cut short is refused, not answered
/// from grey pixels.
#[test]
fn image_files_are_checked_before_they_are_read() {
    use glimpse::runtime::preprocess::{load_image, ImageLimits};
    let tmp = tempfile::tempdir().unwrap();
    let limits = ImageLimits::default();
    for (path, detail) in [(tmp.path().to_path_buf(), "not a regular file"), ("/dev/zero".into(), "not a regular file")]
    {
        let s = load_image(&path, limits).unwrap_err().to_string();
        assert!(s.contains(detail), "{}: {s}", path.display());
    }
    let big = tmp.path().join("big.png");
    std::fs::write(&big, vec![0u8; 4096]).unwrap();
    let s = load_image(&big, ImageLimits { max_file_bytes: 1024, ..limits }).unwrap_err().to_string();
    assert!(s.contains("over the limit") && s.contains("4096"), "{s}");
    let s = load_image(&big, limits).unwrap_err().to_string();
    assert!(s.contains("unrecognised image format"), "{s}");
    let img = image::open(repo().join("models/images/small.png")).unwrap().to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode_image(&img).unwrap();
    let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let cut = tmp.path().join("cut.jpg");
    std::fs::write(&cut, &jpeg[..sos + 20]).unwrap();
    let p = load(&model("tiny-llava")).unwrap();
    let (e, s) = msg(p.ask(Some(&cut), "hi", &GenerationOptions::default(), &mut |_| {}));
    assert!(matches!(e, Error::Image { .. }) && s.contains("truncated"), "{s}");
}

/// A literal image placeholder in a text-only prompt is explained, not reported as a splice
/// mismatch.
#[test]
fn an_image_placeholder_without_an_image_is_explained() {
    let p = load(&model("tiny-llava")).unwrap();
    let (e, s) = msg(p.ask(None, "look: <image>", &GenerationOptions::default(), &mut |_| {}));
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
    assert!(s.contains("no image was given") && s.contains("<image>"), "{s}");
}

/// A part that exists but is no file (directory, FIFO, looping symlink) is named as such, not
/// reported as a missing dtype variant.
#[test]
fn a_part_that_is_not_a_regular_file_is_named() {
    for kind in ["dir", "fifo", "loop"] {
        let tmp = temp_copy(&model("tiny-smolvlm"));
        let part = tmp.path().join("onnx/decoder_model_merged.onnx");
        std::fs::remove_file(&part).unwrap();
        let want = match kind {
            "dir" => {
                std::fs::create_dir(&part).unwrap();
                "directory"
            }
            "fifo" => {
                let status = std::process::Command::new("mkfifo").arg(&part).status().expect("mkfifo");
                assert!(status.success());
                "pipe"
            }
            _ => {
                std::os::unix::fs::symlink(&part, &part).unwrap();
                "symbolic link"
            }
        };
        let (e, s) = msg(load(tmp.path()));
        assert!(matches!(e, Error::MissingFile { .. }), "{kind}: {e:?}");
        assert!(s.contains("decoder_model_merged.onnx") && s.contains(want), "{kind}: {s}");
    }
}

/// A model that would not fit the memory budget is refused before any part is loaded, naming
/// the parts, their sizes and the budget's source.
#[test]
fn a_model_over_the_memory_budget_is_refused_before_loading() {
    let opts = PipelineOptions {
        max_memory: Some(glimpse::runtime::memory::MemoryLimit { bytes: 100 * 1024, from: "--max-memory".into() }),
        ..Default::default()
    };
    let (e, s) = msg(Pipeline::load(model("tiny-llava"), &opts));
    assert!(matches!(e, Error::MemoryBudget { .. }), "{e:?}");
    assert!(s.contains("--max-memory") && s.contains("decoder_model_merged fp32") && s.contains("MB"), "{s}");
    let roomy = PipelineOptions {
        max_memory: Some(glimpse::runtime::memory::MemoryLimit { bytes: 1 << 30, from: "--max-memory".into() }),
        ..Default::default()
    };
    Pipeline::load(model("tiny-llava"), &roomy).expect("fits in 1 GiB");
}
