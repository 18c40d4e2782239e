"""Shard by name: logical axes of every array -> mesh axes, through one rule table.

Each parameter leaf names its dimensions with logical axes (q_proj [L, H, Hq*D] is
(layers, embed, heads)); an AxisRules table maps each logical axis to a mesh axis ("data",
"model") or None (replicated). The model code never mentions a mesh: the shardings of params,
KV cache and batch are derived here and GSPMD propagates them through the jitted step.

Rules that a model cannot honour are resolved per model (`resolve_rules`):
  * heads must split evenly over their mesh axis (each shard runs attention on whole heads):
    otherwise a ShardingError naming both numbers;
  * kv_heads that the axis does not divide (fewer KV heads than tensor_parallel_size, or a
    non-divisor) are REPLICATED: every device holds all KV heads of the cache (and k/v_proj), and
    the sharded attention picks the KV heads its query heads belong to (attention.py). The cost
    is memory: the KV cache is not split, so each device holds the whole pool;
  * any other dimension that an axis does not divide (a vocab of 32001 over 2 devices) is
    replicated for that leaf only, since jax shardings must tile evenly.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.models.batch import KVCache
from jaxserve.models.config import ModelConfig
from jaxserve.parallel.mesh import DATA_AXIS, MESH_AXES, MODEL_AXIS, ShardingError

# Logical axes whose sharding this version does not support: the attention call reads any page
# of any layer and contracts over head_dim inside one shard, so splitting them would need an
# all-gather of the cache per layer. They are in the table so configs can name them (and for
# future pipeline parallelism over layers); anything but null is rejected.
_MUST_BE_REPLICATED = ("layers", "pages", "head_dim")


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """Logical axis -> mesh axis name, or None for replicated."""

    vocab: str | None = MODEL_AXIS     # embed rows, lm_head columns, logits
    embed: str | None = None           # hidden size
    heads: str | None = MODEL_AXIS     # query heads (q_proj columns, o_proj rows)
    kv_heads: str | None = MODEL_AXIS  # key/value heads (k/v_proj columns, KV cache)
    head_dim: str | None = None
    mlp: str | None = MODEL_AXIS       # intermediate size
    layers: str | None = None          # the stacked layer axis
    pages: str | None = None           # the KV page pool
    tokens: str | None = None          # the flat token axis of a step's batch (data parallel)

    def __post_init__(self):
        for name, axis in self.items():
            if axis is not None and axis not in MESH_AXES:
                raise ShardingError(f"sharding rule {name}: {axis!r} is not a mesh axis; use one "
                                    f"of {', '.join(MESH_AXES)} or null")
            if name in _MUST_BE_REPLICATED and axis is not None:
                raise ShardingError(f"sharding rule {name}: {axis!r} is not supported (attention "
                                    f"reads every layer, page and head_dim entry of its KV heads); "
                                    f"set {name}: null")
        if self.kv_heads not in (None, self.heads):
            raise ShardingError(f"sharding rules: kv_heads ({self.kv_heads!r}) must be null or the "
                                f"axis of heads ({self.heads!r}): a query head and its KV head "
                                f"live on the same shard")

    def items(self):
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    @classmethod
    def from_dict(cls, d: dict, source: str = "sharding config") -> "AxisRules":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ShardingError(f"{source}: unknown logical axis {', '.join(map(repr, unknown))}; "
                                f"known: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes) -> "AxisRules":
        return dataclasses.replace(self, **changes)


DEFAULT_RULES = AxisRules()

# Logical axes of every parameter leaf, by name (None: replicated dimension). Norm weights are
# tiny and read by every shard, so they stay replicated whatever the rules say.
_TOP_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": (None,),
    "lm_head": ("embed", "vocab"),
}
_LAYER_AXES = {
    "input_norm": ("layers", None), "post_norm": ("layers", None),
    "q_proj": ("layers", "embed", "heads"), "k_proj": ("layers", "embed", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"), "o_proj": ("layers", "heads", "embed"),
    "q_bias": ("layers", "heads"), "k_bias": ("layers", "kv_heads"), "v_bias": ("layers", "kv_heads"),
    "q_norm": ("layers", None), "k_norm": ("layers", None),
    "gate_proj": ("layers", "embed", "mlp"), "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
}
KV_CACHE_AXES = ("layers", "pages", "kv_heads", None, "head_dim")  # [L, P, Hkv, page_size, D]


def param_logical_axes(cfg: ModelConfig) -> dict:
    """The params pytree with a tuple of logical axes at each leaf (see models.llama)."""
    from jaxserve.models.llama import param_shapes

    shapes = param_shapes(cfg)
    out = {}
    for name in shapes:
        if name == "layers":
            continue
        if name not in _TOP_AXES:
            raise ShardingError(f"no logical axes known for parameter {name!r}: add it to "
                                f"jaxserve/parallel/rules.py")
        out[name] = _TOP_AXES[name]
    out["layers"] = {}
    for name, shape in shapes["layers"].items():
        if name not in _LAYER_AXES:
            raise ShardingError(f"no logical axes known for parameter layers/{name!r}: add it to "
                                f"jaxserve/parallel/rules.py")
        assert len(_LAYER_AXES[name]) == len(shape), name
        out["layers"][name] = _LAYER_AXES[name]
    return out


def _axis_size(mesh, axis: str | None) -> int:
    sizes = mesh if isinstance(mesh, dict) else mesh.shape
    return 1 if axis is None else sizes[axis]


def resolve_rules(cfg: ModelConfig, mesh, rules: AxisRules = DEFAULT_RULES) -> AxisRules:
    """The rules this model can run with on this mesh (see the module docstring): raises when
    the query heads do not split evenly, replicates KV heads that do not. `mesh` may also be a
    dict of axis sizes, to check a config before any device is touched."""
    tp = _axis_size(mesh, rules.heads)
    if cfg.num_heads % tp:
        raise ShardingError(
            f"the model has {cfg.num_heads} attention heads, which do not split evenly over "
            f"{tp} devices (mesh axis {rules.heads!r}, i.e. --tensor-parallel-size {tp}); use a "
            f"tensor_parallel_size that divides {cfg.num_heads}")
    if rules.kv_heads is not None and cfg.num_kv_heads % _axis_size(mesh, rules.kv_heads):
        rules = rules.replace(kv_heads=None)
    return rules


def logical_to_spec(axes, shape, mesh, rules: AxisRules, what: str = "array") -> P:
    """PartitionSpec for one array: each logical axis through the rules, dimensions the mesh
    axis does not divide replicated. A mesh axis may appear once per array."""
    spec, used = [], set()
    for logical, size in zip(axes, shape):
        axis = getattr(rules, logical) if logical is not None else None
        if axis is not None and size % mesh.shape[axis]:
            axis = None  # uneven tiling is not allowed by jax: replicate this dimension
        if axis is not None and axis in used:
            raise ShardingError(f"sharding rules map two dimensions of {what} {tuple(axes)} to "
                                f"mesh axis {axis!r}; change one of them to null")
        if axis is not None:
            used.add(axis)
        spec.append(axis)
    while spec and spec[-1] is None:  # canonical form: P(None, 'model') not P(None, 'model', None)
        spec.pop()
    return P(*spec)


def param_shardings(cfg: ModelConfig, mesh, rules: AxisRules = DEFAULT_RULES,
                    params: dict | None = None) -> dict:
    """NamedSharding for every param leaf (same pytree structure as the params). A layer
    matrix that `params` holds quantized (models.quant.QuantizedStack) gets a QuantizedStack
    of shardings: its codes, scales and offsets split like the float matrix would be."""
    from jaxserve.models import quant
    from jaxserve.models.llama import param_shapes

    rules = resolve_rules(cfg, mesh, rules)
    shapes = param_shapes(cfg)
    axes = param_logical_axes(cfg)

    def one(name, a, s):
        return NamedSharding(mesh, logical_to_spec(a, s, mesh, rules, name))

    def leaf(name, held, leaf_axes, shape, stack_axes):
        """held: the params' leaf (or None); stack_axes: its axes when stored quantized."""
        if not isinstance(held, quant.QuantizedStack):
            return one(name, leaf_axes, shape)
        return held.replace(**{
            f: one(f"{name}.{f}", quant.field_logical_axes(f, stack_axes), a.shape)
            for f, a in quant.array_fields(held).items()})

    held = params or {}
    # a packed embedding / lm_head is a [1, H, V] stack whatever its float layout
    out = {k: leaf(k, held.get(k), axes[k], shapes[k], (None, "embed", "vocab"))
           for k in shapes if k != "layers"}
    out["layers"] = {k: leaf(f"layers/{k}", held.get("layers", {}).get(k), axes["layers"][k],
                             s, axes["layers"][k])
                     for k, s in shapes["layers"].items()}
    return out


