"""A trained BN arm's validation accuracy before and after re-estimating its moving statistics.

    python benchmarks/recalibrate.py runs/recipes/digits28-cnn

For each seed of the run's BN arm: rebuild the model from the records
(``config.json``, ``weights.safetensors``), measure its accuracy on the
validation rows (Keras' ``validation_split``: the last fraction of the
training data), then set every BN layer's statistics to the exact pooled
statistics of the training rows with :func:`bnlab.recalibrate` (in batches of
the recipe's size) and measure again. It shows how much of an arm's
inference-mode accuracy was lost to moving statistics that had not caught up
with the weights (``digits28-cnn``: 125 updates at momentum 0.99 keep 28% of
the initial values).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import bnlab
from bnlab import lab
from bnlab.lab import records


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a records directory of a classifier recipe with a validation split")
    args = p.parse_args(argv)
    root = Path(args.run)
    config = records.read_config(root / "config.json")
    recipe = lab.Recipe.from_dict(config["recipe"])
    if not recipe.validation_split:
        p.error(f"{recipe.name} has no validation split (validation: {recipe.validation!r})")
    data = lab.load_data(recipe)
    cut = int(len(data.x_train) * (1 - recipe.validation_split))  # as Keras (and the lab's fit) split
    x_train, x_val, y_val = data.x_train[:cut], data.x_train[cut:], data.y_train[cut:]
    print(f"{recipe.name}: BN arm, validation accuracy before and after bnlab.recalibrate over {cut} training rows")
    print(f"{'seed':>4}  {'recorded':>8}  {'rebuilt':>8}  {'recalibrated':>12}")
    for seed in config["seeds"]:
        run = records.run_dir(root, "bn", seed)
        model = lab.build_model(recipe, "bn", seed)
        model.load_state_dict(load_file(run / "weights.safetensors"))
        recorded = records.read_final(run / "final.json").get("val_accuracy", float("nan"))
        before = accuracy(model, x_val, y_val)
        bnlab.recalibrate(model, x_train.split(recipe.batch_size))
        print(f"{seed:>4}  {recorded:>8.3f}  {before:>8.3f}  {accuracy(model, x_val, y_val):>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
