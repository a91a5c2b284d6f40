"""Why does UrbanFusion's fused vector lose what a plain concatenation keeps? (issue 8, CityView diagnosis)

For one city and modality set: probe (tuned Ridge, protocol ``spatial``, seed 0) the frozen inputs one by
one and concatenated (``concat``), then fit one UrbanFusion configuration and probe its fused vector (mean
read-out), its fused tokens side by side (``readout="tokens"``), and the fused vector with each modality
dropped at inference (``--drop``; with ``--tokens`` the token read-out is the one dropped from); print each
embedding's width and effective rank (exp of the entropy of the normalised squared singular values), the
final loss and temperature, and how easily the contrastive task is solved (top-1 retrieval among 256
regions between the all-modality view and a one-modality view).

    URBANPROFILE_DATA=../shared/data python benchmarks/multimodal_diagnose.py cityview-guangzhou location,text \
        '{"lambda_rec": 1.0}' rec1 [--inputs] [--tokens] [--drop]

Writes benchmarks/results/multimodal_diagnose_<city>_<label>.json. One torch thread.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from common import RESULTS, set_threads, write_json

from urbanprofile.data.registry import load_dataset
from urbanprofile.embedders.base import as_embedding
from urbanprofile.embedders.multimodal.modal_baselines import ConcatModalities
from urbanprofile.embedders.multimodal.urbanfusion import UrbanFusionEmbedder, city_modalities
from urbanprofile.evaluation import evaluate_embedding

TASKS = ["carbon", "population"]


def main() -> None:
    set_threads(1)
    name, mods = sys.argv[1], tuple(sys.argv[2].split(","))
    params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    label = sys.argv[4] if len(sys.argv) > 4 and not sys.argv[4].startswith("--") else "default"
    city = load_dataset(name)
    record: dict[str, object] = {"dataset": name, "modalities": mods, "params": params, "probes": []}

    def probe(what: str, values: np.ndarray) -> None:
        emb = as_embedding(np.asarray(values, float), city.region_ids)
        r2 = [evaluate_embedding(city, emb, t, "spatial", "ridge", 0).metrics["r2"] for t in TASKS]
        s = np.linalg.svd(emb.to_numpy() - emb.to_numpy().mean(0), compute_uv=False)
        p = s**2 / (s**2).sum()
        erank = float(np.exp(-(p * np.log(p + 1e-12)).sum()))
        record["probes"].append({"embedding": what, "dim": emb.shape[1], "erank": erank,  # type: ignore[attr-defined]
                                 **dict(zip(TASKS, r2, strict=True))})
        print(f"{what:40s} dim={emb.shape[1]:5d} erank={erank:7.1f}  carbon={r2[0]:.3f} pop={r2[1]:.3f}", flush=True)

    feats = city_modalities(city, mods, progress=False)
    if "--inputs" in sys.argv:
        for m in mods:
            v, present = feats.values[m], feats.present[m]
            v = np.where(present[:, None], v, np.nanmean(v[present], 0))
            probe(f"input {m}", v if present.all() else np.column_stack([v, present]))
        probe("concat", ConcatModalities(mods).fit_transform(city).to_numpy())

    t0 = time.time()
    model = UrbanFusionEmbedder(train_modalities=mods, random_state=0, **params).fit(city)
    record["fit_s"] = time.time() - t0
    record["loss_first_last"] = [model.loss_history_[0], model.loss_history_[-1]]
    record["temperature"] = float(1 / np.exp(model.model_.logit_scale.item()))
    print(f"fit {record['fit_s']:.0f}s loss first/last {model.loss_history_[0]:.3f}/{model.loss_history_[-1]:.3f} "
          f"temp={record['temperature']:.4f}", flush=True)
    probe("fused (mean of tokens)", model.transform(city).to_numpy())
    net = model.model_
    z = [torch.from_numpy(model.standardise(k, feats.values[k])) for k in model.names_]
    mask = torch.from_numpy(np.column_stack([feats.present[k] for k in model.names_]))
    with torch.inference_mode():
        if "--tokens" in sys.argv:
            probe("fused tokens concatenated", net(z, mask, readout="tokens").numpy())
        full = net(z, mask)
        retrieval = {}
        for k, nm in enumerate(model.names_):
            only = torch.zeros_like(mask)
            only[:, k] = mask[:, k]
            rows = mask[:, k]
            a = torch.nn.functional.normalize(net.head(full[rows]), dim=-1)
            b = torch.nn.functional.normalize(net.head(net(z, only)[rows]), dim=-1)
            idx = torch.randperm(len(a), generator=torch.Generator().manual_seed(0))[:256]
            sim = a[idx] @ b[idx].T
            retrieval[nm] = (sim.argmax(1) == torch.arange(len(idx))).float().mean().item()
            print(f"retrieval full vs only-{nm} (256-way top1): {retrieval[nm]:.3f}", flush=True)
        record["retrieval_top1"] = retrieval
        for k, nm in enumerate(model.names_):
            drop = mask.clone()
            drop[:, k] = False
            if drop.any(1).all() and "--drop" in sys.argv:
                readout = "tokens" if "--tokens" in sys.argv else "mean"
                probe(f"fused ({readout}) without {nm}", net(z, drop, readout=readout).numpy())
    write_json(RESULTS / f"multimodal_diagnose_{name}_{label}.json", record)


if __name__ == "__main__":
    main()
