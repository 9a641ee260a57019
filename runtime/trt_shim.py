"""One place for the differences between TensorRT flavours: ``tensorrt`` 10.x / 11.x and ``tensorrt_rtx``.

Everything else (export/engine.py, export/inspect.py, runtime/trt_runner.py) drives
the API through :class:`Trt`, which names each difference once:

| what                         | tensorrt 10.x                | tensorrt 11.x      | tensorrt_rtx 1.x                     |
|------------------------------|------------------------------|--------------------|--------------------------------------|
| module                       | tensorrt                     | tensorrt           | tensorrt_rtx                         |
| network creation flags       | 1 << STRONGLY_TYPED          | 0 (always strong)  | 0 (always strong)                    |
| compute-capability targeting | no (builds for its own GPU)  | no                 | config.set_compute_capability        |
| plugins (tensorrt.plugin)    | yes (>= 10.8)                | yes                | no                                   |
| timing cache                 | yes                          | yes                | no-op (deprecated since 1.2)         |
| engine file magic            | ``ftrt``                     | ``ftrt``           | ``vtrt`` (observed, 1.7)             |
| runtime class                | trt.Runtime                  | trt.Runtime        | trt.Runtime                          |

Engine header (observed in TensorRT-RTX 1.7 engines; assumed the same in full
TensorRT): bytes 0-3 the magic, bytes 24-27 the version as major, minor, patch, build.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError, IncompatibleArtifactError, MissingBackendError

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}   # flavour -> module
BACKENDS = ("auto", *FLAVOURS)
TITLES = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
MAGIC = {b"ftrt": "tensorrt", b"vtrt": "tensorrt-rtx"}
RTX_DEFAULT_CC = ("8.0", "8.6", "8.9", "12.0", "12.1")   # what an RTX engine runs on without --target-cc
INSTALL = "pip install 'infini-deploy[rtx]' (tensorrt-rtx, builds without a GPU) or 'infini-deploy[trt]' (tensorrt)"


@dataclass(frozen=True)
class Trt:
    """An imported TensorRT flavour and what it can do."""
    module: object        # the imported tensorrt / tensorrt_rtx module
    flavour: str          # "tensorrt" | "tensorrt-rtx"
    version: str          # module.__version__, e.g. "1.7.1.116" or "10.13.0.35"

    @property
    def title(self) -> str:
        return f"{TITLES[self.flavour]} {self.version}"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def targets_compute_capability(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    @property
    def has_timing_cache(self) -> bool:
        """TensorRT-RTX keeps the API but its timing-cache calls are no-ops (deprecated since 1.2)."""
        return self.flavour == "tensorrt"

    @property
    def has_plugins(self) -> bool:
        return self.flavour == "tensorrt"

    def network_flags(self) -> int:
        """TensorRT 10 is weakly typed unless asked; 11 and RTX are strongly typed (the flag is implied)."""
        trt = self.module
        if self.flavour == "tensorrt" and self.major < 11:
            return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return 0

    def set_compute_capabilities(self, config, targets: tuple[str, ...]) -> list[str]:
        """Target ``targets`` ("8.9", "12.0"); returns what the engine runs on (RTX default when empty)."""
        if not targets:
            return list(RTX_DEFAULT_CC) if self.targets_compute_capability else ["that of the build GPU"]
        if not self.targets_compute_capability:
            raise BadInputError(f"--target-cc is a TensorRT-RTX option; {self.title} builds for the GPU it runs "
                                "on: use --builder tensorrt-rtx, or build on the target GPU without --target-cc")
        targets = tuple(dict.fromkeys(targets))   # a capability given twice is one target
        known = {m.removeprefix("SM"): v for m, v in self.module.ComputeCapability.__members__.items()
                 if m.startswith("SM")}
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            key = cc.lower().removeprefix("sm").replace(".", "")
            if key not in known:
                valid = ", ".join(f"{k[:-1]}.{k[-1]}" for k in known)
                raise BadInputError(f"compute capability {cc!r} is not one {self.title} targets; valid: {valid}")
            config.set_compute_capability(known[key], i)
        return [f"{k[:-1]}.{k[-1]}" for k in (c.lower().removeprefix("sm").replace(".", "") for c in targets)]

    def enable_plugin_override(self, parser) -> bool:
        """Prefer a registered plugin over a node's local-function body (OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)."""
        flag = getattr(self.module.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE", None)
        if flag is None:
            return False
        parser.set_flag(flag)
        return True

    def runtime(self, logger):
        return self.module.Runtime(logger)


def load(backend: str = "auto") -> Trt:
    """The TensorRT flavour ``backend`` names ("auto": tensorrt if installed, else tensorrt_rtx)."""
    if backend not in BACKENDS:
        raise BadInputError(f"TensorRT backend {backend!r} is not known; expected one of: {', '.join(BACKENDS)}")
    wanted = list(FLAVOURS) if backend == "auto" else [backend]
    for flavour in wanted:
        try:
            module = importlib.import_module(FLAVOURS[flavour])
        except ImportError:
            continue
        return Trt(module, flavour, module.__version__)
    if backend == "auto":
        raise MissingBackendError(f"no TensorRT module is installed (tensorrt or tensorrt_rtx): {INSTALL}")
    extra = "rtx" if backend == "tensorrt-rtx" else "trt"
    raise MissingBackendError(f"--builder {backend} needs the {FLAVOURS[backend]} module: "
                              f"pip install 'infini-deploy[{extra}]'")


def available() -> list[str]:
    """The flavours importable here (no error when none)."""
    found = []
    for flavour, module in FLAVOURS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        found.append(flavour)
    return found


def engine_header(path: Path) -> dict:
    """{"flavour", "version"} from an engine file's first bytes; IncompatibleArtifactError if it is not one."""
    with open(path, "rb") as f:
        head = f.read(28)
    flavour = MAGIC.get(head[:4])
    if flavour is None or len(head) < 28:
        raise IncompatibleArtifactError(f"{path} is not a TensorRT engine (its first bytes {head[:4]!r} are "
                                        f"neither of {', '.join(repr(m) for m in MAGIC)}): build it again with "
                                        "`infini build`")
    return {"flavour": flavour, "version": ".".join(str(b) for b in head[24:28])}


def check_engine(path: Path, trt: Trt) -> None:
    """The engine at ``path`` was made by this flavour and version (read from its header, no GPU needed)."""
    header = engine_header(path)
    made = f"{TITLES[header['flavour']]} {header['version']}"
    version_known = header["flavour"] == "tensorrt-rtx"   # the header layout is only observed for RTX
    if header["flavour"] != trt.flavour or (version_known and header["version"] != trt.version):
        raise IncompatibleArtifactError(f"{path} was built by {made} (its header); this runtime is {trt.title}: "
                                        "rebuild it with `infini build` here, or install that version")


class Logger:
    """Factory of a TensorRT logger that keeps errors, so exceptions can quote them."""

    def __init__(self, trt: Trt, verbose: bool = False):
        module = trt.module
        level = module.Logger.VERBOSE if verbose else module.Logger.ERROR
        outer = self

        class _Keeping(module.ILogger):
            def __init__(self):
                module.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity <= level:
                    outer.messages.append(msg)

        self.messages: list[str] = []
        self.logger = _Keeping()

    def last_error(self) -> str:
        return self.messages[-1] if self.messages else "no message from TensorRT"
