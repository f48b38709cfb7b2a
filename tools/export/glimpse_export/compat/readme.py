"""README.md of each compat folder (one paragraph on the style, then generated facts) and the corpus index."""

from __future__ import annotations

from pathlib import Path

import onnx

from ..quantize.convert import op_types
from .styles import Style

REGEN = "cd tools/export && ../../.venv/bin/python -m glimpse_export compat --out ../../models/compat"

PARAGRAPHS = {
    "llava-plain-export": (
        "Mimics a user's own script: plain `torch.onnx.export(dynamo=False)` (opset 18, `dynamic_axes`, nothing "
        "renamed or pinned afterwards) of a wrapper that calls the Hugging Face `LlamaModel` with the 2-D "
        "`attention_mask`, the `position_ids` and a `DynamicCache` made of the `past_key_values.N.key/value` "
        "inputs, so the causal + padding mask is built by transformers' `masking_utils` **inside the decoder graph** "
        "(glimpse_export's own decoder receives a ready 4-D bias instead). Unusual besides: grouped-query attention "
        "(4 heads, 2 KV heads, head_dim 12, 3 layers, hidden 48); `vision_feature_layer` -3 with "
        "`vision_feature_select_strategy` `full`, so the CLS row is kept and each image gives 17 tokens (16 patches "
        "+ CLS; the processor expands `<image>` to 17); and a monolithic vision encoder without any dynamic axis "
        "(`pixel_values` exactly `[1, 3, 40, 40]`, one image per call)."),
    "llava-feature-layers": (
        "A LLaVA config with `vision_feature_layer: [-1, -3]`: transformers takes the hidden states of the last and "
        "of the third-to-last CLIP layer, drops the CLS row of each (strategy `default`) and concatenates them on the "
        "feature axis, so the projector's first Linear is 64 -> 40 (2 x the vision width 32). The vision encoder graph "
        "does the selection and concatenation itself; a runtime only has to accept a list in `config.json`. Text "
        "model: multi-query attention (2 heads, 1 KV head, head_dim 20), hidden 40, 2 layers; CLIP 36 px, patch 6 "
        "-> 36 tokens per image. Exported with glimpse_export's usual legacy exporter."),
    "smolvlm-dynamic-hw": (
        "SmolVLM / Idefics3 whose vision encoder has symbolic `height` and `width` on `pixel_values` "
        "`[batch_size, num_images, 3, height, width]` and `pixel_attention_mask` `[batch_size, num_images, height, "
        "width]`; `image_features` is `[batch_num_images, num_tokens, 72]` with a symbolic token count, because the "
        "patch grid and the pixel shuffle are computed from the input's height and width (the graph was also run on "
        "24 px tiles: 2 x 2 tokens, equal to transformers). The tile size is odd: 36 px (`max_image_size.longest_edge` "
        "36, `size.longest_edge` 108, so up to 3 x 3 tiles + the global view), patch 4 -> 9 x 9 patches, "
        "`scale_factor` 3 -> 9 tokens per tile. The processor files are exactly what transformers 5.24 "
        "`Idefics3Processor.save_pretrained` writes: `processor_config.json` with the image processor nested under "
        "`image_processor` (`image_processor_type` `Idefics3ImageProcessor`), `tokenizer.json`, "
        "`tokenizer_config.json` "
        "(no `chat_template` key), `chat_template.jinja`, and **no `preprocessor_config.json`**."),
    "smolvlm-dynamo": (
        "SmolVLM / Idefics3 exported with the dynamo exporter, `torch.onnx.export(..., dynamo=True)` with its "
        "defaults (torch.export, onnxscript torchlib, the onnxscript optimizer, the exporter's default opset 20, "
        "node annotations kept except `pkg.torch.onnx.stack_trace`, which holds absolute paths), dynamic dims "
        "given as `torch.export.Dim.DYNAMIC`, so the symbolic dim names are torch.export's (`s10`, `s29 + s69`, "
        "...; batch and past may get different symbols per input) and relations such as total = past + sequence "
        "are found by torch.export. The vision part is transformers' own "
        "`Idefics3Model.get_image_features` (no Glimpse wrapper): the all-zero padding tiles are dropped inside the "
        "graph with data-dependent ops, and torch.export could only keep `num_images` dynamic (batch fixed to 1, see "
        "below). The decoder is the Hugging Face text model with the 2-D `attention_mask` (transformers' causal mask "
        "built in the graph). Model: 48 px tiles, patch 6 (8 x 8 patches), `scale_factor` 2 -> 16 tokens per tile, "
        "vision 3 layers; Llama hidden 64, 3 layers, 8 heads / 2 KV heads (head_dim 8)."),
    "llava-external-data": (
        "Every initializer of all three parts lives in an external data file next to the graph, "
        "`onnx/<part>.onnx_data` (onnx-community's naming), written with `onnx.save_model(model, path, "
        "save_as_external_data=True, all_tensors_to_one_file=True, location=\"<part>.onnx_data\", size_threshold=0)`: "
        "even scalar initializers are external, the `.onnx` files hold only the graph (plus inline `Constant` "
        "nodes) and must be loaded with their directory as the base path. onnx-community does this for parts over "
        "the 2 GB protobuf limit. The model: plain multi-head attention (7 heads = 7 KV heads, head_dim 8, hidden "
        "56), CLIP 48 px with patch 12 (16 tokens), 5 vision layers, feature layer -2."),
    "llava-int8-decoder-only": (
        "Only some dtypes for some parts, as onnx-community folders often have: fp32 `vision_encoder.onnx` and "
        "`embed_tokens.onnx`, but the decoder **only** as `decoder_model_merged_int8.onnx` "
        "(`onnxruntime.quantization.quantize_dynamic`, QInt8 weights per tensor, `MatMulConstBOnly`, as "
        "transformers.js' `int8` mode: `DynamicQuantizeLinear` + `MatMulInteger`) and `decoder_model_merged_fp16.onnx` "
        "(`convert_float_to_float16(keep_io_types=True)`: fp16 weights and compute, fp32 inputs and outputs including "
        "the KV cache); there is no fp32 `decoder_model_merged.onnx` and no int8 / fp16 variant of the other parts. "
        "In the fixtures `generated_ids` are transformers' fp32 tokens; `generated_ids_ort_int8` and "
        "`generated_ids_ort_fp16` are onnxruntime's greedy tokens with that decoder (fp32 vision and embed), which "
        "may differ from fp32 (random weights). The fp32 decoder reproduced `generated_ids` exactly before it was "
        "removed. Model: CLIP 32 px, patch 4 -> 64 tokens, feature layer -1; Llama hidden 64, 4 heads / 1 KV head."),
    "llava-onevision-no-newline": (
        "LLaVA-OneVision exported the way transformers.js consumes it: `vision_encoder.onnx` is only the SigLIP tower "
        "+ projector, `pixel_values` `[num_patches, 3, 40, 40]` -> `image_features` `[num_patches, 25, 48]` (crop "
        "features before packing) and has **no `image_newline` output**. transformers.js has no `image_newline` "
        "handling at all: its `LlavaOnevisionForConditionalGeneration` is `LlavaForConditionalGeneration`, which "
        "feeds `vision_encoder` whichever processor outputs the session declares as inputs (the plain image "
        "processor gives `pixel_values`), reads only its `image_features` output and scatters those rows into the "
        "`<image>` positions; its `LlavaOnevisionImageProcessor` is the plain `ImageProcessor` (no "
        "anyres, no `image_grid_pinpoints` anywhere in transformers.js); it has no LLaVA-NeXT at all. Whether the "
        "published llava-hf/llava-onevision-qwen2-0.5b-ov-hf `onnx/vision_encoder.onnx` appends the newline inside "
        "its graph could not be checked here (the file itself was not reachable). So the learned vector (48 floats) "
        "is stored the one documented way found: as optimum-intel's OpenVINO exporter stores it for models with an "
        "`image_newline` parameter (LLaVA-NeXT): a float list `\"image_newline\"` in `config.json` "
        "(`model.config.image_newline = model.model.image_newline.tolist()`), and the runtime packs the crops itself "
        "(transformers' `pack_image_features`: base view first, the anyres grid unpadded to the image's aspect, one "
        "newline row after each grid row, `anyres_max_9`). `processor_config.json` is hand-written like "
        "`tiny-llava-onevision`'s (the video processor transformers requires needs torchvision). Model: SigLIP 40 px, "
        "patch 8 -> 25 tokens per crop, anyres pinpoints up to 3 x 3 crops of 40 px; Qwen2 hidden 48, 2 layers, 4 "
        "heads / 2 KV heads, tied embeddings."),
}


