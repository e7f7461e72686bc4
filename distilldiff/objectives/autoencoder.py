"""Training the latent space of a latent diffusion model: a KL-regularised autoencoder."""

from __future__ import annotations

from typing import ClassVar, Mapping

from torch import Tensor, nn

from .base import Batch, Objective, Phase


class ReconstructionObjective(Objective):
    """A KL-regularised autoencoder (Rombach et al. 2022, sec. 3 and App. G; Kingma & Welling 2014):

    ``L = mean_d (D(z) - x)^2 + kl_weight * KL(q(z|x) || N(0, I)) / d``, ``z ~ q(z|x) = E(x)``,

    with ``d`` the number of pixels, so both terms are per pixel. A small ``kl_weight`` keeps the
    latents near a Gaussian without blurring the reconstructions (the latent scale is fixed
    afterwards by a scaling factor, as Stable Diffusion's ``scaling_factor``). Rombach et al. add
    perceptual and adversarial terms for natural images; digits need neither.

    Networks: ``vae`` (a diffusers ``AutoencoderKL``, trained).

    Args:
        kl_weight: weight of the KL term.
    """

    name: ClassVar[str] = "reconstruction"
    networks: ClassVar[Mapping[str, str]] = {"vae": "student"}
    needs_real_data: ClassVar[bool] = True

    def __init__(self, kl_weight: float = 1e-6):
        self.kl_weight = float(kl_weight)

    def phases(self) -> list[Phase]:
        return [Phase("reconstruct", "vae")]

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch.real
        vae = nets["vae"]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        d = x[0].numel()
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / d
        loss = mse + self.kl_weight * kl
        return loss, {"loss": loss.detach(), "mse": mse.detach(), "kl": kl.detach()}
