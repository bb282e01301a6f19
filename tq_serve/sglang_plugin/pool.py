"""The packed KV pool: SGLang's token-slot pool with TurboQuant records instead of bf16 vectors.

Per layer l, K and V code rows and their norms, indexed by token slot exactly like MHATokenToKVPool's buffers:

    k_buffer[l]       uint8       (size + page_size, num_kv_heads, K(l).code_bytes)
    k_norm_buffer[l]  norm dtype  (size + page_size, num_kv_heads, K(l).norms_per_vector)
    v_buffer[l], v_norm_buffer[l] the same for V(l)

    one vector (layer l, slot s, KV head h), e.g. d=128 at 4 bits mse:
        k_buffer[l][s, h]       64 B nibble codes of the 128 rotated coordinates (rows 16-byte aligned)
        k_norm_buffer[l][s, h]  one fp16 norm
    (the full byte map of every bits/variant is in tq_serve.kernels.layout)

k_buffer/v_buffer stay lists of per-layer tensors, as SGLang's generic pool code expects; the norms ride along in
every operation that moves slots (CPU offload on retraction, slot moves), and get_key_buffer returns both as one
PackedVectors.

K(l), V(l) are the VectorLayouts of the layer's (k_bits, v_bits), so layers of a bit schedule have their own record
widths; a slot costs KVLayout.bytes_per_token bytes over all layers, which is exactly what the capacity hook charges.
Slot 0 (the padded page) absorbs SGLang's dummy writes, as in the bf16 pool. The radix tree and the allocator hold
slot indices only, so they work on this pool unchanged, and freeing a slot needs nothing from the pool.

Writes quantize: set_kv_buffer(layer, loc, k, v) packs k, v (tokens, kv_heads, head_dim) into slots loc. Reads are
the attention backend's, on the packed records (get_key_buffer returns the uint8 tensor, never a bf16 view).

Norms beyond the norm dtype's range (float16 by default: 65504; real models have K/V coordinates of 1e4-1e5) are
stored saturated, never as inf, and counted per layer in `norm_saturated`, an int64 tensor on the pool's device that
the write kernels add to (no host sync per write). The pool reads it lazily (every write on a CPU, every
SATURATION_CHECK_EVERY writes on a GPU, never inside a CUDA-graph capture) and logs one warning line per layer the
first time it saturates, naming `--kv-norm-dtype float32`, which holds such norms.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import KvBufferDesc, MHATokenToKVPool, unwrap_write_loc

from tq_serve import metrics
from tq_serve.kernels.layout import KVLayout
from tq_serve.kernels.packed import PackedVectors
from tq_serve.kernels.quantizer import TurboQuantizer, get_quantizer

from .config import TurboQuantConfig
from .ops import LayerOps, layer_ops

logger = logging.getLogger(__name__)

# set_kv_buffer calls between two reads of the saturation counters on a GPU (each read is a device sync).
SATURATION_CHECK_EVERY = 4096


class TurboQuantKVPool(MHATokenToKVPool):
    """MHATokenToKVPool over packed records. Build it through `bind(layout, config)`, which fixes both."""

    kv_layout: ClassVar[KVLayout]
    tq_config: ClassVar[TurboQuantConfig]

    @classmethod
    def bind(cls, kv_layout: KVLayout, config: TurboQuantConfig) -> type[TurboQuantKVPool]:
        """A subclass with the layout and config fixed: SGLang constructs the pool from a class and its own
        arguments only (kv_cache_configurator._build_mha_kv_pool)."""
        return type(cls.__name__, (cls,), {"kv_layout": kv_layout, "tq_config": config, "__module__": cls.__module__})

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        enable_memory_saver: bool,
        *,
        enable_kv_cache_copy: bool = False,
        post_capture_active: bool = False,
        quant_method=None,
        **kwargs,
    ):
        layout = self.kv_layout
        if (head_num, head_dim, layer_num) != (layout.num_kv_heads, layout.head_dim, layout.num_layers):
            raise ValueError(
                f"TurboQuant pool built for (kv_heads, head_dim, layers) = ({head_num}, {head_dim}, {layer_num}) but "
                f"its layout has ({layout.num_kv_heads}, {layout.head_dim}, {layout.num_layers})"
            )
        v_head_dim = kwargs.get("v_head_dim")
        if v_head_dim not in (None, head_dim):
            raise NotImplementedError(f"TurboQuant needs v_head_dim == head_dim, got {v_head_dim} != {head_dim}")
        if quant_method is not None or post_capture_active or enable_kv_cache_copy:
            raise NotImplementedError(
                "the TurboQuant pool does not combine with another KV-cache quantization, post-capture KV backing or "
                "speculative decoding (KV-cache copy)"
            )
        cfg = self.tq_config
        self.k_quantizers: tuple[TurboQuantizer, ...] = tuple(
            get_quantizer(layout.k(i), cfg.seed, cfg.rotation, cfg.norm_correction) for i in range(layer_num)
        )
        self.v_quantizers: tuple[TurboQuantizer, ...] = tuple(
            get_quantizer(layout.v(i), cfg.seed, cfg.rotation, cfg.norm_correction) for i in range(layer_num)
        )
        device_type = torch.device(device).type
        self.write_ops: tuple[LayerOps, ...] = tuple(
            layer_ops(
                kq.layout,
                vq.layout,
                group=1,
                device_type=device_type,
                use_triton_interpreter=cfg.use_triton_interpreter,
            )
            for kq, vq in zip(self.k_quantizers, self.v_quantizers, strict=True)
        )
        super().__init__(size, page_size, dtype, head_num, head_dim, layer_num, device, enable_memory_saver, **kwargs)
        if self.use_hnd:
            raise NotImplementedError("TurboQuant needs the NHD slot-row layout: unset SGLANG_USE_HND_KVCACHE")
        # Norms stored saturated, per local layer (K and V together): added to by the writes, read lazily.
        self.norm_saturated = torch.zeros(layer_num, dtype=torch.int64, device=self.device)
        self._saturation_warned: set[int] = set()
        self._writes_since_check = 0
        metrics.publish_layout(layout, size, self.start_layer)

    def _create_buffers(self) -> None:
        rows = self.size + self.page_size
        self.store_dtype = torch.uint8
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            k = [PackedVectors.empty(qz.layout, (rows, self.head_num), self.device) for qz in self.k_quantizers]
            v = [PackedVectors.empty(qz.layout, (rows, self.head_num), self.device) for qz in self.v_quantizers]
        self.k_buffer, self.k_norm_buffer = [p.codes for p in k], [p.norms for p in k]
        self.v_buffer, self.v_norm_buffer = [p.codes for p in v], [p.norms for p in v]
        # Attributes MHATokenToKVPool's readers expect; TurboQuant has no scale or dequant buffers.
        self.k_scale_buffer = self.v_scale_buffer = None
        self.native_k_scale_buffer = self.native_v_scale_buffer = None
        self.dq_k_buffer = self.dq_v_buffer = None
        self._kv_buffer_descs = self._build_kv_buffer_descs()
        self._init_data_ptrs_and_strides()

    def _all_buffers(self) -> list[torch.Tensor]:
        """Every per-slot tensor, in the order of _build_kv_buffer_descs."""
        return [*self.k_buffer, *self.v_buffer, *self.k_norm_buffer, *self.v_norm_buffer]

    def _build_kv_buffer_descs(self) -> list[KvBufferDesc]:
        # Per-layer widths differ under a bit schedule: describe each buffer by its own shape.
        kinds = [
            ("k", self.k_buffer),
            ("v", self.v_buffer),
            ("k_norm", self.k_norm_buffer),
            ("v_norm", self.v_norm_buffer),
        ]
        return [
            KvBufferDesc(f"{kind}{layer}", buf.shape, row_bytes=buf[0].numel() * buf.element_size(), tokens_per_row=1)
            for kind, buffers in kinds
            for layer, buf in enumerate(buffers)
        ]

    def _pd_registerable_tensors(self) -> list[torch.Tensor]:
        return self._all_buffers()

    def get_kv_size_bytes(self) -> tuple[int, int]:
        k = sum(b.numel() * b.element_size() for b in (*self.k_buffer, *self.k_norm_buffer))
        v = sum(b.numel() * b.element_size() for b in (*self.v_buffer, *self.v_norm_buffer))
        return k, v

    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None) -> list[torch.Tensor]:
        """Every buffer's rows at `indices`, on the CPU (a retracted request's KV, restored by load_cpu_copy)."""
        return [buf[indices].to("cpu") for buf in self._all_buffers()]

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None, req_pool_index=None) -> None:
        for buf, rows in zip(self._all_buffers(), kv_cache_cpu, strict=True):
            buf[indices] = rows.to(buf.device)

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
        for buf in self._all_buffers():
            buf[tgt_loc] = buf[src_loc]

    def _get_key_buffer(self, layer_id: int) -> PackedVectors:
        local = layer_id - self.start_layer
        return PackedVectors(self.k_buffer[local], self.k_norm_buffer[local])

    def _get_value_buffer(self, layer_id: int) -> PackedVectors:
        local = layer_id - self.start_layer
        return PackedVectors(self.v_buffer[local], self.v_norm_buffer[local])

    def quantizers(self, layer_id: int) -> tuple[TurboQuantizer, TurboQuantizer]:
        """(K, V) quantizers of model layer `layer_id`."""
        local = layer_id - self.start_layer
        return self.k_quantizers[local], self.v_quantizers[local]

    def set_kv_buffer(
        self,
        layer,
        loc_info,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale: float | None = None,
        v_scale: float | None = None,
        layer_id_override: int | None = None,
        dcp_kv_mask: torch.Tensor | None = None,
    ) -> None:
        """Quantize cache_k, cache_v (tokens, kv_heads, head_dim) into slots loc. k_scale/v_scale (fp8 KV scales) do
        not apply: TurboQuant stores a norm per vector instead."""
        if dcp_kv_mask is not None:
            raise NotImplementedError("TurboQuant does not support decode context parallelism (dcp_kv_mask)")
        loc, _, _ = unwrap_write_loc(loc_info)
        self._check_physical_write_loc(loc_info, "set_kv_buffer (TurboQuant)")
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        local = layer_id - self.start_layer
        self.write_ops[local].write_kv(
            PackedVectors(self.k_buffer[local], self.k_norm_buffer[local]),
            PackedVectors(self.v_buffer[local], self.v_norm_buffer[local]),
            cache_k,
            cache_v,
            loc,
            self.k_quantizers[local],
            self.v_quantizers[local],
            saturated=self.norm_saturated[local : local + 1],
        )
        self._writes_since_check += 1
        if self.norm_saturated.device.type == "cpu" or self._writes_since_check >= SATURATION_CHECK_EVERY:
            self.check_norm_saturation()

    def check_norm_saturation(self) -> dict[int, int]:
        """Read the saturation counters (one device sync on a GPU; skipped inside a CUDA-graph capture) and log one
        warning line for each layer that saturated a norm for the first time. Returns {model layer: count} of the
        layers with saturated norms so far."""
        if self.norm_saturated.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return {}
        self._writes_since_check = 0
        counts = {self.start_layer + i: n for i, n in enumerate(self.norm_saturated.tolist()) if n}
        for layer_id, count in counts.items():
            if layer_id in self._saturation_warned:
                continue
            self._saturation_warned.add(layer_id)
            kq, vq = self.quantizers(layer_id)
            dtypes = {kq.layout.norm_dtype, vq.layout.norm_dtype}
            hint = (
                "restart with --kv-norm-dtype float32 to hold them exactly"
                if dtypes != {"float32"}
                else "they exceed even float32's range"
            )
            logger.warning(
                "TurboQuant layer %d: %d K/V norm(s) beyond the %s norm range were stored saturated at its largest "
                "finite value (attention stays finite, those vectors are shortened); %s",
                layer_id,
                count,
                "/".join(sorted(dtypes)),
                hint,
            )
        return counts
