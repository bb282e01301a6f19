"""SGLang attention backend `turboquant`: attention over the packed pool, in the rotated domain.

Per layer and forward pass the backend (1) writes the batch's new K/V into the packed pool (quantize, scatter to
out_cache_loc) and then (2) attends through the pool, new tokens included. Writing first is what makes the prefix
cache exact (docs/ARCHITECTURE.md section 3): a request sees the same quantized K/V whether its prefix was just
computed or came from the radix cache. The kernels (tq_serve.sglang_plugin.ops) read only the slots in kv_indices,
never the pool. The path from this backend to a kernel: docs/ARCHITECTURE.md section 5.2.

Static facts: decoder-only causal attention, qk_head_dim == v_head_dim, GQA (q heads a multiple of KV heads), tanh
logit capping, sliding windows (each layer's own layer.sliding_window_size, passed per call: the query at position p
sees keys p - W .. p, as SGLang's torch_native backend masks them, and the kernels never read a slot outside the
window); no cross attention, encoder-only layers or speculative decoding. Sliding-window layers keep every slot in
the one pool (no SWA sub-pool): memory is that of full attention, only the reads are windowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from .ops import LayerOps, layer_ops
from .pool import TurboQuantKVPool


@dataclass
class TurboQuantMetadata:
    """Where each request's query rows and KV slots are, for one forward pass of B requests.

    extend, request b:   kv slots | prefix_len[b] (cached) | extend_len[b] (new, already written) |
                         q rows                            | extend_len[b]                        |
    decode, request b:   kv slots | seq_len[b] - 1 (cached) | 1 (the new token, already written) |
                         q rows: one

    qo_indptr       (B+1,)    q rows of request b: qo_indptr[b] : qo_indptr[b+1]       (None for decode)
    kv_indptr       (B+1,)    its slots: kv_indices[kv_indptr[b] : kv_indptr[b+1]]
    kv_indices      (>= nnz,) slot ids, each request's req_to_token row up to its seq_len
    max_extend_len  the longest extend_len, a host int: the extend kernel sizes its grid without a device sync
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    qo_indptr: torch.Tensor | None = None
    max_extend_len: int | None = None


