"""Puzzle Mix (Kim, Choo, Song, ICML 2020): a block mask chosen from two images' saliency and local statistics.

Pure pieces with injectable randomness (``lam``, ``perm`` and the block grid are arguments),
on any device, without host reads, returning new tensors:

- :func:`gradient_saliency`: ``sqrt(mean_c (d loss / d x)^2)`` per pixel, the model's parameters
  and buffers untouched (the caller sets the mode: the authors use eval mode);
- :func:`block_saliency`: that map averaged over a ``grid x grid`` partition, summing to 1;
- :func:`boundary_penalties` and :func:`mask_terms`: the energy of a labelling of the blocks
  (each block takes ``m`` in ``{0, 1/(L-1), ..., 1}``, the share of the image itself): the
  saliency it gives up, a binomial prior around ``lam``, and a smoothness term that grows with
  the label jump and with how badly the two images' pixels meet at the block border;
- :func:`solve_mask`: the labelling of lowest energy (exact by enumeration on small grids,
  otherwise the per-block best labels refined by sweeps of exact row and column updates);
- :func:`transport_sources` (:func:`transport_plan`, dense) and :func:`transport_blocks`: the
  authors' greedy optimal-transport step that moves each image's salient blocks into the region
  the mask keeps;
- :func:`puzzle_mix`: all of it; labels weighted by the mask's area.

>>> g = torch.Generator().manual_seed(0)
>>> x, t = torch.rand(4, 3, 16, 16, generator=g), torch.eye(4)
>>> saliency = torch.rand(4, 16, 16, generator=g)            # e.g. gradient_saliency(model.eval(), x, t)[0]
>>> x_mix, t_mix, weight, mask = puzzle_mix(x, t, saliency, 0.5, torch.tensor([1, 2, 3, 0]), grid=4)
>>> mask.shape, bool(torch.allclose(t_mix[:, :4].sum(1), torch.ones(4)))
(torch.Size([4, 4, 4]), True)
>>> bool(torch.allclose(weight, mask.mean(dim=(1, 2))))       # the label weight is the mask's area
True

Reference: Kim, Choo and Song, "Puzzle Mix: Exploiting Saliency and Local Statistics for
Optimal Mixup", ICML 2020 (arXiv:2009.06962); the authors' code is github.com/snu-mllab/PuzzleMix,
``mixup.py`` (``mixup_graph``, ``graphcut_multi``, ``neigh_penalty``, ``mask_transport``,
``transport_image``) and ``main.py`` (the saliency). They solve the labelling with graph cuts
(the gco library's alpha-beta swap); docs/methods/puzzlemix.md says what this module simplifies.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from .._checks import check_int, check_positive
from .mixing import _check_unit, _mix_targets, _partner, _per_sample
from .targets import soft_cross_entropy

__all__ = ["PuzzleTerms", "block_saliency", "boundary_penalties", "gradient_saliency", "mask_energy", "mask_terms",
           "puzzle_mix", "solve_mask", "transport_blocks", "transport_grid", "transport_plan", "transport_sources",
           "valid_grids"]

#: labellings at most this many are enumerated (the exact minimum); larger problems use ICM
EXACT_LIMIT = 4096


# ---------------------------------------------------------------------------- checks


def _check_grid(grid, height: int, width: int) -> int:
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int (blocks per side), got {grid!r}")
    if height % grid or width % grid:
        raise ValueError(f"grid={grid} does not divide the {height}x{width} images into equal blocks: use a grid "
                         f"that divides both sides, e.g. one of {valid_grids(range(1, 17), height, width)}")
    return grid


def _check_images(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point batch of images (B, C, H, W), got {what}")
    return x


def _check_maps(saliency, b: int, h: int, w: int) -> torch.Tensor:
    if not isinstance(saliency, torch.Tensor) or saliency.shape != (b, h, w):
        shape = tuple(saliency.shape) if isinstance(saliency, torch.Tensor) else type(saliency).__name__
        raise ValueError(f"saliency must hold one non-negative {h}x{w} map per image ({b}, {h}, {w}), got {shape}")
    return saliency


def check_labels(n_labels) -> int:
    """``n_labels`` as an int in [2, 8]: the mask levels ``{0, 1/(n-1), ..., 1}`` (the authors use 2 to 4)."""
    if isinstance(n_labels, bool) or not isinstance(n_labels, int) or not 2 <= n_labels <= 8:
        raise ValueError(f"n_labels must be an int in [2, 8] (mask levels per block; 2: binary, 3: the authors' "
                         f"CIFAR setting), got {n_labels!r}")
    return n_labels


def valid_grids(blocks, height: int, width: int) -> tuple[int, ...]:
    """The grid sizes of ``blocks`` that cut an H x W image into equal blocks (each divides H and W)."""
    return tuple(g for g in blocks if height % g == 0 and width % g == 0)


# ---------------------------------------------------------------------------- saliency


def gradient_saliency(model, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(saliency, logits)``: ``sqrt(mean_c g^2)`` (B, H, W) of each row's input gradient ``g = d loss_i / d x_i``.

    ``loss_i`` is the cross-entropy of row i against ``targets`` (labels (B,) or soft (B, C)).
    The gradient is taken with respect to the inputs only: the parameters' ``.grad`` and the
    model's buffers (BatchNorm statistics) are left as they were. The model runs in its current
    mode; the authors' ``main.py`` puts it in eval mode, which also keeps rows independent. Their
    map is this one divided by the batch size (the gradient of the mean loss), which
    :func:`block_saliency` normalises away. ``logits`` are detached.
    """
    from ..objectives import frozen_buffers  # the objectives package imports functional: import at call time

    inputs = _check_images(inputs, "inputs")
    leaf = inputs.detach().requires_grad_(True)
    buffers = frozen_buffers(model) if isinstance(model, torch.nn.Module) else contextlib.nullcontext()
    with torch.enable_grad(), buffers:
        logits = model(leaf)
        rows = soft_cross_entropy(logits.float(), targets, reduction="none")
        grad, = torch.autograd.grad(rows.sum(), [leaf])
    return grad.float().square().mean(dim=1).sqrt(), logits.detach()


