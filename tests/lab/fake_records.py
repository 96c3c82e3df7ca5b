"""Experiments written as records by hand, with fixed numbers, so a test knows every figure a report must show."""

import math

import numpy as np
import torch
from safetensors.torch import save

from bnlab import lab
from bnlab.lab import records


def write_experiment(root, finals: dict, *, recipe: str = "blobs", epochs: int = 5, metric: str = "val_accuracy", facts=None,
                     test: bool = False, command=("test",), env=None):
    """Records of ``recipe`` (``epochs`` epochs) where arm -> per-seed entries say how each run ended.

    An entry is a float (the run finished with that final ``metric``; its curve rises linearly from 0.5 to it)
    or ``("diverged", k)`` (the run's figures stopped being finite at epoch k). ``test``: the final figures also
    hold ``test_<metric>``, equal to the validation figure (a recipe that validates on the test set).
    ``command``, ``env``: what ``config.json`` and ``env.json`` record. Returns the directory.
    """
    r = lab.with_overrides(lab.get(recipe), {"epochs": epochs})
    seeds = list(range(max(len(v) for v in finals.values())))
    cfg = {"recipe": r.to_dict(), "seeds": seeds, "arms": list(finals), "command": list(command), "nproc": 1, "facts": facts or {}}
    records.write_json(root / "config.json", cfg)
    records.write_json(root / "env.json", env or {"bnlab": "test", "torch": torch.__version__, "cpu_count": 2})
    for arm, entries in finals.items():
        for seed, entry in enumerate(entries):
            rd = records.run_dir(root, arm, seed)
            if isinstance(entry, tuple):
                k = entry[1]
                history = {"loss": [1.0] * (k - 1) + [math.nan], metric: [0.5] * (k - 1) + [math.nan]}
                final = {"arm": arm, "seed": seed, "epochs": k, "diverged_epoch": k, "diverged_in": "training", "checks": {}}
            else:
                history = {"loss": list(np.linspace(1.0, 0.5, epochs)), metric: list(np.linspace(0.5, entry, epochs))}
                final = {"arm": arm, "seed": seed, "epochs": epochs, "diverged_epoch": None, "loss": 0.5, metric: entry, "checks": {}}
                if test:
                    final["test_" + metric.removeprefix("val_")] = entry
            records.write_history(rd / "history.csv", history)
            records.write_json(rd / "final.json", final)
            records.atomic_write_bytes(rd / "weights.safetensors", save({"w": torch.zeros(2)}))
    return root
