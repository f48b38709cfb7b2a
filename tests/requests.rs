//! What a request can carry besides one question (what `glimpse serve` relies on): earlier
//! turns rendered through the chat template as transformers renders them, image bytes decoded
//! like an image file, an observer that cancels (before generation: an error naming the stage;
//! during it: the answer so far), and stop sequences cutting the streamed answer.

mod common;

use common::*;
use glimpse::runtime::generate::{StopAt, StopReason};
use glimpse::runtime::pipeline::{ImageInput, Observer, Request, Role, Turn};
use glimpse::runtime::{Error, GenerationOptions, Pipeline, PipelineOptions};

fn history() -> Vec<Turn> {
    vec![
        Turn { role: Role::System, text: "Answer in one word.".into() },
        Turn { role: Role::User, text: "Is there a cat?".into() },
        Turn { role: Role::Assistant, text: "No.".into() },
    ]
}

/// Cancels after `after` text pieces (0: before anything runs), recording what it saw.
#[derive(Default)]
struct CancelAfter {
    after: usize,
    pieces: Vec<String>,
}

impl Observer for CancelAfter {
    fn text(&mut self, piece: &str) {
        self.pieces.push(piece.to_string());
    }
    fn cancelled(&mut self) -> bool {
        self.pieces.len() >= self.after
    }
}

#[test]
fn image_bytes_answer_as_the_image_file_does() {
    let p = Pipeline::load(model("testbed-smolvlm"), &PipelineOptions::default()).expect("load");
    let path = repo().join("models/images/scene.png");
    let bytes = std::fs::read(&path).expect("image");
    let opts = GenerationOptions { max_new_tokens: 8, ..Default::default() };
    let q = "What number is written?";
    let by_path = p.ask(Some(&path), q, &opts, &mut |_| {}).expect("by path");
    let req = Request::new(q).with_image(ImageInput::Bytes { bytes: &bytes, name: "upload" });
    let by_bytes = p.answer(&req, &opts, &mut glimpse::runtime::Quiet).expect("by bytes");
    assert_eq!(by_bytes.text, by_path.text);
    let junk = Request::new(q).with_image(ImageInput::Bytes { bytes: b"not an image", name: "upload" });
    let e = p.answer(&junk, &opts, &mut glimpse::runtime::Quiet).unwrap_err();
    assert!(matches!(e, Error::Image { .. }) && e.to_string().contains("upload"), "{e}");
    assert!(e.is_request_error());
}

#[test]
fn an_observer_cancels_before_and_during_generation() {
    let p = Pipeline::load(model("testbed-smolvlm"), &PipelineOptions::default()).expect("load");
    let image = std::fs::read(repo().join("models/images/scene.png")).expect("image");
    let opts = GenerationOptions { max_new_tokens: 40, ignore_eos: true, ..Default::default() };
    let req = Request::new("Describe the scene.").with_image(ImageInput::Bytes { bytes: &image, name: "scene" });
    let mut never = CancelAfter { after: 0, ..Default::default() };
    let e = p.answer(&req, &opts, &mut never).unwrap_err();
    assert!(matches!(e, Error::Cancelled { .. }), "{e}");
    let mut three = CancelAfter { after: 3, ..Default::default() };
    let a = p.answer(&req, &opts, &mut three).expect("answer so far");
    assert_eq!(a.stats.stop, StopReason::Cancelled);
    assert!(a.stats.new_tokens < 40, "{} tokens", a.stats.new_tokens);
    assert_eq!(three.pieces.concat(), a.text);
}

#[test]
fn a_stop_sequence_cuts_the_streamed_answer() {
    let p = Pipeline::load(model("testbed-smolvlm"), &PipelineOptions::default()).expect("load");
    let path = repo().join("models/images/scene.png");
    let opts = GenerationOptions { max_new_tokens: 16, ignore_eos: true, ..Default::default() };
    let q = "Describe the scene.";
    let full = p.ask(Some(&path), q, &opts, &mut |_| {}).expect("answer").text;
    assert!(full.chars().count() > 2, "{full:?}");
    let stop: String = full.chars().skip(2).take(1).collect();
    let cut = &full[..full.find(&stop).expect("stop occurs")];
    let mut seen = CancelAfter { after: usize::MAX, ..Default::default() };
    let mut stopper = StopAt::new(vec![stop.clone()], &mut seen).expect("stop");
    let a = p.answer(&Request::new(q).with_image(ImageInput::Path(&path)), &opts, &mut stopper).expect("answer");
    assert!(stopper.hit());
    assert_eq!(stopper.finish(), cut);
    assert_eq!(seen.pieces.concat(), cut, "nothing past the stop sequence was streamed");
    assert_eq!(a.stats.stop, StopReason::Cancelled);
    assert!(a.stats.new_tokens < 16);
}