def block_saliency(saliency: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, grid, grid) means of the (B, H, W) maps over equal blocks, each map scaled to sum 1 (a map that is
    zero everywhere gives ``1 / grid^2`` per block)."""
    if not isinstance(saliency, torch.Tensor) or saliency.dim() != 3:
        shape = tuple(saliency.shape) if isinstance(saliency, torch.Tensor) else type(saliency).__name__
        raise ValueError(f"saliency must be a batch of maps (B, H, W), got {shape}")
    b, h, w = saliency.shape
    grid = _check_grid(grid, h, w)
    pooled = saliency.reshape(b, grid, h // grid, grid, w // grid).mean(dim=(2, 4))
    total = pooled.sum(dim=(1, 2), keepdim=True)
    return torch.where(total > 0, pooled / total.clamp_min(torch.finfo(pooled.dtype).tiny),
                       torch.full_like(pooled, 1.0 / grid ** 2))


# ---------------------------------------------------------------------------- the energy


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def boundary_penalties(x_own: torch.Tensor, x_partner: torch.Tensor, grid: int, neigh_size: int = 4):
    """``(pw_v, pw_h)``: how badly two images meet at each block border, for each choice of sides.

    ``pw_v[:, a, b, r, c]`` (B, 2, 2, grid - 1, grid) compares block (r, c) taken from image ``a``
    with the block below it taken from image ``b`` (index 0: the partner, 1: the image itself);
    ``pw_h[:, a, b, r, c]`` (B, 2, 2, grid, grid - 1) the block to its right. Both images are
    averaged over cells of ``n x n`` pixels (``n`` the largest divisor of the block side that is at
    most ``neigh_size``); the value is the mean, over the cells along the border and the
    channels, of ``|cell on this side - cell across|``: the authors' ``neigh_penalty``.
    """
    x_own, x_partner = _check_images(x_own, "x_own"), _check_images(x_partner, "x_partner")
    if x_own.shape != x_partner.shape:
        raise ValueError(f"x_own and x_partner must have the same shape, got {tuple(x_own.shape)} and "
                         f"{tuple(x_partner.shape)}")
    check_int("neigh_size", neigh_size)
    b, _, h, w = x_own.shape
    grid = _check_grid(grid, h, w)
    bh, bw = h // grid, w // grid
    nh, nw = _largest_divisor(bh, neigh_size), _largest_divisor(bw, neigh_size)
    kh, kw = bh // nh, bw // nw  # cells per block side
    pools = [F.avg_pool2d(x, (nh, nw)) for x in (x_partner, x_own)]

    def vertical(a, c):  # the last cell row of each block against the first cell row of the block below
        d = (a[:, :, :-1, :] - c[:, :, 1:, :])[:, :, kh - 1::kh, :].abs().mean(dim=1)
        return d.reshape(b, grid - 1, grid, kw).mean(dim=-1)

    def horizontal(a, c):
        d = (a[:, :, :, :-1] - c[:, :, :, 1:])[:, :, :, kw - 1::kw].abs().mean(dim=1)
        return d.reshape(b, grid, kh, grid - 1).mean(dim=2)

    pw_v = torch.stack([torch.stack([vertical(pa, pc) for pc in pools], 1) for pa in pools], 1)
    pw_h = torch.stack([torch.stack([horizontal(pa, pc) for pc in pools], 1) for pa in pools], 1)
    return pw_v, pw_h


@dataclasses.dataclass
class PuzzleTerms:
    """The energy of a block labelling: ``unary`` (B, g, g, L) per block and label, the smoothness weights
    ``w_v`` (B, g - 1, g) and ``w_h`` (B, g, g - 1) of the vertical and horizontal neighbours, and the
    mask value ``levels`` (L,) of each label (label l keeps the share ``l / (L - 1)`` of the image)."""

    unary: torch.Tensor
    w_v: torch.Tensor
    w_h: torch.Tensor
    levels: torch.Tensor


def mask_terms(sal_own: torch.Tensor, sal_partner: torch.Tensor, pw_v: torch.Tensor, pw_h: torch.Tensor, lam, *,
               n_labels: int = 3, beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2) -> PuzzleTerms:
    """The authors' energy (``mixup_graph`` and ``graphcut_multi``) as :class:`PuzzleTerms`.

    With ``g`` the grid, ``beta' = beta / (16 g)`` and ``A = beta' gamma pw`` (:func:`boundary_penalties`),
    a block taking the share ``m`` of its own image costs

        ``m V2 + (1 - m) V1 - eta / g^2 * log(Binom(m (L - 1); L - 1, lam) + 1e-8)``

    where ``V1 = sal_own`` and ``V2 = sal_partner`` (the saliency given up) plus, for each of its
    borders, half the border costs with that block's side fixed; two neighbours cost
    ``(beta' + (A[1,0] + A[0,1] - A[1,1] - A[0,0]) / 2) (m_p - m_q)^2``. For binary labels this
    splits the border costs ``A[a, b]`` exactly (up to a constant); for more labels it is the
    authors' extension. ``lam`` is a float or a (B,) tensor, the prior's mean share of the image.
    """
    n_labels = check_labels(n_labels)
    beta = check_positive("beta", beta, allow_zero=True)
    gamma = check_positive("gamma", gamma, allow_zero=True)
    eta = check_positive("eta", eta, allow_zero=True)
    if sal_own.dim() != 3 or sal_partner.shape != sal_own.shape:
        raise ValueError(f"sal_own and sal_partner must be (B, g, g) block saliencies of one shape, got "
                         f"{tuple(sal_own.shape)} and {tuple(sal_partner.shape)}")
    b, g = sal_own.shape[:2]
    if pw_v.shape != (b, 2, 2, g - 1, g) or pw_h.shape != (b, 2, 2, g, g - 1):
        raise ValueError(f"pw_v and pw_h must be ({b}, 2, 2, {g - 1}, {g}) and ({b}, 2, 2, {g}, {g - 1}) border "
                         f"costs (boundary_penalties), got {tuple(pw_v.shape)} and {tuple(pw_h.shape)}")
    dtype = sal_own.dtype
    lam = _per_sample(lam, b, sal_own, "lam")
    scale = beta / g / 16.0
    a_v, a_h = scale * gamma * pw_v.to(dtype), scale * gamma * pw_h.to(dtype)
    v1, v2 = sal_own.clone(), sal_partner.clone()
    # the border costs with one side fixed, half to each block (a = 1: that block keeps its own image, paid by V2)
    v2[:, :-1, :] += (a_v[:, 1, 0] + a_v[:, 1, 1]) / 2
    v1[:, :-1, :] += (a_v[:, 0, 1] + a_v[:, 0, 0]) / 2
    v2[:, 1:, :] += (a_v[:, 0, 1] + a_v[:, 1, 1]) / 2
    v1[:, 1:, :] += (a_v[:, 1, 0] + a_v[:, 0, 0]) / 2
    v2[:, :, :-1] += (a_h[:, 1, 0] + a_h[:, 1, 1]) / 2
    v1[:, :, :-1] += (a_h[:, 0, 1] + a_h[:, 0, 0]) / 2
    v2[:, :, 1:] += (a_h[:, 0, 1] + a_h[:, 1, 1]) / 2
    v1[:, :, 1:] += (a_h[:, 1, 0] + a_h[:, 0, 0]) / 2
    w_v = scale + (a_v[:, 1, 0] + a_v[:, 0, 1] - a_v[:, 1, 1] - a_v[:, 0, 0]) / 2
    w_h = scale + (a_h[:, 1, 0] + a_h[:, 0, 1] - a_h[:, 1, 1] - a_h[:, 0, 0]) / 2

    levels = torch.linspace(0.0, 1.0, n_labels, device=sal_own.device, dtype=dtype)
    n = n_labels - 1
    k = torch.arange(n_labels, device=sal_own.device, dtype=torch.float64)
    log_comb = torch.lgamma(torch.full_like(k, n + 1.0)) - torch.lgamma(k + 1.0) - torch.lgamma(n - k + 1.0)
    lam64 = lam.to(torch.float64)[:, None]
    prob = log_comb.exp() * lam64.pow(k) * (1.0 - lam64).pow(n - k)  # Binom(k; n, lam), k = own share * n
    prior = (-eta / g ** 2 * torch.log(prob + 1e-8)).to(dtype)
    unary = levels * v2[..., None] + (1.0 - levels) * v1[..., None] + prior[:, None, None, :]
    return PuzzleTerms(unary, w_v, w_h, levels)


def mask_energy(labels: torch.Tensor, terms: PuzzleTerms) -> torch.Tensor:
    """(B,) energy of label maps (B, g, g): the unary terms of the chosen labels plus ``w (m_p - m_q)^2`` over
    neighbouring blocks."""
    u = terms.unary.gather(-1, labels[..., None]).squeeze(-1).sum(dim=(1, 2))
    m = terms.levels[labels]
    e_v = (terms.w_v * (m[:, 1:, :] - m[:, :-1, :]).square()).sum(dim=(1, 2))
    e_h = (terms.w_h * (m[:, :, 1:] - m[:, :, :-1]).square()).sum(dim=(1, 2))
    return u + e_v + e_h


# ---------------------------------------------------------------------------- the solver


def _exact(terms: PuzzleTerms) -> torch.Tensor:
    """The labelling of lowest energy among all ``L^(g g)`` (ties: the first in enumeration order)."""
    b, g, _, n_labels = terms.unary.shape
    n = g * g
    device = terms.unary.device
    codes = torch.arange(n_labels ** n, device=device)
    powers = n_labels ** torch.arange(n - 1, -1, -1, device=device)
    digits = (codes[:, None] // powers) % n_labels  # (N, n): block 0 is the most significant digit
    onehot = (digits[..., None] == torch.arange(n_labels, device=device)).to(terms.unary.dtype)  # no range check
    energy = torch.einsum("bpl,kpl->bk", terms.unary.reshape(b, n, n_labels), onehot)
    m = terms.levels[digits].reshape(-1, g, g)
    energy = energy + torch.einsum("bij,kij->bk", terms.w_v, (m[:, 1:, :] - m[:, :-1, :]).square())
    energy = energy + torch.einsum("bij,kij->bk", terms.w_h, (m[:, :, 1:] - m[:, :, :-1]).square())
    return digits.index_select(0, energy.argmin(dim=1)).reshape(b, g, g)


def _rows(unary: torch.Tensor, w_across: torch.Tensor, w_along: torch.Tensor, m: torch.Tensor,
          levels: torch.Tensor) -> torch.Tensor:
    """(B, g, g) labels: every row's best labelling given the rows above and below it (mask values ``m``), by
    dynamic programming along the row (exact for each row). ``w_across`` (B, g - 1, g) weighs the edges
    between rows, ``w_along`` (B, g, g - 1) those within a row."""
    g = unary.shape[2]
    w_up, w_down = F.pad(w_across, (0, 0, 1, 0)), F.pad(w_across, (0, 0, 0, 1))
    m_up, m_down = F.pad(m[:, :-1], (0, 0, 1, 0)), F.pad(m[:, 1:], (0, 0, 0, 1))
    node = (unary + w_up[..., None] * (levels - m_up[..., None]).square()
            + w_down[..., None] * (levels - m_down[..., None]).square())
    jump = (levels[:, None] - levels[None, :]).square()  # (L, L): (this label, the previous block's label)
    best, back = node[:, :, 0], []
    for c in range(1, g):
        value, arg = (best[..., None, :] + w_along[:, :, c - 1, None, None] * jump).min(dim=-1)
        back.append(arg)
        best = node[:, :, c] + value
    label = best.argmin(dim=-1)
    out = [label]
    for arg in reversed(back):
        label = arg.gather(-1, label[..., None]).squeeze(-1)
        out.append(label)
    return torch.stack(out[::-1], dim=-1)


def _sweeps(terms: PuzzleTerms, labels: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Block-coordinate descent: each sweep relabels the even rows, the odd rows, the even columns and the odd
    columns, each exactly given the rest (rows of one parity share no edge), so the energy never rises."""
    g = labels.shape[1]
    odd = torch.arange(g, device=labels.device) % 2
    levels, unary_t = terms.levels, terms.unary.transpose(1, 2)
    w_v_t, w_h_t = terms.w_v.transpose(1, 2), terms.w_h.transpose(1, 2)
    for _ in range(sweeps):
        for parity in (0, 1):
            rows = _rows(terms.unary, terms.w_v, terms.w_h, levels[labels], levels)
            labels = torch.where((odd == parity)[None, :, None], rows, labels)
        for parity in (0, 1):
            cols = _rows(unary_t, w_h_t, w_v_t, levels[labels].transpose(1, 2), levels).transpose(1, 2)
            labels = torch.where((odd == parity)[None, None, :], cols, labels)
    return labels


def solve_mask(terms: PuzzleTerms, *, sweeps: int = 2, exact_limit: int = EXACT_LIMIT) -> torch.Tensor:
    """(B, g, g) labels of low energy: the exact minimum when there are at most ``exact_limit`` labellings
    (a 2 x 2 grid with up to 8 labels, 3 x 3 with 2), else each block's best label alone, refined by
    ``sweeps`` sweeps of exact row and column updates (a local minimum: docs/methods/puzzlemix.md gives the
    measured gap to the optimum)."""
    check_int("sweeps", sweeps, minimum=0)
    b, g, _, n_labels = terms.unary.shape
    if n_labels ** (g * g) <= exact_limit:
        return _exact(terms)
    return _sweeps(terms, terms.unary.argmin(dim=-1), sweeps)


# ---------------------------------------------------------------------------- transport


def transport_grid(grid: int, height: int, width: int, t_size: int | None = 4) -> int:
    """The grid of the transport: the largest multiple of ``grid`` that cuts H x W into equal blocks of at
    least ``t_size`` pixels a side (``grid`` itself when none does, or when ``t_size`` is None). The authors'
    ``width // t_size`` when ``t_size`` divides the block side."""
    if t_size is None:
        return grid
    best, k = grid, grid
    while k <= min(height, width):
        if height % k == 0 and width % k == 0 and height // k >= t_size and width // k >= t_size:
            best = k
        k += grid
    return best


def transport_sources(keep: torch.Tensor, saliency: torch.Tensor, eps: float = 0.8,
                      iters: int | None = None) -> torch.Tensor:
    """(B, N) long, ``N = g^2``: the block moved to each place, -1 where none is (the authors' ``mask_transport``).

    ``keep`` (B, g, g) marks the places the mask takes from this image (``> 0``), ``saliency``
    (B, g, g) its block saliency. With ``C[i, j]`` the squared grid distance over ``(g - 1)^2``
    and ``cost = eps C[i, j] - saliency_i [keep_j]``, ``iters`` (default g) rounds of: every
    block picks its cheapest place; each place keeps the cheapest of the blocks that picked it,
    and the others pay 1 more for that place in the next round. The last round's winners are the
    result. Each place's contest is theirs exactly, ties included: their ``argmin`` over the rows
    of ``plan * cost`` also sees the zeros of the blocks that did not pick the place, so a place
    whose cheapest bid is positive (or zero, from a later row than a non-bidder) goes to nobody.
    The dense plan (B, N, N) is :func:`transport_plan`; this keeps only (B, N) per round.
    """
    b, g, _ = keep.shape
    n = g * g
    iters = g if iters is None else check_int("iters", iters)
    device = saliency.device
    idx = torch.arange(n, device=device)
    r, c = idx // g, idx % g
    dist = ((r[:, None] - r[None, :]).square() + (c[:, None] - c[None, :]).square()).to(saliency.dtype)
    dist = dist / max(g - 1, 1) ** 2
    z = (keep > 0).to(saliency.dtype).reshape(b, 1, n)
    cost = eps * dist - saliency.reshape(b, n, 1) * z  # (B, N blocks, N places)
    rows = idx.expand(b, n)
    winner = torch.full((b, n), -1, dtype=torch.long, device=device)
    for _ in range(iters):
        pick = cost.argmin(dim=-1)  # each block's cheapest place (the first on ties)
        bid = cost.gather(-1, pick[..., None]).squeeze(-1)
        best = torch.full((b, n), float("inf"), dtype=cost.dtype, device=device).scatter_reduce(
            1, pick, bid, "amin")  # each place's cheapest bid
        first = torch.full((b, n), n, dtype=torch.long, device=device).scatter_reduce(
            1, pick, torch.where(bid == best.gather(1, pick), rows, n), "amin")  # its first bidder at that bid
        bidders = torch.zeros((b, n), dtype=torch.long, device=device).scatter_add(1, pick, torch.ones_like(pick))
        # the first block that did not bid for a place: 0, except for the place block 0 picked
        same = pick != pick[:, :1]
        run = torch.where(same.any(dim=1), same.to(torch.int8).argmax(dim=1), n)
        first_other = torch.where(idx == pick[:, :1], run[:, None], 0)
        wins = (bidders > 0) & ((best < 0) | ((best > 0) & (bidders == n)) | ((best == 0) & (first < first_other)))
        winner = torch.where(wins, first, -1)
        lost = winner.gather(1, pick) != rows
        cost.scatter_add_(-1, pick[..., None], lost[..., None].to(cost.dtype))  # cost is this function's own
    return winner


def transport_plan(keep: torch.Tensor, saliency: torch.Tensor, eps: float = 0.8, iters: int | None = None):
    """(B, N, N) 0/1 plan of :func:`transport_sources`: entry (i, j) is 1 when block i moves to place j (the
    authors' ``plan_win``; a place no block won has a zero column)."""
    winner = transport_sources(keep, saliency, eps, iters)
    b, n = winner.shape
    plan = torch.zeros((b, n + 1, n), dtype=saliency.dtype, device=saliency.device)
    plan.scatter_(1, torch.where(winner < 0, n, winner)[:, None, :], 1.0)
    return plan[:, :n]


def transport_blocks(x: torch.Tensor, sources: torch.Tensor, grid: int, *, fill_empty: bool = True) -> torch.Tensor:
    """``x`` (B, C, H, W) with its ``grid x grid`` blocks moved: place j gets block ``sources[:, j]`` ((B, N) long,
    from :func:`transport_sources`; a (B, N, N) plan works too). A place no block was moved to (-1) keeps its
    own block (``fill_empty``) or becomes zero (the authors' ``transport_image``)."""
    b, c, h, w = x.shape
    grid = _check_grid(grid, h, w)
    bh, bw, n = h // grid, w // grid, grid * grid
    if sources.dim() == 3:  # a plan: the row of each column's 1
        sources = torch.where(sources.sum(dim=1) > 0, sources.argmax(dim=1), -1)
    blocks = x.reshape(b, c, grid, bh, grid, bw).permute(0, 1, 2, 4, 3, 5).reshape(b, c, n, bh * bw)
    index = sources.clamp_min(0)[:, None, :, None].expand(b, c, n, bh * bw)
    moved = blocks.gather(2, index)
    empty = (sources < 0)[:, None, :, None]
    moved = torch.where(empty, blocks if fill_empty else torch.zeros_like(blocks), moved)
    return moved.reshape(b, c, grid, grid, bh, bw).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def _upsample(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, g, g) block values repeated over their blocks of an h x w grid (nearest neighbour)."""
    g = mask.shape[1]
    return mask.repeat_interleave(h // g, dim=1).repeat_interleave(w // g, dim=2)


# ---------------------------------------------------------------------------- all of it


def puzzle_mix(x: torch.Tensor, targets: torch.Tensor, saliency: torch.Tensor, lam, perm: torch.Tensor, grid: int, *,
               n_labels: int = 3, beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, neigh_size: int = 4,
               transport: bool = True, t_eps: float = 0.8, t_size: int | None = 4, sweeps: int = 2,
               mask: torch.Tensor | None = None):
    """Puzzle Mix of ``x`` with ``x[perm]``: ``(x_mix, t_mix, weight, mask)``.

    ``saliency`` (B, H, W) is each image's map (:func:`gradient_saliency`), ``lam`` a float or
    (B,) tensor (the prior's share of the image), ``grid`` the blocks per side (it must divide
    H and W). The (B, grid, grid) ``mask`` (the image's share per block, injectable) minimises
    :func:`mask_terms`' energy (:func:`solve_mask`); with ``transport``, each image's blocks
    are moved by :func:`transport_plan` (at :func:`transport_grid`'s resolution) into the
    places its side of the mask keeps; then ``x_mix = M x' + (1 - M) x'[perm]`` pixel by pixel
    and ``t_mix = w t + (1 - w) t[perm]``, ``w = mean(M)``, the share of the image's area.
    """
    x = _check_images(x, "x")
    b, _, h, w = x.shape
    grid = _check_grid(grid, h, w)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # the energy's precision
    saliency = _check_maps(saliency, b, h, w).to(device=x.device, dtype=work)
    if not isinstance(perm, torch.Tensor) or perm.shape != (b,):
        raise ValueError(f"perm must be a ({b},) permutation of the batch, got "
                         + (f"shape {tuple(perm.shape)}" if isinstance(perm, torch.Tensor) else type(perm).__name__))
    t_eps = check_positive("t_eps", t_eps, allow_zero=True)
    perm = perm.to(device=x.device, dtype=torch.long)
    partner = _partner(x, perm)
    sal = block_saliency(saliency, grid)
    if mask is None:
        pw_v, pw_h = boundary_penalties(x, partner, grid, neigh_size)
        terms = mask_terms(sal, _partner(sal, perm), pw_v, pw_h, lam, n_labels=n_labels, beta=beta, gamma=gamma,
                           eta=eta)
        mask = terms.levels[solve_mask(terms, sweeps=sweeps)]
    elif not isinstance(mask, torch.Tensor) or mask.shape != (b, grid, grid):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be ({b}, {grid}, {grid}): the image's share of each block, got {shape}")
    else:
        _check_unit("mask", mask)
    mask = mask.to(device=x.device, dtype=sal.dtype)
    own, other = x, partner
    if transport:
        gt = transport_grid(grid, h, w, t_size)
        mask_t = _upsample(mask, gt, gt)
        sal_t = block_saliency(saliency, gt)
        own = transport_blocks(x, transport_sources(mask_t, sal_t, t_eps), gt)
        other = transport_blocks(partner, transport_sources(1.0 - mask_t, _partner(sal_t, perm), t_eps), gt)
    m = _upsample(mask, h, w)[:, None].to(x.dtype)
    out = m * own + (1.0 - m) * other
    weight = mask.mean(dim=(1, 2)).to(x.dtype)
    return out, _mix_targets(targets, perm, weight), weight, mask
