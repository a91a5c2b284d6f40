"""Run the HAFusion authors' code (a checkout given by path, never copied here) once, final epoch, eval mode.

Used by ``benchmarks/embedders.py --parts fidelity --authors-code PATH``. Their modules parse the city
from ``sys.argv`` at import and read ``./data_<city>/``; this driver links that folder to our copy of
the data, seeds torch, trains with their model and loss for their number of epochs (no epoch selection,
no evaluation during training) and writes the final epoch's eval-mode embedding as ``.npy`` plus a JSON
line with the timings and the parameter count on stdout.

    python benchmarks/authors_hafusion.py --code /work/ref/HAFusion --city Chi --data ../shared/data/hafusion/chicago \
        --seed 0 --out emb.npy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import set_threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, required=True, help="checkout of MiRuacle24/HAFusion")
    parser.add_argument("--city", choices=["NY", "Chi", "SF"], required=True)
    parser.add_argument("--data", type=Path, required=True, help="the city's folder in the HAFusion layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: theirs (2000)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    code, data, out = args.code.resolve(), args.data.resolve(), args.out.resolve()
    for module in ("HAFusion_Model.py", "HAFusion_train.py", "parse_args.py", "utils.py"):
        if not (code / module).is_file():
            sys.stderr.write(f"error: {code} has no {module}: not a HAFusion checkout\n")
            return 2

    import numpy as np
    import torch

    set_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="hafusion-authors-"))
    (work / f"data_{args.city}").symlink_to(data, target_is_directory=True)
    for task_dir in code.glob("tasks_*"):  # their training module imports every city's task modules
        (work / task_dir.name).symlink_to(task_dir, target_is_directory=True)
    os.chdir(work)
    sys.argv = [sys.argv[0], "--city", args.city] + (["--epochs", str(args.epochs)] if args.epochs else [])
    sys.path.insert(0, str(code))
    from HAFusion_Model import HAFusion
    from HAFusion_train import ModelLoss
    from parse_args import args as their
    from utils import load_data

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    features, mob_adj, poi_sim, land_sim = load_data()
    model = HAFusion(their.POI_dim, their.landUse_dim, their.region_num, their.embedding_size, their.d_prime,
                     their.d_m, their.c)
    loss_fn = ModelLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=their.learning_rate, weight_decay=their.weight_decay)
    start = time.perf_counter()
    for _ in range(their.epochs):
        model.train()
        out_s, out_t, out_p, out_l = model(features)
        loss = loss_fn(out_s, out_t, mob_adj, out_p, poi_sim, out_l, land_sim)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        model(features)
        embedding = model.out_feature().detach().cpu().numpy()
    np.save(out, np.asarray(embedding, dtype=np.float64).reshape(their.region_num, -1))
    print(json.dumps({"epochs": their.epochs, "wall_seconds": seconds, "seconds_per_epoch": seconds / their.epochs,
                      "parameters": sum(p.numel() for p in model.parameters()), "final_loss": float(loss.detach())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
