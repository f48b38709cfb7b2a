"""Greedy generation over the three ONNX parts with onnxruntime (what the Rust runtime does)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

PARTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")


@dataclass
class OrtResult:
    image_features: np.ndarray  # [n_image_tokens, hidden], as spliced
    first_logits: np.ndarray  # [vocab], last position of the prefill
    generated_ids: list[int]
    margins: list[float]  # top1 - top2 logit at every greedy step


class OrtModel:
    def __init__(self, onnx_dir: Path, stems: dict[str, str] | None = None):
        """``stems``: file stem per part where it is not the part name (``decoder_model_merged_int8``)."""
        stems = {p: p for p in PARTS} | (stems or {})
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.sessions = {
            p: ort.InferenceSession(str(onnx_dir / f"{stems[p]}.onnx"), so, providers=["CPUExecutionProvider"])
            for p in PARTS
        }
        dec = self.sessions["decoder_model_merged"]
        self.past_inputs = [i for i in dec.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in dec.get_outputs()]
        self.decoder_inputs = [i.name for i in dec.get_inputs()]
        self.vision_inputs = [i.name for i in self.sessions["vision_encoder"].get_inputs()]

    def image_features(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray | None,
                       pack=None) -> np.ndarray:
        """Feature rows as spliced. LLaVA-OneVision's encoder also returns ``image_newline``; ``pack(features,
        newline)`` then arranges the crop features as the model does."""
        feeds = {"pixel_values": pixel_values.astype(np.float32)}
        if "pixel_attention_mask" in self.vision_inputs:
            feeds["pixel_attention_mask"] = pixel_attention_mask.astype(bool)
        session = self.sessions["vision_encoder"]
        outputs = [o.name for o in session.get_outputs()]
        if "image_newline" in outputs:
            if pack is None:
                raise ValueError("this encoder returns image_newline: pass pack= to arrange its features")
            feats, newline = session.run(["image_features", "image_newline"], feeds)
            return pack(feats, newline)
        (feats,) = session.run(["image_features"], feeds)
        return feats.reshape(-1, feats.shape[-1])

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed_tokens"].run(["inputs_embeds"], {"input_ids": input_ids.astype(np.int64)})[0]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        past = {}
        for i in self.past_inputs:
            _, heads, _, head_dim = i.shape  # [batch, kv_heads, past, head_dim]; heads/head_dim are concrete
            past[i.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
        return past

    def decode(self, embeds, attention_mask, position_ids, past):
        feeds = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids, **past}
        if "attention_bias" in self.decoder_inputs:  # zero bias: the plain decoder
            feeds["attention_bias"] = np.zeros(attention_mask.shape, dtype=np.float32)
        outs = self.sessions["decoder_model_merged"].run(self.output_names, feeds)
        res = dict(zip(self.output_names, outs))
        new_past = {n.replace("present.", "past_key_values."): v for n, v in res.items() if n.startswith("present.")}
        return res["logits"], new_past

    def splice(self, input_ids: np.ndarray, image_token_id: int, feats: np.ndarray) -> np.ndarray:
        embeds = self.embed(input_ids)
        mask = input_ids == image_token_id
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(f"{int(mask.sum())} image tokens but {feats.shape[0]} feature rows")
        embeds[mask] = feats  # masked scatter: rows in order into the <image> positions
        return embeds

    def greedy(self, input_ids: list[int], pixel_values, pixel_attention_mask, image_token_id: int,
               eos_ids: list[int], max_new_tokens: int, pack=None, features=None) -> OrtResult:
        """``features``: feature rows computed by the caller (then pixel_values is not used)."""
        ids = np.asarray([input_ids], dtype=np.int64)
        feats = self.image_features(pixel_values, pixel_attention_mask, pack) if features is None else features
        embeds = self.splice(ids, image_token_id, feats)
        seq = ids.shape[1]
        attn = np.ones((1, seq), dtype=np.int64)
        pos = np.arange(seq, dtype=np.int64)[None]
        past = self.empty_past(1)  # past_seq = 0 on the first step
        out, margins, first = [], [], None
        for _ in range(max_new_tokens):
            logits, past = self.decode(embeds, attn, pos, past)
            last = logits[0, -1]
            if first is None:
                first = last.copy()
            top2 = np.sort(last)[-2:]
            margins.append(float(top2[1] - top2[0]))
            tok = int(last.argmax())
            out.append(tok)
            if tok in eos_ids:
                break
            embeds = self.embed(np.asarray([[tok]], dtype=np.int64))
            total = attn.shape[1] + 1
            attn = np.ones((1, total), dtype=np.int64)
            pos = np.asarray([[total - 1]], dtype=np.int64)
        return OrtResult(feats, first, out, margins)
