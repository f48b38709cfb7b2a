"""Testbed models: build, load and save, the auxiliary heads, and the initialisations ``train`` offers (resume from a
folder, re-initialised text side, centred connector, vision encoder transferred from the LLaVA testbed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoImageProcessor, LlavaForConditionalGeneration

from .. import families
from ..common import ExportError, log, seed_everything
from ..families import Bundle
from ..folder import save_folder
from ..scenes import N_COLOUR_CLS, N_DIGIT_CLS, N_SHAPE_CLS, vocabulary_corpus
from .config import TESTBEDS, TEXT, TOKENIZER_VOCAB, TRAIN_SEED_BASE
from .data import Prep, scene_batch


def build_testbed(testbed: str, seed: int) -> Bundle:
    tb = TESTBEDS[testbed]
    spec = tb.spec
    tok = spec.tokenizer(vocabulary_corpus(), TOKENIZER_VOCAB)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    eos_id = tok.convert_tokens_to_ids(spec.text_tokens[1])
    text_cfg = spec.text_config(tok, TEXT)
    seed_everything(seed)
    proc, seq = spec.processor(tok, tb.sizes)
    model = spec.model_class()(spec.model_config(text_cfg, image_token_id, tok, tb.sizes))
    model.set_attn_implementation("eager")
    model.generation_config = spec.generation_config(text_cfg, [eos_id])
    return Bundle(spec, seed, model, proc, tok, spec.chat_template, image_token_id, [eos_id],
                  extra=dict(image_seq_len=seq, testbed=testbed))


def load_testbed(model_dir: Path) -> Bundle:
    """A trained testbed folder (weights in model.safetensors) as a Bundle."""
    cfg = json.loads((model_dir / "config.json").read_text())
    spec = families.get(cfg["model_type"])
    model = spec.model_class().from_pretrained(str(model_dir), attn_implementation="eager",
                                               dtype=torch.float32).eval()
    proc = spec.load_processor(model_dir)
    tok = proc.tokenizer
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    img = cfg.get("image_token_id", cfg.get("image_token_index"))
    seq = spec.saved_image_seq_len(proc, cfg)
    info = json.loads((model_dir / "export_info.json").read_text()) if (model_dir / "export_info.json").exists() else {}
    return Bundle(spec, info.get("seed", 0), model, proc, tok, spec.chat_template, img, eos,
                  extra=dict(image_seq_len=seq, testbed=spec.name))


def vision_params(bundle: Bundle) -> list:
    return list(bundle.spec.vision_tower(bundle.model).parameters())


class AuxHeads(nn.Module):
    def __init__(self, dim: int, cls: bool):
        super().__init__()
        self.colour = nn.Linear(dim, N_COLOUR_CLS)
        self.shape = nn.Linear(dim, N_SHAPE_CLS)
        self.digit = nn.Linear(dim, N_DIGIT_CLS)
        self.centre = nn.Linear(dim, 2)
        self.xy = nn.Linear(dim, 2)
        self.presence = nn.Linear(dim, 34) if cls else None
        self.presence_last = nn.Linear(dim, 34) if cls else None
        # patches of an object in a view of the whole picture: how many objects share its shape (1..3)
        self.count = nn.Linear(dim, 3)

    def load(self, state: dict) -> list[str]:
        """Load heads saved by an earlier run; heads added since then (missing keys) start fresh and are returned."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected:
            raise ExportError(f"unexpected auxiliary-head keys {unexpected[:3]}")
        return missing


def new_heads(bundle: Bundle, cls: bool | None = None) -> AuxHeads:
    """Auxiliary heads on the vision width; presence heads on the CLS token where the tower has one."""
    return AuxHeads(bundle.model.config.vision_config.hidden_size, cls=bundle.spec.has_cls if cls is None else cls)


