"""Sharding configs users write: a mesh shape plus the logical-axis rule table, as YAML or JSON.

    # my-sharding.yaml
    name: dp2-tp4
    mesh: {data: 2, model: 4}      # data_parallel_size x tensor_parallel_size devices
    rules:                         # logical axis -> mesh axis or null; unlisted axes keep
      vocab: model                 # the defaults of rules.AxisRules
      heads: model
      kv_heads: model
      mlp: model
      tokens: data

`--sharding-config` takes such a file or a built-in preset name (PRESETS: tp1, tp2, tp4, tp8,
dp2-tp4). Presets go through the same parser as files, so a preset is also an example file
(`dump_sharding_config` prints one).

What the data axis does in one engine: weights and KV cache are replicated over it and each step's
token axis is split over it (rule `tokens`), so the dense layers run data-parallel while
attention sees all tokens. Independent engine replicas per data group (vLLM's DP) are not built.
"""

from __future__ import annotations

import dataclasses
import json
import os

from jaxserve.parallel.mesh import DATA_AXIS, MESH_AXES, MODEL_AXIS, ParallelConfig, ShardingError
from jaxserve.parallel.rules import DEFAULT_RULES, AxisRules


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """A named mesh shape and rule table; frozen and hashable, so it can key compile caches."""

    name: str
    parallel: ParallelConfig
    rules: AxisRules = DEFAULT_RULES

    @property
    def tensor_parallel_size(self) -> int:
        return self.parallel.tensor_parallel_size

    def to_dict(self) -> dict:
        return {"name": self.name, "mesh": self.parallel.mesh_shape, "rules": dict(self.rules.items())}


def _tp(n: int) -> dict:
    return {"name": f"tp{n}", "mesh": {DATA_AXIS: 1, MODEL_AXIS: n}, "rules": {}}


PRESETS: dict[str, dict] = {
    **{f"tp{n}": _tp(n) for n in (1, 2, 4, 8)},
    "dp2-tp4": {"name": "dp2-tp4", "mesh": {DATA_AXIS: 2, MODEL_AXIS: 4},
                "rules": {"tokens": DATA_AXIS}},
}


def parse_sharding_config(d, source: str = "sharding config") -> ShardingConfig:
    """Validate the dict form (from YAML/JSON) into a ShardingConfig; errors name `source`."""
    if not isinstance(d, dict):
        raise ShardingError(f"{source}: expected a mapping with 'mesh' and 'rules', got "
                            f"{type(d).__name__}")
    unknown = sorted(set(d) - {"name", "mesh", "rules"})
    if unknown:
        raise ShardingError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                            f"expected name, mesh, rules")
    mesh = d.get("mesh")
    if not isinstance(mesh, dict) or not mesh:
        raise ShardingError(f"{source}: 'mesh' must map mesh axes to sizes, e.g. "
                            f"{{data: 1, model: 4}}")
    bad = sorted(set(mesh) - set(MESH_AXES))
    if bad:
        raise ShardingError(f"{source}: unknown mesh axis {', '.join(map(repr, bad))}; the mesh "
                            f"axes are {', '.join(MESH_AXES)}")
    sizes = {a: mesh.get(a, 1) for a in MESH_AXES}
    for axis, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ShardingError(f"{source}: mesh axis {axis!r} must be a positive integer, "
                                f"got {size!r}")
    rules = d.get("rules") or {}
    if not isinstance(rules, dict):
        raise ShardingError(f"{source}: 'rules' must map logical axes to mesh axes or null")
    try:
        parsed_rules = AxisRules.from_dict(rules, source)
    except TypeError as e:  # a non-string axis value
        raise ShardingError(f"{source}: bad rules ({e})") from None
    except ShardingError as e:
        msg = str(e)
        raise ShardingError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    parallel = ParallelConfig(tensor_parallel_size=sizes[MODEL_AXIS],
                              data_parallel_size=sizes[DATA_AXIS])
    name = str(d.get("name") or f"dp{sizes[DATA_AXIS]}-tp{sizes[MODEL_AXIS]}")
    return ShardingConfig(name=name, parallel=parallel, rules=parsed_rules)


def load_sharding_config(name_or_path: str) -> ShardingConfig:
    """A preset name (tp1, tp2, tp4, tp8, dp2-tp4) or a .yaml/.yml/.json file path."""
    if name_or_path in PRESETS:
        return parse_sharding_config(PRESETS[name_or_path], f"preset {name_or_path}")
    if not os.path.isfile(name_or_path):
        raise ShardingError(f"--sharding-config {name_or_path!r}: neither a preset "
                            f"({', '.join(PRESETS)}) nor an existing file")
    with open(name_or_path) as f:
        text = f.read()
    try:
        if name_or_path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml  # JSON is YAML too, so any other extension goes through YAML

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError or json.JSONDecodeError: both mean a malformed file
        raise ShardingError(f"{name_or_path}: not valid YAML/JSON ({e})") from None
    return parse_sharding_config(data, name_or_path)


def dump_sharding_config(config: ShardingConfig) -> str:
    """The YAML text of a config, loadable by load_sharding_config."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def resolve_sharding_config(tensor_parallel_size: int = 1,
                            sharding_config: str | ShardingConfig | None = None) -> ShardingConfig:
    """What --tensor-parallel-size and --sharding-config mean together: without a config, a tpN
    mesh with the default rules; with one, its mesh, and a tensor_parallel_size other than 1
    must agree with the config's model axis."""
    if sharding_config is None:
        return ShardingConfig(name=f"tp{tensor_parallel_size}",
                              parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size))
    config = (sharding_config if isinstance(sharding_config, ShardingConfig)
              else load_sharding_config(sharding_config))
    if tensor_parallel_size not in (1, config.tensor_parallel_size):
        raise ShardingError(
            f"--tensor-parallel-size {tensor_parallel_size} disagrees with --sharding-config "
            f"{config.name}, whose mesh has model axis {config.tensor_parallel_size}; drop one")
    return config
