"""The real ``cl100k_base`` BPE table for tiktoken, offline.

llmlingua's ``PromptCompressor.__init__`` calls ``tiktoken.encoding_for_model("gpt-3.5-turbo")`` (cl100k_base),
which downloads ``https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken`` unless the file is in
tiktoken's cache (``$TIKTOKEN_CACHE_DIR/<sha1 of that URL>``, checked against its sha256). That host cannot be
reached here, so this module seeds the cache with the **same file**, rebuilt from the npm package ``js-tiktoken``
(``dist/ranks/cl100k_base.cjs``: the ranks in groups ``"<char> <first rank> <base64 token> ..."``): every token
written as ``<base64> <rank>`` in rank order. The result is accepted only if its sha256 is the one tiktoken
expects (``CL100K_SHA256``), so the counts are exactly cl100k's: no stand-in tokenizer.

Where the file comes from, first hit wins: ``$TIKTOKEN_CACHE_DIR`` already holding it; ``$GLIMPSE_CL100K`` (a path
to a ``cl100k_base.tiktoken``); the cache ``~/.cache/glimpse/tiktoken``; else ``npm pack js-tiktoken@JS_TIKTOKEN``
(the ordinary npm client, needs the npm registry) and the rebuild. ``ensure_cl100k()`` then points
``TIKTOKEN_CACHE_DIR`` at the folder holding it (before tiktoken is first used).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..common import ExportError, log

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CACHE_KEY = hashlib.sha1(CL100K_URL.encode()).hexdigest()  # tiktoken's cache file name
JS_TIKTOKEN = "1.0.21"
DEFAULT_CACHE = Path.home() / ".cache" / "glimpse" / "tiktoken"


def _ok(path: Path) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == CL100K_SHA256


def ranks_from_js(cjs_text: str) -> bytes:
    """js-tiktoken's ``cl100k_base.cjs`` -> the bytes of ``cl100k_base.tiktoken``."""
    import json

    start = cjs_text.index("{")
    ranks = json.loads(cjs_text[start:cjs_text.rindex("}") + 1])
    pairs = []
    for line in ranks["bpe_ranks"].split("\n"):
        if not line:
            continue
        _, offset, *tokens = line.split(" ")
        pairs += [(int(offset) + i, t) for i, t in enumerate(tokens)]
    pairs.sort()
    return "".join(f"{t} {r}\n" for r, t in pairs).encode()


def _from_npm(dest: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise ExportError("cl100k_base.tiktoken not cached and npm is not installed (set GLIMPSE_CL100K)")
    with tempfile.TemporaryDirectory() as tmp:
        log(f"  cl100k: npm pack js-tiktoken@{JS_TIKTOKEN}")
        subprocess.run([npm, "pack", f"js-tiktoken@{JS_TIKTOKEN}", "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, timeout=300)
        with tarfile.open(Path(tmp) / f"js-tiktoken-{JS_TIKTOKEN}.tgz") as tf:
            text = tf.extractfile("package/dist/ranks/cl100k_base.cjs").read().decode()
    dest.write_bytes(ranks_from_js(text))


def ensure_cl100k() -> Path:
    """Make ``tiktoken.get_encoding("cl100k_base")`` work offline; returns the cached file."""
    env = os.environ.get("TIKTOKEN_CACHE_DIR")
    if env and _ok(Path(env) / CACHE_KEY):
        return Path(env) / CACHE_KEY
    DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
    target = DEFAULT_CACHE / CACHE_KEY
    if not _ok(target):
        src = os.environ.get("GLIMPSE_CL100K")
        if src:
            shutil.copyfile(src, target)
        else:
            _from_npm(target)
        if not _ok(target):
            target.unlink(missing_ok=True)
            raise ExportError(f"rebuilt cl100k_base.tiktoken does not have sha256 {CL100K_SHA256}")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(DEFAULT_CACHE)
    return target
