#!/usr/bin/env bash
# Regenerates the quality tables of docs/pruning.md: accuracy of every pruning method at keep
# 0.5 / 0.25 / 0.125 on both testbeds' eval sets, next to full tokens and the random baseline,
# plus tile budgets on the SmolVLM-architecture testbed. One model load per testbed and tile
# budget; every configuration sees the same questions.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace -q
g=target/release/glimpse
methods=random,uniform,pool,dart,divprune,todre,cdpruner,vtc-cls,visionzip,globalcom2,recoverable
echo "## testbed-smolvlm (Idefics3: 4 tiles + global view, 64 tokens each)"
echo
$g eval --model models/testbed-smolvlm --markdown --prune "none,${methods//,vtc-cls/}" --keep 1.0,0.5,0.25,0.125 --positions original
echo
$g eval --model models/testbed-smolvlm --markdown --prune "${methods//,vtc-cls/}" --keep 0.5,0.25,0.125 --positions contiguous
echo
echo "### Tile skipping before the encoder (global view scores the tiles; no further pruning)"
echo
$g eval --model models/testbed-smolvlm --markdown --tiles all,3,2,1,0
echo
echo "## testbed-llava (CLIP with CLS, 144 tokens)"
echo
$g eval --model models/testbed-llava --markdown --prune "none,$methods" --keep 1.0,0.5,0.25,0.125 --positions original
echo
$g eval --model models/testbed-llava --markdown --prune "$methods" --keep 0.5,0.25,0.125 --positions contiguous
