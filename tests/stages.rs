//! The staged vision encoder (`docs/stages.md`): `glimpse split` cuts every tiny model and the
//! compatible real-world-style folders into stages that equal the monolithic encoder on both
//! backends, the pipeline's staged encoder gives the same features and tokens as the monolithic
//! one, the hook between groups runs on any number of tokens, and bad cuts name the node.

mod common;

use std::path::Path;

use common::*;
use glimpse::runtime::pipeline::{Between, EncoderForm, EncoderHook};
use glimpse::runtime::split::{self, SplitOptions};
use glimpse::runtime::{Dtype, GenerationOptions, Part, Pipeline, PipelineOptions};
use ndarray::{s, Axis};

fn split_options() -> SplitOptions {
    let mut o = SplitOptions::default();
    #[cfg(feature = "venv-tests")]
    {
        o.backend_options.ort_library = Some(ort_library());
    }
    #[cfg(not(feature = "venv-tests"))]
    {
        o.backends = vec!["tract".into()];
    }
    o
}

/// A copy of a model folder without any stage files or manifest stages.
fn unstaged(name: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(name, tmp.path());
    for e in std::fs::read_dir(tmp.path().join("onnx")).expect("onnx/").flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("vision_embed") || n.starts_with("vision_blocks") || n.starts_with("vision_head") {
            std::fs::remove_file(e.path()).expect("remove stage");
        }
    }
    let manifest = tmp.path().join("glimpse.json");
    if manifest.is_file() {
        let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        m.as_object_mut().unwrap().remove("stages");
        std::fs::write(&manifest, m.to_string()).unwrap();
    }
    tmp
}

fn stage_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("onnx"))
        .expect("onnx/")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| ["vision_embed", "vision_blocks", "vision_head", ".glimpse-split"].iter().any(|p| n.starts_with(p)))
        .collect();
    v.sort();
    v
}

const SPLITTABLE_COMPAT: [&str; 3] = ["llava-external-data", "llava-int8-decoder-only", "llava-onevision-no-newline"];

#[test]
fn split_stages_equal_the_monolithic_encoder_on_every_backend() {
    let folders: Vec<_> = TINY_MODELS
        .iter()
        .map(|n| model(n))
        .chain(SPLITTABLE_COMPAT.iter().map(|n| repo().join("models/compat").join(n)))
        .collect();
    for src in folders {
        let tmp = unstaged(&src);
        let report = split::split(tmp.path(), &split_options()).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let expected = if cfg!(feature = "venv-tests") { 2 } else { 1 };
        assert_eq!(report.verified.len(), expected, "{}: {report:?}", src.display());
        for v in &report.verified {
            assert!(v.max_abs_diff <= 1e-5, "{} on {}: {}", src.display(), v.backend, v.max_abs_diff);
            assert!(v.fewer_tokens < v.grid);
        }
        assert!(report.keys, "{}: groups output keys", src.display());
        let m = glimpse::runtime::manifest::Manifest::load(tmp.path()).expect("manifest");
        let stages = m.stages.expect("stages written");
        assert_eq!(stages.made_by, "split");
        assert_eq!(stages.blocks.iter().map(|b| b.layers).collect::<Vec<_>>(), report.groups);
        assert_eq!(stage_files(tmp.path()).len(), report.groups.len() + 2, "{:?}", stage_files(tmp.path()));
        // a split folder answers with the same tokens as the unsplit one
        // the int8-decoder-only folder has no fp32 decoder
        let part_dtypes = match glimpse::runtime::ModelFolder::open(&src).expect("folder").variants(Part::Decoder) {
            v if v.contains(&Dtype::Fp32) => vec![],
            _ => vec![(Part::Decoder, Dtype::Fp16)],
        };
        let base = PipelineOptions { part_dtypes, ..Default::default() };
        let staged = Pipeline::load(tmp.path(), &PipelineOptions { encoder: EncoderForm::Staged, ..base.clone() })
            .expect("staged");
        assert!(staged.encoder_is_staged());
        let mono =
            Pipeline::load(&src, &PipelineOptions { encoder: EncoderForm::Monolithic, ..base }).expect("monolithic");
        let case = &cases(&src).1[0];
        let opts = GenerationOptions { max_new_tokens: 8, ..Default::default() };
        let a = staged.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("staged ask");
        let b = mono.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("monolithic ask");
        assert_eq!(a.token_ids, b.token_ids, "{}", src.display());
    }
}

