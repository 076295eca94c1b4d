"""Classical baselines through scikit-learn (S3's logistic regression and random forest, S4's
k-NN, linear-kernel SVC and random forest), trained and tracked like the networks.

Each baseline is wrapped as a torch module, `Classical`, so that an ensemble bundle, the
evaluate stage and the served model treat it like any other member: its input is the same
normalised spectrogram, flattened or reduced to per-bin summary statistics (mean, std, min
and max over frames), and its output is log-probabilities (classification) or the
prediction (regression); `svc`, which has no probabilities, gives the softmax of its
one-vs-rest decision values (scores, not calibrated probabilities, whose arg max is SVC's own
prediction). The fitted estimator travels in the state dict as a byte buffer in
skops' format, which loads only the types it is told to trust (scikit-learn's own and the
few internals listed in `TRUSTED`): a bundle cannot carry code that runs when it is loaded, as
a pickle could.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR, LinearSVC, LinearSVR
from torch import nn

from tympan.config import ModelConfig

# Internals of the fitted baselines beyond skops' default trust (estimators, numpy, scipy).
TRUSTED = [
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.tree._tree.Tree",
]


def estimator(cfg: ModelConfig, regression: bool, seed: int) -> Any:
    """The scikit-learn estimator for `cfg.name` (scaled inputs for the linear and k-NN ones)."""
    if cfg.name == "random_forest":
        kind = RandomForestRegressor if regression else RandomForestClassifier
        return kind(n_estimators=cfg.n_estimators, random_state=seed, n_jobs=-1)
    if cfg.name == "logreg":
        model = (
            Ridge(alpha=1.0 / cfg.c) if regression else LogisticRegression(C=cfg.c, max_iter=2000)
        )
    elif cfg.name == "linear_svm":
        model = (
            LinearSVR(C=cfg.c, random_state=seed, max_iter=5000)
            if regression
            # probabilities by calibrating the margins (cross-validated, one final SVM)
            else CalibratedClassifierCV(
                LinearSVC(C=cfg.c, random_state=seed, max_iter=5000), cv=3, ensemble=False
            )
        )
    elif cfg.name == "svc":
        # S4's SVC(kernel="linear", C=1): libsvm, one-vs-one; no Platt scaling (its internal
        # cross-validation can disagree with SVC's own predictions)
        model = SVR(kernel="linear", C=cfg.c) if regression else SVC(kernel="linear", C=cfg.c)
    elif cfg.name == "knn":
        kind = KNeighborsRegressor if regression else KNeighborsClassifier
        model = kind(n_neighbors=cfg.n_neighbors)
    else:
        raise KeyError(f"model.name={cfg.name!r} is not a classical baseline")
    return make_pipeline(StandardScaler(), model)


def summarise(x: torch.Tensor) -> torch.Tensor:
    """`(batch, C, bins, frames)` -> `(batch, C * bins * 4)`: mean, std, min, max over frames."""
    stats = [x.mean(dim=3), x.std(dim=3, unbiased=False), x.amin(dim=3), x.amax(dim=3)]
    return torch.cat([s.flatten(1) for s in stats], dim=1)


class Classical(nn.Module):
    """A fitted scikit-learn estimator as a member: `(batch, C, bins, frames)` (normalised by
    the owning `AudioClassifier`) -> log-probabilities `(batch, n_classes)`, or predictions
    `(batch, 1)` for regression. Side attributes join the inputs as their embeddings' codes
    are not learnt here: classical baselines refuse them."""

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        if extra:
            raise ValueError(
                f"model.name={cfg.name} is a classical baseline and takes no side attributes "
                "(model.side_attributes must be empty)"
            )
        self.cfg, self.outputs = cfg, outputs
        self.register_buffer("blob", torch.zeros(0, dtype=torch.uint8))
        self._fitted: Any = None

    def inputs(self, x: torch.Tensor) -> np.ndarray:
        flat = summarise(x) if self.cfg.classical_input == "summary" else x.flatten(1)
        return flat.detach().cpu().double().numpy()

    def fit(self, x: torch.Tensor, y: np.ndarray, regression: bool, seed: int) -> None:
        model = estimator(self.cfg, regression, seed)
        model.fit(self.inputs(x), y)
        import skops.io  # 3 s to import: only where a baseline is saved or loaded

        self.blob = torch.frombuffer(bytearray(skops.io.dumps(model)), dtype=torch.uint8)
        self._fitted = model

    @property
    def fitted(self) -> Any:
        if self._fitted is None:
            if self.blob.numel() == 0:
                raise RuntimeError(f"{self.cfg.name}: not fitted")
            import skops.io

            data = self.blob.cpu().numpy().tobytes()
            untrusted = set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED)
            if untrusted:
                raise RuntimeError(
                    f"{self.cfg.name}: the bundle's estimator holds types tympan does not trust "
                    f"({', '.join(sorted(untrusted))}); it was not written by tympan's train"
                )
            self._fitted = skops.io.loads(data, trusted=TRUSTED)
        return self._fitted

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        blob = state_dict.get(prefix + "blob")
        if blob is not None:  # the size is the estimator's, not the empty placeholder's
            self.blob = torch.empty_like(blob)
            self._fitted = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        features = self.inputs(x)
        model = self.fitted
        if self.outputs == 1 and not hasattr(model, "predict_proba"):
            out = torch.from_numpy(model.predict(features)).float().view(-1, 1)
        else:
            probs = model.predict_proba(features) if hasattr(model, "predict_proba") else None
            if probs is None:  # svc: softmax of the one-vs-rest decision values
                scores = model.decision_function(features)
                scores = np.stack([-scores, scores], 1) if scores.ndim == 1 else scores
                probs = np.exp(scores - scores.max(1, keepdims=True))
                probs /= probs.sum(1, keepdims=True)
            full = np.zeros((len(features), self.outputs))
            full[:, model.classes_.astype(int)] = probs  # classes absent from training: 0
            out = torch.from_numpy(np.log(np.clip(full, 1e-12, None))).float()
        return out.to(x.device)
