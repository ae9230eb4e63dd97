"""Command-line checks that run before Hydra composes anything, so a typo or an unusable output folder
gets one clear line instead of a stack trace (and nothing is loaded first)."""

from __future__ import annotations

import os
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "task", "experiment", "esp_tree", "arm")  # hydra/launcher has plugin launchers: Hydra checks it
OUTPUT_KEYS = ("hydra.run.dir", "hydra.sweep.dir")
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")  # Hydra's flag: one more config folder, searched after conf/


def compose(overrides=()):
    """The job config `python run.py <overrides>` would run, composed without running it (an extra config
    folder joins through `search_path_overrides`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def search_path_overrides(config_dirs=()) -> list[str]:
    """The override that adds extra config folders to Hydra's search path (what --config-dir does)."""
    dirs = [Path(d).resolve() for d in config_dirs]
    return [f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]"] if dirs else []


def choices(group: str, config_dirs=()) -> list[str]:
    """The options of a config group: conf/<group>/*.yaml and those of any extra config folder."""
    return sorted({p.stem for d in (CONF, *map(Path, config_dirs)) for p in (d / group).glob("*.yaml")})


def config_dirs(argv: list[str]) -> list[Path]:
    """The extra config folders named on a run.py command line (`--config-dir DIR`, `-cd DIR`, `--config-dir=DIR`)."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in CONFIG_DIR_FLAGS and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.split("=", 1)[0] in CONFIG_DIR_FLAGS and "=" in arg:
            dirs.append(Path(arg.split("=", 1)[1]))
    return dirs


def _values(value: str) -> list[str]:
    """The values of a sweep override (`a,b`, `choice(a,b)`) or of a plain one."""
    v = value.strip()
    if v.startswith("glob("):  # glob(pattern, exclude=...) selects among the valid options themselves
        return []
    if v.startswith("choice(") and v.endswith(")"):
        v = v[len("choice("):-1]
    return [x.strip().strip("'\"") for x in v.split(",") if x.strip()]


def writable(path: Path) -> str | None:
    """None if the folder `path` can be created and written (tried for real: permission bits do not
    stop root), else why not."""
    p = path if path.is_absolute() else Path.cwd() / path
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"{p} ({e.strerror or e})"
    return None


def check_command_line(argv: list[str]) -> str | None:
    """The first problem with the `key=value` overrides in `argv`, as a message, or None."""
    extra = config_dirs(argv)
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUPS and value not in ("null", ""):
            valid = choices(key, extra)
            unknown = [v for v in _values(value) if v not in valid]
            if unknown:
                return f"unknown {key} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}"
        if key in OUTPUT_KEYS and "${" not in value:
            why = writable(Path(os.path.expanduser(value)))
            if why:
                return f"cannot write results to {why}; pass a writable {key}=..."
    if not any(a.split("=", 1)[0] in OUTPUT_KEYS for a in argv):  # the defaults write under ./results
        why = writable(Path("results"))
        if why:
            return f"cannot write results to {why}; run from a writable folder or pass hydra.run.dir=... / hydra.sweep.dir=..."
    return None
