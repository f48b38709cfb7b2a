//! Soak: 1000 requests through one loaded pipeline (text-only and image questions, several
//! images, pruning on and off) with resident memory sampled; it must stay flat, within 5% of
//! where it stands after warming up.

mod common;

use common::*;
use glimpse::runtime::{
    GenerationOptions, ImageInput, Pipeline, PipelineOptions, Positions, Quiet, Request, SelectConfig,
};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[test]
fn a_thousand_requests_keep_memory_flat() {
    let p = Pipeline::load(model("tiny-llava"), &PipelineOptions::default()).expect("load");
    let images: Vec<_> = ["small.png", "wide.png", "strip.png", "scene.png"]
        .iter()
        .map(|n| p.load_image(&repo().join("models/images").join(n)).expect("image"))
        .collect();
    let gen = GenerationOptions { max_new_tokens: 6, ..Default::default() };
    let dart = SelectConfig { method: "dart".into(), budget: "0.25".parse().expect("keep"), ..Default::default() };
    let mut warm = 0;
    let mut peak_after_warm = 0;
    for i in 0..1000 {
        let prompt = format!("Question {i}: what is in the image?");
        let mut req = Request::new(&prompt);
        if i % 5 != 0 {
            req = req.with_image(ImageInput::Decoded(&images[i % images.len()]));
        }
        if i % 2 == 0 {
            req = req.with_selection(dart.clone(), Positions::Original);
        }
        p.answer(&req, &gen, &mut Quiet).expect("answer");
        if i == 99 {
            warm = rss_bytes();
        } else if i > 99 {
            peak_after_warm = peak_after_warm.max(rss_bytes());
        }
    }
    let growth = peak_after_warm as f64 / warm as f64 - 1.0;
    eprintln!(
        "soak: RSS {:.1} MB after 100 requests, peak {:.1} MB over the next 900 ({:+.2}%)",
        warm as f64 / 1e6,
        peak_after_warm as f64 / 1e6,
        growth * 100.0
    );
    assert!(growth < 0.05, "resident memory grew {:.1}% over 900 requests", growth * 100.0);
}