/// Earlier turns render as transformers' `apply_chat_template` renders the same conversation
/// (the folder's `chat_template.jinja` through the tokenizer, run in the export venv).
#[cfg(feature = "venv-tests")]
#[test]
fn earlier_turns_render_as_transformers_does() {
    for name in ["tiny-smolvlm", "tiny-llava", "tiny-llava-onevision"] {
        let dir = model(name);
        let p = Pipeline::load(&dir, &PipelineOptions::default()).expect("load");
        let ours = p.render_turns(&history(), "How many dogs?", true).expect("render");
        let script = r#"
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
template = (Path(sys.argv[1]) / "chat_template.jinja").read_text()
msgs = [
    {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
    {"role": "user", "content": [{"type": "text", "text": "Is there a cat?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many dogs?"}]},
]
print(json.dumps(tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)))
"#;
        let out = std::process::Command::new(repo().join(".venv/bin/python"))
            .env("HF_HUB_OFFLINE", "1")
            .args(["-c", script])
            .arg(&dir)
            .output()
            .expect("run the venv's python");
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let theirs: String = serde_json::from_slice(&out.stdout).expect("JSON string");
        assert_eq!(ours, theirs, "{name}");
        assert!(ours.contains("Answer in one word.") && ours.contains("No."), "{ours}");
    }
}

/// A request's own encoder-side reduction: on a pipeline with the staged encoder loaded beside
/// the monolithic one (`stages_for_requests`, `glimpse serve --request-reduction`), a
/// request with region skipping answers as a pipeline built with that skipping does, and
/// encodes fewer tokens; a pipeline without stages refuses it by name.
#[test]
fn a_request_brings_its_own_region_skipping() {
    use glimpse::runtime::pipeline::{EncoderReduction, RegionSkip};
    use glimpse::runtime::{Budget, Scope, SkippedTiles};
    let skip = RegionSkip {
        budget: Budget::Ratio(0.5),
        scope: Scope::Global,
        skipped: SkippedTiles::Drop,
        relevance: 0.0,
        global: Budget::Ratio(1.0),
    };
    let path = repo().join("models/images/scene.png");
    let opts = GenerationOptions { max_new_tokens: 8, ..Default::default() };
    let q = "What number is written?";
    let staged = PipelineOptions { stages_for_requests: true, ..Default::default() };
    let p = Pipeline::load(model("testbed-smolvlm"), &staged).expect("load staged");
    let full = p.ask(Some(&path), q, &opts, &mut |_| {}).expect("full");
    let own = Request::new(q)
        .with_image(ImageInput::Path(&path))
        .with_reduction(EncoderReduction { regions: Some(skip), ..Default::default() });
    let reduced = p.answer(&own, &opts, &mut glimpse::runtime::Quiet).expect("own regions");
    let built =
        Pipeline::load(model("testbed-smolvlm"), &PipelineOptions { regions: Some(skip), ..Default::default() })
            .expect("load with regions");
    let reference = built.ask(Some(&path), q, &opts, &mut |_| {}).expect("pipeline regions");
    assert_eq!(reduced.text, reference.text);
    assert_eq!(reduced.token_ids, reference.token_ids);
    assert_eq!(reduced.stats.visual_tokens_kept, reference.stats.visual_tokens_kept);
    assert!(reduced.stats.visual_tokens_kept < full.stats.visual_tokens_kept);
    // what the family does not allow is refused per request as at load, not ignored
    use glimpse::runtime::{TileBudget, TileSkip};
    let llava = Pipeline::load(model("testbed-llava"), &PipelineOptions::default()).expect("load llava");
    let tiles = TileSkip { budget: TileBudget::Count(2), skipped: SkippedTiles::Drop, relevance: 0.0 };
    let own_tiles = Request::new(q)
        .with_image(ImageInput::Path(&path))
        .with_reduction(EncoderReduction { tiles: Some(tiles), ..Default::default() });
    let e = llava.answer(&own_tiles, &opts, &mut glimpse::runtime::Quiet).unwrap_err();
    assert!(e.to_string().contains("tile skipping"), "{e}");
    let plain = Pipeline::load(model("testbed-smolvlm"), &PipelineOptions::default()).expect("load");
    if !plain.encoder_is_staged() {
        let e = plain.answer(&own, &opts, &mut glimpse::runtime::Quiet).unwrap_err();
        assert!(e.to_string().contains("--request-reduction"), "{e}");
    }
}
