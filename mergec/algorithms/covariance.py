"""Streaming joint moments of two models' features, for the correlation that ZipIt! matches on.

``collect-stats`` runs calibration data through both models and, for every matched pair of
spaces, feeds the features of A and B at the probe node to a :class:`JointMoments`. Only the
count, the sum and the sum of outer products of the concatenated vector ``[x_a; x_b]`` are kept,
in float64, so memory is O(d^2) whatever the amount of data, and accumulators from several
batches, processes or hosts add up to exactly the statistics of one pass over all the data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from mergec.algorithms.distributed import all_reduce_sum_
from mergec.errors import MergeError

# A unit whose variance is below this fraction of its mean square is treated as constant ("dead"):
# float64 cancellation in E[x^2] - E[x]^2 leaves noise of about 1e-16 relative, never zero.
DEAD_UNIT_RELATIVE_VARIANCE = 1e-12


def _feature_axis(x: Tensor, axis: int, caller: str) -> int:
    if x.dim() == 0:
        raise MergeError(f"{caller}: a scalar has no feature axis")
    if not -x.dim() <= axis < x.dim():
        raise MergeError(
            f"{caller}: axis {axis} is out of range for a tensor of shape {tuple(x.shape)}"
        )
    return axis % x.dim()


def feature_rows(x: Tensor, axis: int) -> Tensor:
    """Move the feature ``axis`` last and flatten every other axis into samples.

    A conv feature map ``[batch, channels, height, width]`` with ``axis=1`` becomes
    ``[batch * height * width, channels]``: every pixel is a sample of the channel space, as in
    ZipIt! and Git Re-Basin's activation matching.

    >>> feature_rows(torch.zeros(2, 3, 4, 5), axis=1).shape
    torch.Size([40, 3])
    """
    features = x.movedim(_feature_axis(x, axis, "feature_rows"), -1)
    return features.reshape(-1, features.shape[-1])


def feature_view(x: Tensor, axis: int) -> Tensor:
    """``x`` as ``[before, features, after]``: the axes before and after the feature ``axis``
    flattened, each position a sample. A view when ``x`` is contiguous, so a conv feature map
    is observed without moving its channels last.

    >>> feature_view(torch.zeros(2, 3, 4, 5), axis=1).shape
    torch.Size([2, 3, 20])
    """
    axis = _feature_axis(x, axis, "feature_view")
    before = math.prod(x.shape[:axis])
    return x.reshape(before, x.shape[axis], -1)


# Samples per float32 product in JointMoments.update; the chunks' products add in float64.
# One product over 10^5-10^6 samples accumulates float32 rounding to several 1e-6 of a variance.
PRODUCT_CHUNK = 1 << 14


ORIGIN_SAMPLES = 256  # samples (rows, positions) of the first batch averaged for the origin
PRODUCT_BLOCK = 512  # feature rows per block of the scatter (blocks below the diagonal mirror)


def _upper_blocks(dims: tuple[int, ...]) -> list[tuple[slice, slice]]:
    """The (rows, columns) blocks on and above the diagonal of the ``[d, d]`` joint matrix of
    models of widths ``dims``: each model's rows in blocks of at most ``PRODUCT_BLOCK``."""
    edges, start = [], 0
    for width in dims:
        bounds = [*range(start, start + width, PRODUCT_BLOCK), start + width]
        edges += [slice(low, high) for low, high in zip(bounds, bounds[1:])]
        start += width
    return [(rows, columns) for i, rows in enumerate(edges) for columns in edges[i:]]