SOURCES = {
    "llava-onevision-no-newline": [
        "transformers.js (huggingface/transformers.js, commit 5ed4c5c0): "
        "`packages/transformers/src/models/llava_onevision/modeling_llava_onevision.js` "
        "(`export { LlavaForConditionalGeneration as LlavaOnevisionForConditionalGeneration }`), "
        "`.../llava/modeling_llava.js` (`_merge_input_ids_with_image_features`: `image_features.view(-1, hidden)`), "
        "`.../modeling_utils.js` (`encode_image` = `_encode_input('vision_encoder', inputs, 'image_features')`, "
        "`_encode_input` feeds `pick(inputs, session.inputNames)`; `image_text_to_text_forward` with "
        "`modality_input_names: ['pixel_values']`; "
        "`default_merge_input_ids_with_features`: token count must equal feature rows), "
        "`.../llava_onevision/image_processing_llava_onevision.js` "
        "(`class LlavaOnevisionImageProcessor extends ImageProcessor {}`). When LLaVA-OneVision support was added "
        "(commit e848907e, Nov 2024, `src/models.js`) the merge replaced the single `<image>` token by the image's "
        "whole feature sequence.",
        "optimum-intel (huggingface/optimum-intel, commit e1de5bee): `optimum/exporters/openvino/convert.py` "
        "(`if hasattr(model, \"model\") and hasattr(model.model, \"image_newline\"): model.config.image_newline = "
        "model.model.image_newline.tolist()`), `optimum/intel/openvino/modeling_visual_language.py` "
        "(`_OVLlavaNextForCausalLM`: `image_newline = torch.tensor(self.config.image_newline)` passed to its "
        "`pack_image_features`).",
        "Hugging Face model pages: llava-hf/llava-onevision-qwen2-0.5b-ov-hf lists `onnx/` (\"Upload ONNX weights "
        "(#2)\": `decoder_model_merged{,_bnb4,_fp16,_int8,_q4,_q4f16,_quantized,_uint8}.onnx`, `embed_tokens{,_bnb4,"
        "_fp16}.onnx`, ...; the listing seen here was cut there, so the vision_encoder files were not seen) and a "
        "transformers.js example (\"Add transformers.js tags and example code (#7)\").",
    ],
}


