//! Pooled summary rows with proportional attention (`--pool-dropped`, docs/pruning.md "Why pruned
//! answers did not stop"): the decoder's `attention_bias` input matches transformers' eager attention
//! under the same additive key bias, on both backends; the pooled rows count in the budget and stand for every
//! dropped row once; a decoder without the input is refused with a message naming it.

mod common;

use common::*;
use glimpse::runtime::pipeline::{ImageInput, Quiet, Request};
use glimpse::runtime::select::{Budget, SelectConfig};
use glimpse::runtime::{GenerationOptions, Pipeline, PipelineOptions};

fn pooled(method: &str, keep: f32, pool: usize) -> SelectConfig {
    SelectConfig { method: method.into(), budget: Budget::Ratio(keep), pool, ..Default::default() }
}

fn floats(v: &serde_json::Value, key: &str) -> Vec<f32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("fixture field {key}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
}

/// The decoder's key bias against transformers: the export records the eager model's logits under a 4-D float mask
/// carrying ln 3 and ln 7 at two keys (`fixtures/attention_bias.json`); both backends match it, a zero bias is the
/// plain decoder exactly, and the bias moves the logits (the input is not ignored).
#[test]
fn the_key_bias_matches_transformers_on_both_backends() {
    for name in ["testbed-llava", "testbed-smolvlm"] {
        let path = model(name).join("fixtures/attention_bias.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let fx: serde_json::Value = serde_json::from_str(&text).expect("fixture parses");
        let ids: Vec<i64> =
            fx["input_ids"].as_array().expect("input_ids").iter().map(|x| x.as_i64().unwrap()).collect();
        let (bias, want, want_plain) = (floats(&fx, "key_bias"), floats(&fx, "logits"), floats(&fx, "plain_logits"));
        assert!(bias.iter().filter(|&&b| b > 0.0).count() >= 2, "the fixture weighs at least two keys");
        for opts in backends() {
            let p = Pipeline::load(model(name), &opts).expect("load");
            let plain = p.splice(ids.clone(), None, 0, None).expect("splice");
            let mut weighed = plain.clone();
            weighed.key_bias = Some(bias.clone());
            let mut zero = plain.clone();
            zero.key_bias = Some(vec![0.0; ids.len()]);
            let got = p.prefill_logits(&weighed).expect("prefill with bias").to_vec();
            let got_plain = p.prefill_logits(&plain).expect("prefill").to_vec();
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "{name} {}: max |logit - transformers| with the bias {d}", opts.backend);
            let d = max_diff(&got_plain, &want_plain);
            assert!(d < 1e-4, "{name} {}: max |logit - transformers| without bias {d}", opts.backend);
            assert_eq!(got_plain, p.prefill_logits(&zero).expect("prefill zero").to_vec(), "{name} {}", opts.backend);
            let moved = max_diff(&want, &want_plain);
            assert!(moved > 1e-3, "{name}: the reference bias left the logits unchanged ({moved})");
        }
    }
}

#[test]
fn pooled_rows_count_in_the_budget_and_answers_use_them() {
    let mut p = Pipeline::load(model("testbed-llava"), &PipelineOptions::default()).expect("load");
    let img = p.load_image(&repo().join("models/images/scene.png")).expect("image");
    let gen = GenerationOptions { max_new_tokens: 4, ..Default::default() };
    let q = "Is the red circle above or below the blue square?";
    p.set_selection(pooled("dart", 0.25, 0), Default::default()).expect("dart");
    let unpooled = p.answer(&Request::new(q).with_image(ImageInput::Decoded(&img)), &gen, &mut Quiet).unwrap();
    p.set_selection(pooled("dart", 0.25, 8), Default::default()).expect("dart + pool");
    let pooled_answer = p.answer(&Request::new(q).with_image(ImageInput::Decoded(&img)), &gen, &mut Quiet).unwrap();
    assert_eq!(unpooled.stats.visual_tokens_kept, 36);
    assert_eq!(pooled_answer.stats.visual_tokens_kept, 36, "the 8 summaries are part of keep 0.25 of 144");
    let layout = pooled_answer.layout.expect("layout");
    assert_eq!(layout.kept[0].len(), 36);
    assert_ne!(layout.kept, unpooled.layout.expect("layout").kept, "8 rows of the budget went to summaries");
}

#[test]
fn a_decoder_without_the_bias_input_is_refused_by_name() {
    let err = Pipeline::load(
        model("tiny-llava"),
        &PipelineOptions { select: pooled("divprune", 0.5, 4), ..Default::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("attention_bias") && err.contains("pool-dropped"), "{err}");
    let mut p = Pipeline::load(model("tiny-llava"), &PipelineOptions::default()).expect("load");
    let err = p.set_selection(pooled("divprune", 0.5, 4), Default::default()).unwrap_err().to_string();
    assert!(err.contains("attention_bias"), "{err}");
    // and so is a request that brings its own selection
    let req = Request::new("What is it?").with_selection(pooled("divprune", 0.5, 4), Default::default());
    let err = p.answer(&req, &GenerationOptions::default(), &mut Quiet).unwrap_err().to_string();
    assert!(err.contains("attention_bias"), "{err}");
}
