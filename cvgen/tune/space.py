"""The search space: a W&B sweep file, read once and used by both search back ends.

``wandb sweep configs/sweep.yaml`` + ``wandb agent`` run it online: the agent starts the
file's ``command`` with ``${args}`` replaced by ``--<name>=<value>`` for each parameter, so
parameter names are ``cvgen fit``'s dotted keys (``model.learning_rate``). ``cvgen tune`` runs
the same file offline on Optuna: :func:`load_sweep` checks it and :class:`Sweep` translates it
(``method`` to a sampler, ``early_terminate`` to a pruner, each distribution to Optuna's) and
builds the same ``--<name>=<value>`` flags (:func:`sweep_flags`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from cvgen.errors import CVGenError

if TYPE_CHECKING:
    import optuna

# top-level keys of a W&B sweep configuration
SWEEP_KEYS = frozenset(
    {
        "program",
        "command",
        "name",
        "description",
        "project",
        "entity",
        "method",
        "metric",
        "parameters",
        "early_terminate",
        "run_cap",
    }
)
METHODS = ("bayes", "random", "grid")
# W&B distributions Optuna has an equivalent for
SUPPORTED = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform_values",
    "log_uniform",
)
DOTTED_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


@dataclass(frozen=True)
class Param:
    """One parameter of the sweep, in Optuna's terms: ``kind`` is ``fixed``, ``categorical``,
    ``int`` or ``float``; ``source`` is the W&B distribution it came from (for messages)."""

    name: str
    kind: str
    source: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw this parameter's value for ``trial``."""
        if self.kind == "fixed":
            return self.choices[0]
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list[Any]:
        """Every value, for ``method: grid`` (categorical, fixed and integer parameters)."""
        if self.kind in ("fixed", "categorical"):
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1))
        if self.step is not None:
            n = round((self.high - self.low) / self.step)
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        raise ValueError(self.source)

    def describe(self) -> str:
        """The range in a few words (``log_uniform_values 1e-05..0.001``)."""
        if self.kind == "fixed":
            return f"{self.source} {self.choices[0]}"
        if self.kind == "categorical":
            return f"{self.source} {list(self.choices)}"
        return f"{self.source} {self.low:g}..{self.high:g}"


