"""`fast`: a speed-record-class CIFAR network, written from the published descriptions of the
airbench family (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024).

- The first layer is a 2x2 convolution whose filters are set to whiten the training set's 2x2
  patches (eigenvectors of their covariance, scaled by 1/sqrt(eigenvalue), and their negatives)
  and then frozen; only its bias learns, during the first 3 epochs.
- Three conv groups (conv, max-pool, BN, GELU, conv, BN, GELU), with BatchNorm that learns only
  its bias and keeps fast-moving running statistics, and identity (Dirac) initialised filters.
- A max-pool to 1x1, a bias-free linear layer and a fixed 1/9 output scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (64, 256, 256)


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm that learns only its bias; running statistics follow the recent batches closely
    (PyTorch momentum 0.4), which the lookahead-averaged weights need."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # Identity on the first `cin` output channels: each group starts as a near pass-through.
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.pool, self.norm1 = Conv(cin, cout), nn.MaxPool2d(2), BatchNorm(cout)
        self.conv2, self.norm2 = Conv(cout, cout), BatchNorm(cout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int] = WIDTHS,
                 whiten_kernel: int = 2, whiten_bias_epochs: int = 3):
        super().__init__()
        whiten_width = 2 * in_channels * whiten_kernel ** 2
        self.whiten = nn.Conv2d(in_channels, whiten_width, kernel_size=whiten_kernel, padding=0, bias=True)
        # The whitening filters stay as the data made them; only their bias learns, for the first epochs.
        self.whiten.weight.requires_grad_(False)
        self.whiten_bias_epochs = whiten_bias_epochs
        self.act = nn.GELU()
        self.layers = nn.Sequential(ConvGroup(whiten_width, widths[0]), ConvGroup(widths[0], widths[1]),
                                    ConvGroup(widths[1], widths[2]))
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.act(self.whiten(x)))
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.scale

    def on_epoch_start(self, epoch: int) -> None:
        """Freeze the whitening bias after its first epochs (0-based `epoch`)."""
        self.whiten.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to whiten the 2x2 patches of `images` (normalised training images)."""
        k = self.whiten.kernel_size[0]
        c = images.shape[1]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        cov = patches.T @ patches / len(patches)
        filters = _whitening_filters(cov, eps).view(-1, c, k, k)
        weight = torch.cat([filters, -filters]).to(self.whiten.weight.device, self.whiten.weight.dtype)
        self.whiten.weight.copy_(weight)
        self.whiten.bias.zero_()


def _whitening_filters(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows that whiten data of covariance `cov`, computed in float64 on the CPU (some devices, MPS,
    have no float64 or no eigh) and returned on cov's device in float32."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.to("cpu", torch.float64))
    filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]
    return filters.to(cov.device, torch.float32)
