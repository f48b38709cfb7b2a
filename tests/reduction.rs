//! Token reduction before and inside the vision encoder (`--regions`, `--merge`, `--tiles`):
//! keeping everything changes nothing, budgets are honoured end to end, every view keeps its
//! place in the prompt, and what cannot work says so.

mod common;

use common::*;
use glimpse::runtime::pipeline::{ImageInput, Quiet, RegionSkip, Request, SkippedTiles};
use glimpse::runtime::select::{Budget, Scope};
use glimpse::runtime::{GenerationOptions, Pipeline, PipelineOptions};
use ndarray::Array2;

fn regions(budget: Budget, scope: Scope) -> Option<RegionSkip> {
    Some(RegionSkip { budget, scope, skipped: SkippedTiles::Drop, relevance: 0.0, global: Budget::Ratio(1.0) })
}

fn images() -> std::path::PathBuf {
    repo().join("models/images")
}

fn no_text() -> glimpse::runtime::Result<Array2<f32>> {
    panic!("no reduction here should need the prompt")
}

#[test]
fn keeping_everything_equals_the_unreduced_staged_encoder_exactly() {
    let dir = model("tiny-smolvlm");
    let plain = Pipeline::load(&dir, &PipelineOptions::default()).expect("load");
    assert!(plain.encoder_is_staged());
    let configs = [
        PipelineOptions { regions: regions(Budget::Ratio(1.0), Scope::Global), ..Default::default() },
        PipelineOptions { merge: Some(Budget::Count(0)), ..Default::default() },
        PipelineOptions {
            merge: Some(Budget::Count(0)),
            merge_method: glimpse::runtime::select::tome::MergeMethod::Transform,
            ..Default::default()
        },
        PipelineOptions {
            regions: regions(Budget::Ratio(1.0), Scope::PerView),
            merge: Some(Budget::Count(0)),
            ..Default::default()
        },
    ];
    for opts in configs {
        let reduced = Pipeline::load(&dir, &opts).expect("load reduced");
        for image in ["scene.png", "wide.png"] {
            let img = plain.load_image(&images().join(image)).expect("image");
            let input = plain.preprocess(&img).expect("preprocess");
            let a = plain.encode(&input).expect("plain");
            let b = reduced.encode_reduced(&input, &mut no_text).expect("reduced");
            assert_eq!(a.features, b.features, "{image}: {:?} / {:?}", opts.regions, opts.merge);
            if let Some(present) = &b.present {
                for (v, p) in present.iter().enumerate() {
                    assert_eq!(p.len(), input.views[v].tokens, "{image}: view {v} lost rows");
                }
            }
        }
    }
}

/// Under a per-tile budget the tiles run the groups and head as one batch; a server's request
/// reductions (`stages_for_requests`) run them one at a time. Both keep the same tokens, merge
/// them the same way and encode them to the same features.
#[test]
fn batched_tiles_encode_as_the_tiles_one_at_a_time() {
    let dir = model("testbed-smolvlm");
    let base = PipelineOptions {
        regions: Some(RegionSkip {
            global: Budget::Ratio(0.5),
            ..regions(Budget::Ratio(0.35), Scope::PerView).unwrap()
        }),
        merge: Some(Budget::Ratio(0.25)),
        ..Default::default()
    };
    let batched = Pipeline::load(&dir, &base).expect("load");
    let one_by_one =
        Pipeline::load(&dir, &PipelineOptions { stages_for_requests: true, ..base.clone() }).expect("load");
    let img = batched.load_image(&images().join("scene.png")).expect("image");
    let input = batched.preprocess(&img).expect("preprocess");
    let tiles = input.views.len() - 1;
    assert!(tiles > 1, "the image must have several tiles");
    let a = batched.encode_reduced(&input, &mut no_text).expect("batched");
    let b = one_by_one.encode_reduced(&input, &mut no_text).expect("one by one");
    // the batch shows in the stages' plans: the groups and the head ran on `tiles` views at once
    let plans = batched.encoder_fixed_plans();
    let head = plans.last().expect("a head");
    assert!(head.iter().any(|p| p.starts_with(&format!("hidden_states [{tiles}, "))), "{plans:?}");
    assert_eq!(a.present, b.present);
    assert_eq!(a.merged, b.merged);
    assert!(a.merged.iter().filter(|m| !m.is_empty()).count() == input.views.len(), "every view merged");
    let diff = (&a.features - &b.features).mapv(f32::abs).fold(0.0f32, |m, &x| m.max(x));
    assert!(diff <= 1e-4, "batched tiles differ by {diff}");
}

