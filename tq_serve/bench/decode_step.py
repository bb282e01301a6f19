"""One decode step of a Llama-like model with random bf16 weights, attention in bf16 SDPA or TurboQuant.

RMSNorm, QKV, the K/V write of the new token, attention over the cache, O, gated MLP, for every layer. One layer's
weights and one layer's cache serve all layers: each is far larger than L2, so every layer still streams them from
HBM and the time matches distinct layers. Everything is made on the device.
"""

from __future__ import annotations

import torch

from .gpu import ModelShape, quantizer, random_pool


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * weight


class DecodeStep:
    """Callable: one step of `batch` requests at `context` tokens each; bits 16 is the bf16 peer."""

    def __init__(
        self, shape: ModelShape, batch: int, context: int, bits: float, device: torch.device, gen: torch.Generator
    ) -> None:
        s, dt = shape, torch.bfloat16
        self.shape, self.batch, self.context, self.bits = s, batch, context, bits

        def weight(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, device=device, generator=gen) * cols**-0.5).to(dt)

        self.w_qkv = weight(s.hidden, (s.q_heads + 2 * s.kv_heads) * s.head_dim)
        self.w_o = weight(s.q_heads * s.head_dim, s.hidden)
        self.w_gate_up = weight(s.hidden, 2 * s.intermediate)
        self.w_down = weight(s.intermediate, s.hidden)
        self.norm = torch.ones(s.hidden, dtype=dt, device=device)
        self.x = torch.randn(batch, s.hidden, device=device, generator=gen).to(dt)
        tokens = batch * context
        if bits == 16:
            self.k_cache = torch.randn(batch, s.kv_heads, context, s.head_dim, device=device, generator=gen).to(dt)
            self.v_cache = torch.randn_like(self.k_cache)
        else:
            self.qz = quantizer(s.head_dim, bits)
            self.k_pool = random_pool(self.qz.layout, tokens, s.kv_heads, device, gen)
            self.v_pool = random_pool(self.qz.layout, tokens, s.kv_heads, device, gen)
            self.kv_indptr = torch.arange(0, tokens + 1, context, dtype=torch.int32, device=device)
            self.kv_indices = torch.arange(tokens, dtype=torch.int32, device=device)
            # The step's new token goes to the last slot of each request (the kernel then attends to it).
            self.loc = self.kv_indptr[1:].long() - 1

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (batch, q_heads, d), k and v (batch, kv_heads, d) of the new token -> (batch, q_heads, d)."""
        s = self.shape
        if self.bits == 16:
            self.k_cache[:, :, -1] = k
            self.v_cache[:, :, -1] = v
            grouped = q.view(q.shape[0], s.kv_heads, s.q_heads // s.kv_heads, s.head_dim)
            return torch.nn.functional.scaled_dot_product_attention(grouped, self.k_cache, self.v_cache).reshape(
                q.shape
            )
        from tq_serve.kernels.triton_decode import decode_attention_triton
        from tq_serve.kernels.triton_write import write_kv_triton

        write_kv_triton(self.k_pool, self.v_pool, k, v, self.loc, self.qz, self.qz, check_indices=False)
        return decode_attention_triton(
            q, self.k_pool, self.v_pool, self.kv_indptr, self.kv_indices, self.qz, self.qz, s.head_dim**-0.5,
            check_indices=False,
        )  # fmt: skip

    def __call__(self) -> torch.Tensor:
        s, b = self.shape, self.batch
        x = self.x
        for _ in range(s.layers):
            qkv = rms_norm(x, self.norm) @ self.w_qkv
            q, k, v = qkv.split([s.q_heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
            attn = self.attention(
                q.reshape(b, s.q_heads, s.head_dim),
                k.reshape(b, s.kv_heads, s.head_dim),
                v.reshape(b, s.kv_heads, s.head_dim),
            )
            x = x + attn.reshape(b, -1) @ self.w_o
            gate, up = (rms_norm(x, self.norm) @ self.w_gate_up).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ self.w_down
        return x
