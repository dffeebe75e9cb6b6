"""Vector quantizer with an EMA codebook and restart of dead codes.

After VQ-VAE / VQ-VAE-2 (van den Oord et al., 2017; Razavi et al., 2019) as the paper's
Appendix C uses it: every position of a (B, D, H, W) map is replaced by its nearest of K codebook
vectors. The codebook is not trained by gradients; it follows an exponential moving average of the
encoder outputs assigned to each code (decay 0.99, Laplace-smoothed cluster sizes, as in the
authors' code). So of eq. (1) only the commitment term ||z_e - sg[e]||^2 is left as a loss.

Unlike the authors' code, codes that fall out of use are re-seeded from encoder outputs of the
current batch (as lucidrains/vector-quantize-pytorch does), so the 512 codes do not shrink to the
few the encoder found first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Quantized(NamedTuple):
    """What one quantizer pass yields."""

    quantized: Tensor  # (B, D, H, W) float32 code vectors; gradient passes straight to z
    indices: Tensor  # (B, H, W) int64 code indices
    commitment: Tensor  # () mean over all elements of (z - sg[e])^2: eq. (1), second term
    distance: Tensor  # (B, H, W) ||z - sg[e]||^2 per position (summed over D), for L_dis eq. (3)


class CodebookUsage(NamedTuple):
    perplexity: float  # exp(entropy) of the code histogram: K when uniform, 1 when one code
    used_fraction: float  # fraction of the K codes chosen at least once


class VectorQuantizer(nn.Module):
    """K x D codebook with EMA updates and dead-code restart.

    State lives in buffers (it travels in ``state_dict`` but has no gradient):

    - ``codebook`` (K, D): the code vectors;
    - ``cluster_size`` (K,): EMA of how many positions chose each code per step;
    - ``codebook_sum`` (K, D): EMA of the sum of the encoder outputs that chose each code.

    In training mode a forward pass updates all three; in eval mode it leaves them untouched.
    Under DistributedDataParallel, ``gather`` (set by ``model.distributed.wrap``) brings the
    encoder outputs of every rank's rows, so that every rank updates from the global batch.
    """

    codebook: Tensor
    cluster_size: Tensor
    codebook_sum: Tensor

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_ratio: float = 0.01,
        null_code: bool = False,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.decay = decay
        self.eps = eps
        self.dead_code_ratio = dead_code_ratio
        self.null_code = null_code  # row 0 is the zero vector and never moves
        codebook = torch.randn(codebook_size, code_dim)  # normal init, as the authors' code
        if null_code:
            codebook[0] = 0.0
        self.register_buffer("codebook", codebook)
        # Starting every code at size 1 with sum = vector keeps codebook = sum / size from the
        # first step; zero sizes would divide an unused code by eps and blow it up.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("codebook_sum", codebook.clone())
        # False until the first training step seeds the codebook from data (``_init_from``).
        self.register_buffer("initialized", torch.tensor(False))
        # (b, ...) rows of this process -> (B, ...) rows of the global batch; None: one process.
        self.gather: Callable[[Tensor], Tensor] | None = None

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, decay={self.decay}, "
            f"eps={self.eps}, dead_code_ratio={self.dead_code_ratio}, null_code={self.null_code}"
        )

    def forward(self, z: Tensor, update: Tensor | None = None) -> Quantized:
        """Quantize z (B, D, H, W). In training, ``update`` selects what moves the codebook (EMA,
        data init, dead-code restarts): samples (B,) or positions (B, H, W), bool; ``None``: all.
        """
        if z.dim() != 4 or z.shape[1] != self.code_dim:
            raise ValueError(
                f"expected a (B, {self.code_dim}, H, W) map to quantize, got {tuple(z.shape)}"
            )
        batch, _, height, width = z.shape
        # Distances and EMA sums in fp32 whatever the surrounding autocast says.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)  # (N, D), N = B*H*W
            with torch.no_grad():
                distances = (
                    flat.pow(2).sum(1, keepdim=True)
                    - 2 * flat @ self.codebook.t()
                    + self.codebook.pow(2).sum(1)
                )  # (N, K)
                flat_indices = distances.argmin(1)  # (N,)
            indices = flat_indices.view(batch, height, width)  # (B, H, W)
            codes = self._vectors(indices)  # (B, D, H, W), before this step's EMA update

            if self.training:
                if update is not None and update.shape not in ((batch,), (batch, height, width)):
                    raise ValueError(f"update mask must have shape ({batch},) or "
                                     f"({batch}, {height}, {width}), got {tuple(update.shape)}")
                all_flat, all_indices, all_update = flat.detach(), flat_indices, update
                if self.gather is not None:  # the global batch's rows (model/distributed.py)
                    all_flat = self.gather(all_flat.view(batch, -1, self.code_dim)).flatten(0, 1)
                    all_indices = self.gather(flat_indices.view(batch, -1)).flatten()
                    if update is not None:
                        all_update = self.gather(update.to(z.device, torch.uint8))
                rows = all_flat  # (N, D)
                keep = None
                if all_update is not None:
                    keep = all_update.to(z.device, torch.bool)
                    if keep.dim() == 1:  # by slice
                        keep = keep.repeat_interleave(height * width)
                    keep = keep.reshape(-1)
                    rows = rows[keep]  # (N', D)
                if rows.shape[0]:
                    if not bool(self.initialized):
                        self._init_from(rows)
                        distances = torch.cdist(flat.detach(), self.codebook)  # (N, K)
                        flat_indices = distances.argmin(1)
                        indices = flat_indices.view(batch, height, width)
                        codes = self._vectors(indices)
                        all_indices = (flat_indices if self.gather is None else
                                       torch.cdist(all_flat, self.codebook).argmin(1))
                    self._update(rows, all_indices if keep is None else all_indices[keep])

            residual = (z - codes.detach()).pow(2)  # (B, D, H, W)
            # Straight-through: the value is exactly the code vectors (so re-decoding stored
            # indices reproduces it bit for bit), the gradient is the identity onto z. Same
            # gradient as z + (q - z).detach(), whose value may differ from q in the last bit.
            quantized = codes.detach() + (z - z.detach())
        return Quantized(
            quantized=quantized,
            indices=indices,
            commitment=residual.mean(),
            distance=residual.sum(1),
        )

    @torch.no_grad()
    def _init_from(self, flat: Tensor) -> None:
        """Data-dependent init at the first training step: the K codes become encoder outputs
        of that batch (drawn with replacement when it holds fewer than K positions).

        A codebook drawn from N(0, 1) lies far from the encoder's outputs; in short CPU runs
        nearly every position then chose the same few codes (1-2% of codes in use after 40
        steps) long before a dead code could be restarted (~460 steps at decay 0.99).
        """
        picks = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        if flat.shape[0] >= self.codebook_size:
            picks = torch.randperm(flat.shape[0], device=flat.device)[: self.codebook_size]
        self.codebook.copy_(flat[picks])
        if self.null_code:
            self.codebook[0] = 0.0
        self.cluster_size.fill_(1.0)
        self.codebook_sum.copy_(self.codebook)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, flat: Tensor, flat_indices: Tensor) -> None:
        """One EMA step of the codebook, then restart of dead codes."""
        onehot = F.one_hot(flat_indices, self.codebook_size).type(flat.dtype)  # (N, K)
        counts = onehot.sum(0)  # (K,)
        sums = onehot.t() @ flat  # (K, D); a matmul, deterministic unlike index_add_ on CUDA
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.codebook_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.codebook_sum / smoothed.unsqueeze(1))

        # Dead: used less than dead_code_ratio of the uniform share total / K. One candidate per
        # code is drawn every step (without a host sync on `any()`), kept only where dead.
        share = total / self.codebook_size
        dead = self.cluster_size < self.dead_code_ratio * share  # (K,)
        if self.null_code:
            dead[0] = False
        picks = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        samples = flat[picks]  # (K, D)
        self.codebook.copy_(torch.where(dead.unsqueeze(1), samples, self.codebook))
        # A re-seeded code restarts with the uniform share, as every code did at init.
        self.cluster_size.copy_(torch.where(dead, share, self.cluster_size))
        self.codebook_sum.copy_(torch.where(dead.unsqueeze(1), samples * share, self.codebook_sum))
        if self.null_code:  # the EMA does not move the null code
            self.codebook[0] = 0.0
            self.codebook_sum[0] = 0.0

    @torch.no_grad()
    def reset_null_code(self) -> None:
        """Make row 0 the null code (the zero vector) of a codebook learnt without one."""
        if not self.null_code:
            raise ValueError("this quantizer has no null code")
        self.codebook[0] = 0.0
        self.codebook_sum[0] = 0.0

    def lookup(self, indices: Tensor) -> Tensor:
        """Code vectors of an index map: (B, H, W) int -> (B, D, H, W) float32."""
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"code indices must be integers, got dtype {indices.dtype}")
        if indices.dim() != 3:
            raise ValueError(f"expected (B, H, W) code indices, got shape {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"code indices must lie in [0, {self.codebook_size}), got "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        return self._vectors(indices.long())

    def _vectors(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2)  # (B, D, H, W)

    def usage(self, indices: Tensor) -> CodebookUsage:
        """Perplexity and fraction of codes used over a batch of index maps."""
        counts = torch.bincount(indices.flatten().long(), minlength=self.codebook_size).double()
        probs = counts / counts.sum().clamp_min(1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
        return CodebookUsage(
            perplexity=float(entropy.exp()),
            used_fraction=float((counts > 0).double().mean()),
        )