class Scratch:
    """One reusable buffer per dtype and device for :meth:`JointMoments.update`: the spaces
    and batches of a statistics pass share it rather than each filling fresh memory (on a CPU,
    a new large tensor costs a page fault per 4 KiB). Holds the largest size asked for until
    dropped."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat tensor of ``numel`` elements (uninitialised; valid until the next call)."""
        key = (dtype, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


class JointMoments:
    """Count, sum and sum of outer products of ``[x_a; x_b]`` (of ``[x_1; ...; x_N]`` for N
    models: ``JointMoments(d_1, d_2, d_3)``), accumulated in float64. One accumulator holds the
    statistics of every pair of models (:meth:`pair`).

    Example:
        >>> moments = JointMoments(dim_a=3, dim_b=2)
        >>> x = torch.randn(100, 3)
        >>> moments.update(x, x[:, :2])
        >>> moments.correlation().shape
        torch.Size([5, 5])
    """

    def __init__(self, dim_a: int, dim_b: int, *more: int,
                 device: torch.device | str | None = None) -> None:
        self.dims = (dim_a, dim_b, *more)
        if any(dim < 1 for dim in self.dims):
            raise MergeError(f"JointMoments: feature widths must be positive, got {self.dims}")
        dim = sum(self.dims)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        # Batches add their scatter about a fixed origin (the first batch's shift), block
        # upper triangle only; reading sum_outer completes it in place (see update)
        self._sum_outer: Tensor | None = None
        self._origin: Tensor | None = None
        self._about_origin = False  # _sum_outer holds sum (x - o)(x - o)^T, upper blocks

    @property
    def sum_outer(self) -> Tensor:
        """Sum of outer products of ``[x_1; ...; x_N]``, ``[d, d]`` float64."""
        if self._sum_outer is None:
            dim = self.sum.shape[0]
            self._sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        if self._about_origin:
            self._shift_origin(mirror=True, sign=1.0)
        return self._sum_outer

    @sum_outer.setter
    def sum_outer(self, value: Tensor) -> None:
        self._sum_outer, self._about_origin = value, False

    def _shift_origin(self, mirror: bool, sign: float) -> None:
        """In place: sum (x - o)(x - o)^T (upper blocks; ``mirror`` completes the lower ones)
        to sum x x^T for ``sign=1``, and back for ``sign=-1``. sum x x^T = C + o r^T + r o^T
        + n o o^T for the sum r of x - o: o u^T + u o^T with u = r + n o / 2."""
        matrix, origin = self._sum_outer, self._origin
        if mirror:
            for rows, columns in _upper_blocks(self.dims):
                if rows != columns:
                    matrix[columns, rows] = matrix[rows, columns].T
        half = self.sum - self.count * origin + (self.count / 2) * origin
        matrix.addr_(origin, half, alpha=sign).addr_(half, origin, alpha=sign)
        self._about_origin = sign < 0

    @property
    def dim_a(self) -> int:
        return self.dims[0]

    @property
    def dim_b(self) -> int:
        return self.dims[1]

    @property
    def offsets(self) -> tuple[int, ...]:
        """Where each model's features start in ``[x_1; ...; x_N]``."""
        return tuple(sum(self.dims[:model]) for model in range(len(self.dims)))

    @property
    def device(self) -> torch.device:
        return self.sum.device

    def update(self, *features: Tensor, scratch: Scratch | None = None) -> None:
        """Add the samples of one batch: ``x_a`` is ``[n, dim_a]`` and ``x_b`` ``[n, dim_b]``
        (rows, see :func:`feature_rows`), or both ``[n, dim, m]`` (see :func:`feature_view`:
        ``n * m`` samples, as a conv feature map's pixels are); one such tensor per model.

        The features minus a fixed origin (the mean of the first batch's first samples) are
        written, features first, into one ``[d, samples]`` buffer (``scratch``'s, reused
        across spaces and batches, else a new one); its products with itself, in the features'
        precision (float32 at least) over chunks of samples and only for the blocks on and
        above the diagonal, are added to a float64 accumulator, completed and moved back to
        the origin 0 when ``sum_outer`` is read. The origin keeps the products' rounding
        relative to the spread, not to the mean square: float32 moments of 10^5 samples agree
        with a float64 computation to about 1e-6 of the largest variance, the mean to float32
        rounding (tested), and a constant unit stays exactly constant.
        """
        self._check_batch(features)
        compute = functools.reduce(torch.promote_types, [x.dtype for x in features],
                                   torch.float32)
        views = [x.detach()[:, :, None] if x.dim() == 2 else x.detach() for x in features]
        batch, positions = views[0].shape[0], views[0].shape[2]
        dim, samples = sum(self.dims), batch * positions
        if samples == 0:  # nothing to add (and no origin to take from it)
            return
        if self._origin is None:
            first = max(1, min(batch, -(-ORIGIN_SAMPLES // positions)))
            self._origin = torch.cat([v[:first].to(torch.float64).mean(dim=(0, 2)).to(compute)
                                      for v in views]).to(self.device, torch.float64)
        if not self._about_origin and self._sum_outer is not None:
            # a completed matrix (read, merged into or set): about the origin again
            self._shift_origin(mirror=False, sign=-1.0)
        origin = self._origin.to(views[0].device, compute)
        shape = (dim, batch, positions)
        buffer = (scratch.take(math.prod(shape), compute, views[0].device) if scratch
                  else torch.empty(shape, dtype=compute, device=views[0].device)).view(shape)
        for view, start, width in zip(views, self.offsets, self.dims):
            torch.sub(view.transpose(0, 1), origin[start:start + width, None, None],
                      out=buffer[start:start + width])
        flat = buffer.view(dim, samples)
        if self._sum_outer is None:
            self._sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        self._about_origin = True
        blocks = _upper_blocks(self.dims)
        for chunk in flat.split(PRODUCT_CHUNK, dim=1):  # float32 sums stay short
            for rows, columns in blocks:
                self._sum_outer[rows, columns] += (chunk[rows] @ chunk[columns].T).to(
                    self.device)
        self.count += samples
        self.sum += flat.sum(dim=1).to(self.device, torch.float64) + samples * self._origin

    def _check_batch(self, features: tuple[Tensor, ...]) -> None:
        if len(features) != len(self.dims):
            raise MergeError(f"JointMoments.update: needs the features of {len(self.dims)} "
                             f"models, got {len(features)}")
        for index, (x, dim) in enumerate(zip(features, self.dims)):
            if x.dim() not in (2, 3) or x.shape[1] != dim:
                name = ("x_a", "x_b")[index] if len(self.dims) == 2 else f"model {index}'s"
                raise MergeError(
                    f"JointMoments.update: {name} must be [samples, {dim}] or "
                    f"[samples, {dim}, positions], got {tuple(x.shape)}; use feature_rows(x, "
                    "axis) or feature_view(x, axis) to bring the feature axis in place"
                )
        first = features[0]
        for x in features[1:]:
            if x.shape[0] != first.shape[0] or x.shape[2:] != first.shape[2:]:
                raise MergeError(
                    f"JointMoments.update: x_a is {tuple(first.shape)} but x_b is "
                    f"{tuple(x.shape)}; both models must see the same inputs"
                )

    def pair(self, first: int, second: int) -> JointMoments:
        """The joint moments of models ``first`` and ``second`` alone, read from this
        accumulator (no data is needed again)."""
        index = torch.cat([torch.arange(self.dims[m], device=self.device) + self.offsets[m]
                           for m in (first, second)])
        result = JointMoments(self.dims[first], self.dims[second], device=self.device)
        result.count = self.count.clone()
        result.sum = self.sum[index]
        result.sum_outer = self.sum_outer[index[:, None], index[None, :]]
        return result

    def linear(self, matrix: Tensor, dims: tuple[int, ...]) -> JointMoments:
        """The joint moments of ``matrix @ [x_1; ...; x_N]`` (``sum(dims)`` rows), read as the
        features of ``len(dims)`` models of widths ``dims``: statistics of linear maps of the
        features (the mean of several models' aligned features) need no data again.

        >>> moments = JointMoments(2, 2)
        >>> x = torch.randn(20, 2)
        >>> moments.update(x, 3 * x)
        >>> halves = moments.linear(torch.eye(4)[[0, 1, 0, 1]] / 2 + torch.eye(4)[[2, 3, 2, 3]]
        ...                         / 6, (2, 2))
        >>> torch.allclose(halves.correlation()[:2, 2:], moments.correlation()[:2, :2])
        True
        """
        matrix = matrix.to(self.sum_outer)
        if matrix.shape != (sum(dims), self.sum.shape[0]):
            raise MergeError(f"JointMoments.linear: needs a {sum(dims)} × {self.sum.shape[0]} "
                             f"matrix for widths {dims}, got {tuple(matrix.shape)}")
        result = JointMoments(*dims, device=self.device)
        result.count = self.count.clone()
        result.sum = matrix @ self.sum
        result.sum_outer = matrix @ self.sum_outer @ matrix.T
        return result

    def merge(self, other: JointMoments) -> None:
        """Add ``other``'s accumulators into this one (the statistics of both sample sets)."""
        if other.dims != self.dims:
            raise MergeError(f"JointMoments.merge: widths differ, {self.dims} vs {other.dims}")
        outer = self.sum_outer  # completed while count and sum are still its own
        outer += other.sum_outer.to(self.device)
        self.count += other.count.to(self.device)
        self.sum += other.sum.to(self.device)

    def all_reduce(self) -> None:
        """Sum the accumulators over all processes if torch.distributed is initialised."""
        all_reduce_sum_([self.count, self.sum, self.sum_outer])

    def _require_samples(self) -> None:
        if self.count.item() == 0:
            raise MergeError(
                "JointMoments: no samples were accumulated; run calibration data first"
            )

    @property
    def mean(self) -> Tensor:
        """Mean of ``[x_a; x_b]``, shape ``[dim_a + dim_b]``."""
        self._require_samples()
        return self.sum / self.count

    def covariance(self) -> Tensor:
        """Population covariance (divided by the count) of ``[x_a; x_b]``, ``[d, d]``.

        Computed in place on two ``[d, d]`` buffers (a wide space's float64 matrix is hundreds
        of megabytes), with the same operations, in the same order, as
        ``(c + c.T) / 2`` for ``c = sum_outer / count - outer(mean, mean)``.
        """
        mean = self.mean
        covariance = self.sum_outer / self.count
        covariance.sub_(torch.outer(mean, mean))
        symmetric = covariance + covariance.T
        del covariance
        return symmetric.div_(2)

    def correlation(self) -> Tensor:
        """Pearson correlation ``cov / outer(std, std)`` of ``[x_a; x_b]``.

        A dead unit (constant over the data) has no defined correlation; it gets 0 with every
        unit, itself included, so matchers see "no evidence" instead of NaN.
        """
        correlation = self.covariance()
        std, alive = self._scales(correlation.diagonal().clone())
        correlation.div_(torch.outer(std, std))
        if not bool(alive.all()):
            correlation.mul_(torch.outer(alive, alive))
        return correlation.clamp_(-1.0, 1.0)

    def cross_correlation(self, first: int = 0, second: int = 1) -> Tensor:
        """The block of :meth:`correlation` between models ``first`` and ``second``
        (``[d_first, d_second]``, the same values), computed from that block alone.

        >>> moments = JointMoments(3, 2)
        >>> x = torch.randn(100, 3)
        >>> moments.update(x, x[:, :2] + torch.randn(100, 2))
        >>> torch.equal(moments.cross_correlation(), moments.correlation()[:3, 3:])
        True
        """
        self._require_samples()
        rows = slice(self.offsets[first], self.offsets[first] + self.dims[first])
        columns = slice(self.offsets[second], self.offsets[second] + self.dims[second])
        mean, count = self.mean, self.count
        upper = self.sum_outer[rows, columns] / count - torch.outer(mean[rows], mean[columns])
        lower = self.sum_outer[columns, rows] / count - torch.outer(mean[columns], mean[rows])
        cross = (upper + lower.T).div_(2)
        diagonal = (self.sum_outer.diagonal() / count - mean * mean)
        std, alive = self._scales(diagonal)
        cross.div_(torch.outer(std[rows], std[columns]))
        if not bool(alive.all()):
            cross.mul_(torch.outer(alive[rows], alive[columns]))
        return cross.clamp_(-1.0, 1.0)

    def _scales(self, variance: Tensor) -> tuple[Tensor, Tensor]:
        """Each unit's standard deviation (1 for a dead unit) and whether it is alive."""
        mean_square = self.sum_outer.diagonal() / self.count
        alive = variance > DEAD_UNIT_RELATIVE_VARIANCE * mean_square
        return torch.where(alive, variance.clamp(min=0).sqrt(), torch.ones_like(variance)), alive

# correlations closer than this are a tie: the moments are float32 products summed into float64
# per batch (a unit against its own exact copy correlates to 1 - 1e-7 and less)
TIE_TOLERANCE = 1e-6


def _break_varying_ties(joint: Tensor, model_of: Tensor, constant: Tensor,
                        tied: Callable[[Tensor], Tensor], tie_scale: float) -> None:
    """:func:`activation_similarity`'s ties of units that vary, broken in place in ``joint``:
    on fewer samples than units, two units after a ReLU nonzero on the same single sample are
    collinear and correlate equally with the same units. A unit whose best similarity to
    another model's units is reached by several (to ``TIE_TOLERANCE``) is tied; ``tied(units)``
    is added at ``tie_scale`` between every two that are each among the other's best (so no
    choice that is not a tie changes)."""
    across = model_of[:, None] != model_of[None, :]
    best = joint.masked_fill(~across, -math.inf).amax(1)
    near = (joint >= best[:, None] - TIE_TOLERANCE) & across
    near[constant] = False
    near[:, constant] = False
    mutual = near & near.T
    shared = mutual.sum(1) > 1  # a best reached by several units, and their partners
    units = (shared | mutual[shared].any(0)).nonzero().squeeze(1)
    if len(units) == 0:
        return
    between = tied(units).to(torch.float64).cpu()[units[:, None], units[None, :]]
    joint[units[:, None], units[None, :]] += tie_scale * between * mutual[units[:, None],
                                                                          units[None, :]]


def activation_similarity(moments: JointMoments | None, size: int,
                          tie_break: Tensor | None = None, tie_scale: float = 1e-3,
                          tied: Callable[[Tensor], Tensor] | None = None) -> torch.Tensor:
    """Joint ``(d_a + d_b)`` square correlation (of N models' ``[x_1; ...; x_N]`` where
    ``moments`` holds N); identity-like when there are no statistics.

    A unit that is constant on the calibration data (a dead ReLU) correlates with nothing. It
    never merges within its own model (-inf); across models it is as similar (1) to a unit
    constant at the same value as to any other such unit, and 0 to the rest: calibration cannot
    tell those apart. ``tie_break``, a joint similarity of the same units in [-1, 1] (their
    weight similarity; only its entries between two constant units are read), orders them:
    ``tie_scale * tie_break`` is added to the similarity of every two constant units of
    different models, a step far below the gap of 1 between the two levels. Ties left
    go to the unit of the same index (a 1e-6 bonus), which is exact for a model and its copy.

    Varying units tie too (collinear on few samples): ``tied``, given their indices, returns
    their joint similarity like ``tie_break`` (:func:`_break_varying_ties`).

    >>> moments = JointMoments(2, 2)
    >>> x = torch.stack([torch.randn(50), torch.zeros(50)], dim=1)
    >>> moments.update(x, x.flip(1))
    >>> weights = torch.tensor([[1.0, 0.0, 0.2, 0.9], [0.0, 1.0, 0.9, 0.2],
    ...                         [0.2, 0.9, 1.0, 0.0], [0.9, 0.2, 0.0, 1.0]])
    >>> activation_similarity(moments, 2, weights)[1, 2:] > 1.0  # unit 1 of A is B's unit 0
    tensor([ True, False])
    """
    if moments is None:
        return torch.eye(2 * size, dtype=torch.float64)
    joint = moments.correlation().to(torch.float64).cpu()
    total = joint.shape[0]
    dims = getattr(moments, "dims", (size, total - size))
    starts = [sum(dims[:model]) for model in range(len(dims))]
    model_of = torch.repeat_interleave(torch.arange(len(dims)), torch.tensor(dims))
    constant = (joint.diagonal() == 0).nonzero().squeeze(1)
    if len(constant):  # only the constant units' rows and columns change
        mean = moments.mean.to(torch.float64).cpu()[constant]
        equal = (mean[:, None] - mean[None, :]).abs() <= 1e-6 * (mean[:, None].abs()
                                                                + mean[None, :].abs() + 1e-12)
        across = model_of[constant][:, None] != model_of[constant][None, :]
        pairs = (equal & across).nonzero()
        joint[constant[pairs[:, 0]], constant[pairs[:, 1]]] = 1.0
        if tie_break is not None:
            between = tie_break.to(torch.float64).cpu()[constant[:, None], constant[None, :]]
            joint[constant[:, None], constant[None, :]] += tie_scale * between
        rows = joint[constant]
        same_model = model_of[constant][:, None] == model_of[None, :]
        same_model[torch.arange(len(constant)), constant] = False  # itself stays 0
        rows = rows.masked_fill(same_model, -math.inf)
        rows[torch.arange(len(constant)), constant] = 0.0
        joint[constant] = rows
        joint[:, constant] = rows.T
    if tied is not None:
        _break_varying_ties(joint, model_of, constant, tied, tie_scale)
    for first in range(len(dims)):
        for second in range(first + 1, len(dims)):
            ties = torch.arange(min(dims[first], dims[second]))
            joint[starts[first] + ties, starts[second] + ties] += 1e-6
            joint[starts[second] + ties, starts[first] + ties] += 1e-6
    return joint
