"""Compare the three uses of one bounds spec on the same small spiking task.

Run: ``python examples/compare_three_uses.py``
"""

import torch

from parambounds.demo import train

torch.set_num_threads(1)  # small tensors: one thread is fastest, and steady on a busy machine

rows = [(use, train(use)) for use in ("none", "penalty", "project", "reparametrize")]
print(
    "| use | final loss | accuracy | bounds held every step "
    "| elements outside or NaN at end | ms/step |"
)
print("|---|---|---|---|---|---|")
for use, r in rows:
    held = "yes" if r["held_every_step"] else "no"
    print(
        f"| {use} | {r['loss']:.3f} | {r['accuracy']:.2f} | {held}"
        f" | {r['outside_at_end']} | {r['ms_per_step']:.1f} |"
    )
