"""The linear probe: judge a pre-training without fine-tuning, by a linear classifier on the
frozen backbone's pooled features (``finetune.linear_probe: true``, ``cd2p finetune
--linear-probe``).

Run directory (like a fine-tuning run's, so that ``cd2p evaluate``, ``cd2p push`` and
``cd2p plot`` take it)::

    RUN/recipe.yaml     the recipe as run           RUN/metrics.json   final metrics
    RUN/run.json        task, data, init            RUN/metrics.jsonl  the L-BFGS loss, the result
    RUN/model/          a Cd2pForClassification (head_type "linear-probe"): the frozen
                        backbone, the feature standardisation and the linear classifier
    RUN/probe/probe.json  the L2 strength chosen and the held-out accuracy of each
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch.utils.data import DataLoader

from cd2p._atomic import atomic_write_json
from cd2p.config import Recipe
from cd2p.data.classification import (
    ClassificationSplit,
    PointClassificationDataset,
    load_classification_cache,
)
from cd2p.engine import distributed as D
from cd2p.engine.finetune import (
    FINAL_METRICS,
    MODEL_DIR,
    PROBE_DIR,
    RUN_INFO,
    FinetuneResult,
    _dataset_card,
    _hub_base_model,
    export_model,
    fingerprint_data,
    load_backbone,
)
from cd2p.engine.metrics_log import MetricsLog
from cd2p.engine.trainer import check_run_dir, seed_everything
from cd2p.models.backbone import Cd2pBackbone


@torch.no_grad()
def pooled_features(
    backbone: Cd2pBackbone, data: ClassificationSplit, num_points: int, batch_size: int = 32
) -> torch.Tensor:
    """Max- and mean-pooled backbone tokens ``(S, 2 * dim)`` of every cloud's first
    ``num_points`` FPS points (the frozen representation a linear probe reads)."""
    device = next(backbone.parameters()).device
    backbone.eval()
    feats = []
    for batch in DataLoader(PointClassificationDataset(data, num_points), batch_size=batch_size):
        tokens = backbone(batch["points"].to(device)).tokens.float()
        feats.append(torch.cat([tokens.max(1).values, tokens.mean(1)], -1).cpu())
    return torch.cat(feats)


def fit_linear_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 300,
    trace: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, ``x (S, D)``, ``y (S,)`` -> ``W (D, C)``, ``b (C,)``.

    Minimises mean cross-entropy + ``l2 * |W|^2`` with full-batch L-BFGS (a convex problem:
    the optimum does not depend on initialisation). ``trace`` collects the objective at every
    evaluation.
    """
    x, y = x.double(), y.long()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        if trace is not None:
            trace.append(float(loss.detach()))
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float()


