"""Gemma's massive activations: how much of each run's EV and CE increase the few massive-norm positions carry.

    python results/lm-gemma3-270m/massive_positions.py RUN_DIR [RUN_DIR ...]   (output: massive_positions.txt)

On `hsae eval`'s held-out rows, a position is massive when its activation norm exceeds 4x the median of its batch (4 rows)
(on Gemma-3-270M layer 9: the apostrophe token, norm ~64k against a median of ~5.4k; 14 of 8,128
positions). Prints each run's explained variance over all positions and over the rest (variance of the
rest around its own mean), and its CE increase with the reconstruction spliced in everywhere, everywhere
but the massive positions, and only there."""
import sys, torch
from hsae_fast.eval.runs import load_run, EvalData
from hsae_fast.data.lm import patched_layer

runs = sys.argv[1:]
first = load_run(runs[0])
data = EvalData(first, 8192, batch_rows=4, with_logits=True)
layers = {r: load_run(r).layer for r in runs}
tot = {}
count = 0
with torch.no_grad():
    for batch in data.batches():
        keep = ~batch.special
        scored = keep[:, :-1]
        targets = batch.rows[:, 1:][scored]
        clean = batch.logits[:, :-1][scored].float().log_softmax(-1)
        count += int(scored.sum())
        norms = batch.hidden.norm(dim=-1)
        massive = keep & (norms > 4 * norms[keep].median())
        for r, layer in layers.items():
            x_hat = layer(batch.x).x_hat
            full = batch.hidden.clone(); full[keep] = x_hat
            for name, mask in (("all", keep), ("all but massive", keep & ~massive), ("massive only", massive)):
                def patch(h, mask=mask):
                    out = h.clone(); out[mask] = full[mask].to(h.dtype); return out
                with patched_layer(data.model, data.hooked_layer, patch):
                    logits = data.model(input_ids=batch.rows, use_cache=False).logits
                lp = logits[:, :-1][scored].float().log_softmax(-1)
                ce = -(lp.gather(1, targets[:, None]) - clean.gather(1, targets[:, None])).double().sum()
                tot[(r, name)] = tot.get((r, name), 0) + float(ce)
            err = (x_hat - batch.x).pow(2).sum(-1)
            m = massive[keep]
            tot[(r, "sq err massive")] = tot.get((r, "sq err massive"), 0) + float(err[m].sum())
            tot[(r, "sq err rest")] = tot.get((r, "sq err rest"), 0) + float(err[~m].sum())
        tot[("data", "massive positions")] = tot.get(("data", "massive positions"), 0) + int(massive.sum())
        xs = batch.x.double(); m = massive[keep]
        for name, sel in (("all", torch.ones_like(m)), ("rest", ~m)):
            for stat, v in (("n", float(sel.sum())), ("s1", xs[sel].sum(0)), ("s2", float(xs[sel].pow(2).sum()))):
                key = ("var", name + stat)
                tot[key] = tot.get(key, 0) + v
for name in ("all", "rest"):
    n, s1, s2 = tot[("var", name + "n")], tot[("var", name + "s1")], tot[("var", name + "s2")]
    tot[("var", name + " total variance")] = s2 - float((s1 * s1).sum()) / n
for r in runs:
    print(f"{r:28s} EV all {1 - (tot[(r, 'sq err massive')] + tot[(r, 'sq err rest')]) / tot[('var', 'all total variance')]:.4f}"
          f"  EV without massive {1 - tot[(r, 'sq err rest')] / tot[('var', 'rest total variance')]:.4f}")
for (r, name), v in tot.items():
    if r == "var":
        continue
    print(f"{r:28s} {name:20s} {v / count if 'sq' not in name and r != 'data' else v:.4f}")
print("scored", count)
