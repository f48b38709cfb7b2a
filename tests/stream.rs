//! Streams with temporal reuse ([`glimpse::runtime::Stream`]): a frame identical to the last
//! one encodes nothing and prefills one token; a frame changed in one corner re-encodes only
//! the views over that corner; and every frame answers with the tokens a fresh
//! `Pipeline::answer` on that image gives, on both backends. A latency budget too small for
//! any encoding defers the changed views, and they are encoded once the budget allows.

mod common;

use std::time::Duration;

use common::*;
use glimpse::runtime::{GenerationOptions, ImageInput, Pipeline, Quiet, Request, Stream, StreamOptions};
use image::RgbImage;

const Q: &str = "What number is written?";

fn frame() -> RgbImage {
    image::open(repo().join("models/images/scene.png")).expect("scene").to_rgb8()
}

/// `img` with a `size`-pixel white square at (`x`, `y`).
fn with_square(img: &RgbImage, x: u32, y: u32, size: u32) -> RgbImage {
    let mut out = img.clone();
    for yy in y..(y + size).min(img.height()) {
        for xx in x..(x + size).min(img.width()) {
            out.put_pixel(xx, yy, image::Rgb([255, 255, 255]));
        }
    }
    out
}

fn fresh(p: &Pipeline, img: &RgbImage, opts: &GenerationOptions) -> Vec<i64> {
    let req = Request::new(Q).with_image(ImageInput::Decoded(img));
    p.answer(&req, opts, &mut Quiet).expect("fresh answer").token_ids
}

#[test]
fn unchanged_views_and_prompt_prefix_are_reused_with_the_same_answer() {
    let opts = GenerationOptions { max_new_tokens: 6, ..Default::default() };
    let base = frame();
    // a change in the top-left corner only
    let moved = with_square(&base, 4, 4, 6);
    for options in backends() {
        let p = Pipeline::load(model("testbed-smolvlm"), &options).expect("load");
        let mut s = Stream::new(&p, Q, StreamOptions::default()).expect("stream");
        let first = s.frame(&base, &opts, &mut Quiet).expect("frame 0");
        let views = first.update.views;
        assert!(views > 1, "the testbed image should be tiled ({views} views)");
        assert_eq!(first.update.views_encoded, views);
        assert_eq!(first.answer.stats.kv_tokens_reused, 0);
        assert_eq!(first.answer.token_ids, fresh(&p, &base, &opts), "{}", options.backend);

        let same = s.frame(&base, &opts, &mut Quiet).expect("frame 1");
        assert_eq!((same.update.views_changed, same.update.views_encoded), (0, 0));
        assert_eq!(same.update.views_reused, views);
        let prompt = same.answer.stats.prompt_tokens;
        assert_eq!(same.answer.stats.kv_tokens_reused, prompt - 1, "all but the last prompt token");
        assert_eq!(same.answer.token_ids, first.answer.token_ids);

        let changed = s.frame(&moved, &opts, &mut Quiet).expect("frame 2");
        let u = &changed.update;
        assert!(u.views_encoded >= 1 && u.views_encoded < views, "{u:?}");
        assert_eq!(u.views_encoded, u.views_changed);
        assert_eq!(u.views_reused, views - u.views_encoded);
        assert_eq!(changed.answer.token_ids, fresh(&p, &moved, &opts), "{}", options.backend);

        // back to the first frame: the views over the corner change again, nothing else
        let back = s.frame(&base, &opts, &mut Quiet).expect("frame 3");
        assert_eq!(back.update.views_encoded, u.views_encoded);
        assert_eq!(back.answer.token_ids, first.answer.token_ids);
    }
}

#[test]
fn without_reuse_every_frame_is_encoded_and_prefilled_whole() {
    let opts = GenerationOptions { max_new_tokens: 4, ..Default::default() };
    let p = Pipeline::load(model("testbed-smolvlm"), &Default::default()).expect("load");
    let off = StreamOptions { reuse_features: false, reuse_prefix: false, ..Default::default() };
    let mut s = Stream::new(&p, Q, off).expect("stream");
    for _ in 0..2 {
        let r = s.frame(&frame(), &opts, &mut Quiet).expect("frame");
        assert_eq!(r.update.views_encoded, r.update.views);
        assert_eq!(r.answer.stats.kv_tokens_reused, 0);
    }
}

#[test]
fn a_tight_latency_budget_defers_changed_views_to_later_frames() {
    let opts = GenerationOptions { max_new_tokens: 2, ..Default::default() };
    let p = Pipeline::load(model("testbed-smolvlm"), &Default::default()).expect("load");
    let budget = StreamOptions { max_latency: Some(Duration::from_nanos(1)), ..Default::default() };
    let mut s = Stream::new(&p, Q, budget).expect("stream");
    let base = frame();
    // nothing cached yet: the first frame is encoded whole whatever the budget
    let first = s.frame(&base, &opts, &mut Quiet).expect("frame 0");
    assert_eq!(first.update.views_encoded, first.update.views);
    assert_eq!(first.deadline_met, Some(false));
    let moved = with_square(&base, 4, 4, 6);
    let r = s.frame(&moved, &opts, &mut Quiet).expect("frame 1");
    assert!(r.update.views_changed > 0);
    assert_eq!(r.update.views_encoded, 0, "{:?}", r.update);
    assert_eq!(r.update.views_deferred, r.update.views_changed);
    assert!(r.update.predicted_ttft_ms.is_some());
    // the deferred views still count as changed on the next frame (their features are old)
    let again = s.frame(&moved, &opts, &mut Quiet).expect("frame 2");
    assert_eq!(again.update.views_changed, r.update.views_changed);
    // with no budget the same stream state would encode them: a fresh unbudgeted stream agrees
    let mut free = Stream::new(&p, Q, StreamOptions::default()).expect("stream");
    free.frame(&base, &opts, &mut Quiet).expect("frame 0");
    let f = free.frame(&moved, &opts, &mut Quiet).expect("frame 1");
    assert_eq!(f.update.views_encoded, r.update.views_changed);
}

#[test]
fn a_new_prompt_reuses_the_shared_prefix_and_answers_as_fresh() {
    let opts = GenerationOptions { max_new_tokens: 6, ..Default::default() };
    let p = Pipeline::load(model("testbed-smolvlm"), &Default::default()).expect("load");
    let mut s = Stream::new(&p, Q, StreamOptions::default()).expect("stream");
    let img = frame();
    s.frame(&img, &opts, &mut Quiet).expect("frame 0");
    let other = "How many circles are there?";
    s.set_prompt(other);
    let r = s.answer(&opts, &mut Quiet).expect("answer");
    // the image comes before the question, so everything up to the question is reused
    assert!(r.answer.stats.kv_tokens_reused > r.answer.stats.visual_tokens_kept, "{:?}", r.answer.stats);
    let req = Request::new(other).with_image(ImageInput::Decoded(&img));
    assert_eq!(r.answer.token_ids, p.answer(&req, &opts, &mut Quiet).expect("fresh").token_ids);
}

#[test]
fn asking_before_any_frame_is_an_error() {
    let p = Pipeline::load(model("tiny-smolvlm"), &Default::default()).expect("load");
    let mut s = Stream::new(&p, Q, StreamOptions::default()).expect("stream");
    let e = s.answer(&GenerationOptions::default(), &mut Quiet).unwrap_err();
    assert!(e.to_string().contains("feed a frame"), "{e}");
}
