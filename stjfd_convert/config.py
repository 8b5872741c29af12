"""Frozen option sets shared by the library API and the CLI. Validation raises ``ConfigError``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError

EXECUTION_FORMS = ("fused", "factorized", "sandwich", "spatial_first", "temporal_first")
EXECUTION_MODES = (*EXECUTION_FORMS, "auto")
DECOMPOSITION_METHODS = ("hooi", "hosvd", "tensorly")
BUDGET_SCOPES = ("convs", "model")  # --budget-of: a share of the decomposable convs' weights, or of the model


@dataclass(frozen=True)
class AtomSpec:
    """Number of temporal (m_t) and spatial (m_s) atoms chosen for one layer."""

    temporal: int
    spatial: int

    def __post_init__(self) -> None:
        if self.temporal < 1 or self.spatial < 1:
            raise ConfigError(f"atoms must be ≥ 1, got temporal={self.temporal}, spatial={self.spatial}")


@dataclass(frozen=True)
class ConvertConfig:
    """How ranks are chosen and which layers are converted.

    Exactly one rank policy applies:
    - ``atoms`` (default): ``spatial_atoms`` (default 6) and ``temporal_atoms`` (default min(L, 3); one
      fewer than the taps where that would keep a whole kernel, see ``layers.default_atoms``),
      clipped per layer to its number of taps;
    - ``energy``: per mode, the smallest rank keeping that share of the squared singular values;
    - ``budget``: ranks across layers so that the decomposable convs' weights (``budget_of="convs"``)
      or all of the model's parameters (``budget_of="model"``) shrink to that share;
    - ``full_rank``: m_t = L, m_s = Kh·Kw (exact; for verification).
    ``include``/``exclude`` are fnmatch globs on module names. Layers whose atoms would not save
    parameters are skipped (except under ``full_rank``).
    """

    spatial_atoms: int | None = None
    temporal_atoms: int | None = None
    energy: float | None = None
    budget: float | None = None
    budget_of: str = "convs"
    full_rank: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    method: str = "hooi"
    mode: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("spatial_atoms", "temporal_atoms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                flag = "--atoms" if name == "spatial_atoms" else "--temporal-atoms"
                example = "e.g. --atoms 6" if flag == "--atoms" else "e.g. --temporal-atoms 2 (at most a kernel's taps, 3 for 3×3×3)"
                raise ConfigError(f"{flag} must be a positive number of atoms, got {value}", example)
        policies = [
            name
            for name, active in (
                ("--energy", self.energy is not None),
                ("--budget", self.budget is not None),
                ("--full-rank", self.full_rank),
            )
            if active
        ]
        if len(policies) > 1:
            raise ConfigError(f"{' and '.join(policies)} cannot be combined", "choose one rank policy")
        if policies and (self.spatial_atoms is not None or self.temporal_atoms is not None):
            raise ConfigError(
                f"{policies[0]} cannot be combined with --atoms/--temporal-atoms", "choose one rank policy"
            )
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"--energy must be in (0, 1], got {self.energy}", "e.g. --energy 0.99")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ConfigError(f"--budget must be in (0, 1], got {self.budget}", "e.g. --budget 0.5")
        if self.budget_of not in BUDGET_SCOPES:
            raise ConfigError(f"unknown --budget-of {self.budget_of!r}", f"use one of {', '.join(BUDGET_SCOPES)}")
        if self.budget_of != "convs" and self.budget is None:
            raise ConfigError("--budget-of applies only with --budget", "e.g. --budget 0.5 --budget-of model")
        if self.method not in DECOMPOSITION_METHODS:
            raise ConfigError(f"unknown --method {self.method!r}", f"use one of {', '.join(DECOMPOSITION_METHODS)}")
        if self.mode not in EXECUTION_MODES:
            raise ConfigError(f"unknown --mode {self.mode!r}", f"use one of {', '.join(EXECUTION_MODES)}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def policy(self) -> str:
        """One of ``atoms``, ``energy``, ``budget``, ``full_rank``."""
        if self.full_rank:
            return "full_rank"
        if self.energy is not None:
            return "energy"
        if self.budget is not None:
            return "budget"
        return "atoms"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["include"] = list(self.include)
        data["exclude"] = list(self.exclude)
        data.pop("extra")
        data["policy"] = self.policy
        return data


SWAP_NORMALIZATIONS = ("sum", "energy")  # functional.resample.RESIZE_NORMALIZATIONS


@dataclass(frozen=True)
class SwapConfig:
    """Which atoms ``swap.swap_atoms`` replaces, and by what.

    - ``temporal_dilation`` d: the temporal atoms' conv runs with its dilation × d (padding grows so the
      output length stays the same);
    - ``temporal_size`` n: each temporal atom interpolated to n taps;
    - ``spatial_size`` n (or ``(h, w)``): each spatial atom interpolated to an n×n (h×w) kernel;
    - ``normalization`` of resized atoms: ``sum`` (default: taps × L/n) or ``energy`` (``functional/resample.py``);
    - ``include``/``exclude``: fnmatch globs on the decomposed layers' module names.
    At least one of the three swaps must be given; ``temporal_dilation=1`` or a size equal to a layer's
    own is the identity.
    """

    temporal_dilation: int | None = None
    temporal_size: int | None = None
    spatial_size: int | tuple[int, int] | None = None
    normalization: str = "sum"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = (
            ("--temporal-dilation", self.temporal_dilation, "a dilation of 2 reads video played 2× slower"),
            ("--temporal-size", self.temporal_size, "e.g. --temporal-size 5 (taps per temporal atom)"),
        )
        for flag, value, hint in checks:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{flag} must be an integer ≥ 1, got {value!r}", hint)
        if self.spatial_size is not None:
            size = (self.spatial_size,) * 2 if isinstance(self.spatial_size, int) else tuple(self.spatial_size)
            if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
                raise ConfigError(
                    f"--spatial-size must be an integer ≥ 1 (or height, width), got {self.spatial_size!r}",
                    "e.g. --spatial-size 5 for 5×5 spatial atoms",
                )
            object.__setattr__(self, "spatial_size", size)
        if self.temporal_dilation is None and self.temporal_size is None and self.spatial_size is None:
            raise ConfigError(
                "nothing to swap", "give --temporal-dilation, --temporal-size and/or --spatial-size"
            )
        if self.normalization not in SWAP_NORMALIZATIONS:
            raise ConfigError(
                f"unknown normalization {self.normalization!r}", f"use one of {', '.join(SWAP_NORMALIZATIONS)}"
            )
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def temporal(self) -> bool:
        """True when the temporal atoms are to be dilated or resized."""
        return self.temporal_dilation is not None or self.temporal_size is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spatial_size"] = list(self.spatial_size) if self.spatial_size is not None else None
        data["include"] = list(self.include)
        data["exclude"] = list(self.exclude)
        return data


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(request: object, *, flag: str = "--device") -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (| ``mps``) → the device that will be used, as a string,
    once it is known to exist here; anything else (``tpu``, ``cuda`` without a GPU, ``cuda:7`` on a
    machine with two) is a ConfigError naming the flag, before any model is loaded."""
    import torch

    text = str(request).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(f"unknown {flag} {request!r}", f"use {flag} auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{flag} {request} was asked for, but no CUDA device is available on this machine",
                f"use {flag} cpu (or auto), or run where a GPU and its driver are installed",
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{flag} {request}: this machine has {count} CUDA device(s), numbered from 0",
                f"use {flag} cuda:0 … cuda:{count - 1}",
            )
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{flag} mps was asked for, but MPS is not available on this machine", f"use {flag} cpu")
    return str(device)
