"""Differentiable augmentation of every discriminator input (the ``augment=`` group).

The objective passes every batch D sees, real and fake, in the D and the G phase, through one :class:`Augment`
before D and before D's penalties (as stylegan2-ada does), so D never sees an un-augmented image and cannot learn the
augmentations as part of the data. Every op is differentiable w.r.t. the images: G's gradient flows through the
augmentation of its fakes. ``none`` (:class:`NoAugment`) returns its input object unchanged and draws no random number.

* :class:`DiffAugment` (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"): every op of
  the policy on every sample, with random per-sample strength.
* :class:`ADA` (Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data"): the differentiable
  geometric and color ops, each applied to each sample with probability ``p``; ``p`` follows D's overfitting
  heuristic ``r_t = E[sign(D(real))]`` towards a target. Its ``p`` is saved in the checkpoint (:class:`Stateful`).

All ops take images in [-1, 1], ``(B, C, H, W)``. Each op is label-preserving for natural images (a flipped, rotated,
shifted or recolored cat is a cat), so conditional models may use them; for digits, x-flip and rotations can turn one
class into another (6 and 9): drop them from ``augment.ops`` for a conditional digit model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gantrain import checks
from gantrain.state import Mismatch, Stateful
from gantrain.stats import report


class Augment:
    """What D sees of a batch: ``augment(x) -> x'``, differentiable w.r.t. ``x``. ``option``: its ``augment=`` name.

    ``observe(real_out, step)``: D's raw outputs on the augmented reals of D step ``step`` (an adaptive augmentation
    reads them); ``after_d_step()``: called after each applied D step."""

    option = ""

    @property
    def active(self) -> bool:
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, real_out: torch.Tensor, step: int) -> None:
        pass

    def after_d_step(self) -> None:
        pass


class NoAugment(Augment):
    """``augment=none``: D sees the batch itself (the same tensor object; no random number drawn)."""

    option = "none"

    @property
    def active(self) -> bool:
        return False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


# ----------------------------------------------------------------------------- DiffAugment's ops (Zhao et al. 2020)
def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` in ``x``'s dtype."""
    return v.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def brightness(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x + shift`` per sample (``shift`` ``(B,)``)."""
    return x + _per_sample(shift, x)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each pixel's distance from its channel mean scaled by ``factor`` (written so that 1 gives ``x`` exactly)."""
    return x + _per_sample(factor - 1, x) * (x - x.mean(dim=1, keepdim=True))


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each sample's distance from its mean over all pixels and channels scaled by ``factor``."""
    return x + _per_sample(factor - 1, x) * (x - x.mean(dim=(1, 2, 3), keepdim=True))


def translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift sample i by ``shift[i] = (dy, dx)`` whole pixels (content moves down/right for positive values); what
    comes in from outside is 0 (DiffAugment's zero padding)."""
    b, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1) - shift[:, 0].view(b, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) - shift[:, 1].view(b, 1, 1)
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(b, 1, h * w).expand(b, x.shape[1], h * w)
    moved = x.flatten(2).gather(2, index).view_as(x)
    return moved * inside.to(x.dtype)


def cutout(x: torch.Tensor, center: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero a ``size`` (h, w) rectangle of sample i centred on pixel ``center[i] = (y, x)`` (cut at the borders)."""
    b, _, h, w = x.shape
    top, left = (center[:, 0] - size[0] // 2).view(b, 1, 1), (center[:, 1] - size[1] // 2).view(b, 1, 1)
    rows, cols = torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)
    erased = (rows >= top) & (rows < top + size[0]) & (cols >= left) & (cols < left + size[1])
    return x * (~erased).unsqueeze(1).to(x.dtype)


POLICY = ("color", "translation", "cutout")


class DiffAugment(Augment):
    """DiffAugment (Zhao et al. 2020): the ops of ``policy`` on every sample, in the order color, translation,
    cutout, each with its own random draw per sample, as the authors' ``DiffAugment_pytorch.py``.

    Args:
        policy: a list of ``color`` (brightness, saturation, contrast), ``translation``, ``cutout``.
        brightness: shift ~ U(-brightness, brightness) (the paper's 0.5 on [-1, 1] images).
        saturation: factor ~ U(1 - saturation, 1 + saturation) (the paper's [0, 2]).
        contrast: factor ~ U(1 - contrast, 1 + contrast) (the paper's [0.5, 1.5]).
        translation: the largest shift, a fraction of the size (1/8), in whole pixels; zero padding.
        cutout: the side of the erased square, a fraction of the size (1/2), at a random centre.
    At strength 0 an op returns its input exactly.
    """

    option = "diffaugment"

    def __init__(
        self,
        policy: list[str] = list(POLICY),  # noqa: B006 - hydra-zen reads the default; never mutated
        brightness: float = 0.5,
        saturation: float = 1.0,
        contrast: float = 0.5,
        translation: float = 0.125,
        cutout: float = 0.5,
    ):
        for op in policy:
            checks.choice("policy", op, POLICY, hint="e.g. augment.policy=[translation,cutout]")
        for key, value, le in [
            ("brightness", brightness, 2),
            ("saturation", saturation, 1),
            ("contrast", contrast, 1),
            ("translation", translation, 1),
            ("cutout", cutout, 1),
        ]:
            checks.number(key, value, ge=0, le=le)
        self.policy = list(policy)
        self.strengths = dict(brightness=brightness, saturation=saturation, contrast=contrast)
        self.translation, self.cutout = translation, cutout

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        u = lambda: torch.rand(b, device=x.device) * 2 - 1  # noqa: E731 - U(-1, 1) per sample
        if "color" in self.policy:
            x = brightness(x, u() * self.strengths["brightness"])
            x = saturation(x, 1 + u() * self.strengths["saturation"])
            x = contrast(x, 1 + u() * self.strengths["contrast"])
        if "translation" in self.policy:
            most = _vector([int(h * self.translation + 0.5), int(w * self.translation + 0.5)], torch.long, x.device)
            x = translate(x, (torch.rand(b, 2, device=x.device) * (2 * most + 1)).long() - most)
        if "cutout" in self.policy:
            size = (int(h * self.cutout + 0.5), int(w * self.cutout + 0.5))
            x = cutout(x, (torch.rand(b, 2, device=x.device) * _vector([h, w], torch.long, x.device)).long(), size)
        return x


# ----------------------------------------------------------------------------- ADA's ops (Karras et al. 2020)
OPS = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac", "brightness", "contrast", "hue", "saturation")
GEOMETRIC, COLOR = OPS[:7], OPS[7:]
# stylegan2-ada-pytorch's magnitudes (augment.py, AugmentPipe's defaults)
XINT_MAX, SCALE_STD, ROTATE_MAX, ANISO_STD, XFRAC_STD = 0.125, 0.2, 1.0, 0.2, 0.125
BRIGHTNESS_STD, CONTRAST_STD, HUE_MAX, SATURATION_STD = 0.2, 0.5, 1.0, 1.0
BELOW_ONE = 1 - 2**-24  # the largest float32 below 1: p stays in [0, 1)


def _vector(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, filled there: a tensor made on the host and copied to a GPU waits
    for everything queued before it (a blocking copy synchronises the stream)."""
    return torch.stack([torch.full((), v, dtype=dtype, device=device) for v in values])


def _matrix(rows: list[list[Any]], like: torch.Tensor) -> torch.Tensor:
    """``(B, n, n)`` from rows of per-sample tensors ``(B,)`` or numbers (filled on the device: no host copy; each
    number once, so a 3x3 scale matrix costs two fills, not seven: on a GPU each is a kernel launch)."""
    b = like.shape[0]
    filled: dict[tuple[float, float], torch.Tensor] = {}

    def column(v: Any) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            v = v.to(like.device, like.dtype)
            return v if v.shape == (b,) else v.expand(b)
        key = (v, math.copysign(1.0, v))  # -0.0 == 0.0, but is filled as itself
        if key not in filled:
            filled[key] = like.new_full((b,), v)
        return filled[key]

    return torch.stack([column(v) for row in rows for v in row], dim=1).view(b, len(rows), len(rows))


def _translate2d(tx: Any, ty: Any, like: torch.Tensor) -> torch.Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], like)


def _scale2d(sx: Any, sy: Any, like: torch.Tensor) -> torch.Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], like)


def _rotate2d(cos: Any, sin: Any, like: torch.Tensor) -> torch.Tensor:
    return _matrix([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], like)


def geometric(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Resample each image through its ``(B, 3, 3)`` output -> input pixel-coordinate map (origin at the centre, y
    down), bilinear with reflection padding (as the paper pads by reflection); a sample whose map is the identity
    is returned exactly."""
    b, _, h, w = x.shape
    to_norm = _scale2d(2 / w, 2 / h, matrix)  # pixels from the centre -> grid_sample's [-1, 1]
    to_pix = _scale2d(w / 2, h / 2, matrix)
    theta = (to_norm @ matrix @ to_pix)[:, :2, :].to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    identity = (matrix == torch.eye(3, dtype=matrix.dtype, device=matrix.device)).flatten(1).all(1)
    return torch.where(identity.view(b, 1, 1, 1), x, moved)


def color(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply each sample's ``(B, 4, 4)`` homogeneous RGB map (an image of other than 3 channels: the same scale and
    shift on every channel, the mean of the map's rows, as stylegan2-ada's grayscale case); a sample whose map is the
    identity is returned exactly."""
    b, c = x.shape[:2]
    m = matrix.to(x.dtype)
    if c != 3:
        m = m[:, :3, :].mean(dim=1, keepdim=True)
        out = x * m[:, :, :3].sum(dim=2).view(b, 1, 1, 1) + m[:, :, 3].view(b, 1, 1, 1)
    else:
        out = (m[:, :3, :3] @ x.flatten(2) + m[:, :3, 3:]).view_as(x)
    identity = (matrix == torch.eye(4, dtype=matrix.dtype, device=matrix.device)).flatten(1).all(1)
    return torch.where(identity.view(b, 1, 1, 1), x, out)


class ADA(Augment, Stateful):
    """Adaptive discriminator augmentation (Karras et al. 2020): the differentiable subset of the paper's "bgc"
    pipeline, each op of ``ops`` applied to each sample with probability ``p`` and the paper's magnitudes: x-flip,
    90° rotations, integer translation (±1/8 of the size), isotropic scaling, rotation (before and after the
    anisotropic scaling, each with probability ``1 - sqrt(1 - p)``), anisotropic scaling, fractional translation,
    then brightness, contrast, hue rotation and saturation (hue and saturation on 3-channel images only).
    The geometric ops compose into one map per sample, applied once by ``F.grid_sample`` (bilinear, reflection
    padding; the paper's anti-aliasing filters are left out).

    ``p`` is adjusted every ``adjust_every`` D steps from ``r_t = E[sign(D(real))]`` over the reals D saw since the
    last adjustment (all ranks': their sums are all-reduced after each D step, so every rank holds the same ``p``, and
    rank 0's checkpoint holds every rank's sums mid-interval):
    ``p += sign(r_t - target) * n / speed_images``, ``n`` those reals, clamped to [0, 1): ``p`` can go from 0 to 1 in
    ``speed_images`` images. ``adaptive=False``: ``p`` stays fixed (``augment.p``). Logs ``augment/p`` (each D step)
    and ``augment/rt`` (each adjustment). ``p`` and the sums are saved in the checkpoint (bit-exact resume).
    """

    option = "ada"

    def __init__(
        self,
        target: float = 0.6,
        p: float = 0.0,
        adaptive: bool = True,
        adjust_every: int = 4,
        speed_images: int = 500_000,
        ops: list[str] = list(OPS),  # noqa: B006 - hydra-zen reads the default; never mutated
    ):
        checks.number("target", target, gt=0, lt=1, hint="the paper's 0.6")
        checks.number("p", p, ge=0, lt=1, hint="the starting probability, or the fixed one with adaptive=false")
        checks.integer("adjust_every", adjust_every, at_least=1, hint="D steps between adjustments of p")
        checks.integer("speed_images", speed_images, at_least=1, hint="images for p to go from 0 to 1")
        for op in ops:
            checks.choice("ops", op, OPS)
        self.target, self.adaptive, self.adjust_every, self.speed_images = target, adaptive, adjust_every, speed_images
        self.ops = [op for op in OPS if op in ops]
        self.p = torch.tensor(float(p))  # float32, on the device of the images it meets; replaced, never changed
        self.steps = 0  # D steps since the last adjustment
        self.sums: torch.Tensor | None = None  # [sum of sign(D(real)), reals] since the last adjustment, all ranks
        self.pending: torch.Tensor | None = None  # this rank's of the D step in progress
        self.pending_step = -1

    # --- the pipeline
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p.device != x.device:
            self.p = self.p.to(x.device)
        return self.apply(x, self.p)

    def apply(self, x: torch.Tensor, p: torch.Tensor | float) -> torch.Tensor:
        """``x`` augmented with probability ``p`` per op and sample (draws from the global RNG)."""
        b, c, h, w = x.shape
        dev, ops = x.device, set(self.ops)
        like = torch.zeros(b, device=dev)
        p = (
            p.to(dev, torch.float32)
            if isinstance(p, torch.Tensor)
            else torch.full((), p, dtype=torch.float32, device=dev)
        )
        fires = lambda prob=p: torch.rand(b, device=dev) < prob  # noqa: E731
        uniform = lambda: torch.rand(b, device=dev) * 2 - 1  # noqa: E731
        normal = lambda: torch.randn(b, device=dev)  # noqa: E731
        g = torch.eye(3, device=dev).expand(b, 3, 3)  # output -> input pixel map; identity factors leave it exact
        if "xflip" in ops:
            g = g @ _scale2d(1 - 2 * torch.where(fires(), torch.randint(0, 2, (b,), device=dev), 0), 1, like)
        if "rotate90" in ops:
            i = torch.where(fires(), torch.randint(0, 4, (b,), device=dev), 0)  # (cos, sin) of i * 90°, exactly
            g = g @ _rotate2d((i == 0).long() - (i == 2).long(), (i == 1).long() - (i == 3).long(), like)
        if "xint" in ops:
            t = [torch.where(fires(), torch.round(uniform() * XINT_MAX * n), 0) for n in (w, h)]  # whole pixels
            g = g @ _translate2d(*t, like)
        if "scale" in ops:
            s = torch.where(fires(), torch.exp2(normal() * SCALE_STD), 1)
            g = g @ _scale2d(s, s, like)
        p_rot = 1 - torch.sqrt(1 - p)  # rotated before and after the anisotropic scaling: P(either) = p
        rotate = lambda: torch.where(fires(p_rot), uniform() * math.pi * ROTATE_MAX, 0)  # noqa: E731
        if "rotate" in ops:
            theta = rotate()
            g = g @ _rotate2d(torch.cos(theta), torch.sin(theta), like)  # cos(0) is 1, sin(0) 0: exact
        if "aniso" in ops:
            s = torch.where(fires(), torch.exp2(normal() * ANISO_STD), 1)
            g = g @ _scale2d(s, 1 / s, like)
        if "rotate" in ops:
            theta = rotate()
            g = g @ _rotate2d(torch.cos(theta), torch.sin(theta), like)
        if "xfrac" in ops:
            g = g @ _translate2d(*[torch.where(fires(), normal() * XFRAC_STD * n, 0) for n in (w, h)], like)
        if ops & set(GEOMETRIC):
            x = geometric(x, g)
        return self.recolor(x, p) if ops & set(COLOR) else x

    def recolor(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast (any image), hue, saturation (3 channels) composed into one map per sample."""
        b, c = x.shape[:2]
        dev, ops = x.device, set(self.ops)
        like = torch.zeros(b, device=dev)
        fires = lambda: torch.rand(b, device=dev) < p  # noqa: E731
        m = torch.eye(4, device=dev).expand(b, 4, 4)
        if "brightness" in ops:
            t = torch.where(fires(), torch.randn(b, device=dev) * BRIGHTNESS_STD, 0)
            m = _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], like) @ m
        if "contrast" in ops:
            s = torch.where(fires(), torch.exp2(torch.randn(b, device=dev) * CONTRAST_STD), 1)
            m = _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], like) @ m
        if "hue" in ops and c == 3:
            theta = torch.where(fires(), (torch.rand(b, device=dev) * 2 - 1) * math.pi * HUE_MAX, 0)
            m = _rotate_about_luma(theta, like) @ m  # the identity at 0, exactly
        if "saturation" in ops and c == 3:
            s = torch.where(fires(), torch.exp2(torch.randn(b, device=dev) * SATURATION_STD), 1)
            luma = torch.cat([torch.full((3,), 1 / math.sqrt(3), device=dev), torch.zeros(1, device=dev)])
            vv = torch.outer(luma, luma)
            scaled = (vv + (torch.eye(4, device=dev) - vv) * s.view(b, 1, 1)) @ m
            m = torch.where((s == 1).view(b, 1, 1), m, scaled)
        return color(x, m)

    # --- the adjustment of p
    def observe(self, real_out: torch.Tensor, step: int) -> None:
        if step != self.pending_step:  # a new D step: what a skipped one left is dropped
            self.pending, self.pending_step = None, step
        signs = torch.sign(real_out.detach().float()).sum()
        here = torch.stack([signs, torch.full((), float(real_out.shape[0]), dtype=signs.dtype, device=signs.device)])
        self.pending = here if self.pending is None else self.pending + here

    def after_d_step(self) -> None:
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(pending)  # every rank sums the same numbers: the same p everywhere
        self.sums = pending if self.sums is None else self.sums.to(pending.device) + pending
        self.steps += 1
        report("augment/p", self.p)
        if self.steps % self.adjust_every == 0:
            self.adjust()

    def adjust(self) -> None:
        """``p += sign(r_t - target) * n / speed_images`` (adaptive), clamped to [0, 1); the sums start afresh."""
        signs, n = self.sums[0], self.sums[1]
        rt = signs / n
        report("augment/rt", rt)
        if self.adaptive:
            step = torch.sign(rt - self.target) * n / self.speed_images
            self.p = torch.clamp(self.p.to(rt.device) + step, 0.0, BELOW_ONE)
        self.sums, self.steps = None, 0

    # --- the checkpoint
    def state_dict(self) -> dict[str, Any]:
        sums = None if self.sums is None else self.sums.cpu()
        return {"p": self.p.cpu(), "sums": sums, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "p" not in state:
            raise Mismatch("holds no augmentation probability for augment=ada")
        self.p, self.sums, self.steps = state["p"].clone(), state["sums"], state["steps"]


def _rotate_about_luma(theta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, 4, 4)``: rotation of RGB by ``theta`` about the luma axis (1, 1, 1) / sqrt(3) (Rodrigues), homogeneous."""
    v = 1 / math.sqrt(3)
    s, c = torch.sin(theta), torch.cos(theta)
    d, o1, o2 = v * v * (1 - c) + c, v * v * (1 - c) - v * s, v * v * (1 - c) + v * s
    return _matrix([[d, o1, o2, 0], [o2, d, o1, 0], [o1, o2, d, 0], [0, 0, 0, 1]], like)
