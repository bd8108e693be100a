"""Maximum Mean Discrepancy between two samples (MambaRec sec. 4.2, eq. 7-9).

The paper writes the biased (V-statistic) estimator of eq. 8, whose within-sample terms include
the diagonal ``k(x_i, x_i) = 1``; that adds a positive offset ``~ 2 n_bw / N`` that does not vanish when
the two distributions are equal. We use the unbiased U-statistic (Gretton et al., JMLR 2012):

* ``N = M`` (MambaRec's case: ``x_i`` and ``y_i`` are two views of the *same* item), eq. 3:
  ``1/(N(N-1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)]``. The cross
  term skips its diagonal ``k(x_i, y_i)`` too: a pair is dependent, so keeping it biases the
  estimate (downwards when the views of an item are close) and adds a hidden gradient that pulls
  each item's two views together, whatever the two distributions are. For independent samples of
  equal size the same formula is unbiased as well.
* ``N != M`` (no pairing), Lemma 6: the within-sample means skip the diagonal, the cross mean is
  over all ``N M`` pairs.

Either way ``E[MMD^2_u] = 0`` exactly when both samples come from one distribution (single
estimates may then be slightly negative).
"""

import torch
from torch import nn

from recbole_mm.model.loss.kernels import Bandwidth, gaussian_kernel


def _off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


class MMDLoss(nn.Module):
    """Unbiased ``MMD^2(X, Y)`` with a (multi-bandwidth) Gaussian kernel.

    Args:
        bandwidth: one ``sigma`` (eq. 9, the paper's setting) or a list; with several values the
            kernel is the sum of the Gaussians (``kernels.gaussian_kernel``), which keeps a usable
            gradient when the scale of the representations is not known in advance.

    Shape: ``x: [n, d]``, ``y: [m, d]`` with ``n, m >= 2``; rows ``i`` of ``x`` and ``y`` are taken
    as a pair when ``n == m``; output: scalar.
    """

    def __init__(self, bandwidth: Bandwidth = 1.0):
        super().__init__()
        self.bandwidth = [float(b) for b in torch.as_tensor(bandwidth).flatten().tolist()]
        if not self.bandwidth or min(self.bandwidth) <= 0:
            raise ValueError(f"mmd_bandwidth must be positive, got {bandwidth!r}")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2 or y.shape[0] < 2:
            raise ValueError(f"unbiased MMD needs at least 2 samples per side, got {x.shape[0]} and {y.shape[0]}")
        k_xx = gaussian_kernel(x, bandwidth=self.bandwidth)
        k_yy = gaussian_kernel(y, bandwidth=self.bandwidth)
        k_xy = gaussian_kernel(x, y, bandwidth=self.bandwidth)
        cross = _off_diagonal_mean(k_xy) if x.shape[0] == y.shape[0] else k_xy.mean()
        return _off_diagonal_mean(k_xx) + _off_diagonal_mean(k_yy) - 2.0 * cross
