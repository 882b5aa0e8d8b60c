"""Named head-training recipes and class-balancing modes (no torch import: the CLIs' ``--help``
stays fast)."""

from __future__ import annotations

#: Ways to balance classes in head training (``--class-balance``).
CLASS_BALANCE = ("none", "weighted", "sampled")

#: Named head-training recipes: HeadTrainConfig fields plus ``train_head`` stain/augmentation
#: arguments. ``shipped``: the recipe of the shipped head, chosen by cross-validation across
#: the tissue sites of BRCA-M2C (``benchmarks/reported/classifier_site_cv*.json``); it is
#: ``denuc train-head``'s default. ``paper``: the DeNuC paper's linear probe (100 epochs,
#: epoch chosen on val, no stain handling).
HEAD_PRESETS: dict[str, dict[str, object]] = {
    "shipped": {"epochs": 30, "lr": 1e-2, "weight_decay": 0.1, "select": "last", "stain_norm": "macenko",
                "stain_augment": 2, "stain_space": "hed", "stain_strength": 0.4},
    "paper": {"epochs": 100, "lr": 1e-2, "weight_decay": 5e-4, "select": "val", "stain_norm": "none",
              "stain_augment": 0, "stain_space": "od", "stain_strength": 0.1},
}

#: ``finetune``'s default head choice: train each of :data:`AUTO_CANDIDATES` and keep the one
#: with the higher mean class F1 at the detected val points (a tie keeps the first). Neither
#: recipe wins on both datasets tried (``docs/finetune.md``): the shipped recipe on breast
#: sites, the paper's on colon; the user's val split decides.
AUTO = "auto"
AUTO_CANDIDATES = ("shipped", "paper")
#: What ``finetune --head-preset`` accepts.
FINETUNE_HEAD_CHOICES = (AUTO, *HEAD_PRESETS)