class TurboQuantAttnBackend(AttentionBackend):
    supported_forward_modes = (ForwardMode.EXTEND, ForwardMode.MIXED, ForwardMode.DECODE, ForwardMode.IDLE)

    def __init__(self, model_runner):
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, TurboQuantKVPool):
            raise RuntimeError(
                f"attention backend 'turboquant' needs the packed TurboQuant KV pool, but SGLang built "
                f"{type(pool).__name__}: the plug-in's pool hook did not run (was tq_serve.sglang_plugin loaded in "
                "this process?) or this model's KV cache is not a plain MHA/GQA pool"
            )
        if model_runner.model_config.is_encoder_decoder:
            raise NotImplementedError("attention backend 'turboquant' does not support encoder-decoder models")
        self.device = torch.device(model_runner.device)
        self.pool = pool
        # SGLang's forward context reads these off the attention backend (get_token_to_kv_pool(),
        # get_req_to_token_pool()): Qwen3-MoE, gpt-oss and others ask for the pool before attention. Their fused
        # rope + bf16 KV write is switched off for the packed pool (hooks.no_fused_kv_write).
        self.token_to_kv_pool = pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        self._layer_ops: dict[int, LayerOps] = {}
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.max_context_len = self.req_to_token.shape[1]
        # Fixed-address metadata buffers: a captured CUDA graph reads these, and replay refills them in place.
        max_bs = model_runner.req_to_token_pool.size
        self.kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int64, device=self.device)
        self.cuda_graph_kv_indices: torch.Tensor | None = None
        self.forward_metadata: TurboQuantMetadata | None = None

    # -- metadata -----------------------------------------------------------------------------------------------

    def _fill_kv(
        self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor
    ) -> None:
        """kv_indptr[: B+1] = [0, cumsum(seq_lens)]; kv_indices[: nnz] = the requests' req_to_token rows, in place."""
        bs = seq_lens.numel()
        kv_indptr[0] = 0
        kv_indptr[1 : bs + 1] = torch.cumsum(seq_lens, dim=0)
        if self.device.type == "cuda":
            from sglang.kernels.ops.attention.kv_indices import create_flashinfer_kv_indices_triton

            create_flashinfer_kv_indices_triton[(bs,)](
                self.req_to_token, req_pool_indices, seq_lens, kv_indptr, None, kv_indices, self.req_to_token.shape[1]
            )
            return
        # A CPU step: one slice per request (a masked gather of a (B, max_len) block cost 70 us at one request).
        lens, reqs = seq_lens.tolist(), req_pool_indices.tolist()
        at = 0
        for req, length in zip(reqs, lens, strict=True):
            kv_indices[at : at + length] = self.req_to_token[req, :length]
            at += length

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Eager metadata: exactly-sized index tensors for this batch."""
        mode = forward_batch.forward_mode
        if mode not in self.supported_forward_modes:
            raise NotImplementedError(f"attention backend 'turboquant' does not support forward mode {mode.name}")
        bs = forward_batch.batch_size
        seq_lens = forward_batch.seq_lens[:bs]
        kv_indptr = torch.zeros(bs + 1, dtype=torch.int64, device=self.device)
        kv_indices = torch.empty(forward_batch.seq_lens_sum, dtype=torch.int64, device=self.device)
        self._fill_kv(forward_batch.req_pool_indices[:bs], seq_lens, kv_indptr, kv_indices)
        qo_indptr = max_extend_len = None
        if mode.is_extend():
            qo_indptr = torch.zeros(bs + 1, dtype=torch.int64, device=self.device)
            qo_indptr[1:] = torch.cumsum(forward_batch.extend_seq_lens[:bs], dim=0)
            if forward_batch.extend_seq_lens_cpu is not None:
                max_extend_len = max(forward_batch.extend_seq_lens_cpu[:bs], default=0)
        self.forward_metadata = TurboQuantMetadata(
            kv_indptr=kv_indptr, kv_indices=kv_indices, qo_indptr=qo_indptr, max_extend_len=max_extend_len
        )

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        # Decode graphs only: every captured batch of up to max_bs requests indexes into these fixed buffers.
        self.cuda_graph_kv_indices = torch.zeros(max_bs * self.max_context_len, dtype=torch.int64, device=self.device)

    def init_forward_metadata_out_graph(self, forward_batch: ForwardBatch, in_capture: bool = False) -> None:
        """Capture and replay of a decode graph: refill the fixed buffers in place, outside the graph."""
        if not forward_batch.forward_mode.is_decode_or_idle():
            raise NotImplementedError("attention backend 'turboquant' captures decode graphs only")
        if self.cuda_graph_kv_indices is None:
            raise RuntimeError("init_cuda_graph_state must run before a graph is captured")
        bs = forward_batch.batch_size
        self._fill_kv(
            forward_batch.req_pool_indices[:bs], forward_batch.seq_lens[:bs], self.kv_indptr, self.cuda_graph_kv_indices
        )
        self.forward_metadata = TurboQuantMetadata(
            kv_indptr=self.kv_indptr[: bs + 1], kv_indices=self.cuda_graph_kv_indices
        )

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def support_triton(self) -> bool:
        return self.device.type == "cuda"

    # -- attention ----------------------------------------------------------------------------------------------

    @staticmethod
    def _check_layer(layer) -> None:
        if layer.is_cross_attention or layer.attn_type.value != "decoder":
            raise NotImplementedError("attention backend 'turboquant' supports causal decoder self-attention only")
        if layer.qk_head_dim != layer.v_head_dim:
            raise NotImplementedError("attention backend 'turboquant' needs qk_head_dim == v_head_dim")
        if layer.logit_cap > 0 and layer.logit_capping_method != "tanh":
            raise NotImplementedError(f"unsupported logit capping {layer.logit_capping_method!r} (tanh only)")

    def _ops(self, layer) -> LayerOps:
        """This layer's kernels, chosen on its first call: the GQA group is known only from the layer."""
        ops = self._layer_ops.get(layer.layer_id)
        if ops is None:
            k_quantizer, v_quantizer = self.pool.quantizers(layer.layer_id)
            ops = self._layer_ops[layer.layer_id] = layer_ops(
                k_quantizer.layout,
                v_quantizer.layout,
                group=layer.tp_q_head_num // layer.tp_k_head_num,
                device_type=self.device.type,
                use_triton_interpreter=self.pool.tq_config.use_triton_interpreter,
            )
        return ops

    def _write_then_attend(self, q, k, v, layer, forward_batch: ForwardBatch, save_kv_cache: bool, decode: bool):
        self._check_layer(layer)
        ops = self._ops(layer)
        if save_kv_cache and k is not None:
            # Write first: the new tokens are then attended through exactly the records a cache hit would read.
            k = k.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim)
            v = v.reshape(-1, layer.tp_k_head_num, layer.v_head_dim)
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        k_quantizer, v_quantizer = self.pool.quantizers(layer.layer_id)
        md = self.forward_metadata
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        args = (self.pool.get_key_buffer(layer.layer_id), self.pool.get_value_buffer(layer.layer_id))
        window = layer.sliding_window_size  # None or -1: none; the ops read only the slots inside it
        window = None if window is None or window < 0 else int(window)
        if decode:
            out = ops.decode_attention(
                q, *args, md.kv_indptr, md.kv_indices, k_quantizer, v_quantizer, layer.scaling, layer.logit_cap,
                sliding_window_size=window,
            )  # fmt: skip
        else:
            out = ops.extend_attention(
                q,
                *args,
                md.qo_indptr,
                md.kv_indptr,
                md.kv_indices,
                k_quantizer,
                v_quantizer,
                layer.scaling,
                layer.logit_cap,
                max_new_tokens=md.max_extend_len,
                sliding_window_size=window,
            )
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch: ForwardBatch, save_kv_cache: bool = True, **kwargs):
        return self._write_then_attend(q, k, v, layer, forward_batch, save_kv_cache, decode=False)

    def forward_decode(self, q, k, v, layer, forward_batch: ForwardBatch, save_kv_cache: bool = True, **kwargs):
        return self._write_then_attend(q, k, v, layer, forward_batch, save_kv_cache, decode=True)