#[test]
fn staged_encoders_give_the_monolithic_features_and_tokens() {
    for name in TINY_MODELS {
        // the export's stages (committed) and the split's
        let split_dir = unstaged(&model(name));
        split::split(split_dir.path(), &split_options()).expect("split");
        for dir in [model(name), split_dir.path().to_path_buf()] {
            for base in backends() {
                let staged = Pipeline::load(&dir, &PipelineOptions { encoder: EncoderForm::Staged, ..base.clone() })
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let mono = Pipeline::load(&dir, &PipelineOptions { encoder: EncoderForm::Monolithic, ..base.clone() })
                    .expect("monolithic");
                assert!(staged.encoder_is_staged() && !mono.encoder_is_staged());
                for case in cases(&model(name)).1 {
                    let img = staged.load_image(&case.image()).expect("image");
                    let input = staged.preprocess(&img).expect("preprocess");
                    let a = staged.encode(&input).expect("staged encode");
                    let b = mono.encode(&input).expect("monolithic encode");
                    let diff = (&a.features - &b.features).iter().fold(0f32, |m, d| m.max(d.abs()));
                    assert!(diff <= 1e-6, "{name}/{} {}: features differ by {diff}", case.name(), base.backend);
                    let names: Vec<&str> = a.stages.iter().map(|(n, _)| n.as_str()).collect();
                    assert_eq!(
                        names,
                        ["vision_embed", "vision_blocks_0", "vision_blocks_1", "encoder_reduction", "vision_head"]
                    );
                    let opts = GenerationOptions { max_new_tokens: 20, ..Default::default() };
                    let got = staged.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("ask");
                    assert_eq!(
                        got.token_ids,
                        case.ints("generated_ids"),
                        "{name}/{}: staged vs transformers",
                        case.name()
                    );
                }
            }
        }
    }
}

/// Reverses the token order after the first group and restores it before the head: encoder
/// layers without positional terms are permutation-equivariant, so features must not change.
struct Reverse;

impl EncoderHook for Reverse {
    fn after_group(&mut self, _: usize, _: [usize; 2], state: &mut Between) -> glimpse::runtime::Result<()> {
        state.hidden.invert_axis(Axis(1));
        state.bias.invert_axis(Axis(1));
        Ok(())
    }
    fn before_head(&mut self, state: &mut Between) -> glimpse::runtime::Result<()> {
        state.hidden.invert_axis(Axis(1));
        state.hidden = state.hidden.as_standard_layout().to_owned();
        Ok(())
    }
}

/// Drops half the tokens after the first group and never restores them.
struct Drop;

impl EncoderHook for Drop {
    fn after_group(&mut self, _: usize, _: [usize; 2], state: &mut Between) -> glimpse::runtime::Result<()> {
        let keep = state.hidden.shape()[1] / 2;
        state.hidden = state.hidden.slice(s![.., ..keep, ..]).to_owned();
        state.bias = state.bias.slice(s![.., ..keep]).to_owned();
        Ok(())
    }
}

#[test]
fn the_hook_between_groups_runs_on_any_tokens() {
    for name in TINY_MODELS {
        for base in backends() {
            let p = Pipeline::load(model(name), &PipelineOptions { encoder: EncoderForm::Staged, ..base.clone() })
                .expect("staged");
            let case = &cases(&model(name)).1[0];
            let input = p.preprocess(&p.load_image(&case.image()).expect("image")).expect("preprocess");
            let plain = p.encode(&input).expect("encode");
            let mut hook = Reverse;
            let reversed = p.encode_with(&input, &mut hook).expect("reversed");
            let diff = (&plain.features - &reversed.features).iter().fold(0f32, |m, d| m.max(d.abs()));
            assert!(diff <= 1e-4, "{name} {}: permuting between groups changed features by {diff}", base.backend);
            let e = p.encode_with(&input, &mut Drop).unwrap_err().to_string();
            assert!(e.contains("full grid"), "{name}: {e}");
        }
    }
}

