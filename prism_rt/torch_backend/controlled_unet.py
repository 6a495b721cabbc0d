"""The controlled UNet: prompt-to-prompt attention control (Hertz et al. 2022) compiled into the
UNet's forward pass and driven by tensor inputs instead of Python-side controller objects.

Built with diffusers attention processors installed per layer (never by matching class names or
patching diffusers). With every control neutral it is the stock UNet. Batch layout of one call
(ARCHITECTURE.md): ``N = U + G·(1+K)``; the first ``U`` items are unconditional CFG items that
are never controlled; the last ``G·(1+K)`` items are the conditional half, ``G`` groups of a
source item followed by ``K`` edit items. ``G`` and ``K`` are read from the control tensors'
shapes, so one module serves inversion (``K = 0``), editing and chunked sweeps alike.

For edit item k of a group, with source probabilities ``A_0``:
  cross-attention: ``A_k ← a·eq·(r·(A_0 M_k) + (1−r)·A_k) + (1−a)·A_k``
  self-attention (layers with ≤ ``self_max_queries`` queries): ``A_k ← s·A_0 + (1−s)·A_k``.
The LocalBlend maps are the conditional half's cross-attention probabilities averaged over heads
and over the down/up-block layers at the blend resolution (a quarter of the latent side; never the
mid block); by default *after* control (``BlendMaps.AFTER_CONTROL``), as the published
prompt-to-prompt controller sees them: its ``AttentionStore`` keeps a reference to each map and
``AttentionControlEdit`` then overwrites the edit rows in place (``attn[1:] = …``), so its
LocalBlend reads the refined and reweighted maps. ``BlendMaps.BEFORE_CONTROL`` keeps each item's
own maps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BlendMaps


@dataclass
class _ControlState:
    """What the processors of one UNet share during one forward call."""

    active: bool = False
    cross_alpha: torch.Tensor | None = None  # [G, K, T]
    token_mapper: torch.Tensor | None = None  # [G, K, T, T]
    refine_alpha: torch.Tensor | None = None  # [G, K, T]
    equalizer: torch.Tensor | None = None  # [G, K, T]
    self_replace: torch.Tensor | None = None  # [G, K]
    blend_hw: tuple[int, int] = (0, 0)
    blend_sum: list = field(default_factory=list)


@dataclass(frozen=True)
class AttentionLayer:
    name: str
    is_cross: bool
    place: str  # "down" | "mid" | "up"
    downsample: int  # latent side / this layer's side, measured by a probe pass


class ControlledAttnProcessor:
    """Attention with the prompt-to-prompt control applied to the cond half, as fused attentions."""

    def __init__(self, state: _ControlState, layer: AttentionLayer, self_max_queries: int, blend: bool,
                 blend_maps: BlendMaps = BlendMaps.AFTER_CONTROL):
        self.state, self.layer, self.self_max_queries, self.blend = state, layer, self_max_queries, blend
        self.blend_maps = BlendMaps(blend_maps)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or attention_mask is not None:
            raise NotImplementedError("controlled attention supports SD v1.x attention layers only")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = hidden_states if not is_cross else encoder_hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        batch, queries = hidden_states.shape[0], hidden_states.shape[1]
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        head_dim = k.shape[-1] // heads
        q = q.view(batch, -1, heads, head_dim).transpose(1, 2)
        k = k.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = v.view(batch, -1, heads, head_dim).transpose(1, 2)

        state = self.state
        controlled = state.active and (is_cross or queries <= self.self_max_queries)
        if controlled:
            out = self._controlled(attn, q, k, v, is_cross)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=attn.scale)

        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _probabilities(attn, q, k):
        if attn.upcast_attention:
            q, k = q.float(), k.float()
        scores = (q @ k.transpose(-1, -2)) * attn.scale
        return scores.float().softmax(dim=-1) if attn.upcast_softmax else scores.softmax(dim=-1)

    def _controlled(self, attn, q, k, v, is_cross: bool) -> torch.Tensor:
        """Attention output with the control applied, without materialising the probabilities
        (only LocalBlend's layers compute the conditional half's cross-attention maps).

        The controlled probabilities of edit item k are linear in its own and the source's:
        ``A_k' = c_src ⊙ (A_0 M_k) + c_own ⊙ A_k`` over the key axis (cross-attention:
        ``c_src = a·eq·r``, ``c_own = a·eq·(1−r) + 1−a``; self-attention: ``M_k = I``,
        ``c_src = s``, ``c_own = 1−s``). Hence
        ``A_k' V_k = A_k (c_own ⊙ V_k) + A_0 (M_k (c_src ⊙ V_k))``: two plain attentions, one over
        every item with the edit items' values reweighted, one of the source's queries and keys over
        the K edit items' mapped values — both fused (flash) attention, and the second is empty
        when K = 0 (inversion), so an uncontrolled step pays nothing for the control."""
        state = self.state
        groups, edits = state.cross_alpha.shape[0], state.cross_alpha.shape[1]
        n_cond = groups * (1 + edits)
        n_uncond = q.shape[0] - n_cond
        heads, queries, depth, keys, width = q.shape[1], q.shape[2], q.shape[3], k.shape[2], v.shape[3]
        if is_cross:
            alpha, refine, eq = state.cross_alpha, state.refine_alpha, state.equalizer  # [G, K, T]
            c_src = alpha * eq * refine
            c_own = alpha * eq * (1 - refine) + (1 - alpha)
            if self.blend:
                state.blend_sum.append(self._blend_maps(attn, q[n_uncond:], k[n_uncond:], c_src, c_own, groups, edits))
        else:
            c_src = state.self_replace[:, :, None]  # [G, K, 1]: one weight for every key
            c_own = 1 - c_src
        cond_v = v[n_uncond:].reshape(groups, 1 + edits, heads, keys, width)
        source_v, edit_v = cond_v[:, :1], cond_v[:, 1:]
        own_v = c_own[:, :, None, :, None].to(v.dtype) * edit_v  # [G, K, H, keys, d]
        values = torch.cat([v[:n_uncond], torch.cat([source_v, own_v], dim=1).reshape(n_cond, heads, keys, width)])
        out = F.scaled_dot_product_attention(q, k, values, dropout_p=0.0, is_causal=False, scale=attn.scale)

        mapped_v = c_src[:, :, None, :, None].to(v.dtype) * edit_v
        if is_cross:  # (M_k (c ⊙ V_k))[i] = Σ_j M_k[i, j] c_j V_k[j]; a MatMul, as ONNX Runtime's Einsum
            mapped_v = state.token_mapper[:, :, None].to(v.dtype) @ mapped_v  # dies (SIGFPE) on K = 0
        # explicit sizes, never -1: with K = 0 these tensors are empty and -1 would be 0 / 0
        cond_q = q[n_uncond:].reshape(groups, 1 + edits, heads, queries, depth)
        cond_k = k[n_uncond:].reshape(groups, 1 + edits, heads, keys, depth)
        source_q = cond_q[:, :1].expand(groups, edits, heads, queries, depth).reshape(groups * edits, heads, queries, depth)
        source_k = cond_k[:, :1].expand(groups, edits, heads, keys, depth).reshape(groups * edits, heads, keys, depth)
        from_source = F.scaled_dot_product_attention(source_q, source_k, mapped_v.reshape(groups * edits, heads, keys, width),
                                                     dropout_p=0.0, is_causal=False, scale=attn.scale)
        cond_out = out[n_uncond:].reshape(groups, 1 + edits, heads, queries, width)
        edited = cond_out[:, 1:] + from_source.reshape(groups, edits, heads, queries, width)
        cond_out = torch.cat([cond_out[:, :1], edited], dim=1).reshape(n_cond, heads, queries, width)
        return torch.cat([out[:n_uncond], cond_out])


    def _blend_maps(self, attn, q, k, c_src, c_own, groups: int, edits: int) -> torch.Tensor:
        """The conditional half's maps of this layer averaged over heads, [G, 1+K, Q, T]; after
        control the edit items' are ``c_src ⊙ (A_0 M_k) + c_own ⊙ A_k`` (the control is linear in
        the probabilities, so it commutes with the mean over heads)."""
        probs = self._probabilities(attn, q, k)
        heads, queries, keys = probs.shape[1], probs.shape[2], probs.shape[3]
        maps = probs.reshape(groups, 1 + edits, heads, queries, keys).mean(dim=2)
        if self.blend_maps is BlendMaps.BEFORE_CONTROL:
            return maps
        source = maps[:, :1].expand(groups, edits, queries, keys)  # explicit sizes: K may be 0
        mapped = source @ self.state.token_mapper.to(maps.dtype)  # (A_0 M_k)[q, j] = Σ_i A_0[q, i] M_k[i, j]
        edited = c_src[:, :, None, :].to(maps.dtype) * mapped + c_own[:, :, None, :].to(maps.dtype) * maps[:, 1:]
        return torch.cat([maps[:, :1], edited], dim=1)


def side_after(side: int, factor: int) -> int:
    """Spatial side after ``log2(factor)`` stride-2, pad-1 convolutions (ceil halving)."""
    for _ in range(int(round(math.log2(factor)))):
        side = (side + 1) // 2
    return side


class ControlledUNet(nn.Module):
    """``forward(latents, timestep, text, cross_alpha, token_mapper, refine_alpha, equalizer,
    self_replace) -> (noise, blend_maps)``.

    Shapes: latents [N,4,h,w]; timestep scalar or [N]; text [N,T,D]; cross_alpha, refine_alpha,
    equalizer [G,K,T]; token_mapper [G,K,T,T]; self_replace [G,K]; noise [N,4,h,w];
    blend_maps [G,1+K,T,h_b,w_b] (zeros of side 0 if the model has no layer at the blend size),
    after or before control as ``blend_maps`` says (compiled into an exported graph).
    """

    def __init__(self, unet: nn.Module, self_max_queries: int = 32 * 32, blend_downsample: int = 4,
                 blend_maps: BlendMaps | str = BlendMaps.AFTER_CONTROL):
        super().__init__()
        self.unet = unet
        self.self_max_queries = int(self_max_queries)
        self.blend_maps = BlendMaps(blend_maps)
        self._state = _ControlState()
        self.layers = self._probe_layers()
        cross_factors = sorted({l.downsample for l in self.layers if l.is_cross and l.place != "mid"})
        if not cross_factors:
            raise ValueError("the UNet has no cross-attention layers outside the mid block")
        # a quarter of the latent side (SD v1.5: 16×16 at 512 px); the nearest size this UNet has otherwise
        self.blend_downsample = min(cross_factors, key=lambda f: (abs(math.log2(f / blend_downsample)), f))
        processors = {}
        for layer in self.layers:
            blend = layer.is_cross and layer.place != "mid" and layer.downsample == self.blend_downsample
            processors[layer.name] = ControlledAttnProcessor(self._state, layer, self.self_max_queries, blend,
                                                             self.blend_maps)
        unet.set_attn_processor(dict(processors))  # diffusers pops from the dict it is given
        self.blend_layers = [l.name for l in self.layers if processors[l.name].blend]

    @torch.no_grad()
    def _probe_layers(self) -> list[AttentionLayer]:
        """Measure every attention layer's resolution with one small forward pass."""
        unet = self.unet
        names = list(unet.attn_processors.keys())
        found: dict[str, tuple[bool, int]] = {}

        def recorder(name):
            def call(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
                queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
                found[name] = (encoder_hidden_states is not None, queries)
                return _stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            return call

        side = 4 * 2 ** (len(unet.config.block_out_channels) - 1)
        original = unet.attn_processors
        unet.set_attn_processor({n: recorder(n) for n in names})
        param = next(unet.parameters())
        try:
            unet(
                torch.zeros(1, unet.config.in_channels, side, side, dtype=param.dtype, device=param.device),
                torch.tensor(1, device=param.device),
                encoder_hidden_states=torch.zeros(1, 1, unet.config.cross_attention_dim, dtype=param.dtype, device=param.device),
            )
        finally:
            unet.set_attn_processor(original)
        layers = []
        for name in names:
            is_cross, queries = found[name]
            place = "down" if name.startswith("down_blocks") else "up" if name.startswith("up_blocks") else "mid"
            layers.append(AttentionLayer(name, is_cross, place, int(round(side / math.sqrt(queries)))))
        return layers

    def forward(self, latents, timestep, text, cross_alpha, token_mapper, refine_alpha, equalizer, self_replace):
        state = self._state
        state.active = True
        state.cross_alpha, state.token_mapper = cross_alpha.to(latents.dtype), token_mapper.to(latents.dtype)
        state.refine_alpha, state.equalizer = refine_alpha.to(latents.dtype), equalizer.to(latents.dtype)
        state.self_replace = self_replace.to(latents.dtype)
        state.blend_sum = []
        try:
            noise = self.unet(latents, timestep, encoder_hidden_states=text, return_dict=False)[0]
            maps = state.blend_sum
        finally:
            state.active = False
            state.blend_sum = []
            state.cross_alpha = state.token_mapper = state.refine_alpha = state.equalizer = state.self_replace = None
        groups, items = cross_alpha.shape[0], cross_alpha.shape[1] + 1
        h_b = side_after(latents.shape[2], self.blend_downsample)
        w_b = side_after(latents.shape[3], self.blend_downsample)
        if maps:
            mean = torch.stack(maps, dim=0).mean(dim=0)  # [G, 1+K, Q, T]
            blend_maps = mean.transpose(-1, -2).reshape(groups, items, mean.shape[-1], h_b, w_b)
        else:
            blend_maps = torch.zeros(groups, items, text.shape[1], 0, 0, dtype=noise.dtype, device=noise.device)
        return noise, blend_maps

    def plain(self, latents, timestep, text):
        """The stock UNet (controls off, fused attention everywhere): inversion and null-text."""
        return self.unet(latents, timestep, encoder_hidden_states=text, return_dict=False)[0]


def _stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def neutral_controls(groups: int, edits: int, tokens: int = 77, dtype=torch.float32, device="cpu") -> dict:
    """Controls under which the controlled UNet equals the stock UNet (``prism_rt.unet_batch``'s, as tensors)."""
    from ..unet_batch import neutral_controls as host

    return {name: torch.from_numpy(value).to(device=device, dtype=dtype) for name, value in host(groups, edits, tokens).items()}
