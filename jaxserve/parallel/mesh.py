"""ParallelConfig and the device mesh it describes: ("data", "model") axes over the devices.

The mesh is the one place that knows how many devices a run uses. Every sharding in jaxserve is a
NamedSharding over this mesh, built from logical axis names (see rules.py), so changing the
parallelism is changing two integers here, never the model code.

Axis types are Auto on purpose: `jax.make_mesh` defaults to Explicit axes from jax 0.10 on, under
which the compiler refuses to propagate shardings through ops it cannot type, and
`with_sharding_constraint` fails. We want GSPMD to propagate from the parameter and cache
shardings, so every axis is Auto.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)


class ShardingError(ValueError):
    """A parallel or sharding configuration that does not fit the model or the machine.
    Messages name both numbers (what was asked, what is there) and the flag to change."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How many ways to split: tensor_parallel_size devices share one model replica (heads, MLP
    and vocab split on the "model" axis); data_parallel_size replicas side by side ("data")."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self):
        for flag, value in (("--tensor-parallel-size", self.tensor_parallel_size),
                            ("--data-parallel-size", self.data_parallel_size)):
            if not isinstance(value, int) or value < 1:
                raise ShardingError(f"{flag} must be a positive integer, got {value!r}")

    @property
    def num_devices(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size

    @property
    def mesh_shape(self) -> dict[str, int]:
        return {DATA_AXIS: self.data_parallel_size, MODEL_AXIS: self.tensor_parallel_size}

    def make_mesh(self, devices=None):
        """A Mesh of shape (data, model) over the first num_devices of `devices` (default: all
        devices of every process, jax.devices()). Model-axis neighbours are adjacent devices,
        which on a GPU host are the ones on the fastest links."""
        import jax
        from jax.sharding import AxisType, Mesh

        devices = list(jax.devices() if devices is None else devices)
        if self.num_devices > len(devices):
            raise ShardingError(
                f"the mesh needs {self.num_devices} devices (tensor_parallel_size "
                f"{self.tensor_parallel_size} x data_parallel_size {self.data_parallel_size}) "
                f"but only {len(devices)} {devices[0].platform if devices else ''} device(s) are "
                f"present; lower --tensor-parallel-size or the sharding config's mesh")
        grid = np.array(devices[:self.num_devices], dtype=object).reshape(
            self.data_parallel_size, self.tensor_parallel_size)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))
