#!/usr/bin/env python3
"""PyTorch mirror of MixerFlow.NET's `fashion-mnist` preset: the same parameter counts and GEMM
shapes, timing the same training step (forward, bits/dim, backward, global-norm clipping at 50,
Adam at lr 1e-4) at batch 64 on one thread.

    OPENBLAS_NUM_THREADS=1 python3 benchmarks/mirror/fashion_mnist_mixerflow.py [--steps 30]

Debian's python3-torch (1.13) uses OpenBLAS; the environment here sets OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, which halve its speed: unset both for a fair run (see /work/shared/NOTES.md).
Written to mirror src/MixerFlow.Host/Models/Builders.cs and MixerFlow.Core's bijectors
(Logit, Patchify, RowWise/ColumnWise couplings with soft-clamped affine maps, ActNorm, Shift);
no unit test runs it.
"""
import argparse, math, os, statistics, time
import torch
from torch import nn

C, H, W, PATCH, LAYERS, INNER, HIDDEN = 1, 28, 28, 4, 4, 2, 96
ALPHA, CLIP, LR, BATCH = 0.05, 50.0, 1e-4, 64
P = (H // PATCH) * (W // PATCH)   # 49 patches
D = C * PATCH * PATCH             # 16 values per patch
DIMS = C * H * W


def mlp(inputs, outputs):
    last = nn.Linear(HIDDEN, outputs)
    nn.init.zeros_(last.weight); nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(inputs, HIDDEN), nn.ReLU(), last)


class AffineCoupling(nn.Module):
    """Over vectors of n; halves (first conditions second), or swapped."""
    def __init__(self, n, swapped):
        super().__init__()
        h = n // 2
        a, b = (list(range(h)), list(range(h, n)))
        self.cond, self.trans = (b, a) if swapped else (a, b)
        self.register_buffer("ci", torch.tensor(self.cond)); self.register_buffer("ti", torch.tensor(self.trans))
        self.net = mlp(len(self.cond), 2 * len(self.trans))

    def forward(self, x):
        xa, xb = x.index_select(1, self.ci), x.index_select(1, self.ti)
        h = self.net(xa).reshape(x.shape[0], 2, len(self.trans))
        log_s = 2.0 * torch.tanh(h[:, 1] / 2.0)        # ScaleBound.SoftClamp 2
        yb = xb * log_s.exp() + h[:, 0]
        y = torch.empty_like(x)
        y[:, self.ci] = xa; y[:, self.ti] = yb
        return y, log_s.sum(1)


class ActNorm(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(shape)); self.log_scale = nn.Parameter(torch.zeros(shape))
        self.initialised = False

    def forward(self, x):
        if not self.initialised and self.training:
            with torch.no_grad():
                self.bias.copy_(-x.mean(0)); self.log_scale.copy_(-(x.std(0) + 1e-6).log())
            self.initialised = True
        return (x + self.bias) * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])


def patchify(x):   # [B, C, H, W] -> [B, P, D] (channel-major within a patch)
    b = x.shape[0]
    x = x.reshape(b, C, H // PATCH, PATCH, W // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, P, D)


def unpatchify(x):
    b = x.shape[0]
    x = x.reshape(b, H // PATCH, W // PATCH, C, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, C, H, W)


class Layer(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.channel = nn.ModuleList(AffineCoupling(D, s % 2 == 1) for s in range(INNER))
        self.patch = nn.ModuleList(AffineCoupling(P, s % 2 == 1) for s in range(INNER))
        self.n1, self.n2 = ActNorm((P, D)), ActNorm((P, D))
        sign = 1 if index % 2 == 0 else -1
        self.shift = (sign * PATCH // 2, sign * PATCH // 2) if index < LAYERS - 1 else None

    def forward(self, x):
        b = x.shape[0]
        ld = x.new_zeros(b)
        m = patchify(x)
        rows = m.reshape(b * P, D)                      # RowWise: every patch a batch element
        for c in self.channel:
            rows, l = c(rows); ld = ld + l.reshape(b, P).sum(1)
        m, l = self.n1(rows.reshape(b, P, D)); ld = ld + l
        cols = m.transpose(1, 2).reshape(b * D, P)      # ColumnWise: every channel a batch element
        for c in self.patch:
            cols, l = c(cols); ld = ld + l.reshape(b, D).sum(1)
        m, l = self.n2(cols.reshape(b, D, P).transpose(1, 2)); ld = ld + l
        x = unpatchify(m)
        if self.shift is not None:
            x = x.roll(self.shift, (2, 3))
        return x, ld


class MixerFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer(i) for i in range(LAYERS))

    def bits_per_dim(self, pixels):
        x = (pixels + torch.rand_like(pixels)) / 256.0
        ld = torch.full((x.shape[0],), -DIMS * math.log(256.0))
        p = ALPHA + (1 - 2 * ALPHA) * x
        y = p.log() - (1 - p).log()
        ld = ld + (math.log(1 - 2 * ALPHA) - p.log() - (1 - p).log()).flatten(1).sum(1)
        for layer in self.layers:
            y, l = layer(y); ld = ld + l
        logp = -0.5 * (y * y).flatten(1).sum(1) - 0.5 * DIMS * math.log(2 * math.pi) + ld
        return -logp / (DIMS * math.log(2.0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    model = MixerFlow()
    parts = {
        "channel-mixing flows": sum(p.numel() for l in model.layers for p in l.channel.parameters()),
        "patch-mixing flows": sum(p.numel() for l in model.layers for p in l.patch.parameters()),
        "normalisation": sum(p.numel() for l in model.layers for n in (l.n1, l.n2) for p in n.parameters()),
    }
    total = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()}")
    print(f"parameters {total:,} " + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
    shapes = {}
    def hook(m, inp, out):
        x = inp[0]; k = (x.numel() // x.shape[-1], x.shape[-1], out.shape[-1])
        shapes[k] = shapes.get(k, 0) + 1
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    pixels = torch.randint(0, 256, (BATCH, C, H, W)).float()
    model.train(); model.bits_per_dim(pixels).mean().backward()    # also ActNorm's data init
    for h in hs: h.remove()
    flops = sum(2 * m * k * n * c for (m, k, n), c in shapes.items())
    print("forward GEMMs: " + "; ".join(f"[{m}x{k}]x[{k}x{n}] x{c}" for (m, k, n), c in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[1])))
    print(f"forward {flops / 1e9:.3f} GFLOP, training step {3 * flops / 1e9:.2f} GFLOP")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    times, cpu = [], []
    for i in range(args.steps + 2):
        x = torch.randint(0, 256, (BATCH, C, H, W)).float()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model.bits_per_dim(x).mean()
        loss.item()
        opt.zero_grad(); loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1000); cpu.append((time.process_time() - c0) * 1000)
    q = statistics.quantiles(times, n=4)
    print(f"training step at batch {BATCH}: median {statistics.median(times):.1f} ms (quartiles {q[0]:.1f}-{q[2]:.1f}, "
          f"min {min(times):.1f}, max {max(times):.1f}, {len(times)} steps), CPU {statistics.median(cpu):.1f} ms; "
          f"{3 * flops / 1e9 / (statistics.median(times) / 1000):.1f} GFLOP/s; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
