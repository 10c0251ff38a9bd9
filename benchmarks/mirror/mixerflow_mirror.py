#!/usr/bin/env python3
"""PyTorch mirror of MixerFlow.NET's image models, built from a model configuration JSON.

The mirror rebuilds a model from the configuration JSON that `mixerflow info` prints (and that
checkpoints, run folders and safetensors exports carry) with the same module tree as
MixerFlow.Core's bijectors, so every parameter and buffer has the same `state_dict` name as in
MixerFlow.NET: the mapping from our names to the mirror's is the identity, by construction, and a
weight export loads with `load_state_dict(strict=True)`. Each bijector runs the same tensor ops
as its F# counterpart (src/MixerFlow.Core/*.fs), so the GEMM shapes are the same too.

Supported: MixerFlow (square, band or stripe patches; affine, additive, rational-quadratic spline
or MAF inner flows; ActNorm or batch normalisation; shift on or off; class-conditional or not) and
Glow. `time` refuses class-conditional models (it has no labels to draw). Both directions are
mirrored: every bijector has the inverse of its F# namesake (MAF's is sequential, D network
evaluations, as ours), so the mirror samples and decodes latents as well as computing log p(x).

Commands (all exit non-zero with a message on error):

  params CONFIG                  build the model; print its parameter count. CONFIG is a JSON file,
                                 the whole output of `mixerflow info` (its `total` line is then
                                 checked against the mirror's count) or a .safetensors export.
  logprob --weights W --inputs X --out O [--dtype float32|float64] [--drop-logdet PART]
                                 log p(x) in nats per image of the continuous (already dequantised)
                                 images X (safetensors tensor `inputs`, [B, C, H, W] in [0, 1);
                                 a class-conditional model also needs `context`, [B, classes]),
                                 with the weights of the export W, written to O (safetensors tensor
                                 `logprob`, float64). --drop-logdet actnorm|coupling|logit leaves
                                 out that part's log-det (actnorm: batch normalisation's too):
                                 a deliberately broken mirror for the test
                                 that shows the comparison can fail.
  decode --weights W --latents Z --out O [--dtype float32|float64] [--skip-inverse PART]
                                 the images of the latents Z (safetensors tensor `latents`,
                                 [B, C, H, W]; a class-conditional model also needs `context`)
                                 under the weights of the export W: the body's inverse gives the
                                 continuous images y in [0, 1) (tensor `continuous`), dequantisation's
                                 inverse the pixels floor(256 y) clamped to 0..255 (tensor `images`),
                                 both written to O as float64. --skip-inverse
                                 actnorm|coupling|logit|shift|lulinear leaves out that kind of step
                                 (actnorm: batch normalisation too) from the inverse: a deliberately
                                 broken mirror for the test that shows the comparison can fail.
  time CONFIG [--batch 64] [--sample-batch 16] [--steps 30] [--threads 1] [--serve] [--expect-parameters N]
                                 times the training step of MixerFlow.NET's TrainingStep: forward
                                 with uniform dequantisation, mean bits/dim, backward, global-norm
                                 clipping at 50, Adam at lr 1e-4; and, as benchmarks/Speed does for
                                 ours, evaluation (bits/dim of a batch of --batch images in
                                 evaluation mode without gradient) and sampling (--sample-batch
                                 images drawn from the base and inverted to pixels in evaluation
                                 mode without gradient), each in ms per image. --serve reads lines
                                 on stdin and answers each with a JSON line {"ms": [...]}: `N` with
                                 N step times (ms) and, under "phases", each step's [forward to the
                                 loss value, zero_grad and backward, clipping and Adam] (ms),
                                 `eval N` with N evaluation times and `sample N`
                                 with N sampling times (ms per image), so a caller can interleave
                                 these with its own; `quit` or end of input stops it.

Run with Debian's interpreter and OpenBLAS at its full speed, one thread:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \\
        /usr/bin/python3 benchmarks/mirror/mixerflow_mirror.py time cfg.json

Safetensors are read and written by hand (json + torch.frombuffer): the `safetensors` package is
not needed.
"""
import argparse, json, math, os, re, statistics, struct, sys, time

import torch
from torch import nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# safetensors, by hand

_DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}
_CODES = {v: k for k, v in _DTYPES.items()}


def read_safetensors(path):
    """(tensors by name, metadata) of a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"{path}: not a safetensors file (header length {n}, file of {len(data)} bytes)")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor '{name}': dtype {info['dtype']} is not supported ({', '.join(_DTYPES)})")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        if end == begin:
            tensors[name] = torch.zeros(shape, dtype=dtype)
        else:
            # frombuffer needs a writable buffer to avoid a warning: copy the slice.
            t = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype)
            tensors[name] = t.reshape(shape).clone()
    return tensors, metadata


def write_safetensors(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        raw = t.numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_config(path):
    """(config dict, expected parameter total or None) from a JSON file, `info` output or an export."""
    if path.endswith(".safetensors"):
        _, meta = read_safetensors(path)
        if "mixerflow.config" not in meta:
            raise ValueError(f"{path}: the export's metadata has no mixerflow.config")
        return json.loads(meta["mixerflow.config"]), int(meta["mixerflow.parameters"]) if "mixerflow.parameters" in meta else None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError(f"{path}: no JSON object (a model configuration as `mixerflow info` prints it)")
    config, _ = json.JSONDecoder().raw_decode(text[start:])
    m = re.search(r"^total\s+([\d,]+)\s*$", text, re.M)
    return config, int(m.group(1).replace(",", "")) if m else None


# ---------------------------------------------------------------------------------------------
# Bijectors, each after its F# namesake: forward(x) returns (y, log|det dy/dx| per sample),
# inverse(y) returns (x, log|det dx/dy| per sample). A volume-preserving step (a permutation, a
# reshape) returns None as its log-det, which a chain skips, as Core's Transformed.VolumePreserving.

def sum_per_sample(t):
    return t if t.dim() == 1 else t.flatten(1).sum(1)


def constant_log_det(like, value):
    return value.reshape(1).expand(like.shape[0]).contiguous()


def add_log_dets(a, b):
    """a + b where None stands for a volume-preserving step's zero log-det."""
    return b if a is None else a if b is None else a + b