L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def choose_l2(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0, holdout: float = 0.2
) -> tuple[float, dict[float, float]]:
    """Pick the L2 strength of :data:`L2_GRID` with the best accuracy on a stratified
    ``holdout`` fraction of the training features (the test set is never looked at)."""
    g = torch.Generator().manual_seed(seed)
    val_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(num_classes):
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        val_mask[members[: int(len(members) * holdout)]] = True
    if not val_mask.any() or val_mask.all():
        return L2_GRID[2], {}
    scores = {}
    for l2 in L2_GRID:
        w, b = fit_linear_classifier(x[~val_mask], y[~val_mask], num_classes, l2)
        scores[l2] = float(((x[val_mask] @ w + b).argmax(-1) == y[val_mask]).float().mean())
    best = max(scores.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties: stronger regulariser
    return best, scores


def run_linear_probe(
    recipe: Recipe,
    data: str | Path,
    init: str | Path | None,
    out: str | Path,
    *,
    recipe_name: str | None = None,
    console: Console | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Judge a pre-training without fine-tuning: frozen backbone, max+mean-pooled tokens,
    standardised, then a linear (logistic-regression) classifier whose L2 strength is chosen
    on a held-out part of the training split; accuracy on ``finetune.val_split``.

    Exports ``out/model`` (a :class:`~cd2p.models.classification.Cd2pForClassification` with
    ``head_type="linear-probe"``, so ``cd2p evaluate / push / plot`` take the run) and writes
    ``out/metrics.json``, ``out/metrics.jsonl`` and ``out/probe/probe.json``. The metrics are
    those of the exported model evaluated as ``cd2p evaluate`` does.
    """
    from cd2p.engine.evaluation import evaluate
    from cd2p.models.classification import Cd2pForClassification
    from cd2p.provenance import provenance
    from cd2p.tasks.classification import TASK, run_facts, subset_train, subset_val

    started = time.perf_counter()
    out, data = Path(out), Path(data).resolve()
    check_run_dir(out, resume=False)
    if recipe.task != "classification":
        raise ValueError(
            "a linear probe is a classification benchmark (recipe task: classification)"
        )
    cfg = recipe.finetune
    fingerprint = fingerprint or fingerprint_data(TASK, data)
    train = load_classification_cache(data, cfg.train_split)
    val = load_classification_cache(data, cfg.val_split)
    train = subset_train(recipe, train, f"{data} ({cfg.train_split})")
    val = subset_val(recipe, val, f"{data} ({cfg.val_split})")
    if init is not None:
        backbone = load_backbone(init)
    else:
        seed_everything(recipe.run.seed)
        backbone = Cd2pBackbone(**recipe.model.backbone_kwargs())
    device = D.resolve_device(recipe.run.device)
    n = recipe.data.num_points
    per_task = {"num_groups": recipe.model.num_groups, "group_size": recipe.model.group_size}
    model = Cd2pForClassification.from_backbone(
        backbone, per_task, num_classes=train.num_classes, class_names=train.class_names,
        num_points=n, head_channels=(), head_type="linear-probe",
    )  # fmt: skip
    del backbone
    model.to(device).eval()
    x_train = pooled_features(model.backbone, train, n, cfg.eval_batch_size)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    l2, scores = choose_l2(x_train, train.labels, train.num_classes, recipe.run.seed)
    trace: list[float] = []
    w, b = fit_linear_classifier(x_train, train.labels, train.num_classes, l2, trace=trace)
    with torch.no_grad():
        model.feature_mean.copy_(mean)
        model.feature_std.copy_(std)
        model.head.weight.copy_(w.T)
        model.head.bias.copy_(b)
    train_acc = float(((x_train @ w + b).argmax(-1) == train.labels).float().mean())
    report = evaluate("classification", model, val, 1, batch_size=cfg.eval_batch_size)
    metrics = {**report.metrics, "train_oa": train_acc}

    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out)
    try:
        for i, loss in enumerate(trace, 1):  # the L-BFGS objective, one record per evaluation
            log.write({"kind": "train", "step": i, "epoch": 0, "loss": loss})
        log.write({"kind": "eval", "step": len(trace), "epoch": 0, **metrics})
    finally:
        log.close()
    dataset_card = _dataset_card(get_task_spec(), data, cfg.val_split)
    training_card = {
        "task": "classification (linear probe)",
        "recipe": recipe_name or recipe.description or "custom",
        "initialised from": str(init) if init is not None else "scratch (random initialisation)",
        "training data": f"{data} ({cfg.train_split}: {len(train)} shapes)",
        "method": f"frozen backbone, max+mean-pooled tokens, logistic regression (L2 {l2:g}, "
        "chosen on 20 % of the training shapes)",
    }
    if cfg.few_shot is not None:
        training_card["few-shot"] = (
            f"{cfg.few_shot} training shapes per class, drawn with seed {recipe.run.seed}"
        )
    base_model = _hub_base_model(str(init) if init else None)
    export_model(model, out / MODEL_DIR, metrics=metrics, recipe=recipe, training=training_card,
                 dataset=dataset_card, base_model=base_model)  # fmt: skip
    probe = out / PROBE_DIR
    probe.mkdir(exist_ok=True)
    atomic_write_json(
        probe / "probe.json",
        {
            "init": str(init) if init is not None else None,
            "l2": l2,
            "holdout_accuracy": {str(k): v for k, v in scores.items()},
            "class_names": train.class_names,
            "num_points": n,
            "features": "max+mean of tokens",
            **run_facts(recipe),
            "train_shapes": len(train),
            "model": str(out / MODEL_DIR),
        },
    )
    prov = provenance(
        data=fingerprint,
        recipe=recipe,
        recipe_name=recipe_name,
        seeds=[recipe.run.seed],
        wall_time_s=time.perf_counter() - started,
        device=device,
    )
    atomic_write_json(
        out / FINAL_METRICS,
        {
            **report.to_json(),
            "task": "classification",
            "method": "linear-probe",
            "train_oa": train_acc,
            "l2": l2,
            "split": cfg.val_split,
            "selected_on": f"{cfg.train_split} (a held-out fifth, for the L2 strength)",
            "evaluated_on": cfg.val_split,
            "metric_names": list(metrics),
            "samples": len(val),
            "data": str(data),
            **run_facts(recipe),
            "train_shapes": len(train),
            "provenance": prov,
        },
    )
    from cd2p.config import save_recipe

    save_recipe(recipe, out / "recipe.yaml")
    atomic_write_json(
        out / RUN_INFO,
        {
            "task": "classification",
            "method": "linear-probe",
            "data": str(data),
            "init": str(init) if init is not None else None,
            "recipe_name": recipe_name,
            **run_facts(recipe),
            "data_fingerprint": fingerprint,
        },
    )
    return FinetuneResult(None, out / MODEL_DIR, metrics, None, recipe)


def get_task_spec():
    """The classification task's table entry (its dataset names for the card)."""
    from cd2p.tasks import get_task

    return get_task("classification")


__all__ = ["choose_l2", "fit_linear_classifier", "pooled_features", "run_linear_probe"]
