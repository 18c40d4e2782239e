"""Benchmark workloads: prompt token ids and fixed output lengths, reproducible from a seed.

Shared by throughput.py (offline) and serving.py (online) so that both measure the same requests.
Prompts are random token ids, not text: speed does not depend on which tokens they are, and ids
give exact input lengths without a tokenizer round trip. Outputs have fixed lengths (ignore_eos).

Two kinds, following `vllm bench`:
  * fixed grids "IN/OUT" (vLLM's and TensorRT-LLM's published cases: 128/128, 1024/128,
    128/2048, 1000/1000, 2048/128), every request the same shape;
  * "sharegpt": lengths drawn from log-normal fits shaped like the ShareGPT conversations
    vLLM benchmarks with (median prompt ~170 tokens, median reply ~200, long tails), filtered
    like vLLM's loader (prompt and reply >= 4 tokens, prompt <= 1024, total <= 2048). It is a
    synthetic stand-in: the real data set is not reachable here, so figures on it are
    comparable with each other, not with published ShareGPT numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

GRID = ("128/128", "1024/128", "128/2048", "1000/1000", "2048/128")

# Log-normal (median, sigma) of prompt and reply lengths in tokens; see the module docstring.
_SHAREGPT_PROMPT = (170.0, 1.1)
_SHAREGPT_OUTPUT = (200.0, 0.9)

# Token ids drawn for prompts: above the special tokens of the models we ship (SmolLM2 uses
# 0..16, the tiny tokenizer 0..2) and below the smallest vocabulary (tiny: 384).
DEFAULT_ID_RANGE = (20, 384)


@dataclasses.dataclass
class Workload:
    name: str
    prompts: list[list[int]]   # token ids
    output_lens: list[int]     # exact generated tokens per request (ignore_eos)

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def max_total_len(self) -> int:
        return max(i + o for i, o in zip(self.input_lens, self.output_lens))

    def head(self, n: int) -> "Workload":
        return Workload(self.name, self.prompts[:n], self.output_lens[:n])


def parse_case(case: str) -> tuple[int, int]:
    """'1024/128' -> (1024, 128)."""
    try:
        a, b = case.split("/")
        n_in, n_out = int(a), int(b)
    except ValueError:
        raise ValueError(f"workload {case!r}: expected IN/OUT token counts such as 1024/128, "
                         "or 'sharegpt'") from None
    if n_in < 1 or n_out < 1:
        raise ValueError(f"workload {case!r}: lengths must be at least 1")
    return n_in, n_out


def random_prompts(lens: list[int], seed: int, id_range=DEFAULT_ID_RANGE) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(id_range[0], id_range[1], size=n).tolist() for n in lens]


def sharegpt_lengths(n: int, seed: int, max_prompt: int = 1024,
                     max_total: int = 2048) -> tuple[list[int], list[int]]:
    """n (prompt, reply) length pairs from the ShareGPT-shaped distribution, vLLM's filters."""
    rng = np.random.default_rng(seed)
    ins, outs = [], []
    while len(ins) < n:
        a = int(rng.lognormal(np.log(_SHAREGPT_PROMPT[0]), _SHAREGPT_PROMPT[1]))
        b = int(rng.lognormal(np.log(_SHAREGPT_OUTPUT[0]), _SHAREGPT_OUTPUT[1]))
        if a < 4 or b < 4 or a > max_prompt or a + b > max_total:
            continue  # vLLM's ShareGPT loader drops these too
        ins.append(a)
        outs.append(b)
    return ins, outs


def make_workload(case: str, num_prompts: int, seed: int = 0, id_range=DEFAULT_ID_RANGE,
                  scale: float = 1.0) -> Workload:
    """`case` is 'IN/OUT' or 'sharegpt'; `scale` shrinks every length (smoke runs) keeping >= 1."""
    if case == "sharegpt":
        ins, outs = sharegpt_lengths(num_prompts, seed)
    else:
        n_in, n_out = parse_case(case)
        ins, outs = [n_in] * num_prompts, [n_out] * num_prompts
    ins = [max(1, int(round(x * scale))) for x in ins]
    outs = [max(1, int(round(x * scale))) for x in outs]
    return Workload(case, random_prompts(ins, seed, id_range), outs)