class Bijector(nn.Module):
    """`drop` (a set of part kinds) leaves their log-dets out of the forward pass, `skip` leaves
    the parts of those kinds out of a chain's inverse: only for the broken-mirror tests."""
    drop = frozenset()
    skip = frozenset()
    kind = None


class Chain(Bijector):
    def __init__(self, parts):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x, context=None):
        ld = None
        for p in self.parts:
            x, l = p(x, context)
            ld = add_log_dets(ld, l)
        return x, ld

    def inverse(self, y, context=None):
        ld = None
        for p in reversed(self.parts):
            if p.kind is not None and p.kind in Bijector.skip:
                continue
            y, l = p.inverse(y, context)
            ld = add_log_dets(ld, l)
        return y, ld


class Inverted(Bijector):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, context=None):
        return self.inner.inverse(x, context)

    def inverse(self, y, context=None):
        return self.inner(y, context)


class Dequantize(Bijector):
    def __init__(self, shape, levels=256):
        super().__init__()
        self.levels = levels
        self.log_levels = math.log(levels) * math.prod(shape)

    def forward(self, x, context=None):
        y = (x + torch.rand_like(x)) / float(self.levels)
        return y, torch.full((x.shape[0],), -self.log_levels, dtype=x.dtype, device=x.device)

    def inverse(self, y, context=None):
        """Rounds down: a surjection's inverse, pixels 0..levels-1."""
        x = (y * float(self.levels)).floor().clamp(0.0, float(self.levels - 1))
        return x, torch.full((y.shape[0],), self.log_levels, dtype=y.dtype, device=y.device)


class Logit(Bijector):
    kind = "logit"

    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha

    def forward(self, x, context=None):
        a = self.alpha
        p = x * (1.0 - 2.0 * a) + a
        y = p.log() - (1.0 - p).log()
        ld = (p.log() + (1.0 - p).log()).neg() + math.log(1.0 - 2.0 * a)
        ld = sum_per_sample(ld)
        return y, (ld * 0 if "logit" in Bijector.drop else ld)

    def inverse(self, y, context=None):
        a = self.alpha
        p = y.sigmoid()
        x = (p - a) / (1.0 - 2.0 * a)
        # log p + log(1 - p) = logsigmoid(y) + logsigmoid(-y), stable for large |y|.
        ld = F.logsigmoid(y) + F.logsigmoid(y.neg()) - math.log(1.0 - 2.0 * a)
        return x, sum_per_sample(ld)


