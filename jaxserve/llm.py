"""The offline API, shaped like vLLM's: LLM(model=...).generate(prompts, params) and .chat(...).

This is where the device side (runner) and the host side (engine) meet: `build_engine` loads the
model, plans memory, compiles every bucket, and hands the runner to an LLMEngine.
"""

from __future__ import annotations

import itertools
import sys

from jaxserve.config import CacheConfig, EngineConfig, SchedulerConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.outputs import RequestOutput
from jaxserve.engine.sampling_params import SamplingParams

def resolve_attention(name: str | None):
    """The attention function for a registry name; None picks the platform's default."""
    import jax
    from pallas_kernels import registry

    platform = jax.devices()[0].platform
    if name is None:
        name = registry.default_variant(platform)
        if platform == "cpu" and name != "native":
            from pallas_kernels import native_decode
            print(f"warning: attention backend {name}: the native CPU decode kernel is "
                  f"unavailable ({native_decode.unavailable_reason()})", file=sys.stderr)
    elif name == "native" and platform != "cpu":
        from jaxserve.config import ConfigError
        raise ConfigError(f"--attention-backend native runs on CPU only, not on {platform}")
    fn = registry.get_attention_fn(name)
    if platform == "cpu" and name in registry.pallas_variants():
        import functools
        fn = functools.partial(fn, interpret=True)  # Pallas runs on CPU only in interpret mode
    return name, fn


def build_engine(config: EngineConfig, *, warmup: bool = True, log=None, loaded=None) -> LLMEngine:
    """Load config.model (unless `loaded` is given: any object with config, params, tokenizer,
    source, e.g. random weights made on device), plan memory, compile, and build the engine."""
    from jaxserve.loading import load_model
    from jaxserve.runner.runner import ModelRunner

    log = log or (lambda msg: print(msg, file=sys.stderr))
    from jaxserve.runner.compilation_cache import use_compilation_cache
    use_compilation_cache(config.compilation_cache_dir)  # before anything compiles
    dtype = None if config.dtype in (None, "auto") else config.dtype
    from jaxserve.loading.orbax import is_orbax_checkpoint, load_orbax_model
    if loaded is not None:
        pass
    elif is_orbax_checkpoint(config.model):
        from jaxserve.parallel import ShardingPlan

        # restore each device's shards straight from the checkpoint, in the mesh's layout
        def shardings(cfg):
            plan = ShardingPlan.build(cfg, config.tensor_parallel_size, config.sharding_config)
            return plan.param_shardings()
        if config.quantization not in (None, "none"):
            from jaxserve.config import ConfigError
            raise ConfigError(f"--quantization {config.quantization}: orbax checkpoints load "
                              f"as saved (float); quantize from an HF folder or a GGUF file")
        loaded = load_orbax_model(config.model, dtype, shardings=shardings)
    else:
        loaded = load_model(config.model, dtype=dtype, quantization=config.quantization,
                            quantize_embeddings=config.quantize_embeddings)
    cfg = loaded.config
    import jax
    config = config.resolved(jax.devices()[0].platform, cfg.max_position_embeddings)
    max_model_len = config.scheduler.max_model_len
    if max_model_len > cfg.max_position_embeddings:
        log(f"warning: --max-model-len {max_model_len} exceeds the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings})")
    name, attention_fn = resolve_attention(config.attention_backend)
    log(f"model {config.model}: {cfg.architecture}, {cfg.num_layers} layers, {cfg.dtype}, "
        f"attention backend {name}, max_model_len {max_model_len}")
    from jaxserve.config import ConfigError
    from jaxserve.parallel import ShardingError
    draft = _load_draft_model(config, loaded, log)
    try:
        runner = ModelRunner(loaded, config, attention_fn, log=log, draft=draft)
    except ShardingError as e:  # a mesh that does not fit this model or these devices
        raise ConfigError(str(e)) from None
    if warmup:
        runner.warmup()
    eos = set(cfg.eos_token_ids)
    if loaded.tokenizer.eos_token_id is not None:
        eos.add(loaded.tokenizer.eos_token_id)
    engine = LLMEngine(runner, loaded.tokenizer, config, eos_token_ids=eos)
    engine.model_config = cfg
    return engine


