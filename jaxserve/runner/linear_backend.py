"""Which path the layers' matmuls take (EngineConfig.linear_backend), decided once per runner.

"native" (pallas_kernels/native/packed_matmul.cc on 64-column panels, see models/linear.py)
applies on CPU, to float32 weights on one device: the kernel is a plain XLA:CPU custom call, so
it has no sharding rule for a mesh, and it computes in float32 only. Everything else is "xla".
"""

from __future__ import annotations

from jaxserve.config import ConfigError


def _why_not_native(platform: str, dtype, num_devices: int) -> str | None:
    if platform != "cpu":
        return f"it runs on CPU only, not on {platform}"
    if str(dtype) != "float32":
        return f"it takes float32 weights, not {dtype}"
    if num_devices != 1:
        return f"it runs on one device, not a mesh of {num_devices}"
    from pallas_kernels import native_matmul
    reason = native_matmul.unavailable_reason()
    return None if reason is None else f"the kernel is unavailable ({reason})"


def resolve_linear_backend(requested: str | None, platform: str, dtype,
                           num_devices: int, quantized: str | None = None
                           ) -> tuple[str, str | None]:
    """(backend, a line for the start-up log or None). An explicit "native" that cannot apply
    is a ConfigError; the default falls back to "xla" and says why when the platform is CPU.
    `quantized`: the layer matrices' quantization (models.quant.quantized_scheme), which only
    XLA's dots read (dequantizing one layer at a time)."""
    if quantized is not None:
        if requested == "native":
            raise ConfigError(f"--linear-backend native: it takes float32 weights, the layer "
                              f"matrices are quantized ({quantized})")
        return "xla", f"linear layers: {quantized} weights, dequantized inside XLA's dots"
    if requested == "xla":
        return "xla", None
    why_not = _why_not_native(platform, dtype, num_devices)
    if why_not is None:
        return "native", "linear layers: native CPU matmul on packed float32 weights"
    if requested == "native":
        raise ConfigError(f"--linear-backend native: {why_not}")
    if platform == "cpu":
        return "xla", f"linear layers: XLA dots (native CPU matmul not used: {why_not})"
    return "xla", None