#[test]
fn region_budgets_hold_end_to_end_and_views_keep_their_place() {
    let dir = model("testbed-smolvlm");
    let opts = GenerationOptions { max_new_tokens: 4, ..Default::default() };
    let img = images().join("scene.png");
    let full = Pipeline::load(&dir, &PipelineOptions::default()).expect("load");
    let want = full.ask(Some(&img), "What number is written?", &opts, &mut |_| {}).expect("full");
    use glimpse::runtime::select::tome::MergeMethod;
    for (budget, scope, merge, merge_method) in [
        (Budget::Ratio(0.25), Scope::Global, None, MergeMethod::Tome),
        (Budget::Ratio(0.5), Scope::PerView, Some(Budget::Ratio(0.25)), MergeMethod::Tome),
        (Budget::Count(10), Scope::Global, Some(Budget::Count(8)), MergeMethod::Transform),
    ] {
        let opts_in = PipelineOptions { regions: regions(budget, scope), merge, merge_method, ..Default::default() };
        let p = Pipeline::load(&dir, &opts_in).expect("load");
        let a = p.ask(Some(&img), "What number is written?", &opts, &mut |_| {}).expect("ask");
        let layout = a.layout.as_ref().expect("layout");
        let present = layout.present.as_ref().expect("rows present");
        // the prompt keeps every view (markers included): the same number of views as unreduced
        assert_eq!(layout.views.len(), want.layout.as_ref().unwrap().views.len());
        let tiles: Vec<usize> = (0..layout.views.len()).filter(|&v| layout.views[v].tokens == 64).collect();
        let tile_tokens: usize = tiles.iter().map(|&v| layout.views[v].tokens).sum::<usize>() - 64;
        let kept_tiles: usize = present.iter().map(Vec::len).sum::<usize>() - 64;
        let expect = match scope {
            Scope::Global => budget.of(tile_tokens),
            Scope::PerView => (tiles.len() - 1) * budget.of(64),
        };
        assert_eq!(kept_tiles, expect, "{budget} {scope:?}");
        assert_eq!(a.stats.visual_tokens_kept, 64 + expect);
        assert_eq!(a.stats.visual_tokens, want.stats.visual_tokens);
        assert!(a.stats.prompt_tokens < want.stats.prompt_tokens);
        assert!(a.stats.encoder_stages.iter().any(|(n, _)| n == "encoder_reduction"));
        // merging reports its groups per patch for every view it ran on (the global view always)
        assert_eq!(layout.merged.iter().any(|g| !g.is_empty()), merge.is_some(), "{merge_method:?}");
    }
}

#[test]
fn the_global_view_can_keep_only_its_most_salient_groups() {
    let dir = model("testbed-smolvlm");
    let opts = GenerationOptions { max_new_tokens: 4, ..Default::default() };
    let img = images().join("scene.png");
    let skip = RegionSkip {
        budget: Budget::Ratio(0.25),
        scope: Scope::Global,
        skipped: SkippedTiles::Drop,
        relevance: 0.0,
        global: Budget::Ratio(0.5),
    };
    let p = Pipeline::load(&dir, &PipelineOptions { regions: Some(skip), ..Default::default() }).expect("load");
    let a = p.ask(Some(&img), "What number is written?", &opts, &mut |_| {}).expect("ask");
    let layout = a.layout.as_ref().expect("layout");
    let present = layout.present.as_ref().expect("rows present");
    let g = layout.views.iter().position(|v| v.kind == glimpse::runtime::family::ViewKind::Global).expect("global");
    assert_eq!(present[g].len(), 32, "half the global view's 64 tokens");
    assert_eq!(a.stats.visual_tokens_kept, 32 + 64, "plus a quarter of the 256 tile tokens");
}

#[test]
fn single_view_models_keep_their_most_salient_patches() {
    let dir = model("testbed-llava");
    let p = Pipeline::load(
        &dir,
        &PipelineOptions { regions: regions(Budget::Ratio(0.25), Scope::Global), ..Default::default() },
    )
    .expect("load");
    // prompt-independent: one encoding serves several prompts
    let img = p.load_image(&images().join("scene.png")).expect("image");
    let enc = p.encode_image(&img).expect("encode once");
    let gen = GenerationOptions { max_new_tokens: 4, ..Default::default() };
    for q in ["What number is written?", "How many circles are there?"] {
        let a = p.answer(&Request::new(q).with_image(ImageInput::Encoded(&enc)), &gen, &mut Quiet).expect("answer");
        assert_eq!(a.stats.visual_tokens_kept, 36, "{q}");
        assert_eq!(a.stats.visual_tokens, 144);
    }
}