def kv_cache_sharding(cfg: ModelConfig, mesh, rules: AxisRules = DEFAULT_RULES,
                      quantized: bool = False) -> KVCache:
    """A KVCache whose k and v are the NamedSharding of the cache [L, P, Hkv, page_size, D]:
    KV heads on the heads' mesh axis when it divides num_kv_heads, else replicated. quantized:
    k and v are kv_quant.QuantizedKV of shardings (codes as above, scales [L, P, Hkv, ps])."""
    from pallas_kernels.kv_quant import QuantizedKV

    rules = resolve_rules(cfg, mesh, rules)
    axes = [getattr(rules, a) if a else None for a in KV_CACHE_AXES]
    s = NamedSharding(mesh, P(*axes))
    if quantized:
        s = QuantizedKV(codes=s, scale=NamedSharding(mesh, P(*axes[:-1])))
    return KVCache(k=s, v=s)


def kv_cache_shards(cfg: ModelConfig, mesh, rules: AxisRules = DEFAULT_RULES) -> int:
    """Into how many parts the KV cache is split: divide page bytes by this to get the bytes one
    device holds per page (1 when KV heads are replicated)."""
    return _axis_size(mesh, resolve_rules(cfg, mesh, rules).kv_heads)


# ForwardBatch fields with a leading token axis [T]; the rest ([S], [S+1], [N]) are replicated.
TOKEN_FIELDS = ("token_ids", "positions", "slot_pages", "slot_offsets")


def batch_shardings(batch, mesh, rules: AxisRules = DEFAULT_RULES):
    """A ForwardBatch of NamedShardings: token-axis fields split on the `tokens` rule's axis when
    it divides the bucket's T (each bucket is its own compile, so this is per shape), every other
    field replicated. With tokens: null (the default) all fields are replicated."""
    replicated = NamedSharding(mesh, P())
    fields = {}
    for f in dataclasses.fields(batch):
        x = getattr(batch, f.name)
        if f.name in TOKEN_FIELDS:
            fields[f.name] = NamedSharding(mesh, logical_to_spec(("tokens",), x.shape, mesh, rules))
        else:
            fields[f.name] = replicated
    return type(batch)(**fields)


__all__ = ["AxisRules", "DEFAULT_RULES", "DATA_AXIS", "MODEL_AXIS", "KV_CACHE_AXES",
           "param_logical_axes", "resolve_rules", "logical_to_spec", "param_shardings",
           "kv_cache_sharding", "kv_cache_shards", "batch_shardings"]
