//! Parity with Hugging Face transformers on the committed tiny models: preprocessing, prompt
//! expansion, image features, first-step logits and greedy generation, compared with the
//! fixtures `tools/export` recorded from transformers itself.

mod common;

use common::*;
use glimpse::runtime::backend::Tensor;
use glimpse::runtime::{GenerationOptions, ImageInput, Pipeline, PipelineOptions, Quiet, Request, StageTimes};

fn load(name: &str) -> Pipeline {
    Pipeline::load(model(name), &PipelineOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn preprocessing_matches_transformers() {
    for name in TINY_MODELS {
        let p = load(name);
        let (family, cases) = cases(&model(name));
        assert_eq!(p.family.name(), family);
        for case in cases {
            let img = p.load_image(&case.image()).expect("image");
            let input = p.preprocess(&img).expect("preprocess");
            let ours = match &input.tensors[0].1 {
                Tensor::F32(a) => a.clone(),
                other => panic!("pixel_values is {:?}", other.elem()),
            };
            let theirs = case.f32("pixel_values");
            assert_eq!(ours.shape(), theirs.shape(), "{name}/{}: pixel_values shape", case.name());
            let mean = mean_abs_diff(&ours, &theirs);
            let max = max_abs_diff(&ours, &theirs);
            eprintln!("{name}/{}: pixel_values mean abs diff {mean:.2e}, max {max:.2e}", case.name());
            assert!(mean < 1e-2, "{name}/{}: mean abs diff {mean}", case.name());
            // Pillow-exact resampling makes PNG inputs bit-identical, not merely close.
            assert!(max < 1e-6, "{name}/{}: max abs diff {max}", case.name());
            if let Some((rows, cols)) = case.layout() {
                assert_eq!((input.rows, input.cols), (rows, cols), "{name}/{}: tile layout", case.name());
            }
            if case.has_tensor("pixel_attention_mask") {
                let mask = input.tensors.iter().find(|(n, _)| n == "pixel_attention_mask").expect("mask");
                assert_eq!(mask.1, Tensor::Bool(case.bools("pixel_attention_mask")), "{name}/{}: mask", case.name());
            }
        }
    }
}

#[test]
fn prompt_expansion_matches_the_processor() {
    for name in TINY_MODELS {
        let p = load(name);
        for case in cases(&model(name)).1 {
            let rendered = p.render_prompt(case.prompt(), true).expect("render");
            assert_eq!(
                rendered,
                case.json["prompt_text"].as_str().expect("prompt_text"),
                "{name}/{}: chat template",
                case.name()
            );
            let img = p.load_image(&case.image()).expect("image");
            let input = p.preprocess(&img).expect("preprocess");
            let counts: Vec<usize> = input.views.iter().map(|v| v.tokens).collect();
            let ids = p.expand_and_tokenize(&rendered, Some((&input, &counts))).expect("tokenize");
            assert_eq!(ids, case.ints("input_ids"), "{name}/{}: expanded input_ids", case.name());
        }
    }
}

/// Runs the encoder on transformers' own pixel_values so encoder parity is measured apart from
/// preprocessing.
fn reference_input(p: &Pipeline, case: &Case) -> glimpse::runtime::family::VisionInput {
    let img = p.load_image(&case.image()).expect("image");
    let mut input = p.preprocess(&img).expect("preprocess");
    input.tensors = vec![("pixel_values".to_string(), Tensor::F32(case.f32("pixel_values")))];
    if case.has_tensor("pixel_attention_mask") {
        input.tensors.push(("pixel_attention_mask".to_string(), Tensor::Bool(case.bools("pixel_attention_mask"))));
    }
    input
}

#[test]
fn image_features_logits_and_greedy_tokens_match() {
    for name in TINY_MODELS {
        let p = load(name);
        for case in cases(&model(name)).1 {
            let input = reference_input(&p, &case);
            let feats = p.encode(&input).expect("encode").features;
            let theirs = case.f32("image_features");
            let theirs = theirs.to_shape((feats.nrows(), feats.ncols())).expect("feature shape").to_owned().into_dyn();
            let d = max_abs_diff(&feats.clone().into_dyn(), &theirs);
            eprintln!("{name}/{}: image_features max abs diff {d:.2e}", case.name());
            assert!(d < 1e-4, "{name}/{}: image_features differ by {d}", case.name());

            let rendered = p.render_prompt(case.prompt(), true).expect("render");
            let counts: Vec<usize> = input.views.iter().map(|v| v.tokens).collect();
            let ids = p.expand_and_tokenize(&rendered, Some((&input, &counts))).expect("tokenize");
            let prepared = p.splice(ids, Some(&feats), feats.nrows(), None).expect("splice");
            let logits = p.prefill_logits(&prepared).expect("prefill").into_dyn();
            let d = max_abs_diff(&logits, &case.f32("logits"));
            eprintln!("{name}/{}: first-step logits max abs diff {d:.2e}", case.name());
            assert!(d < 1e-4, "{name}/{}: logits differ by {d}", case.name());

            let opts = GenerationOptions {
                max_new_tokens: case.json["max_new_tokens"].as_u64().expect("max_new_tokens") as usize,
                ..Default::default()
            };
            let mut times = StageTimes::default();
            let (ids, _) = p.generate(prepared, &opts, &mut times, &mut Quiet).expect("generate");
            assert_eq!(ids, case.ints("generated_ids"), "{name}/{}: greedy ids", case.name());
        }
    }
}

#[test]
fn ask_end_to_end_from_the_image_file_matches_generate() {
    for name in TINY_MODELS {
        let p = load(name);
        for case in cases(&model(name)).1 {
            let opts = GenerationOptions {
                max_new_tokens: case.json["max_new_tokens"].as_u64().expect("max_new_tokens") as usize,
                ..Default::default()
            };
            let mut streamed = String::new();
            let answer = p.ask(Some(&case.image()), case.prompt(), &opts, &mut |s| streamed.push_str(s)).expect("ask");
            assert_eq!(answer.token_ids, case.ints("generated_ids"), "{name}/{}: ids from the image file", case.name());
            assert_eq!(streamed, answer.text, "{name}/{}: streamed text equals the final text", case.name());
            let s = &answer.stats;
            assert_eq!(s.new_tokens, answer.token_ids.len());
            assert_eq!(s.prompt_tokens, case.ints("input_ids").len());
            assert_eq!(s.visual_tokens, s.visual_tokens_kept);
            assert!(s.visual_tokens > 0);
        }
    }
}

/// An image encoded once and asked about with several prompts (what `glimpse eval` does) gives
/// the same tokens as asking from scratch, and reports the encoding's measured times.
#[test]
fn encoding_reused_across_prompts_gives_the_same_answers() {
    for name in TINY_MODELS {
        let p = load(name);
        for case in cases(&model(name)).1 {
            let img = p.load_image(&case.image()).expect("image");
            let encoded = p.encode_image(&img).expect("encode once");
            let opts = GenerationOptions { max_new_tokens: 12, ..Default::default() };
            for prompt in [case.prompt(), "Describe it."] {
                let fresh = p
                    .answer(&Request::new(prompt).with_image(ImageInput::Decoded(&img)), &opts, &mut Quiet)
                    .expect("fresh");
                let reused = p
                    .answer(&Request::new(prompt).with_image(ImageInput::Encoded(&encoded)), &opts, &mut Quiet)
                    .expect("reused");
                assert_eq!(fresh.token_ids, reused.token_ids, "{name}/{}: {prompt}", case.name());
                assert!(reused.stats.times.encode > std::time::Duration::ZERO);
            }
        }
    }
}

/// The committed fp16 variants of the tiny models (`glimpse quantize --to fp16`: fp16 weights and
/// compute, fp32 I/O), monolithic and staged encoder, give transformers' fp32 greedy tokens. Under
/// qemu cortex-a76 in CI this runs tract's native f16 kernels (the CPU has FEAT_FP16); on x86
/// tract widens f16 to f32.
#[test]
fn fp16_variants_give_the_fp32_tokens() {
    use glimpse::runtime::pipeline::EncoderForm;
    for name in TINY_MODELS {
        for encoder in [EncoderForm::Monolithic, EncoderForm::Staged] {
            let opts = PipelineOptions { dtype: "fp16".parse().expect("dtype"), encoder, ..Default::default() };
            let p = Pipeline::load(model(name), &opts).unwrap_or_else(|e| panic!("{name} fp16 {encoder:?}: {e}"));
            assert_eq!(p.encoder_is_staged(), encoder == EncoderForm::Staged);
            for case in cases(&model(name)).1 {
                let gen = GenerationOptions {
                    max_new_tokens: case.json["max_new_tokens"].as_u64().expect("max_new_tokens") as usize,
                    ..Default::default()
                };
                let answer = p.ask(Some(&case.image()), case.prompt(), &gen, &mut |_| {}).expect("ask fp16");
                assert_eq!(answer.token_ids, case.ints("generated_ids"), "{name}/{} fp16 {encoder:?}", case.name());
            }
        }
    }
}

#[test]
fn keep_all_gives_the_unpruned_tokens_for_every_method() {
    use glimpse::runtime::{Budget, Positions, SelectConfig};
    for name in TINY_MODELS {
        let mut p = load(name);
        let case = cases(&model(name)).1.into_iter().next().expect("a case");
        let opts = GenerationOptions { max_new_tokens: 20, ..Default::default() };
        for method in glimpse::runtime::select::available() {
            for positions in [Positions::Contiguous, Positions::Original] {
                let cfg = SelectConfig { method: method.into(), budget: Budget::Ratio(1.0), ..Default::default() };
                p.set_selection(cfg, positions).expect("method exists");
                let a = p.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("ask");
                assert_eq!(a.token_ids, case.ints("generated_ids"), "{name}: {method} at keep 1.0");
            }
        }
    }
}

#[test]
fn pruning_end_to_end_keeps_the_budget() {
    use glimpse::runtime::{Budget, Positions, Scope, SelectConfig};
    let mut p = load("tiny-smolvlm");
    let case = cases(&model("tiny-smolvlm")).1.into_iter().next().expect("a case");
    let opts = GenerationOptions { max_new_tokens: 4, ..Default::default() };
    for method in ["random", "uniform", "pool", "dart", "divprune", "todre", "cdpruner"] {
        for (scope, positions) in [(Scope::Global, Positions::Contiguous), (Scope::PerView, Positions::Original)] {
            let cfg = SelectConfig { method: method.into(), budget: Budget::Ratio(0.25), scope, ..Default::default() };
            p.set_selection(cfg, positions).expect("method exists");
            let a = p.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect(method);
            assert_eq!(a.stats.visual_tokens, 160, "{method}");
            assert_eq!(a.stats.visual_tokens_kept, 40, "{method} {scope:?}");
            assert_eq!(a.stats.prompt_tokens, case.ints("input_ids").len() - 120, "{method}");
        }
    }
    // Methods whose signal the plain export lacks fail with a clear error.
    for method in ["vtc-cls", "visionzip"] {
        let cfg = SelectConfig { method: method.into(), budget: Budget::Ratio(0.25), ..Default::default() };
        p.set_selection(cfg, Positions::Contiguous).expect("method exists");
        let err = p.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect_err(method);
        assert!(matches!(err, glimpse::runtime::Error::MissingSignal { .. }), "{method}: {err}");
    }
}

#[test]
fn tile_skipping_encodes_only_the_chosen_tiles() {
    use glimpse::runtime::{SkippedTiles, TileBudget, TileSkip};
    let name = "tiny-smolvlm";
    let case = cases(&model(name)).1.into_iter().find(|c| c.name() == "wide").expect("wide case");
    let (rows, cols) = case.layout().expect("tiled");
    let opts = GenerationOptions { max_new_tokens: 20, ..Default::default() };
    let with = |budget, skipped| {
        let po = PipelineOptions { tiles: Some(TileSkip { budget, skipped, relevance: 0.0 }), ..Default::default() };
        let p = Pipeline::load(model(name), &po).expect("load");
        p.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("ask")
    };
    // Keeping every tile is exactly the unskipped run.
    let all = with(TileBudget::Count(rows * cols), SkippedTiles::Drop);
    assert_eq!(all.token_ids, case.ints("generated_ids"));
    // Two tiles + the global view reach the model; the others lose their image tokens but keep
    // their markers, so every kept token keeps its position.
    let two = with(TileBudget::Count(2), SkippedTiles::Drop);
    assert_eq!(two.stats.visual_tokens, 16 * (rows * cols + 1));
    assert_eq!(two.stats.visual_tokens_kept, 16 * 3);
    assert_eq!(two.stats.views, 3);
    assert_eq!(
        all.stats.prompt_tokens - two.stats.prompt_tokens,
        all.stats.visual_tokens_kept - two.stats.visual_tokens_kept
    );
    let layout = two.layout.expect("layout");
    assert_eq!(layout.skipped_tiles.len(), rows * cols - 2);
    // Global-share stand-ins put tokens behind every tile marker; the skipped tiles are still
    // not encoded (views counts the images the encoder ran on).
    let share = with(TileBudget::Count(2), SkippedTiles::Global);
    assert_eq!(share.stats.views, 3);
    assert_eq!(share.layout.as_ref().expect("layout").skipped_tiles.len(), rows * cols - 2);
    assert!(share.stats.visual_tokens_kept > two.stats.visual_tokens_kept);
    assert!(share.stats.visual_tokens_kept < all.stats.visual_tokens_kept);
    // Only the global view encoded.
    let none = with(TileBudget::Count(0), SkippedTiles::Drop);
    assert_eq!(none.stats.visual_tokens_kept, 16);
}

/// tract on a thread pool gives transformers' tokens as on one thread (matrix products split
/// over output panels, so nothing is summed in another order), and the pool has the size asked.
#[test]
fn tract_threads_do_not_change_the_tokens() {
    use glimpse::runtime::backend::tract::TractBackend;
    use glimpse::runtime::backend::BackendOptions;
    assert_eq!(TractBackend::new(3).expect("pool").threads(), 3);
    assert_eq!(TractBackend::new(1).expect("inline").threads(), 1);
    for name in TINY_MODELS {
        let mut tokens = Vec::new();
        for threads in [1, 2, 3] {
            let opts = PipelineOptions {
                backend_options: BackendOptions { threads, ..Default::default() },
                ..Default::default()
            };
            let p = Pipeline::load(model(name), &opts).expect("load");
            let case = &cases(&model(name)).1[0];
            let gen = GenerationOptions { max_new_tokens: 12, ..Default::default() };
            tokens.push(p.ask(Some(&case.image()), case.prompt(), &gen, &mut |_| {}).expect("ask").token_ids);
        }
        let want = cases(&model(name)).1[0].ints("generated_ids");
        for t in &tokens {
            assert_eq!(t[..], want[..t.len()], "{name}: {tokens:?}");
        }
    }
}
