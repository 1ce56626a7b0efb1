"""Re-ttention for diffusers transformers (methods.md section 3): sparse window attention whose
output is statistically reshaped with statistics cached at periodic refresh steps.

    from fastdit.integrations import apply_rettention, revert_rettention
    ctl = apply_rettention(pipe.transformer, "pixart", density=1/32)   # or a RettentionSchedule
    image = pipe(prompt, num_inference_steps=20).images[0]            # one transformer call = one step
    ctl.reset()                                                       # between prompts (also automatic
                                                                      # after num_steps calls)
    print(ctl.memory_bytes())                                         # cached rho + residual
    revert_rettention(pipe.transformer)

Per step of the schedule, every patched attention layer runs
  full     dense attention (F.scaled_dot_product_attention, exactly the unpatched computation);
  refresh  `fastdit.rettention_refresh`: full attention, caching rho (B, H, N) and the residual
           (B, H, N, D) of the window;
  sparse   `fastdit.rettention_sparse`: rho_t * o_window + residual, with rho_t = rho + lam * k for
           the k-th sparse step since the refresh (k = 0, 1, ...; clamped to 1 if clamp=True).
Supported: PixArtTransformer2DModel (self-attention attn1 of every block; window = band over the
raster order, half_width = int(N * density) // 2) and CogVideoXTransformer3DModel (the joint
text + video attention; window = frame_band with half_width = int(frame_len * density) // 2, text
rows/cols dense). Classifier-free guidance in one batch is handled (the state has the batch
dimension); pipelines that call the transformer several times per step pass calls_per_step.
diffusers is imported lazily (only when a processor runs).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastdit.ops.sparse_attention import Window, rettention_refresh, rettention_sparse

__all__ = ["RettentionSchedule", "RettentionController", "apply_rettention", "revert_rettention",
           "PixArtRettentionProcessor", "CogVideoXRettentionProcessor"]

_CONTROLLER = "_fastdit_rettention"


def _project_heads(attn, hidden_states):
    """q, k, v of a diffusers Attention as (B, heads, N, d), with its q/k norms applied."""
    B = hidden_states.shape[0]
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    d = k.shape[-1] // attn.heads
    q, k, v = (t.view(B, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


@dataclasses.dataclass(frozen=True)
class RettentionSchedule:
    """Which steps (0-based) are full, refresh or sparse.

    Steps < full_steps: full attention. From full_steps on, every refresh_every-th step
    (full_steps, full_steps + refresh_every, ...) is a refresh; the others are sparse.
    lam: rho grows by lam after each sparse step; clamp: cap rho at 1 (the authors do not)."""

    num_steps: int
    full_steps: int
    refresh_every: int
    lam: float = 0.04
    clamp: bool = False

    def __post_init__(self):
        for name in ("num_steps", "full_steps", "refresh_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "full_steps" else 1):
                raise ValueError(f"RettentionSchedule: {name} must be an int >= "
                                 f"{0 if name == 'full_steps' else 1}, got {v!r}")
        if not isinstance(self.lam, (int, float)) or self.lam < 0:
            raise ValueError(f"RettentionSchedule: lam must be a number >= 0, got {self.lam!r}")

    def mode(self, step: int) -> str:
        if step < self.full_steps:
            return "full"
        return "refresh" if (step - self.full_steps) % self.refresh_every == 0 else "sparse"

    def modes(self) -> List[str]:
        return [self.mode(s) for s in range(self.num_steps)]

    # The authors' schedules
    @classmethod
    def pixart(cls, **kw) -> "RettentionSchedule":
        """PixArt-alpha/Sigma 1024px, 20 steps: full 0-4, refresh 5, 10, 15, sparse otherwise."""
        return cls(20, 5, 5, **kw)

    @classmethod
    def cogvideox(cls, **kw) -> "RettentionSchedule":
        """CogVideoX-2B, 50 steps: full 0-14, refresh 15, 20, ..., 45, sparse otherwise."""
        return cls(50, 15, 5, **kw)

    @classmethod
    def hunyuan_dit(cls, **kw) -> "RettentionSchedule":
        """Hunyuan-DiT, 50 steps: full 0-9, refresh every 5th step from 10."""
        return cls(50, 10, 5, **kw)


PRESETS = {"pixart": RettentionSchedule.pixart, "pixart-sigma": RettentionSchedule.pixart,
           "pixart-alpha": RettentionSchedule.pixart, "cogvideox": RettentionSchedule.cogvideox,
           "hunyuan-dit": RettentionSchedule.hunyuan_dit}


class RettentionController:
    """Shared step state of one patched transformer: counts transformer calls, knows the mode."""

    def __init__(self, schedule: RettentionSchedule, calls_per_step: int = 1):
        if not isinstance(calls_per_step, int) or calls_per_step < 1:
            raise ValueError(f"apply_rettention: calls_per_step must be an int >= 1, got {calls_per_step!r}")
        self.schedule = schedule
        self.calls_per_step = calls_per_step
        self.processors: List["_RettentionProcessorBase"] = []
        self.handles = []
        self.originals: Dict[str, object] = {}
        self.calls = 0
        self.video_shape = None  # (num_frames, frame_len) for CogVideoX, set per call

    @property
    def step(self) -> int:
        return self.calls // self.calls_per_step

    @property
    def slot(self) -> int:
        return self.calls % self.calls_per_step

    @property
    def mode(self) -> str:
        return self.schedule.mode(self.step)

    def set_step(self, step: int) -> None:
        self.calls = int(step) * self.calls_per_step

    def reset(self) -> None:
        """Start a new prompt: step 0, cached statistics dropped."""
        self.calls = 0
        for p in self.processors:
            p.reset()

    def memory_bytes(self) -> int:
        """Bytes held by the cached rho and residual tensors over all layers."""
        return sum(p.memory_bytes() for p in self.processors)

    def _pre_hook(self, module, args, kwargs):
        if self.calls >= self.schedule.num_steps * self.calls_per_step:
            self.reset()  # a new sampling run
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hs, torch.Tensor) and hs.dim() == 5:  # CogVideoX: (B, F, C, H, W)
            cfg = module.config
            p = cfg.patch_size
            pt = getattr(cfg, "patch_size_t", None) or 1
            f = -(-hs.shape[1] // pt)
            self.video_shape = (f, (hs.shape[3] // p) * (hs.shape[4] // p))

    def _post_hook(self, module, args, kwargs, output):
        self.calls += 1


class _RettentionProcessorBase:
    def __init__(self, controller: RettentionController, density: float, backend: Optional[str],
                 residual_dtype: Optional[torch.dtype]):
        self.controller = controller
        self.density = float(density)
        self.backend = backend
        self.residual_dtype = residual_dtype
        self.state: Dict[int, Dict[str, object]] = {}  # slot -> {rho, residual, k}

    def reset(self) -> None:
        self.state = {}

    def memory_bytes(self) -> int:
        total = 0
        for st in self.state.values():
            for key in ("rho", "residual"):
                t = st.get(key)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def attend(self, q, k, v, window: Window) -> torch.Tensor:
        ctl = self.controller
        mode = ctl.mode
        if mode == "full":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        if mode == "refresh":
            o, rho, res = rettention_refresh(q, k, v, window, backend=self.backend,
                                             residual_dtype=self.residual_dtype)
            self.state[ctl.slot] = dict(rho=rho, residual=res, k=0)
            return o
        st = self.state.get(ctl.slot)
        if st is None:
            raise RuntimeError(f"Re-ttention: sparse step {ctl.step} with no cached statistics; the "
                               f"schedule must refresh first (call controller.reset() between prompts)")
        rho, res = st["rho"], st["residual"]
        if rho.shape != q.shape[:3]:
            raise RuntimeError(f"Re-ttention: the cached statistics are for (B, H, N) = "
                               f"{tuple(rho.shape)} but this step has {tuple(q.shape[:3])} (batch "
                               f"or resolution changed without a refresh; call reset())")
        sched = ctl.schedule
        rho_t = rho + sched.lam * st["k"] if st["k"] else rho
        if sched.clamp:
            rho_t = rho_t.clamp(max=1.0)
        st["k"] += 1
        return rettention_sparse(q, k, v, window, rho_t, res, backend=self.backend)


class PixArtRettentionProcessor(_RettentionProcessorBase):
    """Self-attention (attn1) of a PixArt block; band window over the raster order."""

    def window(self, n: int) -> Window:
        return Window.band(int(n * self.density) // 2)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("PixArtRettentionProcessor patches self-attention only (no "
                                      "encoder_hidden_states, no attention_mask)")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.dim() != 3:
            raise NotImplementedError("PixArtRettentionProcessor: spatial_norm / group_norm / 4-D "
                                      "inputs are not used by PixArt and not supported")
        residual = hidden_states
        B, N, _ = hidden_states.shape
        q, k, v = _project_heads(attn, hidden_states)
        o = self.attend(q, k, v, self.window(N))
        o = o.transpose(1, 2).reshape(B, -1, attn.heads * q.shape[-1]).to(q.dtype)
        o = attn.to_out[0](o)
        o = attn.to_out[1](o)
        if attn.residual_connection:
            o = o + residual
        return o / attn.rescale_output_factor


class CogVideoXRettentionProcessor(_RettentionProcessorBase):
    """Joint text + video attention of a CogVideoX block; frame_band window, text dense."""

    def window(self, text_len: int, n_video: int) -> Window:
        shape = self.controller.video_shape
        if shape is None or shape[0] * shape[1] != n_video:
            raise RuntimeError(f"CogVideoXRettentionProcessor: video token count {n_video} does not "
                               f"match the (frames, frame_len) {shape} seen by the transformer")
        frames, frame_len = shape
        return Window.frame_band(frame_len, frames, int(frame_len * self.density) // 2, text_len)

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                 image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("CogVideoXRettentionProcessor: attention_mask is not supported")
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B, N, _ = hidden_states.shape
        q, k, v = _project_heads(attn, hidden_states)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q[:, :, text_len:] = apply_rotary_emb(q[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                k[:, :, text_len:] = apply_rotary_emb(k[:, :, text_len:], image_rotary_emb)
        o = self.attend(q, k, v, self.window(text_len, N - text_len))
        o = o.transpose(1, 2).reshape(B, -1, attn.heads * q.shape[-1])
        o = attn.to_out[0](o)
        o = attn.to_out[1](o)
        enc, hs = o.split([text_len, o.size(1) - text_len], dim=1)
        return hs, enc


def _targets(transformer: nn.Module):
    name = type(transformer).__name__
    if name == "PixArtTransformer2DModel":
        cls = PixArtRettentionProcessor
    elif name == "CogVideoXTransformer3DModel":
        cls = CogVideoXRettentionProcessor
    else:
        raise TypeError(f"apply_rettention: unsupported transformer {name}; supported: "
                        f"PixArtTransformer2DModel, CogVideoXTransformer3DModel")
    mods = [(n, m) for n, m in transformer.named_modules()
            if n.endswith(".attn1") and hasattr(m, "set_processor")]
    if not mods:
        raise TypeError(f"apply_rettention: found no attn1 attention modules in {name}")
    return cls, mods


def apply_rettention(transformer: nn.Module,
                     preset_or_schedule: Union[str, RettentionSchedule] = "pixart",
                     density: float = 1 / 32, *, backend: Optional[str] = None,
                     residual_dtype: Optional[torch.dtype] = None,
                     calls_per_step: int = 1) -> RettentionController:
    """Installs Re-ttention processors on every attn1 of `transformer` (in place).

    preset_or_schedule: "pixart" / "cogvideox" / "hunyuan-dit" or a RettentionSchedule.
    density: window density (PixArt band half_width = int(N * density) // 2; CogVideoX frame band
    half_width = int(frame_len * density) // 2). backend: passed to the fastdit ops (None: Triton
    on CUDA). residual_dtype: None (q's dtype) or torch.float32. calls_per_step: transformer calls
    per denoising step (2 for pipelines that run the CFG halves as separate calls; each call gets
    its own cached state). Returns the controller (reset(), memory_bytes(), set_step()).
    """
    if getattr(transformer, _CONTROLLER, None) is not None:
        raise RuntimeError("apply_rettention: already applied; call revert_rettention first")
    if isinstance(preset_or_schedule, str):
        if preset_or_schedule not in PRESETS:
            raise ValueError(f"apply_rettention: unknown preset {preset_or_schedule!r}; accepted: "
                             f"{', '.join(sorted(PRESETS))} or a RettentionSchedule")
        schedule = PRESETS[preset_or_schedule]()
    elif isinstance(preset_or_schedule, RettentionSchedule):
        schedule = preset_or_schedule
    else:
        raise TypeError(f"apply_rettention: preset_or_schedule must be a preset name or a "
                        f"RettentionSchedule, got {type(preset_or_schedule).__name__}")
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"apply_rettention: density must be in (0, 1], got {density!r}")
    if residual_dtype not in (None, torch.float32):
        raise ValueError("apply_rettention: residual_dtype must be None (q's dtype) or torch.float32")
    cls, mods = _targets(transformer)
    ctl = RettentionController(schedule, calls_per_step)
    for name, m in mods:
        ctl.originals[name] = m.processor
        proc = cls(ctl, density, backend, residual_dtype)
        ctl.processors.append(proc)
        m.set_processor(proc)
    ctl.handles.append(transformer.register_forward_pre_hook(ctl._pre_hook, with_kwargs=True))
    ctl.handles.append(transformer.register_forward_hook(ctl._post_hook, with_kwargs=True))
    setattr(transformer, _CONTROLLER, ctl)
    return ctl


def revert_rettention(transformer: nn.Module) -> None:
    """Restores the original attention processors and removes the step hooks."""
    ctl = getattr(transformer, _CONTROLLER, None)
    if ctl is None:
        raise RuntimeError("revert_rettention: Re-ttention is not applied to this transformer")
    mods = dict(transformer.named_modules())
    for name, proc in ctl.originals.items():
        mods[name].set_processor(proc)
    for h in ctl.handles:
        h.remove()
    ctl.processors = []
    delattr(transformer, _CONTROLLER)
