"""Time tree verification and the decode loop's own overhead on a random-weight model of a real shape.

No weights can be downloaded on the GPU machine, so the target is a Llama-3.1-8B-shaped model with random bf16
weights (and a random EAGLE-3 head of the matching shape): timings are real, acceptance is not (τ is measured on
CPU with real weights). Prints and writes:
- c(n): a forward over an n-token tree on a `--context`-token cache, relative to n = 1 (hsd_rag.tuning);
- EAGLE drafting cost, fixed + per level, in one-token forwards;
- per step of real decode loops (vanilla / ngram / eagle / hybrid at budget 16): forward time vs everything else
  (drafting, tree and mask building, acceptance, cache rollback, bookkeeping), in ms.

    python scripts/gpu_profile.py --out gpu_profile.json          # on a CUDA machine
    python scripts/gpu_profile.py --shape tiny --device cpu       # a dry run of the script itself
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
}


class IdTokenizer:
    """Token ids as text: the loop needs decode() and an eos id, nothing else."""

    eos_token_id = None
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        class Encoding:
            input_ids = [int(t) for t in text.split()]

        return Encoding()

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hsd_rag import HybridSpecDecoder
    from hsd_rag.heads import Eagle3Head

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
        head = Eagle3Head.from_target(model)
    model.generation_config.eos_token_id = None
    return HybridSpecDecoder(model, IdTokenizer(), head=head)


def loop_overhead(decoder, context: int, new_tokens: int, methods, budget: int) -> dict:
    """Per-step milliseconds of real generations: the verify forward vs everything else in the step."""
    vocab = decoder.model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (context,), generator=generator).tolist()
    document = " ".join(map(str, prompt[-64:]))  # something for the n-gram index to match
    out = {}
    for method in methods:
        kwargs = dict(method=method, budget=1 if method == "vanilla" else budget, max_new_tokens=new_tokens,
                      answer_history=False)
        decoder.generate(prompt, documents=[document], **{**kwargs, "max_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        result = decoder.generate(prompt, documents=[document], **kwargs)
        wall = time.perf_counter() - start
        s = result.stats
        decode = wall - s.prefill_s
        out[method] = {
            "steps": s.steps,
            "tokens": s.new_tokens,
            "ms_per_step": 1000 * decode / s.steps,
            "verify_ms_per_step": 1000 * s.verify_s / s.steps,  # forward + the acceptance read-back
            "draft_ms_per_step": 1000 * s.draft_s / s.steps,
            "other_ms_per_step": 1000 * (decode - s.verify_s - s.draft_s) / s.steps,
            "tree_nodes_per_step": s.tree_nodes / s.steps,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from hsd_rag.tuning import measure_profile

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    decoder = build(args.shape, args.device, dtype)
    print(f"built {args.shape} ({sum(p.numel() for p in decoder.model.parameters()) / 1e9:.2f} B params, "
          f"{args.dtype}) on {args.device} in {time.perf_counter() - t0:.0f} s")
    sizes = (1, 2, 4, 8, 16, 24, 32, 48, 64)
    profile = measure_profile(decoder, sizes=sizes, context=args.context, repeats=args.repeats)
    print("| tokens in forward | " + " | ".join(map(str, profile.tokens)) + " |")
    print("| relative time | " + " | ".join(f"{c:.3f}" for c in profile.relative_cost) + " |")
    eagle = profile.draft_costs.get("eagle", {})
    print(f"EAGLE drafting: {eagle.get('fixed', 0):.3f} fixed + {eagle.get('per_level', 0):.3f} per level "
          "(one-token forwards)")
    overhead = loop_overhead(decoder, args.context, args.new_tokens, ["vanilla", "ngram", "eagle", "hybrid"], 16)
    for method, row in overhead.items():
        print(f"{method:8s} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
    result = {
        "shape": args.shape, "dtype": args.dtype, "device": str(decoder.model.device), "context": args.context,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "profile": {"tokens": profile.tokens, "relative_cost": profile.relative_cost,
                                                "draft_costs": profile.draft_costs},
        "loop": overhead,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