#[test]
fn impossible_reductions_say_why() {
    let err = |dir: &str, opts: PipelineOptions| Pipeline::load(model(dir), &opts).unwrap_err().to_string();
    let e = err(
        "tiny-llava-onevision",
        PipelineOptions { regions: regions(Budget::Ratio(0.5), Scope::Global), ..Default::default() },
    );
    assert!(e.contains("--regions") && e.contains("llava_onevision"), "{e}");
    let e = err(
        "testbed-smolvlm",
        PipelineOptions {
            regions: regions(Budget::Ratio(0.5), Scope::Global),
            tiles: Some(glimpse::runtime::TileSkip {
                budget: glimpse::runtime::TileBudget::Count(1),
                skipped: SkippedTiles::Drop,
                relevance: 0.0,
            }),
            ..Default::default()
        },
    );
    assert!(e.contains("--tiles"), "{e}");
    // stand-ins come from a global view, which LLaVA has not
    let e = err(
        "testbed-llava",
        PipelineOptions {
            regions: Some(RegionSkip {
                budget: Budget::Ratio(0.5),
                scope: Scope::Global,
                skipped: SkippedTiles::Global,
                relevance: 0.0,
                global: Budget::Ratio(1.0),
            }),
            ..Default::default()
        },
    );
    assert!(e.contains("--skipped-tiles"), "{e}");
    // merging acts between groups: a one-group staged encoder cannot merge
    let one = tempfile::tempdir().expect("tempdir");
    copy_dir(&model("tiny-llava"), one.path());
    let manifest = one.path().join("glimpse.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let blocks = m["stages"]["blocks"].as_array_mut().expect("blocks");
    blocks.truncate(1);
    std::fs::write(&manifest, m.to_string()).unwrap();
    let e = Pipeline::load(one.path(), &PipelineOptions { merge: Some(Budget::Count(2)), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("stages.blocks") && e.contains("--groups"), "{e}");
    // merging needs the stages: a folder without them points at `glimpse split`
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&model("testbed-llava"), tmp.path());
    let manifest = tmp.path().join("glimpse.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("stages");
    std::fs::write(&manifest, m.to_string()).unwrap();
    let e = Pipeline::load(tmp.path(), &PipelineOptions { merge: Some(Budget::Count(4)), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("glimpse split"), "{e}");
}

#[test]
fn prompt_relevance_makes_the_encoding_prompt_dependent() {
    let dir = model("testbed-smolvlm");
    let skip = RegionSkip {
        budget: Budget::Ratio(0.25),
        scope: Scope::Global,
        skipped: SkippedTiles::Drop,
        relevance: 1.0,
        global: Budget::Ratio(1.0),
    };
    let p = Pipeline::load(&dir, &PipelineOptions { regions: Some(skip), ..Default::default() }).expect("load");
    let img = p.load_image(&images().join("scene.png")).expect("image");
    let e = p.encode_image(&img).unwrap_err().to_string();
    assert!(e.contains("depend on the prompt"), "{e}");
    let opts = GenerationOptions { max_new_tokens: 4, ..Default::default() };
    let a = p.ask(Some(&images().join("scene.png")), "What number is written?", &opts, &mut |_| {}).expect("ask");
    assert_eq!(a.stats.visual_tokens_kept, 64 + 64);
}

#[test]
fn a_profile_default_preset_applies_only_where_stages_exist() {
    use glimpse::runtime::pipeline::Fast;
    let opts = GenerationOptions { max_new_tokens: 4, ..Default::default() };
    let img = images().join("scene.png");
    let p =
        Pipeline::load(model("testbed-smolvlm"), &PipelineOptions { fast: Fast::WhereStaged, ..Default::default() })
            .expect("load");
    let a = p.ask(Some(&img), "What number is written?", &opts, &mut |_| {}).expect("ask");
    // each of the 4 tiles at 0.35 of its 64 tokens, the global view at 0.5 of 64
    assert_eq!(a.stats.visual_tokens_kept, 4 * 22 + 32);
    // without stages: off for the profile's default, an error for the flag
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&model("testbed-llava"), tmp.path());
    let manifest = tmp.path().join("glimpse.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("stages");
    std::fs::write(&manifest, m.to_string()).unwrap();
    let p =
        Pipeline::load(tmp.path(), &PipelineOptions { fast: Fast::WhereStaged, ..Default::default() }).expect("load");
    let a = p.ask(Some(&img), "How many circles are there?", &opts, &mut |_| {}).expect("ask");
    assert_eq!(a.stats.visual_tokens_kept, 144);
    let e =
        Pipeline::load(tmp.path(), &PipelineOptions { fast: Fast::On, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("glimpse split"), "{e}");
}
