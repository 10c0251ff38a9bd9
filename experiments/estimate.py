# The budget estimate of experiments/README.md: minutes per spec from measured step and evaluation times.
t = {'mixerflow': 41, 'bands': 55, 'stripes': 56, 'shift-off': 37, 'additive': 45, 'spline': 262, 'maf': 39, 'batchnorm': 40, 'glow': 442}
loop = 1.3                                      # real training loop / info --time-step
ev = {k: 4 * v / 41 for k, v in t.items()}      # s per evaluation of the 10,000 test images
ev['glow'] = 94                                 # measured: eval of a checkpoint on the test split
ev['spline'] = 40                               # measured: a 20-step run of inner-flows.json
start = 10                                      # per run: process, data, pictures
specs = {
    'mixerflow-vs-glow': (3000, [('mixerflow', 1), ('glow', 1)], 7000),
    'patches': (12000, [('mixerflow', 1), ('bands', 1), ('stripes', 1)], 7000),
    'shift': (10000, [('mixerflow', 2), ('shift-off', 2)], 7000),
    'inner-flows': (4500, [('mixerflow', 1), ('additive', 1), ('spline', 1), ('maf', 1)], 7000),
    'normalisation': (10000, [('mixerflow', 2), ('batchnorm', 2)], 7000),
    'embeddings': (2800, [('mixerflow', 1), ('glow', 1)], 20000),
}
for name, (S, runs, probe) in specs.items():
    evals = 1 + S // 937 + (1 if S % 937 else 0)
    tot, parts = 0, []
    for r, seeds in runs:
        x = seeds * (S * t[r] * loop / 1000 + evals * ev[r] + probe * ev[r] / 10000 + start)
        parts.append(f"{r} {x / 60:.0f}"); tot += x
    print(f"| {name} | {S:,} | {evals} | {'; '.join(parts)} | {tot / 60:.0f} |")
