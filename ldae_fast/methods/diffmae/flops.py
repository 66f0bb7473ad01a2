"""DiffMAE's training FLOPs per image (or clip): the masked encoder, the decoder, the backward."""

from __future__ import annotations

from ...config import ModelConfig
from ...models.vit import SIGMA_FREQ_DIM
from .config import DiffMAEConfig
from .model import flops_per_image as diffmae_forward


def diffmae_train_flops_per_image(mcfg: ModelConfig, dm: DiffMAEConfig, img_size: int,
                                  mask_ratio: float | None = None, in_chans: int = 3,
                                  adaln: bool = True) -> tuple[float, float]:
    """(forward, training) FLOPs per image of a DiffMAE step that hides `mask_ratio` of the patches.

    With N = (img/p)^2 patches (a clip: (T / tubelet) (img/p)^2), n_keep = int(N (1 - mask_ratio)) visible (the masking's rounding)
    and M = N - n_keep noised, D = p^2 C, encoder width w, decoder width v:
      forward   `model.flops_per_image`: the encoder's blocks on 1 + n_keep tokens only (the
                patch embedding still convolves all N patches), the decoder's on what
                diffmae.decoder_kind attends over ('joint': 1 + n_keep + M tokens in self-attention;
                'cross': M queries against 1 + n_keep keys; 'cross_self' adds self-attention over
                M), each attention's two T_q x T_k matmuls included; with a top-down wiring
                (diffmae.decoder_topdown) one context projection per decoder block instead of one.
      backward  2 x forward, less the input gradients no one asks for: the image into the patch
                embedding (2 N D w), the noised patches into their embedding (2 M D v) and the
                frequency features into the t embedding's first layer (2 x 256 v) get weight
                gradients only. Counted this way the total equals what
                torch.utils.flop_counter measures for a forward and backward (tests/test_bench_diffmae.py).
    adaln=False drops the adaLN modulation maps (per decoder block and the final layer's): the
    timm-block peer, whose blocks take no conditioning, adds t's embedding to its tokens instead.
    Activation-checkpoint recompute is not counted, as in l-DAE's count (methods/ldae/flops.py).
    mask_ratio None: dm.mask_ratio; the decoder's kind and wiring and the tubelet are dm's.
    """
    mask_ratio = dm.mask_ratio if mask_ratio is None else mask_ratio
    p, w, v = mcfg.patch_size, mcfg.width, mcfg.decoder_width
    clip = mcfg.num_frames // dm.tubelet if mcfg.num_frames else 0
    N = (img_size // p) ** 2 * (clip or 1)  # a clip's spacetime patches
    keep = max(1, int(N * (1.0 - mask_ratio)))
    M, D = N - keep, p * p * in_chans
    D_in = D * (dm.tubelet if clip else 1)  # a clip's tubelet is embedded, one slice noised
    fwd = diffmae_forward(mcfg, dm, img_size, in_chans, mask_ratio=mask_ratio)
    if not adaln:
        k = 9 if dm.decoder_kind == "cross_self" else 6
        fwd -= mcfg.decoder_depth * 2 * v * k * v + 2 * v * 2 * v
    no_input_grad = 2 * N * D_in * w + 2 * M * D * v + 2 * SIGMA_FREQ_DIM * v
    return float(fwd), float(3 * fwd - no_input_grad)
