"""The two-layer position-wise MLP of Transformers and MLP-Mixers, shared by Mamba4Rec's FFN and
MMMLP's token and channel mixers."""

from torch import nn

from recbole_mm.model.layers.dropout import Dropout


def feed_forward(dim: int, inner: int, dropout: float) -> nn.Sequential:
    """``Dropout(W2 Dropout(GELU(W1 x)))``, ``dim -> inner -> dim`` over the last axis (the form of
    Mamba4Rec's ``FeedForward`` and of MLP-Mixer's MLP blocks; residual and norm are the caller's)."""
    return nn.Sequential(nn.Linear(dim, inner), nn.GELU(), Dropout(dropout), nn.Linear(inner, dim),
                         Dropout(dropout))