@dataclass
class Sweep:
    """A checked sweep file (see :func:`load_sweep`)."""

    path: Path
    method: str
    metric: str
    goal: str
    params: dict[str, Param]
    name: str
    early_terminate: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        return "maximize" if self.goal == "maximize" else "minimize"

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Every parameter's value for ``trial`` (fixed ones included), in file order."""
        return {name: p.suggest(trial) for name, p in self.params.items()}

    def first_values(self) -> dict[str, Any]:
        """A value for each parameter without a trial (the first choice or the lower
        bound): to check before a study starts that ``cvgen fit`` accepts every name."""
        out: dict[str, Any] = {}
        for name, p in self.params.items():
            if p.kind in ("fixed", "categorical"):
                out[name] = p.choices[0]
            else:
                out[name] = int(p.low) if p.kind == "int" else float(p.low)
        return out

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        """``method``: bayes -> TPE, random -> random, grid -> grid."""
        import optuna

        if self.method == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.method == "grid":
            space = {n: p.grid() for n, p in self.params.items() if p.kind != "fixed"}
            return optuna.samplers.GridSampler(space, seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def pruner(self) -> optuna.pruners.BasePruner:
        """``early_terminate: {type: hyperband, min_iter | max_iter + s, eta}`` -> Optuna's
        Hyperband pruner, with W&B's meaning of an iteration: one logged value of the
        metric (one validation). Without ``early_terminate`` no trial is stopped early."""
        import optuna

        et = self.early_terminate
        if not et:
            return optuna.pruners.NopPruner()
        eta = int(et.get("eta", 3))
        max_iter: Any = et.get("max_iter")
        min_iter: Any = et.get("min_iter")
        if min_iter is None:  # W&B: max_iter / eta^s
            min_iter = max(1, int(max_iter) // eta ** int(et.get("s", 0)))
        return optuna.pruners.HyperbandPruner(
            min_resource=int(min_iter),
            max_resource=int(max_iter) if max_iter is not None else "auto",
            reduction_factor=eta,
        )

    def without(self, names: set[str]) -> Sweep:
        """This sweep with ``names`` left out of the search (fixed by the caller)."""
        params = {n: p for n, p in self.params.items() if n not in names}
        if not params:
            raise CVGenError(f"{self.path}: every parameter is fixed: nothing is left to tune")
        raw_params = {n: v for n, v in self.raw.get("parameters", {}).items() if n in params}
        return replace(self, params=params, raw={**self.raw, "parameters": raw_params})

    def fingerprint(self) -> dict[str, Any]:
        """What makes two sweeps the same search (a resumed study must match it)."""
        return {
            "method": self.method,
            "metric": self.metric,
            "goal": self.goal,
            "parameters": self.raw.get("parameters"),
            "early_terminate": self.early_terminate or None,
        }


def sweep_flags(values: dict[str, Any]) -> list[str]:
    """The flags ``wandb agent`` puts in place of ``${args}``: ``--<name>=<value>``, the value
    as Python's ``str`` gives it (``3e-05``, ``True``)."""
    return [f"--{name}={value}" for name, value in values.items()]


def _line(text: str, key: str) -> int:
    """The line of ``key:`` in the sweep file (1 when not found)."""
    pattern = re.compile(rf"^\s*['\"]?{re.escape(key)}['\"]?\s*:")
    for i, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return i
    return 1


def _param(name: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        raise CVGenError(f"{where}: parameters.{name} must be a mapping (values, min/max, ...)")
    if "probabilities" in spec:
        raise CVGenError(
            f"{where}: parameters.{name}: probabilities are not supported (Optuna draws "
            "categorical values uniformly); list a value twice to weight it"
        )
    dist = spec.get("distribution")
    if dist is None:  # as W&B infers it
        if "value" in spec:
            dist = "constant"
        elif "values" in spec:
            dist = "categorical"
        elif isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
            dist = "int_uniform"
        else:
            dist = "uniform"
    if dist not in SUPPORTED:
        raise CVGenError(
            f"{where}: parameters.{name}: distribution {dist!r} has no Optuna counterpart; "
            f"use one of {', '.join(SUPPORTED)}"
        )
    if dist == "constant":
        if "value" not in spec:
            raise CVGenError(f"{where}: parameters.{name}: a constant needs 'value'")
        return Param(name, "fixed", dist, choices=(_flag_value(spec["value"], name, where),))
    if dist == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise CVGenError(f"{where}: parameters.{name}: 'values' must be a non-empty list")
        return Param(
            name, "categorical", dist, choices=tuple(_flag_value(v, name, where) for v in values)
        )
    lo, hi = spec.get("min"), spec.get("max")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        raise CVGenError(f"{where}: parameters.{name}: {dist} needs numeric 'min' and 'max'")
    assert isinstance(lo, (int, float)) and isinstance(hi, (int, float))
    if lo >= hi:
        raise CVGenError(f"{where}: parameters.{name}: min ({lo}) must be below max ({hi})")
    if dist == "int_uniform":
        if not (isinstance(lo, int) and isinstance(hi, int)):
            raise CVGenError(f"{where}: parameters.{name}: int_uniform needs integer min/max")
        return Param(name, "int", dist, low=lo, high=hi)
    if dist == "uniform":
        return Param(name, "float", dist, low=float(lo), high=float(hi))
    if dist == "q_uniform":
        return Param(
            name, "float", dist, low=float(lo), high=float(hi), step=float(spec.get("q", 1.0))
        )
    if dist == "log_uniform":  # min/max are exponents (natural log) in W&B
        return Param(name, "float", dist, low=math.exp(lo), high=math.exp(hi), log=True)
    if lo <= 0:
        raise CVGenError(f"{where}: parameters.{name}: {dist} needs min > 0, got {lo}")
    return Param(name, "float", dist, low=float(lo), high=float(hi), log=True)


def _flag_value(value: Any, name: str, where: str) -> Any:
    if value is None:
        raise CVGenError(
            f"{where}: parameters.{name}: null is not a value here: the W&B agent would pass "
            "it as 'None', which cvgen fit does not read; leave it out of the sweep"
        )
    if isinstance(value, (dict, list)):
        raise CVGenError(f"{where}: parameters.{name}: values must be numbers, strings or booleans")
    return value


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a W&B sweep file; errors name the file, the line and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise CVGenError(f"{path}: cannot read the sweep file: {e.strerror or e}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CVGenError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise CVGenError(f"{path}: a sweep file is a mapping (method, metric, parameters)")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise CVGenError(
                f"{path}:{_line(text, str(key))}: unknown key {key!r} "
                f"(a W&B sweep has {', '.join(sorted(SWEEP_KEYS))})"
            )
    method = raw.get("method", "bayes")
    if method not in METHODS:
        raise CVGenError(
            f"{path}:{_line(text, 'method')}: method must be one of {', '.join(METHODS)}, "
            f"got {method!r}"
        )
    metric = raw.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise CVGenError(
            f"{path}:{_line(text, 'metric')}: metric needs a name (the logged value to "
            "optimise, e.g. val/loss) and a goal"
        )
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise CVGenError(
            f"{path}:{_line(text, 'goal')}: metric.goal is minimize or maximize, got {goal!r}"
        )
    raw_params = raw.get("parameters")
    if not isinstance(raw_params, dict) or not raw_params:
        raise CVGenError(f"{path}:{_line(text, 'parameters')}: parameters must name what to tune")
    params: dict[str, Param] = {}
    for name, spec in raw_params.items():
        where = f"{path}:{_line(text, str(name))}"
        if isinstance(spec, dict) and "parameters" in spec:
            raise CVGenError(
                f"{where}: parameters.{name}: nested parameters are not supported; name each "
                "one with its dotted cvgen fit key (model.rank)"
            )
        if not isinstance(name, str) or not DOTTED_KEY.match(name):
            raise CVGenError(
                f"{where}: parameter {name!r} is not a cvgen fit key such as model.learning_rate"
            )
        params[name] = _param(name, spec, where)
    if method == "grid":
        for p in params.values():
            if p.kind == "float" and p.step is None:
                raise CVGenError(
                    f"{path}:{_line(text, p.name)}: parameters.{p.name}: method grid needs "
                    "values, int_uniform or q_uniform, not a continuous range"
                )
    et = raw.get("early_terminate") or {}
    if et:
        where = f"{path}:{_line(text, 'early_terminate')}"
        if not isinstance(et, dict) or et.get("type") != "hyperband":
            raise CVGenError(f"{where}: early_terminate supports type: hyperband")
        if et.get("min_iter") is None and et.get("max_iter") is None:
            raise CVGenError(f"{where}: hyperband needs min_iter, or max_iter and s")
    name = raw.get("name") or path.stem
    return Sweep(
        path=path,
        method=method,
        metric=metric["name"],
        goal=goal,
        params=params,
        name=str(name),
        early_terminate=dict(et),
        raw=raw,
    )
