"""Models, processors and Hugging Face files of the compat styles (the families' tokenizers and processors with the
styles' sizes)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPVisionConfig, LlavaConfig, LlavaProcessor

from .. import families
from ..common import seed_everything
from ..families import Bundle, finish_model
from ..folder import save_folder
from .styles import Style


def _llava(spec, style: Style, tok, text_config, image_token_id):
    """LlavaProcessor + LlavaConfig for the style's feature layer(s) and selection strategy."""
    v, strategy = style.vision, style.extra["strategy"]
    px, patch = v["image_size"], v["patch_size"]
    proc = LlavaProcessor(image_processor=spec.image_processor(px), tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                          chat_template=spec.chat_template)
    seq = (px // patch) ** 2 + (1 if strategy == "full" else 0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**v), text_config=text_config, image_token_index=image_token_id,
        image_seq_length=seq, projector_hidden_act="gelu", vision_feature_select_strategy=strategy,
        vision_feature_layer=style.extra["feature_layer"], tie_word_embeddings=style.text["tie_word_embeddings"],
    )
    return proc, seq, config


def build(style: Style) -> Bundle:
    spec = families.get(style.family)
    tok = spec.tokenizer(vocab_size=style.vocab)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    eos = tok.convert_tokens_to_ids(spec.text_tokens[1])
    text_config = spec.text_config(tok, style.text)
    if spec.name == "llava":
        proc, seq, config = _llava(spec, style, tok, text_config, image_token_id)
    else:
        sizes = dict(vision=style.vision, **style.extra)
        if spec.name == "llava_onevision":
            sizes["tie_word_embeddings"] = style.text["tie_word_embeddings"]
        proc, seq = spec.processor(tok, sizes)
        config = spec.model_config(text_config, image_token_id, tok, sizes)
    seed_everything(style.seed)
    model = finish_model(spec.model_class()(config))
    model.generation_config = spec.generation_config(config.text_config, [eos])
    return Bundle(spec, style.seed, model, proc, tok, spec.chat_template, image_token_id, [eos],
                  extra=dict(image_seq_len=seq))


def save_hf_files(bundle: Bundle, style: Style, out: Path) -> None:
    """config.json, generation_config.json, processor and tokenizer files.

    ``smolvlm-dynamic-hw`` keeps exactly what transformers 5 ``processor.save_pretrained`` writes
    (processor_config.json with the image processor nested, tokenizer.json, tokenizer_config.json without a
    chat_template, chat_template.jinja; no preprocessor_config.json); the others are written like the tiny
    folders (``folder.save_folder``: + preprocessor_config.json, chat_template copied into tokenizer_config.json).
    ``llava-onevision-no-newline`` adds the learned ``image_newline`` vector to config.json (optimum-intel's
    OpenVINO exporter does the same: ``model.config.image_newline = model.model.image_newline.tolist()``)."""
    if style.exporter == "dynamic_hw":
        bundle.processor.save_pretrained(str(out))
        cfg = bundle.model.config
        cfg.architectures = [type(bundle.model).__name__]
        cfg.save_pretrained(str(out))
        bundle.model.generation_config.save_pretrained(str(out))
    else:
        save_folder(bundle, out)
    if style.exporter == "onevision_plain":
        path = out / "config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg["image_newline"] = bundle.model.model.image_newline.detach().float().tolist()
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for junk in ("model.safetensors",):
        if (out / junk).exists():
            (out / junk).unlink()
