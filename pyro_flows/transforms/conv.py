r"""Invertible and emerging convolutions on ``(C, H, W)`` events, and the squeeze (space-to-depth) layer.

* [`InvertibleConv1x1`][pyro_flows.transforms.conv.InvertibleConv1x1] (Glow): a learned channel mixing $W = P L U$
  applied at every pixel;
* [`EmergingConv2d`][pyro_flows.transforms.conv.EmergingConv2d] (Hoogeboom et al. 2019): a $k \times k$ convolution made
  invertible as the composition of two masked autoregressive convolutions (causal, then anti-causal in raster order);
* [`Squeeze`][pyro_flows.transforms.conv.Squeeze]: space-to-depth reshaping $(C, H, W) \to (C f^2, H/f, W/f)$, the
  building block of multi-scale architectures (it changes the event shape, so it is not in `image_registry`, whose flows
  keep their event shape).

The two convolutions are registered in `image_registry` as
``"conv1x1"`` and ``"emerging_conv"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import constraints

from pyro_flows.transforms._utils import RAW_ONE, positive
from pyro_flows.transforms.base import Flow, ParametricFlow, as_event_shape, check_tensor, expand_log_det
from pyro_flows.transforms.linear import PermutationSpec, lu_factors, make_permutation
from pyro_flows.transforms.registry import image_registry

__all__ = ["EmergingConv2d", "InvertibleConv1x1", "Squeeze"]

IMAGE_EVENT_DIM = 3
_IMAGES = constraints.independent(constraints.real, IMAGE_EVENT_DIM)


def image_event_shape(event_shape: Sequence[int]) -> torch.Size:
    """Validate and return a ``(C, H, W)`` event shape.

    Raises:
        ValueError: if ``event_shape`` is not three positive sizes.

    """
    shape = as_event_shape(event_shape)
    if len(shape) != IMAGE_EVENT_DIM:
        raise ValueError(f"image flows need a (C, H, W) event shape, got {tuple(shape)}")
    return shape


def _as_images(x: Tensor) -> Tensor:
    """Flatten the batch dimensions of ``(..., C, H, W)`` into one (reshape back with ``x.shape``)."""
    return x.reshape(-1, *x.shape[-IMAGE_EVENT_DIM:])


@image_registry.register("conv1x1")
class InvertibleConv1x1(ParametricFlow):
    r"""Glow's invertible 1×1 convolution, LU-parameterized (Kingma & Dhariwal 2018).

    At every pixel the channels are mixed by the same matrix: $y_{:,h,w} = W x_{:,h,w}$, with
    $W = P L U$: $P$ a fixed permutation (buffer), $L$ unit lower-triangular, $U$
    upper-triangular with positive diagonal $U_{ii} = \mathrm{softplus}(\rho_i) + 10^{-3}$ (invertible for
    any raw parameters; shared with [`LU`][pyro_flows.transforms.linear.LU]).

    * log-det: $H \cdot W \cdot \sum_i \log U_{ii}$;
    * forward: one 1×1 convolution (a GEMM over the flattened pixels), O(C²) per pixel (plus O(C³) per call
      to form $W$);
    * inverse (closed form): the 1×1 convolution with $W^{-1} = U^{-1} L^{-1} P^\top$, formed by two
      C×C triangular solves per call, then O(C²) per pixel.

    Starts at the channel permutation $P$. Amortized with ``context_dim > 0`` (one matrix per context).

    Reference: D. P. Kingma & P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.

    Args:
        event_shape: ``(C, H, W)``.
        permutation: ``"random"`` (default), ``"reverse"`` or explicit channel indices for $P$.
        generator: random generator for the permutation.
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = InvertibleConv1x1((3, 4, 4))
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-5)
        True

    """

    domain = codomain = _IMAGES

    def __init__(
        self,
        event_shape: Sequence[int],
        permutation: PermutationSpec = "random",
        generator: torch.Generator | None = None,
        **context: Any,
    ) -> None:
        shape = image_event_shape(event_shape)
        super().__init__(shape, **context)
        channels = shape[0]
        self.channels = channels
        perm = make_permutation(channels, permutation, generator)
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))
        self.add_raw_param("lower", torch.zeros(channels * (channels - 1) // 2))
        self.add_raw_param("upper", torch.zeros(channels * (channels - 1) // 2))
        self.add_raw_param("raw_diag", torch.full((channels,), RAW_ONE))

    def weight(self, params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The C×C mixing matrix $W = PLU$ and the diagonal of $U$ (batched like the parameters)."""
        params = self.raw_params() if params is None else params
        lower, upper, diag = lu_factors(params["lower"], params["upper"], params["raw_diag"], self.channels)
        return (lower @ upper)[..., self.permutation, :], diag

    @staticmethod
    def _mix(matrix: Tensor, x: Tensor) -> Tensor:
        """Apply the C×C ``matrix`` to the channels of every pixel: one broadcast GEMM over ``(..., C, H·W)``."""
        return torch.matmul(matrix, x.flatten(-2)).reshape(x.shape)

    def _log_det(self, diag: Tensor, x: Tensor) -> Tensor:
        height, width = self.event_shape[1:]
        return expand_log_det(height * width * diag.log().sum(-1), x, IMAGE_EVENT_DIM)

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        matrix, diag = self.weight(params)
        return self._mix(matrix, x), self._log_det(diag, x)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper, diag = lu_factors(params["lower"], params["upper"], params["raw_diag"], self.channels)
        eye = torch.eye(self.channels, dtype=y.dtype, device=y.device)
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        lu_inv = torch.linalg.solve_triangular(upper, lower_inv, upper=True)
        x = self._mix(lu_inv[..., self.permutation], y)
        return x, self._log_det(diag, x)


