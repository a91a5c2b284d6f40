"""Mini-batch training with a halo: each batch's regions get their full-batch outputs, the loss its full-batch rows.

The mini-batch mode of :mod:`.minibatch` attends within a batch and scores the losses on the batch's pairs only, so
a region near a batch border sees fewer neighbours than in full batch and the softmax runs over the batch: on
small cities a different method (``benchmarks/results/minibatch.md``). Here, in the manner of GraphSAGE and
Cluster-GCN with their neighbourhood halos, a batch is:

- its *seed* regions (a spatially compact batch of :func:`.minibatch.compact_batches`);
- their *trip partners*: every region a seed sends trips to or receives trips from (the mobility rows of the
  seeds are non-zero only there), which with the seeds make the batch's fixed candidates ``D``;
- negatives from outside ``D``: under ``negatives="auto"`` (the default) *every* region outside ``D`` when there
  are at most :data:`EXACT_REST` (1,024) of them, else :data:`AUTO_NEGATIVES` (32) drawn uniformly; ``"all"``:
  every region outside ``D`` whatever their number; an integer ``M``: ``M`` drawn uniformly (all of them when
  there are no more than ``M``);
- the *halo*: every region within ``hops`` neighbourhood steps of those (``hops`` = the network's attention layers;
  read-only context whose own outputs are wrong and never used). A network with dense attention has the whole
  city as its halo, so it runs its full-batch forward.

The candidates (``D`` and the negatives) therefore get exactly their full-batch embeddings. The loss is the seeds'
rows of the full-batch loss: for each seed, its mobility cross-entropy over destinations (and as a destination,
over origins) and its similarity errors against every region; sums over all regions are estimated from the
candidates, ``D`` with weight 1 and each negative with weight ``(N - |D|) / negatives`` (a stratified sample: exact
when the negatives are all the rest, unbiased for the similarity sums and the softmax normaliser otherwise). The
view fusion's mean over regions of its view scores is estimated the same way. So under ``"auto"`` a batch of a small
city (at most 1,024 regions outside its seeds and partners) has no sampling error at all: its loss is exactly the
seeds' rows of the full-batch loss; a large city's batches keep 32 sampled negatives (their cost is the halo each
negative brings, so a bound, not a share of N). Normalisations are the full-batch
ones (``/ N^2``, ``/`` the city's count of non-empty rows), so over an epoch the batches' losses add up to the
full-batch loss, and with every region a candidate their gradients add up to the full-batch gradient:
``accumulate=True`` takes one optimizer step per epoch with that sum (the full-batch step,
``tests/embedders/multiview/test_minibatch_halo.py``), the default takes one step per batch on the batch's loss
times ``N / seeds`` (an estimate of the full loss; the fast path).

Memory: per step the halo of the candidates (linear in the batch, the partners and the negatives), the objective's
sparse matrices and one ``N``-long scratch array; never N x N.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from scipy import sparse

from urbanprofile.data.city import CityData
from urbanprofile.embedders.multiview.minibatch import (
    BatchedRun,
    BatchMaker,
    MiniBatchObjective,
    fit_minibatch,
)

#: Under ``negatives="auto"``: a batch with at most this many regions outside its seeds and trip partners takes all
#: of them as candidates (its loss rows exact); one with more draws :data:`AUTO_NEGATIVES` of them.
EXACT_REST = 1024
#: Negatives drawn under ``negatives="auto"`` when a batch has more than :data:`EXACT_REST` regions outside.
AUTO_NEGATIVES = 32
#: The words ``negatives`` takes besides a count (see the module).
NEGATIVE_WORDS = ("auto", "all")


def negatives_to_draw(negatives: int | str, rest: int) -> int:
    """How many of the ``rest`` regions outside a batch's seeds and trip partners become its candidates.

    Args:
        negatives: ``"auto"``, ``"all"`` or a count (see the module).
        rest: Regions of the city outside the batch's seeds and trip partners.

    Returns:
        A number in ``[0, rest]``; ``rest`` means every one of them (the batch's loss rows exact).
    """
    if negatives == "all" or (negatives == "auto" and rest <= EXACT_REST):
        return rest
    count = AUTO_NEGATIVES if negatives == "auto" else int(negatives)
    return min(max(count, 0), rest)


class Halo:
    """The ``hops``-hop neighbourhood of a set of regions, from a global (N, k) neighbour table (-1: none).

    Args:
        n_regions: Regions in the city.
        neighbors: Each region's neighbours (itself first); ``None`` for dense attention (the halo is the city).
        hops: Attention layers the output depends through.
    """

    def __init__(self, n_regions: int, neighbors: np.ndarray | None, hops: int) -> None:
        self.neighbors = None if neighbors is None else np.asarray(neighbors, dtype=np.int64)
        self.hops = hops
        # One reusable membership array instead of an N-sized allocation per batch.
        self.seen = np.zeros(n_regions, dtype=bool)
        #: After :meth:`nodes`: how many of its regions lie within 0, 1, ..., ``hops`` steps of the targets.
        self.rings: list[int] = []

    def nodes(self, targets: np.ndarray) -> np.ndarray:
        """``targets`` first (in their order), then the regions of their halo, nearest hops first."""
        assert self.neighbors is not None
        parts = [targets]
        self.rings = [len(targets)]
        self.seen[targets] = True
        frontier = targets
        for _ in range(self.hops):
            reached = self.neighbors[frontier].ravel()
            reached = np.unique(reached[reached >= 0])
            fresh = reached[~self.seen[reached]]
            if not len(fresh):
                break
            self.seen[fresh] = True
            parts.append(fresh)
            self.rings.append(self.rings[-1] + len(fresh))
            frontier = fresh
        self.rings += [self.rings[-1]] * (self.hops + 1 - len(self.rings))
        nodes = np.concatenate(parts)
        self.seen[nodes] = False
        return nodes


class HaloObjective(MiniBatchObjective):
    """The seeds' rows of the full-batch multi-task loss, over exact candidate embeddings (see the module)."""

    def __init__(self, inputs: Any, views: tuple[str, ...], objective: str | dict[str, Any]) -> None:
        super().__init__(inputs, views, objective)
        # Origins sending trips to each region: the partners a seed has as a destination.
        self.p_in_t = sparse.csr_matrix(self.p_in.T)
        self.n_out = max(int(self.has_out.sum()), 1)
        self.n_in = max(int(self.has_in.sum()), 1)
        self.inside = np.zeros(self.n, dtype=bool)

    def candidates(self, seeds: np.ndarray, negatives: int | str,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The batch's candidates, seeds first, then their trip partners, then the negatives; and their weights.

        Args:
            seeds: Global positions of the batch's seed regions.
            negatives: ``"auto"``, ``"all"`` or a count (:func:`negatives_to_draw`).
            rng: Draws the negatives (used only when they are a sample of the rest).

        Returns:
            (targets, weights): global positions, and how many regions of the city each one stands for.
        """
        partners = np.concatenate([self.p_out[seeds].indices, self.p_in_t[seeds].indices]).astype(np.int64)
        self.inside[seeds] = True
        partners = np.unique(partners)
        partners = partners[~self.inside[partners]]
        fixed = np.concatenate([seeds, partners])
        self.inside[fixed] = True
        rest = self.n - len(fixed)
        count = negatives_to_draw(negatives, rest)
        try:
            if count <= 0:
                drawn = np.zeros(0, dtype=np.int64)
            elif count >= rest:
                drawn = np.flatnonzero(~self.inside)
            else:
                drawn = _draw_outside(self.inside, count, rng)
        finally:
            self.inside[fixed] = False
        weights = np.ones(len(fixed) + len(drawn))
        if len(drawn):
            weights[len(fixed):] = rest / len(drawn)
        return np.concatenate([fixed, drawn]), weights

    def parts(self, n_seeds: int, targets: np.ndarray, weights: np.ndarray, embedding: torch.Tensor,
              heads: Any) -> dict[str, torch.Tensor]:
        """The seeds' rows of each loss part (``mobility``, each similarity view), full-batch normalisations.

        Args:
            n_seeds: The first ``n_seeds`` targets are the seeds.
            targets: Global positions of the candidates (seeds first).
            weights: Regions of the city each candidate stands for.
            embedding: (len(targets), d) the candidates' embeddings.
            heads: The network's reconstruction heads.
        """
        seeds = targets[:n_seeds]
        log_w = torch.as_tensor(np.log(weights), dtype=torch.float32)
        w = torch.as_tensor(weights, dtype=torch.float32)
        source, destination = heads.source(embedding), heads.destination(embedding)
        rows = source[:n_seeds] @ destination.T  # (S, T): seeds as origins
        p_out = torch.as_tensor(self.p_out[seeds][:, targets].toarray(), dtype=torch.float32)
        out = -(p_out * self._log_softmax(rows, log_w[None, :], 1)).sum(dim=1)
        columns = source @ destination[:n_seeds].T  # (T, S): seeds as destinations
        p_in = torch.as_tensor(self.p_in[targets][:, seeds].toarray(), dtype=torch.float32)
        inn = -(p_in * self._log_softmax(columns, log_w[:, None], 0)).sum(dim=0)
        if self.volume:
            mobility = out.sum() + inn.sum()
        else:
            index = torch.as_tensor(seeds, dtype=torch.long)
            mobility = out[self.has_out[index]].sum() / self.n_out + inn[self.has_in[index]].sum() / self.n_in
        parts = {"mobility": mobility}
        for view in self.views:
            vectors = heads.similarity[view](embedding)
            if self.cosine:
                vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-8)
            predicted = vectors[:n_seeds] @ vectors.T
            if view in self.similarity:
                target = torch.as_tensor(self.similarity[view][np.ix_(seeds, targets)])
            else:
                unit = self.unit[view]
                target = unit[torch.as_tensor(seeds)] @ unit[torch.as_tensor(targets)].T
            error = ((predicted - target) ** 2 * w[None, :]).sum()
            parts[view] = self.similarity_weight * error / self.n**2
        return parts

    def _log_softmax(self, logits: torch.Tensor, log_weight: torch.Tensor, dim: int) -> torch.Tensor:
        """log(softmax + epsilon) over all N regions, the normaliser estimated from the weighted candidates."""
        log_p = logits - torch.logsumexp(logits + log_weight, dim=dim, keepdim=True)
        return torch.log(torch.exp(log_p) + self.epsilon) if self.epsilon > 0 else log_p


def _draw_outside(inside: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct regions drawn uniformly from those not ``inside`` (fewer than half of them are)."""
    drawn = np.zeros(0, dtype=np.int64)
    while len(drawn) < count:
        more = rng.integers(0, len(inside), size=2 * count + 16)
        more = more[~inside[more]]
        joined = np.concatenate([drawn, more])
        _, first = np.unique(joined, return_index=True)
        drawn = joined[np.sort(first)]
    return drawn[:count]


class HaloForward:
    """Embeds a batch's candidates through their halo (or, with dense attention, through the whole city)."""

    def __init__(self, network: Any, n_regions: int, neighbors: np.ndarray | None) -> None:
        self.network = network
        self.n = n_regions
        self.halo = Halo(n_regions, neighbors, int(getattr(network, "hops", 1)))
        self.make = BatchMaker(n_regions, neighbors)
        self.dense = neighbors is None

    def __call__(self, targets: np.ndarray, weights: np.ndarray) -> torch.Tensor:
        """(len(targets), d) embeddings; the fusion's mean over regions estimated from the weighted targets."""
        if self.dense:
            return self.network()[torch.as_tensor(targets, dtype=torch.long)]
        row_weights = torch.zeros(len(nodes := self.halo.nodes(targets)))
        row_weights[: len(targets)] = torch.as_tensor(weights / weights.sum(), dtype=torch.float32)
        return self.network(self.batch(nodes), row_weights=row_weights)[: len(targets)]

    def batch(self, nodes: np.ndarray) -> Any:
        """The network's batch of ``nodes`` (just computed by the halo), with its rings: each attention layer then
        computes only the regions the next one reads (the targets' outputs are the same, the work less)."""
        batch = self.make(nodes)
        batch.rings = list(self.halo.rings)
        return batch

    def embed_all(self, batches: list[np.ndarray]) -> np.ndarray:
        """Every region's embedding (dropout off, no gradients): the fusion's pooled scores over the whole city
        first, then each batch through its halo with those scores, so the result is the full-batch embedding."""
        network = self.network
        network.eval()
        try:
            with torch.no_grad():
                if self.dense:
                    return np.asarray(network().numpy(), dtype=np.float32)
                fusion = network.views.fusion if hasattr(network, "views") else network.fusion
                total: torch.Tensor | None = None
                for seeds in batches:
                    network(self.batch(self.halo.nodes(seeds)))
                    part = fusion.row_scores[: len(seeds)].sum(dim=0)
                    total = part if total is None else total + part
                assert total is not None
                pooled = total / self.n
                out: np.ndarray | None = None
                for seeds in batches:
                    values = network(self.batch(self.halo.nodes(seeds)), pooled=pooled)[: len(seeds)].numpy()
                    if out is None:
                        out = np.empty((self.n, values.shape[1]), dtype=np.float32)
                    out[seeds] = values
                assert out is not None
                return out
        finally:
            network.train()


def fit_halo(embedder: Any, city: CityData, max_steps: int | None = None) -> None:
    """Train ``embedder`` in mini-batches with halos and set its fitted attributes (see the module).

    The embedder provides ``build_minibatch(city, inputs) -> (network, neighbours)`` (``neighbours`` ``None`` for
    dense attention), a network with ``hops``, ``heads`` and ``network(batch, row_weights=..., pooled=...)``, and
    the parameters ``batch_size``, ``negatives`` (``"auto"``, ``"all"`` or a count) and ``accumulate``.
    ``max_steps`` as in :func:`.minibatch.fit_minibatch`.
    """
    run = BatchedRun(embedder, city, max_steps)
    objective = HaloObjective(run.inputs, run.inputs.similarity_views, embedder.objective)
    forward = HaloForward(run.network, city.n_regions, run.neighbors)
    accumulate = bool(embedder.accumulate)
    for epoch in range(1, run.epochs + 1):
        epoch_start = time.perf_counter()
        totals: dict[str, float] = {}
        run.optimizer.zero_grad()
        for seeds in run.epoch_batches():
            if not accumulate:
                run.optimizer.zero_grad()
            targets, weights = objective.candidates(seeds, run.negatives, run.rng)
            parts = objective.parts(len(seeds), targets, weights, forward(targets, weights), run.network.heads)
            run.check(parts, epoch)
            for part, value in parts.items():
                totals[part] = totals.get(part, 0.0) + float(value.detach())
            # Per step, the batch's rows times N / seeds estimate the full loss (its scale against weight decay).
            scale = 1.0 if accumulate else city.n_regions / len(seeds)
            total = torch.stack(list(parts.values())).sum()
            (total * scale).backward()
            if not accumulate:
                run.optimizer_step()
            if run.stepped(epoch_start):
                return
        if accumulate:
            run.optimizer_step()
        run.end_epoch(epoch, totals, epoch_start, lambda: forward.embed_all(run.embed_batches))
    run.finish()


def fit_batched(embedder: Any, city: CityData, max_steps: int | None = None) -> None:
    """Train ``embedder`` in mini-batches of its form: with halos (``minibatch_halo``) or within batches."""
    if getattr(embedder, "minibatch_halo", False):
        fit_halo(embedder, city, max_steps)
    else:
        fit_minibatch(embedder, city, max_steps)