# ---------------------------------------------------------------------------------------------- initialisation
@torch.no_grad()
def vision_from_llava(bundle: Bundle, folder: Path) -> dict:
    """Initialise the SmolVLM testbed's vision encoder from a trained LLaVA testbed's CLIP tower (transfer learning).

    The two encoders share width, heads, MLP size and patch size; LLaVA's features come from hidden_states[-2], i.e.
    after its first 4 layers, which are copied onto the 4 Idefics3 layers. CLIP's pixel normalisation is folded into
    the patch embedding (SmolVLM normalises with mean = std = 0.5), its 12 x 12 position embeddings are resized
    (bicubic) to 16 x 16, and what has no counterpart starts neutral: no CLS token, no pre-layernorm, post-layernorm
    = identity affine. Object shapes are learned slowly from scratch by both encoders (per-patch probe flat at ~0.3
    for the first few thousand pictures); LLaVA's tower already separates them at the global view's scale."""
    if bundle.family != "idefics3":
        raise ExportError("--vision-from initialises the SmolVLM testbed (idefics3) from a LLaVA testbed")
    src = trained_model(LlavaForConditionalGeneration, folder, "--vision-from needs a trained LLaVA testbed")
    vc, tc = src.config.vision_config, bundle.model.config.vision_config
    n_copy = vc.num_hidden_layers + 1 + src.config.vision_feature_layer  # layers before the feature layer's output
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "patch_size"):
        if getattr(vc, field) != getattr(tc, field):
            raise ExportError(f"{folder}/config.json: vision_config.{field} {getattr(vc, field)} != "
                              f"{getattr(tc, field)} of the SmolVLM testbed")
    if n_copy != tc.num_hidden_layers:
        raise ExportError(f"{folder}: its features come after {n_copy} layers, the SmolVLM testbed has "
                          f"{tc.num_hidden_layers}")
    ip = AutoImageProcessor.from_pretrained(folder)
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    tower = getattr(src.model.vision_tower, "vision_model", src.model.vision_tower)
    vm = bundle.model.model.vision_model
    w = tower.embeddings.patch_embedding.weight
    # CLIP sees (p - mean) / std; SmolVLM's input is x = (p - 0.5) / 0.5, so p = 0.5 x + 0.5
    vm.embeddings.patch_embedding.weight.copy_(w * (0.5 / std)[None, :, None, None])
    vm.embeddings.patch_embedding.bias.copy_((w.sum((2, 3)) * ((0.5 - mean) / std)[None]).sum(1))
    g_src = vc.image_size // vc.patch_size
    g_dst = tc.image_size // tc.patch_size
    pos = tower.embeddings.position_embedding.weight[1:].reshape(g_src, g_src, -1).permute(2, 0, 1)[None]
    pos = F.interpolate(pos, size=(g_dst, g_dst), mode="bicubic", align_corners=False)[0]
    vm.embeddings.position_embedding.weight.copy_(pos.permute(1, 2, 0).reshape(g_dst * g_dst, -1))
    for i in range(n_copy):
        vm.encoder.layers[i].load_state_dict(tower.encoder.layers[i].state_dict())
    vm.post_layernorm.weight.fill_(1.0)
    vm.post_layernorm.bias.zero_()
    log(f"[train {bundle.extra['testbed']}] vision encoder initialised from {folder} ({n_copy} CLIP layers)")
    return {"folder": str(folder), "layers": n_copy, "position_grid": f"{g_src}x{g_src} -> {g_dst}x{g_dst}"}


def trained_model(cls, folder: Path, why: str):
    """A model class loaded in f32 from a trained testbed folder, with an error naming the missing weights file."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights}: missing ({why})")
    return cls.from_pretrained(folder, torch_dtype=torch.float32)


def folder_checkpoint(bundle: Bundle, folder: Path, heads_from: Path | None) -> dict:
    """A checkpoint dict from a trained model folder (weights as `save_trained` wrote them) plus the auxiliary heads
    of a `{testbed}-stage1.pt` checkpoint (without one the heads start fresh)."""
    sd = trained_model(type(bundle.model), folder, "--init-from DIR needs a trained model folder").state_dict()
    heads = torch.load(heads_from)["heads"] if heads_from is not None else {}
    return {"model": sd, "heads": heads, "stage1": {"from_folder": str(folder), "heads_from": str(heads_from)}}


def save_trained(bundle: Bundle, out: Path) -> None:
    """Round weights to fp16-representable values (so fp16 safetensors reload exactly), save the folder + weights."""
    model = bundle.model
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            p.copy_(p.half().float())
    out.mkdir(parents=True, exist_ok=True)
    save_folder(bundle, out)
    model.to(torch.float16).save_pretrained(str(out))
    model.to(torch.float32)
    bundle.model.config.save_pretrained(str(out))  # keep config.json's dtype float32 (the ONNX files are f32)


@torch.no_grad()
def center_projector(bundle: Bundle, prep: Prep, n: int = 16) -> None:
    """Re-initialise the connector so that its output has zero mean over image tokens.

    The stage-1 encoder's features share a large common vector (its norm is about 3x the per-token deviation), which
    drowns the per-object part once the decoder normalises each token. LLaVA: subtract the mean output from the
    projector's last bias. Idefics3 (connector without bias): remove the mean input direction from the weight."""
    spec = bundle.spec
    pv, _, _ = scene_batch(bundle, prep, [TRAIN_SEED_BASE[3] + 10_000_000 + i for i in range(n)])
    hid, _ = spec.vision_hidden(bundle.model, pv)
    spec.center_connector(bundle.model, hid)
    f = spec.project(bundle.model, hid).reshape(-1, bundle.model.config.text_config.hidden_size)
    log(f"[train] centred connector: mean norm {f.mean(0).norm():.3f}, deviation {(f - f.mean(0)).norm(dim=1).mean():.3f}")


@torch.no_grad()
def reinit_text(bundle: Bundle, std: float, seed: int) -> None:
    """Re-initialise every non-vision Linear / Embedding with N(0, std) (biases 0); norms stay at 1."""
    g = torch.Generator().manual_seed(seed + 17)
    m = bundle.model
    vis = {id(p) for p in vision_params(bundle)}
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and id(mod.weight) not in vis:
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
    log(f"[train] decoder / connector / lm_head re-initialised with std {std}")