class Patchify(Bijector):
    def __init__(self, c, h, w, ph, pw):
        super().__init__()
        self.c, self.h, self.w, self.ph, self.pw = c, h, w, ph, pw
        self.patches, self.features = (h // ph) * (w // pw), c * ph * pw

    # Core copies with one index_select along the flat axis. In PyTorch 1.13 that is the faster form
    # for small images only: at [64, 1, 28, 28] 32 against 120 us (forward and backward 149 against
    # 227), at [64, 3, 32, 32] 94 against 500 us but forward and backward 2,259 against 891 (its
    # index_add_ backward). So the mirror takes index_select up to 1,024 values per image, the
    # permuted copy above: at each preset its faster form. (Plain attributes, not buffers: the
    # state_dict stays Core's.)
    SELECT_UP_TO = 1024

    def _indices(self):
        if not hasattr(self, "_forward_index"):
            g = (1, self.c, self.h // self.ph, self.ph, self.w // self.pw, self.pw)
            self._forward_index = torch.arange(self.c * self.h * self.w).reshape(g).permute(0, 2, 4, 1, 3, 5).reshape(-1).contiguous()
            self._inverse_index = torch.argsort(self._forward_index)
        return self._forward_index, self._inverse_index

    def forward(self, x, context=None):
        b = x.shape[0]
        if self.c * self.h * self.w <= self.SELECT_UP_TO:
            return x.reshape(b, -1).index_select(1, self._indices()[0].to(x.device)).view(b, self.patches, self.features), None
        y = x.reshape(b, self.c, self.h // self.ph, self.ph, self.w // self.pw, self.pw).permute(0, 2, 4, 1, 3, 5)
        return y.reshape(b, self.patches, self.features), None

    def inverse(self, y, context=None):
        b = y.shape[0]
        if self.c * self.h * self.w <= self.SELECT_UP_TO:
            return y.reshape(b, -1).index_select(1, self._indices()[1].to(y.device)).view(b, self.c, self.h, self.w), None
        x = y.reshape(b, self.h // self.ph, self.w // self.pw, self.c, self.ph, self.pw).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, self.c, self.h, self.w), None


class Shift(Bijector):
    kind = "shift"

    def __init__(self, dy, dx):
        super().__init__()
        self.dy, self.dx = dy, dx

    def forward(self, x, context=None):
        return x.roll((self.dy, self.dx), (2, 3)), None

    def inverse(self, y, context=None):
        return y.roll((-self.dy, -self.dx), (2, 3)), None


class Squeeze(Bijector):
    def forward(self, x, context=None):
        return F.pixel_unshuffle(x, 2), None

    def inverse(self, y, context=None):
        return F.pixel_shuffle(y, 2), None


class Lifted(Bijector):
    """RowWise (along_rows) / ColumnWise: one vector bijector for every row (column) of [P, D]."""
    def __init__(self, copies, size, inner, along_rows):
        super().__init__()
        self.copies, self.size, self.along_rows = copies, size, along_rows
        self.inner = inner

    def _run(self, x, context, inverse):
        b = x.shape[0]
        rows = x if self.along_rows else x.transpose(1, 2)
        # Each sample's context row serves all of its rows (columns).
        c = None if context is None else context.repeat_interleave(self.copies, 0)
        flat = rows.reshape(b * self.copies, self.size)
        y, ld = self.inner.inverse(flat, c) if inverse else self.inner(flat, c)
        y = y.reshape(b, self.copies, self.size)
        if not self.along_rows:
            y = y.transpose(1, 2).contiguous()
        return y, None if ld is None else ld.reshape(b, self.copies).sum(1)

    def forward(self, x, context=None):
        return self._run(x, context, False)

    def inverse(self, y, context=None):
        return self._run(y, context, True)


class Partial(Bijector):
    def __init__(self, channels, count, inner):
        super().__init__()
        self.channels, self.count = channels, count
        self.inner = inner

    def _run(self, x, context, inverse):
        head = x.narrow(1, 0, self.count)
        tail = x.narrow(1, self.count, self.channels - self.count)
        y, ld = self.inner.inverse(head, context) if inverse else self.inner(head, context)
        return torch.cat([y, tail], 1), ld

    def forward(self, x, context=None):
        return self._run(x, context, False)

    def inverse(self, y, context=None):
        return self._run(y, context, True)


def soft_clamp(limit):
    return lambda raw: (raw / limit).tanh() * limit


def sigmoid_bound(raw):
    return F.logsigmoid(raw + 2.0) + math.log(1.0 + math.exp(-2.0))


def softplus(x):
    """Core's Ops.softplus: -logsigmoid(-x) (torch's softplus has a threshold)."""
    return -F.logsigmoid(-x)


# Core's Spline.derivativeShift: softplus(c) + 1e-3 = 1, so zero parameters give derivative 1.
DERIVATIVE_SHIFT = math.log(math.exp(1.0 - 1e-3) - 1.0)


def _knots(unnormalised, bound, min_size):
    k = unnormalised.shape[-1]
    w = unnormalised.softmax(-1) * (1.0 - min_size * k) + min_size
    cum = w.cumsum(-1) * (2.0 * bound) - bound
    zero = torch.full_like(cum.narrow(-1, 0, 1), -bound)
    cum = torch.cat([zero, cum.narrow(-1, 0, k - 1), torch.full_like(zero, bound)], -1)
    return cum, cum.narrow(-1, 1, k) - cum.narrow(-1, 0, k)


def spline_apply(x, h, bins, bound, inverse=False):
    """Core's RationalQuadratic (Spline.apply): h [B, 3K-1, ...] -> the output and the log|derivative|
    of the direction taken, elementwise; the inverse solves the same quadratic as Core's."""
    p = h.movedim(1, -1)
    uw, uh, ud = p.narrow(-1, 0, bins), p.narrow(-1, bins, bins), p.narrow(-1, 2 * bins, bins - 1)
    inside = x.ge(-bound).logical_and(x.le(bound))
    xc = x.clamp(-bound, bound)
    cumw, w = _knots(uw, bound, 1e-3)
    cumh, hh = _knots(uh, bound, 1e-3)
    inner = softplus(ud + DERIVATIVE_SHIFT) + 1e-3
    one = torch.ones_like(inner.narrow(-1, 0, 1))
    d = torch.cat([one, inner, one], -1)
    k = w.shape[-1]
    locations = cumh if inverse else cumw
    idx = xc.unsqueeze(-1).ge(locations).sum(-1, keepdim=True).sub(1).clamp(0, k - 1).to(torch.int64)
    g = lambda t: t.gather(-1, idx).squeeze(-1)
    xk, wk, yk, hk = g(cumw), g(w), g(cumh), g(hh)
    delta = hk / wk
    dk, dk1 = g(d), g(d.narrow(-1, 1, k))
    if not inverse:
        theta = (xc - xk) / wk
        t1t = theta * (1.0 - theta)
        numerator = hk * (delta * theta.pow(2.0) + dk * t1t)
        denominator = delta + (dk + dk1 - delta * 2.0) * t1t
        y = yk + numerator / denominator
        dnum = delta.pow(2.0) * (dk1 * theta.pow(2.0) + delta * t1t * 2.0 + dk * (1.0 - theta).pow(2.0))
        log_deriv = dnum.log() - denominator.log() * 2.0
    else:
        dy = xc - yk
        a = dy * (dk + dk1 - delta * 2.0) + hk * (delta - dk)
        b = hk * dk - dy * (dk + dk1 - delta * 2.0)
        c = delta.neg() * dy
        disc = (b.pow(2.0) - a * c * 4.0).clamp_min(0.0)
        root = (c * 2.0) / (b.neg() - disc.sqrt())
        y = root * wk + xk
        t1t = root * (1.0 - root)
        denominator = delta + (dk + dk1 - delta * 2.0) * t1t
        dnum = delta.pow(2.0) * (dk1 * root.pow(2.0) + delta * t1t * 2.0 + dk * (1.0 - root).pow(2.0))
        log_deriv = (dnum.log() - denominator.log() * 2.0).neg()
    return torch.where(inside, y, x), torch.where(inside, log_deriv, torch.zeros_like(log_deriv))


def affine_apply(x, h, bound, inverse=False):
    """Core's Affine map: y = x * exp(log s) + t with h = (t, unconstrained log s); its inverse
    (y - t) * exp(-log s). Returns the output and the log|derivative| of the direction taken."""
    log_scale = bound(h.select(1, 1))
    if inverse:
        return (x - h.select(1, 0)) * log_scale.neg().exp(), log_scale.neg()
    return x * log_scale.exp() + h.select(1, 0), log_scale


def _run_start(idx):
    """The first index of `idx` if it is a run of consecutive indices, else -1 (Core's runStart)."""
    return idx[0] if all(v - i == idx[0] for i, v in enumerate(idx)) else -1


class Coupling(Bijector):
    """Core's Coupling: halves (or swapped halves) of the first event axis; map 'affine', 'additive'
    or 'spline' (bins, spline_bound)."""
    kind = "coupling"

    def __init__(self, n, swapped, net, rest=(), map="affine", bound=None, bins=8, spline_bound=3.0):
        super().__init__()
        h = n // 2
        cond, trans = list(range(h)), list(range(h, n))
        if swapped:
            cond, trans = trans, cond
        self.register_buffer("conditioningIndex", torch.tensor(cond, dtype=torch.int64))
        self.register_buffer("transformedIndex", torch.tensor(trans, dtype=torch.int64))
        merge = [0] * n
        for i, p in enumerate(cond + trans):
            merge[p] = i
        self.register_buffer("mergeIndex", torch.tensor(merge, dtype=torch.int64))
        self.net = net
        self.n_a, self.n_b, self.rest, self.map = len(cond), len(trans), tuple(rest), map
        self.k = {"affine": 2, "additive": 1, "spline": 3 * bins - 1}[map]
        self.bound = bound or soft_clamp(2.0)
        self.bins, self.spline_bound = bins, spline_bound
        # Halves (the usual partition): slices and one cat instead of index_select copies, as Core.
        self.cond_start, self.trans_start = _run_start(cond), _run_start(trans)
        self.contiguous = self.cond_start >= 0 and self.trans_start >= 0

    def _run(self, x, context, inverse):
        if self.contiguous:
            # One split, as Core (its backward is one cat of the two gradients).
            if self.cond_start == 0:
                xa, xb = torch.split(x, [self.n_a, self.n_b], 1)
            else:
                xb, xa = torch.split(x, [self.n_b, self.n_a], 1)
        else:
            xa, xb = x.index_select(1, self.conditioningIndex), x.index_select(1, self.transformedIndex)
        h = self.net(xa if context is None else torch.cat([xa, context], 1)).reshape((x.shape[0], self.k, self.n_b) + self.rest)
        if self.map == "affine":
            yb, log_deriv = affine_apply(xb, h, self.bound, inverse)
        elif self.map == "spline":
            yb, log_deriv = spline_apply(xb, h, self.bins, self.spline_bound, inverse)
        else:
            yb, log_deriv = (xb - h.select(1, 0) if inverse else xb + h.select(1, 0)), torch.zeros_like(xb)
        if not self.contiguous:
            y = torch.cat([xa, yb], 1).index_select(1, self.mergeIndex)
        else:
            y = torch.cat([xa, yb] if self.cond_start == 0 else [yb, xa], 1)
        return y, sum_per_sample(log_deriv)

    def forward(self, x, context=None):
        y, ld = self._run(x, context, False)
        return y, (ld * 0 if "coupling" in Bijector.drop else ld)

    def inverse(self, y, context=None):
        return self._run(y, context, True)


class ActNorm(Bijector):
    """y = (x + bias) * exp(logScale); `feature_axes` of the event carry a parameter each."""
    kind = "actnorm"

    def __init__(self, event_shape, feature_axes=None):
        super().__init__()
        axes = list(range(len(event_shape))) if feature_axes is None else list(feature_axes)
        pshape = [1] + [s if i in axes else 1 for i, s in enumerate(event_shape)]
        self.dims = [0] + [i + 1 for i in range(len(event_shape)) if i not in axes]
        self.positions = float(math.prod(event_shape) // math.prod(pshape))
        self.bias = nn.Parameter(torch.zeros(pshape))
        self.logScale = nn.Parameter(torch.zeros(pshape))
        self.register_buffer("initialized", torch.zeros(1, dtype=torch.int64))

    def forward(self, x, context=None):
        if self.training and int(self.initialized.item()) == 0:
            with torch.no_grad():
                mean = x.mean(self.dims, keepdim=True)
                std = (x - mean).pow(2.0).mean(self.dims, keepdim=True).sqrt()
                self.bias.copy_(mean.neg())
                self.logScale.copy_((std + 1e-6).log().neg())
                self.initialized.fill_(1)
        y = (x + self.bias) * self.logScale.exp()
        ld = constant_log_det(x, self.logScale.sum() * self.positions)
        return y, (ld * 0 if "actnorm" in Bijector.drop else ld)

    def inverse(self, y, context=None):
        x = y * self.logScale.neg().exp() - self.bias
        return x, constant_log_det(y, self.logScale.sum() * -self.positions)


class MaskedLinear(nn.Module):
    def __init__(self, in_f, out_f, mask):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_f, in_f) * (1.0 / math.sqrt(in_f)))
        self.bias = nn.Parameter(torch.zeros(out_f))
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class Made(nn.Module):
    """Core's MADE: output i sees inputs 0..i-1 (and every context feature); [B, D (+ C)] -> [B, k, D]."""
    def __init__(self, dim, width, depth, k, context_features=0):
        super().__init__()
        self.dim, self.k = dim, k
        in_deg = [i + 1 for i in range(dim)] + [0] * context_features
        hid_deg = ([j % max(1, dim - 1) + 1 for j in range(width)] if context_features == 0
                   else [j % dim for j in range(width)])
        mask = lambda out_deg, in_deg, strict: torch.tensor(
            [[1.0 if (o > i if strict else o >= i) else 0.0 for i in in_deg] for o in out_deg], dtype=torch.float32)
        layers, prev = [], in_deg
        for _ in range(depth):
            layers += [MaskedLinear(len(prev), width, mask(hid_deg, prev, False)), nn.ReLU()]
            prev = hid_deg
        out_deg = [j % dim + 1 for j in range(dim * k)]
        last = MaskedLinear(len(prev), dim * k, mask(out_deg, prev, True))
        with torch.no_grad():
            last.weight.zero_()
        self.layers = nn.ModuleList(layers + [last])

    def forward(self, x):
        h = x
        for l in self.layers:
            h = l(h)
        return h.reshape(x.shape[0], self.k, self.dim)


class MaskedAutoregressive(Bijector):
    """Core's MAF layer with the affine map (log-scale soft-clamped at 2). The inverse is
    sequential, as Core's: D passes of the MADE, after pass i elements 0..i are exact."""
    kind = "coupling"

    def __init__(self, dim, width, depth, context_features=0):
        super().__init__()
        self.made = Made(dim, width, depth, 2, context_features)
        self.bound = soft_clamp(2.0)

    def forward(self, x, context=None):
        h = self.made(x if context is None else torch.cat([x, context], 1))
        log_scale = self.bound(h.select(1, 1))
        y = x * log_scale.exp() + h.select(1, 0)
        ld = log_scale.sum(1)
        return y, (ld * 0 if "coupling" in Bijector.drop else ld)

    def inverse(self, y, context=None):
        x, log_deriv = torch.zeros_like(y), torch.zeros_like(y)
        for _ in range(self.made.dim):
            h = self.made(x if context is None else torch.cat([x, context], 1))
            x, log_deriv = affine_apply(y, h, self.bound, inverse=True)
        return x, log_deriv.sum(1)


class Permutation(Bijector):
    def __init__(self, perm):
        super().__init__()
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        self.register_buffer("forwardIndex", torch.tensor(perm, dtype=torch.int64))
        self.register_buffer("inverseIndex", torch.tensor(inv, dtype=torch.int64))

    def forward(self, x, context=None):
        return x.index_select(1, self.forwardIndex), None

    def inverse(self, y, context=None):
        return y.index_select(1, self.inverseIndex), None


class BatchNormFlow(Bijector):
    """Core's BatchNormFlow over every event axis: batch statistics in training (running averages
    updated with `momentum`), running averages in evaluation and in the inverse."""
    kind = "actnorm"

    def __init__(self, event_shape, momentum=0.1, eps=1e-5):
        super().__init__()
        pshape = [1] + list(event_shape)
        self.momentum, self.eps = momentum, eps
        self.logGamma = nn.Parameter(torch.zeros(pshape))
        self.beta = nn.Parameter(torch.zeros(pshape))
        self.register_buffer("runningMean", torch.zeros(pshape))
        self.register_buffer("runningVar", torch.ones(pshape))

    def forward(self, x, context=None):
        if self.training:
            mean = x.mean([0], keepdim=True)
            var = (x - mean).pow(2.0).mean([0], keepdim=True)
            with torch.no_grad():
                self.runningMean.mul_(1.0 - self.momentum).add_(mean.detach(), alpha=self.momentum)
                self.runningVar.mul_(1.0 - self.momentum).add_(var.detach(), alpha=self.momentum)
        else:
            mean, var = self.runningMean, self.runningVar
        log_std = (var + self.eps).log() * 0.5
        y = (x - mean) * (self.logGamma - log_std).exp() + self.beta
        ld = constant_log_det(x, (self.logGamma - log_std).sum())
        return y, (ld * 0 if "actnorm" in Bijector.drop else ld)

    def inverse(self, y, context=None):
        log_std = (self.runningVar + self.eps).log() * 0.5
        x = (y - self.beta) * (log_std - self.logGamma).exp() + self.runningMean
        return x, constant_log_det(y, (log_std - self.logGamma).sum())


class LULinear(Bijector):
    """Glow's invertible 1x1 convolution with W = P L (U + diag(sign * exp(logS)))."""
    kind = "lulinear"

    def __init__(self, event_shape):
        super().__init__()
        c = event_shape[0]
        self.c, self.positions = c, float(math.prod(event_shape) // c)
        q, _ = torch.linalg.qr(torch.randn(c, c))
        p, l, u = torch.linalg.lu(q)
        s = u.diagonal()
        self.register_buffer("permutationMatrix", p)
        self.register_buffer("signS", s.sign())
        self.register_buffer("lowerMask", torch.ones(c, c).tril(-1))
        self.register_buffer("upperMask", torch.ones(c, c).triu(1))
        self.lower = nn.Parameter(l * self.lowerMask)
        self.upper = nn.Parameter(u * self.upperMask)
        self.logS = nn.Parameter(s.abs().log())

    def lower_unit(self):
        return self.lower * self.lowerMask + torch.eye(self.c, dtype=self.lower.dtype, device=self.lower.device)

    def upper_diag(self):
        return self.upper * self.upperMask + torch.diag(self.signS * self.logS.exp())

    def weight(self):
        return self.permutationMatrix.matmul(self.lower_unit().matmul(self.upper_diag()))

    def forward(self, x, context=None):
        b = x.shape[0]
        y = self.weight().matmul(x.reshape(b, self.c, -1)).reshape(x.shape)
        return y, constant_log_det(x, self.logS.sum() * self.positions)

    def inverse(self, y, context=None):
        b = y.shape[0]
        # x = U^-1 L^-1 P^T y by two triangular solves on the batch. Core instead solves for W^-1
        # once (c x c) and multiplies, since the batch solves leave x column-major, a channels-last
        # image whose convolutions take LibTorch 2.10's slower path (oneDNN off). Here the batch
        # solves stay: with PyTorch 1.13's oneDNN convolutions they are the faster form (glow-cifar10
        # sampling at batch 16: 9.9 and 10.1 ms per image against 10.5 and 11.2 with Core's form),
        # and the mirror runs at its fastest. The same maps, rounded differently.
        r = self.permutationMatrix.t().matmul(y.reshape(b, self.c, -1))
        z = torch.linalg.solve_triangular(self.lower_unit(), r, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(self.upper_diag(), z, upper=True)
        return x.reshape(y.shape), constant_log_det(y, self.logS.sum() * -self.positions)


class StandardNormal(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("reference", torch.zeros(0))

    def log_prob(self, z):
        return sum_per_sample((z * z + math.log(2.0 * math.pi)) * -0.5)

    def sample(self, shape, temperature=1.0):
        """Standard normal draws [shape...] in the module's dtype and device, times the temperature."""
        return torch.randn(shape, dtype=self.reference.dtype, device=self.reference.device) * temperature


# ---------------------------------------------------------------------------------------------
# Conditioners and the two families (after src/MixerFlow.Host/Models/Builders.cs)

def mlp(inputs, outputs, width, depth):
    layers, d = [], inputs
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    last = nn.Linear(d, outputs)
    nn.init.zeros_(last.weight); nn.init.zeros_(last.bias)
    return nn.Sequential(*(layers + [last]))


class Bfloat16Products(nn.Sequential):
    """A perceptron whose products run in bfloat16 under autocast, float32 in and out (the same
    state_dict names as nn.Sequential): MixerFlow's conditionerPrecision = bfloat16."""

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = super().forward(x)
        return y.float()


def conv_net(inputs, outputs, width):
    last = nn.Conv2d(width, outputs, 3, padding=1)
    nn.init.zeros_(last.weight); nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(inputs, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU(), last)


def zero_conv(inputs, outputs):
    conv = nn.Conv2d(inputs, outputs, 3, padding=1)
    nn.init.zeros_(conv.weight); nn.init.zeros_(conv.bias)
    return conv


def _unsupported(field, value, supported):
    raise NotImplementedError(f"model configuration field '{field}': {value!r} is not mirrored (the mirror supports {supported})")


def build_mixerflow(cfg):
    c, h, w = cfg.get("channels", 1), cfg.get("height", 28), cfg.get("width", 28)
    size, layers = cfg.get("patchSize", 4), cfg.get("layers", 4)
    strategy = cfg.get("patches", "square")
    ph, pw = {"square": (size, size), "bands": (size, w), "stripes": (h, size)}.get(strategy, (None, None))
    if ph is None:
        _unsupported("patches", strategy, "square, bands, stripes")
    classes = cfg.get("classes", 0)
    norm = cfg.get("norm", "actNorm")
    if norm not in ("actNorm", "batchNorm"):
        _unsupported("norm", norm, "actNorm, batchNorm")
    width, depth, steps = cfg.get("hiddenWidth", 128), cfg.get("hiddenDepth", 1), cfg.get("innerSteps", 2)
    precision = cfg.get("conditionerPrecision", "float32")
    if precision not in ("float32", "bfloat16"):
        _unsupported("conditionerPrecision", precision, "float32, bfloat16")

    def conditioner(inputs, outputs):
        net = mlp(inputs, outputs, width, depth)
        return Bfloat16Products(*net) if precision == "bfloat16" else net
    p, d = (h // ph) * (w // pw), c * ph * pw

    def vector_flow(field, n):
        kind = cfg.get(field, "affine")
        if kind not in ("affine", "additive", "spline", "maf"):
            _unsupported(field, kind, "affine, additive, spline, maf")
        bins, spline_bound = cfg.get("splineBins", 8), cfg.get("splineBound", 3.0)
        k = {"affine": 2, "additive": 1, "spline": 3 * bins - 1, "maf": 2}[kind]
        parts = []
        for s in range(steps):
            if kind == "maf":
                parts.append(MaskedAutoregressive(n, width, depth, classes))
                if s < steps - 1:
                    parts.append(Permutation(list(range(n - 1, -1, -1))))
                continue
            swapped = s % 2 == 1
            n_b = n - n // 2 if not swapped else n // 2
            n_a = n - n_b
            parts.append(Coupling(n, swapped, conditioner(n_a + classes, k * n_b), map=kind, bins=bins, spline_bound=spline_bound))
        return parts[0] if len(parts) == 1 else Chain(parts)

    parts = [Logit(cfg.get("alpha", 0.05))]
    for l in range(layers):
        parts += [Patchify(c, h, w, ph, pw),
                  Lifted(p, d, vector_flow("channelFlow", d), along_rows=True),
                  ActNorm((p, d)) if norm == "actNorm" else BatchNormFlow((p, d)),
                  Lifted(d, p, vector_flow("patchFlow", p), along_rows=False),
                  ActNorm((p, d)) if norm == "actNorm" else BatchNormFlow((p, d)),
                  Inverted(Patchify(c, h, w, ph, pw))]
        sign = 1 if l % 2 == 0 else -1
        dy = 0 if strategy == "stripes" else ph // 2
        dx = 0 if strategy == "bands" else pw // 2
        if cfg.get("shift", True) and l < layers - 1 and (dy != 0 or dx != 0):
            parts.append(Shift(sign * dy, sign * dx))
    return Chain(parts)


def build_glow(cfg):
    c, h, w = cfg.get("channels", 1), cfg.get("height", 28), cfg.get("width", 28)
    levels, k_steps, width = cfg.get("levels", 3), cfg.get("stepsPerLevel", 8), cfg.get("glowWidth", 256)

    def level(ch, hh, ww, left):
        sq = (4 * ch, hh // 2, ww // 2)
        parts = [Squeeze()]
        for _ in range(k_steps):
            parts += [ActNorm(sq, [0]), LULinear(sq),
                      Coupling(4 * ch, False, conv_net(2 * ch, 2 * 2 * ch, width), rest=sq[1:], bound=sigmoid_bound)]
        if left > 1:
            parts.append(Coupling(4 * ch, False, zero_conv(2 * ch, 2 * 2 * ch), rest=sq[1:]))
            parts.append(Partial(4 * ch, 2 * ch, level(2 * ch, hh // 2, ww // 2, left - 1)))
        parts.append(Inverted(Squeeze()))
        return Chain(parts)

    return Chain([Logit(cfg.get("alpha", 0.05)), level(c, h, w, levels)])


class ImageFlow(nn.Module):
    """MixerFlow.NET's ImageFlow: transform = Chain(Dequantize, body), standard normal base."""
    def __init__(self, cfg):
        super().__init__()
        kind = cfg.get("kind")
        if kind == "mixerFlow":
            body = build_mixerflow(cfg)
        elif kind == "glow":
            body = build_glow(cfg)
        else:
            raise ValueError(f"model configuration field 'kind': {kind!r}; expected mixerFlow or glow")
        self.config = cfg
        self.shape = (cfg.get("channels", 1), cfg.get("height", 28), cfg.get("width", 28))
        self.dims = math.prod(self.shape)
        self.transform = Chain([Dequantize(self.shape), body])
        self.baseDistribution = StandardNormal()

    @property
    def body(self):
        return self.transform.parts[1]

    def log_prob(self, pixels):
        """log p(x) in nats of 8-bit pixels (uniform dequantisation noise drawn here)."""
        z, ld = self.transform(pixels)
        return self.baseDistribution.log_prob(z) + ld

    def log_prob_continuous(self, y, context=None):
        """log p(x) in nats for already dequantised images y = (x + u) / 256 (context: a
        class-conditional model's one-hot classes [B, classes])."""
        z, ld = self.body(y, context)
        return self.baseDistribution.log_prob(z) + ld - self.dims * math.log(256.0)

    def bits_per_dim(self, pixels):
        return -self.log_prob(pixels) / (self.dims * math.log(2.0))

    def decode(self, z, context=None):
        """(continuous images y in [0, 1), pixels 0..255) of latents z: the body's inverse, then
        dequantisation's (floor(256 y) clamped), as ImageFlow.Decode."""
        y, _ = self.body.inverse(z, context)
        x, _ = self.transform.parts[0].inverse(y)
        return y, x

    def sample(self, n, temperature=1.0):
        """n images (pixels), as Flow.Sample: base draws through the whole transform's inverse
        (its log-dets summed too, as ours)."""
        z = self.baseDistribution.sample((n,) + self.shape, temperature)
        x, _ = self.transform.inverse(z)
        return x


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def build_checked(cfg, expected, source):
    model = ImageFlow(cfg)
    n = parameter_count(model)
    if expected is not None and n != expected:
        raise SystemExit(f"{source}: the mirror has {n:,} parameters, MixerFlow.NET {expected:,}: the mirror does not match this configuration")
    return model


# ---------------------------------------------------------------------------------------------
# Commands

def cmd_params(args):
    cfg, expected = read_config(args.config)
    model = build_checked(cfg, expected, args.config)
    print(f"parameters {parameter_count(model)}" + (" (equal to MixerFlow.NET's)" if expected is not None else ""))


def load_export(path, dtype_name):
    """(model in evaluation mode in that dtype, its configuration, dtype) from a weight export."""
    tensors, meta = read_safetensors(path)
    if "mixerflow.config" not in meta:
        raise SystemExit(f"{path}: the export's metadata has no mixerflow.config")
    cfg = json.loads(meta["mixerflow.config"])
    expected = int(meta["mixerflow.parameters"]) if "mixerflow.parameters" in meta else None
    model = build_checked(cfg, expected, path)
    ours, theirs = set(model.state_dict()), set(tensors)
    if ours != theirs:
        raise SystemExit(f"{path}: names differ; only in the export: {sorted(theirs - ours)[:5]}, only in the mirror: {sorted(ours - theirs)[:5]}")
    model.load_state_dict(tensors, strict=True)
    dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    return model.to(dtype).eval(), cfg, dtype


def read_batch(path, name, cfg, dtype):
    """(tensor `name`, tensor `context` or None) from a safetensors file, in `dtype`; a
    class-conditional model (cfg's `classes`) needs the context."""
    tensors, _ = read_safetensors(path)
    if name not in tensors:
        raise SystemExit(f"{path}: no tensor named '{name}'")
    context = tensors["context"].to(dtype) if "context" in tensors else None
    if cfg.get("classes", 0) and context is None:
        raise SystemExit(f"{path}: the model is class-conditional ({cfg['classes']} classes): give a tensor 'context' [B, classes]")
    return tensors[name].to(dtype), context


def cmd_decode(args):
    model, cfg, dtype = load_export(args.weights, args.dtype)
    Bijector.skip = frozenset(args.skip_inverse or [])
    z, context = read_batch(args.latents, "latents", cfg, dtype)
    if tuple(z.shape[1:]) != model.shape:
        raise SystemExit(f"{args.latents}: latents of shape {list(z.shape)}; the model needs [B, {', '.join(map(str, model.shape))}]")
    with torch.no_grad():
        y, x = model.decode(z, context)
    write_safetensors(args.out, {"continuous": y.to(torch.float64), "images": x.to(torch.float64)},
                      {"parameters": str(parameter_count(model))})
    print(f"parameters {parameter_count(model)}; decoded {z.shape[0]} latents; mean pixel value per image: " +
          ", ".join(f"{v:.3f}" for v in x.flatten(1).mean(1).tolist()))


def cmd_logprob(args):
    model, cfg, dtype = load_export(args.weights, args.dtype)
    Bijector.drop = frozenset(args.drop_logdet or [])
    y, context = read_batch(args.inputs, "inputs", cfg, dtype)
    with torch.no_grad():
        lp = model.log_prob_continuous(y, context)
    write_safetensors(args.out, {"logprob": lp.to(torch.float64)}, {"parameters": str(parameter_count(model))})
    print(f"parameters {parameter_count(model)}; log p per image (nats): " + ", ".join(f"{v:.6f}" for v in lp.tolist()))


def cmd_time(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    cfg, expected = read_config(args.config)
    if cfg.get("classes", 0):
        _unsupported("classes", cfg["classes"], "unconditional models for timing (classes 0)")
    if args.expect_parameters is not None:
        expected = args.expect_parameters
    model = build_checked(cfg, expected, args.config)
    shapes = {}

    def hook(m, inp, out):
        x = inp[0]
        if isinstance(m, nn.Linear):
            key = ("linear", x.numel() // x.shape[-1], x.shape[-1], out.shape[-1])
        else:  # ATen's im2col product per image: [C_out, C_in k k] x [C_in k k, H_out W_out]
            key = ("conv", m.out_channels, m.in_channels * m.kernel_size[0] * m.kernel_size[1], out.shape[-1] * out.shape[-2])
        shapes[key] = shapes.get(key, 0) + (x.shape[0] if key[0] == "conv" else 1)

    batch = lambda: torch.randint(0, 256, (args.batch,) + model.shape).float()
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    model.train()
    with torch.no_grad():
        model.bits_per_dim(batch()).mean().item()   # also ActNorm's data initialisation
    for h in hs:
        h.remove()
    flops = sum(2 * m * k * n * c for (_, m, k, n), c in shapes.items())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    phases = []   # per step: forward (to the loss value), zero_grad and backward, clipping and Adam; ms

    def step():
        x = batch()
        t0 = time.perf_counter()
        loss = model.bits_per_dim(x).mean()
        if not math.isfinite(loss.item()):
            raise SystemExit("non-finite loss")
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        norm = nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        if math.isfinite(float(norm)):
            opt.step()
        t3 = time.perf_counter()
        phases.append([(t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000])
        return (t3 - t0) * 1000

    def evaluate():
        """ms per image of bits/dim of one batch, evaluation mode, no gradient (benchmarks/Speed's Evaluate)."""
        x = batch()
        model.eval()
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                model.bits_per_dim(x).mean().item()
                return (time.perf_counter() - t0) * 1000 / args.batch
        finally:
            model.train()

    def sample():
        """ms per image of sampling a batch of pixels, evaluation mode, no gradient (benchmarks/Speed's Sample)."""
        model.eval()
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                model.sample(args.sample_batch).sum().item()
                return (time.perf_counter() - t0) * 1000 / args.sample_batch
        finally:
            model.train()

    for _ in range(2):
        step()   # warm-up
    evaluate(); sample()   # first calls
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "parameters": parameter_count(model),
            "forward_gflop": flops / 1e9,
            "gemms": [f"{kind} [{m}x{k}]x[{k}x{n}]" + (f" x{c}" if c > 1 else "") for (kind, m, k, n), c in
                      sorted(shapes.items(), key=lambda kv: -kv[0][1] * kv[0][2] * kv[0][3] * kv[1])]}
    if args.serve:
        print(json.dumps(info), flush=True)
        # `N`: N training steps (ms each, and each step's phases: forward, backward, update);
        # `eval N`, `sample N`: N evaluations or samplings (ms per image).
        actions = {"eval": evaluate, "sample": sample}
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "quit":
                break
            action = actions.get(words[0]) if len(words) == 2 else step if len(words) == 1 else None
            if action is None:
                raise SystemExit(f"--serve: unknown request {line.strip()!r} (expected N, eval N, sample N or quit)")
            del phases[:]
            answer = {"ms": [action() for _ in range(int(words[-1]))]}
            if action is step:
                answer["phases"] = list(phases)
            print(json.dumps(answer), flush=True)
        return
    times = [step() for _ in range(args.steps)]
    evals = [evaluate() for _ in range(max(3, args.steps // 5))]
    samples = [sample() for _ in range(max(3, args.steps // 5))]
    print(f"torch {info['torch']}, {info['threads']} thread(s); parameters {info['parameters']:,}; forward {flops / 1e9:.3f} GFLOP")
    print("forward GEMMs: " + "; ".join(info["gemms"]))
    print(f"training step at batch {args.batch}: median {statistics.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f}, "
          f"{len(times)} steps); {3 * flops / 1e9 / (statistics.median(times) / 1000):.1f} GFLOP/s; load average {os.getloadavg()}")
    print(f"evaluation at batch {args.batch}: median {statistics.median(evals):.3f} ms per image ({len(evals)} batches); "
          f"sampling at batch {args.sample_batch}: median {statistics.median(samples):.3f} ms per image ({len(samples)} batches)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params"); p.add_argument("config"); p.set_defaults(run=cmd_params)
    p = sub.add_parser("logprob")
    p.add_argument("--weights", required=True); p.add_argument("--inputs", required=True); p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--drop-logdet", action="append", choices=["actnorm", "coupling", "logit"])
    p.set_defaults(run=cmd_logprob)
    p = sub.add_parser("decode")
    p.add_argument("--weights", required=True); p.add_argument("--latents", required=True); p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--skip-inverse", action="append", choices=["actnorm", "coupling", "logit", "shift", "lulinear"])
    p.set_defaults(run=cmd_decode)
    p = sub.add_parser("time"); p.add_argument("config")
    p.add_argument("--batch", type=int, default=64); p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sample-batch", type=int, default=16, help="images per sampling call (benchmarks/Speed: 16)")
    p.add_argument("--threads", type=int, default=1); p.add_argument("--serve", action="store_true")
    p.add_argument("--expect-parameters", type=int, help="MixerFlow.NET's parameter count: refuse to time a mirror that differs")
    p.set_defaults(run=cmd_time)
    args = ap.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, NotImplementedError, OSError) as e:
        raise SystemExit(f"mixerflow_mirror: {e}")


if __name__ == "__main__":
    main()