#[test]
fn bad_cuts_name_the_node_and_write_nothing() {
    let compat = |n: &str| repo().join("models/compat").join(n);
    for (folder, want) in [
        (compat("llava-plain-export"), "folded into the graph"),
        (compat("llava-feature-layers"), "residual stream after layer"),
        (compat("smolvlm-dynamic-hw"), "pixel_values"),
        (compat("smolvlm-dynamo"), "node `node_Reshape"),
    ] {
        let tmp = unstaged(&folder);
        let e = split::split(tmp.path(), &split_options()).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("vision_encoder.onnx"), "{}: {e}", folder.display());
        assert!(stage_files(tmp.path()).is_empty(), "{}: {:?}", folder.display(), stage_files(tmp.path()));
        assert!(glimpse::runtime::manifest::Manifest::load(tmp.path()).unwrap().stages.is_none());
    }
    // node names stripped by an optimizer: no layer scopes to cut at
    let tmp = unstaged(&model("tiny-llava"));
    let path = tmp.path().join("onnx/vision_encoder.onnx");
    let mut proto: tract_onnx::pb::ModelProto =
        prost::Message::decode(std::fs::read(&path).unwrap().as_slice()).expect("decode");
    for (i, n) in proto.graph.as_mut().unwrap().node.iter_mut().enumerate() {
        n.name = format!("n{i}");
    }
    std::fs::write(&path, prost::Message::encode_to_vec(&proto)).unwrap();
    let e = split::split(tmp.path(), &split_options()).unwrap_err().to_string();
    assert!(e.contains("layers.N"), "{e}");
    // cut points outside the layers, and groups that differ from the listed ones
    let tmp = unstaged(&model("tiny-llava"));
    for at in [vec![0], vec![2], vec![5]] {
        let e = split::split(tmp.path(), &SplitOptions { at: at.clone(), ..split_options() }).unwrap_err().to_string();
        assert!(e.contains("--at"), "{at:?}: {e}");
    }
    let e = split::split(tmp.path(), &SplitOptions { groups: 3, ..split_options() }).unwrap_err().to_string();
    assert!(e.contains("--groups"), "{e}");
    split::split(tmp.path(), &SplitOptions { groups: 1, ..split_options() }).expect("one group");
    let e = split::split(tmp.path(), &split_options()).unwrap_err().to_string();
    assert!(e.contains("--force") && e.contains("stages"), "{e}");
    split::split(tmp.path(), &SplitOptions { force: true, ..split_options() }).expect("forced");
    // the staged form asked for where there is none
    let plain = unstaged(&model("tiny-llava"));
    let e = Pipeline::load(plain.path(), &PipelineOptions { encoder: EncoderForm::Staged, ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("glimpse split"), "{e}");
}

#[test]
fn views_one_by_one_give_the_batch_features() {
    use glimpse::runtime::pipeline::ViewRun;
    for name in TINY_MODELS {
        for encoder in [EncoderForm::Monolithic, EncoderForm::Staged] {
            let load = |views| {
                Pipeline::load(model(name), &PipelineOptions { encoder, views, ..Default::default() }).expect("load")
            };
            let (batch, single) = (load(ViewRun::Batch), load(ViewRun::OneByOne));
            assert!(single.encodes_views_one_by_one() && !batch.encodes_views_one_by_one());
            for case in cases(&model(name)).1 {
                let input = batch.preprocess(&batch.load_image(&case.image()).expect("image")).expect("preprocess");
                let (a, b) = (batch.encode(&input).expect("batch"), single.encode(&input).expect("one by one"));
                let diff = (&a.features - &b.features).iter().fold(0f32, |m, d| m.max(d.abs()));
                assert!(
                    diff <= 1e-5,
                    "{name}/{} {encoder:?}: {} views differ by {diff}",
                    case.name(),
                    input.views.len()
                );
                let opts = GenerationOptions { max_new_tokens: 20, ..Default::default() };
                let got = single.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("ask");
                assert_eq!(got.token_ids, case.ints("generated_ids"), "{name}/{} one by one", case.name());
            }
        }
    }
}

