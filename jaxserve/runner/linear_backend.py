"""Which path the layers' matmuls take (EngineConfig.linear_backend), decided once per runner.

"native" (pallas_kernels/native/packed_matmul.cc on 64-column panels, and quantized_matmul.cc
on int8, fp8 or 4-bit codes in the same panels; see models/linear.py) applies on CPU, to float32
compute on one device: the kernels are plain XLA:CPU custom calls, so they have no sharding
rule for a mesh, and they compute in float32 only. Everything else is "xla".
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


def _why_not_native_quantized(quantized: str, form_missing: str | None) -> str | None:
    if form_missing is not None:
        return f"the {quantized} weights have no native form ({form_missing})"
    from pallas_kernels import native_matmul
    reason = native_matmul.quantized_unavailable_reason()
    return None if reason is None else f"the quantized kernel is unavailable ({reason})"


def resolve_linear_backend(requested: str | None, platform: str, dtype,
                           num_devices: int, quantized: str | None = None,
                           quantized_form_missing: str | None = None
                           ) -> tuple[str, str | None]:
    """(backend, a line for the start-up log or None). An explicit "native" that cannot apply
    is a ConfigError; the default falls back to "xla" and says why when the platform is CPU.
    `quantized`: the layer matrices' quantization (models.quant.quantized_scheme), None when
    float; `quantized_form_missing`: why some of them have no native form (fp8 codes, GPTQ
    act-order: linear.native_quantized_form_missing), which leaves them to XLA's dots."""
    weights = "float32 weights" if quantized is None else f"{quantized} codes"
    if requested == "xla":
        return "xla", (None if quantized is None
                       else f"linear layers: {quantized} weights, dequantized inside XLA's dots")
    why_not = _why_not_native(platform, dtype, num_devices)
    if why_not is None and quantized is not None:
        why_not = _why_not_native_quantized(quantized, quantized_form_missing)
    if why_not is None:
        return "native", f"linear layers: native CPU matmul on packed {weights}"
    if requested == "native":
        raise ConfigError(f"--linear-backend native: {why_not}")
    if platform == "cpu" or quantized is not None:
        what = "XLA dots" if quantized is None else f"{quantized} weights dequantized in XLA dots"
        return "xla", f"linear layers: {what} (native CPU matmul not used: {why_not})"
    return "xla", None
