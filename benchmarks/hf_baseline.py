"""The baseline throughput.py compares against: Hugging Face transformers `generate`, batched.

This is how people serve a model without an engine: fixed batches, left-padded to the longest
prompt, greedy, every sequence in a batch generating until the batch's longest output is done
(no continuous batching, no paged cache). We count only the tokens each request asked for as
output, so the padding and the surplus tokens are the baseline's cost, as they would be for a
user. vLLM's published "vs HF" ratios (14-24x on A10G/A100) were measured the same way.
"""

from __future__ import annotations

import time


def torch_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_hf_model(path: str, dtype: str):
    """AutoModelForCausalLM from a Hugging Face folder, in `dtype`, on the torch device."""
    import torch
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        raise ValueError(f"{path}: --compare-transformers needs a Hugging Face folder, not GGUF")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(torch_device()).eval()


def _batches(workload, batch_size: int):
    for start in range(0, len(workload.prompts), batch_size):
        yield (workload.prompts[start:start + batch_size],
               workload.output_lens[start:start + batch_size])


def generate_batch(model, prompts: list[list[int]], max_new: int, pad_id: int):
    """Greedy-generate exactly max_new tokens for every prompt; returns the new ids per row."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every row's last token is at the end
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    dev = model.device
    with torch.inference_mode():
        # min_new_tokens == max_new_tokens keeps EOS from ending rows early (ignore_eos)
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad_id, top_p=None, top_k=None, temperature=None)
    new = out[:, width:].tolist()
    if any(len(r) != max_new for r in new):
        raise RuntimeError("transformers stopped early despite min_new_tokens")
    return new


def run_hf(model, workload, batch_size: int, pad_id: int = 0) -> dict:
    """Time the whole workload through generate; the figures mirror throughput.py's own."""
    import torch

    sync = torch.cuda.synchronize if torch_device() == "cuda" else (lambda: None)
    generate_batch(model, [workload.prompts[0][:8]], 2, pad_id)  # warm (allocations, kernels)
    sync()
    start = time.perf_counter()
    outputs, generated = [], 0
    for prompts, outs in _batches(workload, batch_size):
        max_new = max(outs)
        rows = generate_batch(model, prompts, max_new, pad_id)
        generated += len(prompts) * max_new
        outputs.extend(r[:n] for r, n in zip(rows, outs))
    sync()
    elapsed = time.perf_counter() - start
    n_out = sum(workload.output_lens)
    n_in = sum(workload.input_lens)
    peak = torch.cuda.max_memory_allocated() if torch_device() == "cuda" else None
    return {"engine": "transformers", "batch_size": batch_size, "elapsed_s": elapsed,
            "requests_per_s": len(workload.prompts) / elapsed,
            "output_tokens_per_s": n_out / elapsed, "total_tokens_per_s": (n_in + n_out) / elapsed,
            "generated_tokens_incl_surplus": generated, "peak_device_memory_bytes": peak,
            "token_ids": outputs}


def greedy_agreement(a: list[list[int]], b: list[list[int]], prefix: int = 8) -> float:
    """Fraction of requests whose first `prefix` greedy tokens agree between two engines: a
    sanity check that both ran the same model (padding may flip later near-ties)."""
    same = sum(x[:prefix] == y[:prefix] for x, y in zip(a, b))
    return same / max(1, len(a))