def _load_draft_model(config: EngineConfig, target, log):
    """The draft model of speculative_config method draft_model, in the target's dtype; its
    vocabulary must be the target's (same size, same token strings)."""
    spec = config.speculative
    if spec is None or spec.method != "draft_model":
        return None
    from jaxserve.config import ConfigError
    from jaxserve.loading import ModelLoadError, load_model
    dtype = str(target.params["final_norm"].dtype)
    try:
        draft = load_model(spec.model, dtype=dtype)
    except (ModelLoadError, OSError) as e:
        raise ConfigError(f"--speculative-config: cannot load the draft model {spec.model!r}: "
                          f"{e}") from None
    ours, theirs = target.config.vocab_size, draft.config.vocab_size
    if ours != theirs or target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise ConfigError(f"--speculative-config: the draft model {spec.model!r} has another "
                          f"vocabulary ({theirs} token ids, the target {ours}); a draft model "
                          "needs the target's tokenizer")
    cfg = draft.config
    log(f"draft model {spec.model}: {cfg.architecture}, {cfg.num_layers} layers, "
        f"{spec.num_speculative_tokens} drafts per step")
    return draft


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str | None = None, seed: int = 0,
                 max_model_len: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, page_size: int = 16,
                 num_pages: int | None = None, kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                 attention_backend: str | None = None, linear_backend: str | None = None,
                 quantization: str | None = None, kv_cache_dtype: str = "auto",
                 quantize_embeddings: bool = False, tensor_parallel_size: int = 1,
                 sharding_config: str | None = None, async_scheduling: bool = True,
                 compilation_cache_dir: str | None | object = "default", warmup: bool = True,
                 speculative_config: dict | None = None):
        """compilation_cache_dir: the persistent XLA cache folder ("default":
        $XDG_CACHE_HOME/jaxserve/xla; None: off). Limits left None take the platform's
        defaults (jaxserve.config: CPU 16 sequences / 256 tokens a step, GPU 256 / 8192).
        speculative_config: as vLLM's, e.g. {"method": "ngram", "num_speculative_tokens": 3,
        "prompt_lookup_max": 4} (engine/speculative.py). quantization: "int8" or "fp8"
        (weight-only, made at load), "gguf" or None (a GGUF file's own blocks kept packed),
        "none" (dequantize everything at load), as --quantization; quantize_embeddings: int8
        and fp8 also quantize the embedding table and lm_head. kv_cache_dtype: "auto",
        "int8" or "fp8" (codes with a scale per token and KV head), as --kv-cache-dtype."""
        if model is None:
            from checkpoints.default_model import ensure_default_model
            model = ensure_default_model()
        cache_dir = ({} if compilation_cache_dir == "default"
                     else {"compilation_cache_dir": compilation_cache_dir})
        self.config = EngineConfig(
            model=model, dtype=dtype, seed=seed, attention_backend=attention_backend,
            linear_backend=linear_backend, quantization=quantization,
            quantize_embeddings=quantize_embeddings, **cache_dir,
            speculative=speculative_config,
            tensor_parallel_size=tensor_parallel_size, sharding_config=sharding_config,
            cache=CacheConfig(page_size=page_size, num_pages=num_pages,
                              kv_cache_memory_bytes=kv_cache_memory_bytes,
                              gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching,
                              kv_cache_dtype=kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len,
                                      async_scheduling=async_scheduling))
        self.engine = build_engine(self.config, warmup=warmup)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a list of token ids or a list of such lists."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        order = []
        for prompt, p in zip(prompts, params_list):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p)
            order.append(rid)
        return self._run(order)

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [tok.apply_chat_template(conv, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
                   for conv in conversations]
        ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate(ids, sampling_params)
        for out, text in zip(outs, prompts):
            out.prompt = text
        return outs

    def _run(self, order: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(order):
            if not self.engine.has_unfinished_requests():
                raise RuntimeError("the engine dropped requests: "
                                   f"{sorted(set(order) - set(finished))}")
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[rid] for rid in order]
