"""Orbax checkpoints of the param pytree: restored straight into a (sharded) device layout.

Layout written by checkpoints/convert_to_orbax.py:

    OUT_DIR/
      params/               orbax StandardCheckpointer directory of the param pytree
                            (the stacked layout of jaxserve.models.llama, [in, out] matrices)
      config.json           copied from the HF folder (architecture, sizes)
      tokenizer.json ...    the HF folder's tokenizer and generation files, copied
      jaxserve_orbax.json   {"format": 1, "dtype": ..., "source": ...}

Why orbax at all when HF folders load fine: restore takes a target sharding per leaf and each
device reads only its own slice from storage (tensorstore), so an 8-way sharded model never
exists whole on one device or, for big models, in host memory; HF loading goes through full
host arrays. Orbax also restores across processes in a multi-host job.
"""

from __future__ import annotations

import json
import os

MARKER = "jaxserve_orbax.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class OrbaxLoadError(ValueError):
    """The path is not a jaxserve orbax checkpoint, or its contents do not match."""


def is_orbax_checkpoint(path: str) -> bool:
    """Whether `path` is a folder written by convert_to_orbax (has the marker and params/)."""
    return (os.path.isfile(os.path.join(path, MARKER))
            and os.path.isdir(os.path.join(path, PARAMS_DIR)))


def _params_dir(path: str) -> str:
    path = os.path.abspath(path)
    if is_orbax_checkpoint(path):
        return os.path.join(path, PARAMS_DIR)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")):
        return path  # a bare orbax params directory
    raise OrbaxLoadError(f"{path}: not a jaxserve orbax checkpoint (no {MARKER} and "
                         f"{PARAMS_DIR}/); make one with checkpoints/convert_to_orbax.py")


def save_orbax(params, params_dir: str) -> None:
    """Write a param pytree (numpy or jax arrays) as an orbax checkpoint at `params_dir`
    (which must not exist yet). Blocks until the write is complete."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(params_dir), params)
    ckptr.wait_until_finished()


def _leaf_metadata(params_dir: str):
    """Pytree of (shape, dtype) of the stored leaves."""
    import jax
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(params_dir)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if tree is None:  # older orbax: the metadata is the tree itself
        tree = getattr(meta, "item_metadata", meta)
    return jax.tree.map(lambda m: (tuple(m.shape), m.dtype), tree,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def load_orbax(path: str, shardings=None, dtype=None):
    """Restore the param pytree from an orbax checkpoint.

    path: the converter's OUT_DIR (or its params/ folder).
    shardings: a pytree of jax.sharding.Sharding matching the params (e.g.
      ShardingPlan.param_shardings()); each device then reads only its own slices. None: every
      leaf on the default device.
    dtype: cast while restoring (e.g. "bfloat16"); None keeps the stored dtype.
    """
    import jax
    import orbax.checkpoint as ocp

    params_dir = _params_dir(path)
    meta = _leaf_metadata(params_dir)
    meta_leaves, treedef = jax.tree.flatten(meta, is_leaf=lambda x: isinstance(x, tuple)
                                            and len(x) == 2 and isinstance(x[0], tuple))
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding_leaves = [default] * len(meta_leaves)
    else:
        sharding_leaves, s_treedef = jax.tree.flatten(shardings)
        if s_treedef != treedef:
            raise OrbaxLoadError(f"{params_dir}: the checkpoint's parameters {treedef} do not "
                                 f"match the shardings given {s_treedef}")
    target = jax.tree.unflatten(treedef, [
        jax.ShapeDtypeStruct(shape, dtype or stored, sharding=s)
        for (shape, stored), s in zip(meta_leaves, sharding_leaves)])
    return ocp.StandardCheckpointer().restore(params_dir, target)


def load_orbax_model(path: str, dtype: str | None = None, shardings=None):
    """A LoadedModel (config, params already on devices, tokenizer) from the converter's
    OUT_DIR. shardings: a pytree, or a callable ModelConfig -> pytree (the plan needs the
    config, which lives in the checkpoint)."""
    from jaxserve.loading import LoadedModel
    from jaxserve.loading.hf import load_tokenizer
    from jaxserve.models.config import ModelConfig

    if not is_orbax_checkpoint(path):
        _params_dir(path)  # raises the explanatory error
    with open(os.path.join(path, MARKER)) as f:
        marker = json.load(f)
    if marker.get("format") != FORMAT_VERSION:
        raise OrbaxLoadError(f"{path}: checkpoint format {marker.get('format')!r}, this jaxserve "
                             f"reads format {FORMAT_VERSION}; re-run convert_to_orbax.py")
    config = ModelConfig.from_folder(path, dtype=dtype or marker.get("dtype"))
    if callable(shardings):
        shardings = shardings(config)
    params = load_orbax(path, shardings, dtype=config.dtype)
    return LoadedModel(config=config, params=params, tokenizer=load_tokenizer(path), source=path)