def _autoregressive_masks(channels: int, kernel_size: int) -> tuple[Tensor, Tensor]:
    """Masks of the free (non-diagonal) kernel entries of a causal and an anti-causal convolution.

    With the raster ordering of ``(h, w, c)``, output ``(h, w, i)`` of the causal convolution may read inputs at
    earlier pixels (all channels) and at its own pixel channels ``j < i``; the anti-causal mask is its flip
    (later pixels, channels ``j > i``). The centre diagonal is excluded: it is parameterized separately.
    """
    centre = kernel_size // 2
    position = torch.arange(kernel_size * kernel_size).reshape(kernel_size, kernel_size)
    centre_index = centre * kernel_size + centre
    before = (position < centre_index).expand(channels, channels, kernel_size, kernel_size).clone()
    before[:, :, centre, centre] = torch.ones(channels, channels, dtype=torch.bool).tril(-1)
    return before, before.flip(0, 1, 2, 3)


@image_registry.register("emerging_conv")
class EmergingConv2d(ParametricFlow):
    r"""Emerging $k \times k$ convolution (Hoogeboom, van den Berg & Welling 2019).

    $y = K_2 \star (K_1 \star x) + b$, where $K_1 \star$ and $K_2 \star$ are zero-padded
    ("same") convolutions whose kernels are masked to be autoregressive in the raster ordering of
    $(h, w, c)$: $K_1$ reads only earlier pixels and, at the centre, channels $j \le i$
    (lower-triangular Jacobian); $K_2$ is the flipped mask (later pixels, channels $j \ge i$,
    upper-triangular Jacobian). Their composition, the emerging convolution, is a dense (non-triangular) map whose
    receptive field contains the full $k \times k$ window of a standard convolution (and reaches
    $2k - 1$ pixels wide along the rows). The centre diagonals are positive,
    $d = \mathrm{softplus}(\rho) + 10^{-3}$, so the map is invertible for any raw parameters.

    * log-det: the Jacobians are triangular with the centre diagonals repeated at every pixel,
      $H \cdot W \cdot (\sum_c \log d^{(1)}_c + \sum_c \log d^{(2)}_c)$;
    * forward: two convolutions, O(k² C²) per pixel, fully parallel;
    * inverse: exact, by two sequential substitutions, $K_2$ from the last pixel backwards then
      $K_1$ from the first pixel forwards; each pixel solves a C×C triangular system after subtracting the
      contributions of already-solved neighbours. The flops match the forward (O(k² C²) per pixel) but the
      2·H·W pixel steps run one after another (a Python loop of O(1) tensor operations each), so the inverse is
      much slower than the forward for large images: scoring data (``log_prob``, which inverts) is the slow
      direction, sampling the fast one (``fast_direction = "forward"``).

    Starts at the identity (zero off-centre kernels, unit centre diagonals). Parameters are unbatched (one
    kernel pair for all images).

    Reference: E. Hoogeboom, R. van den Berg & M. Welling, "Emerging Convolutions for Generative Normalizing
    Flows", ICML 2019.

    Args:
        event_shape: ``(C, H, W)``.
        kernel_size: odd kernel size k (default 3).
        bias: learn a per-channel offset (default ``True``).

    Examples:
        >>> import torch
        >>> flow = EmergingConv2d((2, 4, 4))
        >>> x = torch.randn(3, 2, 4, 4)
        >>> torch.allclose(flow(x), x)
        True

    """

    domain = codomain = _IMAGES
    has_conditional = False

    def __init__(self, event_shape: Sequence[int], kernel_size: int = 3, bias: bool = True) -> None:
        shape = image_event_shape(event_shape)
        super().__init__(shape)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        channels = shape[0]
        self.channels = channels
        self.kernel_size = kernel_size
        causal, anti_causal = _autoregressive_masks(channels, kernel_size)
        self.register_buffer("causal_mask", causal, persistent=False)
        self.register_buffer("anti_causal_mask", anti_causal, persistent=False)
        kernel_shape = (channels, channels, kernel_size, kernel_size)
        self.add_raw_param("kernel1", torch.zeros(kernel_shape))
        self.add_raw_param("raw_diag1", torch.full((channels,), RAW_ONE))
        self.add_raw_param("kernel2", torch.zeros(kernel_shape))
        self.add_raw_param("raw_diag2", torch.full((channels,), RAW_ONE))
        if bias:
            self.add_raw_param("bias", torch.zeros(channels))

    def _kernel(self, raw: Tensor, raw_diag: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        centre = self.kernel_size // 2
        diag = positive(raw_diag)
        centre_diag = F.pad(torch.diag(diag)[:, :, None, None], (centre, centre, centre, centre))
        kernel = raw * mask + centre_diag
        return kernel, diag

    def masked_kernels(self, params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The effective kernels $K_1, K_2$ (masks and positive centre diagonals applied) and diagonals."""
        params = self.raw_params() if params is None else params
        if params["kernel1"].dim() != 4:
            raise ValueError("EmergingConv2d does not support batched (amortized) parameters")
        kernel1, diag1 = self._kernel(params["kernel1"], params["raw_diag1"], self.causal_mask)
        kernel2, diag2 = self._kernel(params["kernel2"], params["raw_diag2"], self.anti_causal_mask)
        return kernel1, kernel2, diag1, diag2

    def _log_det(self, diag1: Tensor, diag2: Tensor, x: Tensor) -> Tensor:
        height, width = self.event_shape[1:]
        log_det = height * width * (diag1.log().sum(-1) + diag2.log().sum(-1))
        return expand_log_det(log_det, x, IMAGE_EVENT_DIM)

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        kernel1, kernel2, diag1, diag2 = self.masked_kernels(params)
        images = _as_images(x)
        padding = self.kernel_size // 2
        y = F.conv2d(F.conv2d(images, kernel1, padding=padding), kernel2, padding=padding).reshape(x.shape)
        if "bias" in params:
            y = y + params["bias"][:, None, None]
        return y, self._log_det(diag1, diag2, x)

    def _solve(self, kernel: Tensor, rhs: Tensor, backwards: bool) -> Tensor:
        """Solve ``kernel ⋆ x = rhs`` for an autoregressive kernel by substitution, pixel by pixel.

        ``rhs`` is ``(N, C, H, W)``. ``backwards`` walks the pixels from last to first (anti-causal kernel).
        Differentiable: solved pixels are kept as separate tensors, never written in place.
        """
        k = self.kernel_size
        centre = k // 2
        height, width = rhs.shape[-2:]
        centre_inv = torch.linalg.solve_triangular(
            kernel[:, :, centre, centre],
            torch.eye(self.channels, dtype=rhs.dtype, device=rhs.device),
            upper=backwards,
        )
        sign = 1 if backwards else -1
        offsets = [(a, b) for a in range(k) for b in range(k) if sign * ((a - centre) * k + (b - centre)) > 0]
        pixels = [(h, w) for h in range(height) for w in range(width)]
        solved: dict[tuple[int, int], Tensor] = {}
        for h, w in reversed(pixels) if backwards else pixels:
            residual = rhs[:, :, h, w]
            neighbours = [(a, b) for a, b in offsets if 0 <= h + a - centre < height and 0 <= w + b - centre < width]
            if neighbours:
                values = torch.stack([solved[(h + a - centre, w + b - centre)] for a, b in neighbours], dim=1)
                weights = torch.stack([kernel[:, :, a, b] for a, b in neighbours], dim=0)
                residual = residual - torch.einsum("nmj,mij->ni", values, weights)
            solved[(h, w)] = residual @ centre_inv.transpose(0, 1)
        return torch.stack([solved[p] for p in pixels], dim=-1).reshape(rhs.shape)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        kernel1, kernel2, diag1, diag2 = self.masked_kernels(params)
        if "bias" in params:
            y = y - params["bias"][:, None, None]
        images = _as_images(y)
        x = self._solve(kernel1, self._solve(kernel2, images, backwards=True), backwards=False).reshape(y.shape)
        return x, self._log_det(diag1, diag2, x)


@image_registry.register("squeeze")
class Squeeze(Flow):
    r"""Space-to-depth: $(C, H, W) \to (C f^2, H/f, W/f)$ (Dinh et al. 2017, Real NVP; Glow).

    Each $f \times f$ block of pixels becomes $f^2$ channels: output channel
    $c f^2 + i f + j$ at $(h, w)$ is input channel $c$ at $(h f + i, w f + j)$.

    * log-det: 0 (a permutation of the coordinates);
    * inverse (closed form): depth-to-space, the same reshape undone; both directions are O(1) per element.

    The event shape changes, so
    [`forward_shape`][pyro_flows.transforms.conv.Squeeze.forward_shape]/[`inverse_shape`][pyro_flows.transforms.conv.Squeeze.inverse_shape]
    report it to Pyro (e.g. for ``TransformedDistribution``) and the inverse validates inputs of `output_shape`.

    Args:
        event_shape: input ``(C, H, W)``; H and W must be divisible by ``factor``.
        factor: block size f (default 2).

    Examples:
        >>> import torch
        >>> squeeze = Squeeze((3, 4, 6))
        >>> y = squeeze(torch.randn(5, 3, 4, 6))
        >>> y.shape, squeeze.inv(y).shape
        (torch.Size([5, 12, 2, 3]), torch.Size([5, 3, 4, 6]))

    """

    domain = codomain = _IMAGES
    has_conditional = False

    def __init__(self, event_shape: Sequence[int], factor: int = 2) -> None:
        shape = image_event_shape(event_shape)
        super().__init__(shape)
        channels, height, width = shape
        if factor < 1 or height % factor or width % factor:
            raise ValueError(
                f"Squeeze needs height and width divisible by factor={factor}, got event shape {tuple(shape)}"
            )
        self.factor = factor
        self.output_shape = torch.Size((channels * factor * factor, height // factor, width // factor))

    def _check_shape(self, shape: Sequence[int], expected: torch.Size, what: str) -> None:
        if len(shape) < IMAGE_EVENT_DIM or torch.Size(shape[-IMAGE_EVENT_DIM:]) != expected:
            raise ValueError(f"Squeeze expects {what} ending in {tuple(expected)}, got shape {tuple(shape)}")

    def forward_shape(self, shape: Sequence[int]) -> torch.Size:
        """Shape of the output for an input of ``shape`` (``batch + (C, H, W)``)."""
        self._check_shape(shape, self.event_shape, "input shapes")
        return torch.Size(shape[:-IMAGE_EVENT_DIM]) + self.output_shape

    def inverse_shape(self, shape: Sequence[int]) -> torch.Size:
        """Shape of the input for an output of ``shape`` (``batch + (C f², H/f, W/f)``)."""
        self._check_shape(shape, self.output_shape, "output shapes")
        return torch.Size(shape[:-IMAGE_EVENT_DIM]) + self.event_shape

    def _evaluate(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if inverse:
            check_tensor(v, self.output_shape, None, "Squeeze (inverse)")
            return self._inverse_and_log_det(v, None)
        check_tensor(v, self.event_shape, None, "Squeeze")
        return self._forward_and_log_det(v, None)

    def _forward_and_log_det(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        f = self.factor
        channels, height, width = self.event_shape
        batch = x.shape[:-IMAGE_EVENT_DIM]
        n = len(batch)
        blocks = x.reshape(*batch, channels, height // f, f, width // f, f)
        order = [*range(n), n, n + 2, n + 4, n + 1, n + 3]
        y = blocks.permute(order).reshape(*batch, *self.output_shape)
        return y, x.new_zeros(batch)

    def _inverse_and_log_det(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        f = self.factor
        channels, height, width = self.event_shape
        batch = y.shape[:-IMAGE_EVENT_DIM]
        n = len(batch)
        blocks = y.reshape(*batch, channels, f, f, height // f, width // f)
        order = [*range(n), n, n + 3, n + 1, n + 4, n + 2]
        x = blocks.permute(order).reshape(*batch, *self.event_shape)
        return x, y.new_zeros(batch)

    def extra_repr(self) -> str:
        """Show the input and output event shapes in ``repr``."""
        return f"event_shape={tuple(self.event_shape)}, output_shape={tuple(self.output_shape)}, factor={self.factor}"