def _io(path: Path) -> str:
    m = onnx.load(str(path), load_external_data=False)

    def fmt(vi):
        t = vi.type.tensor_type
        dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
        return f"`{vi.name}` {onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name} [{', '.join(dims)}]"

    ins = [fmt(i) for i in m.graph.input]
    outs = [fmt(o) for o in m.graph.output]
    if len(ins) > 4:
        ins = ins[:3] + [f"... ({len(ins) - 3} KV inputs)"]
        outs = outs[:1] + [f"... ({len(outs) - 1} KV outputs)"]
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    ops = ", ".join(f"{k}" for k in op_types(m))
    return f"opset {opset}, {len(m.graph.node)} nodes; in {', '.join(ins)}; out {', '.join(outs)}; ops: {ops}"


def write_readme(out: Path, style: Style, notes: dict, lines: list[str]) -> None:
    files = sorted(p for p in (out / "onnx").iterdir())
    text = [f"# {style.name}", "", PARAGRAPHS[style.name], ""]
    if style.name in SOURCES:
        text += ["Sources:", ""] + [f"* {src}" for src in SOURCES[style.name]] + [""]
    if "dynamo" in notes:
        text += ["Exporter per part:", ""]
        text += [f"* `{stem}`: {'; then '.join(how)}" for stem, how in notes["dynamo"].items()]
        text.append("")
    text += ["Files (`onnx/`):", ""]
    for p in files:
        line = f"* `{p.name}` ({p.stat().st_size:,} bytes)"
        if p.suffix == ".onnx":
            line += ": " + _io(p)
        text.append(line)
    text += ["", "Self-check (onnxruntime over these files vs transformers `generate`, greedy, 20 new tokens):", ""]
    text += [f"* {line}" for line in lines]
    text += ["", f"Regenerate: `{REGEN} --only {style.name}` (fixed seed {style.seed}).", ""]
    (out / "README.md").write_text("\n".join(text), encoding="utf-8")


def write_index(root: Path, rows: list[dict]) -> None:
    text = ["# Compatibility corpus", "",
            "Small random-weight models exported the way other tools export them, to check that Glimpse loads the "
            "folders users actually have. Each folder has a `README.md` (the style) and `fixtures/fixtures.json` "
            "(the tiny fixtures' format; `generated_ids` = transformers greedy `generate`, 20 new tokens).", "",
            "| folder | family | style | bytes | onnxruntime == transformers |", "|---|---|---|---|---|"]
    for r in rows:
        text.append(f"| `{r['name']}/` | {r['family']} | {r['summary']} | {r['bytes']:,} | {r['equal']} |")
    text += ["", f"Regenerate all: `{REGEN}` (one folder: `--only NAME`).", ""]
    (root / "README.md").write_text("\n".join(text), encoding="utf-8")