#[test]
fn tract_plans_the_encoder_for_the_shapes_that_repeat() {
    use glimpse::runtime::pipeline::{RegionSkip, SkippedTiles};
    use glimpse::runtime::select::{Budget, Scope};
    let dir = model("tiny-smolvlm");
    let case = cases(&dir).1.into_iter().next().expect("a fixture case");
    let regions = RegionSkip {
        budget: Budget::Ratio(0.5),
        scope: Scope::Global,
        skipped: SkippedTiles::Drop,
        relevance: 0.0,
        global: Budget::Ratio(1.0),
    };
    for encoder in [EncoderForm::Monolithic, EncoderForm::Staged] {
        let plain = Pipeline::load(&dir, &PipelineOptions { encoder, ..Default::default() }).expect("load");
        let input = plain.preprocess(&plain.load_image(&case.image()).expect("image")).expect("preprocess");
        assert!(input.views.len() > 1, "the case must have several views");
        plain.encode(&input).expect("encode");
        // views run one at a time, so every session saw one shape: one plan each, for one view
        let plans = plain.encoder_fixed_plans();
        assert_eq!(plans.len(), if encoder == EncoderForm::Staged { 4 } else { 1 });
        for p in &plans {
            assert_eq!(p.len(), 1, "{encoder:?}: {plans:?}");
            let first = p[0].split("; ").next().unwrap_or_default();
            let views_axis = if encoder == EncoderForm::Monolithic { 1 } else { 0 };
            let dims: Vec<&str> = first.split(['[', ']']).nth(1).unwrap_or_default().split(", ").collect();
            assert_eq!(dims.get(views_axis), Some(&"1"), "{encoder:?}: one view per run: {first}");
        }
    }
    // a region budget shared across tiles varies the groups' token counts from tile to tile: those
    // stay symbolic; the embed stage (one view at a time) and the head (the full grid) repeat theirs
    let opts = GenerationOptions { max_new_tokens: 2, ..Default::default() };
    let reduced =
        Pipeline::load(&dir, &PipelineOptions { regions: Some(regions), ..Default::default() }).expect("load");
    reduced.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("ask");
    let counts: Vec<usize> = reduced.encoder_fixed_plans().iter().map(Vec::len).collect();
    assert_eq!(counts, [1, 0, 0, 1], "{:?}", reduced.encoder_fixed_plans());
    // a budget within each tile: every tile keeps the same count and the tiles run the groups and
    // head as one batch, so those see two shapes (the global view, the tiles) and tract plans
    // both; the answer is the symbolic plan's
    let per_view =
        RegionSkip { scope: Scope::PerView, budget: Budget::Ratio(0.25), global: Budget::Ratio(0.5), ..regions };
    use glimpse::runtime::backend::BackendOptions;
    let ask = |backend_options: BackendOptions| {
        let p =
            Pipeline::load(&dir, &PipelineOptions { regions: Some(per_view), backend_options, ..Default::default() })
                .expect("load");
        let mut tokens = Vec::new();
        p.ask(Some(&case.image()), case.prompt(), &opts, &mut |t| tokens.push(t.to_string())).expect("ask");
        (tokens, p.encoder_fixed_plans())
    };
    let (fixed_tokens, plans) = ask(BackendOptions::default());
    let counts: Vec<usize> = plans.iter().map(Vec::len).collect();
    assert_eq!(counts, [1, 2, 2, 2], "{plans:?}");
    let (symbolic_tokens, none) = ask(BackendOptions { symbolic_plans: true, ..Default::default() });
    assert!(none.iter().all(Vec::is_empty), "{none:?}");
    assert_eq!(fixed_tokens, symbolic_tokens);
    // where the memory budget fits the groups once but not twice, they keep the symbolic plan
    let limited = |bytes: u64| PipelineOptions {
        regions: Some(per_view),
        max_memory: Some(glimpse::runtime::memory::MemoryLimit { bytes, from: "--max-memory".into() }),
        ..Default::default()
    };
    let once = match Pipeline::load(&dir, &limited(1024)) {
        Err(glimpse::runtime::Error::MemoryBudget { needed, .. }) => needed,
        other => panic!("a 1 KB budget must be refused: {:?}", other.err()),
    };
    let tight = Pipeline::load(&dir, &limited(once)).expect("fits with one copy of the groups");
    tight.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("ask");
    // (and so does the head, which sees the batched tiles' shape besides the global view's)
    let counts: Vec<usize> = tight.encoder_fixed_plans().iter().map(Vec::len).collect();
    assert_eq!(counts, [1, 0, 0, 0], "{:?}", tight.encoder_fixed_plans());
    // single-view region skipping keeps one count per view whatever the scope
    let llava = model("tiny-llava");
    let salient =
        Pipeline::load(&llava, &PipelineOptions { regions: Some(regions), ..Default::default() }).expect("load");
    let c = cases(&llava).1.into_iter().next().expect("a fixture case");
    salient.ask(Some(&c.image()), c.prompt(), &opts, &mut |_| {}).expect("ask");
    let plans = salient.encoder_fixed_plans();
    assert!(plans[1..plans.len() - 1].iter().all(|p| p.len() == 1), "{plans:?}");
    // merging alone: each group sees one count, planned exactly
    let merged = Pipeline::load(&dir, &PipelineOptions { merge: Some(Budget::Ratio(0.25)), ..Default::default() })
        .expect("load");
    merged.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("ask");
    let plans = merged.encoder_fixed_plans();
    assert!(plans.iter().all(|p| p.len() == 1), "{plans:?}");
    assert_ne!(plans[1], plans[2], "the second group runs on fewer tokens: {plans:?}");
    #[cfg(feature = "venv-tests")]
    {
        let ort_opts = backends().into_iter().find(|b| b.backend == "ort").expect("ort options");
        let ort = Pipeline::load(&dir, &ort_opts).expect("ort");
        let input = ort.preprocess(&ort.load_image(&case.image()).expect("image")).expect("preprocess");
        ort.encode(&input).expect("encode");
        assert!(ort.encoder_fixed_plans().iter().all(|p| p.is_empty()));
    }
}
