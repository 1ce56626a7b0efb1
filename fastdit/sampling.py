"""Class-conditional DDPM sampling for DiCo (the authors' setup: 250 steps, learned sigma, linear
betas, classifier-free guidance on the first 3 channels), built on diffusers' schedulers."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch


def _default_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, variance_type="learned_range", clip_sample=False,
                         prediction_type="epsilon")


@torch.no_grad()
def sample_dico(model, class_labels: Union[Sequence[int], torch.Tensor], num_steps: int = 250,
                cfg_scale: float = 1.5, seed: int = 0, *, latent_size: int = 32, scheduler=None,
                guide_channels: Optional[int] = 3, vae=None, progress: bool = True,
                device=None, dtype=None) -> torch.Tensor:
    """Samples latents (B, in_channels, latent_size, latent_size) for `class_labels`.

    scheduler: any diffusers scheduler (default DDPMScheduler, linear betas, learned_range
    variance, the DiT/DiCo setup). cfg_scale > 1 uses classifier-free guidance on
    `guide_channels` leading channels (3, the authors' default; None = all). `vae`: an
    AutoencoderKL instance or a LOCAL directory with its weights (nothing is downloaded); when
    given, decoded images in [-1, 1] are returned instead of latents.
    """
    from tqdm.auto import tqdm

    if num_steps < 1:
        raise ValueError(f"sample_dico: num_steps must be >= 1, got {num_steps}")
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("sample_dico: class_labels is empty")
    n = labels.numel()
    scheduler = scheduler or _default_scheduler()
    scheduler.set_timesteps(num_steps, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n, model.in_channels, latent_size, latent_size)
    z = (torch.randn(shape, generator=gen) * getattr(scheduler, "init_noise_sigma", 1.0)).to(device, dtype)
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    else:
        y = labels
    was_training = model.training
    model.eval()
    try:
        for t in tqdm(scheduler.timesteps, disable=not progress, desc="DiCo sampling"):
            zin = torch.cat([z, z]) if use_cfg else z
            zin = scheduler.scale_model_input(zin, t)
            tt = torch.full((zin.shape[0],), int(t), device=device, dtype=torch.long)
            if use_cfg:
                out = model.forward_with_cfg(zin, tt, y, cfg_scale, guide_channels=guide_channels)[:n]
            else:
                out = model(zin, tt, y)
            z = scheduler.step(out.float(), t, z.float(), generator=gen).prev_sample.to(dtype)
    finally:
        model.train(was_training)
    if vae is None:
        return z
    if isinstance(vae, (str, os.PathLike)):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(os.fspath(vae), local_files_only=True).to(device)
    return vae.decode(z.to(vae.dtype) / 0.18215).sample
