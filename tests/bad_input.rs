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
    // tiny-smolvlm ships fp32 only (tiny-llava also has fp16, which turns this into MissingVariant)
    let tmp = temp_copy(&model("tiny-smolvlm"));
    std::fs::remove_file(tmp.path().join("onnx/decoder_model_merged.onnx")).unwrap();
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
        image_limits: glimpse::runtime::preprocess::ImageLimits { max_pixels: 100, max_side: 16384 },
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
            tiles: Some(TileSkip { budget: TileBudget::Count(1), skipped: SkippedTiles::Drop }),
            ..Default::default()
        };
        let (e, s) = msg(Pipeline::load(model(name), &opts));
        assert!(matches!(e, Error::InvalidArgument { .. }), "{name}: {e:?}");
        assert!(s.contains("--tiles") && s.contains("llava"), "{name}: {s}");
    }
}
