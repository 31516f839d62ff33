"""Tiny random-weight Llama models built on this machine, so real vLLM engines run in tests and the demo without a
model hub: `make tiny-models` (or `python -m fate_ray.engines.tiny_models DIR`).

Every model shares one byte-level BPE tokenizer trained here on a fixed, seeded corpus, so a parent's output token
ids feed a child on another tiny model unchanged (as they would between two models of one family). Sizes differ so
that the catalog's figures (weights, KV bytes per token) differ; head_dim is 32 or 64 because vLLM's CPU attention
kernel does not support 16 (../shared/design/ENVIRONMENT.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("FATE_RAY_MODEL_DIR", "~/.cache/fate-ray/models")).expanduser()
VOCAB_SIZE = 2048
MAX_POSITIONS = 8192
SEED = 20261130
FORMAT_VERSION = 2  # bump to rebuild every cached model when the recipe below changes


@dataclass(frozen=True)
class TinyModel:
    name: str
    hidden: int
    layers: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY_MODELS = (
    TinyModel("tiny-llama-s", hidden=128, layers=2, heads=4),  # head_dim 32
    TinyModel("tiny-llama-m", hidden=256, layers=2, heads=4),  # head_dim 64
    TinyModel("tiny-llama-l", hidden=256, layers=4, heads=4),  # head_dim 64, twice the layers
)

_WORDS = ("the model stage prompt output cache block device queue plan workflow token prefix parent child load "
          "batch graph frontier schedule summary answer question context document retrieve rerank route agent "
          "round vote judge draft review critique merge split map reduce chunk score rank cost time memory").split()


def corpus(lines: int = 4000) -> list[str]:
    """A fixed, seeded text corpus: the Zen of Python and sentences drawn from a small vocabulary."""
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the module prints the Zen on import
        import this  # noqa: F401
    rng = random.Random(SEED)
    text = codecs.decode(sys.modules["this"].s, "rot13").splitlines()
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        text.append(" ".join(words).capitalize() + rng.choice(".?!:"))
        text.append(f"Item {rng.randint(0, 999)}: {rng.random():.3f}")
    return text


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_POSITIONS)
    fast.save_pretrained(out)
    return fast


def build_model(spec: TinyModel, out: Path, tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED + spec.hidden * 10 + spec.layers)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.hidden * 2,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.heads, max_position_embeddings=MAX_POSITIONS,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True, torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "fate-ray-tiny.json").write_text(json.dumps({"format": FORMAT_VERSION, "name": spec.name}))


def is_built(out: Path) -> bool:
    marker = out / "fate-ray-tiny.json"
    return marker.exists() and json.loads(marker.read_text()).get("format") == FORMAT_VERSION


def build_all(root: Path = DEFAULT_DIR) -> list[Path]:
    """Build every tiny model under `root` that is not built yet; return their folders."""
    root.mkdir(parents=True, exist_ok=True)
    todo = [m for m in TINY_MODELS if not is_built(root / m.name)]
    if todo:
        tokenizer = build_tokenizer(root / "_tokenizer")
        for spec in todo:
            build_model(spec, root / spec.name, tokenizer)
    return [root / m.name for m in TINY_MODELS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the tiny random-weight models vLLM runs in tests and demos")
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    try:
        paths = build_all(args.dir.expanduser())
    except ImportError as exc:
        print(f"error: building tiny models needs the CPU or GPU extra ({exc.name} is missing): "
              "`pip install -e '.[cpu]'`", file=sys.stderr)
        return 2
    print("tiny models in " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
